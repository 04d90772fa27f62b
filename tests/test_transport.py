"""StreamTransport over real TCP: a receive cut short by a deadline loses nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

import protocol
from msgnet._transport import StreamTransport

HELLO = protocol.Hello(
    version=protocol.PROTOCOL_VERSION, user="alice", token="t", device="phone"
)

WELCOME = protocol.Welcome(
    version=protocol.PROTOCOL_VERSION,
    user="alice",
    session="s",
    server="test",
    partition=0,
    cursor=0,
    max_frame=protocol.DEFAULT_MAX_FRAME_SIZE,
    idle_timeout=60.0,
)


@asynccontextmanager
async def welcomed_pair() -> AsyncIterator[tuple[StreamTransport, StreamTransport]]:
    """Server and client transports over TCP, past hello and welcome."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = StreamTransport(
        await trio.open_tcp_stream("127.0.0.1", port), role=protocol.Role.CLIENT
    )
    server = StreamTransport(await listeners[0].accept(), role=protocol.Role.SERVER)
    await listeners[0].aclose()
    try:
        await client.send([HELLO])
        assert await server.receive() == HELLO
        await server.send([WELCOME])
        assert await client.receive() == WELCOME
        yield server, client
    finally:
        await server.aclose()
        await client.aclose()


def frames(client: StreamTransport, *messages: protocol.Message) -> bytes:
    return b"".join(client.connection.send(message) for message in messages)


async def test_receives_cancelled_while_the_peer_is_silent_lose_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with welcomed_pair() as (server, client):
        # A silent peer: each wait is cut short by a deadline, as the
        # session's ping deadline does, before anything arrives.
        for _ in range(3):
            with trio.move_on_after(1) as waited:
                await server.receive()
            assert waited.cancelled_caught

        await client.send([protocol.Ping(n=1), protocol.Ping(n=2)])
        assert await server.receive() == protocol.Ping(n=1)
        assert await server.receive() == protocol.Ping(n=2)


async def test_receive_cancelled_in_the_middle_of_a_frame_resumes_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with welcomed_pair() as (server, client):
        data = frames(client, protocol.Ping(n=7))

        # Half a frame, then silence: the receive is cancelled holding it.
        await client.stream.send_all(data[: len(data) // 2])
        with trio.move_on_after(1) as waited:
            await server.receive()
        assert waited.cancelled_caught

        await client.stream.send_all(data[len(data) // 2 :])
        assert await server.receive() == protocol.Ping(n=7)


async def test_busy_peer_frames_arrive_in_order_after_a_quiet_spell(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with welcomed_pair() as (server, client):
        with trio.move_on_after(1):
            await server.receive()

        pings = [protocol.Ping(n=n) for n in range(50)]
        for ping in pings:
            await client.send([ping])
        assert [await server.receive() for _ in pings] == pings


async def test_peer_closing_while_quiet_ends_the_stream() -> None:
    async with welcomed_pair() as (server, client):
        await client.aclose()
        assert await server.receive() is None


async def test_buffered_hands_over_frames_that_arrived_together_and_no_more() -> None:
    async with welcomed_pair() as (server, client):
        sends = [protocol.Send(id=f"m{n}", to="bob", body="hi") for n in range(3)]
        await client.stream.send_all(b"".join(client.connection.send(s) for s in sends))

        assert server.buffered() is None  # nothing read from the socket yet
        with trio.fail_after(5):
            first = await server.receive()
        rest = [server.buffered(), server.buffered()]

        assert [first, *rest] == sends
        assert server.buffered() is None


async def test_buffered_reports_bad_input_as_receive_would() -> None:
    async with welcomed_pair() as (server, client):
        good = client.connection.send(protocol.Ping(n=1))
        await client.stream.send_all(good + b"\x00\x00\x00\x01\xc1")
        with trio.fail_after(5):
            assert await server.receive() == protocol.Ping(n=1)

        with pytest.raises(protocol.RemoteProtocolError) as refused:
            server.buffered()
        assert refused.value.code == protocol.ErrorCode.BAD_FRAME
