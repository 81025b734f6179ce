"""CLIP text and vision transformers (transformers' ``CLIPTextModel`` / ``CLIPVisionModel``).

Submodule names follow transformers' attribute paths, so :mod:`e4t_jax.weights` maps
checkpoints one to one: ``embeddings/token_embedding``, ``encoder/layers_3/self_attn/q_proj``,
``final_layer_norm``, ``pre_layrnorm`` (transformers' spelling), ``post_layernorm``.
The modules have no ``text_model`` / ``vision_model`` level: the loaders strip that prefix.

The vision tower also loads OpenCLIP checkpoints (``open_clip_config.json`` beside
``open_clip_model.safetensors``): :func:`openclip_vision_state` renames their
``visual.*`` keys to transformers' names, and :meth:`CLIPVisionConfig.from_openclip`
reads their ``model_cfg.vision_cfg``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax import weights
from e4t_jax.models import limits
from e4t_jax.models.attention import dot_product_attention

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation, ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN entries that CLIP checkpoints use ("gelu" is the exact erf form).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


def _tower_dict(config: dict, tower: str, wrong_model_type: str) -> dict:
    """The ``text_config`` / ``vision_config`` part of a full ``CLIPModel`` config, else ``config``."""
    if config.get("model_type") == wrong_model_type:
        raise ValueError(f"A {wrong_model_type} config cannot configure the CLIP {tower.split('_')[0]} tower.")
    if config.get("model_type") == "clip" or tower in config:
        # CLIPConfig lets the legacy ``*_config_dict`` entries override ``*_config``; a CLIPModel
        # projects both towers to its own ``projection_dim``.
        merged = {**(config.get(tower) or {}), **(config.get(tower + "_dict") or {})}
        return {**merged, "projection_dim": config["projection_dim"]} if "projection_dim" in config else merged
    return config


def _from_dict(cls, config: dict):
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in config.items() if key in names})


def _check(config, where: str) -> None:
    limits.check_config(config, where, counts=("num_hidden_layers",), zero_ok=("eos_token_id",))
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by "
                         f"num_attention_heads {config.num_attention_heads}.")
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"Unsupported hidden_act {config.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}.")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers ``CLIPTextConfig`` fields that shape the model (defaults are transformers').

    ``eos_token_id`` selects the pooled token: 2 (configs older than transformers PR
    #24773) pools at the largest input id, anything else at the first ``eos_token_id``.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 512

    def __post_init__(self):
        if not isinstance(self.eos_token_id, int):
            raise ValueError(f"eos_token_id must be one integer, got {self.eos_token_id!r}.")
        _check(self, "CLIP text config")

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPTextConfig":
        """From a ``config.json`` of ``CLIPTextModel[WithProjection]`` or a full ``CLIPModel``."""
        return _from_dict(cls, _tower_dict(config, "text_config", "clip_vision_model"))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers ``CLIPVisionConfig`` fields that shape the model (defaults are transformers')."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        _check(self, "CLIP vision config")

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPVisionConfig":
        """From a ``config.json`` of ``CLIPVisionModel[WithProjection]`` or a full ``CLIPModel``."""
        return _from_dict(cls, _tower_dict(config, "vision_config", "clip_text_model"))

    @classmethod
    def from_openclip(cls, config: dict) -> "CLIPVisionConfig":
        """From an ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) or a
        bare OpenCLIP model config (``{"embed_dim": ..., "vision_cfg": ...}``).

        Reads ``vision_cfg``'s width, layers, head_width, mlp_ratio, patch and image size and
        LayerNorm eps (``norm_kwargs``), ``embed_dim``, and the activation: QuickGELU where
        ``quick_gelu`` is true (OpenAI-pretrained weights), else exact GELU (LAION's). Absent
        entries take open_clip's defaults.

        Raises:
          CheckpointError: no ``vision_cfg``, a tower this ViT does not compute (ResNet,
            timm, attention pooling, layer scale, ...), or image statistics other than CLIP's.
        """
        model_cfg = config.get("model_cfg", config)
        if "vision_cfg" not in model_cfg:
            raise weights.CheckpointError("The OpenCLIP config has no model_cfg.vision_cfg.")
        vision = model_cfg["vision_cfg"]
        _check_openclip(vision, config.get("preprocess_cfg") or {})
        width = vision.get("width", 768)
        return cls(hidden_size=width, intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
                   num_hidden_layers=vision.get("layers", 12),
                   num_attention_heads=width // vision.get("head_width", 64),
                   image_size=_square(vision.get("image_size", 224)),
                   patch_size=_square(vision.get("patch_size", 16)),
                   hidden_act="quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
                   layer_norm_eps=(vision.get("norm_kwargs") or {}).get("eps", 1e-5),
                   projection_dim=model_cfg.get("embed_dim", 512))


# OpenCLIP vision_cfg entries that make a tower other than CLIP's ViT: the values that keep it.
_OPENCLIP_VIT = {
    "timm_model_name": (None, ""), "attentional_pool": (False,), "no_ln_pre": (False,), "pool_type": ("tok",),
    "ls_init_value": (None,), "act_kwargs": (None, {}), "block_type": (None, "default"), "qk_norm": (False,),
    "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,), "scale_attn": (False,),
    "scale_fc": (False,),
}


def _square(size: int | list[int]) -> int:
    """An OpenCLIP size (``224`` or ``[224, 224]``) as one int; non-square sizes are refused."""
    sizes = set(size) if isinstance(size, (list, tuple)) else {size}
    if len(sizes) != 1:
        raise weights.CheckpointError(f"Non-square OpenCLIP image or patch size {size} is not supported.")
    return sizes.pop()


def _check_openclip(vision: dict, preprocess: dict) -> None:
    """Refuses OpenCLIP towers and image statistics that :class:`CLIPVisionTransformer` does not reproduce."""
    changed = [f"{key}={vision[key]!r}" for key, plain in _OPENCLIP_VIT.items()
               if vision.get(key, plain[0]) not in plain]
    if isinstance(vision.get("layers"), (list, tuple)):
        changed.append(f"layers={vision['layers']!r} (a ResNet)")
    if changed:
        raise weights.CheckpointError(f"The OpenCLIP vision tower is not a plain CLIP ViT ({', '.join(changed)}); "
                                      "e4t-jax loads ViT towers with class-token pooling only.")
    for name, ours in (("mean", CLIP_MEAN), ("std", CLIP_STD)):
        if name in preprocess and not np.allclose(preprocess[name], ours, atol=1e-6):
            raise weights.CheckpointError(f"The OpenCLIP model normalizes images with {name} {preprocess[name]}; "
                                          f"e4t-jax's CLIP backbone uses OpenAI CLIP's {list(ours)}.")


@flax.struct.dataclass
class CLIPOutput:
    """Outputs of both towers.

    Attributes:
      last_hidden_state: ``[B, L, D]``; after ``final_layer_norm`` for text, before
        ``post_layernorm`` for vision (as in transformers).
      pooler_output: ``[B, D]``; the end-of-text token (text) or the normalized class
        token (vision).
      hidden_states: when requested, ``num_hidden_layers + 1`` arrays ``[B, L, D]``: the
        encoder input, then each layer's output (the last one before any final norm).
      image_embeds: ``[B, projection_dim]``, ``pooler_output`` projected to the joint
        image-text space; vision towers built ``with_projection`` only.
      text_embeds: ``[B, projection_dim]``, the text tower's ``pooler_output`` projected
        to the same space (``text_projection``); text towers built ``with_projection`` only.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    image_embeds: jax.Array | None = None
    text_embeds: jax.Array | None = None


def layer_norm(eps: float, dtype, name: str | None) -> nn.LayerNorm:
    """LayerNorm matching ``torch.nn.LayerNorm`` (two-pass variance)."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with ``q_proj``/``k_proj``/``v_proj``/``out_proj``."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: ``[B, L, D]``; mask: boolean ``[L, L]`` or None. Returns ``[B, L, D]``."""
        b, length, dim = x.shape
        heads = self.config.num_attention_heads

        def project(name):
            return nn.Dense(dim, dtype=self.dtype, name=name)(x).reshape(b, length, heads, dim // heads)

        out = dot_product_attention(project("q_proj"), project("k_proj"), project("v_proj"), mask=mask)
        return nn.Dense(dim, dtype=self.dtype, name="out_proj")(out.reshape(b, length, dim))


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))``."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: ``[B, L, D]`` -> ``[B, L, D]``."""
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = ACTIVATIONS[self.config.hidden_act](h)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: ``[B, L, D]``; mask: boolean ``[L, L]`` or None. Returns ``[B, L, D]``."""
        eps = self.config.layer_norm_eps
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(
            layer_norm(eps, self.dtype, "layer_norm1")(x), mask)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(layer_norm(eps, self.dtype, "layer_norm2")(x))


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` encoder layers named ``layers_i``."""

    config: CLIPTextConfig | CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, ...]:
        """x: ``[B, L, D]``. Returns the input and every layer's output, each ``[B, L, D]``."""
        states = [x]
        for i in range(self.config.num_hidden_layers):
            states.append(CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(states[-1], mask))
        return tuple(states)


