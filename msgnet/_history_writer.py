"""The history consumer group: copies every inbox record into the history store."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence

import trio

from ._backplane import Backplane, LogRecord, until_available
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
a busy server's CPU; committing at most this often, and when a writer falls
quiet with a batch not yet committed, keeps that to two a second a partition.
"""

LINGER = 0.05
"""Seconds a writer that caught up waits before its next batch.

History is eventually consistent (catch-up reads the log above the group's
offset), so there is no hurry: at a low rate, writing each record as it comes
would cost a store transaction and a commit per record and partition, several
thread round trips a message. Waiting this long lets a batch gather instead.
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

    Each batch is written in one transaction and only then committed, so the
    group's offset never runs ahead of the store: every record below it is
    stored. A crash between the two writes the batch again, which the store's
    keys make harmless. Catch-up relies on exactly this (see
    ``_catchup.catch_up``). Commits wait up to ``COMMIT_INTERVAL`` to cover
    several batches at once.
    """
    what = f"writing history of partition {partition}"
    committed = await until_available(
        functools.partial(backplane.committed, group, partition), what=what
    )
    # Where the next batch starts, and what the group's offset says is stored.
    offset = stored = committed or 0
    commit_at = trio.current_time() + COMMIT_INTERVAL
    task_status.started()

    async def commit() -> None:
        nonlocal stored, commit_at
        await until_available(
            functools.partial(backplane.commit, group, partition, offset), what=what
        )
        stored = offset
        commit_at = trio.current_time() + COMMIT_INTERVAL

    while True:
        # 1. The next batch; a quiet log first lets a pending commit out.
        records = None
        with trio.move_on_at(commit_at if stored != offset else math.inf):
            records = await until_available(
                functools.partial(
                    backplane.read, partition, offset, max_records=BATCH_SIZE
                ),
                what=what,
            )
        if records is None:
            await commit()
            continue

        # 2. Store it, then say so when it is time.
        if records[0].offset > offset:
            warn_retention_gap(partition, offset, records[0].offset)
        entries = decode_entries(records)
        if entries:
            await store.write(entries)
        offset = records[-1].offset + 1
        if trio.current_time() >= commit_at:
            await commit()
        if len(records) < BATCH_SIZE:
            await trio.sleep(linger)


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
