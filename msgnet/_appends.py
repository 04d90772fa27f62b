"""From a send to durable copies in the inbox log: fan-out, then append."""

from __future__ import annotations

import time

import attrs
import trio

import protocol
from protocol import ErrorCode

from ._backplane import Backplane, BackplaneUnavailable
from ._catchup import delivery_of
from ._context import ServerContext
from ._records import InboxRecord
from ._requests import FRAME_OVERHEAD, Refused, members_of

__all__ = ["AppendFailed", "append_copies", "inbox_copies"]


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


async def append_copies(
    backplane: Backplane,
    record: InboxRecord,
    by_partition: dict[int, list[str]],
    *,
    timeout: float,
) -> list[tuple[int, int]]:
    """Append one copy per partition; return their positions once all are durable.

    Raises ``AppendFailed`` naming each copy that failed or timed out: the
    client retries with the same id, and copies that did land are then
    duplicates its recipients drop.
    """
    positions: list[tuple[int, int]] = []
    failed: list[str] = []
    settled: set[int] = set()

    async def append(partition: int, users: list[str]) -> None:
        copy = attrs.evolve(record, recipients=tuple(users))
        try:
            offset = await backplane.append(partition, users[0].encode(), copy.encode())
        except BackplaneUnavailable as exc:
            failed.append(f"partition {partition}: {exc}")
        else:
            positions.append((partition, offset))
        # Not reached when the deadline cancels the append.
        settled.add(partition)

    # One deadline for all copies, and the first copy appended by this task
    # rather than a child: scopes and task starts are a large part of a
    # message's cost, and the copies are appended at the same time anyway.
    copies = list(by_partition.items())
    with trio.CancelScope(deadline=trio.current_time() + timeout) as deadline:
        if len(copies) == 1:
            await append(*copies[0])
        else:
            async with trio.open_nursery() as nursery:
                for partition, users in copies[1:]:
                    nursery.start_soon(append, partition, users)
                await append(*copies[0])
    if deadline.cancelled_caught:
        failed.extend(
            f"partition {partition}: timed out"
            for partition, _ in copies
            if partition not in settled
        )
    if failed:
        raise AppendFailed("; ".join(failed))
    positions.sort()
    return positions
