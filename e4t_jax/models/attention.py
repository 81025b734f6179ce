"""One attention function behind every module, so faster kernels can be swapped in.

All implementations take and return ``[B, L, H, D]`` arrays (batch, tokens, heads,
head dim) and compute ``softmax(q k^T * scale) v``. :func:`dot_product_attention`
picks one per call (at trace time, :func:`select_implementation`; ``implementation=``
overrides it):

- ``"splash"``, TPU (``jax.default_backend() == "tpu"``), no mask or a key-padding
  mask: :func:`splash_attention`, JAX's Pallas splash-attention kernel, with the head
  dim and the sequences padded to what the kernel is tested with (multiples of 128 and
  of the block size; the padding is exact). Anywhere else it runs in Pallas interpret
  mode (how the tests run it on CPU);
- ``"cudnn"``, GPU, float16/bfloat16, no mask: cuDNN's fused attention
  (``jax.nn.dot_product_attention(implementation="cudnn")``), when cuDNN accepts the
  shapes (else the choice below);
- ``"recompute"``, no mask and at least ``RECOMPUTE_MIN_SCORES`` query-key pairs per
  head (the U-Net's self- and cross-attention at 16x16 latents and up):
  :func:`recompute_attention`, whose hand-written backward keeps only the output and
  the log-sum-exp of each query and recomputes the ``[B, H, Lq, Lk]`` probabilities from
  them, one cache-sized block of heads or queries at a time (not an online softmax: each
  query sees all keys at once);
- ``"einsum"`` otherwise (masks, e.g. CLIP's causal mask; short sequences):
  :func:`einsum_attention`, which XLA differentiates by itself.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

# Below this many scores per head (Lq * Lk) the plain einsum is as fast on CPU
# (measured: bench/RESULTS.md).
RECOMPUTE_MIN_SCORES = 1 << 14
# Score elements per loop step of recompute_attention. On CPU, 2**20 (4 MiB of float32)
# stays in cache: 1024 tokens run one head per step, 4096 tokens 256 queries per step.
_CPU_BLOCK_ELEMENTS = 1 << 20
# Elsewhere, only split when the scores of all heads would exceed 1 GiB of float32.
_ACCELERATOR_BLOCK_ELEMENTS = 1 << 28
# splash_attention: the largest query / key block (not tuned: no TPU here); blocks and
# padded head dims are multiples of the TPU's 128 lanes.
SPLASH_MAX_BLOCK = 512
_LANES = 128
IMPLEMENTATIONS = ("splash", "cudnn", "recompute", "einsum")


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    scale: float | None = None,
    upcast: bool = True,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention.

    Args:
      q: ``[B, Lq, H, D]`` queries.
      k: ``[B, Lk, H, D]`` keys.
      v: ``[B, Lk, H, D]`` values.
      mask: optional boolean, broadcastable to ``[B, H, Lq, Lk]``; False entries are
        excluded (e.g. the CLIP text encoder's causal mask).
      scale: logit scale, ``D ** -0.5`` by default.
      upcast: compute the logits and softmax in float32 (diffusers'
        ``upcast_attention`` / ``upcast_softmax``); the output keeps ``q.dtype``.
        ``"splash"`` and ``"cudnn"`` always keep the softmax in float32.
      implementation: one of ``IMPLEMENTATIONS``; None picks one with
        :func:`select_implementation`.

    Returns:
      ``[B, Lq, H, D]`` in ``q.dtype``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    name = implementation or select_implementation(q, k, mask)
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation {name!r} is not one of {IMPLEMENTATIONS}")
    if name == "splash":
        key_mask = None if mask is None else _key_mask(mask, q.shape[0], k.shape[1])
        if mask is not None and key_mask is None:
            raise ValueError(f"splash attention takes key-padding masks only, not shape {mask.shape}")
        return splash_attention(q, k, v, key_mask=key_mask, scale=scale)
    if name == "cudnn":
        try:
            return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
        except (NotImplementedError, ValueError, RuntimeError):
            name = _portable_implementation(q, k, mask)  # cuDNN refused these shapes or this GPU.
    if name == "recompute":
        return recompute_attention(q, k, v, scale, upcast)
    return einsum_attention(q, k, v, mask=mask, scale=scale, upcast=upcast)


def select_implementation(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> str:
    """The name in ``IMPLEMENTATIONS`` that :func:`dot_product_attention` runs by default.

    Args: as :func:`dot_product_attention` (only shapes and dtypes are read). ``"cudnn"``
    may still fall back to the portable choice if cuDNN refuses the call.
    """
    backend = jax.default_backend()
    if backend == "tpu" and (mask is None or _key_mask(mask, q.shape[0], k.shape[1]) is not None):
        return "splash"
    if backend == "gpu" and mask is None and q.dtype in (jnp.float16, jnp.bfloat16):
        return "cudnn"
    return _portable_implementation(q, k, mask)


def _portable_implementation(q, k, mask):
    """``"recompute"`` for long unmasked attention, else ``"einsum"``."""
    return "recompute" if mask is None and q.shape[1] * k.shape[1] >= RECOMPUTE_MIN_SCORES else "einsum"


def _key_mask(mask, batch, keys):
    """A mask broadcastable to ``[B, H, Lq, Lk]`` as a ``[B, Lk]`` key mask, or None.

    None when it varies over heads or queries (e.g. a causal mask).
    """
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if shape[1] != 1 or shape[2] != 1:
        return None
    return jnp.broadcast_to(jnp.reshape(mask, (shape[0], shape[3])), (batch, keys)).astype(bool)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_mask: jax.Array | None = None,
    scale: float | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention through JAX's Pallas TPU splash-attention kernel (``make_splash_mha``).

    Why splash rather than ``pallas.ops.tpu.flash_attention``: both take segment ids
    (key padding without a dense ``[B, H, Lq, Lk]`` mask), but flash raises for head dims
    above 128 that are not multiples of 128 (SD 1.x's 160), while splash is the TPU
    kernel JAX keeps developing (separate dq / dkv backward blocks, block-sparse masks).

    The kernel sees ``[H, L, D]`` per batch element (vmapped over ``B``), with no scale
    argument: ``q`` is multiplied by ``scale`` first (in float32, then rounded back to
    ``q.dtype``). Padding, all exact:

    - head dim ``D`` with zeros to a multiple of 128 (40, 64, 80 -> 128; 160 -> 256), the
      head dims JAX's splash tests run on TPU; zero columns add nothing to ``q k^T``, and
      give zero output columns, which are cut off. The MXU is 128 lanes wide, so this
      costs memory traffic, not matmul passes. ``scale`` comes from the real ``D``;
    - ``Lq`` and ``Lk`` to a multiple of the block (``min(SPLASH_MAX_BLOCK, L)`` rounded up
      to 128; e.g. 77 keys -> 128, 64 tokens -> 128, 4096 stays); padded queries are cut
      off (their output gradient is zero), padded keys get segment id 0 and queries id 1,
      so they get zero probability.

    Args:
      q: ``[B, Lq, H, D]`` queries, float32 or bfloat16.
      k: ``[B, Lk, H, D]`` keys, same dtype.
      v: ``[B, Lk, H, D]`` values, same dtype.
      key_mask: optional boolean ``[B, Lk]``; False keys are excluded. Every batch element
        needs at least one True key.
      scale: logit scale, ``D ** -0.5`` by default.
      interpret: Pallas interpret mode; by default wherever the backend is not TPU.

    Returns:
      ``[B, Lq, H, D]`` in ``q.dtype``; logits and softmax are float32 inside the kernel.

    Not checked on a TPU (none here): compilation by Mosaic, speed, and how XLA
    partitions the kernel's custom call under a multi-device ``jit`` (if it gathers a
    batch-sharded input, the fix is a ``shard_map`` over the batch axis).
    """
    batch, queries, heads, dim = q.shape
    keys = k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    interpret = jax.default_backend() != "tpu" if interpret is None else interpret
    q_block, q_padded = _splash_block(queries)
    k_block, k_padded = _splash_block(keys)
    dim_padded = -(-dim // _LANES) * _LANES
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    q, k, v = (_to_heads_major(x, length, dim_padded) for x, length in ((q, q_padded), (k, k_padded), (v, k_padded)))
    kernel = _splash_kernel(heads, q_padded, k_padded, q_block, k_block, interpret)
    segment_ids = _segment_ids(key_mask, batch, q_padded, keys, k_padded)
    out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(q, k, v, segment_ids)
    return out[:, :, :queries, :dim].transpose(0, 2, 1, 3)


def _splash_block(length: int) -> tuple[int, int]:
    """(block, padded length) for a sequence of ``length`` tokens."""
    block = min(SPLASH_MAX_BLOCK, -(-length // _LANES) * _LANES)
    return block, -(-length // block) * block


def _to_heads_major(x, length, dim):
    """``[B, L, H, D]`` -> ``[B, H, length, dim]``, zero-padded."""
    pad = ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dim - x.shape[3]))
    return jnp.pad(x, pad).transpose(0, 2, 1, 3)


def _segment_ids(key_mask, batch, q_padded, keys, k_padded):
    """Splash segment ids ``[B, Lq_pad]`` / ``[B, Lk_pad]`` (int32): queries 1, kept keys 1.

    None when every key is kept (no mask, no padding).
    """
    if key_mask is None and keys == k_padded:
        return None
    kept = jnp.ones((batch, keys), bool) if key_mask is None else key_mask
    kv = jnp.pad(kept, ((0, 0), (0, k_padded - keys))).astype(jnp.int32)
    return splash.SegmentIds(q=jnp.ones((batch, q_padded), jnp.int32), kv=kv)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads, queries, keys, q_block, k_block, interpret):
    """The splash kernel for ``[heads, queries, D]`` x ``[heads, keys, D]``, all pairs allowed.

    Built with concrete (not traced) mask tables, so one kernel serves every trace.
    """
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((queries, keys))] * heads)
    blocks = splash.BlockSizes(
        block_q=q_block, block_kv=k_block, block_kv_compute=k_block,
        block_q_dkv=q_block, block_kv_dkv=k_block, block_kv_dkv_compute=k_block,
        block_q_dq=q_block, block_kv_dq=k_block)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def einsum_attention(q, k, v, *, mask=None, scale=None, upcast=True):
    """Plain attention; same arguments and result as :func:`dot_product_attention`.

    Materializes the ``[B, H, Lq, Lk]`` probabilities, which autodiff keeps for the
    backward pass.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = q.dtype
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def recompute_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, upcast: bool = True) -> jax.Array:
    """Unmasked attention with a memory-lean, cache-friendly hand-written backward.

    Same arguments and result as :func:`dot_product_attention` (no mask). Each head's
    queries see all keys at once (no online softmax); heads, and for long sequences
    query blocks, are processed one cache-sized block per loop step. The forward pass
    saves the output and the float32 log-sum-exp per query; the backward pass
    recomputes the probabilities from them. Logits are ``upcast`` to float32 or kept in
    ``q.dtype``; the softmax statistics are float32 either way.
    """
    return _recompute_forward(q, k, v, scale, upcast)[0]


def _matmul(a, b, contract_a, contract_b, dtype):
    """Batched (over axis 0) product of ``a`` and ``b`` over one axis each."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((0,), (0,))), preferred_element_type=dtype)


