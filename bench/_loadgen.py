"""One load generator process: its connections, its clock, its histograms."""

from __future__ import annotations

import math
import selectors
import socket
import struct
import time
from array import array
from collections import Counter
from typing import Any

import attrs
import msgpack
import trio
from hdrh.histogram import HdrHistogram

import protocol
from msgnet._auth import mint_token
from msgnet._transport import StreamTransport

from ._support import raise_nofile

__all__ = ["LoadSpec", "new_histogram", "run_worker"]

TICK_NS = 1_000_000
"""Longest a send waits past its due time: the clock's timer fires no more often."""

REPORT_NS = 500_000_000
"""Nanoseconds between progress reports to the parent."""

RECEIVE_SIZE = 64 * 1024
"""Most bytes taken from a socket at once, as msgnet's own transport reads."""

HANDSHAKE_CONCURRENCY = 64
"""Connections opened at once during ramp-up."""

LOWEST_NS, HIGHEST_NS = 1_000, 120 * 10**9
"""Histogram range: 1 microsecond to 2 minutes, 3 significant digits."""

_unpackb = msgpack.unpackb
_pack_length = struct.Struct(">I").pack


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
    """The connection through its handshake; ``_Sockets.add`` then takes it over."""
    pending: dict[str, int] = attrs.field(factory=dict)
    """Message id -> the monotonic ns it was scheduled at, until acknowledged."""
    sock: socket.socket | None = None
    decoder: protocol.FrameDecoder = attrs.field(factory=protocol.FrameDecoder)
    unsent: bytearray = attrs.field(factory=bytearray)
    """Bytes the socket had no room for yet; later frames queue behind them."""
    open: bool = True
    """False once the server closed it, broke it, or sent a fatal Error."""


