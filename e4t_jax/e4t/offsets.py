"""Weight offsets ``dW`` for the U-Net's attention projections, as plain pytrees.

E4T tunes the frozen U-Net through offsets ``W' = W + dW`` on the query / key / value
(and optionally output) projections of its self-attention (``attn1``) and
cross-attention (``attn2``) layers. The offsets are their own pytree, with the same
nested paths as the kernels they modify, one small dict per kernel::

    {"down_blocks_0": {"attentions_0": {"transformer_blocks_0": {"attn1": {"to_q":
        {"kernel": {"down": [Din, r], "up": [r, Dout]}}}}}}}

so the U-Net code knows nothing of them: a step calls
``apply_offsets(unet_params, offsets, kind)`` and runs the U-Net on the result.

A parameterization (``kind``) is an :class:`OffsetKind` registered in :data:`KINDS`
(:func:`register` adds one): its leaf names, its zero-change initialization, its
``dW`` and its L2 penalty. Built in, each equal to the base model at initialization:

- ``"lowrank"`` (default): ``dW = down @ up`` (LoRA-like); ``down [Din, r]`` is random
  normal times ``init_scale``, ``up [r, Dout]`` is zeros.
- ``"multiplicative"``: ``W' = W * (1 + scale)``, i.e. ``dW = W * scale``; ``scale``
  has the kernel's shape, zeros.
- ``"dense"``: ``dW = delta``; ``delta`` has the kernel's shape, zeros.

Several tunings of the same (domain) offsets combine in weight space
(:func:`compose_offsets`): the domain's change is applied once, and each tuning adds
its own change of the weights relative to it.

This project could not confirm the paper's exact form of the weight offsets; the
low-rank additive default is this project's choice, not a number or form taken from
the paper. Offsets are float32 whatever the kernels' dtype.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PyTree = Any
Path = tuple[str, ...]

SELF_ATTENTION_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
CROSS_ATTENTION_QKV = ("attn2.to_q", "attn2.to_k", "attn2.to_v")
OUTPUT_PROJECTIONS = ("attn1.to_out_0", "attn2.to_out_0")


class OffsetKind(Protocol):
    """One parameterization of a kernel's weight change ``dW``.

    Attributes:
      leaves: the names of one kernel's offset arrays (e.g. ``("down", "up")``).
    """

    leaves: tuple[str, ...]

    def init(self, key: jax.Array, shape: tuple[int, ...], config: "OffsetConfig") -> dict[str, jax.Array]:
        """float32 arrays for a kernel of ``shape`` that give ``dW = 0``."""

    def delta(self, offset: dict[str, jax.Array], kernel: jax.Array) -> jax.Array:
        """``dW`` of one kernel: float32, ``kernel.shape``."""

    def l2(self, offset: dict[str, jax.Array], kernel: jax.Array | None) -> jax.Array:
        """``||dW||_F^2``, float32 scalar; ``kernel`` is None when the caller has no params."""


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LowRank:
    """``dW = down @ up``; ``up`` starts at zero."""

    leaves: tuple[str, ...] = ("down", "up")

    def init(self, key, shape, config):
        std = 1.0 / config.rank if config.init_scale is None else config.init_scale
        return {"down": std * jax.random.normal(key, (math.prod(shape[:-1]), config.rank), jnp.float32),
                "up": jnp.zeros((config.rank, shape[-1]), jnp.float32)}

    def delta(self, offset, kernel):
        return jnp.matmul(_f32(offset["down"]), _f32(offset["up"]),
                          precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)

    def l2(self, offset, kernel):
        """``||down @ up||^2`` as ``sum((down^T down) * (up up^T))``, without forming ``dW``."""
        down, up = _f32(offset["down"]), _f32(offset["up"])
        gram_down = jnp.matmul(down.T, down, precision=jax.lax.Precision.HIGHEST)
        gram_up = jnp.matmul(up, up.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(gram_down * gram_up)


@dataclasses.dataclass(frozen=True)
class Multiplicative:
    """``dW = W * scale``; its L2 is the change of the weights, so it needs the kernel."""

    leaves: tuple[str, ...] = ("scale",)

    def init(self, key, shape, config):
        return {"scale": jnp.zeros(shape, jnp.float32)}

    def delta(self, offset, kernel):
        return _f32(kernel) * _f32(offset["scale"])

    def l2(self, offset, kernel):
        if kernel is None:
            raise ValueError("offset_l2 of multiplicative offsets needs unet_params: the change is W * scale.")
        return jnp.sum(jnp.square(self.delta(offset, kernel)))


@dataclasses.dataclass(frozen=True)
class Dense:
    """``dW = delta``."""

    leaves: tuple[str, ...] = ("delta",)

    def init(self, key, shape, config):
        return {"delta": jnp.zeros(shape, jnp.float32)}

    def delta(self, offset, kernel):
        return _f32(offset["delta"])

    def l2(self, offset, kernel):
        return jnp.sum(jnp.square(_f32(offset["delta"])))


# Every parameterization by name; :func:`register` adds one.
KINDS: dict[str, OffsetKind] = {"lowrank": LowRank(), "multiplicative": Multiplicative(), "dense": Dense()}


def register(name: str, kind: OffsetKind) -> None:
    """Makes ``OffsetConfig(kind=name)`` (and concept files that name it) use ``kind``."""
    KINDS[name] = kind


@dataclasses.dataclass(frozen=True)
class OffsetConfig:
    """Which U-Net kernels get offsets, and how they are parameterized.

    Attributes:
      targets: module-path suffixes, dot-separated, of the projections to modify;
        ``"attn2.to_k"`` matches every ``.../attn2/to_k/kernel``. Defaults to q, k, v
        of self- and cross-attention; add ``OUTPUT_PROJECTIONS`` for ``to_out_0``.
        A longer suffix (``"mid_block.attentions_0.transformer_blocks_0.attn1.to_q"``)
        selects fewer kernels.
      kind: a name in :data:`KINDS` (see the module docstring). The paper's exact form
        could not be confirmed by this project; the low-rank additive default is a choice.
      rank: inner dimension ``r`` of the low-rank offsets. 4 is diffusers' LoRA
        default, not a number from the paper.
      init_scale: standard deviation of ``down`` at init (``up`` starts at zero, so
        ``dW = 0`` whatever it is); ``None`` means ``1 / rank`` as in diffusers' LoRA
        layers. Only used by ``"lowrank"``.
    """

    targets: tuple[str, ...] = SELF_ATTENTION_QKV + CROSS_ATTENTION_QKV
    kind: str = "lowrank"
    rank: int = 4
    init_scale: float | None = None

    def __post_init__(self):
        get_kind(self.kind)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}.")
        if not self.targets or any("" in t.split(".") for t in self.targets):
            raise ValueError(f"targets must be non-empty dotted module paths such as 'attn1.to_q', got {self.targets}.")


def get_kind(config_or_kind: OffsetConfig | str) -> OffsetKind:
    """The registered :class:`OffsetKind` of a config or a kind name."""
    name = config_or_kind.kind if isinstance(config_or_kind, OffsetConfig) else config_or_kind
    if name not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {name!r}.")
    return KINDS[name]


def select_paths(unet_params: PyTree, config: OffsetConfig) -> list[Path]:
    """Paths of the kernels that ``config`` modifies, sorted (independent of dict order).

    Args:
      unet_params: U-Net params (arrays or ``jax.ShapeDtypeStruct``), without the
        outer ``{"params": ...}`` collection.
      config: the targets to match.

    Returns:
      Flattened paths such as ``("mid_block", "attentions_0",
      "transformer_blocks_0", "attn2", "to_k", "kernel")``.

    Raises:
      ValueError: when a target matches no kernel (a typo, or the wrong tree).
    """
    patterns = [tuple(target.split(".")) for target in config.targets]
    paths, matched = [], set()
    for path in traverse_util.flatten_dict(unet_params):
        if path[-1] != "kernel":
            continue
        hits = [p for p in patterns if path[:-1][-len(p):] == p]
        if hits:
            paths.append(path)
            matched.update(hits)
    unmatched = [".".join(p) for p in patterns if p not in matched]
    if unmatched:
        raise ValueError(f"Offset targets {unmatched} match no kernel in the U-Net params.")
    return sorted(paths)


def init_offsets(rng: jax.Array, unet_params: PyTree, config: OffsetConfig) -> PyTree:
    """Offsets for every kernel that ``config`` selects, all giving ``dW = 0``.

    Args:
      rng: PRNG key (only ``"lowrank"`` draws from it).
      unet_params: U-Net params or their abstract shapes (``jax.eval_shape``).
      config: targets and parameterization.

    Returns:
      float32 pytree with the selected kernels' paths; per kernel of shape
      ``[..., Dout]`` (``Din`` = the product of the leading dims): lowrank
      ``{"down": [Din, r], "up": [r, Dout]}``, multiplicative ``{"scale": W.shape}``,
      dense ``{"delta": W.shape}``; a registered kind, what its ``init`` returns.
    """
    flat = traverse_util.flatten_dict(unet_params)
    paths = select_paths(unet_params, config)
    kind = get_kind(config)
    offsets = {}
    for key, path in zip(jax.random.split(rng, len(paths)), paths):
        for name, value in kind.init(key, tuple(flat[path].shape), config).items():
            offsets[path + (name,)] = value
    return traverse_util.unflatten_dict(offsets)


def _group_by_kernel(offsets: PyTree) -> dict[Path, dict[str, Any]]:
    leaves: dict[Path, dict[str, Any]] = {}
    for path, value in traverse_util.flatten_dict(offsets).items():
        leaves.setdefault(path[:-1], {})[path[-1]] = value
    return leaves


def offset_leaves(offsets: PyTree, config_or_kind: OffsetConfig | str) -> dict[Path, dict[str, Any]]:
    """Kernel path -> that kernel's offset dict (``{"down", "up"}``, ...), checked against the kind."""
    name = config_or_kind.kind if isinstance(config_or_kind, OffsetConfig) else config_or_kind
    expected = get_kind(config_or_kind).leaves
    leaves = _group_by_kernel(offsets)
    for path, leaf in leaves.items():
        if set(leaf) != set(expected):
            raise ValueError(f"The offset at {'/'.join(path)} has {sorted(leaf)}; a {name} offset has {list(expected)}.")
    return leaves


