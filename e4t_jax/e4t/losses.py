"""E4T's training objective as pure functions.

``loss = diffusion + lambda_emb * ||s * E(x)||^2 + lambda_w * sum ||dW||^2``

The diffusion term is a (optionally masked) mean squared error between the U-Net's
prediction and its target; which target (the noise for epsilon-prediction, or the
velocity for v-prediction) is the scheduler's business, not this module's. All
losses are computed in float32 whatever the inputs' dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from e4t_jax.e4t import offsets as offsets_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the regularizers.

    Attributes:
      lambda_emb: weight of ``||s * E(x)||^2`` (0.01, the project design's default).
      lambda_w: weight of ``sum ||dW||^2``. Not a number confirmed from the paper: a
        weak pull toward zero, so that small relative changes of the attention kernels
        cost far less than the diffusion loss.
    """

    lambda_emb: float = 0.01
    lambda_w: float = 1e-4


def downsample_mask(mask: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
    """Average-pools an image-resolution loss mask to latent resolution.

    Args:
      mask: ``[B, H, W]`` or ``[B, H, W, 1]``, values in [0, 1] (any dtype).
      latent_hw: ``(h, w)``; ``H`` and ``W`` must be multiples of them (8x for SD).

    Returns:
      float32 ``[B, h, w]`` (or ``[B, h, w, 1]``): the fraction of each latent
      pixel's image patch that the mask covers.
    """
    keep_channel = mask.ndim == 4
    if keep_channel:
        mask = mask[..., 0]
    b, height, width = mask.shape
    h, w = latent_hw
    if height % h or width % w:
        raise ValueError(f"A {height}x{width} mask does not pool evenly to the {h}x{w} latent.")
    pooled = mask.astype(jnp.float32).reshape(b, h, height // h, w, width // w).mean(axis=(2, 4))
    return pooled[..., None] if keep_channel else pooled


def diffusion_loss(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error, optionally weighted by a per-pixel mask.

    Args:
      pred: ``[B, h, w, C]`` U-Net output.
      target: ``[B, h, w, C]`` noise (epsilon-prediction) or velocity (v-prediction).
      mask: optional ``[B, h, w]`` or ``[B, h, w, 1]`` weights at latent resolution
        (see :func:`downsample_mask`). The loss is then the weighted mean
        ``sum(m * err^2) / sum(m * 1)`` over all batch elements, pixels and
        channels, so each masked pixel counts equally; an all-zero mask gives 0.

    Returns:
      float32 scalar.
    """
    squared_error = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    if mask is None:
        return jnp.mean(squared_error)
    if mask.ndim == 3:
        mask = mask[..., None]
    if mask.shape[:3] != pred.shape[:3] or mask.shape[3] != 1:
        raise ValueError(f"Loss mask {mask.shape} does not fit prediction {pred.shape}; pool an image mask "
                         "with downsample_mask(mask, latent_hw) first.")
    weights = jnp.broadcast_to(mask.astype(jnp.float32), squared_error.shape)
    total_weight = jnp.sum(weights)
    safe_weight = jnp.where(total_weight > 0, total_weight, 1.0)
    return jnp.sum(weights * squared_error) / safe_weight


def embedding_regularization(scaled_offset: jax.Array) -> jax.Array:
    """Mean over the batch of ``||s * E(x)||^2``.

    Args:
      scaled_offset: ``[..., D]`` the encoder's output already times ``s``.

    Returns:
      float32 scalar: squared L2 over ``D``, averaged over the leading dims.
    """
    return jnp.mean(jnp.sum(jnp.square(scaled_offset.astype(jnp.float32)), axis=-1))


def total_loss(
    pred: jax.Array,
    target: jax.Array,
    *,
    scaled_offset: jax.Array | None = None,
    offsets: PyTree | None = None,
    offset_kind: offsets_lib.OffsetConfig | str = offsets_lib.OffsetConfig.kind,
    unet_params: PyTree | None = None,
    mask: jax.Array | None = None,
    lambda_emb: float = LossConfig.lambda_emb,
    lambda_w: float = LossConfig.lambda_w,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """E4T's loss: diffusion + ``lambda_emb`` * embedding reg + ``lambda_w`` * offset L2.

    Args:
      pred, target, mask: as in :func:`diffusion_loss`.
      scaled_offset: ``[B, D]`` ``s * E(x)``; ``None`` drops the term (baselines
        without an encoder).
      offsets: weight-offset pytree; ``None`` drops the term.
      offset_kind: the offsets' :class:`~e4t_jax.e4t.offsets.OffsetConfig` or kind.
      unet_params: base U-Net params, needed only for multiplicative offsets.
      lambda_emb, lambda_w: the weights; defaults from :class:`LossConfig`.

    Returns:
      ``(loss, metrics)``: float32 scalars; metrics always holds ``loss``,
      ``diffusion_loss``, ``embedding_reg`` and ``offset_l2`` (unweighted; 0 when a
      term is dropped), so its structure is the same for every configuration.
    """
    zero = jnp.zeros((), jnp.float32)
    diffusion = diffusion_loss(pred, target, mask)
    embedding_reg = zero if scaled_offset is None else embedding_regularization(scaled_offset)
    weight_reg = zero if offsets is None else offsets_lib.offset_l2(offsets, offset_kind, unet_params)
    loss = diffusion + lambda_emb * embedding_reg + lambda_w * weight_reg
    metrics = {"loss": loss, "diffusion_loss": diffusion, "embedding_reg": embedding_reg, "offset_l2": weight_reg}
    return loss, metrics
