"""The E4T domain encoder: image (+ noisy latent, timestep) -> word-embedding offset.

Two branches feed one small head (Gal et al. 2023, Sec. 4):

* CLIP branch: the [CLS] token of every ``clip_layer_stride``-th layer of a frozen
  CLIP vision transformer, each through its own linear layer, averaged over the
  hierarchy, LeakyReLU.
* U-Net branch: the frozen U-Net's down blocks and mid block run on the noisy latent
  and timestep with empty-prompt conditioning; each block's output is spatially
  averaged and projected by its own linear layer, averaged, LeakyReLU.

The two are concatenated and mapped to the text-embedding width. The predicted word
embedding is ``v* = v_class + embedding_scale * E(x)``.

The paper does not pin every width; ``clip_dim``, ``unet_dim`` and ``hidden_dim`` are
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
    """Sizes of the encoder head.

    Attributes:
      text_dim: text-embedding width of the base model (768 SD 1.x, 1024 SD 2.x).
      clip_layer_stride: tap the [CLS] token of layers stride, 2*stride, ... .
      clip_dim: width of each CLIP-branch projection.
      unet_dim: width of each U-Net-branch projection.
      hidden_dim: width of the fused hidden layer.
      embedding_scale: ``s`` in ``v* = v_class + s * E(x)``.
      negative_slope: LeakyReLU slope.
      use_unet_branch: drop the U-Net branch for a CLIP-only encoder.
    """

    text_dim: int = 768
    clip_layer_stride: int = 2
    clip_dim: int = 1024
    unet_dim: int = 1024
    hidden_dim: int = 1024
    embedding_scale: float = 0.1
    negative_slope: float = 0.01
    use_unet_branch: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown encoder config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


def clip_class_tokens(hidden_states: tuple[jax.Array, ...], stride: int) -> jax.Array:
    """[CLS] tokens of every ``stride``-th transformer layer.

    Args:
      hidden_states: the vision tower's hidden states, ``(embeddings, layer_1, ...,
        layer_N)``, each ``[B, 1 + patches, D]``.
      stride: take layers ``stride, 2*stride, ...`` (1-based).

    Returns:
      ``[B, N // stride, D]``.
    """
    layers = hidden_states[stride::stride]
    return jnp.stack([h[:, 0] for h in layers], axis=1)


def pool_features(features: list[jax.Array]) -> list[jax.Array]:
    """Spatial mean of each ``[B, h, w, c]`` U-Net block output -> list of ``[B, c]``."""
    return [f.astype(jnp.float32).mean(axis=(1, 2)) for f in features]


class EncoderHead(nn.Module):
    """The trainable part of the encoder: projections of both branches and the fusion MLP."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, clip_tokens: jax.Array, unet_pooled: list[jax.Array] | None = None) -> jax.Array:
        """Args:
          clip_tokens: ``[B, T, Dv]`` tapped [CLS] tokens (:func:`clip_class_tokens`).
          unet_pooled: list of ``[B, c_i]`` pooled U-Net block outputs (down blocks,
            then mid block); required when ``use_unet_branch``.

        Returns:
          ``E(x)``: ``[B, text_dim]`` float32, before ``embedding_scale``.
        """
        cfg = self.config
        act = lambda x: nn.leaky_relu(x, cfg.negative_slope)  # noqa: E731
        clip_tokens = clip_tokens.astype(jnp.float32)
        clip = [nn.Dense(cfg.clip_dim, name=f"clip_proj_{i}")(clip_tokens[:, i])
                for i in range(clip_tokens.shape[1])]
        branches = [act(jnp.mean(jnp.stack(clip), axis=0))]
        if cfg.use_unet_branch:
            if not unet_pooled:
                raise ValueError("the U-Net branch is on but no U-Net features were given")
            unet = [nn.Dense(cfg.unet_dim, name=f"unet_proj_{i}")(f) for i, f in enumerate(unet_pooled)]
            branches.append(act(jnp.mean(jnp.stack(unet), axis=0)))
        h = act(nn.Dense(cfg.hidden_dim, name="fuse")(jnp.concatenate(branches, axis=-1)))
        return nn.Dense(cfg.text_dim, name="out")(h)
