"""Catch-up: a reconnecting device's missed records, from history, then the log."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import protocol

from ._backplane import Backplane
from ._history_store import HistoryStore
from ._partition import deliver_message
from ._records import InboxRecord

__all__ = ["RetentionGap", "catch_up", "delivery_of"]

SEND_BATCH = 256
"""Deliveries handed to the connection per write."""

READ_BATCH = 500
"""Log records read per step."""


class RetentionGap(Exception):
    """Records the user may need were deleted from the log before history had them."""


def delivery_of(partition: int, offset: int, record: InboxRecord) -> protocol.Deliver:
    """The Deliver frame of a record at ``offset`` of ``partition``."""
    return protocol.Deliver(
        id=record.id,
        sender=record.sender,
        to=record.to,
        group=record.group,
        body=record.body,
        ts=record.ts,
        partition=partition,
        offset=offset,
    )


async def catch_up(
    *,
    backplane: Backplane,
    history: HistoryStore | None,
    history_group: str,
    user: str,
    partition: int,
    start: int,
    end: int,
    send: Callable[[Sequence[protocol.Message]], Awaitable[None]],
) -> None:
    """Send ``user``'s records in ``[start, end)`` of ``partition``, in order.

    Records below the history group's committed offset are in the store (its
    writers commit only after their rows are durable); the rest are read from
    the log. The two ranges meet at that offset, so together they cover the
    range with no gap and no overlap, however far history lags behind the log.
    Raises ``RetentionGap`` rather than skip records that the log deleted
    before history stored them (docs/history.md).
    """
    stored_until = start
    if history is not None:
        committed = await backplane.committed(history_group, partition)
        stored_until = min(max(committed or 0, start), end)
        if start < stored_until:
            rows = await history.inbox_since(user, partition, start, stored_until)
            for first in range(0, len(rows), SEND_BATCH):
                await send(
                    [
                        delivery_of(partition, offset, record)
                        for offset, record in rows[first : first + SEND_BATCH]
                    ]
                )

    offset = stored_until
    while offset < end:
        records = await backplane.read(partition, offset, max_records=READ_BATCH)
        if records[0].offset > offset:
            # The store holds only what is below its group's offset, so these
            # are in neither place: say so instead of skipping them silently.
            raise RetentionGap(
                f"partition {partition} offsets {offset}..{records[0].offset - 1}"
                " were deleted by the log's retention before history stored "
                "them; messages there are lost. Reconnect with resume="
                f"{records[0].offset} to continue after them"
            )
        batch: list[protocol.Message] = []
        for record in records:
            if record.offset >= end:
                break
            parsed = deliver_message(partition, record.offset, record.value)
            if parsed is not None and user in parsed[1]:
                batch.append(parsed[0])
        if batch:
            await send(batch)
        offset = records[-1].offset + 1
