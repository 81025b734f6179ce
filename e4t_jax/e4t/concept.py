"""Personalized concepts: the file format, and the sampling hooks that apply them.

A concept file is one small safetensors file (all tensors float32), self-contained (it
is shared without the domain encoder):

* ``embedding``: ``[D]``, the word embedding ``v*`` of the placeholder;
* ``domain/<path>``: the domain encoder's weight offsets, every leaf by its Flax path
  joined by ``/`` (e.g. ``domain/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel/up``);
  the same bytes in every concept of that encoder;
* ``delta/<path>``: this concept's change of them (tuned minus domain offsets, in
  parameter space), the same paths and shapes;
* ``head/<path>``: the tuned encoder head, only when it was tuned and asked for;
* ``image/layers`` ``[T, Dv]`` and ``image/latents`` ``[h, w, c]``: the concept image's
  tapped vision features and latents, for per-step re-encoding at generation.

Its safetensors metadata ``e4t`` holds a JSON header::

    {"format_version": 3, "e4t_jax_version": ..., "base_model": identity, "model_id": ...,
     "encoder_fingerprint": sha256 hex of the domain encoder (:func:`encoder_fingerprint`),
     "config": E4TConfig as a dict (placeholder, domain word, encoder, offsets, loss),
     "run": {...}}                         # free-form: image name, steps, losses, ...

Loading checks every field, the base model's identity, the fingerprint against the
``domain/`` offsets, and the offsets' paths and shapes against the model. Files of
formats 1 and 2 are refused (format 2 stored the domain offsets and the concept's
change as one tree, which does not combine with other concepts).

At generation each concept is a token override (``v*`` at the placeholder; or, with
:func:`reencoding_override`, ``v*`` predicted again at every denoising step by
:func:`e4t_jax.e4t.model.predict_embedding`), and all concepts together are one params
transform (:class:`ComposedOffsets`): the domain offsets applied once, plus every
concept's change of the weights. Only concepts of one domain encoder (one fingerprint)
combine.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from e4t_jax import __version__, conditioning, config as config_lib, files, pipeline, schedulers
from e4t_jax.e4t import offsets as offsets_lib
from e4t_jax.e4t.config import E4TConfig
from e4t_jax.e4t.encoder import EncoderHead
from e4t_jax.e4t.model import E4TModel, predict_embedding
from e4t_jax.e4t.pretrained import encoder_fingerprint, expected_identity, model_identity
from e4t_jax.errors import UserError
from e4t_jax.models.unet import unet_abstract_params
from e4t_jax.tokenizer import Tokenizer

FORMAT_VERSION = 3
TENSOR_GROUPS = ("domain", "delta", "head", "image")  # besides "embedding": the prefixes a concept's tensors have
MAX_FILE_BYTES = 4 << 30  # dense domain + delta offsets on every attention kernel of SD 1.5 stay below
PyTree = Any


class ConceptError(UserError):
    """A concept file that is unreadable, malformed or made for another base model."""


def _flatten(prefix: str, tree: PyTree) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(tree, sep="/")
    return {f"{prefix}/{k}": np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}


def _unflatten(tensors: dict[str, np.ndarray], prefix: str) -> PyTree | None:
    flat = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + "/")}
    return traverse_util.unflatten_dict(flat, sep="/") if flat else None


def offsets_change(tuned: PyTree, domain: PyTree) -> PyTree:
    """``tuned - domain`` leaf by leaf on the host: float32 numpy, what ``delta/`` stores."""
    return jax.tree.map(lambda t, d: np.asarray(t, np.float32) - np.asarray(d, np.float32),
                        jax.device_get(tuned), jax.device_get(domain))


def _mismatch(tree: PyTree, reference: PyTree) -> str | None:
    """The first difference of paths or shapes between two offset trees, in words; None if alike."""
    shapes = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
    wanted = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(reference, sep="/").items()}
    missing, extra = sorted(wanted.keys() - shapes.keys()), sorted(shapes.keys() - wanted.keys())
    if missing or extra:
        return f"it lacks {missing[0]}" if missing else f"it has {extra[0]}, which the reference has not"
    wrong = [k for k in sorted(wanted) if shapes[k] != wanted[k]]
    return f"{wrong[0]} has shape {shapes[wrong[0]]}, the reference {wanted[wrong[0]]}" if wrong else None


def save_concept(path: str | os.PathLike, *, embedding: Any, config: E4TConfig, sd: pipeline.StableDiffusion,
                 domain: PyTree | None = None, delta: PyTree | None = None, head: PyTree | None = None,
                 image: dict[str, Any] | None = None, run: dict[str, Any] | None = None) -> Path:
    """Writes a concept file (atomically: a crash leaves nothing at ``path``).

    Args:
      embedding: ``[D]`` ``v*``.
      config: the E4T config it was personalized with (placeholder, domain word, ...).
      sd: the base model.
      domain: the domain encoder's weight offsets (or None: a concept without offsets).
      delta: the tuned offsets minus ``domain`` (:func:`offsets_change`); given with
        ``domain``, with its paths and shapes.
      head: the tuned encoder head, to store it too.
      image: ``{"layers": [T, Dv], "latents": [h, w, c]}`` for re-encoding.
      run: JSON-able facts about the run (image name, steps, losses).

    Raises:
      ValueError: ``delta`` without ``domain`` or the reverse, or trees that differ.
    """
    from safetensors.numpy import save_file

    if (domain is None) != (delta is None):
        raise ValueError("a concept holds its domain offsets and their change (delta) together, or neither")
    if domain is not None and (difference := _mismatch(delta, domain)):
        raise ValueError(f"the delta does not fit the domain offsets: {difference}")
    tensors = {"embedding": np.asarray(embedding, np.float32).reshape(-1)}
    for prefix, tree in (("domain", domain), ("delta", delta), ("head", head), ("image", image)):
        if tree is not None:
            tensors.update(_flatten(prefix, tree))
    header = {"format_version": FORMAT_VERSION, "e4t_jax_version": __version__, "base_model": model_identity(sd),
              "model_id": sd.model_id, "encoder_fingerprint": encoder_fingerprint(config, domain),
              "config": config_lib.to_dict(config), "run": run or {}}
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
        why = (" (format 2 stored the domain offsets and the concept's change as one tree, which applies the "
               "domain offsets once per concept)" if version == 2 else "")
        raise ConceptError(f"{path} is concept format {version}; this version reads format {FORMAT_VERSION}{why}: "
                           "personalize the concept again")
    for name, tensor in tensors.items():
        if name != "embedding" and name.split("/", 1)[0] not in TENSOR_GROUPS:
            raise ConceptError(f"{path}: unexpected tensor {name!r}; pass a concept written by e4t-personalize")
        if tensor.dtype != np.float32 or not np.all(np.isfinite(tensor)):
            what = tensor.dtype if tensor.dtype != np.float32 else "not finite"
            raise ConceptError(f"{path}: tensor {name!r} is {what}; a concept holds finite float32 tensors only")
    return tensors, header


@dataclasses.dataclass(frozen=True)
class ComposedOffsets:
    """The params transform of a set of concepts of one domain encoder.

    Its state is ``{"domain": offsets, "deltas": (delta, ...)}``, one delta per concept;
    the U-Net gets :func:`e4t_jax.e4t.offsets.compose_offsets`: the domain offsets once,
    plus every concept's change of the weights.
    """

    kind: str

    def __call__(self, params: PyTree, state: PyTree) -> PyTree:
        unet = offsets_lib.compose_offsets(params["unet"], state["domain"], state["deltas"], self.kind)
        return {**params, "unet": unet}


@dataclasses.dataclass(frozen=True)
class Concept:
    """A concept, read from its file and checked against a base model (or just tuned).

    Attributes:
      placeholder: its token (``S*``), added to the tokenizer it was loaded with.
      token_id: the placeholder's id in that tokenizer.
      embedding: ``[D]`` float32 ``v*``.
      config: the E4T config it was personalized with.
      domain: the domain encoder's weight-offset pytree, or None (no offsets).
      delta: this concept's change of ``domain`` (same paths and shapes), or None.
      header: the whole JSON header (empty for a concept not read from a file).
      head: the tuned encoder head, or None.
      image: ``{"layers", "latents"}`` of the concept image, or None.
      path: the file it was read from, or None.
    """

    placeholder: str
    token_id: int
    embedding: np.ndarray
    config: E4TConfig
    domain: PyTree = None
    delta: PyTree = None
    header: dict[str, Any] = dataclasses.field(default_factory=dict)
    head: PyTree = None
    image: dict[str, np.ndarray] | None = None
    path: Path | None = None

    @property
    def name(self) -> str:
        """How messages name it: its file, else its placeholder."""
        return str(self.path) if self.path is not None else self.placeholder

    @functools.cached_property
    def fingerprint(self) -> str:
        """The :func:`e4t_jax.e4t.pretrained.encoder_fingerprint` of the domain encoder it came from."""
        return encoder_fingerprint(self.config, self.domain)

    def override(self) -> pipeline.TokenOverride:
        """``v*`` at the placeholder, fixed for the whole loop."""
        return pipeline.TokenOverride(np.int32(self.token_id), np.asarray(self.embedding, np.float32))

    def hooks(self) -> pipeline.Hooks:
        """Sampling hooks of this concept alone (:func:`sampling_hooks`)."""
        return sampling_hooks([self])


def check_compatible(concepts: Sequence[Concept]) -> None:
    """Raises :class:`ConceptError` unless all ``concepts`` come from one domain encoder."""
    for other in concepts[1:]:
        first = concepts[0]
        if other.fingerprint != first.fingerprint:
            raise ConceptError(f"concepts {first.name} and {other.name} come from different domain encoders "
                               f"(fingerprints {first.fingerprint[:12]} and {other.fingerprint[:12]}); concepts "
                               "combine only when they come from the same domain encoder")


def offsets_hooks(concepts: Sequence[Concept]) -> pipeline.Hooks:
    """One params transform (:class:`ComposedOffsets`) for all ``concepts`` that hold offsets.

    Raises:
      ConceptError: the concepts come from different domain encoders.
    """
    check_compatible(concepts)
    tuned = [c for c in concepts if c.domain is not None]
    if not tuned:
        return pipeline.Hooks()
    state = {"domain": tuned[0].domain, "deltas": tuple(c.delta for c in tuned)}
    return pipeline.Hooks(transforms=(pipeline.ParamsTransform(state, ComposedOffsets(tuned[0].config.offsets.kind)),))


def sampling_hooks(concepts: Sequence[Concept]) -> pipeline.Hooks:
    """Sampling hooks of ``concepts``: each ``v*`` at its placeholder, all offsets in one transform."""
    return pipeline.Hooks(overrides=tuple(c.override() for c in concepts)) + offsets_hooks(concepts)


@functools.lru_cache(maxsize=8)
def _model_offsets(unet_config: Any, offsets_config: offsets_lib.OffsetConfig) -> PyTree:
    """The shapes (``jax.ShapeDtypeStruct``) of the offsets that ``offsets_config`` gives this U-Net."""
    unet = unet_abstract_params(unet_config)
    return jax.eval_shape(lambda: offsets_lib.init_offsets(jax.random.key(0), unet, offsets_config))


def _read_offsets(path: Path, tensors: dict[str, np.ndarray], config: E4TConfig,
                  sd: pipeline.StableDiffusion) -> tuple[PyTree, PyTree]:
    """``(domain, delta)`` of a concept file, checked against each other and the model."""
    domain, delta = _unflatten(tensors, "domain"), _unflatten(tensors, "delta")
    if domain is None and delta is None:
        return None, None
    if domain is None or delta is None:
        raise ConceptError(f"{path} holds {'delta' if domain is None else 'domain'}/ offsets without "
                           f"{'domain' if domain is None else 'delta'}/ ones; personalize the concept again")
    try:
        expected = _model_offsets(sd.unet.config, config.offsets)
    except ValueError as e:  # a target that matches no kernel of this U-Net
        raise ConceptError(f"{path}: {e}") from e
    if difference := _mismatch(domain, expected):
        raise ConceptError(f"{path}: its domain offsets do not fit this model's {config.offsets.kind} offsets "
                           f"({difference}); use the model and encoder it was personalized with")
    if difference := _mismatch(delta, domain):
        raise ConceptError(f"{path}: its delta does not fit its domain offsets ({difference}); the file is damaged")
    return domain, delta


def load_concept(path: str | os.PathLike, sd: pipeline.StableDiffusion, tokenizer: Tokenizer) -> Concept:
    """Reads a concept, checks it against the model, and adds its placeholder to ``tokenizer``."""
    path = Path(path)
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
    domain, delta = _read_offsets(path, tensors, config, sd)
    if header.get("encoder_fingerprint") != encoder_fingerprint(config, domain):
        raise ConceptError(f"{path}: its encoder_fingerprint does not match its domain offsets and config "
                           "(the file was altered); personalize the concept again")
    placeholder = config.model.placeholder
    if placeholder in tokenizer.placeholders:
        raise ConceptError(f"two concepts use the placeholder {placeholder}; personalize one with another "
                           "--placeholder (e.g. S2*)")
    try:
        token_id, _ = tokenizer.add_placeholder(placeholder, config.model.domain_word)
    except ValueError as e:  # the placeholder is a word of this vocabulary, or the domain word is not one token
        raise ConceptError(f"{path}: {e}") from e
    return Concept(placeholder, token_id, tensors["embedding"], config, domain, delta, header,
                   _unflatten(tensors, "head"), _unflatten(tensors, "image"), path)


def load_concepts(paths: Sequence[str | os.PathLike], sd: pipeline.StableDiffusion,
                  tokenizer: Tokenizer) -> list[Concept]:
    """:func:`load_concept` of each path; they must come from one domain encoder (:func:`check_compatible`)."""
    concepts = [load_concept(path, sd, tokenizer) for path in paths]
    check_compatible(concepts)
    return concepts


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


def reencoding_override(concept: Concept, sd: pipeline.StableDiffusion, text_params: PyTree, tokenizer: Tokenizer, *,
                        head_params: PyTree, seed: int = 0) -> pipeline.TokenOverride:
    """The token override that re-encodes the concept image at every denoising step.

    Its :class:`Reencoder` sees the U-Net after the params transforms, i.e. with the
    offsets of every concept sampled with it (:func:`offsets_hooks`).

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
    return pipeline.TokenOverride(np.int32(concept.token_id), state=state, at_timestep=Reencoder(model))


def reencoding_hooks(concept: Concept, sd: pipeline.StableDiffusion, text_params: PyTree, tokenizer: Tokenizer, *,
                     head_params: PyTree, seed: int = 0) -> pipeline.Hooks:
    """Sampling hooks of one concept that re-encodes its image at every step (:func:`reencoding_override`)."""
    override = reencoding_override(concept, sd, text_params, tokenizer, head_params=head_params, seed=seed)
    return pipeline.Hooks(overrides=(override,)) + offsets_hooks([concept])