def _recompute_forward(q, k, v, scale, upcast):
    compute = jnp.float32 if upcast else q.dtype
    blocks = _Blocks.plan(q.shape, k.shape[1])
    queries = blocks.split_queries(q.astype(compute) * scale)
    keys_t = blocks.split_heads(k.astype(compute), transpose=True)
    values = blocks.split_heads(v, transpose=False)

    def group(args):
        q_group, k_t, v_heads = args
        return lax.map(lambda q_block: _block_forward(q_block, k_t, v_heads, compute), q_group)

    out, lse = lax.map(group, (queries, keys_t, values))
    out = blocks.merge_queries(out).astype(q.dtype)
    return out, (q, k, v, out, blocks.merge_queries(lse[..., None]))


def _block_forward(q, k_t, v, compute):
    """q ``[G, Q, D]``, k^T ``[G, D, K]``, v ``[G, K, D]`` -> out ``[G, Q, D]``, lse ``[G, Q]``."""
    logits = _matmul(q, k_t, 2, 1, compute).astype(jnp.float32)
    peak = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - peak)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    out = _matmul(weights.astype(v.dtype), v, 2, 1, jnp.float32) / total
    return out, (peak + jnp.log(total))[..., 0]


def _recompute_backward(scale, upcast, residuals, d_out):
    q, k, v, out, lse = residuals
    compute = jnp.float32 if upcast else q.dtype
    blocks = _Blocks.plan(q.shape, k.shape[1])
    d_out = d_out.astype(jnp.float32)
    # The softmax backward's per-query term rowsum(dp * p) equals rowsum(do * out).
    delta = jnp.sum(d_out * out.astype(jnp.float32), axis=-1, keepdims=True)
    split_q = blocks.split_queries
    per_query = (split_q(q.astype(compute) * scale), split_q(d_out), split_q(lse)[..., 0], split_q(delta)[..., 0])
    k_compute = k.astype(compute)
    per_head = (blocks.split_heads(k_compute, transpose=True), blocks.split_heads(k_compute, transpose=False),
                blocks.split_heads(v.astype(jnp.float32), transpose=True))

    def group(args):
        *query_blocks, k_t, k_heads, v_t = args

        def step(sums, block):
            dq, dk_t, dv_t = _block_backward(*block, k_t, k_heads, v_t, compute)
            return (sums[0] + dk_t, sums[1] + dv_t), dq

        zeros = jnp.zeros(k_t.shape, jnp.float32)
        (dk_t, dv_t), dq = lax.scan(step, (zeros, zeros), tuple(query_blocks))
        return dq, dk_t, dv_t

    dq, dk_t, dv_t = lax.map(group, per_query + per_head)
    dq = blocks.merge_queries(dq) * scale
    return dq.astype(q.dtype), blocks.merge_heads(dk_t).astype(k.dtype), blocks.merge_heads(dv_t).astype(v.dtype)


