"""A train state and one pure training step over any loss.

A step sees two pytrees:

* ``state`` (:class:`TrainState`): what trains - ``params`` (any pytree), the optax
  state of exactly those leaves, the step counter, the RNG key and, optionally, an
  exponential moving average (EMA) of the params;
* ``frozen``: everything the loss reads but does not train.

"What trains" is the choice of which pytree goes into ``state.params``; nothing in the
modules knows. Optimizer moments exist only for the trainable leaves. The loss is any
``loss_fn(params, frozen, batch, key) -> (loss, metrics)``: E4T's
(:func:`e4t_jax.e4t.model.loss`), and later the baselines', run through the same step.

One step is one optimizer update on the whole batch; with ``grad_accum=N`` its
gradient is the mean of N micro-batches' gradients, computed one after the other
(``lax.scan``), so activations take the memory of ``B / N`` examples. For a loss that
averages over examples and draws its randomness per example (as E4T's does, from
``batch["index"]``), that is the same update as without accumulation.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from e4t_jax.training.config import OptimizerConfig

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """The trainable part of a run.

    Attributes:
      step: int32 ``[]`` optimizer steps taken.
      params: the trainable pytree.
      opt_state: its optax state.
      rng: the run's key; step ``s`` uses ``fold_in(rng, s)``.
      ema: the params' moving average (same tree), or None when ``ema_decay`` is None.
      ema_decay: static; after each step ``ema = decay * ema + (1 - decay) * params``.
    """

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    rng: jax.Array
    ema: PyTree = None
    ema_decay: float | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def create(cls, params: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array,
               ema_decay: float | None = None) -> "TrainState":
        """Step 0; the EMA (with ``ema_decay``) starts at a copy of ``params`` (own buffers: the state is donated)."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng,
                   ema=None if ema_decay is None else jax.tree.map(jnp.copy, params), ema_decay=ema_decay)


def learning_rate(config: OptimizerConfig, steps: int | None = None) -> float | optax.Schedule:
    """The learning rate of each optimizer step: ``config.lr``, or a schedule.

    ``warmup_steps`` rise linearly from 0 to ``lr``; then ``constant`` stays there, and
    ``linear`` and ``cosine`` decay to 0 at step ``steps`` (needed for them). A
    constant rate without warm-up is a float (the optimizer state then holds no count).
    """
    peak, warmup = config.lr, config.warmup_steps
    if config.schedule == "constant":
        return optax.linear_schedule(0.0, peak, warmup) if warmup else peak
    if steps is None or steps <= warmup:
        raise ValueError(f"a {config.schedule} schedule needs more steps than its {warmup} warm-up steps, "
                         f"got {steps}")
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, end_value=0.0)
    decay = optax.linear_schedule(peak, 0.0, steps - warmup)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup]) if warmup else decay


def make_optimizer(config: OptimizerConfig, steps: int | None = None) -> optax.GradientTransformation:
    """The optax optimizer of an :class:`OptimizerConfig`; ``steps``: the run's length (decaying schedules)."""
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.adamw(learning_rate(config, steps), weight_decay=config.weight_decay))


def micro_batches(batch: dict, count: int) -> dict:
    """``[B, ...]`` leaves -> ``[count, B / count, ...]``; micro-batch ``i`` holds rows ``i::count``.

    Strided rows keep every micro-batch spread over all the devices the batch is split over.
    """
    size = jax.tree.leaves(batch)[0].shape[0]
    if size % count:
        raise ValueError(f"batch of {size} cannot be split into {count} equal micro-batches")
    return jax.tree.map(lambda x: x.reshape((size // count, count) + x.shape[1:]).swapaxes(0, 1), batch)


def _gradients(loss_fn: Callable, params: PyTree, frozen: PyTree, batch: dict, key: jax.Array,
               grad_accum: int) -> tuple[PyTree, dict]:
    """``(grads, metrics)`` of the batch: means over ``grad_accum`` micro-batches, run in sequence."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if grad_accum == 1:
        return grad_fn(params, frozen, batch, key)
    micro = micro_batches(batch, grad_accum)

    def add(total, one):
        return jax.tree.map(jnp.add, total, grad_fn(params, frozen, one, key)), None

    shapes = jax.eval_shape(grad_fn, params, frozen, jax.tree.map(lambda x: x[0], micro), key)
    total, _ = jax.lax.scan(add, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), micro)
    return jax.tree.map(lambda x: x / grad_accum, total)


def train_step(state: TrainState, frozen: PyTree, batch: dict, *, loss_fn: Callable,
               optimizer: optax.GradientTransformation, axis_name: str | None = None,
               grad_accum: int = 1) -> tuple[TrainState, dict]:
    """One optimizer step. Pure; ``axis_name`` set under ``pmap`` averages grads and metrics.

    Args:
      state: the :class:`TrainState` (its EMA, if any, follows the new params).
      frozen: what ``loss_fn`` reads without training it.
      batch: this step's batch (a dict of arrays ``[B, ...]``).
      loss_fn: ``loss_fn(params, frozen, batch, key) -> (loss, metrics)``; ``key`` is
        ``fold_in(state.rng, state.step)``, the same for every micro-batch.
      optimizer: the optax transformation ``state.opt_state`` belongs to.
      grad_accum: split the batch into this many micro-batches (``B`` must be a
        multiple) and average their gradients and metrics.

    Returns:
      The new state and the metrics, plus ``grad_norm``.
    """
    key = jax.random.fold_in(state.rng, state.step)
    grads, metrics = _gradients(loss_fn, state.params, frozen, batch, key, grad_accum)
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None if state.ema is None else optax.incremental_update(params, state.ema, 1 - state.ema_decay)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


def compile_single_device(loss_fn: Callable, optimizer: optax.GradientTransformation, state: TrainState,
                          frozen: PyTree, batch: dict, grad_accum: int = 1) -> tuple[Callable, Callable]:
    """Ahead-of-time compiles a short single-device run (personalization, DreamBooth).

    Args:
      loss_fn, optimizer, grad_accum: as :func:`train_step` (``batch``'s leaves' first
        dimension must be a multiple of ``grad_accum``).
      state, frozen, batch: examples of the step's arguments (shapes and dtypes).

    Returns:
      ``step(state, frozen, batch) -> (state, metrics)``: :func:`train_step`, the state
      donated; and ``evaluate(state, frozen, batch) -> metrics``: ``loss_fn``'s metrics at
      ``state.params`` with the noise of step 0 (``fold_in(state.rng, 0)``), which is what
      the first step reports for its batch, so a run's loss before and after on a fixed
      batch and noise costs one compile. ``evaluate`` runs the step on a copy of the state
      and drops the update: a forward-only loss would be a second program of the whole
      model to compile (a third of a personalization's compile time).
    """
    step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, grad_accum=grad_accum),
                   donate_argnums=(0,)).lower(state, frozen, batch).compile()

    def evaluate(state: TrainState, frozen: PyTree, batch: dict) -> dict:
        probe = jax.tree.map(jnp.copy, state.replace(step=jnp.zeros_like(state.step)))
        return step(probe, frozen, batch)[1]

    return step, evaluate