def delta(offset: dict[str, jax.Array], kernel: jax.Array, config_or_kind: OffsetConfig | str) -> jax.Array:
    """The weight change ``dW`` of one kernel: computed in float32, returned in ``kernel.dtype``."""
    return get_kind(config_or_kind).delta(offset, kernel).astype(kernel.dtype)


def apply_offsets(unet_params: PyTree, offsets: PyTree, config_or_kind: OffsetConfig | str) -> PyTree:
    """U-Net params with ``W + dW`` at every offset's kernel; pure and jit-able.

    Args:
      unet_params: U-Net params (no ``{"params": ...}`` wrapper); not modified.
      offsets: from :func:`init_offsets` (or trained).
      config_or_kind: an :class:`OffsetConfig` or its ``kind`` (static under jit).

    Returns:
      A new nested dict; kernels with offsets are new arrays of the kernel's dtype,
      every other leaf is the very same object as in ``unet_params``.
    """
    flat = traverse_util.flatten_dict(unet_params)
    for path, offset in offset_leaves(offsets, config_or_kind).items():
        if path not in flat:
            raise KeyError(f"The offsets modify {'/'.join(path)}, which the U-Net params do not have.")
        flat[path] = flat[path] + delta(offset, flat[path], config_or_kind)
    return traverse_util.unflatten_dict(flat)


