"""Config trees as frozen dataclasses, to and from JSON-able dicts with strict checks.

Every config in the project (model, encoder, offsets, loss, training) is a frozen
dataclass whose fields are plain values (``int``, ``float``, ``str``, ``bool``,
``None`` unions, ``tuple[...]``) or other such dataclasses. :func:`to_dict` writes one
into checkpoints, encoder folders and concept headers; :func:`from_dict` reads it back
and refuses what does not fit (an unknown field, a wrong type), naming the field, so a
file from a stranger or from another version fails with one clear line.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A dataclass tree -> nested dicts and lists (JSON-able)."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        return value
    return plain(config)


def _convert(value: Any, kind: Any, where: str) -> Any:
    """``value`` as an instance of the annotation ``kind``, or a ValueError naming ``where``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, where)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {kind}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            raise ValueError(f"{where} must have {len(items)} items, got {len(value)}")
        return tuple(_convert(v, k, f"{where}[{i}]") for i, (v, k) in enumerate(zip(value, items)))
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where} must be {kind.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], values: Any, where: str | None = None) -> T:
    """Builds ``cls`` from :func:`to_dict` output; missing fields take their defaults.

    Raises:
      ValueError: ``values`` is not a dict, holds an unknown field, or a field of the
        wrong type (the message names the field's dotted path).
    """
    where = where or cls.__name__
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a JSON object, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; known: {sorted(names)}")
    kwargs = {name: _convert(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:  # a required field is missing
        raise ValueError(f"{where}: {error}") from error


def check_types(config: Any, where: str | None = None) -> None:
    """Refuses a dataclass whose field values do not fit their annotations, as :func:`from_dict`
    would (for configs built by their own constructors, e.g. from a model's ``config.json``).

    Raises:
      ValueError: naming the first field that does not fit.
    """
    where = where or type(config).__name__
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        _convert(getattr(config, field.name), hints[field.name], f"{where}.{field.name}")


def differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two :func:`to_dict` trees differ, e.g. ``["train.optimizer.lr"]``."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [path for key in sorted(set(saved) | set(current))
                for path in differences(saved.get(key), current.get(key), f"{prefix}{key}.")]
    return [] if saved == current else [prefix.rstrip(".")]
