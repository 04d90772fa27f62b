"""The protocol over WebSocket, and the chat page's files, against a real server.

Rules for these tests: loopback only, port 0, an in-memory log, trio-websocket
as the client, and every wait bounded by the suite's timeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio_websocket
from support import client, running_server, server_config, token

import protocol
from msgnet import RunningServer, serve
from msgnet._routing import partition_for
from msgnet._websocket import CloseCode, WebSocketTransport, close_code_for

ErrorCode = protocol.ErrorCode


@asynccontextmanager
async def raw_websocket(
    server: RunningServer, path: str = "/ws"
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A trio-websocket client on a TCP stream the test owns.

    trio-websocket's client leaves its socket open after the server closes
    first, so the stream is opened and closed here rather than by the library.
    """
    assert server.ws_port is not None
    stream = await trio.open_tcp_stream(server.host, server.ws_port)
    async with stream, trio.open_nursery() as nursery:
        websocket = await trio_websocket.wrap_client_stream(
            nursery, stream, server.host, path
        )
        try:
            yield websocket
        finally:
            await websocket.aclose()
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def logged_in(
    server: RunningServer, user: str, **hello: Any
) -> AsyncIterator[tuple[WebSocketTransport, protocol.Welcome]]:
    async with raw_websocket(server) as websocket:
        transport = WebSocketTransport(websocket, role=protocol.Role.CLIENT)
        await transport.send(
            [protocol.Hello(version=1, user=user, token=token(user), **hello)]
        )
        welcome = await transport.receive()
        assert isinstance(welcome, protocol.Welcome)
        yield transport, welcome


async def receive_until(
    transport: WebSocketTransport, kind: type[protocol.Message]
) -> Any:
    """The next message of ``kind``, skipping the server's keep-alive pings."""
    while True:
        message = await transport.receive()
        assert message is not None, f"closed while waiting for {kind.__name__}"
        if isinstance(message, kind):
            return message


async def closing_error(
    websocket: trio_websocket.WebSocketConnection,
) -> tuple[protocol.Error, int]:
    """The fatal Error the server sends, then the close code that follows it."""
    error = protocol.decode_message(bytes(await websocket.get_message()))
    assert isinstance(error, protocol.Error)
    assert error.fatal
    with pytest.raises(trio_websocket.ConnectionClosed) as closed:
        await websocket.get_message()
    assert closed.value.reason is not None
    return error, closed.value.reason.code


