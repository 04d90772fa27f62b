"""Tests for the SQLite history store: idempotent writes, paging, catch-up, cursors."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import attrs
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from msgnet._backplane import LogRecord
from msgnet._history import SQLiteHistoryStore, open_history_store
from msgnet._records import InboxRecord
from msgnet._sqlite import SCHEMA_VERSION, connect, migrate


def direct(
    id_: str, sender: str, to: str, *, recipients: Sequence[str] = (), ts: int = 1
) -> InboxRecord:
    return InboxRecord(
        id=id_,
        sender=sender,
        to=to,
        group=None,
        body=f"body of {id_}",
        ts=ts,
        recipients=tuple(recipients) or (to,),
        origin="session-1",
    )


def grouped(
    id_: str, sender: str, group: str, *, recipients: Sequence[str]
) -> InboxRecord:
    return InboxRecord(
        id=id_,
        sender=sender,
        to=None,
        group=group,
        body=f"body of {id_}",
        ts=1,
        recipients=tuple(recipients),
        origin="session-1",
    )


def at(
    partition: int, offset: int, record: InboxRecord
) -> tuple[LogRecord, InboxRecord]:
    log_record = LogRecord(
        partition=partition,
        offset=offset,
        key=record.sender.encode(),
        value=record.encode(),
        timestamp_ms=record.ts,
    )
    return log_record, record


def count(store_path: Path, table: str) -> int:
    with closing(sqlite3.connect(store_path)) as connection:
        (rows,) = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert isinstance(rows, int)
    return rows


async def conversation(
    store: SQLiteHistoryStore, total: int, *, partition: int = 0
) -> None:
    await store.write(
        [
            at(partition, n, direct(f"m{n}", "alice" if n % 2 else "bob", "carol"))
            for n in range(total)
        ]
    )


async def page_all(
    store: SQLiteHistoryStore, limit: int, **conversation: str
) -> list[list[str]]:
    """Page from the newest back to the oldest; the ids of each page."""
    pages: list[list[str]] = []
    before: int | None = None
    while True:
        entries, before = await store.page(before=before, limit=limit, **conversation)
        pages.append([entry.id for entry in entries])
        if before is None:
            return pages


# Writes


async def test_writing_the_same_batch_twice_stores_each_message_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.db"
    batch = [at(0, n, direct(f"m{n}", "alice", "bob")) for n in range(5)]

    async with open_history_store(path) as store:
        await store.write(batch)
        await store.write(batch)

    assert count(path, "messages") == 5
    assert count(path, "inbox") == 5


async def test_copies_from_two_partitions_make_one_message_and_two_inbox_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "history.db"
    to_bob = direct("m1", "alice", "bob", recipients=["bob"])
    to_alice = attrs.evolve(to_bob, recipients=("alice",))

    async with open_history_store(path) as store:
        await store.write([at(3, 10, to_bob)])
        await store.write([at(7, 20, to_alice)])

        entries, _ = await store.page(
            peer_a="alice", peer_b="bob", before=None, limit=9
        )
        assert [entry.id for entry in entries] == ["m1"]
        assert [offset for offset, _ in await store.inbox_since("bob", 3, 0, 99)] == [
            10
        ]
        assert [offset for offset, _ in await store.inbox_since("alice", 7, 0, 99)] == [
            20
        ]

    assert count(path, "messages") == 1
    assert count(path, "inbox") == 2


async def test_a_group_record_adds_one_inbox_row_per_recipient() -> None:
    async with open_history_store(None) as store:
        await store.write(
            [at(2, 5, grouped("g1", "alice", "team", recipients=["x", "y"]))]
        )

        for user in ("x", "y"):
            [(offset, record)] = await store.inbox_since(user, 2, 0, 10)
            assert (offset, record.id, record.group) == (5, "g1", "team")
        assert await store.inbox_since("alice", 2, 0, 10) == []


async def test_an_empty_write_is_allowed() -> None:
    async with open_history_store(None) as store:
        await store.write([])
        assert await store.page(peer_a="a", peer_b="b", before=None, limit=5) == (
            [],
            None,
        )


# Paging


async def test_both_sides_of_a_conversation_page_the_same_rows() -> None:
    async with open_history_store(None) as store:
        await store.write(
            [
                at(0, 0, direct("hi", "alice", "bob")),
                at(0, 1, direct("hello", "bob", "alice")),
                at(0, 2, direct("other", "alice", "carol")),
            ]
        )

        from_alice = await store.page(
            peer_a="alice", peer_b="bob", before=None, limit=9
        )
        from_bob = await store.page(peer_a="bob", peer_b="alice", before=None, limit=9)

    assert from_alice == from_bob
    entries, next_cursor = from_alice
    assert [(entry.id, entry.sender, entry.to) for entry in entries] == [
        ("hi", "alice", "bob"),
        ("hello", "bob", "alice"),
    ]
    assert next_cursor is None


async def test_pages_are_oldest_first_and_the_cursor_walks_back_to_none() -> None:
    async with open_history_store(None) as store:
        await conversation(store, 7)

        newest, cursor = await store.page(
            peer_a="carol", peer_b="alice", before=None, limit=2
        )
        assert [entry.id for entry in newest] == ["m3", "m5"]
        assert cursor == newest[0].seq

        oldest, cursor = await store.page(
            peer_a="carol", peer_b="alice", before=cursor, limit=2
        )
        assert [entry.id for entry in oldest] == ["m1"]
        assert cursor is None


async def test_a_page_exactly_reaching_the_oldest_message_has_no_next_cursor() -> None:
    async with open_history_store(None) as store:
        await conversation(store, 4)

        entries, cursor = await store.page(
            peer_a="carol", peer_b="bob", before=None, limit=2
        )
        assert [entry.id for entry in entries] == ["m0", "m2"]
        assert cursor is None


async def test_group_pages_hold_only_that_groups_messages() -> None:
    async with open_history_store(None) as store:
        await store.write(
            [
                at(0, n, grouped(f"{group}{n}", "alice", group, recipients=["bob"]))
                for n in range(6)
                for group in ("red", "blue")
            ]
        )
        await store.write([at(0, 99, direct("dm", "alice", "bob"))])

        pages = await page_all(store, 4, peer_a="bob", group="red")

    assert pages == [["red2", "red3", "red4", "red5"], ["red0", "red1"]]


async def test_page_entries_carry_every_field() -> None:
    async with open_history_store(None) as store:
        await store.write([at(0, 0, direct("m", "alice", "bob", ts=1234))])
        [entry], _ = await store.page(
            peer_a="bob", peer_b="alice", before=None, limit=1
        )

    assert (entry.id, entry.sender, entry.to, entry.group, entry.body, entry.ts) == (
        "m",
        "alice",
        "bob",
        None,
        "body of m",
        1234,
    )
    assert entry.seq >= 0


@pytest.mark.parametrize(
    ("peer_b", "group", "before", "limit", "message"),
    [
        ("b", "g", None, 1, "exactly one of peer_b and group"),
        (None, None, None, 1, "exactly one of peer_b and group"),
        ("b", None, None, 0, "limit must be at least 1, got 0"),
        ("b", None, -1, 1, "cursor must be >= 0, got -1"),
    ],
)
async def test_page_rejects_bad_arguments(
    peer_b: str | None, group: str | None, before: int | None, limit: int, message: str
) -> None:
    async with open_history_store(None) as store:
        with pytest.raises(ValueError, match=message):
            await store.page(
                peer_a="a", peer_b=peer_b, group=group, before=before, limit=limit
            )


@settings(max_examples=30, deadline=None)
@given(total=st.integers(0, 40), limit=st.integers(1, 12))
def test_paging_visits_every_message_once_in_order(total: int, limit: int) -> None:
    async def check() -> None:
        async with open_history_store(None) as store:
            await conversation(store, total)
            pages = await page_all(store, limit, peer_a="carol", peer_b="bob")

        visited = [id_ for page in reversed(pages) for id_ in page]
        assert visited == [f"m{n}" for n in range(0, total, 2)]
        # Every page but the oldest is full; the oldest is empty only when
        # the conversation is.
        assert all(len(page) == limit for page in pages[:-1])
        assert 1 <= len(pages[-1]) <= limit or total == 0

    trio.run(check)


# Catch-up


async def test_inbox_since_returns_the_half_open_range_in_offset_order() -> None:
    async with open_history_store(None) as store:
        # Written out of order, and beside other users and partitions.
        await store.write(
            [at(1, n, direct(f"m{n}", "a", "bob")) for n in (6, 2, 4, 3, 5)]
        )
        await store.write([at(1, 7, direct("x", "a", "eve"))])
        await store.write([at(2, 4, direct("y", "a", "bob"))])

        got = await store.inbox_since("bob", 1, 3, 6)
        assert [(offset, record.id) for offset, record in got] == [
            (3, "m3"),
            (4, "m4"),
            (5, "m5"),
        ]
        assert await store.inbox_since("bob", 1, 6, 6) == []
        assert [offset for offset, _ in await store.inbox_since("bob", 1, 0, 99)] == [
            2,
            3,
            4,
            5,
            6,
        ]


async def test_inbox_since_limit_reads_on_from_the_last_offset() -> None:
    async with open_history_store(None) as store:
        await store.write([at(0, n, direct(f"m{n}", "a", "bob")) for n in range(5)])

        first = await store.inbox_since("bob", 0, 0, 5, limit=2)
        rest = await store.inbox_since("bob", 0, first[-1][0] + 1, 5, limit=9)

    assert [offset for offset, _ in first + rest] == [0, 1, 2, 3, 4]


async def test_inbox_since_rebuilds_records_for_the_reader() -> None:
    original = direct("m", "alice", "bob", recipients=["bob", "bob2"], ts=77)
    async with open_history_store(None) as store:
        await store.write([at(0, 0, original)])
        [(_, record)] = await store.inbox_since("bob2", 0, 0, 1)

    assert record == InboxRecord(
        id="m",
        sender="alice",
        to="bob",
        group=None,
        body="body of m",
        ts=77,
        recipients=("bob2",),
        origin="",
    )


# Cursors


async def test_a_cursor_never_moves_backwards() -> None:
    async with open_history_store(None) as store:
        assert await store.load_cursor("bob", "phone") is None

        await store.save_cursor("bob", "phone", 10)
        await store.save_cursor("bob", "phone", 4)
        assert await store.load_cursor("bob", "phone") == 10

        await store.save_cursor("bob", "phone", 11)
        assert await store.load_cursor("bob", "phone") == 11
        assert await store.load_cursor("bob", "laptop") is None


async def test_a_negative_cursor_is_rejected() -> None:
    async with open_history_store(None) as store:
        with pytest.raises(ValueError, match="-1"):
            await store.save_cursor("bob", "phone", -1)


# Durability and lifecycle


async def test_a_file_store_keeps_everything_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    async with open_history_store(path) as store:
        await conversation(store, 5)
        await store.save_cursor("carol", "phone", 3)
        before = await store.page(peer_a="carol", peer_b="bob", before=None, limit=9)

    async with open_history_store(path) as store:
        assert await store.page(peer_a="carol", peer_b="bob", before=None, limit=9) == (
            before
        )
        assert await store.load_cursor("carol", "phone") == 3
        assert len(await store.inbox_since("carol", 0, 0, 99)) == 5

        # seq is never reused, so a new message sorts after the reopened ones.
        await store.write([at(0, 5, direct("late", "bob", "carol"))])
        entries, _ = await store.page(
            peer_a="carol", peer_b="bob", before=None, limit=1
        )
        assert entries[0].id == "late"
        assert entries[0].seq > before[0][-1].seq


async def test_the_file_is_in_wal_mode_at_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    async with open_history_store(path):
        pass

    with closing(sqlite3.connect(path)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert connection.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_migrating_twice_changes_nothing(tmp_path: Path) -> None:
    connection = connect(tmp_path / "history.db")
    try:
        assert migrate(connection) == SCHEMA_VERSION
    finally:
        connection.close()


def test_a_database_from_a_newer_msgnet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    with pytest.raises(RuntimeError, match=f"version {SCHEMA_VERSION + 1}"):
        connect(path)


async def test_a_closed_store_refuses_calls() -> None:
    async with open_history_store(None) as store:
        await store.aclose()
        await store.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await store.load_cursor("bob", "phone")
