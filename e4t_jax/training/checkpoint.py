"""Orbax checkpoints: the domain pre-training state, and the exported domain encoder.

A training checkpoint step holds three items (``ocp.args.Composite``):

- ``state``: the train state pytree (trainable params, optimizer state, step, rng),
  arrays written in parallel by every host, restored onto the shardings of an
  abstract target (``jax.ShapeDtypeStruct`` with ``.sharding``);
- ``data``: the input iterator state of every process (JSON; see
  :func:`e4t_jax.training.data.dataset_state`), gathered across processes at save;
- ``config``: the run's configuration (JSON).

Saves are asynchronous by default: call ``manager.wait_until_finished()`` (or
``manager.close()``) before the program exits.

An exported domain encoder is a standalone orbax directory with items ``params``
(``{"encoder": ..., "offsets": ...}``) and ``config`` (JSON, with a ``base_model``
identity from :func:`base_model_identity` that :func:`load_encoder` checks).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any

_IDENTITY_NAMES = {
    "text_width": "text width",
    "cross_attention_dim": "U-Net cross-attention width",
    "unet_config_sha256": "U-Net config fingerprint (sha256)",
}


def _absolute(directory: str | os.PathLike) -> str:
    """Orbax wants absolute paths; URLs (gs://...) are kept as they are."""
    directory = os.fspath(directory)
    return directory if "://" in directory else os.path.abspath(os.path.expanduser(directory))


# ------------------------------------------------------------------------ training state


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often the training state is saved.

    Attributes:
      directory: checkpoint root (local path or a ``gs://`` URL).
      max_to_keep: keep the last N steps; older ones are deleted.
      save_every: save only steps that are multiples of this (unless forced).
      async_save: write in a background thread while training continues.
    """

    directory: str
    max_to_keep: int = 3
    save_every: int = 1000
    async_save: bool = True

    def open(self) -> ocp.CheckpointManager:
        return open_manager(self.directory, max_to_keep=self.max_to_keep, save_every=self.save_every,
                            async_save=self.async_save)


def open_manager(directory: str | os.PathLike, *, max_to_keep: int = 3, save_every: int = 1,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` for training states (creates the directory)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_every,
        enable_async_checkpointing=async_save, create=True)
    return ocp.CheckpointManager(_absolute(directory), options=options,
                                 item_names=("state", "data", "config"))


def _encode_data_state(data_state: Any) -> dict[str, Any]:
    if isinstance(data_state, (bytes, bytearray)):
        return {"base64": base64.b64encode(bytes(data_state)).decode("ascii")}
    return {"json": data_state}


def _decode_data_state(stored: dict[str, Any]) -> Any:
    if "base64" in stored:
        return base64.b64decode(stored["base64"])
    return stored["json"]


def _gather_from_processes(value: Any) -> list[Any]:
    """The JSON-able ``value`` of every process, in process order (a collective)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    text = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([text.size]))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:text.size] = text
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(rows, lengths)]


def save(manager: ocp.CheckpointManager, step: int, *, train_state: PyTree, data_state: Any = None,
         config: dict[str, Any], force: bool = False) -> bool:
    """Saves one step (asynchronously when the manager is async); every process calls it.

    Args:
      manager: from :func:`open_manager`.
      step: training step number.
      train_state: pytree of arrays (params, optimizer state, step, rng keys).
      data_state: this process's input-iterator state: a JSON-able value, bytes, or None.
      config: JSON-able run configuration.
      force: save even when ``step`` is not a multiple of ``save_every``.

    Returns:
      Whether a checkpoint was started for this step.
    """
    data = {"per_process": _gather_from_processes(_encode_data_state(data_state))}
    return manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(train_state),
        data=ocp.args.JsonSave(data),
        config=ocp.args.JsonSave(config)), force=force)


