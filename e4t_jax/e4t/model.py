"""E4T as pure functions over an immutable bundle: static model, frozen params, learned params.

* :class:`E4TModel`: modules and configs (no arrays), closed over by jitted functions;
* :class:`FrozenParams`: the base model's params, the vision tower's, ``v_class`` and
  the empty prompt's context, plus any E4T part held fixed;
* :class:`E4TParams`: what E4T learns, the encoder head and the weight offsets;
* :class:`E4T`: the three together with the tokenizer (placeholder added), built by
  :func:`build` (or :func:`e4t_jax.e4t.pretrained.load_pretrained`).

:func:`predict_embedding` is the one way an image becomes ``v*``: the loss calls it on
noisy latents, personalization on the clean image (:func:`embed_image`), generation
at every denoising step (:mod:`e4t_jax.e4t.concept`). :func:`loss` is the objective
of both pre-training and personalization; "what trains" is which :class:`E4TParams`
go to the optimizer (:meth:`E4T.split`).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from e4t_jax import conditioning, pipeline, schedulers, weights
from e4t_jax.e4t import losses
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t import vision as vision_lib
from e4t_jax.e4t.config import E4TConfig
from e4t_jax.e4t.encoder import EncoderHead, pool_features
from e4t_jax.errors import UserError
from e4t_jax.models.vae import encode_to_latents
from e4t_jax.tokenizer import Tokenizer

PyTree = Any


@dataclasses.dataclass(frozen=True)
class E4TModel:
    """The static half of E4T (modules and configs, no arrays).

    Attributes:
      sd: the base model (U-Net, VAE, text conditioner, noise schedule).
      head: the :class:`EncoderHead` module.
      config: the :class:`E4TConfig` (``encoder.text_dim`` set from ``sd``).
      placeholder_id: token id of the placeholder (``S*``).
      vision: the vision backbone; None where only stored image features are used
        (re-encoding at generation).
    """

    sd: pipeline.StableDiffusion
    head: EncoderHead
    config: E4TConfig
    placeholder_id: int
    vision: vision_lib.VisionBackbone | None = None


@flax.struct.dataclass
class E4TParams:
    """What E4T learns. A field is None when this tree does not hold that part.

    Attributes:
      head: the encoder head's params.
      offsets: the weight-offset pytree (:func:`e4t_jax.e4t.offsets.init_offsets`).
    """

    head: PyTree = None
    offsets: PyTree = None

    def merge(self, fixed: "E4TParams") -> "E4TParams":
        """These params, with ``fixed``'s where this tree holds None."""
        return E4TParams(head=fixed.head if self.head is None else self.head,
                         offsets=fixed.offsets if self.offsets is None else self.offsets)


@flax.struct.dataclass
class FrozenParams:
    """Everything a step reads but does not train.

    Attributes:
      unet, vae, text: the base model's params (what :class:`e4t_jax.pipeline.Generator` takes).
      vision: the vision backbone's params.
      class_embedding: ``[D]`` float32, the domain word's input embedding ``v_class``.
      empty_context: ``[1, L, Dc]``, the text encoding of the empty prompt (the U-Net
        branch's conditioning).
      fixed: E4T parts held fixed in this run (e.g. the head when tuning offsets only).
    """

    unet: PyTree
    vae: PyTree
    text: PyTree
    vision: PyTree
    class_embedding: jax.Array
    empty_context: jax.Array
    fixed: E4TParams = E4TParams()

    @property
    def base(self) -> dict[str, PyTree]:
        """``{"unet", "vae", "text"}``: the params sampling takes."""
        return {"unet": self.unet, "vae": self.vae, "text": self.text}


