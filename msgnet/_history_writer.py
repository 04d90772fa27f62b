"""The history consumer group: copies every inbox record into the history store."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import trio

from ._backplane import Backplane, LogRecord, until_available
from ._history import SQLiteHistoryStore
from ._records import BadRecord, InboxRecord, decode_record

__all__ = ["HISTORY_GROUP", "write_history"]

logger = logging.getLogger(__name__)

HISTORY_GROUP = "msgnet-history"
"""The consumer group of history writers; its offset marks what the store holds."""

BATCH_SIZE = 1000


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
    what = f"writing history of partition {partition}"
    committed = await until_available(
        functools.partial(backplane.committed, group, partition), what=what
    )
    offset = committed or 0
    task_status.started()

    while True:
        records = await until_available(
            functools.partial(
                backplane.read, partition, offset, max_records=BATCH_SIZE
            ),
            what=what,
        )
        entries = _decode(records)
        if entries:
            await store.write(entries)
        end = records[-1].offset + 1
        await until_available(
            functools.partial(backplane.commit, group, partition, end), what=what
        )
        offset = end


def _decode(records: Sequence[LogRecord]) -> list[tuple[LogRecord, InboxRecord]]:
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
