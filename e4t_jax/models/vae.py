"""Stable Diffusion VAE (diffusers ``AutoencoderKL``) in Flax Linen, channels-last.

Images are ``[B, H, W, in_channels]`` in ``[-1, 1]``; latents are
``[B, H / f, W / f, latent_channels]`` with ``f = 2 ** (len(block_out_channels) - 1)``
(8 for Stable Diffusion). Submodule names follow the diffusers attribute paths, so
:mod:`e4t_jax.weights` loads a diffusers ``vae/`` folder one to one.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from e4t_jax import weights
from e4t_jax.models import limits
from e4t_jax.models.attention import dot_product_attention
from e4t_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, group_norm

_EPS = 1e-6  # diffusers' VAE uses this epsilon for every GroupNorm
_IGNORED_KEYS = frozenset({"force_upcast"})  # a PyTorch fp16 precaution; dtype is ours to choose


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture and latent scaling of an ``AutoencoderKL``.

    Defaults are diffusers' ``AutoencoderKL.__init__`` defaults, so a ``config.json``
    that omits a key means the same here as in diffusers. Stable Diffusion 1.x / 2.x
    use ``block_out_channels=(128, 256, 512, 512)``, ``layers_per_block=2``.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        limits.check_config(self, "VAE config", counts=("layers_per_block",), levels=("block_out_channels",))

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> VAEConfig:
        """Builds the config from a diffusers ``vae/config.json`` dict.

        Raises:
          ValueError: for block types, activations or options this port does not have.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        known = fields | _IGNORED_KEYS | {"down_block_types", "up_block_types", "act_fn",
                                          "latents_mean", "latents_std"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"Unsupported AutoencoderKL config options {unknown}: this port does not implement them.")
        n_blocks = len(config.get("block_out_channels", cls.block_out_channels))
        for key, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(config.get(key, [expected]))
            if types != [expected] * n_blocks:
                raise ValueError(f"Unsupported {key} {types}: expected {n_blocks} x '{expected}' "
                                 "(one per entry of block_out_channels).")
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"Unsupported act_fn '{config['act_fn']}': only 'silu' is implemented.")
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise ValueError(f"Unsupported option {key}: per-channel latent statistics are not implemented.")
        values = {k: v for k, v in config.items() if k in fields}
        values["block_out_channels"] = tuple(values.get("block_out_channels", cls.block_out_channels))
        if isinstance(values.get("sample_size"), list):
            values["sample_size"] = tuple(values["sample_size"])
        if values.get("scaling_factor") is None:  # old configs write null
            values["scaling_factor"] = cls.scaling_factor
        return cls(**values)


