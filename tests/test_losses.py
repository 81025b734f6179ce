"""E4T losses against numpy closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e4t_jax.e4t import losses
from e4t_jax.e4t import offsets as off

B, H, W, C = 2, 4, 6, 3


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    pred = rng.standard_normal((B, H, W, C)).astype(np.float32)
    target = rng.standard_normal((B, H, W, C)).astype(np.float32)
    mask = rng.uniform(size=(B, H, W)).astype(np.float32)
    mask[0, :2] = 0.0
    return pred, target, mask


def test_unmasked_loss_is_mean_squared_error(data):
    pred, target, _ = data
    got = losses.diffusion_loss(jnp.asarray(pred, jnp.bfloat16), jnp.asarray(target, jnp.bfloat16))
    assert got.dtype == jnp.float32
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)  # noqa: E731
    np.testing.assert_allclose(got, np.mean((bf(pred) - bf(target)) ** 2), rtol=1e-5)


def test_masked_loss_is_weighted_mean_over_masked_elements(data):
    pred, target, mask = data
    squared = (pred.astype(np.float64) - target) ** 2
    want = np.sum(mask[..., None] * squared) / (np.sum(mask) * C)
    assert not np.isclose(want, np.mean(squared))
    np.testing.assert_allclose(losses.diffusion_loss(pred, target, mask), want, rtol=1e-5)
    np.testing.assert_allclose(losses.diffusion_loss(pred, target, mask[..., None]), want, rtol=1e-5)
    binary = (mask > 0.5).astype(np.float32)
    np.testing.assert_allclose(losses.diffusion_loss(pred, target, binary),
                               np.mean(squared[binary.astype(bool)]), rtol=1e-5)


def test_all_ones_mask_equals_unmasked_and_zero_mask_is_safe(data):
    pred, target, _ = data
    np.testing.assert_allclose(losses.diffusion_loss(pred, target, np.ones((B, H, W), np.float32)),
                               losses.diffusion_loss(pred, target), rtol=1e-6)
    zero_mask = np.zeros((B, H, W, 1), np.float32)
    loss, grad = jax.value_and_grad(losses.diffusion_loss)(jnp.asarray(pred), target, zero_mask)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)
    with pytest.raises(ValueError, match="downsample_mask"):
        losses.diffusion_loss(pred, target, np.ones((B, 2 * H, 2 * W), np.float32))


def test_downsample_mask_averages_patches():
    mask = np.zeros((1, 16, 8), np.float32)
    mask[0, :8, :4] = 1.0   # the whole top-left latent pixel
    mask[0, 8:10, 4:] = 1.0  # a quarter of the bottom-right one
    pooled = losses.downsample_mask(mask, (2, 2))
    assert pooled.shape == (1, 2, 2) and pooled.dtype == jnp.float32
    np.testing.assert_allclose(pooled[0], [[1.0, 0.0], [0.0, 0.25]])
    with_channel = losses.downsample_mask(jnp.asarray(mask[..., None], jnp.uint8), (2, 2))
    assert with_channel.shape == (1, 2, 2, 1)
    np.testing.assert_allclose(with_channel[..., 0], pooled)
    with pytest.raises(ValueError, match="pool evenly"):
        losses.downsample_mask(mask, (3, 2))


def test_embedding_regularization():
    offset = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    want = np.mean(np.sum(offset.astype(np.float64) ** 2, axis=-1))
    np.testing.assert_allclose(losses.embedding_regularization(offset), want, rtol=1e-6)


def test_total_loss_combines_terms_and_differentiates(data):
    pred, target, mask = data
    kernel = np.random.default_rng(2).standard_normal((4, 5)).astype(np.float32)
    unet = {"attn1": {"to_q": {"kernel": kernel}}}
    config = off.OffsetConfig(kind="dense", targets=("attn1.to_q",))
    offsets = {"attn1": {"to_q": {"kernel": {"delta": jnp.full((4, 5), 0.5)}}}}
    scaled = 0.1 * np.ones((B, 8), np.float32)

    loss_fn = jax.jit(lambda p, o, s: losses.total_loss(p, target, scaled_offset=s, offsets=o, offset_kind=config,
                                                        mask=mask, lambda_w=0.1))
    loss, metrics = loss_fn(jnp.asarray(pred), offsets, scaled)
    np.testing.assert_allclose(metrics["diffusion_loss"], losses.diffusion_loss(pred, target, mask), rtol=1e-6)
    np.testing.assert_allclose(metrics["embedding_reg"], 0.08, rtol=1e-6)
    np.testing.assert_allclose(metrics["offset_l2"], 5.0, rtol=1e-6)
    np.testing.assert_allclose(loss, metrics["diffusion_loss"] + 0.01 * 0.08 + 0.1 * 5.0, rtol=1e-6)
    np.testing.assert_array_equal(metrics["loss"], loss)

    grads = jax.grad(lambda o, s: loss_fn(jnp.asarray(pred), o, s)[0], argnums=(0, 1))(offsets, scaled)
    np.testing.assert_allclose(grads[0]["attn1"]["to_q"]["kernel"]["delta"], 0.1 * 2 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(grads[1], 0.01 * 2 * scaled / B, rtol=1e-6)

    plain, plain_metrics = losses.total_loss(pred, target)
    assert set(plain_metrics) == set(metrics)
    assert float(plain_metrics["offset_l2"]) == 0.0 and float(plain_metrics["embedding_reg"]) == 0.0
    np.testing.assert_allclose(plain, losses.diffusion_loss(pred, target), rtol=1e-6)
    multiplicative = {"attn1": {"to_q": {"kernel": {"scale": jnp.full((4, 5), 0.5)}}}}
    _, mult_metrics = losses.total_loss(pred, target, offsets=multiplicative, offset_kind="multiplicative",
                                        unet_params=unet)
    np.testing.assert_allclose(mult_metrics["offset_l2"], np.sum((0.5 * kernel.astype(np.float64)) ** 2), rtol=1e-5)
