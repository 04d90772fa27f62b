"""Message classes and the map codec: round trips, golden vectors, validation."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_strategies import BY_CLASS, messages

import protocol
from protocol._codec import message_to_map

VECTORS = json.loads(
    (pathlib.Path(__file__).parent / "vectors" / "protocol-v1.json").read_text()
)
_ATTRIBUTE_NAMES = {"from": "sender", "with": "peer"}
_WIRE_NAMES = {value: key for key, value in _ATTRIBUTE_NAMES.items()}


def _kwargs(wire_map: dict[str, Any]) -> dict[str, Any]:
    return {
        _ATTRIBUTE_NAMES.get(key, key): value
        for key, value in wire_map.items()
        if key != "t"
    }


def message_from_json(wire_map: dict[str, Any]) -> protocol.Message:
    """Build the expected message from a vector's map without using the decoder."""
    kwargs = _kwargs(wire_map)
    if wire_map["t"] == "history_page" and isinstance(kwargs["messages"], list):
        kwargs["messages"] = [
            protocol.HistoryEntry(**_kwargs(entry))
            if isinstance(entry, dict)
            else entry
            for entry in kwargs["messages"]
        ]
    if wire_map["t"] == "send_ack" and isinstance(kwargs["positions"], list):
        kwargs["positions"] = [tuple(pair) for pair in kwargs["positions"]]
    cls: Any = protocol.MESSAGE_TYPES[wire_map["t"]]
    message: protocol.Message = cls(**kwargs)
    return message


