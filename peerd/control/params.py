"""Parameter checks for the control methods' handlers (`require`, `optional`, `only`) and the
types of what the wire carries. Server side: the clients need none of it (and the CLI, which
loads `peerd.control.wire`, must not pay for `typing`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeVar, overload

from peerd.control.wire import InvalidParams

JSONValue = Any  # what json.loads returns / json.dumps accepts; checked at the edges
Params = dict[str, Any]

T = TypeVar("T")


def _type_ok(value: object, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)


_JSON_TYPE_NAMES: Final = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
    dict: "an object",
}


def require(params: Mapping[str, Any], name: str, kind: type[T]) -> T:
    """The parameter `name`, which must be present, non-null and of type `kind`."""
    if name not in params or params[name] is None:
        raise InvalidParams(f"missing parameter {name!r}")
    value = params[name]
    if not _type_ok(value, kind):
        raise InvalidParams(
            f"parameter {name!r} must be {_JSON_TYPE_NAMES.get(kind, kind.__name__)}"
        )
    if kind is float:
        value = float(value)
    return value  # type: ignore[no-any-return]


@overload
def optional(params: Mapping[str, Any], name: str, kind: type[T]) -> T | None: ...
@overload
def optional(params: Mapping[str, Any], name: str, kind: type[T], default: T) -> T: ...
def optional(
    params: Mapping[str, Any], name: str, kind: type[T], default: T | None = None
) -> T | None:
    """The parameter `name` if present and non-null (checked like `require`), else `default`."""
    if params.get(name) is None:
        return default
    return require(params, name, kind)


def only(params: Mapping[str, Any], *names: str) -> None:
    """Refuse parameters other than `names`, so a typo is an error rather than ignored."""
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise InvalidParams(f"unknown parameter(s): {', '.join(map(repr, unknown))}")


__all__ = ["JSONValue", "Params", "only", "optional", "require"]
