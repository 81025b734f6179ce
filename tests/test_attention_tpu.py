"""The TPU (Pallas splash) and GPU (cuDNN) attention paths, and which one runs where.

Splash runs in Pallas interpret mode here (no TPU): values and gradients against the
float64 reference of test_attention.py for SD's head dims, with padded keys (77),
key-padding masks, padded queries and several blocks. Shapes stay small: interpret
mode is slow.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax.models import attention
from test_attention import max_error, random_inputs, reference, value_and_grads

SD_HEAD_DIMS = [40, 64, 80, 160]


def splash(q, k, v, mask=None):
    return attention.dot_product_attention(q, k, v, mask=mask, implementation="splash")


def check_splash(shape, dtype, tolerance, mask=None):
    """Splash's output and q/k/v gradients against the reference; returns the max errors."""
    q, k, v, w = random_inputs(*shape, dtype)
    fn = lambda q, k, v: splash(q, k, v, None if mask is None else jnp.asarray(mask))
    out, grads = value_and_grads(fn)(*(jnp.asarray(x, dtype) for x in (q, k, v, w)))
    want_out, want_grads = reference(q, k, v, w, shape[-1] ** -0.5, mask)
    errors = {}
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads)):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert np.all(np.isfinite(np.asarray(got, np.float32))), name
        errors[name] = max_error(got, want)
    assert max(errors.values()) < tolerance, errors
    return errors


def key_mask(batch, keys, kept):
    """``[B, 1, 1, Lk]``: batch element i keeps its first ``kept[i]`` keys and drops every 3rd."""
    mask = np.arange(keys)[None, :] < np.asarray(kept)[:, None]
    mask &= np.arange(keys)[None, :] % 3 != 2
    return mask[:, None, None, :]


@pytest.fixture
def small_blocks(monkeypatch):
    """128-token blocks, so that 256 tokens make 2 x 2 blocks (online softmax across blocks)."""
    monkeypatch.setattr(attention, "SPLASH_MAX_BLOCK", 128)


@pytest.mark.parametrize("dim", SD_HEAD_DIMS)
def test_splash_cross_attention_float32(dim):
    """77 keys (padded to 128) under a key-padding mask; 200 queries (padded to 256)."""
    check_splash((2, 200, 77, 2, dim), jnp.float32, 1e-5, mask=key_mask(2, 77, [77, 40]))


@pytest.mark.parametrize("dim", SD_HEAD_DIMS)
def test_splash_self_attention_float32(dim, small_blocks):
    check_splash((1, 256, 256, 2, dim), jnp.float32, 1e-5)


@pytest.mark.parametrize("shape", [(1, 256, 77, 2, 40), (1, 256, 256, 2, 160)], ids=lambda s: "x".join(map(str, s)))
def test_splash_bfloat16(shape, small_blocks):
    # bfloat16 keeps 8 bits of mantissa; q * scale is rounded to bfloat16 once more.
    check_splash(shape, jnp.bfloat16, 1e-2)


def test_splash_without_padding_matches_einsum(small_blocks):
    """No padding anywhere (D = 128, 256 tokens): the kernel itself, no segment ids."""
    check_splash((1, 256, 256, 1, 128), jnp.float32, 1e-5)


def test_splash_refuses_masks_over_queries():
    q = jnp.zeros((1, 128, 1, 8))
    causal = jnp.tril(jnp.ones((128, 128), bool))
    with pytest.raises(ValueError, match="key-padding"):
        splash(q, q, q, causal)


def test_segment_ids_mark_padded_and_masked_keys():
    ids = attention._segment_ids(jnp.asarray([[True, False, True]]), 1, 128, 3, 128)
    assert ids.q.shape == (1, 128) and np.all(np.asarray(ids.q) == 1)
    np.testing.assert_array_equal(np.asarray(ids.kv), np.r_[[1, 0, 1], np.zeros(125)][None])
    assert attention._segment_ids(None, 2, 256, 256, 256) is None


@pytest.mark.parametrize("length, block, padded", [(4096, 512, 4096), (1024, 512, 1024), (256, 256, 256),
                                                   (64, 128, 128), (77, 128, 128), (1100, 512, 1536)])
def test_splash_blocks(length, block, padded):
    assert attention._splash_block(length) == (block, padded)


def backend(monkeypatch, name):
    monkeypatch.setattr(jax, "default_backend", lambda: name)


def spec(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dispatch_picks_splash_on_tpu(monkeypatch, dtype):
    backend(monkeypatch, "tpu")
    q, k = spec((1, 4096, 8, 40), dtype), spec((1, 77, 8, 40), dtype)
    keys = jnp.ones((1, 1, 1, 77), bool)
    causal = jnp.tril(jnp.ones((77, 77), bool))
    assert attention.select_implementation(q, q) == "splash"
    assert attention.select_implementation(q, k, keys) == "splash"
    assert attention.select_implementation(k, k, causal) == "einsum"
    jaxpr = str(jax.make_jaxpr(lambda q, k: attention.dot_product_attention(q, k, k))(q, k))
    assert "pallas_call" in jaxpr


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_dispatch_keeps_splash_off_other_backends(monkeypatch, name):
    backend(monkeypatch, name)
    q, k = spec((1, 1024, 8, 40)), spec((1, 77, 8, 40))
    assert attention.select_implementation(q, q) == "recompute"
    assert attention.select_implementation(spec((1, 64, 8, 40)), k) == "einsum"
    jaxpr = str(jax.make_jaxpr(lambda q: attention.dot_product_attention(q, q, q))(q))
    assert "pallas_call" not in jaxpr and "custom_vjp_call" in jaxpr


def test_unknown_implementation_is_refused():
    q = jnp.zeros((1, 8, 1, 8))
    with pytest.raises(ValueError, match="not one of"):
        attention.dot_product_attention(q, q, q, implementation="flash")


# cuDNN: on CPU, that the GPU dispatch asks cuDNN and returns its result; on a GPU, that
# the compiled program really holds cuDNN's fused-attention custom call (a refused call
# would fall back to XLA ops without one).

@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_gpu_dispatch_calls_cudnn(monkeypatch, dtype):
    backend(monkeypatch, "gpu")
    calls = []

    def fake_cudnn(q, k, v, *, scale, implementation):
        calls.append((implementation, scale, q.shape, q.dtype))
        return jnp.full(q.shape, 7, q.dtype)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
    q = jnp.ones((2, 256, 8, 40), dtype)
    assert attention.select_implementation(q, q) == "cudnn"
    out = attention.dot_product_attention(q, q, q)
    assert calls == [("cudnn", 40 ** -0.5, q.shape, dtype)]
    assert np.all(np.asarray(out, np.float32) == 7)
    assert attention.select_implementation(q.astype(jnp.float32), q) == "recompute"
    assert attention.select_implementation(q, q, jnp.ones((256, 256), bool)) == "einsum"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (the CPU half is test_gpu_dispatch_calls_cudnn)")
@pytest.mark.parametrize("dim", [40, 64, 80])
def test_cudnn_in_compiled_gpu_program(dim):
    q = jnp.ones((2, 256, 8, dim), jnp.bfloat16)
    loss = lambda q, k, v: attention.dot_product_attention(q, k, v).astype(jnp.float32).sum()
    for fn in (attention.dot_product_attention, jax.grad(loss, argnums=(0, 1, 2))):
        hlo = jax.jit(fn).lower(q, q, q).compile().as_text()
        assert "__cudnn$fmha" in hlo, f"no cuDNN fused attention for head dim {dim}: fell back"
