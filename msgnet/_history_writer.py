"""The history consumer group: copies every inbox record into the history store."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from ._backplane import Backplane, BackplaneUnavailable, LogRecord
from ._history import SQLiteHistoryStore
from ._records import BadRecord, InboxRecord, decode_record

__all__ = ["HISTORY_GROUP", "write_history"]

logger = logging.getLogger(__name__)

HISTORY_GROUP = "msgnet-history"
"""The consumer group of history writers; its offset marks what the store holds."""

BATCH_SIZE = 1000
RETRY_DELAY = 1.0


async def write_history(
    backplane: Backplane,
    store: SQLiteHistoryStore,
    partition: int,
    *,
    group: str = HISTORY_GROUP,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Persist one partition into ``store`` until cancelled.

    Each batch is written in one transaction and only then committed, so the
    group's offset never runs ahead of the store: every record below it is
    stored. A crash between the two writes the batch again, which the store's
    keys make harmless. Catch-up relies on exactly this (see
    ``Session._catch_up``).
    """
    offset = await backplane.committed(group, partition) or 0
    task_status.started()

    while True:
        records = await backplane.read(partition, offset, max_records=BATCH_SIZE)
        entries = _decode(records)
        end = records[-1].offset + 1
        while True:
            try:
                if entries:
                    await store.write(entries)
                await backplane.commit(group, partition, end)
                break
            except BackplaneUnavailable:
                logger.warning(
                    "history commit failed partition=%d offset=%d; retrying",
                    partition,
                    end,
                    exc_info=True,
                )
                await trio.sleep(RETRY_DELAY)
        offset = end


def _decode(records: Sequence[LogRecord]) -> list[tuple[LogRecord, InboxRecord]]:
    entries = []
    for record in records:
        try:
            entries.append((record, decode_record(record.value)))
        except BadRecord:
            logger.warning(
                "history skips malformed record partition=%d offset=%d",
                record.partition,
                record.offset,
                exc_info=True,
            )
    return entries