def body(wire_map: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(wire_map)
    return packed


def bad_message(wire_map: dict[str, Any]) -> protocol.RemoteProtocolError:
    with pytest.raises(protocol.RemoteProtocolError) as info:
        protocol.decode_message(body(wire_map))
    return info.value


class TestRoundTrip:
    def test_strategies_cover_every_message_type(self) -> None:
        assert set(BY_CLASS) == set(protocol.MESSAGE_TYPES.values())

    @given(messages)
    def test_every_message_survives_encode_and_decode(
        self, message: protocol.Message
    ) -> None:
        assert protocol.decode_message(protocol.encode_message(message)) == message

    @given(messages)
    def test_wire_map_has_t_first_then_fields_in_table_order(
        self, message: protocol.Message
    ) -> None:
        wire_map = msgpack.unpackb(protocol.encode_message(message))
        declared = [
            _WIRE_NAMES.get(field.name, field.name)
            for field in attrs.fields(type(message))
        ]
        keys = list(wire_map)

        assert keys[0] == "t"
        assert protocol.MESSAGE_TYPES[wire_map["t"]] is type(message)
        assert keys[1:] == [name for name in declared if name in wire_map]

    @given(messages)
    def test_optional_fields_that_are_none_are_left_out(
        self, message: protocol.Message
    ) -> None:
        wire_map = msgpack.unpackb(protocol.encode_message(message))
        assert None not in wire_map.values()

    @given(BY_CLASS[protocol.Deliver])
    def test_decoded_message_encodes_to_the_same_bytes(
        self, message: protocol.Deliver
    ) -> None:
        encoded = protocol.encode_message(message)
        assert protocol.encode_message(protocol.decode_message(encoded)) == encoded


class TestGoldenVectors:
    def test_vectors_cover_every_message_type(self) -> None:
        assert {vector["message"]["t"] for vector in VECTORS} == set(
            protocol.MESSAGE_TYPES
        )

    @pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
    def test_frame_decodes_to_the_vector_message(self, vector: dict[str, Any]) -> None:
        frame = bytes.fromhex(vector["hex"])
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4

        assert msgpack.unpackb(frame[4:]) == vector["message"]
        assert protocol.decode_message(frame[4:]) == message_from_json(
            vector["message"]
        )

    @pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
    def test_message_encodes_to_the_exact_vector_bytes(
        self, vector: dict[str, Any]
    ) -> None:
        message = message_from_json(vector["message"])
        assert protocol.encode_frame(message).hex() == vector["hex"]


def _valid_maps() -> list[dict[str, Any]]:
    return [vector["message"] for vector in VECTORS]


# A value no field of protocol v1 accepts, of each shape.
_BAD_VALUES = [{"nested": 1}, -1, 2**63, 1.5, "", "x" * 70_000, [1, 2]]


class TestValidation:
    @pytest.mark.parametrize(
        ("wire_map", "field"),
        [
            (wire_map, field)
            for wire_map in _valid_maps()
            for field in wire_map
            if field != "t"
        ],
    )
    def test_every_bad_field_value_is_refused_naming_the_field(
        self, wire_map: dict[str, Any], field: str
    ) -> None:
        refused = 0
        for bad in _BAD_VALUES:
            changed = {**wire_map, field: bad}
            try:
                message_from_json(changed)
            except (TypeError, ValueError):
                pass
            else:
                continue  # this value happens to be valid here ("" for a body)

            error = bad_message(changed)

            assert error.code is protocol.ErrorCode.BAD_MESSAGE
            assert repr(field) in str(error), (bad, str(error))
            refused += 1
        assert refused >= 3

    @pytest.mark.parametrize(
        ("wire_map", "field"),
        [
            (wire_map, field)
            for wire_map in _valid_maps()
            for field in wire_map
            if field != "t"
        ],
    )
    def test_constructing_with_a_bad_value_names_the_field(
        self, wire_map: dict[str, Any], field: str
    ) -> None:
        message = message_from_json(wire_map)
        kwargs = {
            field.name: getattr(message, field.name)
            for field in attrs.fields(type(message))
        }
        kwargs[_ATTRIBUTE_NAMES.get(field, field)] = {"nested": 1}

        with pytest.raises((TypeError, ValueError), match=repr(field)):
            type(message)(**kwargs)

    @pytest.mark.parametrize("cls", list(protocol.MESSAGE_TYPES.values()))
    def test_missing_required_field_is_named(self, cls: type[Any]) -> None:
        tag = next(tag for tag, known in protocol.MESSAGE_TYPES.items() if known is cls)
        for field in attrs.fields(cls):
            if field.default is not attrs.NOTHING:
                continue
            wire = _WIRE_NAMES.get(field.name, field.name)
            wire_map = next(m for m in _valid_maps() if m["t"] == tag)

            error = bad_message({k: v for k, v in wire_map.items() if k != wire})

            assert error.code is protocol.ErrorCode.BAD_MESSAGE
            assert f"missing required field {wire!r}" in str(error)

    def test_nil_is_accepted_for_optional_fields_only(self) -> None:
        deliver = {
            "t": "deliver",
            "id": "m",
            "from": "a",
            "to": None,
            "group": "g",
            "body": "",
            "ts": 0,
            "partition": 0,
            "offset": 0,
        }
        assert protocol.decode_message(body(deliver)) == protocol.Deliver(
            id="m", sender="a", group="g", body="", ts=0, partition=0, offset=0
        )
        assert "'from'" in str(bad_message({**deliver, "from": None}))

    @pytest.mark.parametrize(
        "char", [c for c in map(chr, range(0x3100)) if c.isspace()] + ["\x00", "\u200b"]
    )
    def test_ids_with_whitespace_or_unprintable_characters_are_refused(
        self, char: str
    ) -> None:
        with pytest.raises(ValueError, match="'to'"):
            protocol.Send(id="m", to=f"bob{char}", body="")
        assert "'to'" in str(
            bad_message({"t": "send", "id": "m", "to": f"b{char}", "body": ""})
        )

    def test_bool_is_not_an_int_and_int_is_not_a_bool(self) -> None:
        assert "'n'" in str(bad_message({"t": "ping", "n": True}))
        assert "'fatal'" in str(bad_message({"t": "error", "code": "x", "fatal": 1}))
        with pytest.raises(TypeError, match="'n'"):
            protocol.Ping(n=True)

    def test_ids_are_limited_to_64_characters(self) -> None:
        assert protocol.Send(id="m" * 64, to="b", body="").id == "m" * 64
        with pytest.raises(ValueError, match="'id'"):
            protocol.Send(id="m" * 65, to="b", body="")

    def test_history_request_needs_exactly_one_conversation(self) -> None:
        with pytest.raises(ValueError, match="exactly one"):
            protocol.HistoryRequest(rid=1)
        with pytest.raises(ValueError, match="exactly one"):
            protocol.HistoryRequest(rid=1, peer="bob", group="g")
        error = bad_message({"t": "history", "rid": 1, "with": "bob", "group": "g"})
        assert error.code is protocol.ErrorCode.BAD_MESSAGE

    def test_history_limit_defaults_to_50_and_is_capped(self) -> None:
        assert protocol.HistoryRequest(rid=1, peer="bob").limit == 50
        with pytest.raises(ValueError, match="'limit'"):
            protocol.HistoryRequest(
                rid=1, peer="bob", limit=protocol.MAX_HISTORY_LIMIT + 1
            )

    def test_group_members_must_be_distinct_and_few_enough(self) -> None:
        with pytest.raises(ValueError, match="duplicates"):
            protocol.GroupCreate(rid=1, group="g", members=["a", "a"])
        too_many = [f"u{n}" for n in range(protocol.MAX_GROUP_MEMBERS + 1)]
        with pytest.raises(ValueError, match="'members'"):
            protocol.GroupCreate(rid=1, group="g", members=too_many)

    def test_lists_given_by_the_caller_are_stored_as_tuples(self) -> None:
        ack = protocol.SendAck(id="m", ts=1, positions=[[1, 2], [3, 4]])
        assert ack.positions == ((1, 2), (3, 4))
        assert protocol.GroupInfo(rid=1, group="g", members=["a"]).members == ("a",)

    def test_send_ack_needs_at_least_one_position(self) -> None:
        with pytest.raises(ValueError, match="'positions'"):
            protocol.SendAck(id="m", ts=1, positions=())

    def test_idle_timeout_must_be_positive_and_accepts_a_whole_number(self) -> None:
        welcome = {
            "t": "welcome",
            "version": 1,
            "user": "a",
            "session": "s",
            "server": "s0",
            "partition": 0,
            "cursor": 0,
            "max_frame": 1024,
            "idle_timeout": 30,
        }
        assert protocol.decode_message(body(welcome)).idle_timeout == 30.0  # type: ignore[union-attr]
        for bad in (0, -1.0, float("nan"), float("inf")):
            assert "'idle_timeout'" in str(
                bad_message({**welcome, "idle_timeout": bad})
            )

    def test_error_codes_known_become_enum_members_unknown_stay_str(self) -> None:
        known = protocol.decode_message(
            body({"t": "error", "code": "forbidden", "fatal": False})
        )
        unknown = protocol.decode_message(
            body({"t": "error", "code": "brand_new", "fatal": True})
        )
        assert known.code is protocol.ErrorCode.FORBIDDEN  # type: ignore[union-attr]
        assert unknown.code == "brand_new"  # type: ignore[union-attr]
        assert type(unknown.code) is str  # type: ignore[union-attr]

    def test_history_entry_errors_name_the_entry_and_field(self) -> None:
        page = {
            "t": "history_page",
            "rid": 1,
            "messages": [{"id": "m", "from": "a b", "body": "", "ts": 0, "seq": 0}],
        }
        error = bad_message(page)
        assert "entry 0" in str(error)
        assert "'from'" in str(error)

    def test_bad_value_in_an_error_message_is_shortened(self) -> None:
        error = bad_message({"t": "send", "id": "m", "to": "x" * 10_000, "body": ""})
        assert len(str(error)) < 300


class TestMapShape:
    def test_unknown_keys_are_ignored(self) -> None:
        wire_map = {"t": "ping", "n": 3, "future": [1, {"x": None}]}
        assert protocol.decode_message(body(wire_map)) == protocol.Ping(n=3)

    def test_unknown_type_tag_is_refused_as_unknown_type(self) -> None:
        error = bad_message({"t": "teleport", "to": "mars"})
        assert error.code is protocol.ErrorCode.UNKNOWN_TYPE
        assert "'teleport'" in str(error)

    @pytest.mark.parametrize("tag", [None, 5, ["ping"]])
    def test_missing_or_non_str_type_tag_is_a_bad_message(self, tag: Any) -> None:
        wire_map = {"n": 1} if tag is None else {"t": tag, "n": 1}
        error = bad_message(wire_map)
        assert error.code is protocol.ErrorCode.BAD_MESSAGE
        assert "'t'" in str(error)

    @pytest.mark.parametrize(
        "raw",
        [
            msgpack.packb([1, 2]),
            msgpack.packb("ping"),
            msgpack.packb({"t": "ping", "n": 1}) + b"\x00",
            msgpack.packb({b"t": "ping"}),
            msgpack.packb({"t": "ping", "n": 1, "extra": b"bytes"}),
            msgpack.packb({"t": "ping", "n": 1, "extra": msgpack.ExtType(5, b"x")}),
            msgpack.packb({1: "ping"}),
            b"\xc1",
            b"\x81\xa1t",
        ],
        ids=[
            "array",
            "str",
            "trailing",
            "bin_key",
            "bin_value",
            "ext_value",
            "int_key",
            "reserved_byte",
            "cut",
        ],
    )
    def test_body_that_is_not_one_str_keyed_map_is_a_bad_frame(
        self, raw: bytes
    ) -> None:
        with pytest.raises(protocol.RemoteProtocolError) as info:
            protocol.decode_message(raw)
        assert info.value.code is protocol.ErrorCode.BAD_FRAME

    def test_encoding_something_that_is_not_a_message_is_a_type_error(self) -> None:
        with pytest.raises(TypeError, match="expected a protocol message"):
            protocol.encode_message({"t": "ping"})  # type: ignore[arg-type]


@given(
    st.dictionaries(
        st.sampled_from(
            ["id", "from", "to", "group", "body", "ts", "partition", "offset"]
        ),
        st.none() | st.integers(-2, 2**64 - 1) | st.text(max_size=70) | st.booleans(),
    )
)
def test_inline_checks_accept_exactly_what_the_validators_accept(
    fields: dict[str, Any],
) -> None:
    try:
        expected: Any = protocol.Deliver(**_kwargs(fields))
    except (TypeError, ValueError):
        expected = None

    try:
        decoded: Any = protocol.decode_message(body({"t": "deliver", **fields}))
    except protocol.RemoteProtocolError:
        decoded = None

    assert decoded == expected


def test_message_to_map_of_a_history_page_nests_entry_maps() -> None:
    entry = protocol.HistoryEntry(id="m", sender="a", to="b", body="x", ts=1, seq=2)
    page = protocol.HistoryPage(rid=1, messages=[entry])
    assert message_to_map(page)["messages"] == [
        {"id": "m", "from": "a", "to": "b", "body": "x", "ts": 1, "seq": 2}
    ]
