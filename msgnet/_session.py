"""One client connection on the server: handshake, requests, deliveries, limits."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio

import protocol
from protocol import ErrorCode

from ._appends import (
    SEND_WINDOW,
    AppendFailed,
    PendingSend,
    SendWindow,
    inbox_copies,
    submit_copies,
)
from ._backplane import BackplaneUnavailable
from ._catchup import RetentionGap, catch_up
from ._context import ServerContext
from ._handshake import SessionEnded, receive_hello, redirect, welcome
from ._outbox import Outbox
from ._partition import PartitionOwner
from ._ratelimit import TokenBucket
from ._requests import Refused, Request, answer
from ._transport import MessageTransport

__all__ = ["Session", "SessionEnded"]

logger = logging.getLogger(__name__)

WRITE_BATCH = 256
"""Frames coalesced into one socket write when a session falls a little behind."""

CLOSE_TIMEOUT = 2.0
"""Seconds spent telling a peer why it is dropped before giving up on it."""

_session_numbers = itertools.count(1)

_T = TypeVar("_T")


class Session:
    """Serves one connected device from handshake to close.

    Two tasks share the connection: the reader handles requests in the order
    they arrive, handing sends to the log without waiting for them (up to
    ``SEND_WINDOW``), so a sender's messages reach the log in the order it
    sent them, and pings a quiet client; the writer owns the sending side
    (catch-up first, then everything queued, answering each send once it is
    durable). Whatever ends the session fatally records why and
    cancels both; the Error frame is written after they stop, so two tasks
    never write at once.

    An idle session is most of what a busy server holds, so it keeps little:
    no third task for pings, no per-session handler table, a rate limit
    bucket only once the client first sends, and no writer task until there
    is something other than a ping to send (the reader writes its own pings
    until then).
    """

    def __init__(self, context: ServerContext, transport: MessageTransport) -> None:
        self._context = context
        self._config = context.config
        self._transport = transport
        number = next(_session_numbers)
        self.session_id = f"{context.name}/{number}/{secrets.token_hex(4)}"
        self.user = ""
        self.device = ""
        self._owner: PartitionOwner | None = None
        self._outbox = Outbox[protocol.Message | PendingSend](
            context.config.outbound_queue
        )
        self._sends: SendWindow | None = None
        """Made at the first send, like the rate bucket."""
        self._peer_left = False
        """The peer said goodbye: answers still settle, but are not written."""
        self._scope = trio.CancelScope()
        self._receive_scope = trio.CancelScope()
        self._stopping = False
        self._torn = False
        """A write was cut short: part of a frame went out, so nothing more can."""
        self._failure: SessionEnded | None = None
        self._pings = 0
        self._bucket: TokenBucket | None = None
        self._nursery: trio.Nursery | None = None
        """Where the writer is started, while the session serves requests."""
        self._writer_started = False
        self._reader_writing = False
        """The reader is writing a ping itself: the writer must not start."""

    # --- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the peer leaves, errs, or the server stops."""
        context = self._context
        context.sessions.add(self)
        context.metrics.connections.inc()
        try:
            with self._scope:
                await self._guarded(self._serve)
            if self._failure is not None:
                await self._send_fatal(self._failure)
        finally:
            if self._owner is not None:
                self._owner.detach(self)
            self._outbox.close()
            context.sessions.discard(self)
            context.metrics.connections.dec()
            await self._transport.aclose()

    async def _guarded(self, task: Callable[[], Awaitable[_T]]) -> _T | None:
        """Run one of the session's tasks, turning its ending into ``fail``.

        Every task ends the same ways (bad input, a limit, a lost peer), and
        none of them may escape into the nursery as an exception group. None
        means the task ended that way and the session is being stopped.
        """
        try:
            return await task()
        except SessionEnded as ended:
            self.fail(ended.code, ended.text)
        except protocol.RemoteProtocolError as exc:
            self.fail(exc.code, str(exc))
        except BackplaneUnavailable as exc:
            # Catch-up or the handshake could not read the log: the client
            # retries later with the same cursor, so nothing is skipped.
            self.fail(ErrorCode.UNAVAILABLE, f"the message log is unavailable: {exc}")
        except protocol.LocalProtocolError as exc:
            # Our own bug (a frame we should not have built): drop this
            # connection rather than let it take the whole server down.
            logger.warning("session=%s failed", self.session_id, exc_info=True)
            self.fail(ErrorCode.INTERNAL, f"server error: {exc}")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            logger.debug("connection lost session=%s", self.session_id)
            self._scope.cancel()
        return None

    def fail(self, code: ErrorCode, text: str) -> None:
        """End the session from any task: remember why, then stop everything."""
        if self._failure is None:
            self._failure = SessionEnded(code, text)
        self._scope.cancel()

    def stop(self) -> None:
        """Server shutdown: stop reading; the request in hand still completes."""
        self._stopping = True
        self._receive_scope.cancel()

    def offer(self, delivery: protocol.Deliver) -> None:
        """Queue a live delivery; a full queue means the client reads too slowly."""
        try:
            self._outbox.put_nowait(delivery)
            if not self._writer_started:
                self._start_writer()
        except trio.WouldBlock:
            self._context.metrics.slow_consumer_disconnects.inc()
            self.fail(
                ErrorCode.SLOW_CONSUMER,
                f"more than {self._config.outbound_queue} frames were waiting to be "
                "read; reconnect with your cursor to catch up",
            )
        except trio.ClosedResourceError:
            pass

    async def _serve(self) -> None:
        context = self._context
        if len(context.sessions) > self._config.max_connections:
            raise SessionEnded(
                ErrorCode.SERVER_FULL,
                f"server has its maximum of {self._config.max_connections} "
                "connections; try another server or later",
            )

        positions = await self._handshake()
        if positions is None:
            return
        catch_up_from, live_from = positions

        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if catch_up_from < live_from:
                self._writer_started = True
                nursery.start_soon(
                    self._guarded,
                    functools.partial(self._write, catch_up_from, live_from),
                )
            elif len(self._outbox):
                # Deliveries offered while the handshake finished.
                self._start_writer()
            try:
                # The reader is guarded too: its bad input or limit, raised in
                # the nursery's body, would otherwise leave as an exception
                # group and take the whole server down with it.
                said_goodbye = await self._guarded(self._read)
                if said_goodbye is None or said_goodbye:
                    # The peer is gone or failed: nothing more goes out.
                    nursery.cancel_scope.cancel()
                    return
                # Server shutdown: let the writer flush what is queued (acks
                # of in-flight sends included), then end with our own goodbye.
                # The writer returns once the goodbye is out, which ends the
                # nursery.
                self._start_writer()
                await self._outbox.put(
                    protocol.Goodbye(reason="server shutting down; reconnect to resume")
                )
            finally:
                self._nursery = None

    def _start_writer(self) -> None:
        """Start the writer once there is something to send, and keep it."""
        if self._writer_started or self._reader_writing or self._nursery is None:
            return
        self._writer_started = True
        self._nursery.start_soon(self._guarded, self._write)

    async def _send_fatal(self, failure: SessionEnded) -> None:
        self._context.metrics.errors.labels(failure.code.value).inc()
        if self._torn:
            # The peer would read the Error as the rest of the torn frame, so
            # it only sees the close (a slow reader, stuck mid-frame).
            logger.debug(
                "closing session=%s user=%s code=%s without an error frame",
                self.session_id,
                self.user,
                failure.code.value,
            )
            return
        logger.debug(
            "closing session=%s user=%s code=%s text=%s",
            self.session_id,
            self.user,
            failure.code.value,
            failure.text,
        )
        error = protocol.Error(code=failure.code, text=failure.text[:1024], fatal=True)
        with trio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._transport.send([error])
            except (
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.BusyResourceError,
                protocol.LocalProtocolError,
            ):
                pass

    # --- handshake -----------------------------------------------------------

    async def _handshake(self) -> tuple[int, int] | None:
        """Authenticate the hello; returns (catch-up start, live start) or None.

        None means the connection ended during the handshake without error:
        the peer hung up, or it was redirected to the partition's owner.
        """
        context = self._context
        hello = await receive_hello(context, self._transport)
        if hello is None:
            return None

        partition = context.partition_for(hello.user)
        owner = context.owners.get(partition)
        if owner is None:
            await redirect(context, self._transport, partition)
            return None

        self.user, self.device = hello.user, hello.device
        live_from = owner.attach(self)
        self._owner = owner

        resume = hello.resume
        if resume is None and context.history is not None:
            resume = await context.history.load_cursor(self.user, self.device)
        if resume is None or resume > live_from:
            resume = live_from

        await self._transport.send(
            [
                welcome(
                    context,
                    user=self.user,
                    session_id=self.session_id,
                    partition=partition,
                    cursor=resume,
                )
            ]
        )
        logger.debug(
            "welcome session=%s user=%s device=%s partition=%d resume=%d live=%d",
            self.session_id,
            self.user,
            self.device,
            partition,
            resume,
            live_from,
        )
        return resume, live_from

    # --- reading -------------------------------------------------------------

    async def _read(self) -> bool:
        """Handle requests until goodbye (True) or server shutdown (False).

        The reader also pings a client that has been quiet for a third of the
        idle timeout, and again after each further third, so that a live one
        answers in time. Both transports' receive may be cancelled without
        losing bytes, so a ping due only interrupts the wait for a frame.
        """
        idle_timeout = self._config.idle_timeout
        ping_interval = idle_timeout / 3
        while not self._stopping:
            # Frames that arrived together are handled without a receive
            # scope each: the scope and the trip through the scheduler cost
            # more than handling a send.
            message = self._transport.buffered()
            if message is not None:
                if await self._handle(message):
                    return True
                continue
            now = trio.current_time()
            idle_deadline = now + idle_timeout
            ping_deadline = now + ping_interval
            # A stop() that came while the reader wrote a ping ends it here.
            while not self._stopping:
                # A fresh scope per receive: stop() cancels only a receive in
                # progress, never a request being handled. The same scope
                # carries the next deadline; one scope per frame instead of
                # two, because entering a scope is a large part of its cost.
                receive = trio.CancelScope(deadline=min(idle_deadline, ping_deadline))
                self._receive_scope = receive
                with receive:
                    message = await self._transport.receive()
                if not receive.cancelled_caught or self._stopping:
                    break
                if trio.current_time() >= idle_deadline:
                    raise SessionEnded(
                        ErrorCode.IDLE_TIMEOUT,
                        f"nothing received for {idle_timeout:g} seconds",
                    )
                await self._ping(idle_deadline)
                ping_deadline += ping_interval
            if message is None:
                return not self._stopping
            if await self._handle(message):
                return True
        return False

    async def _handle(self, message: protocol.Message) -> bool:
        """Handle one request; True if the peer is leaving (goodbye, fatal error)."""
        if isinstance(message, protocol.Goodbye):
            # Sends read before the goodbye still reach the log, but nothing
            # more may be written to a peer that said goodbye.
            self._peer_left = True
            if self._sends is not None:
                await self._sends.wait_below(1)
            return True
        if isinstance(message, protocol.Error):
            logger.debug(
                "client error session=%s code=%s text=%s",
                self.session_id,
                message.code,
                message.text,
            )
            return message.fatal
        await _HANDLERS[type(message)](self, message)
        return False

    async def _ping(self, idle_deadline: float) -> None:
        """Ping a quiet client: through the writer if it runs, else directly."""
        ping = protocol.Ping(n=self._pings)
        self._pings = (self._pings + 1) % 2**32
        if self._writer_started:
            # Waiting for room here would also hold up the idle timeout of a
            # client that reads nothing; a full queue has frames on the way.
            with contextlib.suppress(trio.WouldBlock):
                self._outbox.put_nowait(ping)
            return

        # Nothing but pings has gone out yet, so the reader writes this one
        # itself rather than start a writer that an idle session would keep.
        self._reader_writing = True
        try:
            with trio.move_on_at(idle_deadline):
                await self._send_frames([ping])
        finally:
            self._reader_writing = False
        if self._torn:
            # The deadline cut the write short: nothing more can follow.
            raise SessionEnded(
                ErrorCode.IDLE_TIMEOUT,
                f"nothing received for {self._config.idle_timeout:g} seconds",
            )
        # Deliveries offered during the write have waited for it.
        if len(self._outbox):
            self._start_writer()

    async def _reply(self, message: protocol.Message | PendingSend) -> None:
        if not self._writer_started:
            self._start_writer()
        # No trip through the scheduler unless the queue is full: the reader
        # yields anyway when it waits for the next frame or for the log.
        try:
            self._outbox.put_nowait(message)
        except trio.WouldBlock:
            await self._outbox.put(message)

    async def _refuse(
        self,
        code: ErrorCode,
        text: str,
        *,
        rid: int | None = None,
        message_id: str | None = None,
    ) -> None:
        """A non-fatal Error: this request failed, the connection goes on."""
        self._context.metrics.errors.labels(code.value).inc()
        await self._reply(
            protocol.Error(code=code, text=text, fatal=False, rid=rid, id=message_id)
        )

    # --- requests --------------------------------------------------------------

    async def _on_send(self, send: protocol.Send | protocol.GroupSend) -> None:
        """Hand the message's copies to the log; the writer acknowledges them."""
        bucket = self._bucket
        if bucket is None:
            # Made at the first send, full, as it would be had it been made
            # at the handshake: an idle session never pays for one.
            bucket = self._bucket = TokenBucket(
                rate=self._config.rate_limit,
                burst=self._config.rate_burst,
                clock=trio.current_time,
            )
        if not bucket.try_take():
            await self._refuse(
                ErrorCode.RATE_LIMITED,
                f"more than {self._config.rate_limit:g} requests per second; "
                "the message was not accepted, retry later with the same id",
                message_id=send.id,
            )
            return
        context = self._context
        sends = self._sends
        if sends is None:
            sends = self._sends = SendWindow(
                metrics=context.metrics, session_id=self.session_id
            )
        received = trio.current_time()
        try:
            record, by_partition = await inbox_copies(
                context, self.user, self.session_id, send
            )
            await sends.wait_below(SEND_WINDOW)
            pending = submit_copies(
                context.backplane,
                record,
                by_partition,
                received=received,
                timeout=self._config.append_timeout,
            )
        except Refused as refused:
            await self._refuse(refused.code, refused.text, message_id=send.id)
            return
        except AppendFailed as failed:
            await self._reply(sends.unavailable(send.id, failed))
            return
        sends.in_flight += 1
        await self._reply(pending)

    async def _on_request(self, request: Request) -> None:
        """History and group requests: answered in order, refused without harm."""
        try:
            reply = await answer(self._context, self.user, request)
        except Refused as refused:
            await self._refuse(refused.code, refused.text, rid=request.rid)
            return
        await self._reply(reply)

    async def _on_delivery_ack(self, ack: protocol.DeliveryAck) -> None:
        history = self._context.history
        if history is not None:
            await history.save_cursor(self.user, self.device, ack.cursor)

    async def _on_ping(self, ping: protocol.Ping) -> None:
        await self._reply(protocol.Pong(n=ping.n))

    async def _on_pong(self, pong: protocol.Pong) -> None:
        """Any frame counts as a sign of life; a pong needs nothing more."""

    # --- writing ---------------------------------------------------------------

    async def _write(self, catch_up_from: int = 0, live_from: int = 0) -> None:
        """Own the sending side: catch-up first, then every queued frame in order."""
        if catch_up_from < live_from:
            await self._catch_up(catch_up_from, live_from)

        outbox = self._outbox
        while True:
            taken = await outbox.take(WRITE_BATCH)
            batch: list[protocol.Message] = []
            for item in taken:
                if isinstance(item, PendingSend):
                    if batch and not item.appending.settled():
                        # Write what is ready before waiting for the log.
                        await self._flush(batch)
                        batch = []
                    assert self._sends is not None
                    batch.append(await self._sends.answer(item))
                elif type(item) is protocol.Goodbye:
                    # Nothing may follow a Goodbye, not even a delivery
                    # offered after it; only a stopping session queues one.
                    batch.append(item)
                    await self._flush(batch)
                    return
                else:
                    batch.append(item)
            await self._flush(batch)

    async def _flush(self, batch: list[protocol.Message]) -> None:
        if self._peer_left or not batch:
            return
        await self._send_frames(batch)
        self._context.metrics.messages_out.inc(
            sum(1 for message in batch if type(message) is protocol.Deliver)
        )

    async def _catch_up(self, start: int, end: int) -> None:
        """Send what this device missed before live delivery (``catch_up``)."""
        context = self._context
        assert self._owner is not None
        try:
            await catch_up(
                backplane=context.backplane,
                history=context.history,
                history_group=context.history_group,
                user=self.user,
                partition=self._owner.partition,
                start=start,
                end=end,
                send=self._send_frames,
            )
        except RetentionGap as gap:
            raise SessionEnded(ErrorCode.UNAVAILABLE, str(gap)) from None

    async def _send_frames(self, frames: Sequence[protocol.Message]) -> None:
        """The writer's send: remembers a write that was cancelled part way."""
        # A cancellation already pending is taken here, before any byte goes
        # out; nothing in between yields, so one that arrives later finds the
        # write begun (on a full socket, possibly with nothing sent: a peer
        # that reads nothing loses no readable Error by that).
        await trio.lowlevel.checkpoint_if_cancelled()
        self._torn = True
        await self._transport.send(frames)
        self._torn = False


_HANDLERS: dict[type[Any], Callable[[Session, Any], Awaitable[None]]] = {
    protocol.Send: Session._on_send,
    protocol.GroupSend: Session._on_send,
    protocol.DeliveryAck: Session._on_delivery_ack,
    protocol.HistoryRequest: Session._on_request,
    protocol.GroupCreate: Session._on_request,
    protocol.GroupJoin: Session._on_request,
    protocol.GroupLeave: Session._on_request,
    protocol.GroupMembers: Session._on_request,
    protocol.Ping: Session._on_ping,
    protocol.Pong: Session._on_pong,
}
"""Each request type's handler, shared by all sessions rather than one per session."""
