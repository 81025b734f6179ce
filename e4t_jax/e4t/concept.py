"""Personalized concept files: ``v*`` + tuned weight offsets in one small safetensors file.

Layout (all float32 tensors):

* ``embedding``: ``[D]``, the word embedding ``v*`` of the placeholder;
* ``offsets/<path>``: every leaf of the weight-offset pytree, its Flax path joined by
  ``/`` (e.g. ``offsets/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel/up``);
* ``head/<path>``: the tuned encoder head, only when it was tuned and asked for;
* ``image/clip_tokens`` ``[T, Dv]`` and ``image/latents`` ``[h, w, c]``: the concept
  image's tapped CLIP tokens and VAE latents, for per-step re-encoding at generation.

The safetensors metadata ``e4t`` holds a JSON header: format version, project version,
the base model's identity (text width, cross-attention width, U-Net config hash), the
model id, domain word, placeholder and offset configuration. Loading checks the
identity against the model it is used with.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from e4t_jax import __version__, weights
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.pipeline import Concept, StableDiffusion
from e4t_jax.tokenizer import Tokenizer
from e4t_jax.training.checkpoint import base_model_identity

FORMAT_VERSION = 1
PyTree = Any


class ConceptError(ValueError):
    """A concept file that is unreadable or made for another base model."""


def model_identity(sd: StableDiffusion) -> dict[str, Any]:
    """The base-model identity a concept or encoder is tied to."""
    return base_model_identity(weights.read_config(sd.folder / "unet"), sd.text_dim)


def _flatten(prefix: str, tree: PyTree) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {f"{prefix}/{k}": np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}


def _unflatten(tensors: dict[str, np.ndarray], prefix: str) -> PyTree | None:
    flat = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
    return traverse_util.unflatten_dict(flat, sep="/") if flat else None


def save_concept(path: str | os.PathLike, *, embedding: Any, offsets: PyTree, offset_config: offsets_lib.OffsetConfig,
                 sd: StableDiffusion, domain_word: str, placeholder: str, head: PyTree | None = None,
                 image: dict[str, np.ndarray] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Writes a concept file (atomically: a crash leaves nothing at ``path``)."""
    from safetensors.numpy import save_file

    from e4t_jax.cli import atomic_path

    tensors = {"embedding": np.asarray(embedding, np.float32).reshape(-1)}
    tensors.update(_flatten("offsets", offsets))
    if head is not None:
        tensors.update(_flatten("head", head))
    if image is not None:
        tensors.update(_flatten("image", image))
    header = {"format_version": FORMAT_VERSION, "e4t_jax_version": __version__, "base_model": model_identity(sd),
              "model_id": sd.model_id, "domain_word": domain_word, "placeholder": placeholder,
              "offsets": dataclasses.asdict(offset_config), **(extra or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"e4t": json.dumps(header)})
    return Path(path)


@dataclasses.dataclass
class LoadedConcept:
    """A concept file, read. ``concept`` is what :class:`e4t_jax.pipeline.Generator` takes.

    ``head`` (tuned encoder head) and ``image`` (``clip_tokens``, ``latents``) are None
    when the file does not hold them.
    """

    concept: Concept
    placeholder: str
    header: dict[str, Any]
    offset_config: offsets_lib.OffsetConfig
    head: PyTree | None
    image: dict[str, np.ndarray] | None


def read_concept(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, header)`` of a concept file, with clear errors for non-concept files."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concept file {path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises plain errors on foreign files
        raise ConceptError(f"{path} is not a safetensors file ({e}); pass a concept written by e4t-personalize") from e
    if "e4t" not in metadata or "embedding" not in tensors:
        raise ConceptError(f"{path} is a safetensors file but not an E4T concept (no 'e4t' header); "
                           "pass a concept written by e4t-personalize")
    return tensors, json.loads(metadata["e4t"])


def with_reencoding(loaded: LoadedConcept, *, head_params: PyTree, encoder_config: dict, text_params: PyTree,
                    tokenizer: Tokenizer, seed: int = 0) -> Concept:
    """The concept set up to re-encode its image at every denoising step.

    Args:
      loaded: from :func:`load_concept`; must hold ``image`` features.
      head_params: the encoder head (the concept's own tuned head, or the domain encoder's).
      encoder_config: the head's :class:`e4t_jax.e4t.encoder.EncoderConfig` as a dict.
      text_params: the text encoder's params (for the domain word's embedding).
      seed: the noise that the U-Net branch sees is fixed by it.
    """
    import jax
    import jax.numpy as jnp

    from e4t_jax.e4t.encoder import EncoderConfig, EncoderHead

    if loaded.image is None:
        raise ConceptError("this concept file holds no image features; personalize it again with this version "
                           "to use --reencode")
    word_id = tokenizer.token_ids(loaded.header["domain_word"])[0]
    latents = jnp.asarray(loaded.image["latents"])[None]
    arrays = {"head": head_params, "clip_tokens": jnp.asarray(loaded.image["clip_tokens"])[None],
              "latents": latents, "noise": jax.random.normal(jax.random.PRNGKey(seed), latents.shape),
              "class_embedding": jnp.asarray(text_params["embeddings"]["token_embedding"]["embedding"][word_id]),
              "empty_ids": jnp.asarray(tokenizer.encode([""]))}
    return dataclasses.replace(loaded.concept, head=EncoderHead(EncoderConfig.from_dict(encoder_config)),
                               reencode=arrays)


def load_concept(path: str | os.PathLike, sd: StableDiffusion, tokenizer: Tokenizer) -> LoadedConcept:
    """Reads a concept, checks it against the model, and adds its placeholder to ``tokenizer``."""
    tensors, header = read_concept(path)
    saved, current = header.get("base_model", {}), model_identity(sd)
    if saved != current:
        raise ConceptError(
            f"concept {path} was made for another base model ({header.get('model_id')}: text width "
            f"{saved.get('text_width')}, cross-attention {saved.get('cross_attention_dim')}); this model "
            f"({sd.model_id}) has text width {current['text_width']}. Use the model the concept was personalized on.")
    placeholder = header["placeholder"]
    if placeholder in tokenizer.placeholders:
        raise ConceptError(f"two concepts use the placeholder {placeholder}; personalize one with another "
                           "--placeholder (e.g. S2*)")
    token_id, _ = tokenizer.add_placeholder(placeholder, header["domain_word"])
    offset_config = offsets_lib.OffsetConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                for k, v in header["offsets"].items()})
    offsets = _unflatten(tensors, "offsets")
    concept = Concept(token_id=token_id, embedding=tensors["embedding"], offsets=offsets,
                      offset_kind=offset_config.kind)
    return LoadedConcept(concept, placeholder, header, offset_config, _unflatten(tensors, "head"),
                         _unflatten(tensors, "image"))
