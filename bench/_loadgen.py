"""One load generator process: its connections, its clock, its histograms."""

from __future__ import annotations

import math
import time
from array import array
from collections import Counter
from typing import Any

import attrs
import trio
from hdrh.histogram import HdrHistogram

import protocol
from msgnet._auth import mint_token
from msgnet._transport import StreamTransport

from ._support import raise_nofile

__all__ = ["LoadSpec", "new_histogram", "run_worker"]

TICK = 0.001
"""Seconds between the clock's ticks; every send due by a tick goes out at it."""

HANDSHAKE_CONCURRENCY = 64
"""Connections opened at once during ramp-up."""

LOWEST_NS, HIGHEST_NS = 1_000, 120 * 10**9
"""Histogram range: 1 microsecond to 2 minutes, 3 significant digits."""


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_NS, HIGHEST_NS, 3)


@attrs.frozen(kw_only=True)
class LoadSpec:
    """Everything a worker needs to know; sent to it when it starts."""

    host: str
    port: int
    secret: str
    run_id: str
    connections: int
    """Connections of this worker; each one both sends and receives."""
    rate: float
    """Messages per second this worker offers."""
    size: int
    """Body length in characters (the send timestamp is at its start)."""
    group_size: int
    """0 for one-to-one traffic; else each send goes to a group of this many."""
    warmup: float
    duration: float
    drain: float
    """Seconds after the last send to wait for outstanding acks and deliveries."""


@attrs.define(eq=False)
class _Conn:
    user: str
    target: str
    transport: StreamTransport
    pending: dict[str, int] = attrs.field(factory=dict)
    """Message id -> the monotonic ns it was scheduled at, until acknowledged."""


@attrs.define(eq=False)
class _Tally:
    """What a worker measures; times are monotonic nanoseconds.

    Latencies are kept as plain numbers while the load runs and go into the
    histograms only afterwards (``histograms``): recording a value is pure
    Python in ``hdrh`` and would take the server's CPU three times a message,
    where appending to an array costs a tenth of that. The histograms come out
    the same, since the order values are recorded in does not matter.
    """

    start_ns: int = 0
    measure_ns: int = 0
    end_ns: int = 0
    e2e_ns: dict[int, array[int]] = attrs.field(factory=dict)
    """Second since start -> end-to-end latencies of deliveries decoded in it."""
    ack_ns: array[int] = attrs.field(factory=lambda: array("q"))
    offered: int = 0
    acked: int = 0
    delivered: int = 0
    expected: int = 0
    sent_total: int = 0
    errors: Counter[str] = attrs.field(factory=Counter)
    disconnects: int = 0
    series: dict[int, list[int]] = attrs.field(factory=dict)
    """Second since start -> [offered, acked, delivered] events in that second."""

    def in_window(self, due: int) -> bool:
        return self.measure_ns <= due < self.end_ns

    def bucket(self, now: int) -> list[int]:
        second = (now - self.start_ns) // 10**9
        row = self.series.get(second)
        if row is None:
            row = self.series[second] = [0, 0, 0]
        return row

    def record_delivery(self, now: int, latency: int) -> None:
        """Keep the latency of a delivery in the window, decoded at ``now``."""
        second = (now - self.start_ns) // 10**9
        latencies = self.e2e_ns.get(second)
        if latencies is None:
            latencies = self.e2e_ns[second] = array("q")
        latencies.append(latency)

    def histograms(self) -> tuple[HdrHistogram, HdrHistogram, dict[int, HdrHistogram]]:
        """End-to-end, ack, and each second's end-to-end histogram."""
        e2e, ack = new_histogram(), new_histogram()
        series_p99 = {}
        for second, latencies in self.e2e_ns.items():
            histogram = series_p99[second] = new_histogram()
            for latency in latencies:
                e2e.record_value(latency)
                histogram.record_value(latency)
        for latency in self.ack_ns:
            ack.record_value(latency)
        return e2e, ack, series_p99


def _body(due_ns: int, size: int) -> str:
    stamp = f"{due_ns} "
    return stamp + "x" * max(0, size - len(stamp))


def _users(spec: LoadSpec, worker: int) -> list[str]:
    return [f"b{spec.run_id}w{worker}u{i}" for i in range(spec.connections)]


