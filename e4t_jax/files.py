"""File helpers that several layers share: atomic writes, the base-model identity, and
the orbax directory of a pre-trained domain encoder.

An exported domain encoder is a standalone orbax directory with two items:
``params`` (``{"encoder": ..., "offsets": ...}``) and ``config`` (JSON, holding a
``base_model`` identity from :func:`base_model_identity` that :func:`load_encoder`
checks against the model it is used with).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

PyTree = Any

IDENTITY_NAMES = {
    "text_width": "text width",
    "cross_attention_dim": "U-Net cross-attention width",
    "unet_config_sha256": "U-Net config fingerprint (sha256)",
}


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``target``; moves it into place only on success.

    Works for files and directories: nothing half-written is ever left at ``target``.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp = tmp_dir / target.name
    try:
        yield tmp
        if target.is_dir() and tmp.is_dir():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def absolute(directory: str | os.PathLike) -> str:
    """Orbax wants absolute paths; URLs (gs://...) are kept as they are."""
    directory = os.fspath(directory)
    return directory if "://" in directory else os.path.abspath(os.path.expanduser(directory))


def base_model_identity(unet_config: dict[str, Any], text_width: int) -> dict[str, Any]:
    """What trained add-ons (encoders, concepts) depend on in the base model.

    Args:
      unet_config: the U-Net's ``config.json`` contents.
      text_width: the text encoder's hidden size (768 for SD 1.x, 1024 for SD 2.x).

    Returns:
      ``{"text_width", "cross_attention_dim", "unet_config_sha256"}``; the sha256 is
      taken over the config with sorted keys, without bookkeeping keys (``_...``).
    """
    architecture = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True).encode("utf-8")).hexdigest()
    return {"text_width": int(text_width), "cross_attention_dim": unet_config.get("cross_attention_dim"),
            "unet_config_sha256": digest}


def identity_mismatches(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Readable ``"text width 768; this model has 32"`` lines where two identities differ."""
    return [f"{IDENTITY_NAMES.get(key, key)} {saved.get(key)}; this model has {value}"
            for key, value in expected.items() if saved.get(key) != value]


def _encoder_checkpointer():
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        params=ocp.StandardCheckpointHandler(), config=ocp.JsonCheckpointHandler()))


def export_encoder(directory: str | os.PathLike, *, encoder_params: PyTree, offsets: PyTree,
                   config: dict[str, Any], overwrite: bool = False) -> None:
    """Writes a standalone domain-encoder checkpoint (params + offsets + config).

    Args:
      directory: the new checkpoint directory.
      encoder_params: the encoder's params pytree (nested dicts of arrays).
      offsets: the weight-offset pytree (may be empty).
      config: JSON-able; must hold ``base_model`` (see :func:`base_model_identity`).
      overwrite: replace an existing directory.
    """
    import orbax.checkpoint as ocp

    if "base_model" not in config:
        raise ValueError("the encoder config needs a 'base_model' entry (see base_model_identity) so that "
                         "load_encoder can check the base model it is used with")
    _encoder_checkpointer().save(absolute(directory), args=ocp.args.Composite(
        params=ocp.args.StandardSave({"encoder": encoder_params, "offsets": offsets}),
        config=ocp.args.JsonSave(config)), force=overwrite)


def read_encoder_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of an exported encoder, without reading its arrays.

    Raises:
      FileNotFoundError: the directory is missing or not an encoder checkpoint.
    """
    import orbax.checkpoint as ocp

    path = absolute(directory)
    if not os.path.isdir(os.path.join(path, "config")) and "://" not in path:
        what = "does not exist" if not os.path.exists(path) else "is not an exported E4T encoder (no config item)"
        raise FileNotFoundError(f"encoder checkpoint {path} {what}")
    return _encoder_checkpointer().restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def load_encoder(directory: str | os.PathLike, *, expected: dict[str, Any] | None,
                 sharding: Any = None) -> tuple[PyTree, PyTree, dict[str, Any]]:
    """Loads ``(encoder_params, offsets, config)`` exported by :func:`export_encoder`.

    Args:
      directory: the encoder checkpoint.
      expected: the identity of the base model it will be used with
        (:func:`base_model_identity`); None skips the check.
      sharding: a ``jax.sharding.Sharding`` for every array (default: the first local device).

    Raises:
      FileNotFoundError: the directory is missing or not an encoder checkpoint.
      ValueError: the encoder was pre-trained for another base model.
    """
    import jax
    import orbax.checkpoint as ocp

    path = absolute(directory)
    config = read_encoder_config(path)
    if expected is not None:
        mismatches = identity_mismatches(config.get("base_model", {}), expected)
        if mismatches:
            raise ValueError(f"encoder {path} was pre-trained for a base model with " + ", and ".join(mismatches)
                             + ". Use the base model it was trained with, or pre-train an encoder for this one.")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    checkpointer = _encoder_checkpointer()
    tree = checkpointer.metadata(path).item_metadata["params"].tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
    params = checkpointer.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    return params["encoder"], params["offsets"], config
