"""What the embedded backplane promises beyond the backplane contract."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from msgnet._backplane import BackplaneUnavailable, LogRecord
from msgnet._embedded import LOG_FILENAME, TAIL_RECORDS, open_embedded_backplane

REPOSITORY = Path(__file__).resolve().parents[1]

HANG_GUARD_SECONDS = 60
"""Only stops a broken backplane from hanging the suite; decides nothing."""

# Appends from several tasks without end, writing "partition offset value" for
# each acknowledged append, until it is killed.
_APPENDER_SCRIPT = """
import sys
import trio
from msgnet._embedded import open_embedded_backplane

async def main(directory):
    async with open_embedded_backplane(directory, partitions=4) as backplane:
        async def appender(task):
            for i in range(10**9):
                value = f"{task}-{i}"
                offset = await backplane.append(task % 4, b"k", value.encode())
                sys.stdout.write(f"{task % 4} {offset} {value}\\n")
                sys.stdout.flush()

        async with trio.open_nursery() as nursery:
            for task in range(20):
                nursery.start_soon(appender, task)

trio.run(main, sys.argv[1])
"""


async def test_reopening_with_another_partition_count_names_both_counts(
    tmp_path: Path,
) -> None:
    async with open_embedded_backplane(tmp_path, partitions=4) as backplane:
        await backplane.append(3, b"k", b"v")

    with pytest.raises(ValueError, match="has 4 partitions, not the 8 requested"):
        async with open_embedded_backplane(tmp_path, partitions=8):
            pass

    # The refused open changed nothing.
    async with open_embedded_backplane(tmp_path, partitions=4) as backplane:
        assert await backplane.end_offset(3) == 1


@pytest.mark.parametrize("partitions", [0, -2])
async def test_a_partition_count_below_one_raises_value_error(
    partitions: int,
) -> None:
    with pytest.raises(ValueError, match=f"not {partitions}"):
        async with open_embedded_backplane(None, partitions=partitions):
            pass


async def test_the_log_file_is_created_in_the_directory_in_wal_mode(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "new" / "log"
    async with open_embedded_backplane(directory, partitions=1) as backplane:
        await backplane.append(0, b"k", b"v")

    connection = sqlite3.connect(directory / LOG_FILENAME)
    try:
        (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
    finally:
        connection.close()
    assert mode == "wal"


async def test_a_waiting_reader_wakes_on_append_without_the_clock_moving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # With an autojump clock, a reader that polled on a timer would make the
    # clock jump; one woken by the append itself leaves it where it was.
    received: list[LogRecord] = []
    arrived = trio.Event()

    async with open_embedded_backplane(None, partitions=2) as backplane:

        async def reader() -> None:
            received.extend(await backplane.read(1, 0))
            arrived.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            started = trio.current_time()

            await backplane.append(1, b"k", b"hello")
            await arrived.wait()

    assert trio.current_time() == started
    assert [r.value for r in received] == [b"hello"]


async def test_a_read_waiting_at_close_raises_backplane_unavailable() -> None:
    async with open_embedded_backplane(None, partitions=1) as backplane:

        async def reader() -> None:
            with pytest.raises(BackplaneUnavailable, match="closed"):
                await backplane.read(0, 0)

        with trio.fail_after(HANG_GUARD_SECONDS):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.testing.wait_all_tasks_blocked()
                await backplane.aclose()


async def test_records_older_than_the_memory_tail_are_read_from_the_file(
    tmp_path: Path,
) -> None:
    count = TAIL_RECORDS * 2 + 7
    async with open_embedded_backplane(tmp_path, partitions=1) as backplane:
        for i in range(count):
            await backplane.append(0, b"k", i.to_bytes(4, "big"))

        with trio.fail_after(HANG_GUARD_SECONDS):
            old = await backplane.read(0, 3, max_records=5)
            newest = await backplane.read(0, count - 2)

    assert [(r.offset, int.from_bytes(r.value, "big")) for r in old] == [
        (i, i) for i in range(3, 8)
    ]
    assert [r.offset for r in newest] == [count - 2, count - 1]


async def test_a_log_in_memory_keeps_every_record_readable() -> None:
    count = TAIL_RECORDS * 3 + 5
    async with open_embedded_backplane(None, partitions=2) as backplane:
        for i in range(count):
            await backplane.append(i % 2, b"k", i.to_bytes(4, "big"))

        first = await backplane.read(1, 0, max_records=3)
        last = await backplane.read(0, count // 2, max_records=count)

    assert [(r.offset, int.from_bytes(r.value, "big")) for r in first] == [
        (0, 1),
        (1, 3),
        (2, 5),
    ]
    assert [r.offset for r in last] == [count // 2]


async def test_every_append_racing_close_is_either_durable_or_refused(
    tmp_path: Path,
) -> None:
    acknowledged: dict[int, bytes] = {}
    refused: list[int] = []

    async with open_embedded_backplane(tmp_path, partitions=1) as backplane:

        async def appender(task: int) -> None:
            value = task.to_bytes(4, "big")
            try:
                acknowledged[await backplane.append(0, b"k", value)] = value
            except BackplaneUnavailable:
                refused.append(task)

        with trio.fail_after(HANG_GUARD_SECONDS):
            async with trio.open_nursery() as nursery:
                for task in range(300):
                    nursery.start_soon(appender, task)
                await trio.testing.wait_all_tasks_blocked()
                for task in range(300, 600):
                    nursery.start_soon(appender, task)
                await trio.lowlevel.checkpoint()
                await backplane.aclose()

    assert len(acknowledged) + len(refused) == 600
    async with open_embedded_backplane(tmp_path, partitions=1) as reopened:
        assert await reopened.end_offset(0) == len(acknowledged)
        for offset, value in acknowledged.items():
            (record, *_) = await reopened.read(0, offset, max_records=1)
            assert record.value == value


def _append_until_killed(directory: Path, lines: int) -> list[tuple[int, int, bytes]]:
    """Run the appender script, kill it after ``lines`` acknowledgements."""
    process = subprocess.Popen(
        [sys.executable, "-c", _APPENDER_SCRIPT, str(directory)],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged: list[tuple[int, int, bytes]] = []
    try:
        assert process.stdout is not None
        while len(acknowledged) < lines:
            line = process.stdout.readline()
            assert line.endswith("\n"), f"the appender stopped early: {line!r}"
            partition, offset, value = line.split()
            acknowledged.append((int(partition), int(offset), value.encode()))
    finally:
        # SIGKILL: no cleanup runs, transactions in flight are cut off.
        process.send_signal(signal.SIGKILL)
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    return acknowledged


async def test_acknowledged_appends_survive_the_process_being_killed(
    tmp_path: Path,
) -> None:
    acknowledged = await trio.to_thread.run_sync(_append_until_killed, tmp_path, 2000)

    async with open_embedded_backplane(tmp_path, partitions=4) as reopened:
        with trio.fail_after(HANG_GUARD_SECONDS):
            for partition, offset, value in acknowledged:
                (record, *_) = await reopened.read(partition, offset, max_records=1)
                assert (record.offset, record.value) == (offset, value)

            # Whatever was written past the last acknowledgement is still dense.
            for partition in range(4):
                end = await reopened.end_offset(partition)
                offsets: list[int] = []
                while len(offsets) < end:
                    batch = await reopened.read(partition, len(offsets))
                    offsets.extend(r.offset for r in batch)
                assert offsets == list(range(end))