def compose_offsets(unet_params: PyTree, domain: PyTree, deltas: Sequence[PyTree],
                    config_or_kind: OffsetConfig | str) -> PyTree:
    """U-Net params with several tunings of one set of domain offsets, the domain's change once.

    At every offset kernel ``W_dom + sum_i (W_i - W_dom)``, where
    ``W_dom = apply_offsets(W, domain)`` and ``W_i = apply_offsets(W, domain + deltas[i])``:
    exact in weight space for every kind (a kind's factors, such as lowrank's ``down``
    and ``up``, do not add). Computed as ``W_1 + sum_{i>1} (W_i - W_dom)``, the
    differences summed in float32, so that one delta gives exactly
    ``apply_offsets(W, domain + delta)`` and a zero delta after the first adds exactly
    nothing. Pure and jit-able.

    Args:
      unet_params: U-Net params (no ``{"params": ...}`` wrapper); not modified.
      domain: the offsets that every tuning started from.
      deltas: one or more changes of them (each with ``domain``'s structure and shapes).
      config_or_kind: as :func:`apply_offsets`.

    Returns:
      A new nested dict, as :func:`apply_offsets`.
    """
    if not deltas:
        raise ValueError("compose_offsets needs at least one delta.")
    tuned = [apply_offsets(unet_params, jax.tree.map(jnp.add, domain, d), config_or_kind) for d in deltas]
    if len(tuned) == 1:
        return tuned[0]
    first, *others = (traverse_util.flatten_dict(params) for params in tuned)
    base = traverse_util.flatten_dict(apply_offsets(unet_params, domain, config_or_kind))
    composed = dict(first)
    for path in offset_leaves(domain, config_or_kind):
        total = first[path].astype(jnp.float32)
        for flat in others:
            total = total + (flat[path].astype(jnp.float32) - base[path].astype(jnp.float32))
        composed[path] = total.astype(base[path].dtype)
    return traverse_util.unflatten_dict(composed)


