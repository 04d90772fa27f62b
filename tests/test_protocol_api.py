"""The public surface of the protocol package, pinned so changes are deliberate."""

from __future__ import annotations

import pathlib
import re

import protocol

EXPECTED = {
    "CLOSED",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_BODY_LENGTH",
    "MAX_GROUP_MEMBERS",
    "MAX_HISTORY_LIMIT",
    "MAX_ID_LENGTH",
    "MAX_TEXT_LENGTH",
    "MAX_TOKEN_LENGTH",
    "MESSAGE_TYPES",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Connection",
    "Deliver",
    "DeliveryAck",
    "Error",
    "ErrorCode",
    "FrameDecoder",
    "Goodbye",
    "GroupCreate",
    "GroupInfo",
    "GroupJoin",
    "GroupLeave",
    "GroupMembers",
    "GroupSend",
    "Hello",
    "HistoryEntry",
    "HistoryPage",
    "HistoryRequest",
    "LocalProtocolError",
    "Message",
    "Ping",
    "Pong",
    "ProtocolError",
    "Redirect",
    "RemoteProtocolError",
    "Role",
    "Send",
    "SendAck",
    "Signal",
    "State",
    "Welcome",
    "check_version",
    "decode_message",
    "encode_frame",
    "encode_message",
}


def test_public_names_are_pinned() -> None:
    assert set(protocol.__all__) == EXPECTED
    assert len(protocol.__all__) == len(EXPECTED)


def test_every_public_name_exists() -> None:
    for name in protocol.__all__:
        assert hasattr(protocol, name), name


def test_message_type_table_matches_the_spec() -> None:
    assert {tag: cls.__name__ for tag, cls in protocol.MESSAGE_TYPES.items()} == {
        "hello": "Hello",
        "send": "Send",
        "gsend": "GroupSend",
        "dack": "DeliveryAck",
        "history": "HistoryRequest",
        "group_create": "GroupCreate",
        "group_join": "GroupJoin",
        "group_leave": "GroupLeave",
        "group_members": "GroupMembers",
        "welcome": "Welcome",
        "redirect": "Redirect",
        "send_ack": "SendAck",
        "deliver": "Deliver",
        "history_page": "HistoryPage",
        "group_info": "GroupInfo",
        "ping": "Ping",
        "pong": "Pong",
        "error": "Error",
        "bye": "Goodbye",
    }


def test_limits_and_versions_match_the_spec() -> None:
    assert protocol.PROTOCOL_VERSION == 1
    assert frozenset({1}) == protocol.SUPPORTED_VERSIONS
    assert protocol.DEFAULT_MAX_FRAME_SIZE == 1_048_576
    assert protocol.MAX_ID_LENGTH == 64
    assert protocol.MAX_TOKEN_LENGTH == 4096
    assert protocol.MAX_BODY_LENGTH == 65536
    assert protocol.MAX_GROUP_MEMBERS == 1000
    assert protocol.MAX_HISTORY_LIMIT == 200
    assert protocol.MAX_TEXT_LENGTH == 1024


def test_error_codes_are_the_documented_wire_strings() -> None:
    assert {code.name.lower(): code.value for code in protocol.ErrorCode} == {
        code.name.lower(): code.name.lower() for code in protocol.ErrorCode
    }
    assert len(protocol.ErrorCode) == 18


def test_exceptions_share_one_base() -> None:
    assert issubclass(protocol.LocalProtocolError, protocol.ProtocolError)
    assert issubclass(protocol.RemoteProtocolError, protocol.ProtocolError)


def test_protocol_package_does_no_io() -> None:
    package = pathlib.Path(protocol.__file__).parent
    forbidden = re.compile(r"^\s*(import|from)\s+(trio|socket|kafka|asyncio)\b", re.M)
    for source in package.glob("*.py"):
        text = source.read_text()
        assert not forbidden.search(text), source.name
        assert len(text.splitlines()) <= 500, source.name


def test_every_error_code_is_documented() -> None:
    docs = pathlib.Path(protocol.__file__).parent.parent / "docs" / "protocol.md"
    text = docs.read_text()
    for code in protocol.ErrorCode:
        assert f"`{code.value}`" in text, code
    for tag in protocol.MESSAGE_TYPES:
        assert f"`{tag}`" in text, tag


def test_connection_methods_are_pinned() -> None:
    public = {name for name in vars(protocol.Connection) if not name.startswith("_")}
    assert public == {
        "state",
        "receive_data",
        "next_message",
        "receive_body",
        "send",
        "send_body",
    }
