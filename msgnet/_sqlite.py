"""msgnet's SQLite database: one connection per owner, its worker thread, its schema."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

import trio

_T = TypeVar("_T")

BUSY_TIMEOUT_SECONDS = 10.0
"""How long a write waits for another connection's write to the same file.

The history store and the group directory each hold a connection to the same
file; their transactions are short, so a wait this long means something is stuck.
"""


class Database:
    """One sqlite3 connection, used by one worker thread at a time.

    sqlite3 blocks, so every call runs in a trio worker thread. A capacity
    limiter of one makes the calls take turns on the connection, which is all
    sqlite3 needs to share a connection across threads safely.

    An in-memory database (``inline``) is called on the trio thread instead:
    it never waits for a disk, so a call is CPU work wherever it runs, and a
    thread round trip costs more than most calls.
    """

    def __init__(self, connection: sqlite3.Connection, *, inline: bool = False) -> None:
        self._connection = connection
        self._limiter = trio.CapacityLimiter(1)
        self._inline = inline
        self._closed = False

    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Call ``fn(connection)`` in a worker thread and return its result.

        A cancelled caller still waits for ``fn`` to finish, so a transaction
        inside ``fn`` always ends in a commit or a rollback, never half done.
        Raises ``trio.ClosedResourceError`` once the database is closed.
        """

        def call() -> _T:
            # Checked in the worker, in turn with every other call, so no call
            # queued before aclose can reach the connection after it closed.
            if self._closed:
                raise trio.ClosedResourceError("the database is closed")
            return fn(self._connection)

        if self._inline:
            await trio.lowlevel.checkpoint()
            return call()
        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def aclose(self) -> None:
        """Close the connection after the calls already queued; idempotent."""

        def close() -> None:
            if not self._closed:
                self._closed = True
                self._connection.close()

        if self._inline:
            close()
            await trio.lowlevel.checkpoint()
            return
        # Shielded so that a cancelled owner leaves no open file behind.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(close, limiter=self._limiter)


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """Run the block as one write transaction: commit on success, else roll back.

    ``BEGIN IMMEDIATE`` takes the write lock up front, so the transaction waits
    for another writer at its start instead of failing half way through.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _schema_v1(connection: sqlite3.Connection) -> None:
    # One row per message however many partitions it was copied to; seq is the
    # store's order and, with AUTOINCREMENT, is never reused after a delete, so
    # a client's paging cursor can never point at a different message.
    connection.execute(
        """
        CREATE TABLE messages (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            sender TEXT NOT NULL,
            id TEXT NOT NULL,
            conv_kind TEXT NOT NULL,
            conv_key TEXT NOT NULL,
            recipient_to TEXT,
            grp TEXT,
            body TEXT NOT NULL,
            ts INTEGER NOT NULL,
            UNIQUE (sender, id)
        )
        """
    )
    # "A conversation's page before seq N" is a range scan of this index.
    connection.execute(
        "CREATE INDEX messages_by_conversation ON messages (conv_kind, conv_key, seq)"
    )

    # One row per recipient per log record; the primary key makes "user U's
    # records in partition P from offset X" a range scan.
    connection.execute(
        """
        CREATE TABLE inbox (
            user TEXT NOT NULL,
            log_partition INTEGER NOT NULL,
            log_offset INTEGER NOT NULL,
            seq INTEGER NOT NULL REFERENCES messages (seq),
            PRIMARY KEY (user, log_partition, log_offset)
        ) WITHOUT ROWID
        """
    )
    connection.execute(
        """
        CREATE TABLE cursors (
            user TEXT NOT NULL,
            device TEXT NOT NULL,
            cursor INTEGER NOT NULL,
            PRIMARY KEY (user, device)
        ) WITHOUT ROWID
        """
    )

    connection.execute(
        """
        CREATE TABLE groups (
            name TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            created_ts INTEGER NOT NULL
        ) WITHOUT ROWID
        """
    )
    connection.execute(
        """
        CREATE TABLE group_members (
            name TEXT NOT NULL REFERENCES groups (name),
            user TEXT NOT NULL,
            PRIMARY KEY (name, user)
        ) WITHOUT ROWID
        """
    )


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_schema_v1,)
"""Step ``i`` takes the schema from version ``i`` to ``i + 1``; append, never edit."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The ``PRAGMA user_version`` of a database this msgnet has migrated."""


def migrate(connection: sqlite3.Connection) -> int:
    """Bring the schema up to ``SCHEMA_VERSION`` in one transaction; return it.

    Raises ``RuntimeError`` for a database written by a newer msgnet, whose
    schema this one cannot know how to read.
    """
    with transaction(connection):
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"database schema version {version} is newer than this msgnet's "
                f"{SCHEMA_VERSION}"
            )

        # user_version lives in the file header and is written inside the same
        # transaction, so a crash mid-migration leaves the old version intact.
        for target in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[target - 1](connection)
            connection.execute(f"PRAGMA user_version = {target:d}")
    return SCHEMA_VERSION


def connect(path: str | os.PathLike[str] | None) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the database; None means in memory.

    Blocking: call it from a worker thread.
    """
    connection = sqlite3.connect(
        ":memory:" if path is None else os.fspath(path),
        timeout=BUSY_TIMEOUT_SECONDS,
        # Transactions are opened explicitly by ``transaction``, never implicitly.
        isolation_level=None,
        # Calls come from whichever worker thread trio picks, one at a time.
        check_same_thread=False,
    )
    try:
        # WAL lets readers run while a write is in progress. FULL sync because
        # the history writer commits its log offset once a write returns: a
        # write lost to a power cut after that would never be redelivered.
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        connection.execute("PRAGMA foreign_keys = ON")
        migrate(connection)
    except BaseException:
        connection.close()
        raise
    return connection


@asynccontextmanager
async def open_database(
    path: str | os.PathLike[str] | None,
) -> AsyncIterator[Database]:
    """Open the database at ``path`` (None: a private in-memory one) for a block."""
    database = Database(
        await trio.to_thread.run_sync(connect, path), inline=path is None
    )
    try:
        yield database
    finally:
        await database.aclose()
