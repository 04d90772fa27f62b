"""The Kafka backplane's tail follower: one consumer for the readers at the end."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from msgnet import _kafka_tail
from msgnet._backplane import Backplane, LogRecord
from msgnet._kafka import create_inbox_topic, open_kafka_backplane
from msgnet._kafka_tail import _Tail

HANG_GUARD_SECONDS = 60
"""Only stops a broken follower from hanging the suite; decides nothing."""


# --- the records held for one partition (pure) -----------------------------------


def _batch(
    offsets: list[int],
) -> tuple[int, list[int], list[bytes], list[bytes], list[int]]:
    return (
        0,
        offsets,
        [b"k"] * len(offsets),
        [str(offset).encode() for offset in offsets],
        [offset * 10 for offset in offsets],
    )


@given(
    start=st.integers(0, 50),
    batches=st.lists(
        st.tuples(st.integers(-20, 20), st.integers(1, 30)), min_size=1, max_size=12
    ),
    offset=st.integers(0, 400),
    max_records=st.integers(1, 50),
)
def test_a_tail_holds_each_offset_once_in_order_whatever_batches_overlap(
    start: int,
    batches: list[tuple[int, int]],
    offset: int,
    max_records: int,
) -> None:
    tail = _Tail(start)
    held: list[int] = []
    for shift, length in batches:
        # A batch may begin before the end (fetched again after a restart) or
        # after it (retention deleted what lies between).
        end = tail.end
        first = max(0, end + shift)
        offsets = list(range(first, first + length))
        tail.extend(_batch(offsets))
        # What is older than the end is already held, or lies in a gap that
        # stays one: records arrive in offset order.
        held += [o for o in offsets if o >= end]

    records = tail.read(0, offset, max_records) if offset >= tail.start else []

    assert tail.end == held[-1] + 1 if held else tail.end == start
    kept = [o for o in held if o >= tail.start]
    expected = [o for o in kept if o >= offset][:max_records]
    if offset >= tail.start:
        assert [r.offset for r in records] == expected
        assert all(r.value == str(r.offset).encode() for r in records)
        assert all(r.timestamp_ms == r.offset * 10 for r in records)


def test_a_tail_keeps_at_least_its_limit_of_newest_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_kafka_tail, "TAIL_RECORDS", 4)
    tail = _Tail(0)
    for first in range(0, 40, 3):
        tail.extend(_batch(list(range(first, first + 3))))

    assert tail.end == 42
    assert 4 <= tail.end - tail.start < 8
    assert [r.offset for r in tail.read(0, tail.start, 99)] == list(
        range(tail.start, 42)
    )


# --- against a real broker ----------------------------------------------------


@pytest.fixture
async def backplane(kafka_bootstrap: str) -> AsyncIterator[Backplane]:
    topic = f"test-tail-{uuid.uuid4().hex}"
    await trio.to_thread.run_sync(
        functools.partial(create_inbox_topic, kafka_bootstrap, topic, partitions=2)
    )
    async with open_kafka_backplane(
        kafka_bootstrap, topic=topic, partitions=2
    ) as opened:
        yield opened


async def _append(backplane: Backplane, count: int) -> None:
    appending = backplane.submit(
        [(1, b"k", i.to_bytes(4, "big")) for i in range(count)]
    )
    await appending.offsets()


def _values(records: list[LogRecord] | tuple[LogRecord, ...]) -> list[tuple[int, int]]:
    return [(r.offset, int.from_bytes(r.value, "big")) for r in records]


@pytest.mark.kafka
async def test_a_reader_behind_the_records_held_reads_them_through_a_consumer(
    backplane: Backplane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_kafka_tail, "TAIL_RECORDS", 8)
    await _append(backplane, 60)

    with trio.fail_after(HANG_GUARD_SECONDS):
        # The first read follows the partition from near its end ...
        newest = await backplane.read(1, 55)
        # ... so this one is far behind what the follower holds.
        oldest = await backplane.read(1, 2, max_records=3)

    assert _values(newest)[0] == (55, 55)
    assert _values(oldest) == [(2, 2), (3, 3), (4, 4)]


@pytest.mark.kafka
async def test_a_reader_far_ahead_moves_the_follower_and_those_behind_still_read(
    backplane: Backplane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_kafka_tail, "TAIL_RECORDS", 4)
    await _append(backplane, 40)

    with trio.fail_after(HANG_GUARD_SECONDS):
        first = await backplane.read(1, 0, max_records=2)
        far = await backplane.read(1, 30, max_records=2)
        behind = await backplane.read(1, 5, max_records=2)

    assert _values(first) == [(0, 0), (1, 1)]
    assert _values(far) == [(30, 30), (31, 31)]
    assert _values(behind) == [(5, 5), (6, 6)]


@pytest.mark.kafka
async def test_readers_waiting_at_the_end_all_wake_on_one_append(
    backplane: Backplane,
) -> None:
    await _append(backplane, 3)
    received: list[list[tuple[int, int]]] = []

    async def reader() -> None:
        received.append(_values(await backplane.read(1, 3)))

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await backplane.append(1, b"k", (7).to_bytes(4, "big"))

    assert received == [[(3, 7)]] * 3