class CLIPTextEmbeddings(nn.Module):
    """``token_embedding`` and learned ``position_embedding``."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.token_embedding = nn.Embed(self.config.vocab_size, self.config.hidden_size, dtype=self.dtype)
        self.position_embedding = nn.Embed(
            self.config.max_position_embeddings, self.config.hidden_size, dtype=self.dtype)

    def __call__(self, input_ids: jax.Array, inputs_embeds: jax.Array | None = None) -> jax.Array:
        """input_ids: ``[B, L]`` int; inputs_embeds: ``[B, L, D]`` replaces the token lookup."""
        if inputs_embeds is None:
            inputs_embeds = self.token_embedding(input_ids)
        positions = self.position_embedding(jnp.arange(input_ids.shape[-1]))
        return inputs_embeds.astype(self.dtype) + positions[None]


class CLIPTextTransformer(nn.Module):
    """transformers ``CLIPTextModel`` (the ``text_model`` of a ``CLIPModel``).

    Attributes:
      config: the text tower's configuration.
      dtype: compute dtype (params stay as loaded, float32 by default).
      with_projection: also compute ``text_embeds`` with a bias-free ``text_projection``
        ``[hidden_size, projection_dim]`` (``CLIPTextModelWithProjection``, ``CLIPModel``).
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    with_projection: bool = False

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config, self.dtype)
        self.encoder = CLIPEncoder(self.config, self.dtype)
        self.final_layer_norm = layer_norm(self.config.layer_norm_eps, self.dtype, None)
        if self.with_projection:
            self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype)

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: ``[B, L]`` int -> token embeddings ``[B, L, D]`` in ``dtype`` (no positions).

        Call with ``module.apply(variables, ids, method=module.embed_tokens)``, edit the
        result (e.g. put a learned word embedding at the placeholder), and pass it back
        as ``inputs_embeds``.
        """
        return self.embeddings.token_embedding(input_ids)

    def __call__(self, input_ids: jax.Array, output_hidden_states: bool = False,
                 inputs_embeds: jax.Array | None = None) -> CLIPOutput:
        """Encodes token ids.

        Args:
          input_ids: ``[B, L]`` int32, ``L <= max_position_embeddings``; also locates the
            pooled end-of-text token when ``inputs_embeds`` is given.
          output_hidden_states: also return the embeddings and every layer's output.
          inputs_embeds: optional ``[B, L, D]`` used instead of the token lookup.

        Returns:
          :class:`CLIPOutput` in ``dtype``.
        """
        length = input_ids.shape[-1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"Sequence length {length} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}.")
        causal = jnp.tril(jnp.ones((length, length), bool))
        states = self.encoder(self.embeddings(input_ids, inputs_embeds), causal)
        last = self.final_layer_norm(states[-1])
        if self.config.eos_token_id == 2:  # legacy configs: the end-of-text id is the largest
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            eos_position = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos_position]
        embeds = self.text_projection(pooled) if self.with_projection else None
        return CLIPOutput(last, pooled, states if output_hidden_states else None, text_embeds=embeds)


class CLIPVisionEmbeddings(nn.Module):
    """Patch convolution (no bias), ``class_embedding`` and learned ``position_embedding``."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values: ``[B, S, S, C]`` -> ``[B, 1 + (S / patch)^2, D]``."""
        cfg = self.config
        patch = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (patch, patch), strides=patch, padding="VALID", use_bias=False,
                          dtype=self.dtype, name="patch_embedding")(pixel_values.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)
        class_embedding = self.param("class_embedding", nn.initializers.normal(cfg.hidden_size ** -0.5),
                                     (cfg.hidden_size,))
        class_tokens = jnp.broadcast_to(class_embedding.astype(self.dtype), (b, 1, cfg.hidden_size))
        tokens = jnp.concatenate([class_tokens, patches], axis=1)
        positions = nn.Embed(tokens.shape[1], cfg.hidden_size, dtype=self.dtype, name="position_embedding")
        return tokens + positions(jnp.arange(tokens.shape[1]))[None]


