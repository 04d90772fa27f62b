"""From a send to durable copies in the inbox log: fan-out, then append."""

from __future__ import annotations

import logging
import time

import attrs
import trio

import protocol
from protocol import ErrorCode

from ._backplane import Appending, Backplane, BackplaneUnavailable
from ._catchup import delivery_of
from ._context import ServerContext
from ._metrics import ServerMetrics
from ._records import InboxRecord
from ._requests import FRAME_OVERHEAD, Refused, members_of

__all__ = [
    "SEND_WINDOW",
    "AppendFailed",
    "PendingSend",
    "SendWindow",
    "inbox_copies",
    "settled",
    "submit_copies",
]

logger = logging.getLogger(__name__)

SEND_WINDOW = 64
"""Sends of one connection that may wait for the log at once.

A session's reader hands each send to the log and reads on; its writer
answers them in order as they become durable. A client that sends in bursts
therefore fills a log transaction instead of waiting one round trip per
message, and one that sends faster than the log accepts is held back by TCP.
"""


class AppendFailed(Exception):
    """Some copy of a message is not known to be durable; it was not accepted."""


async def inbox_copies(
    context: ServerContext,
    user: str,
    origin: str,
    send: protocol.Send | protocol.GroupSend,
) -> tuple[InboxRecord, dict[int, list[str]]]:
    """The record to append, and the users it is for in each partition.

    A one-to-one message goes to the recipient's partition and the sender's
    own (for the sender's other devices), as one record when they coincide; a
    group message goes once to each partition that holds members. Raises
    ``Refused`` for a group the user cannot post to, or a body too large to
    ever be delivered.
    """
    by_partition: dict[int, list[str]] = {}
    if isinstance(send, protocol.Send):
        to, group = send.to, None
        recipients = [send.to] if send.to == user else [send.to, user]
    else:
        to, group = None, send.group
        recipients = list(await members_of(context, send.group, user))
    for recipient in recipients:
        by_partition.setdefault(context.partition_for(recipient), []).append(recipient)

    record = InboxRecord(
        id=send.id,
        sender=user,
        to=to,
        group=group,
        body=send.body,
        ts=int(time.time() * 1000),
        recipients=(),
        origin=origin,
    )
    limit = context.config.max_frame_size
    if not _deliverable(record, limit):
        # Accepted, it would stop every catch-up that reaches it.
        raise Refused(
            ErrorCode.BAD_MESSAGE,
            f"message {send.id!r} would not fit a delivery frame of {limit} bytes; "
            "send a shorter body",
        )
    return record, by_partition


def _deliverable(record: InboxRecord, limit: int) -> bool:
    """Whether the record's Deliver fits a frame, with room for a page's fields."""
    if 4 * len(record.body) + FRAME_OVERHEAD <= limit:
        return True
    largest = delivery_of(2**62, 2**62, attrs.evolve(record, ts=2**62))
    return len(protocol.encode_message(largest)) + 64 <= limit


@attrs.define(eq=False)
class PendingSend:
    """A send whose copies were handed to the log; answered once they settle."""

    id: str
    """The client's message id, for the answer."""
    ts: int
    partitions: list[int]
    """The partition of each copy, in the order submitted."""
    appending: Appending
    received: float
    """trio time the send was read, for the acknowledgement latency."""
    deadline: float
    """trio time after which the send is refused as unavailable."""


def submit_copies(
    backplane: Backplane,
    record: InboxRecord,
    by_partition: dict[int, list[str]],
    *,
    received: float,
    timeout: float,
) -> PendingSend:
    """Hand the log one copy per partition at once, without waiting for them.

    Raises ``AppendFailed`` if the log takes nothing (closed or failed).
    """
    copies = [
        (
            partition,
            users[0].encode(),
            record.encode(recipients=users),
        )
        for partition, users in by_partition.items()
    ]
    try:
        appending = backplane.submit(copies)
    except BackplaneUnavailable as exc:
        raise AppendFailed(str(exc)) from None
    return PendingSend(
        id=record.id,
        ts=record.ts,
        partitions=list(by_partition),
        appending=appending,
        received=received,
        deadline=received + timeout,
    )


async def settled(pending: PendingSend) -> list[tuple[int, int]]:
    """The copies' (partition, offset) positions, once all of them are durable.

    Raises ``AppendFailed`` if some copy failed or did not settle by the
    deadline: the client retries with the same id, and copies that did land
    are then duplicates its recipients drop.
    """
    try:
        if pending.appending.settled():
            offsets = await pending.appending.offsets()
        else:
            # A scope only when there is something to wait for (a run of sends
            # that one transaction made durable costs one), and made directly:
            # move_on_at's context manager costs as much again as the scope.
            with trio.CancelScope(deadline=pending.deadline) as deadline:
                offsets = await pending.appending.offsets()
            if deadline.cancelled_caught:
                raise AppendFailed(
                    f"the log did not confirm the append to partitions "
                    f"{pending.partitions} in time"
                )
    except BackplaneUnavailable as exc:
        raise AppendFailed(str(exc)) from None
    return sorted(zip(pending.partitions, offsets, strict=True))


class SendWindow:
    """The sends one connection has handed to the log and not yet answered."""

    __slots__ = ("_answered", "_metrics", "_session_id", "in_flight")

    def __init__(self, *, metrics: ServerMetrics, session_id: str) -> None:
        self._metrics = metrics
        self._session_id = session_id
        self.in_flight = 0
        self._answered: trio.Event | None = None
        """Set when a send is answered while the reader waits for room."""

    async def wait_below(self, count: int) -> None:
        """Wait until fewer than ``count`` sends wait for their answer."""
        while self.in_flight >= count:
            self._answered = trio.Event()
            await self._answered.wait()

    async def answer(self, pending: PendingSend) -> protocol.Message:
        """The SendAck once the copies are durable, else the Error refusing the send."""
        try:
            positions = await settled(pending)
        except AppendFailed as failed:
            reply: protocol.Message = self.unavailable(pending.id, failed)
        else:
            self._metrics.messages_in.inc()
            self._metrics.ack_latency.observe(trio.current_time() - pending.received)
            reply = protocol.SendAck(id=pending.id, ts=pending.ts, positions=positions)
        self.in_flight -= 1
        if self._answered is not None:
            self._answered.set()
            self._answered = None
        return reply

    def unavailable(self, message_id: str, failed: AppendFailed) -> protocol.Error:
        """The refusal of a send whose copies are not known to be durable."""
        logger.warning(
            "append failed session=%s id=%s: %s", self._session_id, message_id, failed
        )
        self._metrics.errors.labels(ErrorCode.UNAVAILABLE.value).inc()
        return protocol.Error(
            code=ErrorCode.UNAVAILABLE,
            text="the message log is unavailable; the message was not accepted, "
            "retry with the same id",
            fatal=False,
            id=message_id,
        )