def merge_offsets(unet_params: PyTree, offsets: PyTree, config_or_kind: OffsetConfig | str) -> PyTree:
    """:func:`apply_offsets` materialized on the host (numpy arrays), e.g. for
    :func:`e4t_jax.weights.save_safetensors` and export to diffusers."""
    return jax.device_get(apply_offsets(unet_params, offsets, config_or_kind))


def offset_l2(offsets: PyTree, config_or_kind: OffsetConfig | str, unet_params: PyTree | None = None) -> jax.Array:
    """Sum over the modified kernels of ``||dW||_F^2``, the actual weight change.

    Each kind computes its own (lowrank without forming ``dW``; multiplicative needs
    ``unet_params``, since its change is ``W * scale``).

    Returns:
      float32 scalar.
    """
    kind = get_kind(config_or_kind)
    flat = traverse_util.flatten_dict(unet_params) if unet_params is not None else {}
    total = jnp.zeros((), jnp.float32)
    for path, offset in offset_leaves(offsets, config_or_kind).items():
        total += kind.l2(offset, flat.get(path))
    return total


def count_params(tree: PyTree) -> int:
    """Number of scalars in a pytree of arrays or ``jax.ShapeDtypeStruct``."""
    return sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree))


def describe(offsets: PyTree) -> str:
    """One line: kind, number of kernels per target, rank and parameter count."""
    leaves = _group_by_kernel(offsets)
    if not leaves:
        return "no weight offsets"
    kinds = sorted({name for name, kind in KINDS.items() for leaf in leaves.values() if set(leaf) == set(kind.leaves)})
    per_target = Counter(".".join(path[-3:-1]) for path in leaves)
    targets = ", ".join(f"{target} x{n}" for target, n in sorted(per_target.items()))
    ranks = sorted({int(np.shape(leaf["up"])[0]) for leaf in leaves.values() if "up" in leaf})
    rank = f", rank {'/'.join(map(str, ranks))}" if ranks else ""
    return (f"{'/'.join(kinds) or 'unknown'} weight offsets on {len(leaves)} kernels ({targets}){rank}: "
            f"{count_params(offsets):,} parameters")
