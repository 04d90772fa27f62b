"""The Connection state machine: handshake, directions, closing and failure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_strategies import messages, only_sent_by

import protocol
from protocol import Role, State

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
DELIVER = protocol.Deliver(
    id="m1", sender="bob", to="alice", body="hi", ts=1, partition=0, offset=0
)
BYE = protocol.Goodbye(reason="done")


def pair() -> tuple[protocol.Connection, protocol.Connection]:
    return protocol.Connection(Role.CLIENT), protocol.Connection(Role.SERVER)


def deliver(
    sender: protocol.Connection,
    receiver: protocol.Connection,
    message: protocol.Message,
) -> protocol.Message | protocol.Signal:
    receiver.receive_data(sender.send(message))
    return receiver.next_message()


def open_pair() -> tuple[protocol.Connection, protocol.Connection]:
    client, server = pair()
    assert deliver(client, server, HELLO) == HELLO
    assert deliver(server, client, WELCOME) == WELCOME
    return client, server


def remote_error(connection: protocol.Connection) -> protocol.RemoteProtocolError:
    with pytest.raises(protocol.RemoteProtocolError) as info:
        connection.next_message()
    return info.value


class TestHandshake:
    def test_hello_then_welcome_opens_both_sides(self) -> None:
        client, server = pair()
        assert client.state is server.state is State.HANDSHAKE

        client, server = open_pair()

        assert client.state is server.state is State.OPEN
        assert deliver(client, server, SEND) == SEND
        assert deliver(server, client, DELIVER) == DELIVER

    def test_client_may_not_send_anything_but_hello_first(self) -> None:
        client, _ = pair()
        with pytest.raises(protocol.LocalProtocolError, match="before Hello"):
            client.send(SEND)
        assert client.state is State.HANDSHAKE

    def test_client_may_only_say_goodbye_between_hello_and_welcome(self) -> None:
        client, _ = pair()
        client.send(HELLO)
        with pytest.raises(protocol.LocalProtocolError, match="before Welcome"):
            client.send(SEND)
        client.send(BYE)
        assert client.state is State.CLOSED

    def test_server_refuses_a_first_message_that_is_not_hello(self) -> None:
        _client, server = pair()
        server.receive_data(protocol.encode_frame(SEND))
        error = remote_error(server)
        assert error.code is protocol.ErrorCode.UNEXPECTED_MESSAGE
        assert "Hello" in str(error)

    def test_second_hello_is_unexpected(self) -> None:
        _, server = open_pair()
        server.receive_data(protocol.encode_frame(HELLO))
        assert remote_error(server).code is protocol.ErrorCode.UNEXPECTED_MESSAGE

    def test_client_may_not_send_hello_twice(self) -> None:
        client, _ = open_pair()
        with pytest.raises(protocol.LocalProtocolError, match="twice"):
            client.send(HELLO)

    def test_server_messages_before_hello_are_unexpected_for_the_client(self) -> None:
        client, _ = pair()
        client.receive_data(protocol.encode_frame(WELCOME))
        assert remote_error(client).code is protocol.ErrorCode.UNEXPECTED_MESSAGE

    def test_server_may_not_send_before_hello_except_error_or_goodbye(self) -> None:
        _, server = pair()
        with pytest.raises(protocol.LocalProtocolError, match="before Hello"):
            server.send(WELCOME)
        server.send(
            protocol.Error(code=protocol.ErrorCode.HANDSHAKE_TIMEOUT, fatal=True)
        )
        assert server.state is State.CLOSED

    def test_server_may_send_only_handshake_answers_before_welcome(self) -> None:
        client, server = pair()
        deliver(client, server, HELLO)
        with pytest.raises(protocol.LocalProtocolError, match="before Welcome"):
            server.send(DELIVER)
        with pytest.raises(protocol.LocalProtocolError, match="before Welcome"):
            server.send(protocol.Ping(n=1))

    def test_client_messages_before_welcome_are_unexpected_for_the_server(self) -> None:
        client, server = pair()
        deliver(client, server, HELLO)
        server.receive_data(protocol.encode_frame(SEND))
        assert remote_error(server).code is protocol.ErrorCode.UNEXPECTED_MESSAGE

    def test_welcome_twice_is_refused_both_ways(self) -> None:
        client, server = open_pair()
        with pytest.raises(protocol.LocalProtocolError, match="twice"):
            server.send(WELCOME)
        client.receive_data(protocol.encode_frame(WELCOME))
        assert remote_error(client).code is protocol.ErrorCode.UNEXPECTED_MESSAGE

    def test_redirect_answers_hello_and_closes_both_sides(self) -> None:
        client, server = pair()
        deliver(client, server, HELLO)
        redirect = protocol.Redirect(host="h", port=7000, partition=2)
        assert deliver(server, client, redirect) == redirect
        assert client.state is server.state is State.CLOSED

    def test_unsupported_version_is_reported_with_the_supported_ones(self) -> None:
        protocol.check_version(HELLO)
        with pytest.raises(protocol.RemoteProtocolError, match="supported") as info:
            protocol.check_version(protocol.Hello(version=2, user="a", token="t"))
        assert info.value.code is protocol.ErrorCode.UNSUPPORTED_VERSION
        assert "1" in info.value.error_message().text


class TestDirection:
    @given(only_sent_by(Role.SERVER))
    def test_client_messages_are_refused_from_a_server(
        self, message: protocol.Message
    ) -> None:
        client, server = open_pair()
        with pytest.raises(protocol.LocalProtocolError):
            client.send(message)
        server.receive_data(protocol.encode_frame(message))
        assert remote_error(server).code is protocol.ErrorCode.UNEXPECTED_MESSAGE

    @given(only_sent_by(Role.CLIENT))
    def test_server_messages_are_refused_from_a_client(
        self, message: protocol.Message
    ) -> None:
        client, server = open_pair()
        with pytest.raises(protocol.LocalProtocolError):
            server.send(message)
        client.receive_data(protocol.encode_frame(message))
        assert remote_error(client).code is protocol.ErrorCode.UNEXPECTED_MESSAGE

    @pytest.mark.parametrize("message", [protocol.Ping(n=3), protocol.Pong(n=3), BYE])
    def test_both_sides_may_send_ping_pong_and_goodbye(
        self, message: protocol.Message
    ) -> None:
        client, server = open_pair()
        assert deliver(client, server, message) == message
        client, server = open_pair()
        assert deliver(server, client, message) == message


class TestFailure:
    def test_error_repeats_and_the_connection_stays_failed(self) -> None:
        _, server = pair()
        server.receive_data(b"\x00\x00\x00\x01\xc1" + protocol.encode_frame(HELLO))

        first = remote_error(server)

        assert first.code is protocol.ErrorCode.BAD_FRAME
        assert server.state is State.FAILED
        assert remote_error(server) is first

    def test_failed_connection_sends_only_error_and_goodbye(self) -> None:
        client, server = open_pair()
        server.receive_data(b"\x00\x00\x00\x01\xc1")
        error = remote_error(server)

        with pytest.raises(protocol.LocalProtocolError, match="broke the protocol"):
            server.send(DELIVER)
        frame = server.send(error.error_message())
        server.send(BYE)

        client.receive_data(frame)
        reply = client.next_message()
        assert reply == protocol.Error(
            code=protocol.ErrorCode.BAD_FRAME, text=str(error), fatal=True
        )
        assert client.state is State.CLOSED
        assert server.state is State.FAILED

    def test_error_message_text_is_cut_to_the_wire_limit(self) -> None:
        error = protocol.RemoteProtocolError(
            "x" * 5000, code=protocol.ErrorCode.BAD_MESSAGE
        )
        assert len(error.error_message().text) == protocol.MAX_TEXT_LENGTH

    def test_oversized_frame_fails_the_connection_before_its_body(self) -> None:
        server = protocol.Connection(Role.SERVER, max_frame_size=64)
        server.receive_data((65).to_bytes(4, "big"))
        assert remote_error(server).code is protocol.ErrorCode.FRAME_TOO_LARGE

    def test_send_over_the_frame_limit_is_a_local_error(self) -> None:
        client = protocol.Connection(Role.CLIENT, max_frame_size=32)
        with pytest.raises(protocol.LocalProtocolError, match="frame size"):
            client.send(protocol.Hello(version=1, user="alice", token="t" * 100))
        assert client.state is State.HANDSHAKE


class TestClosing:
    def test_goodbye_received_closes_and_later_messages_are_unexpected(self) -> None:
        client, server = open_pair()
        server.receive_data(client.send(BYE) + protocol.encode_frame(SEND))

        assert server.next_message() == BYE
        assert server.state is State.CLOSED
        assert remote_error(server).code is protocol.ErrorCode.UNEXPECTED_MESSAGE

    def test_after_our_goodbye_incoming_messages_are_still_returned(self) -> None:
        client, server = open_pair()
        client.send(BYE)
        assert client.state is State.CLOSED
        assert deliver(server, client, DELIVER) == DELIVER

    def test_closed_connection_sends_only_goodbye_and_error(self) -> None:
        client, _ = open_pair()
        client.send(BYE)
        with pytest.raises(protocol.LocalProtocolError, match="closed"):
            client.send(SEND)
        client.send(BYE)
        client.send(protocol.Error(code=protocol.ErrorCode.INTERNAL, fatal=True))

    def test_fatal_error_closes_and_non_fatal_error_does_not(self) -> None:
        client, server = open_pair()
        deliver(
            server, client, protocol.Error(code="rate_limited", fatal=False, id="m1")
        )
        assert client.state is State.OPEN
        deliver(server, client, protocol.Error(code="shutting_down", fatal=True))
        assert client.state is State.CLOSED

    def test_clean_end_of_stream_gives_closed(self) -> None:
        _client, server = open_pair()
        server.receive_data(b"")
        assert server.next_message() is protocol.CLOSED
        assert server.next_message() is protocol.CLOSED
        assert server.state is State.CLOSED

    def test_end_of_stream_inside_a_frame_is_a_bad_frame(self) -> None:
        _, server = pair()
        server.receive_data(protocol.encode_frame(HELLO)[:-1])
        assert server.next_message() is protocol.NEED_DATA
        server.receive_data(b"")
        error = remote_error(server)
        assert error.code is protocol.ErrorCode.BAD_FRAME
        assert "ended inside a frame" in str(error)

    def test_data_after_end_of_stream_is_a_local_error(self) -> None:
        _, server = pair()
        server.receive_data(b"")
        with pytest.raises(protocol.LocalProtocolError, match="after the end"):
            server.receive_data(b"x")

    def test_partial_frame_needs_data(self) -> None:
        _, server = pair()
        assert server.next_message() is protocol.NEED_DATA
        server.receive_data(b"\x00\x00")
        assert server.next_message() is protocol.NEED_DATA


@given(st.binary(max_size=200), st.booleans())
def test_arbitrary_bytes_give_messages_or_a_remote_protocol_error(
    data: bytes, eof: bool
) -> None:
    server = protocol.Connection(Role.SERVER)
    server.receive_data(data)
    if eof:
        server.receive_data(b"")

    try:
        while True:
            result = server.next_message()
            if result is protocol.NEED_DATA or result is protocol.CLOSED:
                break
            assert isinstance(result, tuple(protocol.MESSAGE_TYPES.values()))
    except protocol.RemoteProtocolError as exc:
        assert isinstance(exc.code, protocol.ErrorCode)
        assert server.state is State.FAILED


@given(
    st.lists(messages, max_size=4).map(lambda ms: [HELLO, *ms]), st.binary(max_size=40)
)
def test_valid_frames_then_garbage_give_messages_or_a_remote_protocol_error(
    sent: list[protocol.Message], garbage: bytes
) -> None:
    server = protocol.Connection(Role.SERVER)
    server.receive_data(b"".join(map(protocol.encode_frame, sent)) + garbage)
    try:
        while server.next_message() not in (protocol.NEED_DATA, protocol.CLOSED):
            pass
    except protocol.RemoteProtocolError:
        assert server.state is State.FAILED
