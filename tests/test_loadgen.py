"""The load generator: its frames, its reading of every frame kind, its figures.

Sockets are real TCP on localhost; the server's end is a plain transport the
test drives, and the generator's loop is polled with a timeout, never slept on.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

import protocol
from bench._loadgen import (
    LOWEST_NS,
    LoadSpec,
    _Clock,
    _Conn,
    _Sockets,
    _Tally,
    new_histogram,
)
from msgnet._transport import StreamTransport

USER = "bench-user"


def _spec(group_size: int = 0) -> LoadSpec:
    return LoadSpec(
        host="127.0.0.1",
        port=0,
        secret="s",
        run_id="r",
        connections=2,
        rate=1000.0,
        size=100,
        group_size=group_size,
        warmup=0.0,
        duration=1.0,
        drain=0.0,
    )


def _window(tally: _Tally) -> None:
    """A measured window around now, so every event counts."""
    now = time.monotonic_ns()
    tally.start_ns = tally.measure_ns = now - 10**9
    tally.end_ns = now + 60 * 10**9


@asynccontextmanager
async def _taken_over(
    first: protocol.Message | None = None,
) -> AsyncIterator[tuple[_Sockets, _Conn, StreamTransport]]:
    """A generator connection past its welcome, its socket in a _Sockets.

    ``first`` arrives together with the Welcome, so the client's transport
    has it buffered when the socket is taken over.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = StreamTransport(
        await trio.open_tcp_stream("127.0.0.1", port), role=protocol.Role.CLIENT
    )
    server = StreamTransport(await listeners[0].accept(), role=protocol.Role.SERVER)
    await listeners[0].aclose()
    await client.send(
        [protocol.Hello(version=protocol.PROTOCOL_VERSION, user=USER, token="t")]
    )
    assert isinstance(await server.receive(), protocol.Hello)
    welcome = protocol.Welcome(
        version=protocol.PROTOCOL_VERSION,
        user=USER,
        session="s",
        server="test",
        partition=0,
        cursor=0,
        max_frame=protocol.DEFAULT_MAX_FRAME_SIZE,
        idle_timeout=60.0,
    )
    await server.send([welcome] if first is None else [welcome, first])
    with trio.fail_after(5):
        while not isinstance(await client.receive(), protocol.Welcome):
            pass
    if first is not None:
        # One write on loopback arrives in one read: the second frame waits
        # in the transport's buffer.
        assert client.connection._decoder.buffered

    tally = _Tally()
    _window(tally)
    sockets = _Sockets(tally)
    conn = _Conn(user=USER, target="someone", transport=client)
    await sockets.add(conn)
    try:
        yield sockets, conn, server
    finally:
        sockets.close()
        await server.aclose()


def _poll_until(sockets: _Sockets, done: Callable[[], object]) -> None:
    deadline = time.monotonic() + 5
    while not done() and time.monotonic() < deadline:
        sockets.poll(0.05)


def test_send_frames_are_the_bytes_protocol_encodes() -> None:
    for group_size, kind in ((0, protocol.Send), (10, protocol.GroupSend)):
        tally = _Tally()
        clock = _Clock(_spec(group_size), 0, [], _Sockets(tally), tally)
        target, body = "rw0n0", "1234 " + "x" * 95
        fields = {"to": target} if kind is protocol.Send else {"group": target}

        assert clock.frame("0.7", target, body) == protocol.encode_frame(
            kind(id="0.7", body=body, **fields)
        )


async def test_acks_and_deliveries_are_counted_with_their_latency() -> None:
    async with _taken_over() as (sockets, conn, server):
        tally = sockets.tally
        due = time.monotonic_ns() - 5_000_000
        conn.pending["0.1"] = due
        await server.send(
            [
                protocol.SendAck(id="0.1", ts=1, positions=((0, 1),)),
                protocol.SendAck(id="unknown", ts=1, positions=((0, 2),)),
                protocol.Deliver(
                    id="9.9",
                    sender="someone",
                    to=USER,
                    body=f"{due} xx",
                    ts=1,
                    partition=0,
                    offset=3,
                ),
                # A group member hears its own message too; that is no delivery.
                protocol.Deliver(
                    id="0.1",
                    sender=USER,
                    group="g",
                    body=f"{due} xx",
                    ts=1,
                    partition=0,
                    offset=4,
                ),
                protocol.GroupInfo(rid=1, group="g", members=(USER,)),
            ]
        )

        _poll_until(sockets, lambda: tally.acked and tally.delivered)
        sockets.poll(0.05)

        assert (tally.acked, tally.delivered) == (1, 1)
        assert conn.pending == {}
        assert tally.ack_ns[0] >= 5_000_000
        (latencies,) = tally.e2e_ns.values()
        assert list(latencies) >= [5_000_000]
        assert sum(row[1] for row in tally.series.values()) == 1
        assert sum(row[2] for row in tally.series.values()) == 1
        assert not tally.errors
        assert tally.disconnects == 0


