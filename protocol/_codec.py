"""Turning messages into msgpack map bodies and bodies back into messages."""

from __future__ import annotations

import threading
from collections.abc import Callable
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
    )


_BY_TAG = {tag: _layout(tag, cls) for tag, cls in MESSAGE_TYPES.items()}
_ENTRY = _layout(None, HistoryEntry)
_local = threading.local()


# The codec's hot paths are Python functions written out per class at import,
# from the same field table the validators come from: field names become
# constants and every check is spelled out, where a loop over the table would
# pay for a tuple unpacking and a branch per field on every frame.


def _run(source: str, namespace: dict[str, Any]) -> Any:
    """Return the function that source defines, compiled in namespace."""
    exec(compile(source, "<protocol codec>", "exec"), namespace)
    return namespace["function"]


def _map_pairs(layout: _Layout) -> list[tuple[str, str]]:
    """Return (wire name, Python expression of its value) for every wire key."""
    pairs = [(wire, f"values[{name!r}]") for wire, name in layout.items]
    if layout.tag is not None:
        pairs.insert(0, ("t", repr(layout.tag)))
    if layout.cls is HistoryPage:
        pairs = [
            (wire, "[entry_map(entry) for entry in values['messages']]")
            if wire == "messages"
            else (wire, value)
            for wire, value in pairs
        ]
    return pairs


def _branches(
    layout: _Layout, leaf: Callable[[list[tuple[str, str]], str], list[str]]
) -> list[str]:
    """Return one branch per way the optional fields can be None, each ending in
    leaf(the pairs on the wire, indent).

    Optional fields that are None are left out of the map to keep frames small;
    a map per way of leaving them out is cheaper than deleting keys from one.
    """
    pairs = _map_pairs(layout)
    names = dict(layout.items)

    def branch(left_out: frozenset[str], rest: list[str], indent: str) -> list[str]:
        if not rest:
            return leaf([pair for pair in pairs if pair[0] not in left_out], indent)
        return [
            f"{indent}if values[{names[rest[0]]!r}] is None:",
            *branch(left_out | {rest[0]}, rest[1:], indent + "    "),
            *branch(left_out, rest[1:], indent),
        ]

    return branch(frozenset(), list(layout.omit_if_none), "    ")


def _map_function(layout: _Layout, entry_map: Any) -> Callable[[Any], dict[str, Any]]:
    """Return a function giving the wire map of one message of layout's class."""

    def leaf(pairs: list[tuple[str, str]], indent: str) -> list[str]:
        display = ", ".join(f"{wire!r}: {value}" for wire, value in pairs)
        return [f"{indent}return {{{display}}}"]

    lines = ["def function(message):", "    values = message.__dict__"]
    source = "\n".join(lines + _branches(layout, leaf))
    return cast(
        "Callable[[Any], dict[str, Any]]", _run(source, {"entry_map": entry_map})
    )


_Encoder = Callable[[Any], bytes]


def _encoder_factory(
    layout: _Layout, entry_map: Any
) -> Callable[[Callable[[Any], bytes]], _Encoder]:
    """Return a function that, given a thread's pack, returns that thread's
    encoder of messages of layout's class to msgpack bodies.

    Each encoder owns a map per way of leaving optional fields out, built once
    with the wire keys in order: it stores the message's values into it and
    packs it, which is cheaper than building a map per message. Those maps are
    why an encoder belongs to one thread; between two messages, each keeps the
    values of the last one. Reading the values by name leaves the order of the
    instance dict free, which lets the decoder make the decoded map that dict.
    """
    maps: list[str] = []

    def leaf(pairs: list[tuple[str, str]], indent: str) -> list[str]:
        # The tag is a constant: it goes in when the map is made.
        name = f"map_{len(maps)}"
        display = ", ".join(
            f"{wire!r}: {value if wire == 't' else None}" for wire, value in pairs
        )
        maps.append(f"    {name} = {{{display}}}")
        return [
            *(
                f"{indent}{name}[{wire!r}] = {value}"
                for wire, value in pairs
                if wire != "t"
            ),
            f"{indent}return pack({name})",
        ]

    body = ["    def function(message):", "        values = message.__dict__"]
    body += ["    " + line for line in _branches(layout, leaf)]

    lines = ["def function(pack):", *maps, *body, "    return function"]
    return cast(
        "Callable[[Callable[[Any], bytes]], _Encoder]",
        _run("\n".join(lines), {"entry_map": entry_map}),
    )


def _accepts_source(local: str, check: ScalarCheck) -> str:
    """Return a Python expression true if local passes check (ScalarCheck.accepts)."""
    if check.kind is str:
        length = (
            f"len({local}) <= {check.high}"
            if check.low == 0
            else f"{check.low} <= len({local}) <= {check.high}"
        )
        test = f"type({local}) is str and {length}"
        if check.is_id:
            test += f" and ' ' not in {local} and {local}.isprintable()"
    else:
        test = f"type({local}) is int and {check.low} <= {local} < {check.high}"
    return f"({local} is None or ({test}))" if check.optional else test


