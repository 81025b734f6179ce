"""Running a pure train step on many devices and hosts: mesh, shardings, drivers.

Two drivers run the same step ``step_fn(state, frozen, batch, axis_name=None)``
(usually ``functools.partial(steps.train_step, loss_fn=..., optimizer=...)``) and give
the same update on the same global batch:

* :class:`JitDriver` (the default): ``jax.jit`` with explicit ``NamedSharding``s over
  a ``("data", "fsdp")`` mesh, donating the train state. The batch is split over both
  axes; with ``fsdp=True`` the train state's big leaves are also split over ``"fsdp"``,
  and the frozen tree's big leaves always are. XLA inserts the collectives.
* :class:`PmapDriver`: the classic ``jax.pmap`` API; state and frozen replicated per
  device, gradients averaged with ``lax.pmean`` over the axis ``"batch"``.

Batches are dicts of numpy arrays with a leading batch axis, tokenized already (no
strings), and carry ``index`` ``[B]`` int32 global example indices, so the update does
not depend on how the batch is split.

Multi-host runs
---------------
Start one process per host (per GPU is also fine) with the same program, and call
:func:`initialize_distributed` before any other JAX call. Set on every process::

    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234   # host:port of process 0, reachable by all
    JAX_NUM_PROCESSES=4                     # number of processes
    JAX_PROCESS_ID=0                        # 0 .. JAX_NUM_PROCESSES - 1, unique

or pass them as arguments. On a multi-host Cloud TPU slice (or several, with
Megascale) nothing needs setting: :func:`initialize_distributed` sees the TPU runtime's
environment (:func:`cloud_tpu_pod`) and lets JAX find the three values itself. On SLURM
and Open MPI, call ``initialize_distributed(auto=True)``.
On CPU the cross-process collectives use gloo over TCP. Each process then reads only
its share of the global batch (``B / process_count`` rows, e.g. its shard of the
image files, see :func:`e4t_jax.training.data.make_dataset`) and feeds them to the
driver (which calls :func:`shard_batch`). Every process must run the same steps in the
same order.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
BATCH_AXES = ("data", "fsdp")
MIN_FSDP_SIZE = 2**16  # leaves with fewer elements stay whole on every device (their all-gathers cost more)


def make_mesh(data: int | None = None, fsdp: int = 1, devices=None) -> Mesh:
    """A ``("data", "fsdp")`` mesh; by default every device on ``"data"``.

    Devices are ordered by (process, id), so each process holds a contiguous block of
    the batch axis and an ``fsdp`` group that divides the local device count stays
    within one host.
    """
    devices = sorted(devices if devices is not None else jax.devices(),
                     key=lambda d: (d.process_index, d.id))
    data = len(devices) // fsdp if data is None else data
    if data * fsdp != len(devices):
        raise ValueError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, got {len(devices)}")
    return Mesh(np.array(devices).reshape(data, fsdp), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``"data"`` and ``"fsdp"`` jointly, the rest whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _leaf_fsdp_spec(shape: tuple[int, ...], parts: int, min_size: int) -> P:
    """Split the largest axis divisible by ``parts`` if the leaf has >= ``min_size`` elements."""
    if parts == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    divisible = [axis for axis, size in enumerate(shape) if size % parts == 0]
    if not divisible:
        return P()
    axis = max(divisible, key=lambda a: shape[a])
    return P(*([None] * axis + ["fsdp"]))


def fsdp_sharding(mesh: Mesh, tree: PyTree, min_size: int = MIN_FSDP_SIZE) -> PyTree:
    """Per-leaf shardings: leaves with >= ``min_size`` elements split over ``"fsdp"``.

    The largest axis divisible by the ``"fsdp"`` size is split; small leaves, and
    leaves with no divisible axis, are replicated. ``tree`` may hold arrays or
    ``jax.ShapeDtypeStruct``s.
    """
    parts = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_fsdp_spec(tuple(x.shape), parts, min_size)), tree)


def state_sharding(mesh: Mesh, abstract_state: PyTree, fsdp: bool, min_size: int = MIN_FSDP_SIZE) -> PyTree:
    """Shardings of a train state: split over ``"fsdp"`` (see :func:`fsdp_sharding`) or replicated."""
    if fsdp:
        return fsdp_sharding(mesh, abstract_state, min_size)
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def _check_batch(batch: dict, divisor: int) -> None:
    """Raise if a leaf is a string or its leading axis is not a multiple of ``divisor``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        name = jax.tree_util.keystr(path)
        if isinstance(leaf, (str, bytes)) or np.asarray(leaf).dtype.kind in "USO":
            raise TypeError(f"batch{name} holds strings or objects; tokenize prompts before sharding "
                            "(only numeric arrays can go to devices)")
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % divisor:
            raise ValueError(f"batch{name} has shape {np.shape(leaf)}: its leading axis must be a "
                             f"multiple of the {divisor} local devices")