def _targets(spec: LoadSpec, worker: int, users: list[str]) -> list[str]:
    """Whom each connection sends to: the next user, or its group."""
    if spec.group_size == 0:
        return [users[(i + 1) % len(users)] for i in range(len(users))]
    return [
        f"g{spec.run_id}w{worker}n{i // spec.group_size}" for i in range(len(users))
    ]


async def _request(transport: StreamTransport, message: protocol.Message) -> Any:
    await transport.send([message])
    while True:
        reply = await transport.receive()
        if reply is None:
            raise ConnectionError(f"server closed the connection after {message!r}")
        if isinstance(reply, protocol.Error):
            raise ConnectionError(f"server refused {message!r}: {reply.text}")
        if not isinstance(reply, protocol.Ping):
            return reply


async def _connect(spec: LoadSpec, user: str, target: str) -> _Conn:
    stream = await trio.open_tcp_stream(spec.host, spec.port)
    transport = StreamTransport(stream, role=protocol.Role.CLIENT)
    hello = protocol.Hello(
        version=protocol.PROTOCOL_VERSION,
        user=user,
        token=mint_token(spec.secret, user, ttl=24 * 3600),
        device="bench",
        resume=None,
    )
    with trio.fail_after(30):
        welcome = await _request(transport, hello)
    if not isinstance(welcome, protocol.Welcome):
        raise ConnectionError(f"expected Welcome for {user!r}, got {welcome!r}")
    return _Conn(user=user, target=target, transport=transport)


async def _open_all(
    spec: LoadSpec, worker: int, tally: _Tally
) -> tuple[list[_Conn], list[float]]:
    """Open every connection, a few at a time; returns them and when each opened."""
    users = _users(spec, worker)
    targets = _targets(spec, worker, users)
    conns: list[_Conn | None] = [None] * len(users)
    opened: list[float] = []
    limiter = trio.CapacityLimiter(HANDSHAKE_CONCURRENCY)

    async def open_one(i: int) -> None:
        async with limiter:
            try:
                conns[i] = await _connect(spec, users[i], targets[i])
            except (OSError, ConnectionError, trio.TooSlowError) as exc:
                tally.errors[f"connect: {type(exc).__name__}"] += 1
                return
            opened.append(time.monotonic())

    async with trio.open_nursery() as nursery:
        for i in range(len(users)):
            nursery.start_soon(open_one, i)

    ready = [conn for conn in conns if conn is not None]
    if spec.group_size:
        for leader in range(0, len(users), spec.group_size):
            conn = conns[leader]
            if conn is None:
                continue
            members = users[leader : leader + spec.group_size]
            await _request(
                conn.transport,
                protocol.GroupCreate(
                    rid=leader + 1, group=conn.target, members=members
                ),
            )
    return ready, opened


async def _read(conn: _Conn, tally: _Tally) -> None:
    transport = conn.transport
    try:
        while True:
            message = await transport.receive()
            now = time.monotonic_ns()
            if message is None:
                break
            if isinstance(message, protocol.Deliver):
                if message.sender == conn.user:
                    continue
                due = int(message.body.split(" ", 1)[0])
                tally.bucket(now)[2] += 1
                if tally.in_window(due):
                    tally.delivered += 1
                    tally.record_delivery(now, max(LOWEST_NS, now - due))
            elif isinstance(message, protocol.SendAck):
                scheduled = conn.pending.pop(message.id, None)
                if scheduled is None:
                    continue
                tally.bucket(now)[1] += 1
                if tally.in_window(scheduled):
                    tally.acked += 1
                    tally.ack_ns.append(max(LOWEST_NS, now - scheduled))
            elif isinstance(message, protocol.Error):
                tally.errors[str(message.code)] += 1
                if message.id is not None:
                    conn.pending.pop(message.id, None)
                if message.fatal:
                    break
            elif isinstance(message, protocol.Ping):
                await transport.send([protocol.Pong(n=message.n)])
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        tally.errors[f"read: {type(exc).__name__}"] += 1
    except protocol.RemoteProtocolError as exc:
        tally.errors[f"protocol: {exc.code}"] += 1
    tally.disconnects += 1


