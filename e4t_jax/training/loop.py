"""A resumable training loop around a driver: metrics, checkpoints, a stop on NaN.

:func:`run` knows nothing of the model: it steps a driver
(:mod:`e4t_jax.training.parallel`) over host batches, writes metrics (TensorBoard and
JSON lines, process 0 only), saves orbax checkpoints with the input pipeline's state
(:mod:`e4t_jax.training.checkpoint`), and calls ``on_step`` hooks (e.g. sample grids).

Crash safety:

- SIGTERM (what a TPU or Kubernetes preemption sends) is caught while the loop runs; the
  step in progress finishes, every process stops after the same step (on multi-host runs
  the processes agree at each step, through one small collective), a checkpoint of that
  step is saved and :class:`e4t_jax.errors.Preempted` is raised: ``--resume`` continues
  exactly;
- a checkpoint save that fails (a full disk, a lost bucket) raises
  :class:`CheckpointSaveError`; orbax writes a step to a temporary folder and renames it
  when complete, and deletes old steps (``max_to_keep``) only after that, so the last
  good checkpoint stays restorable.

Fault injection for the tests: ``E4T_CRASH_AFTER_STEP=N`` sends the process a signal
right after step N's hooks (its checkpoint written, if it is a saving step):
``E4T_CRASH_SIGNAL``, ``KILL`` by default, or ``TERM``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from e4t_jax.errors import Preempted, UserError
from e4t_jax.training import checkpoint

PyTree = Any


class CheckpointSaveError(UserError):
    """A checkpoint could not be written; the last good one is kept."""


class StopSignal:
    """Catches SIGTERM while a training loop runs (a context manager): it sets :attr:`received`,
    which the loop reads between steps, instead of killing the process.

    Only the main thread can install a signal handler; elsewhere SIGTERM keeps its default.
    """

    def __init__(self):
        self.received = False
        self._previous = None

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def agreed(self) -> bool:
        """Whether any process received SIGTERM (a collective on multi-host runs: call it on every process)."""
        if jax.process_count() == 1:
            return self.received
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.received], np.int32))
        return bool(np.asarray(flags).any())


def _saved(manager) -> str:
    """Which checkpoint a failed run keeps, as a sentence."""
    saved = manager.latest_step()
    return (f"The last good checkpoint (step {saved}) is kept in {manager.directory}" if saved is not None
            else "No checkpoint was saved yet")


def _checked(manager, write: Callable[[], Any]) -> Any:
    """Runs ``write`` (a save, or the wait for one); a failure becomes one :class:`CheckpointSaveError`."""
    try:
        return write()
    except Exception as error:  # noqa: BLE001 - orbax reports I/O failures as ValueError, OSError, ...
        manager.reload()  # forget the step that failed
        text = str(error).strip()
        reason = ("No space left on device" if "No space left on device" in text
                  else (text.splitlines() or [type(error).__name__])[0][:200])
        raise CheckpointSaveError(f"could not save a checkpoint in {manager.directory} ({reason}). "
                                  f"{_saved(manager)}: free space there (or fix the cause), then --resume") from error


class MetricsLog:
    """TensorBoard (``out/tb``: scalars and images) + JSON-lines (``out/metrics.jsonl``) metrics; process 0 only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"))
            self.lines = open(out / "metrics.jsonl", "a", encoding="utf-8")

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """An image summary: uint8 ``[H, W, 3]`` (TensorBoard only)."""
        if self.enabled:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, step)
        self.lines.write(json.dumps({"step": step, **values}) + "\n")
        self.lines.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.lines.close()


def fingerprint(batch: dict[str, np.ndarray]) -> str:
    """A short hash of a host batch (the metrics log records the data order)."""
    digest = hashlib.sha1()
    for key in sorted(batch):
        digest.update(np.ascontiguousarray(batch[key]).tobytes())
    return digest.hexdigest()[:12]


def run(driver: Callable, state: PyTree, frozen: PyTree, batches: Iterator[dict[str, np.ndarray]], *, steps: int,
        global_batch_size: int, manager, data_state: Callable[[], Any], config: dict[str, Any],
        out: Path | None = None, metrics_log: MetricsLog | None = None, log_every: int = 10,
        on_step: Sequence[Callable[[int, PyTree], None]] = ()) -> PyTree:
    """Steps ``driver`` from ``state.step`` to ``steps``; returns the final state.

    Args:
      driver: ``driver(state, frozen, host_batch) -> (state, metrics)``, e.g. a
        :class:`e4t_jax.training.parallel.JitDriver`; the state is donated.
      state: a train state with a ``step`` (restored when resuming).
      frozen: the frozen tree, placed for the driver.
      batches: this host's batches (numeric arrays only), positioned at ``state.step``.
      steps: the last step.
      global_batch_size: for the images/s metric.
      manager: an orbax manager from :func:`e4t_jax.training.checkpoint.open_manager`.
      data_state: returns the input iterator's state (called only on saving steps).
      config: the run's config (JSON-able), saved with every checkpoint.
      out: the run folder: metrics go to a :class:`MetricsLog` on it (closed at the end).
      metrics_log: instead of ``out``, a :class:`MetricsLog` that the caller closes (its hooks may write
        to it too).
      log_every: metrics every N steps (and at the first and the last).
      on_step: ``hook(step, state)`` after every step, on every process (each hook decides
        what a process does; reading sharded state is a collective on multi-host runs).

    Raises:
      FloatingPointError: a metric became NaN or infinite (the last good checkpoint stays).
      CheckpointSaveError: a checkpoint could not be written (the last good one stays).
      Preempted: SIGTERM; the last finished step was saved first.
    """
    from tqdm.auto import tqdm

    first_step = int(state.step)
    crash_after = int(os.environ.get("E4T_CRASH_AFTER_STEP", "0"))
    crash_signal = signal.Signals["SIG" + os.environ.get("E4T_CRASH_SIGNAL", "KILL")]
    log = MetricsLog(out, jax.process_index() == 0) if metrics_log is None else metrics_log
    bar = tqdm(range(first_step, steps), initial=first_step, total=steps, desc="training", unit="step",
               disable=jax.process_index() != 0)
    tick = time.perf_counter()

    def save(step: int) -> None:
        _checked(manager, lambda: checkpoint.save(manager, step, train_state=state, data_state=data_state(),
                                                  config=config, force=True))

    with StopSignal() as stop:
        for step in bar:
            batch = next(batches)
            state, metrics = driver(state, frozen, batch)
            done = step + 1
            if done % log_every == 0 or done == steps or done == first_step + 1:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(math.isfinite(v) for v in values.values()):
                    _checked(manager, manager.wait_until_finished)
                    raise FloatingPointError(f"loss became {values['loss']} at step {done}; stopped. "
                                             f"{_saved(manager)}")
                elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                values["images_per_s"] = global_batch_size * (log_every if done > first_step + 1 else 1) / elapsed
                values["batch"] = fingerprint(batch)
                log.write(done, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}")
            saving = manager.should_save(done) or done == steps  # the iterator state is gathered only then
            if saving:
                save(done)
            for hook in on_step:
                hook(done, state)
            if crash_after and done == crash_after:
                _checked(manager, manager.wait_until_finished)
                os.kill(os.getpid(), crash_signal)
            if done < steps and stop.agreed():
                if not saving:
                    save(done)
                _checked(manager, manager.wait_until_finished)
                raise Preempted(f"stopped by SIGTERM after step {done}, saved in {manager.directory}; "
                                "run the same command with --resume to continue")
    _checked(manager, manager.wait_until_finished)
    if metrics_log is None:
        log.close()
    return state
