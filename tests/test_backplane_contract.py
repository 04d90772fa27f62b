"""The contract every Backplane implementation meets, run against each of them.

An implementation joins by one entry in ``IMPLEMENTATIONS``: a function that,
given the test's request and temporary directory, returns a ``BackplaneFactory``
whose ``open`` opens backplanes on one log private to that test.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from msgnet._backplane import Backplane, BackplaneUnavailable, LogRecord
from msgnet._embedded import open_embedded_backplane
from msgnet._kafka import create_inbox_topic, open_kafka_backplane

PARTITIONS = 4

HANG_GUARD_SECONDS = 30
"""Only stops a broken implementation from hanging the suite; decides nothing."""


@attrs.frozen(kw_only=True)
class BackplaneFactory:
    """Opens backplanes of one implementation on one log private to a test."""

    open: Callable[[int], AbstractAsyncContextManager[Backplane]]
    """Open a backplane on the log with this many partitions, for a block."""
    durable: bool
    """Whether a second ``open`` sees what was stored through the first."""


@attrs.frozen(kw_only=True)
class Implementation:
    """How the suite builds one implementation, and the marks its tests carry."""

    build: Callable[[pytest.FixtureRequest, Path], BackplaneFactory]
    marks: tuple[pytest.MarkDecorator, ...] = ()


def _memory(request: pytest.FixtureRequest, tmp_path: Path) -> BackplaneFactory:
    return BackplaneFactory(
        open=lambda partitions: open_embedded_backplane(None, partitions=partitions),
        durable=False,
    )


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path) -> BackplaneFactory:
    directory = tmp_path / "log"
    return BackplaneFactory(
        open=lambda partitions: open_embedded_backplane(
            directory, partitions=partitions
        ),
        durable=True,
    )


def _kafka(request: pytest.FixtureRequest, tmp_path: Path) -> BackplaneFactory:
    bootstrap: str = request.getfixturevalue("kafka_bootstrap")
    # A fresh topic per test is the log private to it; the broker is shared.
    topic = f"test-contract-{uuid.uuid4().hex}"

    @asynccontextmanager
    async def open_kafka(partitions: int) -> AsyncIterator[Backplane]:
        await trio.to_thread.run_sync(
            functools.partial(
                create_inbox_topic, bootstrap, topic, partitions=partitions
            )
        )
        async with open_kafka_backplane(
            bootstrap, topic=topic, partitions=partitions
        ) as backplane:
            yield backplane

    return BackplaneFactory(open=open_kafka, durable=True)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "memory": Implementation(build=_memory),
    "sqlite": Implementation(build=_sqlite),
    "kafka": Implementation(build=_kafka, marks=(pytest.mark.kafka,)),
}


@pytest.fixture(
    params=[
        pytest.param(name, marks=implementation.marks)
        for name, implementation in IMPLEMENTATIONS.items()
    ]
)
def backplane_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> BackplaneFactory:
    return IMPLEMENTATIONS[request.param].build(request, tmp_path)


@pytest.fixture
async def backplane(backplane_factory: BackplaneFactory) -> AsyncIterator[Backplane]:
    async with backplane_factory.open(PARTITIONS) as opened:
        yield opened


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _read_all(backplane: Backplane, partition: int) -> list[LogRecord]:
    """Every record of ``partition`` up to its current end offset."""
    end = await backplane.end_offset(partition)
    records: list[LogRecord] = []
    with trio.fail_after(HANG_GUARD_SECONDS):
        while len(records) < end:
            records.extend(await backplane.read(partition, len(records)))
    return records


async def test_partitions_is_the_count_the_log_was_opened_with(
    backplane: Backplane,
) -> None:
    assert backplane.partitions == PARTITIONS


async def test_a_new_log_has_every_end_offset_at_zero(backplane: Backplane) -> None:
    assert [await backplane.end_offset(p) for p in range(PARTITIONS)] == [
        0
    ] * PARTITIONS


async def test_append_returns_dense_offsets_counted_per_partition(
    backplane: Backplane,
) -> None:
    offsets = [await backplane.append(p, b"k", b"v") for p in (0, 1, 0, 2, 0, 1)]

    assert offsets == [0, 0, 1, 0, 2, 1]
    assert [await backplane.end_offset(p) for p in range(PARTITIONS)] == [3, 2, 1, 0]


async def test_read_from_zero_returns_the_appended_records_in_order(
    backplane: Backplane,
) -> None:
    before = _now_ms()
    for i in range(5):
        await backplane.append(1, f"user{i}".encode(), f"value {i}".encode())
    await backplane.append(2, b"other", b"elsewhere")
    after = _now_ms()

    with trio.fail_after(HANG_GUARD_SECONDS):
        records = await backplane.read(1, 0)

    assert [(r.partition, r.offset, r.key, r.value) for r in records] == [
        (1, i, f"user{i}".encode(), f"value {i}".encode()) for i in range(5)
    ]
    assert all(before <= r.timestamp_ms <= after for r in records)


async def test_read_from_a_middle_offset_starts_there(backplane: Backplane) -> None:
    for i in range(6):
        await backplane.append(3, b"k", bytes([i]))

    with trio.fail_after(HANG_GUARD_SECONDS):
        records = await backplane.read(3, 4)

    assert [(r.offset, r.value) for r in records] == [(4, b"\x04"), (5, b"\x05")]


async def test_read_returns_at_most_max_records(backplane: Backplane) -> None:
    for i in range(10):
        await backplane.append(0, b"k", bytes([i]))

    with trio.fail_after(HANG_GUARD_SECONDS):
        first = await backplane.read(0, 0, max_records=3)
        rest = await backplane.read(0, 3, max_records=100)

    assert [r.offset for r in first] == [0, 1, 2]
    assert [r.offset for r in rest] == list(range(3, 10))


async def test_read_at_the_end_waits_for_the_next_append(backplane: Backplane) -> None:
    await backplane.append(2, b"k", b"old")
    received: list[LogRecord] = []
    arrived = trio.Event()

    async def reader() -> None:
        received.extend(await backplane.read(2, 1))
        arrived.set()

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert not arrived.is_set()

            await backplane.append(2, b"k", b"new")
            await arrived.wait()

    assert [(r.offset, r.value) for r in received] == [(1, b"new")]


async def test_read_waits_only_for_its_own_partition(backplane: Backplane) -> None:
    arrived = trio.Event()

    async def reader() -> None:
        await backplane.read(0, 0)
        arrived.set()

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await backplane.append(1, b"k", b"not for the reader")
            await trio.testing.wait_all_tasks_blocked()
            assert not arrived.is_set()

            await backplane.append(0, b"k", b"for the reader")
            await arrived.wait()


async def test_concurrent_appends_get_distinct_offsets_and_are_all_readable(
    backplane: Backplane,
) -> None:
    appended: dict[tuple[int, int], bytes] = {}

    async def appender(task: int) -> None:
        for i in range(20):
            partition = (task + i) % PARTITIONS
            value = f"{task}-{i}".encode()
            offset = await backplane.append(partition, b"k", value)
            assert (partition, offset) not in appended
            appended[partition, offset] = value

    with trio.fail_after(HANG_GUARD_SECONDS):
        async with trio.open_nursery() as nursery:
            for task in range(50):
                nursery.start_soon(appender, task)

    assert len(appended) == 50 * 20
    for partition in range(PARTITIONS):
        records = await _read_all(backplane, partition)
        assert {(partition, r.offset): r.value for r in records} == {
            key: value for key, value in appended.items() if key[0] == partition
        }


async def test_submit_returns_each_records_offset_in_the_order_given(
    backplane: Backplane,
) -> None:
    await backplane.append(1, b"k", b"before")

    appending = backplane.submit([(0, b"a", b"first"), (1, b"b", b"second")])
    with trio.fail_after(HANG_GUARD_SECONDS):
        assert await appending.offsets() == [0, 1]
    assert appending.settled()

    assert [r.value for r in await _read_all(backplane, 1)] == [b"before", b"second"]


async def test_submissions_keep_their_order_while_many_are_in_flight(
    backplane: Backplane,
) -> None:
    """What a session relies on to pipeline a client's sends."""
    submitted = [backplane.submit([(2, b"k", bytes([i]))]) for i in range(100)]

    with trio.fail_after(HANG_GUARD_SECONDS):
        offsets = [(await appending.offsets())[0] for appending in submitted]

    assert offsets == list(range(100))
    assert [r.value for r in await _read_all(backplane, 2)] == [
        bytes([i]) for i in range(100)
    ]


