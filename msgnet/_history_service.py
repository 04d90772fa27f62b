"""The standalone history writer: the history consumer group as its own process."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ._backplane import RETRY_DELAYS, LogRecord, until_available
from ._config import DEFAULT_INBOX_TOPIC
from ._history_store import HistoryStore, HistoryUnavailable
from ._history_writer import HISTORY_GROUP, decode_entries, warn_retention_gap
from ._records import InboxRecord

if TYPE_CHECKING:
    from ._kafka_group import KafkaGroupConsumer

# kafka-python and psycopg are imported where they are first needed: every
# msgnet command builds the history commands' parser, and importing both at
# start-up cost each command (a server's start among them) a quarter second.

__all__ = [
    "HistoryWriterStats",
    "add_history_commands",
    "run_history_writer",
    "serve_history_writer",
]

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000
"""Records written per transaction at most; larger batches amortise the commit."""


@attrs.define(kw_only=True)
class HistoryWriterStats:
    """What one writer has done so far, for logs and benchmarks."""

    batches: int = 0
    """Batches written and then committed (or refused by a rebalance)."""
    records: int = 0
    """Log records written to the store."""
    refused_commits: int = 0
    """Commits Kafka refused because the group rebalanced meanwhile."""


async def run_history_writer(
    consumer: KafkaGroupConsumer,
    store: HistoryStore,
    *,
    batch_size: int = BATCH_SIZE,
    stats: HistoryWriterStats | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Copy the inbox records of the partitions Kafka assigns us into ``store``.

    Each step is one poll, one store transaction, then one offset commit: the
    group's offset never runs ahead of what the store holds, which is what a
    server's catch-up relies on (``_catchup.catch_up``). A writer killed
    between the transaction and the commit leaves records that the partition's
    next holder writes again, and the store's keys make that harmless.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    stats = HistoryWriterStats() if stats is None else stats
    assigned: frozenset[int] = frozenset()
    next_offsets: dict[int, int] = {}
    task_status.started()

    while True:
        records = await until_available(
            functools.partial(consumer.poll, max_records=batch_size),
            what="polling the inbox for history",
        )
        now_assigned = await until_available(
            consumer.assignment, what="reading the history writer's assignment"
        )
        if now_assigned != assigned:
            logger.info("history writer assigned partitions %s", sorted(now_assigned))
            assigned = now_assigned
            # A partition that came back may resume anywhere after its commit.
            next_offsets = {p: o for p, o in next_offsets.items() if p in assigned}
        if not records:
            continue

        ends = _check_continuity(records, next_offsets)
        await _write_until_durable(store, decode_entries(records))
        committed = await until_available(
            functools.partial(consumer.commit, ends),
            what="committing history offsets",
        )

        stats.batches += 1
        stats.records += len(records)
        if not committed:
            stats.refused_commits += 1
            logger.info(
                "history commit refused after a rebalance; the partitions' new "
                "holders write those records again"
            )


def _check_continuity(
    records: Sequence[LogRecord], next_offsets: dict[int, int]
) -> dict[int, int]:
    """The next offset per partition after ``records``; warns about deleted ones."""
    ends: dict[int, int] = {}
    for record in records:
        expected = ends.get(record.partition, next_offsets.get(record.partition))
        if expected is not None and record.offset > expected:
            warn_retention_gap(record.partition, expected, record.offset)
        ends[record.partition] = record.offset + 1
    next_offsets.update(ends)
    return ends


async def _write_until_durable(
    store: HistoryStore, entries: Sequence[tuple[LogRecord, InboxRecord]]
) -> None:
    """Write one batch, waiting out a store outage; the offsets wait with it."""
    failures = 0
    while True:
        try:
            await store.write(entries)
            return
        except HistoryUnavailable as exc:
            if failures == 0:
                logger.warning("history store unavailable; retrying: %s", exc)
            await trio.sleep(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
            failures += 1


async def serve_history_writer(
    *,
    bootstrap: str,
    dsn: str,
    topic: str = DEFAULT_INBOX_TOPIC,
    group: str = HISTORY_GROUP,
    batch_size: int = BATCH_SIZE,
    session_timeout_s: float = 10.0,
    stats: HistoryWriterStats | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the PostgreSQL store, join the history group, write until cancelled."""
    from ._history_pg import open_postgres_history_store
    from ._kafka_group import open_group_consumer

    async with (
        open_postgres_history_store(dsn) as store,
        open_group_consumer(
            bootstrap, topic=topic, group=group, session_timeout_s=session_timeout_s
        ) as consumer,
    ):
        await run_history_writer(
            consumer,
            store,
            batch_size=batch_size,
            stats=stats,
            task_status=task_status,
        )