class VAEAttention(nn.Module):
    """diffusers' VAE mid-block ``Attention``: GroupNorm, one head over all channels, residual.

    Attributes:
      groups: GroupNorm groups.
      head_dim: channels per head (diffusers passes the channel count: one head).
    """

    groups: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        b, h, w, c = x.shape
        heads = c // self.head_dim
        tokens = group_norm(self.groups, _EPS, self.dtype, "group_norm")(x).reshape(b, h * w, c)
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(tokens).reshape(b, h * w, heads, self.head_dim)
                   for name in ("to_q", "to_k", "to_v"))
        out = dot_product_attention(q, k, v, upcast=True).reshape(b, h * w, c)
        out = nn.Dense(c, dtype=self.dtype, name="to_out_0")(out)
        return x + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, [attention], resnet."""

    groups: int
    add_attention: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        channels = x.shape[-1]
        x = ResnetBlock2D(channels, self.groups, _EPS, use_temb=False, dtype=self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.groups, channels, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(channels, self.groups, _EPS, use_temb=False, dtype=self.dtype, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
    """diffusers ``DownEncoderBlock2D``: resnets, then an optional stride-2 conv (padding 0)."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[B, H, W, Cin]`` -> ``[B, H/2, W/2, out_channels]`` (``[B, H, W, .]`` without downsample)."""
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _EPS, use_temb=False, dtype=self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock(nn.Module):
    """diffusers ``UpDecoderBlock2D``: resnets, then an optional nearest 2x upsample + conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[B, H, W, Cin]`` -> ``[B, 2H, 2W, out_channels]`` (``[B, H, W, .]`` without upsample)."""
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _EPS, use_temb=False, dtype=self.dtype,
                              name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """diffusers VAE ``Encoder`` with ``double_z=True``.

    ``__call__``: ``[B, H, W, in_channels]`` -> ``[B, H/f, W/f, 2 * latent_channels]``.
    """

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        groups, channels = cfg.norm_num_groups, cfg.block_out_channels
        x = nn.Conv(channels[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x)
        for i, out_channels in enumerate(channels):
            x = DownEncoderBlock(out_channels, cfg.layers_per_block, groups, i < len(channels) - 1,
                                 dtype=self.dtype, name=f"down_blocks_{i}")(x)
        x = MidBlock(groups, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(groups, _EPS, self.dtype, "conv_norm_out")(x))
        return nn.Conv(2 * cfg.latent_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """diffusers VAE ``Decoder`` (group norm).

    ``__call__``: ``[B, h, w, latent_channels]`` -> ``[B, h*f, w*f, out_channels]``.
    """

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        groups, channels = cfg.norm_num_groups, cfg.block_out_channels[::-1]
        x = nn.Conv(channels[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(z)
        x = MidBlock(groups, cfg.mid_block_add_attention, dtype=self.dtype, name="mid_block")(x)
        for i, out_channels in enumerate(channels):
            x = UpDecoderBlock(out_channels, cfg.layers_per_block + 1, groups, i < len(channels) - 1,
                               dtype=self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(groups, _EPS, self.dtype, "conv_norm_out")(x))
        return nn.Conv(cfg.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``: ``encode`` to a diagonal Gaussian, ``decode`` from latents.

    Attributes:
      config: the architecture.
      dtype: compute dtype (params stay as given, float32 by default); attention
        softmax and GroupNorm statistics run in float32.
    """

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, dtype=self.dtype)
        self.decoder = Decoder(cfg, dtype=self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=self.dtype)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior of ``images`` ``[B, H, W, in_channels]`` in ``[-1, 1]``.

        Returns:
          ``(mean, logvar)``, each ``[B, H/f, W/f, latent_channels]`` in ``dtype``;
          ``logvar`` is clamped to ``[-30, 20]`` as in diffusers'
          ``DiagonalGaussianDistribution``. Latents are unscaled.
        """
        moments = self.encoder(images)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents ``[B, h, w, latent_channels]`` -> images ``[B, h*f, w*f, out_channels]``, not clipped."""
        if self.config.use_post_quant_conv:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean: ``[B, H, W, C]`` -> ``[B, H, W, out_channels]``."""
        mean, _ = self.encode(images)
        return self.decode(mean)


def sample_latents(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A draw ``mean + exp(logvar / 2) * eps`` from the posterior, same shape and dtype as ``mean``."""
    noise = jax.random.normal(rng, mean.shape, jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * noise


def encode_to_latents(params, module: AutoencoderKL, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Images ``[B, H, W, C]`` in ``[-1, 1]`` -> diffusion latents ``[B, H/f, W/f, latent_channels]``.

    Uses the posterior mean when ``rng`` is None, a posterior sample otherwise, then
    applies ``(z - shift_factor) * scaling_factor`` as the diffusers pipelines do, in
    float32 (the latents are float32 whatever the module's dtype).
    """
    mean, logvar = module.apply({"params": params}, images, method=AutoencoderKL.encode)
    latents = (mean if rng is None else sample_latents(mean, logvar, rng)).astype(jnp.float32)
    shift = module.config.shift_factor or 0.0
    return (latents - shift) * module.config.scaling_factor


def decode_latents(params, module: AutoencoderKL, latents: jax.Array) -> jax.Array:
    """Inverse of :func:`encode_to_latents`: scaled latents -> images ``[B, H, W, C]`` clipped to ``[-1, 1]``."""
    shift = module.config.shift_factor or 0.0
    latents = latents / module.config.scaling_factor + shift
    images = module.apply({"params": params}, latents, method=AutoencoderKL.decode)
    return jnp.clip(images, -1.0, 1.0)


def abstract_params(module: AutoencoderKL):
    """The params pytree of ``module`` as ``jax.ShapeDtypeStruct`` leaves (nothing computed).

    Raises:
      ValueError: the config builds no VAE, or one over :mod:`e4t_jax.models.limits`.
    """
    size = module.config.downsample_factor
    images = jax.ShapeDtypeStruct((1, size, size, module.config.in_channels), jnp.float32)
    return limits.abstract_params(module.init, images, where="VAE config")


def load_vae(folder: str | os.PathLike, dtype: jnp.dtype = jnp.float32, *,
             param_dtype: jnp.dtype = jnp.float32, variant: str | None = None) -> tuple[AutoencoderKL, Any]:
    """Loads a diffusers ``vae/`` folder (``config.json`` + safetensors; ``variant``:
    :func:`e4t_jax.weights.weight_files`).

    Old checkpoints with ``query``/``key``/``value``/``proj_attn`` attention names
    load too. Returns ``(module, params)``; params are numpy arrays in ``param_dtype``,
    ``dtype`` is the module's compute dtype.
    """
    with weights.config_errors(folder):
        module = AutoencoderKL(VAEConfig.from_diffusers(weights.read_config(folder)), dtype=dtype)
        abstract = abstract_params(module)
    params = weights.state_dict_to_params(weights.load_state_dict(folder, variant=variant), abstract,
                                          dtype=param_dtype, what="VAE")
    return module, params
