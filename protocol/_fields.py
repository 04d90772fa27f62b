"""Limits and the attrs validators that enforce them on every message field."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar, cast

import attrs

__all__ = [
    "MAX_BODY_LENGTH",
    "MAX_GROUP_MEMBERS",
    "MAX_HISTORY_LIMIT",
    "MAX_ID_LENGTH",
    "MAX_TEXT_LENGTH",
    "MAX_TOKEN_LENGTH",
    "WIRE_NAMES",
    "ScalarCheck",
    "check_body",
    "check_bool",
    "check_id",
    "check_ids",
    "check_int",
    "check_optional_id",
    "check_optional_int",
    "check_optional_port",
    "check_optional_u32",
    "check_port",
    "check_positions",
    "check_positive_seconds",
    "check_str",
    "check_u32",
    "to_float",
    "to_id_tuple",
    "to_positions",
]

MAX_ID_LENGTH = 64
"""Longest user id, group name, device name or message id, in characters."""
MAX_TOKEN_LENGTH = 4096
"""Longest authentication token in Hello, in characters."""
MAX_BODY_LENGTH = 65536
"""Longest message body, in characters."""
MAX_GROUP_MEMBERS = 1000
"""Most members a group may list."""
MAX_HISTORY_LIMIT = 200
"""Most entries one history page may hold."""
MAX_TEXT_LENGTH = 1024
"""Longest human-readable text in Error and Goodbye, in characters."""

# Offsets, cursors, partitions and timestamps must fit a signed 64-bit integer,
# which is what Kafka and most languages' msgpack libraries use.
_INT64_END = 2**63
# Request ids and ping counters are unsigned 32-bit so any client can hold them.
_UINT32_END = 2**32

# Python attribute names differ from wire names only where the wire name is a
# Python keyword; error messages always use the wire name.
WIRE_NAMES = {"sender": "from", "peer": "with"}

_T = TypeVar("_T")
Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def _show(value: object) -> str:
    """Return a short repr of a bad value, so huge inputs cannot flood a message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(
    instance: object,
    attribute: attrs.Attribute[Any],
    value: object,
    expected: str,
    kind: type | tuple[type, ...],
) -> NoReturn:
    """Raise TypeError if value is not of the expected kind, else ValueError."""
    wire = WIRE_NAMES.get(attribute.name, attribute.name)
    message = (
        f"{type(instance).__name__} field {wire!r} must be {expected}, "
        f"got {_show(value)}"
    )
    # bool is an int subclass but never a valid int field on this protocol.
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is int):
        raise ValueError(message)
    raise TypeError(message)


@attrs.frozen
class ScalarCheck:
    """An attrs validator for a str or int field, readable by the fast decoder.

    The codec reads ``kind``, ``low``, ``high``, ``optional`` and ``is_id`` to
    test decoded values inline, without a call per field; attrs calls the
    instance when a message is built in Python. Both apply the same rule.
    """

    kind: type[str] | type[int]
    """str: length in low..high characters; int: low <= value < high."""
    low: int
    high: int
    optional: bool = False
    """Whether None is accepted."""
    is_id: bool = False
    """For str: also printable and without whitespace."""

    def accepts(self, value: object) -> bool:
        """Return whether value satisfies this check."""
        if value is None:
            return self.optional
        if self.kind is str:
            # isprintable() rejects every whitespace character but the plain space.
            return (
                type(value) is str
                and self.low <= len(value) <= self.high
                and not (self.is_id and (" " in value or not value.isprintable()))
            )
        return type(value) is int and self.low <= value < self.high

    def describe(self) -> str:
        """Return the rule in words, for error messages."""
        if self.is_id:
            text = f"an id of 1..{self.high} printable characters without whitespace"
        elif self.kind is str:
            text = f"a str of {self.low}..{self.high} characters"
        else:
            text = f"an int with {self.low} <= value < {self.high}"
        return text + " or nil" if self.optional else text

    def __call__(
        self, instance: object, attribute: attrs.Attribute[Any], value: object
    ) -> None:
        if not self.accepts(value):
            _fail(instance, attribute, value, self.describe(), self.kind)