# --- command line ------------------------------------------------------------------


def add_history_commands(
    commands: argparse._SubParsersAction[Any],
) -> None:
    """Add ``history migrate`` and ``history-writer`` to the ``msgnet`` command."""
    history_cmd = commands.add_parser(
        "history", help="manage the PostgreSQL history store"
    )
    actions = history_cmd.add_subparsers(dest="action", required=True)
    migrate_cmd = actions.add_parser(
        "migrate", help="create or upgrade the history schema (docs/history.md)"
    )
    _add_dsn_argument(migrate_cmd)
    migrate_cmd.set_defaults(run=_migrate)

    writer_cmd = commands.add_parser(
        "history-writer",
        help="copy the inbox topic into PostgreSQL, as one of the history group",
        description="Join the msgnet-history consumer group and write the inbox "
        "topic's records into PostgreSQL. Run several for more throughput; "
        "Kafka shares the partitions among them. Servers then run with "
        "history_writer = false.",
    )
    _add_dsn_argument(writer_cmd)
    writer_cmd.add_argument(
        "--kafka-bootstrap",
        default=os.environ.get("MSGNET_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
        help="Kafka bootstrap servers (default: %(default)s)",
    )
    writer_cmd.add_argument(
        "--kafka-topic",
        default=os.environ.get("MSGNET_KAFKA_TOPIC", DEFAULT_INBOX_TOPIC),
        help="the inbox topic (default: %(default)s)",
    )
    writer_cmd.add_argument(
        "--group",
        default=HISTORY_GROUP,
        help="consumer group (default: %(default)s, the one servers read; "
        "change it only for tests and benchmarks)",
    )
    writer_cmd.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        help="records per store transaction at most (default: %(default)s)",
    )
    writer_cmd.add_argument(
        "--session-timeout",
        type=float,
        default=10.0,
        help="seconds of silence before Kafka moves a writer's partitions to the "
        "others (default: %(default)s)",
    )
    writer_cmd.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    writer_cmd.set_defaults(run=_history_writer)


def _add_dsn_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        default=os.environ.get("MSGNET_HISTORY_DSN", ""),
        help="PostgreSQL connection string, e.g. 'host=db dbname=msgnet user=msgnet' "
        "(default: $MSGNET_HISTORY_DSN)",
    )


def _require_dsn(args: argparse.Namespace) -> str:
    if not args.dsn:
        raise ValueError("no PostgreSQL DSN: pass --dsn or set MSGNET_HISTORY_DSN")
    return str(args.dsn)


# SchemaMismatch (a ValueError) and HistoryUnavailable (an OSError) reach
# msgnet's main, which reports them in one line with exit code 1.


def _migrate(args: argparse.Namespace) -> int:
    from ._history_pg import migrate_postgres

    found, now = migrate_postgres(_require_dsn(args))
    if found == now:
        logger.info("history schema is up to date at version %d", now)
    else:
        logger.info("history schema migrated from version %d to %d", found, now)
    return 0


def _history_writer(args: argparse.Namespace) -> int:
    trio.run(
        functools.partial(
            _write_until_signalled,
            bootstrap=args.kafka_bootstrap,
            dsn=_require_dsn(args),
            topic=args.kafka_topic,
            group=args.group,
            batch_size=args.batch_size,
            session_timeout_s=args.session_timeout,
        )
    )
    return 0


async def _write_until_signalled(
    *,
    bootstrap: str,
    dsn: str,
    topic: str,
    group: str,
    batch_size: int,
    session_timeout_s: float,
) -> None:
    # Opened outside the nursery, so that a refused schema or an unreachable
    # server reaches main as itself, not inside an exception group.
    from ._history_pg import open_postgres_history_store
    from ._kafka_group import open_group_consumer

    async with (
        open_postgres_history_store(dsn) as store,
        open_group_consumer(
            bootstrap, topic=topic, group=group, session_timeout_s=session_timeout_s
        ) as consumer,
    ):
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    functools.partial(
                        run_history_writer, consumer, store, batch_size=batch_size
                    )
                )
                logger.info("history writer running on topic %s", topic)
                async for signum in signals:
                    # A batch in flight finishes its transaction first (the
                    # store never abandons one); only its commit is skipped,
                    # and the partition's next holder writes it again.
                    logger.info("received signal %d; leaving the history group", signum)
                    nursery.cancel_scope.cancel()
                    break