class TestRoundTrips:
    async def test_websocket_messages_are_bodies_without_a_length_prefix(
        self,
    ) -> None:
        async with running_server() as server, raw_websocket(server) as websocket:
            hello = protocol.Hello(version=1, user="alice", token=token("alice"))
            await websocket.send_message(protocol.encode_message(hello))
            reply = await websocket.get_message()

            assert isinstance(reply, bytes)
            welcome = protocol.decode_message(reply)
            assert isinstance(welcome, protocol.Welcome)
            assert welcome.user == "alice"

    async def test_two_websocket_users_exchange_one_to_one_messages(self) -> None:
        async with (
            running_server() as server,
            logged_in(server, "alice") as (alice, _),
            logged_in(server, "bob") as (bob, _),
        ):
            await alice.send([protocol.Send(id="m1", to="bob", body="hi bob")])
            ack = await receive_until(alice, protocol.SendAck)
            delivery = await receive_until(bob, protocol.Deliver)

            assert ack.id == "m1"
            assert (delivery.sender, delivery.id, delivery.body) == (
                "alice",
                "m1",
                "hi bob",
            )

    async def test_groups_and_history_work_over_websocket(self) -> None:
        async with (
            running_server() as server,
            logged_in(server, "alice") as (alice, _),
            logged_in(server, "bob") as (bob, _),
        ):
            await alice.send(
                [protocol.GroupCreate(rid=1, group="team", members=["bob"])]
            )
            info = await receive_until(alice, protocol.GroupInfo)
            await alice.send([protocol.GroupSend(id="g1", group="team", body="hey")])
            await receive_until(alice, protocol.SendAck)
            delivery = await receive_until(bob, protocol.Deliver)

            assert set(info.members) == {"alice", "bob"}
            assert (delivery.group, delivery.body) == ("team", "hey")

            await bob.send([protocol.HistoryRequest(rid=2, group="team")])
            page = await receive_until(bob, protocol.HistoryPage)
            assert page.rid == 2

    async def test_ping_is_answered_with_the_same_number(self) -> None:
        async with running_server() as server, logged_in(server, "alice") as (ws, _):
            await ws.send([protocol.Ping(n=42)])
            assert await receive_until(ws, protocol.Pong) == protocol.Pong(n=42)

    async def test_websocket_and_tcp_clients_talk_to_each_other(self) -> None:
        async with (
            running_server() as server,
            logged_in(server, "alice") as (alice, _),
            client(server, "bob") as bob,
        ):
            await alice.send([protocol.Send(id="w1", to="bob", body="from the web")])
            from_web = await bob.receive()
            await bob.send("alice", "from tcp", id="t1")
            from_tcp = await receive_until(alice, protocol.Deliver)

            assert (from_web.sender, from_web.body) == ("alice", "from the web")
            assert (from_tcp.sender, from_tcp.id, from_tcp.body) == (
                "bob",
                "t1",
                "from tcp",
            )

    async def test_resume_catches_a_websocket_client_up(self) -> None:
        async with running_server() as server:
            async with logged_in(server, "bob") as (_, first_welcome):
                cursor = first_welcome.cursor
            async with client(server, "alice") as alice:
                await alice.send("bob", "while you were away", id="a1")

            async with logged_in(server, "bob", resume=cursor) as (bob, _):
                missed = await receive_until(bob, protocol.Deliver)

            assert (missed.id, missed.body) == ("a1", "while you were away")

    async def test_goodbye_closes_with_1000(self) -> None:
        async with running_server() as server, logged_in(server, "alice") as (ws, _):
            await ws.send([protocol.Goodbye(reason="done")])
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    await ws.websocket.get_message()
            assert closed.value.reason is not None
            assert closed.value.reason.code == CloseCode.NORMAL


class TestBadInput:
    async def test_text_message_is_a_bad_frame_closed_with_1003(self) -> None:
        async with running_server() as server, raw_websocket(server) as websocket:
            await websocket.send_message('{"t": "hello"}')
            error, code = await closing_error(websocket)

        assert error.code == ErrorCode.BAD_FRAME
        assert "text WebSocket message" in error.text
        assert code == CloseCode.UNSUPPORTED_DATA

    async def test_message_over_the_frame_limit_is_refused_with_1009(self) -> None:
        async with (
            running_server(max_frame_size=1024) as server,
            raw_websocket(server) as websocket,
        ):
            await websocket.send_message(b"\x00" * 1500)
            error, code = await closing_error(websocket)

        assert error.code == ErrorCode.FRAME_TOO_LARGE
        assert "1500 bytes" in error.text
        assert code == CloseCode.MESSAGE_TOO_BIG

    async def test_message_far_over_the_limit_is_cut_off_with_1009(self) -> None:
        async with (
            running_server(max_frame_size=1024) as server,
            raw_websocket(server) as websocket,
        ):
            await websocket.send_message(b"\x00" * 10_000)
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await websocket.get_message()

        assert closed.value.reason is not None
        assert closed.value.reason.code == CloseCode.MESSAGE_TOO_BIG

    async def test_garbage_body_is_a_bad_frame_closed_with_1008(self) -> None:
        async with running_server() as server, raw_websocket(server) as websocket:
            await websocket.send_message(b"\xc1\x00garbage")
            error, code = await closing_error(websocket)

        assert error.code == ErrorCode.BAD_FRAME
        assert code == CloseCode.POLICY_VIOLATION

    async def test_message_in_the_wrong_state_is_unexpected_closed_with_1008(
        self,
    ) -> None:
        send = protocol.Send(id="m1", to="bob", body="before hello")
        async with running_server() as server, raw_websocket(server) as websocket:
            await websocket.send_message(protocol.encode_message(send))
            error, code = await closing_error(websocket)

        assert error.code == ErrorCode.UNEXPECTED_MESSAGE
        assert "Hello" in error.text
        assert code == CloseCode.POLICY_VIOLATION

    async def test_bad_token_is_auth_failed_closed_with_1008(self) -> None:
        hello = protocol.Hello(version=1, user="alice", token=token("mallory"))
        async with running_server() as server, raw_websocket(server) as websocket:
            await websocket.send_message(protocol.encode_message(hello))
            error, code = await closing_error(websocket)

        assert error.code == ErrorCode.AUTH_FAILED
        assert code == CloseCode.POLICY_VIOLATION

    def test_errors_that_are_not_the_peers_fault_have_their_own_close_codes(
        self,
    ) -> None:
        assert close_code_for(ErrorCode.SERVER_FULL) == CloseCode.TRY_AGAIN_LATER
        assert close_code_for(ErrorCode.SHUTTING_DOWN) == CloseCode.GOING_AWAY
        assert close_code_for(ErrorCode.INTERNAL) == CloseCode.INTERNAL_ERROR
        assert close_code_for("some_future_code") == CloseCode.POLICY_VIOLATION