@attrs.define(eq=False)
class _Tally:
    """What a worker measures; times are monotonic nanoseconds.

    Latencies are kept as plain numbers while the load runs and go into the
    histograms only afterwards (``histograms``): recording a value is pure
    Python in ``hdrh`` and would take the server's CPU three times a message,
    where appending to an array costs a twentieth of that. The histograms come out
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


class _Sockets:
    """Every connection's socket in one selector, read and written by one loop.

    msgnet's transport costs a task, a trip through trio's scheduler, a
    registration with its epoll and several layers of stream wrappers for
    every read and every write; with a send, an ack and a delivery per
    message, that was most of the generator's CPU, all of it taken from the
    server on a shared machine. Here one wait on the selector reads every
    socket that has bytes, and the clock writes each tick's frames straight
    into the sockets, queueing only what a full socket has no room for.
    """

    def __init__(self, tally: _Tally) -> None:
        self.tally = tally
        self.selector = selectors.DefaultSelector()
        self._conns: list[_Conn] = []
        self._early: list[tuple[_Conn, protocol.Message]] = []

    async def add(self, conn: _Conn) -> None:
        """Take the connection's socket over from its transport, once set up."""
        transport = conn.transport
        stream = transport.stream
        assert isinstance(stream, trio.SocketStream)
        conn.sock = socket.fromfd(
            stream.socket.fileno(), stream.socket.family, stream.socket.type
        )
        conn.sock.setblocking(False)
        self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        self._conns.append(conn)
        try:
            # Frames that came in with the handshake's replies are read here.
            while (message := transport.buffered()) is not None:
                self._early.append((conn, message))
        except protocol.RemoteProtocolError as exc:
            self._lose(conn, f"protocol: {exc.code}")
        # The socket above is a duplicate, so closing the transport's own
        # leaves the TCP connection open.
        await transport.aclose()

    def poll(self, timeout: float) -> None:
        """Wait up to timeout seconds for sockets to be ready, and serve them."""
        if self._early:
            for conn, message in self._early:
                self._message(conn, message, time.monotonic_ns())
            self._early.clear()
        for key, events in self.selector.select(timeout):
            conn = key.data
            if events & selectors.EVENT_WRITE:
                self._flush(conn)
            if events & selectors.EVENT_READ and conn.open:
                self._receive(conn)

    def write(self, conn: _Conn, data: bytes) -> None:
        """Send data now, or as soon as the socket has room for it."""
        if not conn.open or conn.sock is None:
            return
        if conn.unsent:
            conn.unsent += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # The read that follows finds the broken connection and counts it.
            return
        if sent < len(data):
            conn.unsent += memoryview(data)[sent:]
            self.selector.modify(
                conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn
            )

    def close(self) -> None:
        self.selector.close()
        for conn in self._conns:
            assert conn.sock is not None
            conn.sock.close()

    def _flush(self, conn: _Conn) -> None:
        assert conn.sock is not None
        try:
            sent = conn.sock.send(conn.unsent)
        except BlockingIOError:
            return
        except OSError:
            sent = len(conn.unsent)
        del conn.unsent[:sent]
        if not conn.unsent:
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _lose(self, conn: _Conn, error: str | None) -> None:
        """The connection is over: count it, and read and write it no more."""
        if error is not None:
            self.tally.errors[error] += 1
        self.tally.disconnects += 1
        if conn.open:
            assert conn.sock is not None
            conn.open = False
            conn.unsent.clear()
            self.selector.unregister(conn.sock)

    def _receive(self, conn: _Conn) -> None:
        assert conn.sock is not None
        try:
            data = conn.sock.recv(RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError:
            # The name trio's stream gives a failed read, so the error counts
            # read as they did when the generator read through it.
            self._lose(conn, "read: BrokenResourceError")
            return
        decoder = conn.decoder
        if not data:
            # The end of the stream, clean or inside a frame.
            self._lose(
                conn,
                f"protocol: {protocol.ErrorCode.BAD_FRAME}"
                if decoder.buffered
                else None,
            )
            return
        decoder.feed(data)
        try:
            while conn.open and (frame := decoder.next_frame()) is not None:
                now = time.monotonic_ns()
                # Deliveries and acks, nearly every frame, are read straight
                # from msgpack's map, without the checks and the message
                # object protocol.decode_message makes (three times the cost);
                # the rest, and anything odd, go the whole way.
                try:
                    fields = _unpackb(frame)
                except (ValueError, TypeError, msgpack.UnpackException):
                    fields = None
                if type(fields) is dict:
                    tag = fields.get("t")
                    if tag == "deliver":
                        sender, body = fields.get("from"), fields.get("body")
                        if type(sender) is str and type(body) is str:
                            self._delivered(conn, sender, body, now)
                            continue
                    elif tag == "send_ack":
                        message_id = fields.get("id")
                        if type(message_id) is str:
                            self._acked(conn, message_id, now)
                            continue
                self._message(conn, protocol.decode_message(frame), now)
        except protocol.RemoteProtocolError as exc:
            self._lose(conn, f"protocol: {exc.code}")

    def _delivered(self, conn: _Conn, sender: str, body: str, now: int) -> None:
        if sender == conn.user:
            return
        tally = self.tally
        due = int(body.split(" ", 1)[0])
        tally.bucket(now)[2] += 1
        if tally.in_window(due):
            tally.delivered += 1
            tally.record_delivery(now, max(LOWEST_NS, now - due))

    def _acked(self, conn: _Conn, message_id: str, now: int) -> None:
        scheduled = conn.pending.pop(message_id, None)
        if scheduled is None:
            return
        tally = self.tally
        tally.bucket(now)[1] += 1
        if tally.in_window(scheduled):
            tally.acked += 1
            tally.ack_ns.append(max(LOWEST_NS, now - scheduled))

    def _message(self, conn: _Conn, message: protocol.Message, now: int) -> None:
        if isinstance(message, protocol.Deliver):
            self._delivered(conn, message.sender, message.body, now)
        elif isinstance(message, protocol.SendAck):
            self._acked(conn, message.id, now)
        elif isinstance(message, protocol.Error):
            self.tally.errors[str(message.code)] += 1
            if message.id is not None:
                conn.pending.pop(message.id, None)
            if message.fatal:
                self._lose(conn, None)
        elif isinstance(message, protocol.Ping):
            self.write(conn, protocol.encode_frame(protocol.Pong(n=message.n)))


class _Clock:
    """Schedules sends at fixed intervals, whatever the server answers.

    Message k is due at start + k / rate. ``send_due`` sends all that are
    due, stamped with their due time, not the time they went out: if the
    generator or the server stalls, the stall shows up in the latency of every
    message that should have been sent meanwhile.
    """

    def __init__(
        self,
        spec: LoadSpec,
        worker: int,
        conns: list[_Conn],
        sockets: _Sockets,
        tally: _Tally,
    ) -> None:
        self.worker = worker
        self.conns = conns
        self.sockets = sockets
        self.tally = tally
        self.size = spec.size
        self._tag, self._to = ("gsend", "group") if spec.group_size else ("send", "to")
        self._pack = msgpack.Packer().pack
        self.interval_ns = 10**9 / spec.rate
        self.count = math.ceil((tally.end_ns - tally.start_ns) / self.interval_ns)
        """How many messages the run sends, all told."""
        self.fanouts = [1] * len(conns)
        if spec.group_size:
            members = Counter(conn.target for conn in conns)
            self.fanouts = [members[conn.target] - 1 for conn in conns]
        self.k = 0
        """The next message to send."""
        self.next_due = tally.start_ns if conns else None
        """When message k is due; None once every message is sent."""

    def send_due(self, now: int) -> None:
        """Send every message due by now."""
        tally = self.tally
        conns = self.conns
        start_ns, interval_ns = tally.start_ns, self.interval_ns
        last = min(math.floor((now - start_ns) / interval_ns), self.count - 1)
        k = self.k
        batches: dict[int, bytes] = {}
        while k <= last:
            due = start_ns + int(k * interval_ns)
            index = k % len(conns)
            conn = conns[index]
            message_id = f"{self.worker}.{k}"
            conn.pending[message_id] = due
            frame = self.frame(message_id, conn.target, _body(due, self.size))
            batches[index] = batches.get(index, b"") + frame
            if tally.measure_ns <= due < tally.end_ns:
                tally.offered += 1
                tally.expected += self.fanouts[index]
            k += 1
        if k == self.k:
            return
        tally.bucket(now)[0] += k - self.k
        tally.sent_total += k - self.k
        self.k = k
        self.next_due = start_ns + int(k * interval_ns) if k < self.count else None
        for index, batch in batches.items():
            self.sockets.write(conns[index], batch)

    def frame(self, message_id: str, target: str, body: str) -> bytes:
        """The frame of a Send, or a GroupSend, to target.

        These are the bytes ``protocol.encode_frame`` writes for the message
        (tests/test_loadgen.py holds the two to it), packed from a plain map:
        building and checking a message object for every send cost four times
        as much.
        """
        data: bytes = self._pack(
            {"t": self._tag, "id": message_id, self._to: target, "body": body}
        )
        return _pack_length(len(data)) + data


def _drive(
    clock: _Clock, sockets: _Sockets, tally: _Tally, drain: float, report: Any
) -> None:
    """Run the load and the drain after it, all in one loop on the selector.

    One wait serves the clock and every socket: the clock sends whatever is
    due each time the loop wakes for bytes, so at high rates its own timer
    seldom fires, and at low rates the loop sleeps until the next message is
    due. Either way a send goes out no more than about TICK_NS after it is
    due (epoll's timeout counts whole milliseconds, rounded up).
    """
    drain_until = tally.end_ns + int(drain * 1e9)
    report_at = 0
    while True:
        now = time.monotonic_ns()
        if clock.next_due is not None and clock.next_due <= now:
            clock.send_due(now)
        if now >= report_at:
            report()
            report_at = now + REPORT_NS
        if clock.next_due is not None:
            wake = max(clock.next_due, now + TICK_NS)
        elif now >= drain_until:
            return
        elif tally.delivered >= tally.expected and tally.acked >= tally.offered:
            # Everything is in; the run still lasts the measured window, over
            # which the parent reads this process's CPU.
            if now >= tally.end_ns:
                return
            wake = tally.end_ns
        else:
            wake = drain_until
        sockets.poll(max(0, min(wake, report_at) - time.monotonic_ns()) / 1e9)


async def _set_up(
    spec: LoadSpec, worker: int, tally: _Tally
) -> tuple[list[_Conn], _Sockets, dict[str, Any]]:
    """Open the connections, and hand their sockets to a _Sockets."""
    ramp_started = time.monotonic()
    conns, opened = await _open_all(spec, worker, tally)
    ramp = {
        "connections": len(conns),
        "seconds": (max(opened) - ramp_started) if opened else 0.0,
        "opened_at": [t - ramp_started for t in opened],
    }
    sockets = _Sockets(tally)
    for conn in conns:
        await sockets.add(conn)
    return conns, sockets, ramp


def run_worker(spec: LoadSpec, worker: int, control: Any, progress: Any) -> None:
    """Process entry point: connect, wait for the common start, run, report.

    trio opens the connections, many at once; the run itself is one loop on
    a selector (``_drive``), since trio's scheduler round for every tick and
    every wake-up cost more CPU than the run's own work, all of it taken
    from the server on a shared machine.
    """
    raise_nofile()
    tally = _Tally()
    conns, sockets, ramp = trio.run(_set_up, spec, worker, tally)
    control.send(("ready", len(conns)))
    start_ns = control.recv()
    tally.start_ns = start_ns
    tally.measure_ns = start_ns + int(spec.warmup * 1e9)
    tally.end_ns = tally.measure_ns + int(spec.duration * 1e9)

    clock = _Clock(spec, worker, conns, sockets, tally)
    _drive(
        clock,
        sockets,
        tally,
        spec.drain,
        lambda: progress.put((worker, tally.sent_total, tally.delivered)),
    )
    sockets.close()

    e2e, ack, series_p99 = tally.histograms()
    result = {
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
    control.send(("result", result))
