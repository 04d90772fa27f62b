"""Connection.receive_body / send_body: the state machine without length prefixes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_strategies import messages

import protocol
from protocol import ErrorCode, Role, State

HELLO = protocol.Hello(version=1, user="alice", token="t")
WELCOME = protocol.Welcome(
    version=1,
    user="alice",
    session="s1",
    server="slot-0",
    partition=0,
    cursor=0,
    max_frame=protocol.DEFAULT_MAX_FRAME_SIZE,
    idle_timeout=60.0,
)
SEND = protocol.Send(id="m1", to="bob", body="hi")


def open_pair() -> tuple[protocol.Connection, protocol.Connection]:
    client = protocol.Connection(Role.CLIENT)
    server = protocol.Connection(Role.SERVER)
    assert server.receive_body(client.send_body(HELLO)) == HELLO
    assert client.receive_body(server.send_body(WELCOME)) == WELCOME
    return client, server


def refused(connection: protocol.Connection, body: bytes) -> ErrorCode:
    with pytest.raises(protocol.RemoteProtocolError) as info:
        connection.receive_body(body)
    assert connection.state is State.FAILED
    code = info.value.code
    assert isinstance(code, ErrorCode)
    return code


def test_send_body_is_the_frame_without_its_length_prefix() -> None:
    framed, unframed = (
        protocol.Connection(Role.CLIENT),
        protocol.Connection(Role.CLIENT),
    )
    body = unframed.send_body(HELLO)
    assert framed.send(HELLO)[4:] == body == protocol.encode_message(HELLO)


def test_bodies_open_the_connection_and_carry_messages_both_ways() -> None:
    client, server = open_pair()
    assert client.state is server.state is State.OPEN
    assert server.receive_body(client.send_body(SEND)) == SEND


@given(messages)
def test_any_message_the_client_may_send_round_trips(
    message: protocol.Message,
) -> None:
    client, server = open_pair()
    try:
        body = client.send_body(message)
    except protocol.LocalProtocolError:
        return
    assert server.receive_body(body) == message


def test_first_body_must_be_hello() -> None:
    server = protocol.Connection(Role.SERVER)
    assert refused(server, protocol.encode_message(SEND)) is (
        ErrorCode.UNEXPECTED_MESSAGE
    )


def test_body_over_the_limit_is_frame_too_large() -> None:
    server = protocol.Connection(Role.SERVER, max_frame_size=16)
    assert refused(server, protocol.encode_message(HELLO)) is ErrorCode.FRAME_TOO_LARGE


def test_empty_body_is_a_bad_frame() -> None:
    assert refused(protocol.Connection(Role.SERVER), b"") is ErrorCode.BAD_FRAME


def test_a_body_with_bytes_after_the_map_is_a_bad_frame() -> None:
    body = protocol.encode_message(HELLO) + b"\x00"
    assert refused(protocol.Connection(Role.SERVER), body) is ErrorCode.BAD_FRAME


def test_failure_repeats_on_every_later_body() -> None:
    server = protocol.Connection(Role.SERVER)
    refused(server, b"\xc1")
    assert refused(server, protocol.encode_message(HELLO)) is ErrorCode.BAD_FRAME


def test_send_body_over_the_limit_is_a_local_error_that_changes_nothing() -> None:
    client = protocol.Connection(Role.CLIENT, max_frame_size=16)
    with pytest.raises(protocol.LocalProtocolError, match="frame size"):
        client.send_body(HELLO)
    with pytest.raises(protocol.LocalProtocolError, match="before Hello"):
        client.send_body(SEND)


def test_end_of_stream_after_bodies_is_a_clean_close() -> None:
    _, server = open_pair()
    server.receive_data(b"")
    assert server.next_message() is protocol.CLOSED
    assert server.state is State.CLOSED


def test_bodies_cannot_follow_the_end_of_stream_or_framed_bytes() -> None:
    server = protocol.Connection(Role.SERVER)
    server.receive_data(b"\x00\x00")
    with pytest.raises(protocol.LocalProtocolError, match="2 buffered"):
        server.receive_body(protocol.encode_message(HELLO))

    ended = protocol.Connection(Role.SERVER)
    ended.receive_data(b"")
    with pytest.raises(protocol.LocalProtocolError, match="end of the stream"):
        ended.receive_body(protocol.encode_message(HELLO))


@given(st.binary(max_size=200))
def test_arbitrary_bodies_give_a_message_or_a_remote_protocol_error(
    body: bytes,
) -> None:
    server = protocol.Connection(Role.SERVER)
    try:
        message = server.receive_body(body)
    except protocol.RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert server.state is State.FAILED
        return
    # Only what may open a connection: Hello, or an Error or Goodbye explaining.
    assert isinstance(message, protocol.Hello | protocol.Error | protocol.Goodbye)
