"""The history store in PostgreSQL, shared by every server and history writer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, LiteralString, TypeVar

import psycopg
import psycopg_pool
import trio
from psycopg import errors as pg_errors

from protocol import HistoryEntry

from ._backplane import LogRecord
from ._history_store import HistoryUnavailable, check_page_arguments
from ._records import InboxRecord

__all__ = [
    "SCHEMA_VERSION",
    "PostgresHistoryStore",
    "SchemaMismatch",
    "migrate_postgres",
    "open_postgres_history_store",
    "schema_version",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_NEWEST = 2**63 - 1
"""A seq above every stored one: ``before=None`` pages from here."""

_WRITE_ATTEMPTS = 5
"""Tries of one batch when PostgreSQL picks it as a deadlock's victim.

Two writers storing copies of the same group messages in different orders can
wait on each other's unique-key entries; PostgreSQL breaks the cycle by failing
one transaction, which is then simply run again.
"""

_MIGRATION_LOCK = 0x6D73676E6574
"""The advisory lock key that makes concurrent ``migrate_postgres`` calls take turns."""

# Step ``i`` takes the schema from version ``i`` to ``i + 1``; append, never edit.
# docs/history.md explains each table and index.
MIGRATIONS: tuple[tuple[LiteralString, ...], ...] = (
    (
        """
        CREATE TABLE messages (
            seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            sender text NOT NULL,
            id text NOT NULL,
            conv_kind text NOT NULL,
            conv_key text NOT NULL,
            recipient_to text,
            grp text,
            body text NOT NULL,
            ts bigint NOT NULL,
            UNIQUE (sender, id)
        )
        """,
        "CREATE INDEX messages_by_conversation ON messages (conv_kind, conv_key, seq)",
        """
        CREATE TABLE inbox (
            user_id text NOT NULL,
            log_partition integer NOT NULL,
            log_offset bigint NOT NULL,
            seq bigint NOT NULL REFERENCES messages (seq),
            PRIMARY KEY (user_id, log_partition, log_offset)
        )
        """,
        """
        CREATE TABLE cursors (
            user_id text NOT NULL,
            device text NOT NULL,
            cursor bigint NOT NULL,
            PRIMARY KEY (user_id, device)
        )
        """,
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)
"""The newest ``schema_migrations`` version this msgnet knows how to read."""


class SchemaMismatch(ValueError):
    """The database's schema is not the one this msgnet reads."""


def _escape(text: str) -> str:
    # PostgreSQL text cannot hold NUL, which msgnet's ids and bodies may
    # contain. "%" and NUL become %25 and %00; every other string is stored as
    # it is, and the mapping is one-to-one, so equality still finds the rows.
    if "%" not in text and "\x00" not in text:
        return text
    return text.replace("%", "%25").replace("\x00", "%00")


def _unescape(text: str) -> str:
    if "%" not in text:
        return text
    return text.replace("%00", "\x00").replace("%25", "%")


def _optional_escape(text: str | None) -> str | None:
    return None if text is None else _escape(text)


def _pair_key(peer_a: str, peer_b: str) -> str:
    # The shorter name's length first makes the pair unambiguous without a
    # separator that names could contain.
    low, high = sorted((peer_a, peer_b))
    return f"{len(low)}:{low}{high}"


def _conversation(record: InboxRecord) -> tuple[str, str]:
    if record.group is not None:
        return "g", record.group
    assert record.to is not None
    return "u", _pair_key(record.sender, record.to)


# --- schema --------------------------------------------------------------------


def schema_version(connection: psycopg.Connection[Any]) -> int:
    """The database's schema version: 0 before the first migration (blocking)."""
    exists = connection.execute(
        "SELECT to_regclass('schema_migrations') IS NOT NULL"
    ).fetchone()
    if exists is None or not exists[0]:
        return 0
    row = connection.execute(
        "SELECT coalesce(max(version), 0) FROM schema_migrations"
    ).fetchone()
    assert row is not None
    return int(row[0])