def check_str(min_length: int, max_length: int) -> ScalarCheck:
    """Return a validator for a str of min_length..max_length characters."""
    return ScalarCheck(str, min_length, max_length)


def check_int(minimum: int = 0, end: int = _INT64_END) -> ScalarCheck:
    """Return a validator for an int with minimum <= value < end (never a bool)."""
    return ScalarCheck(int, minimum, end)


check_id = ScalarCheck(str, 1, MAX_ID_LENGTH, is_id=True)
check_optional_id = ScalarCheck(str, 1, MAX_ID_LENGTH, optional=True, is_id=True)
check_body = check_str(0, MAX_BODY_LENGTH)
check_u32 = check_int(0, _UINT32_END)
check_optional_u32 = ScalarCheck(int, 0, _UINT32_END, optional=True)
check_port = check_int(1, 65536)
check_optional_port = ScalarCheck(int, 1, 65536, optional=True)
check_optional_int = ScalarCheck(int, 0, _INT64_END, optional=True)


def check_bool(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if type(value) is not bool:
        _fail(instance, attribute, value, "a bool", bool)


def check_positive_seconds(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    # The chained comparison is False for NaN as well as for zero and infinity.
    if type(value) is float and 0.0 < value < math.inf:
        return
    _fail(instance, attribute, value, "a finite float number of seconds > 0", float)


def check_ids(max_count: int) -> Validator:
    """Return a validator for a tuple of at most max_count distinct ids."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if type(value) is not tuple or len(value) > max_count:
            _fail(
                instance, attribute, value, f"a list of at most {max_count} ids", tuple
            )
        for item in value:
            if not (
                type(item) is str
                and 0 < len(item) <= MAX_ID_LENGTH
                and item.isprintable()
                and " " not in item
            ):
                _fail(
                    instance,
                    attribute,
                    item,
                    "a list of ids of 1..64 printable characters without whitespace",
                    str,
                )
        if len(set(value)) != len(value):
            _fail(instance, attribute, value, "a list of ids without duplicates", tuple)

    return check


def check_positions(
    instance: object, attribute: attrs.Attribute[Any], value: object
) -> None:
    if type(value) is not tuple or not value:
        _fail(
            instance,
            attribute,
            value,
            "a non-empty list of [partition, offset] pairs",
            tuple,
        )
    for pair in value:
        if not (
            type(pair) is tuple
            and len(pair) == 2
            and type(pair[0]) is int
            and type(pair[1]) is int
            and 0 <= pair[0] < _INT64_END
            and 0 <= pair[1] < _INT64_END
        ):
            _fail(
                instance,
                attribute,
                pair,
                "a list of [partition, offset] pairs of ints >= 0",
                tuple,
            )


# Converters turn the lists a caller (or a list-producing decoder) may pass into
# the tuples that keep messages immutable and hashable. Anything else is passed
# through untouched so the validator can reject it with the field's name.


def to_id_tuple(value: Iterable[str]) -> tuple[str, ...]:
    if type(value) is list:
        return tuple(value)
    return cast("tuple[str, ...]", value)


def to_positions(
    value: Iterable[tuple[int, int] | list[int]],
) -> tuple[tuple[int, int], ...]:
    if type(value) is list or (
        type(value) is tuple and any(type(pair) is list for pair in value)
    ):
        pairs = (tuple(pair) if type(pair) is list else pair for pair in value)
        return cast("tuple[tuple[int, int], ...]", tuple(pairs))
    return cast("tuple[tuple[int, int], ...]", value)


def to_float(value: float) -> float:
    # A client written in another language may send a whole number of seconds as
    # a msgpack int; it means the same duration.
    if type(value) is int:
        return float(value)
    return value
