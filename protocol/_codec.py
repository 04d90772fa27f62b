"""Turning messages into msgpack map bodies and bodies back into messages."""

from __future__ import annotations

import threading
from typing import Any, cast

import attrs
import msgpack

from ._errors import ErrorCode, RemoteProtocolError
from ._fields import MAX_BODY_LENGTH, WIRE_NAMES, ScalarCheck
from ._messages import MESSAGE_TYPES, HistoryEntry, HistoryPage, Message

__all__ = ["decode_message", "encode_message", "message_to_map"]

# Bounds handed to msgpack so a small hostile body cannot make the decoder build
# huge containers (docs/protocol.md, "Msgpack rules"). No valid string is longer
# than a maximal body in 4-byte UTF-8; no valid list or map comes near the rest.
# The bin and ext families are not part of the protocol, so their limit is 0:
# that also keeps bytes keys, which compare unequal but hash alike to str keys,
# out of every map.
_MAX_STR_BYTES = 4 * MAX_BODY_LENGTH
_MAX_ARRAY_LENGTH = 65536
_MAX_MAP_LENGTH = 4096

_unpackb = msgpack.unpackb


# (wire name, attribute name, default, is str, low, high, optional, is id): a
# ScalarCheck spread flat, so the decoder's loop reads locals, not attributes.
_Step = tuple[str, str, Any, bool, int, int, bool, bool]


@attrs.frozen(kw_only=True)
class _Layout:
    """Everything the codec needs about one class, worked out once at import."""

    tag: str | None
    cls: type[Any]
    items: tuple[tuple[str, str], ...]
    """(wire name, attribute name) of every field, in wire order."""
    renamed: bool
    """Whether some wire name differs from its attribute name."""
    omit_if_none: tuple[str, ...]
    known: frozenset[str]
    required: tuple[str, ...]
    required_set: frozenset[str]
    plan: tuple[_Step, ...] | None
    """One step per field, if every field has a ScalarCheck and no converter, so
    decoded values can be checked inline."""


def _layout(tag: str | None, cls: type[Any]) -> _Layout:
    fields = attrs.fields(cls)
    items = tuple(
        (WIRE_NAMES.get(field.name, field.name), field.name) for field in fields
    )
    required = tuple(
        wire
        for (wire, _), field in zip(items, fields, strict=True)
        if field.default is attrs.NOTHING
    )

    plan: tuple[_Step, ...] | None = None
    checks = [field.validator for field in fields]
    if all(type(check) is ScalarCheck for check in checks) and not any(
        field.converter for field in fields
    ):
        plan = tuple(
            (
                wire,
                name,
                field.default,
                check.kind is str,
                check.low,
                check.high,
                check.optional,
                check.is_id,
            )
            for (wire, name), field, check in zip(
                items, fields, cast("list[ScalarCheck]", checks), strict=True
            )
        )

    return _Layout(
        tag=tag,
        cls=cls,
        items=items,
        renamed=any(wire != name for wire, name in items),
        omit_if_none=tuple(
            wire
            for (wire, _), field in zip(items, fields, strict=True)
            if field.default is None
        ),
        known=frozenset(wire for wire, _ in items),
        required=required,
        required_set=frozenset(required),
        plan=plan,
    )


_BY_TAG = {tag: _layout(tag, cls) for tag, cls in MESSAGE_TYPES.items()}
_BY_CLASS: dict[type[Any], _Layout] = {
    layout.cls: layout for layout in _BY_TAG.values()
}
_ENTRY = _layout(None, HistoryEntry)
_new = object.__new__
_set = object.__setattr__
_local = threading.local()


def _fields_map(layout: _Layout, message: Any, out: dict[str, Any]) -> dict[str, Any]:
    # The instance dict holds the fields in declaration order, which is the wire
    # order, because only attrs' __init__ and _build below ever create it.
    if layout.renamed:
        values = message.__dict__
        for wire, name in layout.items:
            out[wire] = values[name]
    else:
        out.update(message.__dict__)

    # Optional fields that are None are left out to keep frames small.
    for wire in layout.omit_if_none:
        if out[wire] is None:
            del out[wire]
    return out


def message_to_map(message: Message) -> dict[str, Any]:
    """Return the wire map of a message: "t" first, then fields in table order."""
    layout = _BY_CLASS.get(type(message))
    if layout is None:
        raise TypeError(f"expected a protocol message, got {message!r}")

    out = _fields_map(layout, message, {"t": layout.tag})
    if layout.cls is HistoryPage:
        out["messages"] = [_fields_map(_ENTRY, entry, {}) for entry in out["messages"]]
    return out


