"""Vision backbones for the encoder: images -> one feature per layer, plus a pooled feature.

A backbone is the frozen image tower of E4T's encoder. It is a function of its params
and the images, whatever tower is behind it::

    layers, pooled = backbone(params, pixels)   # pixels [B, H, W, 3] in [-1, 1], any size
    # layers: [B, num_layers, width] float32, one feature per transformer layer (1..N)
    # pooled: [B, width] float32, the tower's image feature

The backbone resizes and normalizes the images itself (its input size and statistics
are its own business), and picks one feature per layer: the [CLS] token for CLIP
(``"clip"``, the paper's choice), the mean over the patch tokens for towers without
one (``"clip-mean"``, or a SigLIP-style tower), or all patch tokens side by side
(``"clip-patches"``, for towers with a handful of patches whose [CLS] token gathers
no spatial detail, such as the digits mini-domain's 16-patch tower).

A backbone is registered by name in :data:`BACKBONES` (:func:`register` adds one) as a
loader ``loader(folder, dtype) -> (backbone, params)``; ``EncoderConfig.vision`` names
it and ``ModelConfig.vision_source`` says where its weights are.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from e4t_jax.models.clip import CLIP_MEAN, CLIP_STD, CLIPVisionTransformer, load_clip_vision

PyTree = Any


class VisionBackbone(Protocol):
    """A frozen image tower; see the module docstring.

    Attributes:
      num_layers: ``N``, the number of per-layer features.
      width: the feature width ``Dv``.
    """

    num_layers: int
    width: int

    def __call__(self, params: PyTree, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[B, H, W, 3]`` in [-1, 1] -> (``[B, num_layers, width]``, ``[B, width]``), float32."""


@dataclasses.dataclass(frozen=True)
class Backbone:
    """Any function as a :class:`VisionBackbone`.

    Attributes:
      fn: ``fn(params, pixels) -> (layers [B, num_layers, width], pooled [B, width])``.
      num_layers, width: the shapes ``fn`` returns.
    """

    fn: Callable[[PyTree, jax.Array], tuple[jax.Array, jax.Array]]
    num_layers: int
    width: int

    def __call__(self, params: PyTree, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        layers, pooled = self.fn(params, pixels)
        return layers.astype(jnp.float32), pooled.astype(jnp.float32)


def resize_and_normalize(pixels: jax.Array, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """``[B, H, W, 3]`` in [-1, 1] -> ``[B, size, size, 3]`` float32, ``(x - mean) / std`` of [0, 1] pixels.

    A bicubic (antialiased) resize of the whole image, which is already a square crop.
    """
    x = (pixels.astype(jnp.float32) + 1.0) / 2.0
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), method="bicubic", antialias=True)
    return (x - jnp.asarray(mean)) / jnp.asarray(std)


@dataclasses.dataclass(frozen=True)
class CLIPBackbone:
    """A CLIP vision tower (transformers' or OpenCLIP's checkpoint,
    :func:`e4t_jax.models.clip.load_clip_vision`); per layer its [CLS] token, or the patch tokens' mean.

    Attributes:
      module: the Flax vision tower.
      pool: ``"cls"`` (token 0 of each layer; pooled = the post-layernorm [CLS], as
        transformers' ``pooler_output``), ``"mean"`` (the mean over the patch tokens,
        no [CLS] used anywhere) or ``"patches"`` (the patch tokens concatenated,
        width ``patches * hidden_size``; pooled: the last layer's).
    """

    module: CLIPVisionTransformer
    pool: str = "cls"

    @property
    def num_layers(self) -> int:
        return self.module.config.num_hidden_layers

    @property
    def width(self) -> int:
        cfg = self.module.config
        patches = (cfg.image_size // cfg.patch_size) ** 2 if self.pool == "patches" else 1
        return cfg.hidden_size * patches

    def __call__(self, params: PyTree, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        size = self.module.config.image_size
        out = self.module.apply({"params": params}, resize_and_normalize(pixels, size, CLIP_MEAN, CLIP_STD),
                                output_hidden_states=True)
        hidden = out.hidden_states[1:]  # after each layer; [0] is the embeddings
        if self.pool == "cls":
            layers, pooled = jnp.stack([h[:, 0] for h in hidden], axis=1), out.pooler_output
        elif self.pool == "mean":
            layers = jnp.stack([h[:, 1:].mean(axis=1) for h in hidden], axis=1)
            pooled = layers[:, -1]
        else:
            layers = jnp.stack([h[:, 1:].reshape(h.shape[0], -1) for h in hidden], axis=1)
            pooled = layers[:, -1]
        return layers.astype(jnp.float32), pooled.astype(jnp.float32)


def _clip(pool: str) -> Callable[[Path, Any], tuple[CLIPBackbone, PyTree]]:
    def load(folder: Path, dtype: Any) -> tuple[CLIPBackbone, PyTree]:
        module, params = load_clip_vision(folder, dtype=dtype, param_dtype=dtype)
        return CLIPBackbone(module, pool), params
    return load


# Backbone name -> loader(folder, dtype) -> (backbone, params).
BACKBONES: dict[str, Callable[[Path, Any], tuple[VisionBackbone, PyTree]]] = {
    "clip": _clip("cls"), "clip-mean": _clip("mean"), "clip-patches": _clip("patches")}


def register(name: str, loader: Callable[[Path, Any], tuple[VisionBackbone, PyTree]]) -> None:
    """Makes ``EncoderConfig(vision=name)`` load its tower with ``loader(folder, dtype)``."""
    BACKBONES[name] = loader


def load(name: str, folder: str | os.PathLike, dtype: Any = jnp.float32) -> tuple[VisionBackbone, PyTree]:
    """The registered backbone ``name`` with its weights from ``folder``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown vision backbone {name!r}; known: {sorted(BACKBONES)} "
                         "(e4t_jax.e4t.vision.register adds one)")
    return BACKBONES[name](Path(folder), dtype)


def tap_layers(layers: jax.Array, stride: int) -> jax.Array:
    """Every ``stride``-th layer's feature: layers ``stride, 2*stride, ...`` (1-based).

    ``[B, N, D]`` -> ``[B, N // stride, D]``.
    """
    return layers[:, stride - 1::stride]
