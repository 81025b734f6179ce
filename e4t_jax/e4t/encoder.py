"""The E4T domain encoder: image (+ noisy latent, timestep) -> word-embedding offset.

Two branches feed one small head (Gal et al. 2023, Sec. 4):

* vision branch: one feature of every ``layer_stride``-th layer of a frozen vision
  tower (:mod:`e4t_jax.e4t.vision`; the paper: the [CLS] token of CLIP ViT-H/14), each
  through its own linear layer, averaged over the hierarchy, LeakyReLU.
* U-Net branch: the frozen U-Net's down blocks and mid block run on the noisy latent
  and timestep with empty-prompt conditioning; each block's output is spatially
  averaged and projected by its own linear layer, averaged, LeakyReLU.

The two are concatenated and mapped to the text-embedding width. The predicted word
embedding is ``v* = v_class + embedding_scale * E(x)``.

The paper does not pin every width; ``vision_dim``, ``unet_dim`` and ``hidden_dim`` are
this project's defaults (1024), not numbers confirmed from the paper. The scale 0.1
and the every-2nd-layer CLIP hierarchy follow the paper's description.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """The encoder: its vision backbone and the sizes of its head.

    Attributes:
      text_dim: text-embedding width of the base model (768 SD 1.x, 1024 SD 2.x); set
        from the base model when the encoder is built.
      vision: the vision backbone, a name in :data:`e4t_jax.e4t.vision.BACKBONES`.
      layer_stride: tap the backbone's layers stride, 2*stride, ... .
      vision_dim: width of each vision-branch projection.
      unet_dim: width of each U-Net-branch projection.
      hidden_dim: width of the fused hidden layer.
      embedding_scale: ``s`` in ``v* = v_class + s * E(x)``.
      negative_slope: LeakyReLU slope.
      use_unet_branch: drop the U-Net branch for a vision-only encoder.
    """

    text_dim: int = 768
    vision: str = "clip"
    layer_stride: int = 2
    vision_dim: int = 1024
    unet_dim: int = 1024
    hidden_dim: int = 1024
    embedding_scale: float = 0.1
    negative_slope: float = 0.01
    use_unet_branch: bool = True

    def __post_init__(self):
        if self.layer_stride < 1:
            raise ValueError(f"layer_stride must be >= 1, got {self.layer_stride}")


def pool_features(features: list[jax.Array]) -> list[jax.Array]:
    """Spatial mean of each ``[B, h, w, c]`` U-Net block output -> list of ``[B, c]``."""
    return [f.astype(jnp.float32).mean(axis=(1, 2)) for f in features]


class EncoderHead(nn.Module):
    """The trainable part of the encoder: projections of both branches and the fusion MLP."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, layer_features: jax.Array, unet_pooled: list[jax.Array] | None = None) -> jax.Array:
        """Args:
          layer_features: ``[B, T, Dv]`` the backbone's tapped layer features
            (:func:`e4t_jax.e4t.vision.tap_layers`).
          unet_pooled: list of ``[B, c_i]`` pooled U-Net block outputs (down blocks,
            then mid block); required when ``use_unet_branch``.

        Returns:
          ``E(x)``: ``[B, text_dim]`` float32, before ``embedding_scale``.
        """
        cfg = self.config
        act = lambda x: nn.leaky_relu(x, cfg.negative_slope)  # noqa: E731
        layer_features = layer_features.astype(jnp.float32)
        vision = [nn.Dense(cfg.vision_dim, name=f"vision_proj_{i}")(layer_features[:, i])
                  for i in range(layer_features.shape[1])]
        branches = [act(jnp.mean(jnp.stack(vision), axis=0))]
        if cfg.use_unet_branch:
            if not unet_pooled:
                raise ValueError("the U-Net branch is on but no U-Net features were given")
            unet = [nn.Dense(cfg.unet_dim, name=f"unet_proj_{i}")(f) for i, f in enumerate(unet_pooled)]
            branches.append(act(jnp.mean(jnp.stack(unet), axis=0)))
        h = act(nn.Dense(cfg.hidden_dim, name="fuse")(jnp.concatenate(branches, axis=-1)))
        return nn.Dense(cfg.text_dim, name="out")(h)