async def test_redirect_carries_the_owners_websocket_port() -> None:
    partitions = 4
    user = next(u for u in (f"r{n}" for n in range(100)) if partition_for(u, 4) == 3)
    config = server_config(partitions=partitions)
    async with trio.open_nursery() as nursery:
        server: RunningServer = await nursery.start(
            lambda task_status: serve(config, partitions=[0], task_status=task_status)
        )
        server.context.owner_address = lambda partition: ("10.0.0.9", 7400, 7480)
        async with raw_websocket(server) as websocket:
            hello = protocol.Hello(version=1, user=user, token=token(user))
            await websocket.send_message(protocol.encode_message(hello))
            redirect = protocol.decode_message(bytes(await websocket.get_message()))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await websocket.get_message()
        nursery.cancel_scope.cancel()

    assert redirect == protocol.Redirect(
        host="10.0.0.9", port=7400, partition=3, ws_port=7480
    )
    assert closed.value.reason is not None
    assert closed.value.reason.code == CloseCode.NORMAL


async def test_websocket_can_be_disabled() -> None:
    async with running_server(ws_enabled=False) as server:
        assert server.ws_port is None


async def http_get(server: RunningServer, request: bytes) -> tuple[bytes, bytes]:
    """Send one raw request to the WebSocket port; the response's head and body."""
    assert server.ws_port is not None
    stream = await trio.open_tcp_stream(server.host, server.ws_port)
    async with stream:
        await stream.send_all(request)
        response = b""
        while data := await stream.receive_some():
            response += data
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


class TestChatPage:
    async def test_root_serves_the_page_as_html(self) -> None:
        async with running_server() as server:
            head, body = await http_get(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"content-type: text/html; charset=utf-8" in head.lower()
        assert b"<html" in body.lower()

    @pytest.mark.parametrize(
        "path", ["/app.js", "/style.css", "/vendor/msgpack.min.js"]
    )
    async def test_page_assets_are_served(self, path: str) -> None:
        request = f"GET {path}?v=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        async with running_server() as server:
            head, body = await http_get(server, request)

        assert head.startswith(b"HTTP/1.1 200 ")
        assert body

    @pytest.mark.parametrize(
        "path", ["/nope.html", "/../_web.py", "/package.json", "/build.mjs"]
    )
    async def test_anything_else_is_not_found(self, path: str) -> None:
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        async with running_server() as server:
            head, _ = await http_get(server, request)

        assert head.startswith(b"HTTP/1.1 404 ")

    async def test_only_get_and_head_are_served(self) -> None:
        async with running_server() as server:
            head, _ = await http_get(
                server, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            )
            head_only, body = await http_get(
                server, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
            )

        assert head.startswith(b"HTTP/1.1 405 ")
        assert head_only.startswith(b"HTTP/1.1 200 ")
        assert body == b""

    async def test_broken_http_gets_400(self) -> None:
        async with running_server() as server:
            head, _ = await http_get(server, b"NOT HTTP AT ALL\r\n\r\n")

        assert head.startswith(b"HTTP/1.1 400 ")