async def _write(conn: _Conn, batches: trio.MemoryReceiveChannel[list[Any]]) -> None:
    try:
        async for batch in batches:
            await conn.transport.send(batch)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _clock(
    spec: LoadSpec,
    worker: int,
    conns: list[_Conn],
    channels: list[trio.MemorySendChannel[list[Any]]],
    tally: _Tally,
) -> None:
    """Schedule sends at fixed intervals, whatever the server answers.

    Message k is due at start + k / rate. Every tick sends all that are due,
    stamped with their due time, not the time they went out: if the generator
    or the server stalls, the stall shows up in the latency of every message
    that should have been sent meanwhile.
    """
    interval_ns = 10**9 / spec.rate
    fanouts = [1] * len(conns)
    if spec.group_size:
        members = Counter(conn.target for conn in conns)
        fanouts = [members[conn.target] - 1 for conn in conns]
    size = spec.size
    k = 0
    group = spec.group_size != 0
    while True:
        now = time.monotonic_ns()
        last = min(
            math.floor((now - tally.start_ns) / interval_ns),
            math.ceil((tally.end_ns - tally.start_ns) / interval_ns) - 1,
        )
        batches: dict[int, list[Any]] = {}
        while k <= last:
            due = tally.start_ns + int(k * interval_ns)
            index = k % len(conns)
            conn = conns[index]
            message_id = f"{worker}.{k}"
            body = _body(due, size)
            message: Any = (
                protocol.GroupSend(id=message_id, group=conn.target, body=body)
                if group
                else protocol.Send(id=message_id, to=conn.target, body=body)
            )
            conn.pending[message_id] = due
            batches.setdefault(index, []).append(message)
            if tally.in_window(due):
                tally.offered += 1
                tally.expected += fanouts[index]
            tally.sent_total += 1
            k += 1
        if batches:
            tally.bucket(now)[0] += sum(len(batch) for batch in batches.values())
            for index, batch in batches.items():
                channels[index].send_nowait(batch)
        if tally.start_ns + k * interval_ns >= tally.end_ns:
            return
        await trio.sleep(TICK)


async def _run(
    spec: LoadSpec, worker: int, control: Any, progress: Any
) -> dict[str, Any]:
    tally = _Tally()
    ramp_started = time.monotonic()
    conns, opened = await _open_all(spec, worker, tally)
    ramp = {
        "connections": len(conns),
        "seconds": (max(opened) - ramp_started) if opened else 0.0,
        "opened_at": [t - ramp_started for t in opened],
    }
    control.send(("ready", len(conns)))
    start_ns = await trio.to_thread.run_sync(control.recv)
    tally.start_ns = start_ns
    tally.measure_ns = start_ns + int(spec.warmup * 1e9)
    tally.end_ns = tally.measure_ns + int(spec.duration * 1e9)

    async with trio.open_nursery() as nursery:
        channels = []
        for conn in conns:
            send_channel, receive_channel = trio.open_memory_channel[list[Any]](
                math.inf
            )
            channels.append(send_channel)
            nursery.start_soon(_read, conn, tally)
            nursery.start_soon(_write, conn, receive_channel)

        async def report() -> None:
            while True:
                progress.put((worker, tally.sent_total, tally.delivered))
                await trio.sleep(0.5)

        nursery.start_soon(report)
        await trio.sleep_until(
            trio.current_time() + (start_ns - time.monotonic_ns()) / 1e9
        )
        if conns:
            await _clock(spec, worker, conns, channels, tally)
        # Wait for what is still in flight, up to the drain time.
        with trio.move_on_after(
            (tally.end_ns - time.monotonic_ns()) / 1e9 + spec.drain
        ):
            while tally.delivered < tally.expected or tally.acked < tally.offered:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    for conn in conns:
        await conn.transport.aclose()

    e2e, ack, series_p99 = tally.histograms()
    return {
        "ramp": ramp,
        "offered": tally.offered,
        "acked": tally.acked,
        "delivered": tally.delivered,
        "expected": tally.expected,
        "errors": dict(tally.errors),
        "disconnects": tally.disconnects,
        "e2e": e2e.encode(),
        "ack": ack.encode(),
        "series": {str(k): v for k, v in tally.series.items()},
        "series_p99": {str(k): h.encode() for k, h in series_p99.items()},
    }


def run_worker(spec: LoadSpec, worker: int, control: Any, progress: Any) -> None:
    """Process entry point: connect, wait for the common start, run, report."""
    raise_nofile()
    result = trio.run(_run, spec, worker, control, progress)
    control.send(("result", result))