@dataclasses.dataclass(frozen=True)
class E4T:
    """Everything a training, tuning or generation run needs; not mutated after construction.

    Attributes:
      model: the static :class:`E4TModel`.
      frozen: the :class:`FrozenParams`.
      params: the learned :class:`E4TParams` (initial, or pre-trained).
      tokenizer: with the placeholder added.
    """

    model: E4TModel
    frozen: FrozenParams
    params: E4TParams
    tokenizer: Tokenizer

    @property
    def config(self) -> E4TConfig:
        return self.model.config

    @property
    def sd(self) -> pipeline.StableDiffusion:
        return self.model.sd

    def split(self, tune_head: bool = True) -> tuple[E4TParams, FrozenParams]:
        """``(trainable, frozen)``: the params to optimize, and the frozen tree holding the rest."""
        if tune_head:
            return self.params, self.frozen
        return E4TParams(offsets=self.params.offsets), self.frozen.replace(fixed=E4TParams(head=self.params.head))

    def describe(self) -> str:
        """Parameter counts of the learned parts."""
        head = offsets_lib.count_params(self.params.head)
        offsets = offsets_lib.count_params(self.params.offsets)
        return (f"encoder head {head:,} params ({self.config.encoder.vision} backbone); weight offsets {offsets:,} "
                f"params ({offsets_lib.describe(self.params.offsets)})")


# ------------------------------------------------------------------------- the method


def vision_features(model: E4TModel, vision_params: PyTree, pixels: jax.Array) -> jax.Array:
    """The head's vision input: the backbone's tapped layer features, no gradient.

    Args:
      pixels: ``[B, H, W, 3]`` in [-1, 1].

    Returns:
      ``[B, num_layers // layer_stride, Dv]`` float32.
    """
    layers, _ = model.vision(vision_params, pixels)
    return jax.lax.stop_gradient(vision_lib.tap_layers(layers, model.config.encoder.layer_stride))