def _fast_decoder(layout: _Layout) -> Callable[[dict[str, Any]], Any] | None:
    """Return a function building a message from a decoded map, or None.

    The function returns None instead of raising when anything is off: an
    unknown key, a missing field, a value its check refuses. The caller then
    takes the slow way through the class's own validators, which word the
    error. Classes with a converter or a validator other than ScalarCheck get
    no such function.
    """
    fields = attrs.fields(layout.cls)
    if any(field.converter for field in fields) or not all(
        type(field.validator) is ScalarCheck for field in fields
    ):
        return None

    # Every required field that passes its check was present, since None fails
    # the check of a required field; counting the optional ones present tells
    # whether the map holds any key besides the fields.
    required = sum(field.default is attrs.NOTHING for field in fields)
    optional = [
        f"({wire!r} in data)"
        for (wire, _), field in zip(layout.items, fields, strict=True)
        if field.default is not attrs.NOTHING
    ]
    tests = [f"len(data) == {' + '.join([str(required), *optional])}"]
    lines = ["def function(data):"]
    for (wire, name), field in zip(layout.items, fields, strict=True):
        if field.default is attrs.NOTHING:
            lines.append(f"    v_{name} = data.get({wire!r})")
        else:
            lines.append(f"    v_{name} = data.get({wire!r}, {field.default!r})")
        tests.append(_accepts_source(f"v_{name}", cast("ScalarCheck", field.validator)))

    # The decoded map becomes the instance dict once its keys are the attribute
    # names and it holds every field: the encoders read values by name, so the
    # order of its keys does not matter.
    lines.append(f"    if {' and '.join(tests)}:")
    for (wire, name), field in zip(layout.items, fields, strict=True):
        if wire != name:
            lines.append(f"        del data[{wire!r}]")
        if wire != name or field.default is not attrs.NOTHING:
            lines.append(f"        data[{name!r}] = v_{name}")
    lines += [
        "        message = new(cls)",
        "        set_dict(message, data)",
        "        return message",
        "    return None",
    ]
    # The class's own __dict__ descriptor sets the dict with one call less than
    # object.__setattr__, which frozen classes need to get past their own.
    namespace = {
        "cls": layout.cls,
        "new": object.__new__,
        "set_dict": layout.cls.__dict__["__dict__"].__set__,
    }
    return cast("Callable[[dict[str, Any]], Any]", _run("\n".join(lines), namespace))


_ENTRY_MAP = _map_function(_ENTRY, None)
_TO_MAP: dict[type[Any], Callable[[Any], dict[str, Any]]] = {
    layout.cls: _map_function(layout, _ENTRY_MAP) for layout in _BY_TAG.values()
}
_ENCODER_FACTORIES = {
    layout.cls: _encoder_factory(layout, _ENTRY_MAP) for layout in _BY_TAG.values()
}


def _thread_encoders() -> dict[type[Any], _Encoder]:
    """Return this thread's encoders, made on its first call."""
    try:
        encoders: dict[type[Any], _Encoder] = _local.encoders
    except AttributeError:
        # A Packer per thread is reused; it is cheaper than msgpack.packb's
        # fresh one, and it keeps a buffer that only one thread may use.
        pack = msgpack.Packer().pack
        encoders = _local.encoders = {
            cls: factory(pack) for cls, factory in _ENCODER_FACTORIES.items()
        }
    return encoders


_FAST_DECODERS = {
    tag: decoder
    for tag, layout in _BY_TAG.items()
    if (decoder := _fast_decoder(layout)) is not None
}


def message_to_map(message: Message) -> dict[str, Any]:
    """Return the wire map of a message: "t" first, then fields in table order."""
    to_map = _TO_MAP.get(type(message))
    if to_map is None:
        raise TypeError(f"expected a protocol message, got {message!r}")
    return to_map(message)


def encode_message(message: Message) -> bytes:
    """Return the msgpack body of a message, without the frame's length prefix."""
    encode = _thread_encoders().get(type(message))
    if encode is None:
        raise TypeError(f"expected a protocol message, got {message!r}")
    return encode(message)


def _known_fields(layout: _Layout, data: dict[Any, Any]) -> dict[str, Any]:
    # The rare path: the map has keys this version does not know. They are
    # ignored for forward compatibility, but a key that is not a str is malformed.
    for key in data:
        if type(key) is not str:
            raise RemoteProtocolError(
                f"message map keys must be str, got {key!r}", code=ErrorCode.BAD_FRAME
            )
    return {key: value for key, value in data.items() if key in layout.known}


def _build(layout: _Layout, data: dict[Any, Any], where: str) -> Any:
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

    # Any tag without a fast decoder, even an unhashable one, fails the lookup
    # and is judged below.
    tag = data.pop("t", None)
    try:
        message: Message | None = _FAST_DECODERS[tag](data)
    except (KeyError, TypeError):
        message = None
    if message is not None:
        return message

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
    built: Message = _build(layout, data, tag)
    return built
