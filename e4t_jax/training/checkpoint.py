"""Orbax checkpoints: the domain pre-training state, and the exported domain encoder.

A training checkpoint step holds three items (``ocp.args.Composite``):

- ``state``: the train state pytree (trainable params, optimizer state, step, rng,
  optionally the EMA), arrays written in parallel by every host, restored onto the
  shardings of an abstract target (``jax.ShapeDtypeStruct`` with ``.sharding``). A
  dataclass state is stored as a dict of its fields, without those that are None, so
  an optional field (``TrainState.ema``) may be added without breaking older
  checkpoints;
- ``data``: the input iterator state of every process (JSON; see
  :func:`e4t_jax.training.data.dataset_state`), gathered across processes at save;
- ``config``: the run's configuration (JSON; :func:`e4t_jax.config.to_dict` of its
  config tree), which :func:`read_config` reads alone, to validate a resume before
  any array is restored.

Saves are asynchronous by default: call ``manager.wait_until_finished()`` (or
``manager.close()``) before the program exits.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from e4t_jax.files import absolute

PyTree = Any


def open_manager(directory: str | os.PathLike, *, max_to_keep: int = 3, save_every: int = 1,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` for training states (creates the directory).

    Args:
      directory: checkpoint root (local path or a ``gs://`` URL).
      max_to_keep: keep the last N steps; older ones are deleted.
      save_every: save only steps that are multiples of this (unless forced).
      async_save: write in a background thread while training continues.
      read_only: only read (an existing directory).

    A manager that writes removes, before its first save, what saves that were cut short
    (a killed process) left behind.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_every, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(absolute(directory), options=options,
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


def _entries(state: PyTree) -> PyTree:
    """What a checkpoint stores of ``state``: a dataclass's array fields that are not None, as a dict."""
    if not dataclasses.is_dataclass(state):
        return state
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.metadata.get("pytree_node", True) and getattr(state, f.name) is not None}


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
        state=ocp.args.StandardSave(_entries(train_state)),
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
        state=ocp.args.StandardRestore(jax.tree.map(_abstract, _entries(abstract_state))),
        data=ocp.args.JsonRestore(),
        config=ocp.args.JsonRestore()))
    per_process = restored["data"]["per_process"]
    if len(per_process) != jax.process_count():
        raise ValueError(f"checkpoint step {step} in {manager.directory} holds the data state of {len(per_process)} "
                         f"processes; this run has {jax.process_count()}: the input pipeline cannot resume exactly")
    state = restored["state"]
    if dataclasses.is_dataclass(abstract_state):
        state = dataclasses.replace(abstract_state, **state)
    return state, _decode_data_state(per_process[jax.process_index()]), restored["config"]


def read_config(manager: ocp.CheckpointManager, step: int | None = None) -> dict[str, Any]:
    """The config saved with a step (the latest by default), without restoring any array.

    Raises:
      FileNotFoundError: no checkpoint.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