def migrate_postgres(dsn: str) -> tuple[int, int]:
    """Bring the schema at ``dsn`` up to ``SCHEMA_VERSION``; return (from, to).

    Blocking. Every missing step runs in one transaction, under an advisory
    lock so that two migrations started at once take turns, and the second
    finds nothing left to do. Raises ``SchemaMismatch`` for a database that a
    newer msgnet migrated, and ``HistoryUnavailable`` if PostgreSQL cannot be
    reached.
    """
    try:
        return _migrate(dsn)
    except psycopg.OperationalError as exc:
        raise HistoryUnavailable(f"PostgreSQL is unavailable: {exc}") from exc


def _migrate(dsn: str) -> tuple[int, int]:
    with (
        psycopg.connect(dsn, autocommit=True) as connection,
        connection.transaction(),
    ):
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        connection.execute(
            """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version integer PRIMARY KEY,
                    applied_at timestamptz NOT NULL DEFAULT now()
                )
                """
        )
        found = schema_version(connection)
        if found > SCHEMA_VERSION:
            raise SchemaMismatch(_newer_message(found))
        for target in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target - 1]:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_migrations (version) VALUES (%s)", (target,)
            )
    if found < SCHEMA_VERSION:
        logger.info("migrated history schema from %d to %d", found, SCHEMA_VERSION)
    return found, SCHEMA_VERSION


def _newer_message(found: int) -> str:
    return (
        f"the history database's schema version {found} is newer than this "
        f"msgnet's {SCHEMA_VERSION}; upgrade msgnet before running it against "
        "this database"
    )


def _check_schema(connection: psycopg.Connection[Any]) -> None:
    found = schema_version(connection)
    if found > SCHEMA_VERSION:
        raise SchemaMismatch(_newer_message(found))
    if found < SCHEMA_VERSION:
        raise SchemaMismatch(
            f"the history database's schema version {found} is older than this "
            f"msgnet's {SCHEMA_VERSION}; run `msgnet history migrate --dsn DSN` "
            "first"
        )


# --- writes --------------------------------------------------------------------


def _write(
    connection: psycopg.Connection[Any],
    entries: Sequence[tuple[LogRecord, InboxRecord]],
) -> None:
    # One row per message, the first copy in the batch winning, in the order
    # the batch holds them: seq follows it (ORDER BY ord below).
    messages: dict[tuple[str, str], InboxRecord] = {}
    for _, record in entries:
        messages.setdefault((_escape(record.sender), _escape(record.id)), record)
    columns: list[list[Any]] = [[] for _ in range(8)]
    for (sender, id_), record in messages.items():
        conv_kind, conv_key = _conversation(record)
        row = (
            sender,
            id_,
            conv_kind,
            _escape(conv_key),
            _optional_escape(record.to),
            _optional_escape(record.group),
            _escape(record.body),
            record.ts,
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)

    inbox: list[list[Any]] = [[], [], [], [], []]
    for log_record, record in entries:
        for user in record.recipients:
            row_values = (
                _escape(user),
                log_record.partition,
                log_record.offset,
                _escape(record.sender),
                _escape(record.id),
            )
            for inbox_column, item in zip(inbox, row_values, strict=True):
                inbox_column.append(item)

    # The arrays go in binary (%b): parsing thousands of quoted strings costs
    # the server more than the rows themselves.
    with connection.transaction():
        connection.execute(
            """
            INSERT INTO messages
                (sender, id, conv_kind, conv_key, recipient_to, grp, body, ts)
            SELECT sender, id, conv_kind, conv_key, recipient_to, grp, body, ts
            FROM unnest(
                %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
                %b::text[], %b::text[], %b::bigint[]
            ) WITH ORDINALITY
                AS b (sender, id, conv_kind, conv_key, recipient_to, grp, body, ts, ord)
            ORDER BY ord
            ON CONFLICT (sender, id) DO NOTHING
            """,
            columns,
        )
        # The join finds each message's seq whether this batch made the row
        # or an earlier write did; both are visible to this statement.
        connection.execute(
            """
            INSERT INTO inbox (user_id, log_partition, log_offset, seq)
            SELECT r.user_id, r.log_partition, r.log_offset, m.seq
            FROM unnest(%b::text[], %b::integer[], %b::bigint[], %b::text[], %b::text[])
                AS r (user_id, log_partition, log_offset, sender, id)
            JOIN messages AS m ON m.sender = r.sender AND m.id = r.id
            ON CONFLICT (user_id, log_partition, log_offset) DO NOTHING
            """,
            inbox,
        )


