"""Domain encoder folders: export a trained E4T, load it back for a base model.

A domain encoder is an orbax directory (:func:`e4t_jax.files.export_encoder`) holding
the head params and the weight offsets, and a JSON config::

    {"e4t": E4TConfig as a dict, "base_model": identity, "model_id": ...,
     "e4t_jax_version": ..., "pretrained_steps": ...}

Loading parses ``e4t`` strictly (:func:`e4t_jax.config.from_dict`) and checks
``base_model`` against the model it is loaded for. Folders written by e4t-jax 0.1 (flat
config keys, ``clip_``-named head fields and params) are read too.

:func:`encoder_fingerprint` names a domain encoder by its offsets and config; concept
files record it, and only concepts with one fingerprint combine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from e4t_jax import __version__, config as config_lib, files, presets, weights
from e4t_jax.e4t.config import E4TConfig, ModelConfig
from e4t_jax.e4t.encoder import EncoderConfig
from e4t_jax.e4t.model import E4T, E4TParams, build, head_inputs, load_parts
from e4t_jax.errors import UserError

PyTree = Any
# Config fields that are not the encoder's own: loading sets or replaces them per run.
_PER_RUN_FIELDS = {"model": ("base", "vision_source", "placeholder"), "encoder": ("text_dim",)}


def model_identity(sd) -> dict[str, Any]:
    """The base-model identity (:func:`e4t_jax.files.base_model_identity`) of a loaded model:
    what encoders and concepts made for it record."""
    return files.base_model_identity(sd.unet.config.architecture(), sd.text_dim)


def expected_identity(sd) -> dict[str, Any]:
    """What a saved identity is checked against (:func:`e4t_jax.files.identity_mismatches`):
    :func:`model_identity`, plus the legacy config fingerprint that earlier files hold
    instead of the architecture (:func:`e4t_jax.files.legacy_fingerprint`)."""
    fingerprint = files.legacy_fingerprint(weights.read_config(sd.folder / "unet"))
    return {**model_identity(sd), "unet_config_sha256": fingerprint}


def encoder_fingerprint(config: E4TConfig, offsets: PyTree) -> str:
    """The sha256 (hex) that names a domain encoder: its weight offsets and its config.

    Hashes every offset leaf (path, shape and float32 bytes, in sorted path order) and
    the config as JSON without the fields that loading sets per run (base model,
    vision source, placeholder, text width). A loaded encoder
    (``encoder_fingerprint(e.config, e.params.offsets)``) and every concept personalized
    from it (its ``domain/`` offsets and header config) give the same value.

    Args:
      config: the encoder's config (or a concept's).
      offsets: the domain offsets (arrays of any float dtype; None: no offsets).
    """
    tree = config_lib.to_dict(config)
    for group, names in _PER_RUN_FIELDS.items():
        for name in names:
            del tree[group][name]
    digest = hashlib.sha256(json.dumps(tree, sort_keys=True).encode())
    for path, leaf in sorted(traverse_util.flatten_dict(offsets or {}, sep="/").items()):
        leaf = np.ascontiguousarray(np.asarray(leaf, np.float32))
        digest.update(f"{path}:{leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def encoder_folder(path: str | os.PathLike) -> Path:
    """The domain encoder that ``--encoder PATH`` names: an encoder folder, or a pre-training
    run folder (its exported ``encoder/``).

    Raises:
      UserError: anything else, saying what to pass.
    """
    path = Path(path)
    if (path / "config").is_dir():
        return path
    if (path / "encoder" / "config").is_dir():
        return path / "encoder"
    what = "pass the folder that e4t-pretrain exported (RUN/encoder), or its run folder RUN"
    if not path.exists():
        raise UserError(f"encoder {path} does not exist; {what}")
    if (path / "checkpoints").is_dir():
        raise UserError(f"{path} is a pre-training run without an exported encoder yet (no {path / 'encoder'}): "
                        "let e4t-pretrain finish (--resume continues it)")
    kind = "a file" if path.is_file() else "a folder but not a domain encoder"
    raise UserError(f"--encoder {path} is {kind}; {what}")


def encoder_config(e: E4T, **extra: Any) -> dict[str, Any]:
    """The JSON config stored beside a domain encoder's params."""
    return {"e4t": config_lib.to_dict(e.config), "base_model": model_identity(e.sd), "model_id": e.sd.model_id,
            "e4t_jax_version": __version__, **extra}


def export_encoder(e: E4T, directory: str | os.PathLike, params: E4TParams | None = None, **extra: Any) -> None:
    """Writes a domain encoder (head params + offsets + config) that :func:`load_pretrained` reads.

    Args:
      params: the trained params (default ``e.params``).
      extra: more JSON-able entries for the config (e.g. ``pretrained_steps``).
    """
    params = jax.device_get(params or e.params)
    files.export_encoder(directory, encoder_params=params.head, offsets=params.offsets,
                         config=encoder_config(e, **extra), overwrite=True)


# e4t-jax 0.1 encoder folders: renamed encoder fields, and the head's per-layer projections.
_V1_ENCODER_FIELDS = {"clip_layer_stride": "layer_stride", "clip_dim": "vision_dim"}
_V1_HEAD_PREFIX = ("clip_proj_", "vision_proj_")


def _config_tree(raw: dict[str, Any]) -> Any:
    """The ``E4TConfig`` dict of an encoder config, also from the flat layout of e4t-jax 0.1."""
    if "e4t" in raw:
        return raw["e4t"]
    source = raw["clip_vision"]
    return {"model": {"base": raw["model_id"], "vision_source": None if source == "image_encoder" else source,
                      "domain_word": raw["domain_word"], "placeholder": raw["placeholder"]},
            "encoder": {_V1_ENCODER_FIELDS.get(k, k): v for k, v in raw["encoder"].items()},
            "offsets": raw["offsets"], "loss": {"lambda_emb": raw["lambda_emb"], "lambda_w": raw["lambda_w"]}}


