"""The history consumer group: copies every inbox record into the history store."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import attrs
import trio

from ._backplane import Backplane, LogRecord, sleep_until_tick, until_available
from ._history_store import HistoryStore
from ._records import BadRecord, InboxRecord, decode_record

__all__ = ["HISTORY_GROUP", "decode_entries", "warn_retention_gap", "write_history"]

logger = logging.getLogger(__name__)

HISTORY_GROUP = "msgnet-history"
"""The consumer group of history writers; its offset marks what the store holds."""

BATCH_SIZE = 1000

COMMIT_INTERVAL = 0.5
"""Most seconds between a batch being stored and the group's offset saying so.

The offset only tells catch-up where the store ends and the log must be read
instead, so it may lag the store (never run ahead of it). On Kafka a commit
is a broker round trip, and one per batch and partition was a large part of
a busy server's CPU. Every partition's writer commits on the same ticks of
the clock, and a backplane sends the commits of one tick in one request.
"""

LINGER = 0.25
"""Seconds a writer that caught up waits before its next batch.

History is eventually consistent (catch-up reads the log above the group's
offset), so there is no hurry: writing each record as it comes would cost a
store transaction (an fsync) per record and partition. At 50 ms a durable
server at 1,000 msg/s still spent about a tenth more of its CPU than at this.
"""


async def write_history(
    backplane: Backplane,
    store: HistoryStore,
    partition: int,
    *,
    group: str = HISTORY_GROUP,
    linger: float = LINGER,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Persist one partition into ``store`` until cancelled.

    Each batch is written in one transaction. A task of its own commits the
    offset after the last stored batch at every ``COMMIT_INTERVAL`` tick of
    the clock, so the group's offset never runs ahead of the store: every
    record below it is stored. A crash between the two writes those batches
    again, which the store's keys make harmless. Catch-up relies on exactly
    this (see ``_catchup.catch_up``).
    """
    what = f"writing history of partition {partition}"
    committed = await until_available(
        functools.partial(backplane.committed, group, partition), what=what
    )
    progress = _Progress(committed or 0)
    task_status.started()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_commit_periodically, backplane, group, partition, progress)
        while True:
            offset = progress.stored
            records = await until_available(
                functools.partial(
                    backplane.read, partition, offset, max_records=BATCH_SIZE
                ),
                what=what,
            )
            if records[0].offset > offset:
                warn_retention_gap(partition, offset, records[0].offset)
            entries = decode_entries(records)
            if entries:
                await store.write(entries)
            progress.stored = records[-1].offset + 1
            if len(records) < BATCH_SIZE:
                await trio.sleep(linger)


@attrs.define
class _Progress:
    stored: int
    """Every record below this offset is in the store."""


async def _commit_periodically(
    backplane: Backplane, group: str, partition: int, progress: _Progress
) -> None:
    """Commit what the writer has stored, at every tick it has stored more."""
    committed = progress.stored
    while True:
        await sleep_until_tick(COMMIT_INTERVAL)
        stored = progress.stored
        if stored != committed:
            await until_available(
                functools.partial(backplane.commit, group, partition, stored),
                what=f"committing history of partition {partition}",
            )
            committed = stored


def decode_entries(
    records: Sequence[LogRecord],
) -> list[tuple[LogRecord, InboxRecord]]:
    """Pair each record with its decoded ``InboxRecord``; a malformed one is skipped."""
    entries = []
    for record in records:
        try:
            entries.append((record, decode_record(record.value)))
        except BadRecord as exc:
            logger.warning(
                "history skips malformed record partition=%d offset=%d: %s",
                record.partition,
                record.offset,
                exc,
            )
    return entries


def warn_retention_gap(partition: int, expected: int, found: int) -> None:
    """Say that the log deleted records before history stored them.

    Those records are gone from both: a client catching up across them gets
    an error instead of a silent gap (see ``_catchup.catch_up``).
    """
    logger.warning(
        "history lost partition=%d offsets %d..%d: the log's retention deleted "
        "them before they were stored",
        partition,
        expected,
        found - 1,
    )
