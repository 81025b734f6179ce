"""Assemble E4T from a base model folder: modules, frozen params, initial trainables.

:func:`build` is the one place that knows how the pieces fit:

* the base model (U-Net, VAE, CLIP text, tokenizer, scheduler) from a diffusers folder;
* the frozen CLIP vision tower, from ``--clip-vision`` or the model folder's
  ``image_encoder/`` (the embedded tiny model ships one; for SD use the HF form of
  OpenCLIP ViT-H/14, ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, or any CLIP vision model);
* the placeholder token added to the tokenizer, and the domain word's embedding
  ``v_class``;
* the encoder head and the zero-initialized weight offsets.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from e4t_jax import pipeline, weights
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.embedding import encode_text
from e4t_jax.e4t.encoder import EncoderConfig, EncoderHead
from e4t_jax.models.clip import load_clip_vision
from e4t_jax.tokenizer import Tokenizer
from e4t_jax.training.steps import E4TModel

PyTree = Any


@dataclasses.dataclass
class E4T:
    """Everything a training or tuning run needs.

    Attributes:
      model: the static :class:`E4TModel` (modules and configs).
      frozen: ``{"unet", "vae", "text", "vision", "class_embedding", "empty_context"}``.
      trainable: initial ``{"head", "offsets"}``.
      tokenizer: with the placeholder added.
      sd: the base :class:`e4t_jax.pipeline.StableDiffusion`.
      domain_word, placeholder: as given.
      vision_id: where the CLIP vision tower came from.
    """

    model: E4TModel
    frozen: PyTree
    trainable: PyTree
    tokenizer: Tokenizer
    sd: pipeline.StableDiffusion
    domain_word: str
    placeholder: str
    vision_id: str

    @property
    def base_params(self) -> PyTree:
        """The params :class:`e4t_jax.pipeline.Generator` takes: ``{"unet", "vae", "text"}``."""
        return {k: self.frozen[k] for k in ("unet", "vae", "text")}

    def describe(self) -> str:
        """Parameter counts of the trainable parts."""
        head = offsets_lib.count_params(self.trainable["head"])
        offsets = offsets_lib.count_params(self.trainable["offsets"])
        return (f"encoder head {head:,} params; weight offsets {offsets:,} params "
                f"({offsets_lib.describe(self.trainable['offsets'])})")


def vision_folder(sd: pipeline.StableDiffusion, clip_vision: str | os.PathLike | None):
    """The CLIP vision tower's folder: ``clip_vision`` if given, else ``<model>/image_encoder``."""
    if clip_vision is not None:
        return weights.resolve_model(clip_vision), str(clip_vision)
    folder = sd.folder / "image_encoder"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{sd.folder} has no image_encoder/ folder; pass --clip-vision with a CLIP vision model "
            "(e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the encoder the E4T paper uses).")
    return folder, "image_encoder"


def head_inputs(sd: pipeline.StableDiffusion, vision_config, encoder: EncoderConfig):
    """Dummy inputs with the head's real shapes: ``(clip_tokens [1,T,Dv], unet_pooled)``."""
    taps = vision_config.num_hidden_layers // encoder.clip_layer_stride
    tokens = jnp.zeros((1, taps, vision_config.hidden_size))
    channels = list(sd.unet.config.block_out_channels) + [sd.unet.config.block_out_channels[-1]]
    pooled = [jnp.zeros((1, c)) for c in channels] if encoder.use_unet_branch else None
    return tokens, pooled


