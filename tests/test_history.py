"""The history store contract, run against SQLite and PostgreSQL alike.

Every test taking ``backend`` or ``store`` runs once per store; the schema
tests at the end are each store's own.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, closing
from pathlib import Path

import attrs
import psycopg
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgnet._backplane import LogRecord
from msgnet._history import open_history_store
from msgnet._history_pg import (
    SCHEMA_VERSION as PG_SCHEMA_VERSION,
)
from msgnet._history_pg import (
    SchemaMismatch,
    migrate_postgres,
    open_postgres_history_store,
    schema_version,
)
from msgnet._history_store import HistoryStore
from msgnet._records import InboxRecord
from msgnet._sqlite import SCHEMA_VERSION, connect, migrate


@attrs.define
class Backend:
    """One store kind under test: how to open it and count its rows."""

    kind: str
    sqlite_path: Path | None = None
    dsn: str | None = None

    def open(self) -> AbstractAsyncContextManager[HistoryStore]:
        """The same database on every call within one test, so reopening works."""
        if self.dsn is not None:
            return open_postgres_history_store(self.dsn)
        return open_history_store(self.sqlite_path)

    def count(self, table: str) -> int:
        if self.dsn is not None:
            with psycopg.connect(self.dsn) as connection:
                row = connection.execute(
                    f"SELECT count(*) FROM {table}"  # type: ignore[arg-type]
                ).fetchone()
                assert row is not None
                (rows,) = row
        else:
            assert self.sqlite_path is not None
            with closing(sqlite3.connect(self.sqlite_path)) as connection:
                (rows,) = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert isinstance(rows, int)
        return rows


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend(kind="sqlite", sqlite_path=tmp_path / "history.db")
        return
    dsn: str = request.getfixturevalue("postgres_database")
    migrate_postgres(dsn)
    yield Backend(kind="postgres", dsn=dsn)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[HistoryStore]:
    async with backend.open() as opened:
        yield opened


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


async def conversation(store: HistoryStore, total: int, *, partition: int = 0) -> None:
    await store.write(
        [
            at(partition, n, direct(f"m{n}", "alice" if n % 2 else "bob", "carol"))
            for n in range(total)
        ]
    )


async def page_all(
    store: HistoryStore, limit: int, **conversation: str
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
    backend: Backend,
) -> None:
    batch = [at(0, n, direct(f"m{n}", "alice", "bob")) for n in range(5)]

    async with backend.open() as store:
        await store.write(batch)
        await store.write(batch)

    assert backend.count("messages") == 5
    assert backend.count("inbox") == 5


async def test_copies_from_two_partitions_make_one_message_and_two_inbox_rows(
    backend: Backend,
) -> None:
    to_bob = direct("m1", "alice", "bob", recipients=["bob"])
    to_alice = attrs.evolve(to_bob, recipients=("alice",))

    async with backend.open() as store:
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

    assert backend.count("messages") == 1
    assert backend.count("inbox") == 2


async def test_copies_in_one_batch_share_the_row_the_first_made_and_its_body(
    backend: Backend,
) -> None:
    to_bob = direct("m1", "alice", "bob", recipients=["bob"])
    reused = attrs.evolve(to_bob, body="another body", recipients=("alice",))

    async with backend.open() as store:
        await store.write([at(3, 10, to_bob), at(7, 20, reused)])

        [(_, for_bob)] = await store.inbox_since("bob", 3, 0, 99)
        [(_, for_alice)] = await store.inbox_since("alice", 7, 0, 99)
        assert for_bob.body == for_alice.body == to_bob.body

    assert backend.count("messages") == 1
    assert backend.count("inbox") == 2


async def test_a_group_record_adds_one_inbox_row_per_recipient(
    store: HistoryStore,
) -> None:
    await store.write([at(2, 5, grouped("g1", "alice", "team", recipients=["x", "y"]))])

    for user in ("x", "y"):
        [(offset, record)] = await store.inbox_since(user, 2, 0, 10)
        assert (offset, record.id, record.group) == (5, "g1", "team")
    assert await store.inbox_since("alice", 2, 0, 10) == []


async def test_an_empty_write_is_allowed(store: HistoryStore) -> None:
    await store.write([])
    assert await store.page(peer_a="a", peer_b="b", before=None, limit=5) == (
        [],
        None,
    )


async def test_bodies_with_nul_and_names_with_percent_read_back_as_written(
    store: HistoryStore,
) -> None:
    # Ids and user names are printable, but bodies may hold any character.
    odd = InboxRecord(
        id="id%00",
        sender="al%ice",
        to="b%25b",
        group=None,
        body="50% off\x00 %25 %00",
        ts=1,
        recipients=("b%25b",),
        origin="",
    )
    plain = attrs.evolve(odd, id="id%", body="other")
    await store.write([at(0, 0, odd), at(0, 1, plain)])

    entries, _ = await store.page(peer_a="b%25b", peer_b="al%ice", before=None, limit=9)
    assert [(entry.id, entry.body) for entry in entries] == [
        ("id%00", "50% off\x00 %25 %00"),
        ("id%", "other"),
    ]
    [(_, record), _] = await store.inbox_since("b%25b", 0, 0, 9)
    assert record == odd
    await store.save_cursor("b%25b", "p%", 7)
    assert await store.load_cursor("b%25b", "p%") == 7
    assert await store.load_cursor("b%25b", "p%25") is None


async def test_writers_racing_on_the_same_messages_store_each_once(
    backend: Backend,
) -> None:
    # Copies of group messages reach two writers in opposite orders, as when
    # two partitions' writers store the same fan-out at once.
    members = ("x", "y")
    records = [
        grouped(f"g{n}", "alice", "team", recipients=members) for n in range(200)
    ]
    forward = [at(0, n, record) for n, record in enumerate(records)]
    backward = [at(1, n, record) for n, record in enumerate(reversed(records))]

    async with backend.open() as first, backend.open() as second:
        async with trio.open_nursery() as nursery:
            for n in range(0, 200, 20):
                nursery.start_soon(first.write, forward[n : n + 20])
                nursery.start_soon(second.write, backward[n : n + 20])

    assert backend.count("messages") == 200
    assert backend.count("inbox") == 800


async def test_writes_made_at_once_are_all_stored(backend: Backend) -> None:
    async with backend.open() as store, trio.open_nursery() as nursery:
        for partition in range(8):
            nursery.start_soon(
                store.write,
                [
                    at(partition, n, direct(f"p{partition}m{n}", "alice", "bob"))
                    for n in range(5)
                ],
            )

    assert backend.count("messages") == 40
    assert backend.count("inbox") == 40


# Paging


async def test_both_sides_of_a_conversation_page_the_same_rows(
    store: HistoryStore,
) -> None:
    await store.write(
        [
            at(0, 0, direct("hi", "alice", "bob")),
            at(0, 1, direct("hello", "bob", "alice")),
            at(0, 2, direct("other", "alice", "carol")),
        ]
    )

    from_alice = await store.page(peer_a="alice", peer_b="bob", before=None, limit=9)
    from_bob = await store.page(peer_a="bob", peer_b="alice", before=None, limit=9)

    assert from_alice == from_bob
    entries, next_cursor = from_alice
    assert [(entry.id, entry.sender, entry.to) for entry in entries] == [
        ("hi", "alice", "bob"),
        ("hello", "bob", "alice"),
    ]
    assert next_cursor is None


async def test_pages_are_oldest_first_and_the_cursor_walks_back_to_none(
    store: HistoryStore,
) -> None:
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


async def test_a_page_exactly_reaching_the_oldest_message_has_no_next_cursor(
    store: HistoryStore,
) -> None:
    await conversation(store, 4)

    entries, cursor = await store.page(
        peer_a="carol", peer_b="bob", before=None, limit=2
    )
    assert [entry.id for entry in entries] == ["m0", "m2"]
    assert cursor is None


async def test_group_pages_hold_only_that_groups_messages(store: HistoryStore) -> None:
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


async def test_page_entries_carry_every_field(store: HistoryStore) -> None:
    await store.write([at(0, 0, direct("m", "alice", "bob", ts=1234))])
    [entry], _ = await store.page(peer_a="bob", peer_b="alice", before=None, limit=1)

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
    store: HistoryStore,
    *,
    peer_b: str | None,
    group: str | None,
    before: int | None,
    limit: int,
    message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        await store.page(
            peer_a="a", peer_b=peer_b, group=group, before=before, limit=limit
        )


_examples = itertools.count()


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(total=st.integers(0, 40), limit=st.integers(1, 12))
def test_paging_visits_every_message_once_in_order(
    backend: Backend, total: int, limit: int
) -> None:
    # Examples share the test's database, so each pages a conversation of
    # its own.
    example = next(_examples)

    async def check() -> None:
        async with backend.open() as store:
            await store.write(
                [
                    at(0, n, direct(f"{example}.{n}", "bob", f"carol{example}"))
                    for n in range(total)
                ]
            )
            pages = await page_all(store, limit, peer_a=f"carol{example}", peer_b="bob")

        visited = [id_ for page in reversed(pages) for id_ in page]
        assert visited == [f"{example}.{n}" for n in range(total)]
        # Every page but the oldest is full; the oldest is empty only when
        # the conversation is.
        assert all(len(page) == limit for page in pages[:-1])
        assert 1 <= len(pages[-1]) <= limit or total == 0

    trio.run(check)


# Catch-up


async def test_inbox_since_returns_the_half_open_range_in_offset_order(
    store: HistoryStore,
) -> None:
    # Written out of order, and beside other users and partitions.
    await store.write([at(1, n, direct(f"m{n}", "a", "bob")) for n in (6, 2, 4, 3, 5)])
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


async def test_inbox_since_limit_reads_on_from_the_last_offset(
    store: HistoryStore,
) -> None:
    await store.write([at(0, n, direct(f"m{n}", "a", "bob")) for n in range(5)])

    first = await store.inbox_since("bob", 0, 0, 5, limit=2)
    rest = await store.inbox_since("bob", 0, first[-1][0] + 1, 5, limit=9)

    assert [offset for offset, _ in first + rest] == [0, 1, 2, 3, 4]


async def test_inbox_since_rebuilds_records_for_the_reader(store: HistoryStore) -> None:
    original = direct("m", "alice", "bob", recipients=["bob", "bob2"], ts=77)
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


async def test_a_cursor_never_moves_backwards(store: HistoryStore) -> None:
    assert await store.load_cursor("bob", "phone") is None

    await store.save_cursor("bob", "phone", 10)
    await store.save_cursor("bob", "phone", 4)
    assert await store.load_cursor("bob", "phone") == 10

    await store.save_cursor("bob", "phone", 11)
    assert await store.load_cursor("bob", "phone") == 11
    assert await store.load_cursor("bob", "laptop") is None


async def test_a_negative_cursor_is_rejected(store: HistoryStore) -> None:
    with pytest.raises(ValueError, match="-1"):
        await store.save_cursor("bob", "phone", -1)


# Durability and lifecycle


async def test_a_store_keeps_everything_across_reopen(backend: Backend) -> None:
    async with backend.open() as store:
        await conversation(store, 5)
        await store.save_cursor("carol", "phone", 3)
        before = await store.page(peer_a="carol", peer_b="bob", before=None, limit=9)

    async with backend.open() as store:
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


async def test_a_closed_store_refuses_calls(store: HistoryStore) -> None:
    await store.aclose()
    await store.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await store.load_cursor("bob", "phone")


# PostgreSQL's schema


async def test_postgres_migrating_twice_changes_nothing(postgres_database: str) -> None:
    assert migrate_postgres(postgres_database) == (0, PG_SCHEMA_VERSION)
    assert migrate_postgres(postgres_database) == (
        PG_SCHEMA_VERSION,
        PG_SCHEMA_VERSION,
    )
    with psycopg.connect(postgres_database) as connection:
        assert schema_version(connection) == PG_SCHEMA_VERSION


async def test_an_unmigrated_postgres_database_is_refused_with_the_command_to_run(
    postgres_database: str,
) -> None:
    with pytest.raises(SchemaMismatch, match="run `msgnet history migrate"):
        async with open_postgres_history_store(postgres_database):
            pass


async def test_a_postgres_schema_from_a_newer_msgnet_is_refused(
    postgres_database: str,
) -> None:
    migrate_postgres(postgres_database)
    with psycopg.connect(postgres_database) as connection:
        connection.execute(
            "INSERT INTO schema_migrations (version) VALUES (%s)",
            (PG_SCHEMA_VERSION + 1,),
        )

    newer = f"version {PG_SCHEMA_VERSION + 1} is newer"
    with pytest.raises(SchemaMismatch, match=newer):
        async with open_postgres_history_store(postgres_database):
            pass
    with pytest.raises(SchemaMismatch, match=newer):
        migrate_postgres(postgres_database)
