"""Subprocess body of tests/test_parallel.py: trains a toy model with each driver, prints JSON.

Usage: ``python _parallel_worker.py local`` (4 simulated devices: single-device
reference, jit data=4, jit data=2 x fsdp=2, pmap) or
``python _parallel_worker.py multihost PORT PROCESS_ID`` (one of two processes with 2
devices each). Simulated devices come from XLA_FLAGS, set by the caller. The last
stdout line is a JSON object ``{run_name: {"params": {...}, ...}}``.
"""
import functools
import json
import sys

from e4t_jax.training import parallel

if sys.argv[1] == "multihost":
    parallel.initialize_distributed(f"127.0.0.1:{sys.argv[2]}", 2, int(sys.argv[3]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from e4t_jax.training import steps  # noqa: E402
from e4t_jax.training.config import OptimizerConfig  # noqa: E402

GLOBAL_BATCH, D_IN, D_OUT, NUM_STEPS = 8, 16, 8, 3
MIN_FSDP_SIZE = 64  # small enough that the toy "w" [16, 8] and "proj" [16, 16] get split


def toy_loss(params, frozen, batch, key):
    """Linear regression on frozen tanh features; per-example target noise from the global index."""
    features = jnp.tanh(batch["x"] @ frozen["proj"])
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (D_OUT,)))(batch["index"])
    error = features @ params["w"] + params["b"] - (batch["y"] + 0.1 * noise)
    loss = jnp.mean(error ** 2)
    return loss, {"loss": loss}


def initial_trees():
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(D_IN, D_OUT)).astype(np.float32), "b": np.zeros(D_OUT, np.float32)}
    frozen = {"proj": rng.normal(size=(D_IN, D_IN)).astype(np.float32) / 4}
    optimizer = steps.make_optimizer(OptimizerConfig(lr=0.05, clip_norm=100.0))
    state = steps.TrainState.create(params, optimizer, jax.random.PRNGKey(1))
    return state, frozen, optimizer


def global_batch(step):
    rng = np.random.default_rng(100 + step)
    return {"x": rng.normal(size=(GLOBAL_BATCH, D_IN)).astype(np.float32),
            "y": rng.normal(size=(GLOBAL_BATCH, D_OUT)).astype(np.float32),
            "index": np.arange(GLOBAL_BATCH, dtype=np.int32) + step * GLOBAL_BATCH}


def host_slice():
    """``(start, size)``: this process's rows of the global batch."""
    size = GLOBAL_BATCH // jax.process_count()
    return jax.process_index() * size, size


def host_rows(batch):
    start, size = host_slice()
    return {k: v[start:start + size] for k, v in batch.items()}


def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(x).tolist(), multihost_utils.process_allgather(tree, tiled=True))


def counted(step_fn):
    """Wrap a step so each trace increments ``counted.traces`` (a Python side effect)."""
    traces = []

    def wrapped(*args, **kwargs):
        traces.append(1)
        return step_fn(*args, **kwargs)
    wrapped.traces = traces
    return wrapped


def run_single(step_fn, state, frozen):
    step = jax.jit(step_fn)
    for i in range(NUM_STEPS):
        state, _ = step(state, frozen, global_batch(i))
    return {"params": to_numpy(state.params)}


def run_jit(step_fn, state, frozen, data, fsdp):
    step_fn = counted(step_fn)
    mesh = parallel.make_mesh(data, fsdp)
    driver = parallel.JitDriver(step_fn, mesh, state, frozen, fsdp=fsdp > 1, min_fsdp_size=MIN_FSDP_SIZE)
    state, frozen = driver.place_state(state), driver.place_frozen(frozen)
    donated = []
    for i in range(NUM_STEPS):
        old_w = state.params["w"]
        state, metrics = driver(state, frozen, host_rows(global_batch(i)))
        donated.append(old_w.is_deleted())
    return {"params": to_numpy(state.params), "traces": len(step_fn.traces), "donated": all(donated),
            "loss": float(metrics["loss"]), "w_spec": str(state.params["w"].sharding.spec),
            "proj_spec": str(frozen["proj"].sharding.spec)}


def run_pmap(step_fn, state, frozen):
    driver = parallel.PmapDriver(step_fn)
    state, frozen = driver.place_state(state), driver.place_frozen(frozen)
    donated = []
    for i in range(NUM_STEPS):
        old_w = state.params["w"]
        state, metrics = driver(state, frozen, host_rows(global_batch(i)))
        donated.append(old_w.is_deleted())
    params = driver.unreplicate_state(state).params
    return {"params": jax.tree.map(lambda x: np.asarray(x).tolist(), params), "donated": all(donated),
            "loss": float(metrics["loss"])}


def api_checks():
    """Error messages and sharding choices that need 4 devices (local run only)."""
    mesh = parallel.make_mesh(2, 2)
    specs = parallel.fsdp_sharding(mesh, {"big": jnp.zeros((3, 8, 6)), "odd": jnp.zeros((3, 5)),
                                          "small": jnp.zeros((8,))}, min_size=10)
    errors = {}
    for name, call in {"strings": lambda: parallel.shard_batch(mesh, {"prompt": np.array(["a", "b", "c", "d"])}),
                       "rows": lambda: parallel.shard_batch(mesh, {"x": np.zeros((6, 2))})}.items():
        try:
            call()
        except (TypeError, ValueError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    return {"specs": {k: str(v.spec) for k, v in specs.items()}, "errors": errors,
            "initialized": parallel.initialize_distributed()}


def main():
    optimizer = initial_trees()[2]
    step_fn = functools.partial(steps.train_step, loss_fn=toy_loss, optimizer=optimizer)
    results = {"process_count": jax.process_count(), "device_count": jax.device_count(),
               "host_slice": host_slice()}
    # Fresh trees for every run: the drivers donate the state they are given.
    if sys.argv[1] == "local":
        results["single"] = run_single(step_fn, *initial_trees()[:2])
        results["api"] = api_checks()
    results["jit"] = run_jit(step_fn, *initial_trees()[:2], data=4, fsdp=1)
    results["fsdp"] = run_jit(step_fn, *initial_trees()[:2], data=2, fsdp=2)
    results["pmap"] = run_pmap(step_fn, *initial_trees()[:2])
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
