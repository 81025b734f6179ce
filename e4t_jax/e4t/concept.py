"""Personalized concepts: the file format, and the sampling hooks that apply them.

A concept file is one small safetensors file (all tensors float32):

* ``embedding``: ``[D]``, the word embedding ``v*`` of the placeholder;
* ``offsets/<path>``: every leaf of the weight-offset pytree, its Flax path joined by
  ``/`` (e.g. ``offsets/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel/up``);
* ``head/<path>``: the tuned encoder head, only when it was tuned and asked for;
* ``image/layers`` ``[T, Dv]`` and ``image/latents`` ``[h, w, c]``: the concept image's
  tapped vision features and latents, for per-step re-encoding at generation.

Its safetensors metadata ``e4t`` holds a JSON header::

    {"format_version": 2, "e4t_jax_version": ..., "base_model": identity, "model_id": ...,
     "config": E4TConfig as a dict (placeholder, domain word, encoder, offsets, loss),
     "run": {...}}                         # free-form: image name, steps, losses, ...

Loading checks every field, the base model's identity and the tensors' shapes.

At generation a concept is two :mod:`e4t_jax.pipeline` hooks: a token override (``v*``
at the placeholder; or, with :func:`reencoding_hooks`, ``v*`` predicted again at every
denoising step by :func:`e4t_jax.e4t.model.predict_embedding`) and a params transform
(the offsets added to the U-Net).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from e4t_jax import __version__, conditioning, config as config_lib, files, pipeline, schedulers
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.config import E4TConfig
from e4t_jax.e4t.encoder import EncoderHead
from e4t_jax.e4t.model import E4TModel, predict_embedding
from e4t_jax.e4t.pretrained import expected_identity, model_identity
from e4t_jax.errors import UserError
from e4t_jax.tokenizer import Tokenizer

FORMAT_VERSION = 2
MAX_FILE_BYTES = 4 << 30  # dense offsets on every attention kernel of SD 1.5 stay far below
PyTree = Any


class ConceptError(UserError):
    """A concept file that is unreadable, malformed or made for another base model."""


def _flatten(prefix: str, tree: PyTree) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {f"{prefix}/{k}": np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}


def _unflatten(tensors: dict[str, np.ndarray], prefix: str) -> PyTree | None:
    flat = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
    return traverse_util.unflatten_dict(flat, sep="/") if flat else None


def save_concept(path: str | os.PathLike, *, embedding: Any, offsets: PyTree, config: E4TConfig,
                 sd: pipeline.StableDiffusion, head: PyTree | None = None, image: dict[str, Any] | None = None,
                 run: dict[str, Any] | None = None) -> Path:
    """Writes a concept file (atomically: a crash leaves nothing at ``path``).

    Args:
      embedding: ``[D]`` ``v*``.
      offsets: the tuned weight offsets (or None).
      config: the E4T config it was personalized with (placeholder, domain word, ...).
      sd: the base model.
      head: the tuned encoder head, to store it too.
      image: ``{"layers": [T, Dv], "latents": [h, w, c]}`` for re-encoding.
      run: JSON-able facts about the run (image name, steps, losses).
    """
    from safetensors.numpy import save_file

    tensors = {"embedding": np.asarray(embedding, np.float32).reshape(-1)}
    for prefix, tree in (("offsets", offsets), ("head", head), ("image", image)):
        if tree is not None:
            tensors.update(_flatten(prefix, tree))
    header = {"format_version": FORMAT_VERSION, "e4t_jax_version": __version__, "base_model": model_identity(sd),
              "model_id": sd.model_id, "config": config_lib.to_dict(config), "run": run or {}}
    with files.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"e4t": json.dumps(header)})
    return Path(path)


def read_concept(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(tensors, header)`` of a concept file, with clear errors for non-concept files."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concept file {path} does not exist")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConceptError(f"{path} is {path.stat().st_size / 2**30:.1f} GiB, larger than any concept file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises plain errors on foreign files
        raise ConceptError(f"{path} is not a safetensors file ({e}); pass a concept written by e4t-personalize") from e
    if "e4t" not in metadata or "embedding" not in tensors:
        raise ConceptError(f"{path} is a safetensors file but not an E4T concept (no 'e4t' header); "
                           "pass a concept written by e4t-personalize")
    try:
        header = json.loads(metadata["e4t"])
    except json.JSONDecodeError as e:
        raise ConceptError(f"{path}: its 'e4t' header is not JSON ({e})") from e
    if not isinstance(header, dict) or header.get("format_version") != FORMAT_VERSION:
        version = header.get("format_version") if isinstance(header, dict) else None
        raise ConceptError(f"{path} is concept format {version}; this version reads format {FORMAT_VERSION}: "
                           "personalize the concept again")
    return tensors, header


@dataclasses.dataclass(frozen=True)
class OffsetsTransform:
    """The params transform of a concept: its weight offsets added to the U-Net."""

    kind: str

    def __call__(self, params: PyTree, offsets: PyTree) -> PyTree:
        return {**params, "unet": offsets_lib.apply_offsets(params["unet"], offsets, self.kind)}


@dataclasses.dataclass(frozen=True)
class Concept:
    """A concept file, read and checked against a base model.

    Attributes:
      placeholder: its token (``S*``), added to the tokenizer it was loaded with.
      token_id: the placeholder's id in that tokenizer.
      embedding: ``[D]`` float32 ``v*``.
      offsets: the weight-offset pytree, or None.
      config: the E4T config it was personalized with.
      header: the whole JSON header.
      head: the tuned encoder head, or None.
      image: ``{"layers", "latents"}`` of the concept image, or None.
    """

    placeholder: str
    token_id: int
    embedding: np.ndarray
    offsets: PyTree
    config: E4TConfig
    header: dict[str, Any]
    head: PyTree = None
    image: dict[str, np.ndarray] | None = None

    def offsets_hook(self) -> pipeline.Hooks:
        """The params transform alone (no hook when the concept has no offsets)."""
        if self.offsets is None:
            return pipeline.Hooks()
        return pipeline.Hooks(transforms=(pipeline.ParamsTransform(self.offsets,
                                                                   OffsetsTransform(self.config.offsets.kind)),))

    def hooks(self) -> pipeline.Hooks:
        """Sampling hooks: ``v*`` at the placeholder, the offsets on the U-Net."""
        override = pipeline.TokenOverride(np.int32(self.token_id), np.asarray(self.embedding, np.float32))
        return pipeline.Hooks(overrides=(override,)) + self.offsets_hook()


def load_concept(path: str | os.PathLike, sd: pipeline.StableDiffusion, tokenizer: Tokenizer) -> Concept:
    """Reads a concept, checks it against the model, and adds its placeholder to ``tokenizer``."""
    tensors, header = read_concept(path)
    mismatches = files.identity_mismatches(header.get("base_model"), expected_identity(sd))
    if mismatches:
        raise ConceptError(
            f"concept {path} was made for another base model ({header.get('model_id')}: "
            + ", ".join(mismatches) + f" ({sd.model_id})). Use the model the concept was personalized on.")
    try:
        config = config_lib.from_dict(E4TConfig, header.get("config"), "concept config")
    except ValueError as e:
        raise ConceptError(f"{path}: {e}") from e
    if tensors["embedding"].shape != (sd.text_dim,):
        raise ConceptError(f"{path}: embedding has shape {tensors['embedding'].shape}; this model's text width is "
                           f"{sd.text_dim}")
    offsets = _unflatten(tensors, "offsets")
    if offsets is not None:
        try:
            offsets_lib.offset_leaves(offsets, config.offsets)
        except ValueError as e:
            raise ConceptError(f"{path}: {e}") from e
    placeholder = config.model.placeholder
    if placeholder in tokenizer.placeholders:
        raise ConceptError(f"two concepts use the placeholder {placeholder}; personalize one with another "
                           "--placeholder (e.g. S2*)")
    try:
        token_id, _ = tokenizer.add_placeholder(placeholder, config.model.domain_word)
    except ValueError as e:  # the placeholder is a word of this vocabulary, or the domain word is not one token
        raise ConceptError(f"{path}: {e}") from e
    return Concept(placeholder, token_id, tensors["embedding"], offsets, config, header,
                   _unflatten(tensors, "head"), _unflatten(tensors, "image"))


# ------------------------------------------------------------------------- re-encoding


@dataclasses.dataclass(frozen=True)
class Reencoder:
    """``v*`` predicted again at a denoising step: the head on the noised concept latent.

    The :attr:`e4t_jax.pipeline.TokenOverride.at_timestep` of a re-encoding concept. Its
    state holds ``head`` (params), ``layers`` ``[1, T, Dv]`` and ``latents``
    ``[1, h, w, c]`` of the concept image, ``noise`` like ``latents``,
    ``class_embedding`` ``[D]`` and ``empty_context`` ``[1, L, Dc]``. At step ``t`` the
    U-Net branch sees ``add_noise(latents, noise, t)``, as in training.
    """

    model: E4TModel

    def __call__(self, state: PyTree, params: PyTree, timestep: jax.Array) -> jax.Array:
        scheduler = self.model.sd.scheduler
        t = jnp.clip(jnp.round(timestep), 0, scheduler.num_train_timesteps - 1).astype(jnp.int32)[None]
        noisy = schedulers.add_noise(scheduler, state["latents"], state["noise"], t)
        v_star, _ = predict_embedding(self.model, state["head"], params["unet"], state["class_embedding"],
                                      state["empty_context"], state["layers"], noisy.astype(self.model.sd.unet.dtype),
                                      t)
        return v_star[0]


def reencoding_hooks(concept: Concept, sd: pipeline.StableDiffusion, text_params: PyTree, tokenizer: Tokenizer, *,
                     head_params: PyTree, seed: int = 0) -> pipeline.Hooks:
    """Sampling hooks that re-encode the concept image at every denoising step.

    Args:
      concept: from :func:`load_concept`; must hold ``image`` features.
      sd, text_params: the base model and its text params (for ``v_class`` and the
        empty prompt's context).
      tokenizer: the tokenizer the concept was loaded with.
      head_params: the encoder head (the concept's own tuned head, or the domain encoder's).
      seed: the noise that the U-Net branch sees is fixed by it.
    """
    if concept.image is None:
        raise ConceptError("this concept file holds no image features; personalize it again with this version "
                           "to use --reencode")
    config = dataclasses.replace(concept.config, encoder=dataclasses.replace(concept.config.encoder,
                                                                             text_dim=sd.text_dim))
    model = E4TModel(sd, EncoderHead(config.encoder), config, concept.token_id)
    word_id = tokenizer.token_ids(config.model.domain_word)[0]
    latents = jnp.asarray(concept.image["latents"])[None]
    state = {"head": head_params, "layers": jnp.asarray(concept.image["layers"])[None], "latents": latents,
             "noise": jax.random.normal(jax.random.PRNGKey(seed), latents.shape),
             "class_embedding": sd.text.embed(text_params, jnp.array([[word_id]]))[0, 0].astype(jnp.float32),
             "empty_context": jax.jit(lambda p, ids: conditioning.encode_text(sd.text, p, ids))(
                 text_params, tokenizer.encode([""]))}
    override = pipeline.TokenOverride(np.int32(concept.token_id), state=state, at_timestep=Reencoder(model))
    return pipeline.Hooks(overrides=(override,)) + concept.offsets_hook()
