"""Stable Diffusion 1.x / 2.x U-Net (diffusers ``UNet2DConditionModel``) in Flax Linen.

Besides the noise prediction, the model can return the output of every down block and
of the mid block (the E4T encoder's U-Net features), or compute only those.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from e4t_jax import weights
from e4t_jax.models import limits
from e4t_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, group_norm
from e4t_jax.models.transformer import Transformer2DModel

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPE = "UNetMidBlock2DCrossAttn"

# diffusers options that this port implements only at the value given here. Options
# that only affect block types we do not build (e.g. ``resnet_out_scale_factor``)
# are ignored, as diffusers ignores them for these blocks.
_FIXED_OPTIONS = {
    "mid_block_type": MID_BLOCK_TYPE,
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}


# The UNetConfig fields that fix the U-Net's parameter shapes (the rest changes numerics only).
SHAPE_FIELDS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "transformer_layers_per_block", "only_cross_attention", "cross_attention_dim",
                "use_linear_projection")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """U-Net architecture; defaults are Stable Diffusion 1.5. Per-block tuples follow
    ``down_block_types``; up blocks use them reversed, the mid block their last entry.

    ``num_attention_heads`` is the number of heads per block: what a diffusers config
    (mis)names ``attention_head_dim`` unless it sets ``num_attention_heads``.
    """

    sample_size: int | tuple[int, int] = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    only_cross_attention: tuple[bool, ...] = (False, False, False, False)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False

    def architecture(self) -> dict[str, Any]:
        """The fields that fix the parameter shapes (:data:`SHAPE_FIELDS`): what weights,
        weight offsets and encoders trained on this U-Net depend on."""
        return {field: getattr(self, field) for field in SHAPE_FIELDS}

    def __post_init__(self):
        limits.check_config(self, "U-Net config", counts=("layers_per_block", "transformer_layers_per_block"),
                            levels=("down_block_types",), zero_ok=("downsample_padding",))
        blocks = len(self.down_block_types)
        for field in ("up_block_types", "block_out_channels", "layers_per_block", "num_attention_heads",
                      "transformer_layers_per_block", "only_cross_attention"):
            if len(getattr(self, field)) != blocks:
                raise ValueError(f"U-Net config: {field} has {len(getattr(self, field))} entries, "
                                 f"down_block_types has {blocks}.")
        for field, supported in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for kind in getattr(self, field):
                if kind not in supported:
                    raise ValueError(f"U-Net config: {field} entry {kind!r} is not supported (only {supported}).")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "UNetConfig":
        """Reads a diffusers ``unet/config.json`` dict, with diffusers' defaults and quirks.

        Raises:
          ValueError: naming the first option this port does not implement.
        """
        for key, supported in _FIXED_OPTIONS.items():
            if config.get(key, supported) != supported:
                raise ValueError(f"U-Net config option {key}={config[key]!r} is not supported (only {supported!r}): "
                                 "e4t-jax implements the Stable Diffusion 1.x/2.x U-Net.")
        if config.get("act_fn", "silu") not in ("silu", "swish"):
            raise ValueError(f"U-Net config option act_fn={config['act_fn']!r} is not supported (only 'silu').")
        if config.get("norm_num_groups", 32) is None:
            raise ValueError("U-Net config option norm_num_groups=None is not supported (GroupNorm is required).")
        down_types = tuple(config.get("down_block_types", cls.down_block_types))
        blocks = len(down_types)

        def per_block(key, default):
            value = config.get(key, default)
            if isinstance(value, (list, tuple)):
                if any(isinstance(v, (list, tuple)) for v in value):
                    raise ValueError(f"U-Net config option {key}={value!r} (nested per-layer lists) is not supported.")
                return tuple(value)
            return (value,) * blocks

        # diffusers: the head count is `num_attention_heads or attention_head_dim`.
        heads = per_block("num_attention_heads", None)
        if heads[0] is None:
            heads = per_block("attention_head_dim", 8)
        cross_dims = set(per_block("cross_attention_dim", 1280))
        if len(cross_dims) != 1:
            raise ValueError(f"U-Net config option cross_attention_dim={config['cross_attention_dim']!r} "
                             "(different per block) is not supported.")
        return cls(
            sample_size=config.get("sample_size", 64),
            in_channels=config.get("in_channels", 4),
            out_channels=config.get("out_channels", 4),
            down_block_types=down_types,
            up_block_types=tuple(config.get("up_block_types", cls.up_block_types)),
            block_out_channels=tuple(config.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=per_block("layers_per_block", 2),
            num_attention_heads=heads,
            transformer_layers_per_block=per_block("transformer_layers_per_block", 1),
            only_cross_attention=tuple(bool(v) for v in per_block("only_cross_attention", False)),
            cross_attention_dim=cross_dims.pop(),
            use_linear_projection=config.get("use_linear_projection", False),
            upcast_attention=config.get("upcast_attention", False),
            flip_sin_to_cos=config.get("flip_sin_to_cos", True),
            freq_shift=config.get("freq_shift", 0),
            norm_num_groups=config.get("norm_num_groups", 32),
            norm_eps=config.get("norm_eps", 1e-5),
            downsample_padding=config.get("downsample_padding", 1),
            mid_block_scale_factor=config.get("mid_block_scale_factor", 1.0),
            center_input_sample=config.get("center_input_sample", False),
        )


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding (diffusers ``get_timestep_embedding``): ``[B]`` -> ``[B, dim]`` float32.

    Frequencies are ``max_period ** (-i / (dim / 2 - freq_shift))``; the halves are
    ``[sin, cos]``, or ``[cos, sin]`` when ``flip_sin_to_cos``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    halves = [jnp.cos(angles), jnp.sin(angles)] if flip_sin_to_cos else [jnp.sin(angles), jnp.cos(angles)]
    return jnp.pad(jnp.concatenate(halves, axis=-1), ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    """``linear_1``, SiLU, ``linear_2``: ``[B, Cin]`` -> ``[B, features]``."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """The :class:`Transformer2DModel` settings of one U-Net block."""

    heads: int
    head_dim: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    only_cross_attention: bool
    upcast_attention: bool

    def build(self, dtype, name: str) -> Transformer2DModel:
        return Transformer2DModel(**dataclasses.asdict(self), dtype=dtype, name=name)


class DownBlock2D(nn.Module):
    """diffusers ``DownBlock2D`` (``attention=None``) or ``CrossAttnDownBlock2D``.

    Each layer is a resnet, followed by a transformer when ``attention`` is set; then an
    optional stride-2 ``downsamplers_0``.
    """

    out_channels: int
    num_layers: int
    add_downsample: bool
    groups: int
    eps: float
    downsample_padding: int = 1
    attention: TransformerSpec | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """x: ``[B, H, W, Cin]``; temb: ``[B, T]``; context: ``[B, M, Dc]``.

        Returns the output ``[B, H', W', out_channels]`` (``H' = H/2`` with downsampling)
        and the skip connections for the up path (every layer's output, then the output).
        """
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
            if self.attention is not None:
                x = self.attention.build(self.dtype, f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2DCrossAttn(nn.Module):
    """Resnet, transformer, resnet, at constant width; resnets divide by ``output_scale_factor``."""

    attention: TransformerSpec
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        """x: ``[B, H, W, C]``; temb: ``[B, T]``; context: ``[B, M, Dc]``. Returns ``[B, H, W, C]``."""
        def resnet(name):
            return ResnetBlock2D(x.shape[-1], self.groups, self.eps, self.output_scale_factor, dtype=self.dtype,
                                 name=name)

        x = resnet("resnets_0")(x, temb)
        x = self.attention.build(self.dtype, "attentions_0")(x, context)
        return resnet("resnets_1")(x, temb)


class UpBlock2D(nn.Module):
    """diffusers ``UpBlock2D`` (``attention=None``) or ``CrossAttnUpBlock2D``.

    Each layer concatenates the next skip connection (last first) on channels, then a
    resnet (and a transformer); then an optional 2x ``upsamplers_0`` to
    ``upsample_size`` (``[H, W]``; None: exactly twice the size).
    """

    out_channels: int
    num_layers: int
    add_upsample: bool
    groups: int
    eps: float
    attention: TransformerSpec | None = None
    upsample_size: tuple[int, int] | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array, context: jax.Array) -> jax.Array:
        """x: ``[B, H, W, C]``; skips: ``num_layers`` arrays ``[B, H, W, Ci]``; temb: ``[B, T]``;
        context: ``[B, M, Dc]``. Returns ``[B, H', W', out_channels]``."""
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, dtype=self.dtype, name=f"resnets_{i}")(x, temb)
            if self.attention is not None:
                x = self.attention.build(self.dtype, f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x, self.upsample_size)
        return x


class UNet2DConditionModel(nn.Module):
    """The text-conditioned noise-prediction U-Net.

    Attributes:
      config: the architecture.
      dtype: compute dtype (parameters stay as initialized/loaded, float32 by default).
      remat: recompute each down, mid and up block in the backward pass
        (``nn.remat``), trading compute for activation memory; parameter names are
        unchanged.
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    def _attention(self, block: int, channels: int, only_cross_attention: bool) -> TransformerSpec:
        cfg = self.config
        heads = cfg.num_attention_heads[block]
        return TransformerSpec(heads, channels // heads, cfg.transformer_layers_per_block[block], cfg.norm_num_groups,
                               cfg.use_linear_projection, only_cross_attention, cfg.upcast_attention)

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 return_features: bool = False, features_only: bool = False):
        """Predicts the noise (or v) of a noisy latent.

        Args:
          sample: ``[B, H, W, in_channels]`` noisy latents.
          timesteps: ``[B]`` or a scalar (int or float).
          encoder_hidden_states: ``[B, M, cross_attention_dim]`` text embeddings.
          return_features: also return the features (below).
          features_only: run only the down blocks and the mid block and return just
            the features; the up path is neither built nor computed.

        Returns:
          ``[B, H, W, out_channels]`` in ``dtype``; with ``return_features`` the tuple
          ``(output, features)``; with ``features_only`` the features: a list of the
          output of every down block (after its downsampler) and of the mid block,
          each ``[B, h, w, c]``.
        """
        cfg, dtype = self.config, self.dtype
        down_cls, mid_cls, up_cls = DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D
        if self.remat:
            down_cls, mid_cls, up_cls = nn.remat(down_cls), nn.remat(mid_cls), nn.remat(up_cls)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = jnp.broadcast_to(jnp.reshape(jnp.asarray(timesteps, jnp.float32), (-1,)), sample.shape[:1])
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(4 * cfg.block_out_channels[0], dtype, name="time_embedding")(t_emb.astype(dtype))
        context = encoder_hidden_states

        x = nn.Conv(cfg.block_out_channels[0], (3, 3), padding=1, dtype=dtype, name="conv_in")(sample)
        skips, features = [x], []
        blocks = len(cfg.down_block_types)
        for i, kind in enumerate(cfg.down_block_types):
            channels = cfg.block_out_channels[i]
            attention = (self._attention(i, channels, cfg.only_cross_attention[i])
                         if kind.startswith("CrossAttn") else None)
            x, block_skips = down_cls(
                out_channels=channels, num_layers=cfg.layers_per_block[i], add_downsample=i < blocks - 1,
                groups=cfg.norm_num_groups, eps=cfg.norm_eps, downsample_padding=cfg.downsample_padding,
                attention=attention, dtype=dtype, name=f"down_blocks_{i}")(x, temb, context)
            skips += block_skips
            features.append(x)
        x = mid_cls(attention=self._attention(blocks - 1, x.shape[-1], False), groups=cfg.norm_num_groups,
                    eps=cfg.norm_eps, output_scale_factor=cfg.mid_block_scale_factor, dtype=dtype,
                    name="mid_block")(x, temb, context)
        features.append(x)
        if features_only:
            return features

        # As diffusers: upsample to the skip's size only when H or W is not divisible.
        forward_size = any(d % 2 ** (blocks - 1) for d in sample.shape[1:3])
        for i, kind in enumerate(cfg.up_block_types):
            down_index = blocks - 1 - i
            layers = cfg.layers_per_block[down_index] + 1
            block_skips, skips = tuple(skips[-layers:]), skips[:-layers]
            last = i == blocks - 1
            size = tuple(skips[-1].shape[1:3]) if forward_size and not last else None
            channels = cfg.block_out_channels[down_index]
            attention = (self._attention(down_index, channels, cfg.only_cross_attention[down_index])
                         if kind.startswith("CrossAttn") else None)
            x = up_cls(out_channels=channels, num_layers=layers, add_upsample=not last, groups=cfg.norm_num_groups,
                       eps=cfg.norm_eps, attention=attention, upsample_size=size, dtype=dtype,
                       name=f"up_blocks_{i}")(x, block_skips, temb, context)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, dtype, "conv_norm_out")(x))
        out = nn.Conv(cfg.out_channels, (3, 3), padding=1, dtype=dtype, name="conv_out")(x)
        return (out, features) if return_features else out