def build(model_id: str | os.PathLike, *, domain_word: str = "face", placeholder: str = "S*",
          clip_vision: str | os.PathLike | None = None, encoder: EncoderConfig | None = None,
          offsets: offsets_lib.OffsetConfig | None = None, lambda_emb: float = 0.01, lambda_w: float = 1e-4,
          dtype: Any = jnp.float32, remat: bool = False, seed: int = 0) -> E4T:
    """Loads the base model and CLIP vision tower and initializes the E4T parts.

    Args:
      model_id: diffusers folder, Hub id or preset (``tiny``).
      domain_word: the coarse class word whose embedding ``v*`` starts from; must be
        one token of the tokenizer.
      placeholder: the new token that prompts use for the concept.
      clip_vision: CLIP vision model folder or id (default ``<model>/image_encoder``).
      encoder: head sizes; ``text_dim`` is set from the base model.
      offsets: which U-Net kernels get offsets and their form.
      dtype: compute dtype of the frozen modules (params stay float32).
      remat: rematerialize U-Net blocks in the backward pass.
    """
    sd, params, tokenizer = pipeline.load_model(model_id, dtype=dtype, remat=remat)
    folder, vision_id = vision_folder(sd, clip_vision)
    vision, vision_params = load_clip_vision(folder, dtype=dtype)
    token_id, word_id = tokenizer.add_placeholder(placeholder, domain_word)
    encoder = dataclasses.replace(encoder or EncoderConfig(), text_dim=sd.text_dim)
    head = EncoderHead(encoder)
    key_head, key_offsets = jax.random.split(jax.random.key(seed))
    head_params = jax.jit(head.init)(key_head, *head_inputs(sd, vision.config, encoder))["params"]
    offsets = offsets or offsets_lib.OffsetConfig()
    offset_params = offsets_lib.init_offsets(key_offsets, params["unet"], offsets)
    empty = jax.jit(lambda p, ids: encode_text(sd.text, p, ids))(params["text"], tokenizer.encode([""]))
    frozen = {**params, "vision": vision_params,
              "class_embedding": jnp.asarray(params["text"]["embeddings"]["token_embedding"]["embedding"][word_id]),
              "empty_context": empty}
    model = E4TModel(unet=sd.unet, vae=sd.vae, text=sd.text, vision=vision, head=head, scheduler=sd.scheduler,
                     offsets=offsets, placeholder_id=token_id, lambda_emb=lambda_emb, lambda_w=lambda_w,
                     vae_scaling=sd.vae.config.scaling_factor)
    return E4T(model, frozen, {"head": head_params, "offsets": offset_params}, tokenizer, sd, domain_word,
               placeholder, vision_id)


def encoder_config(e: E4T, **extra: Any) -> dict[str, Any]:
    """The JSON config stored beside a domain encoder's params."""
    from e4t_jax import __version__
    from e4t_jax.e4t.concept import model_identity

    return {"base_model": model_identity(e.sd), "model_id": e.sd.model_id, "clip_vision": e.vision_id,
            "domain_word": e.domain_word, "placeholder": e.placeholder,
            "encoder": dataclasses.asdict(e.model.encoder_config),
            "offsets": dataclasses.asdict(e.model.offsets), "lambda_emb": e.model.lambda_emb,
            "lambda_w": e.model.lambda_w, "e4t_jax_version": __version__, **extra}


def export_encoder(e: E4T, directory: str | os.PathLike, trainable: PyTree | None = None, **extra: Any) -> None:
    """Writes a domain encoder (head params + offsets + config) that :func:`load_pretrained` reads."""
    from e4t_jax.training.checkpoint import export_encoder as write

    trainable = trainable or e.trainable
    write(directory, encoder_params=jax.device_get(trainable["head"]), offsets=jax.device_get(trainable["offsets"]),
          config=encoder_config(e, **extra), overwrite=True)


def load_pretrained(model_id: str | os.PathLike, encoder_dir: str | os.PathLike, *,
                    clip_vision: str | os.PathLike | None = None, placeholder: str | None = None,
                    dtype: Any = jnp.float32, remat: bool = False) -> E4T:
    """Builds E4T for ``model_id`` with a pre-trained domain encoder from ``encoder_dir``.

    Raises:
      FileNotFoundError: ``encoder_dir`` is not an exported encoder.
      ValueError: the encoder was pre-trained for another base model.
    """
    from e4t_jax.e4t.concept import model_identity
    from e4t_jax.training.checkpoint import load_encoder

    head, offset_params, config = load_encoder(encoder_dir, expected=None)
    encoder = EncoderConfig.from_dict(config["encoder"])
    offsets = offsets_lib.OffsetConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in config["offsets"].items()})
    vision = clip_vision if clip_vision is not None else (
        None if config.get("clip_vision") == "image_encoder" else config.get("clip_vision"))
    e = build(model_id, domain_word=config["domain_word"], placeholder=placeholder or config["placeholder"],
              clip_vision=vision, encoder=encoder, offsets=offsets, lambda_emb=config.get("lambda_emb", 0.01),
              lambda_w=config.get("lambda_w", 1e-4), dtype=dtype, remat=remat)
    identity = model_identity(e.sd)
    if config["base_model"] != identity:
        raise ValueError(
            f"encoder {encoder_dir} was pre-trained for another base model ({config.get('model_id')}: text width "
            f"{config['base_model'].get('text_width')}); this model ({e.sd.model_id}) has text width "
            f"{identity['text_width']}. Use the base model it was trained with, or pre-train an encoder for this one.")
    e.trainable = {"head": head, "offsets": offset_params}
    return e
