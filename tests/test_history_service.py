"""The standalone history writer: real Kafka, real PostgreSQL, real processes."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio

from bench import history_writer as history_writer_bench
from msgnet._backplane import Backplane
from msgnet._history_pg import migrate_postgres
from msgnet._kafka import create_inbox_topic, open_kafka_backplane
from msgnet._records import InboxRecord

PARTITIONS = 4
RECORDS = 2000
SESSION_TIMEOUT_S = 6
"""Kafka's smallest default session timeout: how long a killed writer holds on."""


def _count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as connection:
        row = connection.execute(
            f"SELECT count(*) FROM {table}"  # type: ignore[arg-type]
        ).fetchone()
    assert row is not None
    return int(row[0])


def _stored_positions(dsn: str) -> list[tuple[int, int]]:
    with psycopg.connect(dsn) as connection:
        rows = connection.execute(
            "SELECT log_partition, log_offset FROM inbox ORDER BY 1, 2"
        ).fetchall()
    return [(int(partition), int(offset)) for partition, offset in rows]


class Writer:
    """One ``msgnet history-writer`` process, its log in a file."""

    def __init__(self, log: Path, command: list[str]) -> None:
        self.log = log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, stdin=None
            )

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def last_assignment(self) -> str | None:
        lines = [
            line
            for line in self.output().splitlines()
            if "history writer assigned partitions" in line
        ]
        return lines[-1].rsplit("partitions ", 1)[1] if lines else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def _until(check: functools.partial[bool], what: str, timeout: float) -> None:
    # The writers are other processes: nothing here can wait on their events,
    # so their effects are polled, with a deadline that fails the test.
    with trio.move_on_after(timeout) as deadline:
        while not await trio.to_thread.run_sync(check):
            await trio.sleep(0.2)
    if deadline.cancelled_caught:
        pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def _assigned(writer: Writer, expected: str) -> bool:
    return writer.last_assignment() == expected


def _both_assigned(writers: list[Writer]) -> bool:
    return all(writer.last_assignment() not in (None, "[]") for writer in writers)


def _at_least(dsn: str, rows: int) -> bool:
    return _count(dsn, "inbox") >= rows


async def _append(
    backplane: Backplane, positions: list[tuple[int, int]], numbers: range
) -> None:
    async def one(n: int) -> None:
        record = InboxRecord(
            id=f"m{n}",
            sender=f"sender{n % 7}",
            to=f"user{n % 11}",
            group=None,
            body=f"body {n}",
            ts=n,
            recipients=(f"user{n % 11}",),
            origin="test",
        )
        partition = n % PARTITIONS
        offset = await backplane.append(partition, record.to.encode(), record.encode())
        positions.append((partition, offset))

    # Fifty in flight at a time: a steady stream, in many small batches.
    for first in numbers[::50]:
        async with trio.open_nursery() as nursery:
            for n in range(first, min(first + 50, numbers.stop)):
                nursery.start_soon(one, n)


@pytest.fixture
def writers(tmp_path: Path) -> Iterator[list[Writer]]:
    started: list[Writer] = []
    yield started
    for writer in started:
        writer.stop()


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_writer_killed_mid_stream_loses_and_duplicates_nothing(
    kafka_bootstrap: str,
    postgres_database: str,
    tmp_path: Path,
    writers: list[Writer],
) -> None:
    topic = f"test-history-{uuid.uuid4().hex}"
    group = f"history-{uuid.uuid4().hex}"
    migrate_postgres(postgres_database)
    await trio.to_thread.run_sync(
        functools.partial(
            create_inbox_topic, kafka_bootstrap, topic, partitions=PARTITIONS
        )
    )
    command = [
        sys.executable,
        "-m",
        "msgnet",
        "history-writer",
        f"--dsn={postgres_database}",
        f"--kafka-bootstrap={kafka_bootstrap}",
        f"--kafka-topic={topic}",
        f"--group={group}",
        "--batch-size=40",
        f"--session-timeout={SESSION_TIMEOUT_S}",
    ]
    for name in ("a", "b"):
        writers.append(Writer(tmp_path / f"writer-{name}.log", command))
    victim, survivor = writers
    await _until(
        functools.partial(_both_assigned, writers),
        "both writers to hold partitions",
        60,
    )

    positions: list[tuple[int, int]] = []
    async with open_kafka_backplane(
        kafka_bootstrap, topic=topic, partitions=PARTITIONS
    ) as backplane:
        # 1. Half the stream, and the store part way through it.
        await _append(backplane, positions, range(RECORDS // 2))
        await _until(
            functools.partial(_at_least, postgres_database, RECORDS // 4),
            "the writers to store a quarter of the records",
            60,
        )

        # 2. Kill one writer while records keep arriving.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _append, backplane, positions, range(RECORDS // 2, RECORDS)
            )
            os.kill(victim.process.pid, signal.SIGKILL)

        # 3. The survivor takes every partition over and catches up.
        await _until(
            functools.partial(_assigned, survivor, str(list(range(PARTITIONS)))),
            "the survivor to take over the killed writer's partitions",
            SESSION_TIMEOUT_S * 5,
        )
        await _until(
            functools.partial(_at_least, postgres_database, RECORDS),
            "every record in the store",
            90,
        )

        assert victim.process.wait() == -signal.SIGKILL
        assert _stored_positions(postgres_database) == sorted(positions)
        assert _count(postgres_database, "messages") == RECORDS

        # The group's offsets reach the end only once everything is stored.
        for partition in range(PARTITIONS):
            end = await backplane.end_offset(partition)
            with trio.fail_after(30):
                while await backplane.committed(group, partition) != end:
                    await trio.sleep(0.2)


def test_history_migrate_creates_the_schema_and_then_has_nothing_to_do(
    postgres_database: str,
) -> None:
    migrate = [sys.executable, "-m", "msgnet", "history", "migrate"]
    first = subprocess.run(
        [*migrate, f"--dsn={postgres_database}"],
        capture_output=True,
        text=True,
        check=False,
    )
    second = subprocess.run(
        migrate,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "MSGNET_HISTORY_DSN": postgres_database},
    )

    assert (first.returncode, second.returncode) == (0, 0), first.stderr
    assert "migrated from version 0 to 1" in first.stderr
    assert "up to date at version 1" in second.stderr


def test_a_history_writer_on_an_unmigrated_database_says_how_to_migrate(
    postgres_database: str,
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "msgnet",
            "history-writer",
            f"--dsn={postgres_database}",
            "--kafka-bootstrap=127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )

    assert result.returncode == 1
    assert "run `msgnet history migrate --dsn DSN` first" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_history_writer_bench_writes_its_figures(
    postgres_dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "history.json"
    figures = history_writer_bench.main(
        [f"--dsn={postgres_dsn}", "--records=300", "--batch-size=100", f"--out={out}"]
    )

    assert figures["store_rows_per_s"] > 0
    assert json.loads(out.read_text(encoding="utf-8")) == figures