def unet_abstract_params(config: UNetConfig) -> dict:
    """Parameter shapes and dtypes (``jax.ShapeDtypeStruct`` pytree) of a U-Net, no compute.

    Raises:
      ValueError: the config builds no U-Net, or one over :mod:`e4t_jax.models.limits`.
    """
    size = 2 ** (len(config.down_block_types) - 1)
    sample = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
    context = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
    timesteps = jax.ShapeDtypeStruct((1,), jnp.float32)
    return limits.abstract_params(UNet2DConditionModel(config).init, sample, timesteps, context, where="U-Net config")


def load_unet(folder: str | os.PathLike, dtype: jnp.dtype = jnp.float32, remat: bool = False, *,
              param_dtype: jnp.dtype = jnp.float32, variant: str | None = None) -> tuple[UNet2DConditionModel, dict]:
    """Loads a diffusers ``unet/`` folder (``config.json`` + safetensors; ``variant``:
    :func:`e4t_jax.weights.weight_files`).

    Returns:
      ``(module, params)``: the module computes in ``dtype``; params are numpy arrays
      in ``param_dtype`` in a nested dict.
    """
    with weights.config_errors(folder):
        config = UNetConfig.from_diffusers(weights.read_config(folder))
        abstract = unet_abstract_params(config)
    state = weights.load_state_dict(folder, variant=variant)
    params = weights.state_dict_to_params(state, abstract, dtype=param_dtype, what="U-Net")
    return UNet2DConditionModel(config, dtype=dtype, remat=remat), params