def predict_embedding(model: E4TModel, head_params: PyTree, unet_params: PyTree, class_embedding: jax.Array,
                      empty_context: jax.Array, features: jax.Array, noisy_latents: jax.Array,
                      timesteps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``v* = v_class + s * E(x)``: the word embedding the encoder predicts for an image.

    Args:
      head_params: the encoder head's params.
      unet_params: the U-Net's params with the current weight offsets applied.
      class_embedding: ``[D]`` ``v_class``.
      empty_context: ``[1, L, Dc]`` the empty prompt's context.
      features: ``[B, T, Dv]`` from :func:`vision_features`.
      noisy_latents: ``[B, h, w, c]`` what the U-Net branch sees.
      timesteps: ``[B]`` int.

    Returns:
      ``(v_star, scaled_offset)``: ``[B, D]`` float32 each; ``scaled_offset`` is
      ``s * E(x)``, what the embedding regularizer sees.
    """
    encoder = model.config.encoder
    pooled = None
    if encoder.use_unet_branch:
        context = jnp.broadcast_to(empty_context, (noisy_latents.shape[0],) + empty_context.shape[1:])
        pooled = pool_features(model.sd.unet.apply({"params": unet_params}, noisy_latents, timesteps, context,
                                                   features_only=True))
    scaled = encoder.embedding_scale * model.head.apply({"params": head_params}, features, pooled)
    return class_embedding[None, :] + scaled, scaled


def loss(params: E4TParams, frozen: FrozenParams, batch: dict, key: jax.Array, *,
         model: E4TModel) -> tuple[jax.Array, dict]:
    """E4T's objective on one batch (pre-training and personalization alike).

    Args:
      params: the trained :class:`E4TParams` (a field may be None: ``frozen.fixed`` has it).
      frozen: the :class:`FrozenParams`.
      batch: ``pixels`` ``[B, H, W, 3]`` float in [-1, 1]; ``input_ids`` ``[B, L]``
        int32 (prompts with the placeholder); ``index`` ``[B]`` int32 global example
        indices (noise and timesteps are drawn per index); optional ``mask``
        ``[B, H, W]`` float in [0, 1] (per-pixel loss weight).
      key: this step's RNG key.

    Returns:
      ``(loss, metrics)`` of :func:`e4t_jax.e4t.losses.total_loss`.
    """
    sd, config = model.sd, model.config
    params = params.merge(frozen.fixed)
    unet_params = offsets_lib.apply_offsets(frozen.unet, params.offsets, config.offsets)
    latents = jax.lax.stop_gradient(encode_to_latents(frozen.vae, sd.vae, batch["pixels"]))
    noise, timesteps = schedulers.per_example_noise(key, batch["index"], latents.shape[1:],
                                                    sd.scheduler.num_train_timesteps)
    noisy = schedulers.add_noise(sd.scheduler, latents, noise, timesteps)
    features = vision_features(model, frozen.vision, batch["pixels"])
    v_star, scaled = predict_embedding(model, params.head, unet_params, frozen.class_embedding,
                                       frozen.empty_context, features, noisy, timesteps)
    context = conditioning.encode_text(sd.text, frozen.text, batch["input_ids"], ((model.placeholder_id, v_star),))
    prediction = sd.unet.apply({"params": unet_params}, noisy, timesteps, context)
    target = schedulers.training_target(sd.scheduler, latents, noise, timesteps)
    mask = batch.get("mask")
    if mask is not None:
        mask = losses.downsample_mask(mask, latents.shape[1:3])
    return losses.total_loss(prediction, target, scaled_offset=scaled, offsets=params.offsets,
                             offset_kind=config.offsets, unet_params=frozen.unet, mask=mask,
                             lambda_emb=config.loss.lambda_emb, lambda_w=config.loss.lambda_w)


def embed_image(model: E4TModel, params: E4TParams, frozen: FrozenParams, pixels: jax.Array) -> jax.Array:
    """``v*`` of clean images (their latents at t = 0, no noise): ``[B, D]`` float32.

    Args:
      pixels: ``[B, H, W, 3]`` in [-1, 1] (the whole, center-cropped image).
    """
    params = params.merge(frozen.fixed)
    unet_params = offsets_lib.apply_offsets(frozen.unet, params.offsets, model.config.offsets)
    latents = encode_to_latents(frozen.vae, model.sd.vae, pixels)
    features = vision_features(model, frozen.vision, pixels)
    v_star, _ = predict_embedding(model, params.head, unet_params, frozen.class_embedding, frozen.empty_context,
                                  features, latents, jnp.zeros((pixels.shape[0],), jnp.int32))
    return v_star


def image_features(model: E4TModel, frozen: FrozenParams, pixels: jax.Array) -> dict[str, jax.Array]:
    """What re-encoding at generation needs from clean images (stored in concept files).

    Returns:
      ``{"layers": [B, T, Dv], "latents": [B, h, w, c]}`` float32: the tapped vision
      features and the latents.
    """
    return {"layers": vision_features(model, frozen.vision, pixels),
            "latents": encode_to_latents(frozen.vae, model.sd.vae, pixels)}


# ------------------------------------------------------------------------------ building


def vision_folder(sd: pipeline.StableDiffusion, source: str | os.PathLike | None) -> Path:
    """The vision tower's folder: ``source`` if given (a folder or a Hub id), else
    ``<model>/image_encoder`` (fetched now for a Hub model: only this part)."""
    if source is not None:
        return weights.resolve_model(source, parts=None)
    folder = sd.folder / "image_encoder"
    if not folder.is_dir() and weights.is_hub_id(sd.model_id):
        folder = weights.resolve_model(sd.model_id, parts=("image_encoder",)) / "image_encoder"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{sd.folder} has no image_encoder/ folder; pass --clip-vision with a CLIP vision model "
            "(e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the encoder the E4T paper uses).")
    return folder


def head_inputs(model: E4TModel) -> tuple[jax.Array, list[jax.Array] | None]:
    """Dummy inputs with the head's real shapes: ``(features [1, T, Dv], unet_pooled)``."""
    encoder, unet = model.config.encoder, model.sd.unet.config
    features = jnp.zeros((1, model.vision.num_layers // encoder.layer_stride, model.vision.width))
    channels = list(unet.block_out_channels) + [unet.block_out_channels[-1]]  # down blocks, then mid block
    return features, [jnp.zeros((1, c)) for c in channels] if encoder.use_unet_branch else None


def load_parts(config: E4TConfig, *, dtype: Any = jnp.float32, remat: bool = False,
               variant: str | None = None, on_host: bool = False) -> tuple[E4TModel, FrozenParams, Tokenizer]:
    """Loads the base model and the vision backbone; adds the placeholder to the tokenizer.

    Args:
      config: what to build; ``config.encoder.text_dim`` is set from the base model.
      dtype: compute dtype of the frozen modules, and the dtype their weights are stored
        in (bfloat16 halves their memory; the trained params stay float32).
      remat: rematerialize U-Net blocks in the backward pass.
      variant: the base model's weight files (``fp16``; :func:`e4t_jax.pipeline.load_model`).
      on_host: keep the frozen weights in host memory (numpy) for the caller to place,
        e.g. sharded over a mesh, instead of on the default device.

    Returns:
      ``(model, frozen, tokenizer)``.

    Raises:
      UserError: the placeholder is already a token, or the domain word is not one token.
    """
    sd, base, tokenizer = pipeline.load_model(config.model.base, dtype=dtype, remat=remat, param_dtype=dtype,
                                              variant=variant, place=not on_host)
    backbone, vision_params = vision_lib.load(config.encoder.vision, vision_folder(sd, config.model.vision_source),
                                              dtype)
    vision_params = _stored(vision_params, dtype, on_host)
    try:
        token_id, word_id = tokenizer.add_placeholder(config.model.placeholder, config.model.domain_word)
    except ValueError as error:  # the placeholder is a word, or the domain word is not one token
        raise UserError(str(error)) from error
    config = dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, text_dim=sd.text_dim))
    model = E4TModel(sd, EncoderHead(config.encoder), config, token_id, backbone)
    frozen = frozen_params(model, base, vision_params, tokenizer, word_id)
    return model, (jax.device_get(frozen) if on_host else frozen), tokenizer


def _stored(tree: PyTree, dtype: Any, on_host: bool) -> PyTree:
    """Floating leaves in ``dtype`` (a custom backbone may load float32), on the host or the device."""
    def store(x):
        x = x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        return np.asarray(x) if on_host else jnp.asarray(x)
    return jax.tree.map(store, tree)


def frozen_params(model: E4TModel, base: PyTree, vision_params: PyTree, tokenizer: Tokenizer,
                  word_id: int) -> FrozenParams:
    """The :class:`FrozenParams` of a model: base and vision params, ``v_class``, empty context."""
    text = model.sd.text
    class_embedding = text.embed(base["text"], jnp.array([[word_id]]))[0, 0].astype(jnp.float32)
    empty = jax.jit(lambda p, ids: conditioning.encode_text(text, p, ids))(base["text"], tokenizer.encode([""]))
    return FrozenParams(unet=base["unet"], vae=base["vae"], text=base["text"], vision=vision_params,
                        class_embedding=class_embedding, empty_context=empty)


def init_params(model: E4TModel, frozen: FrozenParams, seed: int = 0) -> E4TParams:
    """A fresh head (random) and weight offsets (zero change) for ``model``."""
    key_head, key_offsets = jax.random.split(jax.random.key(seed))
    head = jax.jit(model.head.init)(key_head, *head_inputs(model))["params"]
    return E4TParams(head=head, offsets=offsets_lib.init_offsets(key_offsets, frozen.unet, model.config.offsets))


def build(config: E4TConfig = E4TConfig(), *, dtype: Any = jnp.float32, remat: bool = False, seed: int = 0,
          variant: str | None = None, on_host: bool = False) -> E4T:
    """Loads the base model and vision backbone and initializes the E4T parts.

    Args:
      config: base model, concept words, encoder, offsets and loss.
      dtype: compute and storage dtype of the frozen modules (trained params stay float32).
      remat: rematerialize U-Net blocks in the backward pass.
      seed: initializes the head and the low-rank offsets' ``down`` factors.
      variant: the base model's weight files (``fp16``; :func:`e4t_jax.pipeline.load_model`).
      on_host: frozen weights and initial params in host memory (:func:`load_parts`).
    """
    model, frozen, tokenizer = load_parts(config, dtype=dtype, remat=remat, variant=variant, on_host=on_host)
    params = init_params(model, frozen, seed)
    return E4T(model, frozen, jax.device_get(params) if on_host else params, tokenizer)