def read_config(encoder_dir: str | os.PathLike) -> tuple[E4TConfig, dict[str, Any]]:
    """``(config, raw JSON)`` of an encoder folder; a :class:`UserError` if it is foreign."""
    raw = files.read_encoder_config(encoder_dir)
    try:
        return config_lib.from_dict(E4TConfig, _config_tree(raw), "encoder config"), raw
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{encoder_dir} is not an encoder this version can read: {error!r}") from error


def load_pretrained(model_id: str | os.PathLike, encoder_dir: str | os.PathLike, *,
                    vision_source: str | None = None, placeholder: str | None = None,
                    dtype: Any = jnp.float32, remat: bool = False, variant: str | None = None) -> E4T:
    """E4T for ``model_id`` with the pre-trained domain encoder of ``encoder_dir``.

    Args:
      encoder_dir: an encoder folder, or an e4t-pretrain run folder (:func:`encoder_folder`).
      vision_source, placeholder: replace the encoder's (``ModelConfig`` fields).
      dtype, remat, variant: as :func:`e4t_jax.e4t.model.build`.

    Raises:
      UserError: ``encoder_dir`` is not an encoder, its config is unreadable, or it was
        pre-trained for another base model.
    """
    encoder_dir = encoder_folder(encoder_dir)
    config, raw = read_config(encoder_dir)
    model = dataclasses.replace(config.model, base=str(model_id),
                                vision_source=vision_source or config.model.vision_source,
                                placeholder=placeholder or config.model.placeholder)
    model, frozen, tokenizer = load_parts(dataclasses.replace(config, model=model), dtype=dtype, remat=remat,
                                          variant=variant)
    try:
        head, offsets, _ = files.load_encoder(encoder_dir, expected=expected_identity(model.sd))
    except ValueError as error:
        raise UserError(str(error)) from error
    old, new = _V1_HEAD_PREFIX
    head = {name.replace(old, new, 1) if name.startswith(old) else name: value for name, value in head.items()}
    _check_head(encoder_dir, head, jax.eval_shape(model.head.init, jax.random.key(0), *head_inputs(model))["params"])
    return E4T(model, frozen, E4TParams(head=head, offsets=offsets), tokenizer)


def _check_head(encoder_dir: Path, head: Any, expected: Any) -> None:
    """Refuses head params whose names or shapes are not those its config builds.

    Raises:
      UserError: naming the first parameter that differs.
    """
    stored = {weights.torch_key(path): tuple(leaf.shape) for path, leaf in _flat(head).items()}
    wanted = {weights.torch_key(path): tuple(leaf.shape) for path, leaf in _flat(expected).items()}
    for name in sorted(stored.keys() | wanted.keys()):
        if stored.get(name) != wanted.get(name):
            raise UserError(f"encoder {encoder_dir}: its head parameter {name} is {stored.get(name) or 'missing'}, "
                            f"its config builds {wanted.get(name) or 'none'}; the folder's params and config "
                            "do not belong together")


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree)


def ship_encoder(encoder_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Writes an encoder folder as the two small files a shipped preset holds:
    ``encoder.safetensors`` (head + offsets) and ``encoder.json`` (its config)."""
    head, offsets, raw = files.load_encoder(encoder_dir, expected=None)
    out = Path(out_dir)
    weights.save_pytree({"head": head, "offsets": offsets}, out / "encoder.safetensors")
    (out / "encoder.json").write_text(json.dumps(raw, indent=2) + "\n")


def shipped_encoder_dir(preset: str) -> Path:
    """The pre-trained domain encoder shipped with a trained preset (:data:`e4t_jax.presets.SHIPPED`),
    as an encoder folder under ``~/.cache/e4t_jax``, made once from the shipped files."""
    source = presets.SHIPPED[preset]
    fingerprint = hashlib.sha256((source / "encoder.safetensors").read_bytes()).hexdigest()[:12]
    folder = presets.CACHE_ROOT / f"{preset}-encoder-{fingerprint}"
    if not (folder / "config").is_dir():
        params = weights.load_pytree(source / "encoder.safetensors")
        raw = json.loads((source / "encoder.json").read_text())
        with files.atomic_path(folder) as tmp:
            files.export_encoder(tmp, encoder_params=params["head"], offsets=params["offsets"], config=raw,
                                 overwrite=True)
    return folder


def default_encoder(model: str | os.PathLike) -> Path | None:
    """The encoder that goes with ``model`` when none is given: a shipped preset's, else None."""
    return shipped_encoder_dir(str(model)) if str(model) in presets.SHIPPED else None


def preset_encoder_dir(preset: str = "tiny", domain_word: str = "face") -> Path:
    """A domain encoder for a preset model, built once under ``~/.cache/e4t_jax``.

    Its head is randomly initialized and its offsets are zero: it is not pre-trained
    (``e4t-pretrain`` makes a real one), so it demonstrates the mechanics only.
    """
    folder = presets.CACHE_ROOT / f"{preset}-encoder-{domain_word}-v{__version__}"
    if not (folder / "config").is_dir():
        width = 64 if preset == "tiny" else 256
        e = build(E4TConfig(model=ModelConfig(base=preset, domain_word=domain_word),
                            encoder=EncoderConfig(vision_dim=width, unet_dim=width, hidden_dim=width)))
        with files.atomic_path(folder) as tmp:
            export_encoder(e, tmp, pretrained_steps=0)
    return folder