def shard_batch(mesh: Mesh, batch: dict) -> dict:
    """Host-local numpy batch -> global ``jax.Array``s split by :func:`batch_sharding`.

    Each process passes only its own rows (``[B / process_count, ...]``); the result
    has the global leading size ``B``. Works unchanged on one host.
    """
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    _check_batch(batch, local_devices)
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def _place(tree: PyTree, shardings: PyTree) -> PyTree:
    """``device_put`` that also works for shardings spanning several processes.

    Every process must pass the same values (as for any replicated start state).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, tree, shardings)


class JitDriver:
    """``jax.jit`` driver over a ``("data", "fsdp")`` mesh; donates the train state.

    Args:
      step_fn: ``step_fn(state, frozen, batch) -> (state, metrics)``, pure.
      mesh: from :func:`make_mesh`.
      abstract_state, abstract_frozen: pytrees of arrays or ``ShapeDtypeStruct``s
        (``jax.eval_shape`` output) giving the shapes to shard.
      fsdp: split the train state's big leaves over ``"fsdp"`` (else replicate it).
      min_fsdp_size: leaves with fewer elements stay replicated.
    """

    def __init__(self, step_fn: Callable, mesh: Mesh, abstract_state: PyTree, abstract_frozen: PyTree,
                 fsdp: bool = False, min_fsdp_size: int = MIN_FSDP_SIZE):
        self.mesh = mesh
        self.state_shardings = state_sharding(mesh, abstract_state, fsdp, min_fsdp_size)
        self.frozen_shardings = fsdp_sharding(mesh, abstract_frozen, min_fsdp_size)
        self._step = jax.jit(
            step_fn,
            in_shardings=(self.state_shardings, self.frozen_shardings, batch_sharding(mesh)),
            out_shardings=(self.state_shardings, replicated(mesh)),
            donate_argnums=(0,))
        self._compiled = None

    def place_state(self, state: PyTree) -> PyTree:
        """Put the train state on the mesh with its shardings."""
        return _place(state, self.state_shardings)

    def place_frozen(self, frozen: PyTree) -> PyTree:
        """Put the frozen tree on the mesh with its shardings."""
        return _place(frozen, self.frozen_shardings)

    def __call__(self, state: PyTree, frozen: PyTree, batch: dict) -> tuple[PyTree, dict]:
        """One step on this host's numpy rows; ``state`` is donated (unusable afterwards).

        Returns the new state and the metrics as replicated ``jax.Array``s (not fetched).
        The first call compiles, then waits for every process to have compiled too.
        """
        batch = shard_batch(self.mesh, batch)
        if self._compiled is None:
            self._compiled = self._step.lower(state, frozen, batch).compile()
            barrier("e4t-jit-driver-compiled")
        return self._compiled(state, frozen, batch)


def fetch(tree: PyTree) -> PyTree:
    """Every leaf as a whole host numpy array, also when it is split over several processes.

    Multi-process: a collective (``process_allgather``), so every process must call it
    at the same point; one process alone cannot read shards that live on another host.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process reaches the barrier ``name`` (unique per call); no-op on one.

    A collective's first call gives the other processes 30 s to arrive (gloo's set-up),
    less than one of them may spend compiling or sampling; this barrier of the
    coordination service waits ``timeout_s``.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination service client (no public handle)

    distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


