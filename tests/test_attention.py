"""Attention implementations against a float64 numpy reference: values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax.models import attention


def reference(q, k, v, w, scale, mask=None):
    """softmax(q k^T * scale) v in float64, and the gradients of sum(out * w) wrt q, k, v.

    All arrays ``[B, L, H, D]``; mask broadcastable to ``[B, H, Lq, Lk]``.
    """
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k, optimize=True) * scale
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v, optimize=True)
    d_probs = np.einsum("bqhd,bkhd->bhqk", w, v, optimize=True)
    d_logits = probs * (d_probs - (d_probs * probs).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", d_logits, k, optimize=True) * scale
    dk = np.einsum("bhqk,bqhd->bkhd", d_logits, q, optimize=True) * scale
    dv = np.einsum("bhqk,bqhd->bkhd", probs, w, optimize=True)
    return out, (dq, dk, dv)


def random_inputs(batch, queries, keys, heads, dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, queries, heads, dim))
    k, v = (rng.standard_normal((batch, keys, heads, dim)) for _ in range(2))
    w = rng.standard_normal((batch, queries, heads, dim))
    # Round to the tested dtype first so that the reference sees the same inputs.
    return [np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v, w)]


def value_and_grads(fn):
    """jit of (q, k, v, w) -> (fn(q, k, v), grads of sum(fn(q, k, v) * w) wrt q, k, v)."""
    def run(q, k, v, w):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(w.astype(out.dtype))
    return jax.jit(run)


def max_error(got, want):
    """Largest absolute error relative to the reference's largest magnitude."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def check(fn, shape, dtype, tolerance, mask=None):
    q, k, v, w = random_inputs(*shape, dtype)
    out, grads = value_and_grads(fn)(*(jnp.asarray(x, dtype) for x in (q, k, v, w)))
    want_out, want_grads = reference(q, k, v, w, shape[-1] ** -0.5, mask)
    assert out.dtype == dtype and out.shape == want_out.shape
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads)):
        assert got.dtype == dtype, name
        assert max_error(got, want) < tolerance, (name, max_error(got, want))


def recompute(upcast):
    return lambda q, k, v: attention.recompute_attention(q, k, v, q.shape[-1] ** -0.5, upcast)


# (batch, queries, keys, heads, head dim): several heads per loop step; one head per
# step; query blocks (1100 x 1100 exceeds one CPU block); padded query blocks
# (1101 rows); cross-attention (77 keys).
SHAPES = [(2, 64, 64, 8, 8), (2, 256, 256, 4, 16), (1, 1024, 1024, 2, 64), (1, 1100, 1100, 1, 8),
          (1, 1101, 1100, 1, 32), (2, 300, 77, 3, 40)]


@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_recompute_matches_reference_float32(shape, upcast):
    check(recompute(upcast), shape, jnp.float32, 1e-5)


@pytest.mark.parametrize("upcast, tolerance", [(True, 1e-2), (False, 3e-2)])
@pytest.mark.parametrize("shape", [(2, 256, 256, 4, 16), (1, 1101, 1100, 1, 32)], ids=lambda s: "x".join(map(str, s)))
def test_recompute_matches_reference_bfloat16(shape, upcast, tolerance):
    check(recompute(upcast), shape, jnp.bfloat16, tolerance)


def test_einsum_matches_reference():
    check(attention.einsum_attention, (2, 64, 77, 3, 8), jnp.float32, 1e-5)


def test_masked_attention_matches_reference():
    causal = np.tril(np.ones((96, 96), bool))
    fn = lambda q, k, v: attention.dot_product_attention(q, k, v, mask=jnp.asarray(causal))
    check(fn, (2, 96, 96, 2, 16), jnp.float32, 1e-5, mask=causal)


def test_plan_cuts_long_sequences_into_query_blocks():
    long = attention._Blocks.plan((1, 4096, 8, 40), 4096)
    short = attention._Blocks.plan((2, 256, 8, 16), 256)
    assert (long.group, long.n_blocks, long.block) == (1, 16, 256)
    assert (short.group, short.n_blocks, short.block) == (16, 1, 256)


@pytest.mark.parametrize("queries, keys, masked, fast", [
    (1024, 1024, False, True), (1024, 77, False, True), (64, 64, False, False), (1024, 1024, True, False)])
def test_dispatch(queries, keys, masked, fast):
    q = jax.ShapeDtypeStruct((1, queries, 2, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((1, keys, 2, 8), jnp.float32)
    mask = jnp.ones((queries, keys), bool) if masked else None
    jaxpr = jax.make_jaxpr(lambda q, k: attention.dot_product_attention(q, k, k, mask=mask))(q, k)
    assert ("custom_vjp_call" in str(jaxpr)) == fast


def test_public_function_matches_reference_on_fast_path():
    check(attention.dot_product_attention, (1, 512, 512, 2, 8), jnp.float32, 1e-5)