def _write_retrying(
    connection: psycopg.Connection[Any],
    entries: Sequence[tuple[LogRecord, InboxRecord]],
) -> None:
    for attempt in range(1, _WRITE_ATTEMPTS + 1):
        try:
            _write(connection, entries)
            return
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
            if attempt == _WRITE_ATTEMPTS:
                raise
            logger.debug("history batch lost a deadlock; attempt %d again", attempt)


class PostgresHistoryStore:
    """The history store in PostgreSQL; open it with ``open_postgres_history_store``.

    psycopg's asynchronous API runs on asyncio only, so the store uses its
    blocking pool from trio worker threads, at most one thread per pooled
    connection. Semantics match ``SQLiteHistoryStore`` (see ``HistoryStore``);
    its docstrings hold for these methods too. A lost or unreachable server
    raises ``HistoryUnavailable``. Text that contains ``%`` or
    NUL is stored escaped (see docs/history.md).
    """

    def __init__(self, pool: psycopg_pool.ConnectionPool[Any], size: int) -> None:
        self._pool = pool
        self._limiter = trio.CapacityLimiter(size)
        self._closed = False

    async def _run(self, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        def call() -> _T:
            if self._closed:
                raise trio.ClosedResourceError("the history store is closed")
            with self._pool.connection() as connection:
                return fn(connection)

        # Not abandoned on cancel: a transaction always ends in a commit or a
        # rollback before its caller moves on.
        try:
            return await trio.to_thread.run_sync(call, limiter=self._limiter)
        except psycopg.OperationalError as exc:
            # Connection lost, server restarting, pool exhausted: the caller
            # decides whether to retry; a bad query stays a plain error.
            raise HistoryUnavailable(f"PostgreSQL is unavailable: {exc}") from exc

    async def write(self, entries: Sequence[tuple[LogRecord, InboxRecord]]) -> None:
        """Persist a batch in one transaction; idempotent, like the SQLite store."""
        if entries:
            await self._run(lambda connection: _write_retrying(connection, entries))

    async def page(
        self,
        *,
        peer_a: str,
        peer_b: str | None = None,
        group: str | None = None,
        before: int | None,
        limit: int,
    ) -> tuple[list[HistoryEntry], int | None]:
        """One page of a conversation, oldest first, and the cursor before it."""
        check_page_arguments(peer_b=peer_b, group=group, before=before, limit=limit)

        if group is not None:
            conv_kind, conv_key = "g", group
        else:
            assert peer_b is not None
            conv_kind, conv_key = "u", _pair_key(peer_a, peer_b)
        upper = _NEWEST if before is None else before

        # One row more than asked for says whether an older page exists.
        def query(connection: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return connection.execute(
                """
                SELECT seq, id, sender, recipient_to, grp, body, ts FROM messages
                WHERE conv_kind = %s AND conv_key = %s AND seq < %s
                ORDER BY seq DESC LIMIT %s
                """,
                (conv_kind, _escape(conv_key), upper, limit + 1),
            ).fetchall()

        rows = await self._run(query)
        older_exists = len(rows) > limit
        entries = [_history_entry(row) for row in reversed(rows[:limit])]
        return entries, entries[0].seq if older_exists else None

    async def inbox_since(
        self,
        user: str,
        partition: int,
        offset: int,
        upto: int,
        *,
        limit: int | None = None,
    ) -> list[tuple[int, InboxRecord]]:
        """The user's records at offsets ``offset <= o < upto`` of a partition."""
        if limit is not None and limit < 1:
            raise ValueError(f"inbox_since limit must be at least 1, got {limit!r}")

        def query(connection: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return connection.execute(
                """
                SELECT i.log_offset, m.id, m.sender, m.recipient_to, m.grp, m.body, m.ts
                FROM inbox AS i JOIN messages AS m ON m.seq = i.seq
                WHERE i.user_id = %s AND i.log_partition = %s
                    AND i.log_offset >= %s AND i.log_offset < %s
                ORDER BY i.log_offset
                LIMIT %s
                """,
                (_escape(user), partition, offset, upto, limit),
            ).fetchall()

        rows = await self._run(query)
        return [(int(row[0]), _inbox_record(row[1:], user)) for row in rows]

    async def save_cursor(self, user: str, device: str, cursor: int) -> None:
        """Remember how far a device has processed; a smaller cursor is ignored."""
        if cursor < 0:
            raise ValueError(f"cursor must be >= 0, got {cursor!r}")

        def upsert(connection: psycopg.Connection[Any]) -> None:
            connection.execute(
                """
                INSERT INTO cursors (user_id, device, cursor) VALUES (%s, %s, %s)
                ON CONFLICT (user_id, device)
                DO UPDATE SET cursor = greatest(cursors.cursor, excluded.cursor)
                """,
                (_escape(user), _escape(device), cursor),
            )

        await self._run(upsert)

    async def load_cursor(self, user: str, device: str) -> int | None:
        """The device's saved cursor, or None if it never saved one."""

        def query(connection: psycopg.Connection[Any]) -> int | None:
            row = connection.execute(
                "SELECT cursor FROM cursors WHERE user_id = %s AND device = %s",
                (_escape(user), _escape(device)),
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._run(query)

    async def aclose(self) -> None:
        """Close the pool after the calls already running; idempotent."""
        if self._closed:
            return
        self._closed = True
        # Shielded so that a cancelled owner leaves no connection open.
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._pool.close)


def _history_entry(row: tuple[Any, ...]) -> HistoryEntry:
    seq, id_, sender, to, group, body, ts = row
    return HistoryEntry(
        id=_unescape(id_),
        sender=_unescape(sender),
        to=None if to is None else _unescape(to),
        group=None if group is None else _unescape(group),
        body=_unescape(body),
        ts=int(ts),
        seq=int(seq),
    )


def _inbox_record(row: tuple[Any, ...], user: str) -> InboxRecord:
    id_, sender, to, group, body, ts = row
    return InboxRecord(
        id=_unescape(id_),
        sender=_unescape(sender),
        to=None if to is None else _unescape(to),
        group=None if group is None else _unescape(group),
        body=_unescape(body),
        ts=int(ts),
        recipients=(user,),
        origin="",
    )


@asynccontextmanager
async def open_postgres_history_store(
    dsn: str, *, pool_size: int = 4, connect_timeout: float = 10.0
) -> AsyncIterator[PostgresHistoryStore]:
    """Open the store at ``dsn`` for a block, after checking its schema version.

    Raises ``SchemaMismatch`` if the schema is older (run ``msgnet history
    migrate``) or newer than this msgnet's, and ``HistoryUnavailable`` if
    PostgreSQL cannot be reached within ``connect_timeout`` seconds.
    """
    if not dsn:
        raise ValueError(
            "the PostgreSQL history store needs a connection string (history_dsn), "
            "got ''"
        )
    if pool_size < 1:
        raise ValueError(f"pool_size must be at least 1, got {pool_size!r}")

    def open_pool() -> psycopg_pool.ConnectionPool[Any]:
        pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            open=False,
            name="msgnet-history",
        )
        try:
            with psycopg.connect(
                dsn, autocommit=True, connect_timeout=max(1, round(connect_timeout))
            ) as connection:
                _check_schema(connection)
            pool.open(wait=True, timeout=connect_timeout)
        except BaseException:
            pool.close()
            raise
        return pool

    try:
        pool = await trio.to_thread.run_sync(open_pool)
    except psycopg.OperationalError as exc:
        raise HistoryUnavailable(f"PostgreSQL is unavailable: {exc}") from exc
    store = PostgresHistoryStore(pool, pool_size)
    try:
        yield store
    finally:
        await store.aclose()
