"""A train state and one pure training step over any loss.

A step sees two pytrees:

* ``state`` (:class:`TrainState`): what trains - ``params`` (any pytree), the optax
  state of exactly those leaves, the step counter and the RNG key;
* ``frozen``: everything the loss reads but does not train.

"What trains" is the choice of which pytree goes into ``state.params``; nothing in the
modules knows. Optimizer moments exist only for the trainable leaves. The loss is any
``loss_fn(params, frozen, batch, key) -> (loss, metrics)``: E4T's
(:func:`e4t_jax.e4t.model.loss`), and later the baselines', run through the same step.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from e4t_jax.training.config import OptimizerConfig

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
    """The trainable part of a run. ``params``: trainable pytree; ``opt_state``: its optax state."""

    step: jax.Array
    params: PyTree
    opt_state: optax.OptState
    rng: jax.Array

    @classmethod
    def create(cls, params: PyTree, optimizer: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=rng)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """The optax optimizer of an :class:`OptimizerConfig`."""
    schedule = optax.linear_schedule(0.0, config.lr, config.warmup_steps) if config.warmup_steps else config.lr
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.adamw(schedule, weight_decay=config.weight_decay))


def train_step(state: TrainState, frozen: PyTree, batch: dict, *, loss_fn: Callable,
               optimizer: optax.GradientTransformation, axis_name: str | None = None) -> tuple[TrainState, dict]:
    """One optimizer step. Pure; ``axis_name`` set under ``pmap`` averages grads and metrics.

    Args:
      state: the :class:`TrainState`.
      frozen: what ``loss_fn`` reads without training it.
      batch: this step's batch (a dict of arrays).
      loss_fn: ``loss_fn(params, frozen, batch, key) -> (loss, metrics)``; ``key`` is
        ``fold_in(state.rng, state.step)``.
      optimizer: the optax transformation ``state.opt_state`` belongs to.

    Returns:
      The new state and the metrics, plus ``grad_norm``.
    """
    key = jax.random.fold_in(state.rng, state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, frozen, batch, key)
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics
