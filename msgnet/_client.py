"""The trio client library: connect, send, receive, resume, dedupe, reconnect."""

from __future__ import annotations

import itertools
import logging
import math
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

import protocol
from protocol import ErrorCode

from ._transport import StreamTransport

__all__ = [
    "Client",
    "ConnectionLost",
    "RequestFailed",
    "ServerRefused",
    "open_client",
]

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 4
DEDUPE_WINDOW = 100_000
"""How many (sender, id) pairs the client remembers to drop redelivered copies."""

RECONNECT_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
"""Backoff between reconnect attempts; the last value repeats."""


class ServerRefused(Exception):
    """The server ended the connection with an Error frame (bad token, full, ...)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class RequestFailed(Exception):
    """One request was refused with a non-fatal Error; the connection goes on."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class ConnectionLost(Exception):
    """The connection ended and the client does not reconnect (or gave up)."""


@attrs.define(eq=False)
class _Waiter:
    """A request in flight: the frame to (re)send and where its answer goes."""

    request: protocol.Message
    done: trio.Event = attrs.field(factory=trio.Event)
    reply: Any = None
    error: Exception | None = None

    def resolve(self, reply: Any = None, error: Exception | None = None) -> None:
        if not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()


class Client:
    """One device of one user, connected to the server that owns its partition.

    Delivery is at-least-once on the wire and exactly once to the application:
    ``receive`` drops copies of a (sender, id) it has already returned. With
    ``reconnect`` on, a lost connection is re-established with the cursor of
    the last delivery, unacknowledged sends are sent again with their ids, and
    callers only see the delay.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        user: str,
        token: str,
        device: str = "default",
        resume: int | None = None,
        reconnect: bool = False,
        connect_timeout: float = 10.0,
        reconnect_give_up: float = 60.0,
        max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.user = user
        self.device = device
        self.cursor = resume
        """The offset after the last delivery received: where to resume from."""
        self.welcome: protocol.Welcome | None = None
        self.address = (host, port)
        """The server currently connected to (after redirects)."""
        self._entry = (host, port)
        self._token = token
        self._reconnect = reconnect
        self._connect_timeout = connect_timeout
        self._give_up = reconnect_give_up
        self._max_frame_size = max_frame_size
        self._transport: StreamTransport | None = None
        self._write_lock = trio.StrictFIFOLock()
        self._connected = trio.Event()
        self._closed = False
        self._lost: Exception | None = None
        self._sends: dict[str, _Waiter] = {}
        self._requests: dict[int, _Waiter] = {}
        self._pongs: dict[int, _Waiter] = {}
        self._rids = itertools.count(1)
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._deliveries_in, self._deliveries_out = trio.open_memory_channel[
            protocol.Deliver
        ](math.inf)
        self.reconnects = 0
        self._last_heard = trio.current_time()
        self.duplicates_dropped = 0

    # --- public API --------------------------------------------------------------

    async def send(
        self, to: str, body: str, *, id: str | None = None
    ) -> protocol.SendAck:
        """Send a one-to-one message; returns once the server says it is durable."""
        message = protocol.Send(id=id or uuid.uuid4().hex, to=to, body=body)
        ack: protocol.SendAck = await self._await_send(message)
        return ack

    async def send_group(
        self, group: str, body: str, *, id: str | None = None
    ) -> protocol.SendAck:
        """Send to every member of ``group``; returns once every copy is durable."""
        message = protocol.GroupSend(id=id or uuid.uuid4().hex, group=group, body=body)
        ack: protocol.SendAck = await self._await_send(message)
        return ack

    async def receive(self) -> protocol.Deliver:
        """The next message for this user, never one already returned."""
        try:
            return await self._deliveries_out.receive()
        except trio.EndOfChannel:
            raise ConnectionLost(str(self._lost or "client closed")) from self._lost

    # An iterator object rather than an async generator: a caller that breaks
    # out of ``async for`` leaves nothing behind for the garbage collector to
    # finalize outside trio.
    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> protocol.Deliver:
        try:
            return await self.receive()
        except ConnectionLost:
            raise StopAsyncIteration from None

    async def ack(self) -> None:
        """Tell the server how far this device has read (resume point if none given)."""
        if self.cursor is not None:
            await self._write([protocol.DeliveryAck(cursor=self.cursor)])

    async def ping(self) -> float:
        """Round trip to the server; returns the seconds it took.

        The server answers a connection's frames in order, so a pong also
        proves that every earlier frame has been handled.
        """
        started = trio.current_time()
        n = next(self._rids) % 2**32
        waiter = _Waiter(protocol.Ping(n=n))
        self._pongs[n] = waiter
        try:
            await self._write_if_connected([waiter.request])
            await waiter.done.wait()
        finally:
            del self._pongs[n]
        if waiter.error is not None:
            raise waiter.error
        return trio.current_time() - started

    async def history(
        self,
        *,
        peer: str | None = None,
        group: str | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> protocol.HistoryPage:
        """One page of a conversation's stored history, oldest message first."""
        page: protocol.HistoryPage = await self._request(
            lambda rid: protocol.HistoryRequest(
                rid=rid, peer=peer, group=group, before=before, limit=limit
            )
        )
        return page

    async def create_group(
        self, group: str, members: Sequence[str] = ()
    ) -> tuple[str, ...]:
        info: protocol.GroupInfo = await self._request(
            lambda rid: protocol.GroupCreate(
                rid=rid, group=group, members=list(members)
            )
        )
        return tuple(info.members)

    async def join_group(self, group: str) -> tuple[str, ...]:
        info: protocol.GroupInfo = await self._request(
            lambda rid: protocol.GroupJoin(rid=rid, group=group)
        )
        return tuple(info.members)

    async def leave_group(self, group: str) -> tuple[str, ...]:
        info: protocol.GroupInfo = await self._request(
            lambda rid: protocol.GroupLeave(rid=rid, group=group)
        )
        return tuple(info.members)

    async def group_members(self, group: str) -> tuple[str, ...]:
        info: protocol.GroupInfo = await self._request(
            lambda rid: protocol.GroupMembers(rid=rid, group=group)
        )
        return tuple(info.members)

    # --- requests ------------------------------------------------------------------

    async def _await_send(self, message: protocol.Send | protocol.GroupSend) -> Any:
        if message.id in self._sends:
            raise ValueError(f"message id {message.id!r} is already in flight")
        waiter = _Waiter(message)
        self._sends[message.id] = waiter
        try:
            await self._write_if_connected([message])
            await waiter.done.wait()
        finally:
            del self._sends[message.id]
        if waiter.error is not None:
            raise waiter.error
        return waiter.reply

    async def _request(self, build: Any) -> Any:
        rid = next(self._rids) % 2**32
        waiter = _Waiter(build(rid))
        self._requests[rid] = waiter
        try:
            await self._write_if_connected([waiter.request])
            await waiter.done.wait()
        finally:
            del self._requests[rid]
        if waiter.error is not None:
            raise waiter.error
        return waiter.reply

    async def _write_if_connected(self, messages: list[protocol.Message]) -> None:
        """Write now, or leave it to the reconnect, which resends what is pending."""
        if self._lost is not None:
            raise ConnectionLost(str(self._lost)) from self._lost
        try:
            await self._write(messages)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if not self._reconnect:
                raise ConnectionLost("connection closed while sending") from None

    async def _write(
        self, messages: list[protocol.Message], *, goodbye: bool = False
    ) -> None:
        async with self._write_lock:
            if self._transport is None:
                raise trio.ClosedResourceError("not connected")
            if self._closed and not goodbye:
                # A write that waited for the lock while aclose said goodbye:
                # the connection takes nothing after a Goodbye.
                raise trio.ClosedResourceError("client closed")
            await self._transport.send(messages)

    # --- connection --------------------------------------------------------------

    async def _dial(self) -> tuple[StreamTransport, protocol.Welcome]:
        """Connect and say hello, following redirects to the partition's owner."""
        host, port = self._entry if self._transport is None else self.address
        for _ in range(MAX_REDIRECTS + 1):
            stream = await trio.open_tcp_stream(host, port)
            transport = StreamTransport(
                stream, role=protocol.Role.CLIENT, max_frame_size=self._max_frame_size
            )
            try:
                hello = protocol.Hello(
                    version=protocol.PROTOCOL_VERSION,
                    user=self.user,
                    token=self._token,
                    device=self.device,
                    resume=self.cursor,
                )
                with trio.fail_after(self._connect_timeout):
                    await transport.send([hello])
                    reply = await transport.receive()
            except BaseException:
                await transport.aclose()
                raise
            if isinstance(reply, protocol.Welcome):
                self.address = (host, port)
                return transport, reply
            await transport.aclose()
            if isinstance(reply, protocol.Redirect):
                logger.debug("redirected to %s:%d", reply.host, reply.port)
                host, port = reply.host, reply.port
                continue
            if isinstance(reply, protocol.Error):
                raise ServerRefused(str(reply.code), reply.text)
            raise ConnectionLost(
                f"server closed the connection during hello: {reply!r}"
            )
        raise ConnectionLost(f"more than {MAX_REDIRECTS} redirects")

    async def _connect(self) -> None:
        transport, welcome = await self._dial()
        self._transport, self.welcome = transport, welcome
        self._last_heard = trio.current_time()
        if self.cursor is None:
            self.cursor = welcome.cursor

    async def _run(self) -> None:
        """Read the connection; on loss, reconnect (if enabled) and resend."""
        while True:
            try:
                await self._read_until_closed()
                error: Exception = ConnectionLost("server closed the connection")
            except ServerRefused as refused:
                error = refused
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                protocol.RemoteProtocolError,
            ) as exc:
                error = ConnectionLost(f"connection lost: {exc}")
            if self._closed:
                return
            if not self._reconnect or (
                isinstance(error, ServerRefused) and error.code == ErrorCode.AUTH_FAILED
            ):
                self._fail_all(error)
                return
            await self._reestablish(error)

    async def _reestablish(self, error: Exception) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.aclose()
        logger.debug("reconnecting user=%s after %s", self.user, error)
        deadline = trio.current_time() + self._give_up
        for attempt in itertools.count():
            await trio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
            try:
                await self._connect()
                break
            except (
                OSError,
                ConnectionLost,
                ServerRefused,
                trio.TooSlowError,
                protocol.RemoteProtocolError,
            ) as exc:
                # Try the entry address again: the owner may have moved.
                self.address = self._entry
                if trio.current_time() > deadline:
                    self._fail_all(ConnectionLost(f"gave up reconnecting: {exc}"))
                    return
        self.reconnects += 1
        pending = [w.request for w in self._sends.values()]
        pending += [w.request for w in self._requests.values()]
        pending += [w.request for w in self._pongs.values()]
        if pending:
            await self._write(pending)

    async def _read_until_closed(self) -> None:
        transport = self._transport
        assert transport is not None
        while True:
            message = await transport.receive()
            self._last_heard = trio.current_time()
            if message is None or isinstance(message, protocol.Goodbye):
                return
            self._dispatch(message)

    async def _watch_liveness(self) -> None:
        """Drop a connection whose server has gone silent, so it can be replaced.

        The server pings an idle client, so long silence means the server is
        paused, cut off, or gone without closing the connection. Closing
        the transport wakes the reader, which then reconnects (if enabled).
        """
        while True:
            # Twice the server's idle timeout: a live server pings well within
            # one, so only a server that is really gone gets dropped.
            timeout = 2 * (self.welcome.idle_timeout if self.welcome else 60.0)
            await trio.sleep(timeout / 4)
            transport = self._transport
            if transport is not None and (
                trio.current_time() - self._last_heard > timeout
            ):
                logger.debug("server silent for %.1fs; reconnecting", timeout)
                await transport.aclose()

    def _dispatch(self, message: protocol.Message) -> None:
        if isinstance(message, protocol.Deliver):
            self._on_deliver(message)
        elif isinstance(message, protocol.SendAck):
            waiter = self._sends.get(message.id)
            if waiter is not None:
                waiter.resolve(message)
        elif isinstance(message, protocol.HistoryPage | protocol.GroupInfo):
            waiter = self._requests.get(message.rid)
            if waiter is not None:
                waiter.resolve(message)
        elif isinstance(message, protocol.Error):
            self._on_error(message)
        elif isinstance(message, protocol.Ping):
            self._spawn_write(protocol.Pong(n=message.n))
        elif isinstance(message, protocol.Pong):
            waiter = self._pongs.get(message.n)
            if waiter is not None:
                waiter.resolve(message)

    def _on_deliver(self, delivery: protocol.Deliver) -> None:
        if self.cursor is None or delivery.offset + 1 > self.cursor:
            self.cursor = delivery.offset + 1
        key = (delivery.sender, delivery.id)
        if key in self._seen:
            self.duplicates_dropped += 1
            return
        self._seen[key] = None
        if len(self._seen) > DEDUPE_WINDOW:
            self._seen.popitem(last=False)
        self._deliveries_in.send_nowait(delivery)

    def _on_error(self, error: protocol.Error) -> None:
        if error.fatal:
            raise ServerRefused(str(error.code), error.text)
        failure = RequestFailed(str(error.code), error.text)
        waiter = None
        if error.id is not None:
            waiter = self._sends.get(error.id)
        elif error.rid is not None:
            waiter = self._requests.get(error.rid)
        if waiter is not None:
            waiter.resolve(error=failure)
        else:
            logger.warning("server error: %s", failure)

    def _spawn_write(self, message: protocol.Message) -> None:
        self._nursery.start_soon(self._write_quietly, message)

    async def _write_quietly(self, message: protocol.Message) -> None:
        try:
            await self._write([message])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _fail_all(self, error: Exception) -> None:
        self._lost = error
        waiters = [
            *self._sends.values(),
            *self._requests.values(),
            *self._pongs.values(),
        ]
        for waiter in waiters:
            waiter.resolve(error=error)
        self._deliveries_in.close()

    async def aclose(self) -> None:
        """Say goodbye and close; pending requests fail with ConnectionLost."""
        if self._closed:
            return
        self._closed = True
        if self._transport is not None:
            with trio.move_on_after(1):
                try:
                    await self._write(
                        [protocol.Goodbye(reason="client closing")], goodbye=True
                    )
                except (
                    trio.BrokenResourceError,
                    trio.ClosedResourceError,
                    protocol.LocalProtocolError,
                ):
                    pass
            await self._transport.aclose()
        self._fail_all(ConnectionLost("client closed"))
        self._nursery.cancel_scope.cancel()

    _nursery: trio.Nursery


@asynccontextmanager
async def open_client(host: str, port: int, **options: Any) -> AsyncIterator[Client]:
    """Connect (following redirects) for the duration of the block.

    Raises ``ServerRefused`` if the server refuses the hello (for example a bad
    token, error code ``auth_failed``).
    """
    client = Client(host, port, **options)
    # Connect before the nursery exists, so that a refusal or an unreachable
    # server raises as itself rather than inside an exception group.
    await client._connect()
    try:
        async with trio.open_nursery() as nursery:
            client._nursery = nursery
            nursery.start_soon(client._run)
            nursery.start_soon(client._watch_liveness)
            try:
                yield client
            finally:
                await client.aclose()
    except BaseExceptionGroup as group:
        # The reader task handles its own errors, so a group holds what the
        # caller's block raised: hand that back unwrapped, as it was raised.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
