"""Residual and resampling blocks shared by the U-Net and the VAE (diffusers layout)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def group_norm(groups: int, eps: float, dtype, name: str) -> nn.GroupNorm:
    """GroupNorm matching ``torch.nn.GroupNorm`` (two-pass variance, float32 stats)."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` with ``time_embedding_norm="default"``.

    Attributes:
      out_channels: output channels.
      groups: GroupNorm groups.
      eps: GroupNorm epsilon.
      output_scale_factor: the residual sum is divided by it.
      use_temb: whether a ``time_emb_proj`` exists (False in the VAE).
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    use_temb: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x: ``[B, H, W, Cin]``; temb: ``[B, T]`` or None. Returns ``[B, H, W, out_channels]``."""
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv1")(h)
        if self.use_temb:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution. ``padding=0`` pads right/bottom by one (VAE encoder)."""

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[B, H, W, C]`` -> ``[B, H/2, W/2, out_channels]``."""
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        pad = self.padding
        return nn.Conv(self.out_channels, (3, 3), strides=2, padding=((pad, pad), (pad, pad)),
                       dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        """x: ``[B, H, W, C]`` -> ``[B, 2H, 2W, out_channels]`` (or ``size`` when given)."""
        b, h, w, c = x.shape
        if size is None:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            # torch's "nearest": source index floor(i * in / out), not half-pixel centres.
            rows = (jnp.arange(size[0]) * h) // size[0]
            cols = (jnp.arange(size[1]) * w) // size[1]
            x = x[:, rows][:, :, cols]
        return nn.Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv")(x)