async def test_submit_refuses_bad_records_before_taking_any(
    backplane: Backplane,
) -> None:
    with pytest.raises(ValueError, match="at least one record"):
        backplane.submit([])
    with pytest.raises(ValueError, match=f"partition {PARTITIONS}"):
        backplane.submit([(0, b"k", b"v"), (PARTITIONS, b"k", b"v")])
    with pytest.raises(TypeError, match="must be bytes"):
        backplane.submit([(0, b"k", "text")])  # type: ignore[list-item]

    assert await backplane.end_offset(0) == 0


async def test_submit_after_close_raises_backplane_unavailable(
    backplane: Backplane,
) -> None:
    await backplane.aclose()

    with pytest.raises(BackplaneUnavailable):
        backplane.submit([(0, b"k", b"v")])


async def test_committed_is_none_before_any_commit(backplane: Backplane) -> None:
    assert await backplane.committed("readers", 0) is None


async def test_commits_are_kept_per_group_and_partition(backplane: Backplane) -> None:
    await backplane.commit("delivery", 0, 5)
    await backplane.commit("delivery", 1, 7)
    await backplane.commit("history", 0, 2)

    assert await backplane.committed("delivery", 0) == 5
    assert await backplane.committed("delivery", 1) == 7
    assert await backplane.committed("history", 0) == 2
    assert await backplane.committed("history", 1) is None