def device_bytes(device) -> int:
    """Bytes held on ``device`` by every live ``jax.Array`` (its shards there)."""
    return sum(shard.data.nbytes for array in jax.live_arrays() for shard in array.addressable_shards
               if shard.device == device)


def replicate(tree: PyTree, devices) -> PyTree:
    """A copy of every leaf on each device: leaves ``[len(devices), ...]``, pmap layout."""
    sharding = NamedSharding(Mesh(np.array(devices), ("replica",)), P("replica"))

    def put(x):
        shards = [jax.device_put(x, d)[None] for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices),) + tuple(np.shape(x)), sharding, shards)
    return jax.tree.map(put, tree)


class PmapDriver:
    """``jax.pmap`` driver over this process's devices; donates the train state.

    ``step_fn`` must accept ``axis_name`` (gradients and metrics are ``pmean``-ed over
    ``"batch"``). State and frozen trees are replicated with a leading device axis.
    """

    axis_name = "batch"

    def __init__(self, step_fn: Callable, devices=None):
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self._step = jax.pmap(functools.partial(step_fn, axis_name=self.axis_name), axis_name=self.axis_name,
                              devices=devices, donate_argnums=(0,))

    def place_state(self, state: PyTree) -> PyTree:
        """Replicate the train state over the devices: leaves ``[n_dev, ...]``."""
        return replicate(state, self.devices)

    def place_frozen(self, frozen: PyTree) -> PyTree:
        """Replicate the frozen tree over the devices: leaves ``[n_dev, ...]``."""
        return replicate(frozen, self.devices)

    def unreplicate_state(self, state: PyTree) -> PyTree:
        """The first device's copy: leaves without the device axis."""
        return jax.tree.map(lambda x: x[0], state)

    def __call__(self, state: PyTree, frozen: PyTree, batch: dict) -> tuple[PyTree, dict]:
        """One step on this host's numpy rows ``[B_local, ...]``, split ``[n_dev, B_local / n_dev, ...]``.

        ``state`` is donated. Returns the new (replicated) state and the metrics of the
        first device (they are equal on all), as ``jax.Array``s.
        """
        n = len(self.devices)
        _check_batch(batch, n)
        split = jax.tree.map(lambda x: np.asarray(x).reshape((n, -1) + np.shape(x)[1:]), batch)
        state, metrics = self._step(state, frozen, split)
        return state, jax.tree.map(lambda m: m[0], metrics)


def cloud_tpu_pod(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` is that of one host of a multi-host Cloud TPU run.

    The variables JAX's own Cloud TPU cluster detection reads: ``TPU_PROCESS_ADDRESSES``
    or ``TPU_WORKER_HOSTNAMES`` (comma-separated, one entry per host) naming more than
    one host, or a Megascale (multi-slice) coordinator or slice count above 1.
    """
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    slices = environ.get("MEGASCALE_NUM_SLICES", "1").strip()
    return (len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
            or (slices.isdigit() and int(slices) > 1))


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
    """Join a multi-process run; a no-op (returns False) when nothing asks for one.

    Values not passed come from ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``. With none of them set, JAX detects them itself on a multi-host
    Cloud TPU run (:func:`cloud_tpu_pod`) or with ``auto=True`` (also SLURM, Open MPI);
    otherwise (one host) this does nothing. Must run before any other JAX call. Sets
    gloo as the CPU cross-process collectives. Returns True when the distributed system
    is (now) initialized.
    """
    if jax.distributed.is_initialized():
        return True
    settings = {
        "JAX_COORDINATOR_ADDRESS": coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "JAX_NUM_PROCESSES": num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES"),
        "JAX_PROCESS_ID": process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID"),
    }
    missing = [name for name, value in settings.items() if value is None]
    auto = auto or cloud_tpu_pod(os.environ)
    if len(missing) == len(settings) and not auto:
        return False
    if missing and not auto:
        raise ValueError(f"multi-process run needs all of {list(settings)}; missing {missing}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coordinator, num_processes, process_id = settings.values()
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=None if num_processes is None else int(num_processes),
                               process_id=None if process_id is None else int(process_id))
    return True

