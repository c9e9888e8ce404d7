"""Parameter blocks of ``conf/*/parameters_*.yml`` as typed, frozen dataclasses: one rule for all.

Every block (``ingest``, ``preprocess``, ``model``, ``fit``, ``evaluate``, ``register``,
``sample_data``) is a frozen dataclass deriving from :class:`ConfigBlock` and is built by the one
builder here, :func:`build` (``Block.from_params(mapping)``):

- nested blocks are built recursively from the field's type (``fit.loop.augment`` ...);
- lists become tuples where the field is a tuple, ``None`` stays ``None`` for optional fields;
- a key the dataclass does not know is a typo or a setting from another version: it fails with
  the unknown keys, the block's place and the known keys (``fit.loop.epcohs: 5`` must not train
  the default number of epochs);
- a value of the wrong kind for its field (a string where a number goes, a number where a list
  or a mapping goes) fails with its place (``model.depth must be a whole number, got 'abc'``),
  and one that a block's own checks cannot handle fails as ``ValueError`` naming the block.

The YAML is where defaults live for users; the dataclass defaults equal it (tests/core/
test_parameters.py holds them to the YAML), so code that builds a block without the catalog
gets the same values as a ``kedro run``.
"""

from __future__ import annotations

import dataclasses
import numbers
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar, Union

T = TypeVar("T", bound="ConfigBlock")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


class ConfigBlock:
    """Mixin of every parameter dataclass: ``from_params`` (the builder) and ``to_dict``."""

    #: Where the block sits in the parameters, for error messages (``fit.loop``).
    WHERE: ClassVar[str] = ""

    @classmethod
    def from_params(cls: type[T], params: Mapping[str, Any] | None = None, where: str | None = None) -> T:
        return build(cls, params, where or cls.WHERE or cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict that ``from_params`` turns back into an equal block."""
        return _plain(self)


def build(cls: type[T], params: Mapping[str, Any] | None, where: str) -> T:
    """``cls(**params)`` with nested blocks and tuples built from the field types; unknown
    keys raise ``ValueError`` naming them, ``where`` and the known keys."""
    if isinstance(params, cls):
        return params
    if params is not None and not isinstance(params, Mapping):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(params).__name__}")
    values = dict(params or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, AttributeError, KeyError) as exc:  # a check of the block met a value of a shape it
        raise ValueError(f"{where}: a value of the wrong kind ({exc})") from exc  # cannot handle


#: What a value of a plain field must be (YAML and ``--params`` give these types; numpy numbers pass).
_KINDS: dict[Any, tuple[tuple[type, ...], str]] = {
    int: ((numbers.Integral,), "a whole number"),
    float: ((numbers.Real,), "a number"),
    str: ((str,), "a string"),
    bool: ((bool,), "true or false"),
}


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is str and isinstance(value, numbers.Number) and not isinstance(value, bool):
        return str(value)  # `--params fit.run_name=2026` (YAML reads a number): the name "2026"
    if hint in _KINDS:  # `--params model.depth=abc` failed in a check as "'<' not supported ..."
        kinds, kind = _KINDS[hint]
        if not isinstance(value, kinds) or (hint is not bool and isinstance(value, bool)):
            raise ValueError(f"{where} must be {kind}, got {value!r}")
    if origin in (dict, Mapping) or origin is typing.get_origin(Mapping[str, Any]):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping (name: value, ...), got {value!r}")
    if origin is tuple and not isinstance(value, list | tuple) and typing.get_args(hint)[-1:] == (Ellipsis,):
        raise ValueError(f"{where} must be a list ([a, b, ...]), got {value!r}")
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        for option in options:  # the first option the value's shape fits
            if _fits(option, value):
                return _coerce(option, value, where)
        return value
    if isinstance(hint, type) and issubclass(hint, ConfigBlock):
        return build(hint, value, where)
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if args and len(args) != len(value):
            raise ValueError(f"{where} needs {len(args)} values, got {list(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=False)) if args else tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _fits(option: Any, value: Any) -> bool:
    origin = typing.get_origin(option) or option
    if isinstance(origin, type) and issubclass(origin, ConfigBlock):
        return isinstance(value, Mapping | origin)
    if origin is tuple:
        return isinstance(value, list | tuple)
    if origin in (dict, Mapping) or origin is typing.get_origin(Mapping[str, Any]):
        return isinstance(value, Mapping)
    if option is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, origin) if isinstance(origin, type) else True