def encode_message(message: Message) -> bytes:
    """Return the msgpack body of a message, without the frame's length prefix."""
    # A Packer per thread is reused; it is cheaper than msgpack.packb's fresh one.
    try:
        pack = _local.pack
    except AttributeError:
        pack = _local.pack = msgpack.Packer().pack

    # The common case inline: a message was validated when it was built, so
    # its map is its instance dict behind the tag, less the None optionals.
    # This is message_to_map without its two calls; the bytes are the same.
    layout = _BY_CLASS.get(type(message))
    if layout is None or layout.renamed or layout.cls is HistoryPage:
        body: bytes = pack(message_to_map(message))
        return body
    out = {"t": layout.tag, **message.__dict__}
    for wire in layout.omit_if_none:
        if out[wire] is None:
            del out[wire]
    body = pack(out)
    return body


def _known_fields(layout: _Layout, data: dict[Any, Any]) -> dict[str, Any]:
    # The rare path: the map has keys this version does not know. They are
    # ignored for forward compatibility, but a key that is not a str is malformed.
    for key in data:
        if type(key) is not str:
            raise RemoteProtocolError(
                f"message map keys must be str, got {key!r}", code=ErrorCode.BAD_FRAME
            )
    return {key: value for key, value in data.items() if key in layout.known}


def _fast_build(layout: _Layout, plan: tuple[_Step, ...], data: dict[str, Any]) -> Any:
    """Return the message if every field passes its check inline, else None.

    The checks are exactly ScalarCheck.accepts; anything they refuse goes the
    slow way through the class's own validators, which word the error.
    """
    fields = {}
    for wire, name, default, is_str, low, high, optional, is_id in plan:
        value = data.get(wire, default)
        if value is None:
            if not optional:
                return None
        elif is_str:
            if (
                type(value) is not str
                or not low <= len(value) <= high
                or (is_id and (" " in value or not value.isprintable()))
            ):
                return None
        elif type(value) is not int or not low <= value < high:
            return None
        fields[name] = value

    message = _new(layout.cls)
    _set(message, "__dict__", fields)
    return message


def _build(layout: _Layout, data: dict[Any, Any], where: str) -> Any:
    plan = layout.plan
    if plan is not None and data.keys() <= layout.known:
        message = _fast_build(layout, plan, data)
        if message is not None:
            return message

    if not data.keys() <= layout.known:
        data = _known_fields(layout, data)
    if not layout.required_set <= data.keys():
        missing = next(wire for wire in layout.required if wire not in data)
        raise RemoteProtocolError(
            f"{where} is missing required field {missing!r}", code=ErrorCode.BAD_MESSAGE
        )
    if layout.renamed:
        for wire, name in layout.items:
            if wire != name and wire in data:
                data[name] = data.pop(wire)

    try:
        return layout.cls(**data)
    except (TypeError, ValueError) as exc:
        raise RemoteProtocolError(
            f"{where}: {exc}", code=ErrorCode.BAD_MESSAGE
        ) from None


def _decode_entries(value: object) -> object:
    # Entries that are not maps are handed on untouched so HistoryPage's own
    # validator rejects them with the field's name.
    if type(value) is not tuple:
        return value
    return tuple(
        _build(_ENTRY, entry, f"history_page field 'messages' entry {index}")
        if type(entry) is dict
        else entry
        for index, entry in enumerate(value)
    )


def decode_message(body: bytes) -> Message:
    """Return the message encoded in one frame body.

    Raises RemoteProtocolError: BAD_FRAME if the body is not a single msgpack map
    with str keys, UNKNOWN_TYPE for an unknown "t", BAD_MESSAGE (naming the field)
    for a missing, mistyped or out-of-range field.
    """
    try:
        data = _unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=False,
            max_str_len=_MAX_STR_BYTES,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=_MAX_ARRAY_LENGTH,
            max_map_len=_MAX_MAP_LENGTH,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(
            f"frame body of {len(body)} bytes is not one msgpack object: {exc}",
            code=ErrorCode.BAD_FRAME,
        ) from None
    if type(data) is not dict:
        raise RemoteProtocolError(
            f"frame body must be a msgpack map, got {type(data).__name__}",
            code=ErrorCode.BAD_FRAME,
        )

    tag = data.pop("t", None)
    layout = _BY_TAG.get(tag) if type(tag) is str else None
    if layout is None:
        if type(tag) is str:
            raise RemoteProtocolError(
                f"unknown message type {tag[:80]!r}", code=ErrorCode.UNKNOWN_TYPE
            )
        raise RemoteProtocolError(
            f"message field 't' must be a str type tag, got {tag!r}"[:200],
            code=ErrorCode.BAD_MESSAGE,
        )

    if layout.cls is HistoryPage and "messages" in data:
        data["messages"] = _decode_entries(data["messages"])
    message: Message = _build(layout, data, tag)
    return message
