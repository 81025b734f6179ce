"""Spatial transformer of the Stable Diffusion U-Net (diffusers ``Transformer2DModel``).

Submodule names follow diffusers (``attn1/to_q``, ``ff/net_0/proj``, ``proj_in``...), so
:mod:`e4t_jax.weights` maps U-Net checkpoints one to one. Every attention goes through
:func:`e4t_jax.models.attention.dot_product_attention`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from e4t_jax.models.attention import dot_product_attention
from e4t_jax.models.resnet import group_norm


def layer_norm(name: str, dtype) -> nn.LayerNorm:
    """LayerNorm matching ``torch.nn.LayerNorm(dim, eps=1e-5)`` (two-pass variance)."""
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False, name=name)


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections (diffusers ``Attention``).

    Attributes:
      heads: number of heads.
      head_dim: channels per head; the projections are ``heads * head_dim`` wide.
      upcast: compute logits and softmax in float32 (diffusers ``upcast_attention``).
    """

    heads: int
    head_dim: int
    upcast: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x: ``[B, L, D]``; context: ``[B, M, Dc]`` (None: self-attention). Returns ``[B, L, D]``."""
        inner = self.heads * self.head_dim
        context = x if context is None else context

        def project(name, tokens):
            out = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(tokens)
            return out.reshape(*out.shape[:2], self.heads, self.head_dim)

        out = dot_product_attention(project("to_q", x), project("to_k", context), project("to_v", context),
                                    upcast=self.upcast)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out.reshape(*x.shape[:2], inner))


class GEGLU(nn.Module):
    """``proj`` to twice ``features``; the first half times GELU (exact) of the second."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[..., D]`` -> ``[..., features]``."""
        hidden, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x wide hidden layer: ``net_0`` (GEGLU), ``net_2`` (Dense)."""

    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[B, L, D]`` -> ``[B, L, D]``."""
        hidden = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(hidden)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and feed-forward, each with a residual.

    Attributes:
      heads, head_dim: attention shape (both attentions).
      only_cross_attention: ``attn1`` attends to the context too (diffusers option).
      upcast_attention: float32 logits and softmax.
    """

    heads: int
    head_dim: int
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: ``[B, L, D]``; context: ``[B, M, Dc]``. Returns ``[B, L, D]``."""
        def attention(name):
            return Attention(self.heads, self.head_dim, self.upcast_attention, self.dtype, name=name)

        h = layer_norm("norm1", self.dtype)(x)
        x = x + attention("attn1")(h, context if self.only_cross_attention else None)
        x = x + attention("attn2")(layer_norm("norm2", self.dtype)(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(layer_norm("norm3", self.dtype)(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, ``proj_in``, ``num_layers`` transformer blocks over the ``H*W`` tokens,
    ``proj_out``, plus the input as a residual.

    Attributes:
      heads, head_dim: attention shape; the token width is ``heads * head_dim``.
      num_layers: transformer blocks.
      groups: GroupNorm groups (epsilon is 1e-6, as in diffusers).
      use_linear_projection: ``proj_in``/``proj_out`` are Dense on tokens (SD 2.x)
        instead of 1x1 convolutions (SD 1.x).
      only_cross_attention, upcast_attention: see :class:`BasicTransformerBlock`.
    """

    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x: ``[B, H, W, C]``; context: ``[B, M, Dc]``. Returns ``[B, H, W, C]``."""
        b, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        h = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, height * width, channels))
        else:
            h = nn.Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(h).reshape(b, height * width, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.head_dim, self.only_cross_attention,
                                      self.upcast_attention, self.dtype, name=f"transformer_blocks_{i}")(h, context)
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_out")(h).reshape(b, height, width, channels)
        else:
            h = nn.Conv(channels, (1, 1), dtype=self.dtype, name="proj_out")(h.reshape(b, height, width, inner))
        return h + x