async def test_commits_made_at_once_are_all_kept(backplane: Backplane) -> None:
    async with trio.open_nursery() as nursery:
        for partition in range(PARTITIONS):
            nursery.start_soon(backplane.commit, "delivery", partition, 10 + partition)
        nursery.start_soon(backplane.commit, "history", 0, 3)

    for partition in range(PARTITIONS):
        assert await backplane.committed("delivery", partition) == 10 + partition
    assert await backplane.committed("history", 0) == 3


async def test_the_latest_commit_wins_even_when_lower(backplane: Backplane) -> None:
    await backplane.commit("delivery", 3, 10)
    await backplane.commit("delivery", 3, 4)

    assert await backplane.committed("delivery", 3) == 4


@pytest.mark.parametrize("partition", [-1, PARTITIONS, PARTITIONS + 10])
async def test_a_partition_out_of_range_raises_value_error(
    backplane: Backplane, partition: int
) -> None:
    with pytest.raises(ValueError, match=f"partition {partition}"):
        await backplane.append(partition, b"k", b"v")
    with pytest.raises(ValueError, match=f"partition {partition}"):
        await backplane.read(partition, 0)
    with pytest.raises(ValueError, match=f"partition {partition}"):
        await backplane.end_offset(partition)
    with pytest.raises(ValueError, match=f"partition {partition}"):
        await backplane.commit("g", partition, 0)
    with pytest.raises(ValueError, match=f"partition {partition}"):
        await backplane.committed("g", partition)


async def test_a_negative_offset_raises_value_error(backplane: Backplane) -> None:
    with pytest.raises(ValueError, match="-3"):
        await backplane.read(0, -3)
    with pytest.raises(ValueError, match="-3"):
        await backplane.commit("g", 0, -3)


async def test_max_records_below_one_raises_value_error(backplane: Backplane) -> None:
    with pytest.raises(ValueError, match="max_records"):
        await backplane.read(0, 0, max_records=0)


@pytest.mark.parametrize(
    ("key", "value"), [("text", b"v"), (b"k", "text"), (b"k", None), (None, b"v")]
)
async def test_a_key_or_value_that_is_not_bytes_raises_type_error(
    backplane: Backplane, key: object, value: object
) -> None:
    with pytest.raises(TypeError, match="must be bytes"):
        await backplane.append(0, key, value)  # type: ignore[arg-type]

    assert await backplane.end_offset(0) == 0


async def test_append_after_close_raises_backplane_unavailable(
    backplane: Backplane,
) -> None:
    await backplane.append(0, b"k", b"v")
    await backplane.aclose()

    with pytest.raises(BackplaneUnavailable):
        await backplane.append(0, b"k", b"v")
    with pytest.raises(BackplaneUnavailable):
        await backplane.commit("g", 0, 1)


async def test_aclose_twice_is_harmless(backplane: Backplane) -> None:
    await backplane.aclose()
    await backplane.aclose()


async def test_records_and_commits_survive_reopening(
    backplane_factory: BackplaneFactory,
) -> None:
    if not backplane_factory.durable:
        pytest.skip("this implementation keeps nothing across opens")

    async with backplane_factory.open(PARTITIONS) as first:
        for i in range(3):
            await first.append(1, b"k", f"kept {i}".encode())
        await first.commit("delivery", 1, 2)

    async with backplane_factory.open(PARTITIONS) as second:
        records = await _read_all(second, 1)
        assert [r.value for r in records] == [b"kept 0", b"kept 1", b"kept 2"]
        assert await second.committed("delivery", 1) == 2

        # Offsets carry on densely after the reopen.
        assert await second.append(1, b"k", b"after") == 3