class CLIPVisionTransformer(nn.Module):
    """transformers ``CLIPVisionModel`` (the ``vision_model`` of a ``CLIPModel``).

    Attributes:
      config: the vision tower's configuration.
      dtype: compute dtype (params stay as loaded, float32 by default).
      with_projection: also compute ``image_embeds`` with a bias-free ``visual_projection``
        ``[hidden_size, projection_dim]`` (``CLIPVisionModelWithProjection``).
    """

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32
    with_projection: bool = False

    @nn.compact
    def __call__(self, pixel_values: jax.Array, output_hidden_states: bool = False) -> CLIPOutput:
        """Encodes images.

        Args:
          pixel_values: ``[B, image_size, image_size, num_channels]``, normalized with
            the CLIP mean/std (see :func:`preprocess_images`).
          output_hidden_states: also return the encoder input and every layer's output
            (the class token of layer ``i`` is ``hidden_states[i][:, 0]``).

        Returns:
          :class:`CLIPOutput` in ``dtype``.
        """
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [B, {', '.join(map(str, expected))}], got {pixel_values.shape}.")
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "pre_layrnorm")(x)
        states = CLIPEncoder(cfg, self.dtype, name="encoder")(x)
        pooled = layer_norm(cfg.layer_norm_eps, self.dtype, "post_layernorm")(states[-1][:, 0])
        embeds = (nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")(pooled)
                  if self.with_projection else None)
        return CLIPOutput(states[-1], pooled, states if output_hidden_states else None, embeds)