@pytest.mark.parametrize("buffered", [False, True])
async def test_a_ping_is_answered_with_its_pong(buffered: bool) -> None:
    ping = protocol.Ping(n=7)
    async with _taken_over(ping if buffered else None) as (sockets, _, server):
        assert bool(sockets._early) == buffered
        if not buffered:
            await server.send([ping])
        with trio.fail_after(5):
            while True:
                sockets.poll(0.01)
                with trio.move_on_after(0.01):
                    assert await server.receive() == protocol.Pong(n=7)
                    break


async def test_an_error_is_counted_and_a_fatal_one_ends_the_connection() -> None:
    async with _taken_over() as (sockets, conn, server):
        tally = sockets.tally
        conn.pending["0.1"] = conn.pending["0.2"] = time.monotonic_ns()
        frames: list[protocol.Message] = [
            protocol.Error(code=protocol.ErrorCode.BAD_MESSAGE, id="0.1"),
            protocol.Error(code="overloaded", fatal=True),
            protocol.SendAck(id="0.2", ts=1, positions=((0, 1),)),
        ]
        # Bytes of our own: the server's transport sends nothing after a fatal error.
        await server.stream.send_all(b"".join(map(protocol.encode_frame, frames)))

        _poll_until(sockets, lambda: not conn.open)

        assert tally.errors == {"bad_message": 1, "overloaded": 1}
        assert tally.disconnects == 1
        assert list(conn.pending) == ["0.2"]
        assert tally.acked == 0


@pytest.mark.parametrize(
    ("tail", "error"),
    [(b"", None), (b"\x00\x00\x00\x09\x81", "protocol: bad_frame")],
)
async def test_the_end_of_the_stream_is_a_disconnect(
    tail: bytes, error: str | None
) -> None:
    async with _taken_over() as (sockets, conn, server):
        await server.stream.send_all(tail)
        await server.aclose()

        _poll_until(sockets, lambda: not conn.open)

        assert sockets.tally.disconnects == 1
        assert dict(sockets.tally.errors) == ({} if error is None else {error: 1})


async def test_a_frame_that_is_not_msgpack_is_a_protocol_error() -> None:
    async with _taken_over() as (sockets, conn, server):
        await server.stream.send_all(b"\x00\x00\x00\x01\xc1")

        _poll_until(sockets, lambda: not conn.open)

        assert dict(sockets.tally.errors) == {"protocol: bad_frame": 1}


async def test_frames_a_full_socket_has_no_room_for_go_out_later_in_order() -> None:
    async with _taken_over() as (sockets, conn, server):
        sends = [protocol.Send(id=str(n), to="x", body="y" * 4000) for n in range(1000)]
        chunk = b"".join(map(protocol.encode_frame, sends))
        for _ in range(8):
            sockets.write(conn, chunk)
        assert conn.unsent, "the socket took everything; the test needs more bytes"

        received = 0
        with trio.fail_after(20):
            while received < 8 * len(sends):
                sockets.poll(0)
                with trio.move_on_after(0.001):
                    message = await server.receive()
                    assert message == sends[received % len(sends)]
                    received += 1
        assert not conn.unsent


def test_latencies_recorded_after_the_run_give_the_live_histograms() -> None:
    rng = random.Random(7)
    tally = _Tally(start_ns=10**9)
    live_e2e, live_ack = new_histogram(), new_histogram()
    live_seconds = {second: new_histogram() for second in range(4)}
    for _ in range(5000):
        second = rng.randrange(4)
        now = tally.start_ns + second * 10**9 + rng.randrange(10**9)
        latency = max(LOWEST_NS, int(rng.lognormvariate(15, 2)))
        tally.record_delivery(now, latency)
        live_e2e.record_value(latency)
        live_seconds[second].record_value(latency)
        tally.ack_ns.append(latency // 2)
        live_ack.record_value(latency // 2)

    e2e, ack, series_p99 = tally.histograms()

    assert e2e.encode() == live_e2e.encode()
    assert ack.encode() == live_ack.encode()
    assert {s: h.encode() for s, h in series_p99.items()} == {
        s: h.encode() for s, h in live_seconds.items()
    }
    assert e2e.get_value_at_percentile(99) == live_e2e.get_value_at_percentile(99)
