"""The embedded log's file: one SQLite database in WAL mode, fsynced at every commit.

Blocking functions, run in worker threads by ``_embedded``; this module keeps
the schema and every statement, the backplane keeps the state and the order.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import attrs

from ._backplane import LogRecord
from ._sqlite import transaction

__all__ = ["LOG_FILENAME", "Row", "StoredState", "connect", "load", "read", "write"]

LOG_FILENAME = "inbox-log.sqlite3"
"""The name of the log's database file inside the directory it is opened in."""

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS settings (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS records (
        "partition" INTEGER NOT NULL,
        "offset" INTEGER NOT NULL,
        "key" BLOB NOT NULL,
        "value" BLOB NOT NULL,
        timestamp_ms INTEGER NOT NULL,
        PRIMARY KEY ("partition", "offset")
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS committed_offsets (
        "group" TEXT NOT NULL,
        "partition" INTEGER NOT NULL,
        "offset" INTEGER NOT NULL,
        PRIMARY KEY ("group", "partition")
    ) WITHOUT ROWID
    """,
)


@attrs.frozen(kw_only=True)
class StoredState:
    """What the log holds when it is opened."""

    end_offsets: list[int]
    """Per partition, the offset after the last stored record."""
    committed: dict[tuple[str, int], int]
    """The committed offset of each (group, partition) that has one."""


def connect(directory: Path, partitions: int) -> sqlite3.Connection:
    # Blocking: runs in a worker thread while the backplane is being opened.
    directory.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(
        directory / LOG_FILENAME, isolation_level=None, check_same_thread=False
    )
    try:
        # WAL: a commit appends to the write-ahead log and readers are never
        # blocked by it. In WAL mode synchronous=NORMAL only fsyncs at
        # checkpoints, so a commit that returned could still vanish in a power
        # cut or OS crash; FULL fsyncs the WAL before COMMIT returns. append()
        # acknowledges an offset only after that COMMIT, so an acknowledged
        # record survives the process being killed and, on a disk that
        # honours fsync, the machine losing power.
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        for statement in _SCHEMA:
            connection.execute(statement)

        # The partition count decides where every user's records live, so a log
        # must never be read back with a different one.
        with transaction(connection):
            row = connection.execute(
                "SELECT value FROM settings WHERE name = 'partitions'"
            ).fetchone()
            if row is None:
                connection.execute(
                    "INSERT INTO settings (name, value) VALUES ('partitions', ?)",
                    (partitions,),
                )
            elif row[0] != partitions:
                raise ValueError(
                    f"the embedded log in {directory} has "
                    f"{row[0]} partitions, not the {partitions} requested"
                )
    except BaseException:
        connection.close()
        raise
    return connection


def load(connection: sqlite3.Connection, partitions: int) -> StoredState:
    end_offsets = [0] * partitions
    for partition, last in connection.execute(
        'SELECT "partition", MAX("offset") FROM records GROUP BY "partition"'
    ):
        end_offsets[partition] = last + 1
    committed = {
        (group, partition): offset
        for group, partition, offset in connection.execute(
            'SELECT "group", "partition", "offset" FROM committed_offsets'
        )
    }
    return StoredState(end_offsets=end_offsets, committed=committed)


Row = tuple[int, int, bytes, bytes, int]
"""A record as it is stored: partition, offset, key, value, timestamp_ms."""


def write(
    connection: sqlite3.Connection,
    rows: Sequence[Row],
    commits: Sequence[tuple[str, int, int]],
) -> None:
    with transaction(connection):
        connection.executemany(
            'INSERT INTO records ("partition", "offset", "key", "value", timestamp_ms) '
            "VALUES (?, ?, ?, ?, ?)",
            rows,
        )
        connection.executemany(
            'INSERT OR REPLACE INTO committed_offsets ("group", "partition", "offset") '
            "VALUES (?, ?, ?)",
            commits,
        )


def read(
    connection: sqlite3.Connection, partition: int, offset: int, max_records: int
) -> list[LogRecord]:
    rows = connection.execute(
        'SELECT "offset", "key", "value", timestamp_ms FROM records '
        'WHERE "partition" = ? AND "offset" >= ? ORDER BY "offset" LIMIT ?',
        (partition, offset, max_records),
    )
    return [
        LogRecord(
            partition=partition,
            offset=row_offset,
            key=key,
            value=value,
            timestamp_ms=timestamp_ms,
        )
        for row_offset, key, value, timestamp_ms in rows
    ]
