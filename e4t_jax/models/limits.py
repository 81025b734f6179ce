"""How big a model a config file may describe: checked before anything is allocated.

A component's ``config.json`` decides every parameter shape, so a damaged or hostile one
could ask for a terabyte. Before a weight is read, a config is refused when

* a field is not of its annotated type (:func:`e4t_jax.config.check_types`: a string
  where a number goes), or a size, width, count or channel number is below 1 or above
  :data:`MAX_SIZE` (:func:`check_config`);
* it stacks more than :data:`MAX_BLOCKS` resolution levels, or more than
  :data:`MAX_LAYERS` layers in one stack;
* one parameter tensor would hold more than :data:`MAX_TENSOR_ELEMENTS` elements, or the
  component more than :data:`MAX_PARAMS` parameters, counted on the abstract parameters
  of ``jax.eval_shape`` (shapes only, nothing allocated: :func:`abstract_params`).

Stable Diffusion's parts are far below: SD 2.x's U-Net holds 866M parameters, the
largest vision tower E4T reads (OpenCLIP ViT-bigG) 1.8B, their largest tensors tens
of millions of elements.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Collection

import jax

from e4t_jax import config as config_lib

MAX_SIZE = 2**20             # any width, channel count, vocabulary, position count or image side
MAX_BLOCKS = 8               # resolution levels of a U-Net or VAE
MAX_LAYERS = 256             # layers (or blocks) in one stack
MAX_TENSOR_ELEMENTS = 2**31  # elements in one parameter tensor (8 GiB in float32)
MAX_PARAMS = 2**33           # parameters in one component (32 GiB in float32)

# What jax.eval_shape raises for shapes no module can take (groups that do not divide, ...).
_BUILD_ERRORS = (ValueError, TypeError, OverflowError, ZeroDivisionError, IndexError)


def check_config(config: Any, where: str, *, counts: Collection[str] = (), levels: Collection[str] = (),
                 zero_ok: Collection[str] = ()) -> None:
    """Refuses a config dataclass whose fields do not fit their types or the limits.

    Args:
      config: a frozen config dataclass (``UNetConfig``, ``CLIPTextConfig``, ...).
      where: its name in messages (``"U-Net config"``).
      counts: fields that count layers: at most :data:`MAX_LAYERS` each.
      levels: tuple fields with one entry per resolution level: 1 to :data:`MAX_BLOCKS` entries.
      zero_ok: whole-number fields that may be 0 (a padding, a token id).

    Every other whole-number field (or tuple entry) must be in ``[1, MAX_SIZE]``.

    Raises:
      ValueError: naming the first field that does not fit.
    """
    config_lib.check_types(config, where)
    hints = typing.get_type_hints(type(config))
    for field in (f for f in dataclasses.fields(config) if _whole_numbers(hints[f.name])):
        value = getattr(config, field.name)
        low, high = (0 if field.name in zero_ok else 1), (MAX_LAYERS if field.name in counts else MAX_SIZE)
        for index, item in enumerate(value if isinstance(value, tuple) else (value,)):
            if isinstance(item, int) and not isinstance(item, bool) and not low <= item <= high:
                at = f"[{index}]" if isinstance(value, tuple) else ""
                raise ValueError(f"{where}.{field.name}{at} is {item}; it must be from {low} to {high}")
    for name in levels:
        if not 1 <= len(getattr(config, name)) <= MAX_BLOCKS:
            raise ValueError(f"{where}.{name} has {len(getattr(config, name))} entries; from 1 to {MAX_BLOCKS} "
                             "resolution levels are supported")


def _whole_numbers(kind: Any) -> bool:
    """Whether an annotation holds ``int`` (``int``, ``tuple[int, ...]``, ``int | tuple[int, int]``)."""
    return kind is int or any(_whole_numbers(arg) for arg in typing.get_args(kind))


def abstract_params(init: Callable, *inputs: Any, where: str) -> Any:
    """``jax.eval_shape(init, key, *inputs)["params"]``, refused over the tensor and total limits.

    Args:
      init: a module's ``init``; ``inputs``: its example inputs (``jax.ShapeDtypeStruct``,
        so that nothing is allocated).
      where: the model's name in messages.

    Returns:
      The params pytree of ``jax.ShapeDtypeStruct`` leaves.

    Raises:
      ValueError: the config builds no model, or one over :data:`MAX_TENSOR_ELEMENTS` /
        :data:`MAX_PARAMS`.
    """
    try:
        params = jax.eval_shape(init, jax.random.key(0), *inputs)["params"]
    except _BUILD_ERRORS as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{where} describes no model that can be built: {reason}") from error
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in leaves:
        if leaf.size > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"{where} asks for a {'x'.join(map(str, leaf.shape))} tensor "
                             f"({jax.tree_util.keystr(path, simple=True, separator='/')}), over the limit of "
                             f"{MAX_TENSOR_ELEMENTS} elements per tensor")
    total = sum(leaf.size for _, leaf in leaves)
    if total > MAX_PARAMS:
        raise ValueError(f"{where} asks for {total} parameters, over the limit of {MAX_PARAMS}")
    return params