def preprocess_images(images: jax.Array, size: int = 224) -> jax.Array:
    """CLIPImageProcessor's resize, center crop and normalization, in JAX.

    Resizes the shortest side to ``size`` (antialiased bicubic, Keys a=-0.5 as in
    PIL), center-crops ``size x size``, clips to ``[0, 1]`` (PIL rounds to uint8
    there) and normalizes with the CLIP mean/std. Close to, not bit-equal with,
    transformers' PIL path: it differs by the uint8 rounding and by PIL's kernel
    edge handling, a few 1/255 steps on natural images.

    Args:
      images: ``[B, H, W, 3]``, uint8 in ``[0, 255]`` or float in ``[0, 1]``.
      size: output side (the vision config's ``image_size``).

    Returns:
      float32 ``[B, size, size, 3]``.
    """
    images = jnp.asarray(images)
    images = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    b, h, w, c = images.shape
    long_side = int(size * max(h, w) / min(h, w))
    new_h, new_w = (size, long_side) if h <= w else (long_side, size)
    images = jax.image.resize(images, (b, new_h, new_w, c), method="bicubic", antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    images = jnp.clip(images[:, top:top + size, left:left + size], 0.0, 1.0)
    return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


# ----------------------------------------------------------------------------- loading

# Keys a CLIP checkpoint may carry that neither tower uses.
_IGNORED = (r"(^|\.)position_ids$", r"^text_projection\.", r"^visual_projection\.", r"^logit_scale$")


def _prefix(state: dict, prefix: str) -> str:
    return prefix if any(key.startswith(prefix) for key in state) else ""


def load_clip_text(folder: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, *,
                   variant: str | None = None, with_projection: bool = False) -> tuple[CLIPTextTransformer, dict]:
    """Loads a ``CLIPTextModel[WithProjection]`` or full ``CLIPModel`` folder's text tower
    (``variant``: :func:`e4t_jax.weights.weight_files`).

    Keys with or without the ``text_model.`` prefix are accepted (transformers 5 writes
    ``CLIPTextModel`` without it); the vision tower, ``logit_scale``, ``position_ids``
    and (unless ``with_projection``) the projections are ignored.

    Args:
      with_projection: also load ``text_projection`` (``CLIPTextModelWithProjection`` or
        ``CLIPModel``); the module then returns ``text_embeds``.

    Returns:
      ``(module, params)``: the module computes in ``dtype``; params are ``param_dtype``.
    """
    with weights.config_errors(folder):
        config = CLIPTextConfig.from_dict(weights.read_config(folder))
        module = CLIPTextTransformer(config, dtype=dtype, with_projection=with_projection)
        ids = jax.ShapeDtypeStruct((1, config.max_position_embeddings), jnp.int32)
        abstract = limits.abstract_params(module.init, ids, where="CLIP text config")
    state = weights.load_state_dict(folder, variant=variant)
    ignore = _IGNORED + (r"^vision_model\.",)
    if with_projection:  # text_projection sits beside text_model., not in it
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
        ignore = tuple(p for p in ignore if p != r"^text_projection\.")
        prefix = ""
    else:
        prefix = _prefix(state, "text_model.")
    params = weights.state_dict_to_params(state, abstract, dtype=param_dtype, prefix=prefix, ignore=ignore,
                                          what="CLIP text encoder")
    return module, params


# OpenCLIP ``visual.*`` module names -> transformers' (``.weight`` / ``.bias`` follow), outside
# and inside ``visual.transformer.resblocks.N`` (-> ``encoder.layers.N``).
_OPENCLIP_TOP = {"conv1": "embeddings.patch_embedding", "ln_pre": "pre_layrnorm", "ln_post": "post_layernorm"}
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPENCLIP_PARAMS = {"class_embedding": "embeddings.class_embedding",
                    "positional_embedding": "embeddings.position_embedding.weight"}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")


def _openclip_entry(key: str, value: np.ndarray) -> dict[str, np.ndarray]:
    """One OpenCLIP vision entry (``key`` without ``visual.``) under transformers' key(s)."""
    if key == "proj":  # [D, E], applied as pooled @ proj; a Linear weight is [E, D]
        return {"visual_projection.weight": value.T}
    if key in _OPENCLIP_PARAMS:
        return {_OPENCLIP_PARAMS[key]: value}
    block = _RESBLOCK.match(key)
    prefix, rest, names = ((f"encoder.layers.{block[1]}.", block[2], _OPENCLIP_BLOCK) if block
                           else ("", key, _OPENCLIP_TOP))
    if block and rest in ("attn.in_proj_weight", "attn.in_proj_bias"):  # q, k, v stacked: [3 D, D] / [3 D]
        leaf = rest.rsplit("_", 1)[1]
        return {f"{prefix}self_attn.{name}_proj.{leaf}": part for name, part in zip("qkv", np.split(value, 3))}
    module, _, leaf = rest.rpartition(".")
    if module in names:
        return {f"{prefix}{names[module]}.{leaf}": value}
    return {"visual." + key: value}  # under its own name: the loader reports it as unexpected


def openclip_vision_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An OpenCLIP state dict's vision tower under ``CLIPVisionModelWithProjection``'s keys.

    ``visual.conv1`` [D, 3, p, p] -> ``embeddings.patch_embedding``; ``class_embedding``
    [D] and ``positional_embedding`` [L, D] -> ``embeddings.*``; ``ln_pre`` / ``ln_post``
    -> ``pre_layrnorm`` / ``post_layernorm``; ``proj`` [D, E] -> ``visual_projection.weight``
    [E, D]. In ``visual.transformer.resblocks.N`` (-> ``encoder.layers.N``): the fused
    ``attn.in_proj_weight`` [3D, D] / ``in_proj_bias`` [3D] split into
    ``self_attn.{q,k,v}_proj``, ``attn.out_proj`` -> ``self_attn.out_proj``, ``ln_1`` /
    ``ln_2`` -> ``layer_norm1`` / ``layer_norm2``, ``mlp.c_fc`` / ``c_proj`` -> ``mlp.fc1`` / ``fc2``.

    Keys outside ``visual.`` (the text tower, ``logit_scale``) are dropped; other ``visual.``
    keys (layer scale, attention pooling) keep their names, to be reported as unexpected.
    Arrays are not copied (the q/k/v parts are views).
    """
    renamed = {}
    for key, value in state.items():
        if key.startswith("visual."):
            renamed.update(_openclip_entry(key.removeprefix("visual."), value))
    return renamed


def _vision_config(folder: Path) -> tuple[CLIPVisionConfig, Path]:
    """``(config, its file)`` of a transformers or OpenCLIP vision checkpoint; no weights read."""
    openclip = weights.openclip_files(folder)
    config_file = folder / "config.json" if openclip is None else openclip[1]
    with weights.config_errors(config_file):
        raw = weights.read_config(config_file.parent, config_file.name)
        config = CLIPVisionConfig.from_dict(raw) if openclip is None else CLIPVisionConfig.from_openclip(raw)
    return config, config_file


def _vision_state(folder: Path) -> tuple[dict[str, np.ndarray], str, str]:
    """``(state under transformers' keys without vision_model., what, config name)`` of either format."""
    openclip = weights.openclip_files(folder)
    if openclip is None:
        state = weights.load_state_dict(folder)
        return ({key.removeprefix("vision_model."): value for key, value in state.items()},
                "CLIP vision encoder", "config.json")
    weights_file, config_file = openclip
    return (openclip_vision_state(weights.read_safetensors(weights_file)),
            "OpenCLIP vision encoder (its visual.* keys in transformers' names)", config_file.name)


def load_clip_vision(folder: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, *,
                     with_projection: bool = False) -> tuple[CLIPVisionTransformer, dict]:
    """Loads a CLIP vision tower: a ``CLIPVisionModel[WithProjection]`` or full ``CLIPModel``
    folder, or an OpenCLIP checkpoint (:func:`e4t_jax.weights.openclip_files`: a folder with
    ``open_clip_config.json`` and ``open_clip_model.safetensors``, or one such file).

    transformers' keys are accepted with or without the ``vision_model.`` prefix; the text
    tower, ``logit_scale``, ``position_ids`` and (unless ``with_projection``) the
    projection are ignored. OpenCLIP keys are mapped by :func:`openclip_vision_state`.

    Args:
      with_projection: also load the projection to the joint image-text space
        (``visual_projection``, OpenCLIP's ``visual.proj``); the module returns ``image_embeds``.

    Returns:
      ``(module, params)``: the module computes in ``dtype``; params are ``param_dtype``.

    Raises:
      CheckpointError: missing, unexpected or mis-shaped keys, an unsupported OpenCLIP
        tower, or pickle weights.
    """
    config, config_file = _vision_config(Path(folder))
    with weights.config_errors(config_file):
        module = CLIPVisionTransformer(config, dtype=dtype, with_projection=with_projection)
        pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
        abstract = limits.abstract_params(module.init, pixels, where="CLIP vision config")
    state, what, config_name = _vision_state(Path(folder))
    params = weights.state_dict_to_params(state, abstract, dtype=param_dtype, ignore=_IGNORED + (r"^text_model\.",),
                                          what=what, config_name=config_name)
    return module, params