def _block_backward(q, d_out, lse, delta, k_t, k, v_t, compute):
    """One block's gradients: dq ``[G, Q, D]`` (without ``scale``), dk^T and dv^T ``[G, D, K]``.

    ``dk^T = q^T ds`` and ``dv^T = do^T p`` transpose the small ``[Q, D]`` operand:
    XLA:CPU runs ``p^T do`` (big transposed operand) about 8x slower.
    """
    probs = jnp.exp(_matmul(q, k_t, 2, 1, compute).astype(jnp.float32) - lse[..., None])
    d_logits = (probs * (_matmul(d_out, v_t, 2, 1, jnp.float32) - delta[..., None])).astype(compute)
    dq = _matmul(d_logits, k, 2, 1, jnp.float32)
    dk_t = _matmul(q, d_logits, 1, 1, jnp.float32)
    dv_t = _matmul(d_out, probs, 1, 1, jnp.float32)
    return dq, dk_t, dv_t


recompute_attention.defvjp(_recompute_forward, _recompute_backward)


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """How recompute_attention walks the ``B * H`` heads and ``Lq`` queries.

    The heads are cut into groups of ``group`` (an outer loop); each group's queries,
    padded to ``n_blocks * block`` rows, into ``n_blocks`` blocks (an inner loop).
    Either ``group == 1`` or ``n_blocks == 1``.
    """

    batch: int
    heads: int
    queries: int
    group: int
    n_blocks: int
    block: int

    @classmethod
    def plan(cls, q_shape: tuple[int, ...], keys: int) -> "_Blocks":
        """Blocks of about the backend's block budget of scores, for queries ``q_shape``."""
        batch, queries, heads, _ = q_shape
        budget = _CPU_BLOCK_ELEMENTS if jax.default_backend() == "cpu" else _ACCELERATOR_BLOCK_ELEMENTS
        rows = max(1, budget // keys)
        if rows < queries:
            n_blocks = math.ceil(queries / rows)
            return cls(batch, heads, queries, 1, n_blocks, math.ceil(queries / n_blocks))
        fits = rows // queries
        group = max(d for d in range(1, batch * heads + 1) if (batch * heads) % d == 0 and d <= fits)
        return cls(batch, heads, queries, group, 1, queries)

    def split_queries(self, x):
        """``[B, Lq, H, D]`` -> ``[B*H/group, n_blocks, group, block, D]`` (zero-padded)."""
        b, lq, h, d = x.shape
        x = jnp.pad(x, ((0, 0), (0, self.n_blocks * self.block - lq), (0, 0), (0, 0)))
        x = x.reshape(b, self.n_blocks, self.block, h, d).transpose(0, 3, 1, 2, 4)
        x = x.reshape(b * h // self.group, self.group, self.n_blocks, self.block, d)
        return x.transpose(0, 2, 1, 3, 4)

    def merge_queries(self, x):
        """Inverse of :meth:`split_queries`: ``[B, Lq, H, D]`` without the padding."""
        d = x.shape[-1]
        x = x.transpose(0, 2, 1, 3, 4).reshape(self.batch, self.heads, self.n_blocks * self.block, d)
        return x[:, :, :self.queries].transpose(0, 2, 1, 3)

    def split_heads(self, x, *, transpose):
        """``[B, Lk, H, D]`` -> ``[B*H/group, group, Lk, D]``, or ``[..., D, Lk]`` if ``transpose``."""
        b, lk, h, d = x.shape
        x = x.transpose(0, 2, 3, 1) if transpose else x.transpose(0, 2, 1, 3)
        return x.reshape((b * h // self.group, self.group) + x.shape[2:])

    def merge_heads(self, x_t):
        """``[B*H/group, group, D, Lk]`` -> ``[B, Lk, H, D]``."""
        d, lk = x_t.shape[-2:]
        return x_t.reshape(self.batch, self.heads, d, lk).transpose(0, 3, 1, 2)
