"""The history store: every inbox record kept in SQLite for paging and catch-up."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from protocol import HistoryEntry

from ._backplane import LogRecord
from ._history_store import check_page_arguments
from ._records import InboxRecord
from ._sqlite import Database, open_database, transaction

_NEWEST = 2**63 - 1
"""A seq above every stored one: ``before=None`` pages from here."""


def _pair_key(peer_a: str, peer_b: str) -> str:
    # Must equal InboxRecord.conversation's key, so both sides share the rows.
    low, high = sorted((peer_a, peer_b))
    return f"{low}\x00{high}"


def _write(
    connection: sqlite3.Connection, entries: Sequence[tuple[LogRecord, InboxRecord]]
) -> None:
    messages: list[tuple[object, ...]] = []
    inbox: list[tuple[object, ...]] = []
    for log_record, record in entries:
        conv_kind, conv_key = record.conversation
        messages.append(
            (
                record.sender,
                record.id,
                conv_kind,
                conv_key,
                record.to,
                record.group,
                record.body,
                record.ts,
            )
        )
        partition, offset = log_record.partition, log_record.offset
        inbox.extend(
            (user, partition, offset, record.sender, record.id)
            for user in record.recipients
        )

    # Two statements for the whole batch, each looped over in C: a statement
    # per message from Python cost twice as much as the rows themselves.
    with transaction(connection):
        # Every copy of a message (one per partition, and any redelivery) has
        # the same (sender, id): the first write makes the row, the others
        # leave it as it is.
        connection.executemany(
            """
            INSERT INTO messages
                (sender, id, conv_kind, conv_key, recipient_to, grp, body, ts)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (sender, id) DO NOTHING
            """,
            messages,
        )
        # Each inbox row points at the message row by seq, which the unique
        # (sender, id) index finds whether this batch made the row or not.
        connection.executemany(
            """
            INSERT OR IGNORE INTO inbox (user, log_partition, log_offset, seq)
            SELECT ?, ?, ?, seq FROM messages WHERE sender = ? AND id = ?
            """,
            inbox,
        )


class SQLiteHistoryStore:
    """Messages, per-user inbox positions and delivery cursors in one SQLite file.

    Written by the history writer consumer group, read by sessions paging a
    conversation or catching up after a reconnect. Open it with
    ``open_history_store``.

    A message's ``seq`` is the order the store wrote it in, not its timestamp:
    two messages of one conversation written from different partitions keep the
    order the history writer happened to see them in. Copies of one message are
    matched by ``(sender, id)``; if a client reused an id for a different body,
    the first copy written wins.
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    async def write(self, entries: Sequence[tuple[LogRecord, InboxRecord]]) -> None:
        """Persist a batch of log records in one transaction.

        Idempotent: writing records again (a redelivery after a crash before
        the offset commit) or another partition's copy of a message adds no
        second message row and no second inbox row.
        """
        if entries:
            await self._database.run(lambda connection: _write(connection, entries))

    async def page(
        self,
        *,
        peer_a: str,
        peer_b: str | None = None,
        group: str | None = None,
        before: int | None,
        limit: int,
    ) -> tuple[list[HistoryEntry], int | None]:
        """One page of a conversation, oldest first, and the cursor for the one before.

        The conversation is the one-to-one between ``peer_a`` and ``peer_b``
        (either order gives the same rows) or, with ``group``, that group's;
        ``peer_a`` is then the reader and not used here (the caller checks
        membership). The page holds up to ``limit`` messages with seq below
        ``before`` (None: the newest). The cursor is the page's smallest seq,
        to pass back as ``before``, or None when no older message exists.
        """
        check_page_arguments(peer_b=peer_b, group=group, before=before, limit=limit)

        if group is not None:
            conv_kind, conv_key = "g", group
        else:
            assert peer_b is not None
            conv_kind, conv_key = "u", _pair_key(peer_a, peer_b)
        upper = _NEWEST if before is None else before

        # One row more than asked for says whether an older page exists.
        def query(connection: sqlite3.Connection) -> list[tuple[object, ...]]:
            return connection.execute(
                """
                SELECT seq, id, sender, recipient_to, grp, body, ts FROM messages
                WHERE conv_kind = ? AND conv_key = ? AND seq < ?
                ORDER BY seq DESC LIMIT ?
                """,
                (conv_kind, conv_key, upper, limit + 1),
            ).fetchall()

        rows = await self._database.run(query)
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
        """The user's records at offsets ``offset <= o < upto`` of a partition.

        Ordered by offset, as ``(offset, record)``, at most ``limit`` of them
        (None: all; pass the last offset + 1 back to read on). The records are
        rebuilt from the store, which keeps no per-copy detail: ``recipients``
        is just ``(user,)`` and ``origin`` is ``""``, which matches no session,
        so catch-up delivers to every connection of the user.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"inbox_since limit must be at least 1, got {limit!r}")

        def query(connection: sqlite3.Connection) -> list[tuple[object, ...]]:
            return connection.execute(
                """
                SELECT i.log_offset, m.id, m.sender, m.recipient_to, m.grp, m.body, m.ts
                FROM inbox AS i JOIN messages AS m ON m.seq = i.seq
                WHERE i.user = ? AND i.log_partition = ?
                    AND i.log_offset >= ? AND i.log_offset < ?
                ORDER BY i.log_offset
                LIMIT ?
                """,
                (user, partition, offset, upto, -1 if limit is None else limit),
            ).fetchall()

        rows = await self._database.run(query)
        return [(_int(row[0]), _inbox_record(row[1:], user)) for row in rows]

    async def save_cursor(self, user: str, device: str, cursor: int) -> None:
        """Remember how far a device has processed; a smaller cursor is ignored.

        Acknowledgements can arrive out of order (two connections of one
        device), and a cursor that moved back would redeliver messages.
        """
        if cursor < 0:
            raise ValueError(f"cursor must be >= 0, got {cursor!r}")

        def upsert(connection: sqlite3.Connection) -> None:
            connection.execute(
                """
                INSERT INTO cursors (user, device, cursor) VALUES (?, ?, ?)
                ON CONFLICT (user, device)
                DO UPDATE SET cursor = max(cursor, excluded.cursor)
                """,
                (user, device, cursor),
            )

        await self._database.run(upsert)

    async def load_cursor(self, user: str, device: str) -> int | None:
        """The device's saved cursor, or None if it never saved one."""

        def query(connection: sqlite3.Connection) -> int | None:
            row = connection.execute(
                "SELECT cursor FROM cursors WHERE user = ? AND device = ?",
                (user, device),
            ).fetchone()
            return None if row is None else _int(row[0])

        return await self._database.run(query)

    async def aclose(self) -> None:
        """Close the database after the calls already queued; idempotent."""
        await self._database.aclose()


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


def _str(value: object) -> str:
    assert isinstance(value, str)
    return value


def _optional_str(value: object) -> str | None:
    return None if value is None else _str(value)


def _history_entry(row: tuple[object, ...]) -> HistoryEntry:
    seq, id_, sender, to, group, body, ts = row
    return HistoryEntry(
        id=_str(id_),
        sender=_str(sender),
        to=_optional_str(to),
        group=_optional_str(group),
        body=_str(body),
        ts=_int(ts),
        seq=_int(seq),
    )


def _inbox_record(row: tuple[object, ...], user: str) -> InboxRecord:
    id_, sender, to, group, body, ts = row
    return InboxRecord(
        id=_str(id_),
        sender=_str(sender),
        to=_optional_str(to),
        group=_optional_str(group),
        body=_str(body),
        ts=_int(ts),
        recipients=(user,),
        origin="",
    )


@asynccontextmanager
async def open_history_store(
    path: str | os.PathLike[str] | None,
) -> AsyncIterator[SQLiteHistoryStore]:
    """Open (creating or migrating) the store at ``path``; None: in memory (tests)."""
    async with open_database(path) as database:
        yield SQLiteHistoryStore(database)
