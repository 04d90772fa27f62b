"""History writer throughput: inbox records per second into PostgreSQL.

Two measurements, both on a real PostgreSQL (``--dsn``, or a throwaway cluster
with fsync on, started here):

- ``store``: batches handed straight to ``PostgresHistoryStore.write`` by
  ``--writers`` concurrent tasks: the ceiling the database sets;
- ``kafka`` (with ``--kafka-bootstrap``): records appended to a fresh inbox
  topic first, then ``--writers`` history writers in the consumer group drain
  it, each polling, writing a batch and committing, as ``msgnet
  history-writer`` does. The clock runs from the writers' start until the
  store holds every record.

Run from the repository root: ``python -m bench.history_writer --help``.
"""

from __future__ import annotations

import argparse
import functools
import json
import secrets
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import trio
from psycopg import sql
from psycopg.conninfo import make_conninfo

from msgnet._backplane import LogRecord
from msgnet._devpostgres import DevPostgres
from msgnet._history_pg import migrate_postgres, open_postgres_history_store
from msgnet._history_service import run_history_writer
from msgnet._kafka import create_inbox_topic, open_kafka_backplane
from msgnet._kafka_group import open_group_consumer
from msgnet._records import InboxRecord

from ._support import machine


def _record(n: int, recipients: int) -> InboxRecord:
    return InboxRecord(
        id=f"m{n}",
        sender=f"sender{n % 1000}",
        to=f"user{n % 5000}" if recipients == 1 else None,
        group=None if recipients == 1 else f"group{n % 100}",
        body="x" * 100,
        ts=1_700_000_000_000 + n,
        recipients=tuple(f"user{(n + k) % 5000}" for k in range(recipients)),
        origin="bench",
    )


def _count(dsn: str) -> int:
    with psycopg.connect(dsn) as connection:
        row = connection.execute("SELECT count(*) FROM inbox").fetchone()
    assert row is not None
    return int(row[0])


async def measure_store(
    dsn: str, *, records: int, writers: int, batch_size: int, recipients: int
) -> float:
    """Inbox rows per second written straight through the store."""
    batches: list[list[tuple[LogRecord, InboxRecord]]] = [[] for _ in range(writers)]
    for n in range(records):
        record = _record(n, recipients)
        log_record = LogRecord(
            partition=n % writers,
            offset=n // writers,
            key=b"",
            value=b"",
            timestamp_ms=record.ts,
        )
        batches[n % writers].append((log_record, record))

    async with open_postgres_history_store(dsn, pool_size=writers) as store:

        async def write(entries: Sequence[tuple[LogRecord, InboxRecord]]) -> None:
            for first in range(0, len(entries), batch_size):
                await store.write(entries[first : first + batch_size])

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for entries in batches:
                nursery.start_soon(write, entries)
        elapsed = time.perf_counter() - started
    return records * recipients / elapsed


async def measure_kafka(
    dsn: str,
    bootstrap: str,
    *,
    records: int,
    writers: int,
    batch_size: int,
    recipients: int,
    partitions: int,
) -> float:
    """Inbox rows per second through group members polling a filled topic."""
    topic = f"bench-history-{uuid.uuid4().hex}"
    await trio.to_thread.run_sync(
        functools.partial(create_inbox_topic, bootstrap, topic, partitions=partitions)
    )
    async with open_kafka_backplane(bootstrap, topic=topic) as backplane:
        for first in range(0, records, 1000):
            async with trio.open_nursery() as nursery:
                for n in range(first, min(first + 1000, records)):
                    value = _record(n, recipients).encode()
                    nursery.start_soon(backplane.append, n % partitions, b"k", value)

    rows = records * recipients
    group = f"bench-history-{uuid.uuid4().hex}"
    async with (
        open_postgres_history_store(dsn, pool_size=writers) as store,
        trio.open_nursery() as nursery,
    ):
        started = time.perf_counter()
        for _ in range(writers):
            nursery.start_soon(_one_writer, bootstrap, topic, group, store, batch_size)
        while await trio.to_thread.run_sync(_count, dsn) < rows:
            await trio.sleep(0.25)
        elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return rows / elapsed


async def _one_writer(
    bootstrap: str, topic: str, group: str, store: Any, batch_size: int
) -> None:
    async with open_group_consumer(bootstrap, topic=topic, group=group) as consumer:
        await run_history_writer(consumer, store, batch_size=batch_size)


@contextmanager
def _fresh_database(dsn: str) -> Iterator[str]:
    """A new, migrated database on the server at ``dsn``, dropped afterwards."""
    raw_name = f"msgnet_bench_{secrets.token_hex(4)}"
    name = sql.Identifier(raw_name)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(name))
    try:
        database = make_conninfo(dsn, dbname=raw_name)
        migrate_postgres(database)
        yield database
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name)
            )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dsn", default="", help="PostgreSQL to create databases in")
    parser.add_argument("--kafka-bootstrap", default="", help="also measure via Kafka")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--recipients", type=int, default=1, help="rows per record")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    with DevPostgres(durable=True) if not args.dsn else _Given(args.dsn) as server:
        options = {
            "records": args.records,
            "writers": args.writers,
            "batch_size": args.batch_size,
            "recipients": args.recipients,
        }
        figures: dict[str, Any] = {"machine": machine(), **options}
        with _fresh_database(server.dsn) as database:
            rate = trio.run(functools.partial(measure_store, database, **options))
        figures["store_rows_per_s"] = rate
        print(f"store:  {rate:,.0f} inbox rows/s ({args.writers} writers)")
        if args.kafka_bootstrap:
            with _fresh_database(server.dsn) as database:
                rate = trio.run(
                    functools.partial(
                        measure_kafka,
                        database,
                        args.kafka_bootstrap,
                        partitions=args.partitions,
                        **options,
                    )
                )
            figures["kafka_rows_per_s"] = rate
            print(f"kafka:  {rate:,.0f} inbox rows/s ({args.writers} group members)")

    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return figures


class _Given:
    """A PostgreSQL the caller runs, in place of a throwaway one."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def __enter__(self) -> _Given:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


if __name__ == "__main__":
    main()
