"""The generic train step: gradient accumulation, learning-rate schedules, the EMA, old train states."""
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from e4t_jax.training import checkpoint, steps
from e4t_jax.training.config import OptimizerConfig, TrainConfig


def toy_loss(params, frozen, batch, key):
    """Mean squared error of a linear map, with per-example noise drawn from ``index``."""
    noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (2,)))(batch["index"])
    error = batch["x"] @ params["w"] + params["b"] + 0.1 * noise - batch["y"]
    loss = jnp.mean(error ** 2)
    return loss, {"loss": loss}


def _params():
    return {"w": jnp.arange(6, dtype=jnp.float32).reshape(3, 2) / 10, "b": jnp.zeros(2)}


def _batch(size=8):
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(size, 3)).astype(np.float32), "y": rng.normal(size=(size, 2)).astype(np.float32),
            "index": np.arange(size, dtype=np.int32)}


def _run(optimizer, count, grad_accum, ema_decay=None):
    state = steps.TrainState.create(_params(), optimizer, jax.random.key(0), ema_decay=ema_decay)
    step = jax.jit(functools.partial(steps.train_step, loss_fn=toy_loss, optimizer=optimizer, grad_accum=grad_accum))
    history = []
    for _ in range(count):
        state, metrics = step(state, None, _batch())
        history.append(state.params)
    return state, metrics, history


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1), steps.make_optimizer(OptimizerConfig(lr=1e-2))],
                         ids=["sgd", "adamw"])
def test_accumulated_micro_batches_equal_one_big_batch(optimizer):
    whole, whole_metrics, _ = _run(optimizer, 2, grad_accum=1)
    accumulated, metrics, _ = _run(optimizer, 2, grad_accum=4)
    assert int(accumulated.step) == 2  # optimizer steps, not micro-steps
    for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(accumulated.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], whole_metrics["loss"], rtol=1e-6)


def test_evaluate_is_the_first_steps_loss_and_keeps_the_state():
    optimizer = optax.sgd(0.1)
    state = steps.TrainState.create(_params(), optimizer, jax.random.key(0))
    step, evaluate = steps.compile_single_device(toy_loss, optimizer, state, None, _batch(), grad_accum=2)
    before = float(evaluate(state, None, _batch())["loss"])
    trained, metrics = step(jax.tree.map(jnp.copy, state), None, _batch())
    assert before == float(metrics["loss"])  # the same program, batch and noise
    np.testing.assert_array_equal(state.params["w"], _params()["w"])  # evaluate did not consume or change it
    after = float(evaluate(trained, None, _batch())["loss"])
    assert after < before and int(trained.step) == 1
    expected, _ = toy_loss(trained.params, None, _batch(), jax.random.fold_in(trained.rng, 0))
    np.testing.assert_allclose(after, float(expected), rtol=1e-6)  # step 0's noise, the trained params


def test_micro_batches_are_strided_rows():
    micro = steps.micro_batches({"index": np.arange(6)}, 3)["index"]
    np.testing.assert_array_equal(micro, [[0, 3], [1, 4], [2, 5]])
    with pytest.raises(ValueError, match="cannot be split into 4"):
        steps.micro_batches({"index": np.arange(6)}, 4)


def test_schedules_follow_their_closed_form():
    lr, warmup, total = 1e-3, 10, 110
    closed = {"constant": lambda s: lr,
              "linear": lambda s: lr * (1 - (s - warmup) / (total - warmup)),
              "cosine": lambda s: lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))}
    for name, expected in closed.items():
        schedule = steps.learning_rate(OptimizerConfig(lr=lr, warmup_steps=warmup, schedule=name), total)
        for s in (0, 5, 10, 35, 60, 109, 110):
            want = lr * s / warmup if s < warmup else expected(s)
            np.testing.assert_allclose(float(schedule(s)), want, atol=1e-7 * lr, err_msg=f"{name} {s}")
    assert steps.learning_rate(OptimizerConfig(lr=lr), total) == lr  # no count in the optimizer state
    with pytest.raises(ValueError, match="below the 10 steps"):
        TrainConfig(steps=10, optimizer=OptimizerConfig(warmup_steps=10, schedule="cosine"))
    with pytest.raises(ValueError, match="schedule must be one of"):
        OptimizerConfig(schedule="step")


def test_ema_is_the_closed_form_recursion():
    decay, k = 0.9, 3
    state, _, history = _run(optax.sgd(0.1), k, grad_accum=1, ema_decay=decay)
    for name in ("w", "b"):
        p0 = _params()[name]
        expected = decay ** k * p0 + sum((1 - decay) * decay ** (k - i) * history[i - 1][name] for i in range(1, k + 1))
        np.testing.assert_allclose(state.ema[name], expected, atol=1e-6)
    assert _run(optax.sgd(0.1), 1, grad_accum=1)[0].ema is None


def test_the_ema_is_checkpointed_and_a_state_without_one_still_restores(tmp_path):
    optimizer = optax.sgd(0.1)
    with_ema, _, _ = _run(optimizer, 2, grad_accum=1, ema_decay=0.5)
    manager = checkpoint.open_manager(tmp_path / "ema", async_save=False)
    checkpoint.save(manager, 2, train_state=with_ema, config={}, force=True)
    abstract = jax.eval_shape(lambda: steps.TrainState.create(_params(), optimizer, jax.random.key(0), 0.5))
    restored, _, _ = checkpoint.restore(manager, abstract_state=abstract)
    np.testing.assert_array_equal(restored.ema["w"], with_ema.ema["w"])

    # A train state as e4t-jax saved it before the EMA existed: the dataclass itself, with no "ema".
    class OldTrainState(flax.struct.PyTreeNode):
        step: jax.Array
        params: dict
        opt_state: optax.OptState
        rng: jax.Array

    without, _, _ = _run(optimizer, 2, grad_accum=1)
    old = OldTrainState(without.step, without.params, without.opt_state, without.rng)
    manager = checkpoint.open_manager(tmp_path / "old", async_save=False)
    manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(old), data=ocp.args.JsonSave(
        {"per_process": [{"json": None}]}), config=ocp.args.JsonSave({})), force=True)
    abstract = jax.eval_shape(lambda: steps.TrainState.create(_params(), optimizer, jax.random.key(0)))
    restored, _, _ = checkpoint.restore(manager, abstract_state=abstract)
    assert restored.ema is None and int(restored.step) == 2
    np.testing.assert_array_equal(restored.params["w"], without.params["w"])