def _abstract(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    return leaf


def restore(manager: ocp.CheckpointManager, step: int | None = None, *,
            abstract_state: PyTree) -> tuple[PyTree, Any, dict[str, Any]]:
    """Restores ``(train_state, data_state, config)`` of a step (the latest by default).

    Args:
      manager: from :func:`open_manager`.
      step: the step to restore; None for the latest.
      abstract_state: the train state's structure: ``jax.ShapeDtypeStruct`` leaves
        (with ``.sharding`` to restore sharded onto a mesh) or arrays (their shapes,
        dtypes and shardings are used), e.g. ``jax.eval_shape`` of the init function.

    Returns:
      The train state, this process's data state (as saved), and the config.

    Raises:
      FileNotFoundError: no checkpoint, or no such step.
      ValueError: the checkpoint was written by a different number of processes.
    """
    steps = manager.all_steps()
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {manager.directory}; saved steps: {sorted(steps)}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree.map(_abstract, abstract_state)),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    per_process = restored["data"]["per_process"]
    if len(per_process) != jax.process_count():
        raise ValueError(f"checkpoint step {step} in {manager.directory} holds the data state of {len(per_process)} "
                         f"processes; this run has {jax.process_count()}: the input pipeline cannot resume exactly")
    return restored["state"], _decode_data_state(per_process[jax.process_index()]), restored["config"]


# ------------------------------------------------------------------------ domain encoder


def base_model_identity(unet_config: dict[str, Any], text_width: int) -> dict[str, Any]:
    """What a domain encoder depends on in the base model.

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


def _encoder_checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
        params=ocp.StandardCheckpointHandler(), config=ocp.JsonCheckpointHandler()))


def export_encoder(directory: str | os.PathLike, *, encoder_params: PyTree, offsets: PyTree,
                   config: dict[str, Any], overwrite: bool = False) -> None:
    """Writes a standalone domain-encoder checkpoint (params + offsets + config).

    Args:
      directory: the new checkpoint directory.
      encoder_params: the encoder's params pytree.
      offsets: the weight-offset pytree (may be empty).
      config: JSON-able; must hold ``base_model`` (see :func:`base_model_identity`).
      overwrite: replace an existing directory.
    """
    if "base_model" not in config:
        raise ValueError("the encoder config needs a 'base_model' entry (see base_model_identity) so that "
                         "load_encoder can check the base model it is used with")
    checkpointer = _encoder_checkpointer()
    checkpointer.save(_absolute(directory), args=ocp.args.Composite(
        params=ocp.args.StandardSave({"encoder": encoder_params, "offsets": offsets}),
        config=ocp.args.JsonSave(config)), force=overwrite)


def load_encoder(directory: str | os.PathLike, *, expected: dict[str, Any] | None,
                 sharding: jax.sharding.Sharding | None = None) -> tuple[PyTree, PyTree, dict[str, Any]]:
    """Loads ``(encoder_params, offsets, config)`` exported by :func:`export_encoder`.

    Args:
      directory: the encoder checkpoint.
      expected: the identity of the base model it will be used with
        (:func:`base_model_identity`); None skips the check.
      sharding: sharding of every array (default: the first local device).

    Raises:
      FileNotFoundError: the directory is missing or not an encoder checkpoint.
      ValueError: the encoder was pre-trained for another base model.
    """
    path = _absolute(directory)
    if not os.path.isdir(os.path.join(path, "config")) and "://" not in path:
        what = "does not exist" if not os.path.exists(path) else "is not an exported E4T encoder (no config item)"
        raise FileNotFoundError(f"encoder checkpoint {path} {what}")
    checkpointer = _encoder_checkpointer()
    config = checkpointer.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    if expected is not None:
        saved = config.get("base_model", {})
        mismatches = [f"{_IDENTITY_NAMES.get(key, key)} {saved.get(key)}; this model has {value}"
                      for key, value in expected.items() if saved.get(key) != value]
        if mismatches:
            raise ValueError(f"encoder {path} was pre-trained for a base model with " + ", and ".join(mismatches)
                             + ". Use the base model it was trained with, or pre-train an encoder for this one.")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tree = checkpointer.metadata(path).item_metadata["params"].tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
    params = checkpointer.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    return params["encoder"], params["offsets"], config
