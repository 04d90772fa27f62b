"""The embedded backplane: the inbox log in one process, for use without Kafka.

Its file, if it has one, is in ``_embedded_file``.
"""

from __future__ import annotations

import array
import functools
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from . import _embedded_file as log_file
from ._backplane import (
    Append,
    BackplaneUnavailable,
    LogRecord,
    check_appends,
    check_group,
    check_offset,
    check_partition,
)
from ._embedded_file import LOG_FILENAME, Row, StoredState
from ._sqlite import Database

__all__ = ["LOG_FILENAME", "EmbeddedBackplane", "open_embedded_backplane"]

logger = logging.getLogger(__name__)

MAX_BATCH = 10_000
"""The most appends one transaction takes: bounds the latency of a commit."""

TAIL_RECORDS = 512
"""How many of each partition's newest records a file-backed log also keeps in memory.

Live readers follow the end of their partition, so they are served from memory;
readers further behind (catch-up after a restart) read from SQLite. A log kept
in memory only keeps every record there, and has no SQLite at all.
"""


class _Tail:
    """A partition's newest records in memory, kept as columns.

    Columns rather than a ``LogRecord`` each: bytes and an int array hold
    nothing the cyclic garbage collector has to visit, where a named tuple per
    record would be one more object in every full collection. A log kept in
    memory only keeps all its records here, so that matters as it grows.
    """

    __slots__ = ("_limit", "keys", "start", "timestamps", "values")

    def __init__(self, start: int, limit: int | None) -> None:
        self._limit = limit
        """How many records to keep at least; None keeps every record."""
        self.start = start
        """The offset of the first record held."""
        self.keys: list[bytes] = []
        self.values: list[bytes] = []
        self.timestamps = array.array("q")

    def extend(self, keys: list[bytes], values: list[bytes], timestamp_ms: int) -> None:
        self.keys += keys
        self.values += values
        self.timestamps.extend([timestamp_ms] * len(values))
        limit = self._limit
        # Trimmed by half its length at a time, so a deletion's cost is spread
        # over as many appends.
        if limit is not None and len(self.values) >= 2 * limit:
            drop = len(self.values) - limit
            del self.keys[:drop], self.values[:drop], self.timestamps[:drop]
            self.start += drop

    def read(self, partition: int, offset: int, max_records: int) -> list[LogRecord]:
        """Up to ``max_records`` from ``offset`` on, which must be held."""
        first = offset - self.start
        last = min(len(self.values), first + max_records)
        keys, values, timestamps = self.keys, self.values, self.timestamps
        return [
            LogRecord(partition, self.start + i, keys[i], values[i], timestamps[i])
            for i in range(first, last)
        ]


class _PendingAppend:
    """Submitted records waiting for the transaction that makes them durable.

    A plain slotted class whose event is made only if someone has to wait:
    one is built per send, and most are answered after they settled.
    """

    __slots__ = ("_event", "_settled", "abandoned", "failure", "records", "written")

    def __init__(self, records: Sequence[Append]) -> None:
        self.records = records
        self.written: list[int] | None = None
        """The records' offsets, once their transaction committed."""
        self.failure: str | None = None
        self.abandoned = False
        self._event: trio.Event | None = None
        self._settled = False

    def settle(self, written: list[int] | None, failure: str | None = None) -> None:
        """The writer's verdict: offsets if the transaction committed, else why not."""
        self.written, self.failure = written, failure
        self._settled = True
        if self._event is not None:
            self._event.set()

    def settled(self) -> bool:
        """``Appending.settled``."""
        return self._settled

    async def offsets(self) -> list[int]:
        """``Appending.offsets``: waits for the transaction, if it has not ended."""
        # No checkpoint when the outcome is known: a session answering a run
        # of sends that one transaction made durable does not yield per send.
        if not self._settled:
            if self._event is None:
                self._event = trio.Event()
            try:
                await self._event.wait()
            except BaseException:
                # Skipped by the writer if its transaction has not started yet.
                self.abandoned = True
                raise
        if self.written is None:
            raise BackplaneUnavailable(self.failure)
        return self.written


@attrs.define(eq=False)
class _PendingCommit:
    """A committed offset waiting for the transaction that makes it durable."""

    group: str
    partition: int
    offset: int
    done: trio.Event = attrs.field(factory=trio.Event)
    failure: str | None = None


class EmbeddedBackplane:
    """A ``Backplane`` kept in a SQLite file (or in memory) by this process alone.

    Open it with ``open_embedded_backplane``. One writer task turns every append
    and commit waiting at that moment into one transaction (group commit), so
    many concurrent appenders share one fsync. Offsets are handed out by that
    task in the order records are written, and become visible (``end_offset``,
    ``read``) only once their transaction has committed. Without a database
    (in memory) a batch is "committed" as soon as the writer takes it.
    """

    def __init__(
        self,
        database: Database | None,
        *,
        location: str,
        partitions: int,
        state: StoredState,
    ) -> None:
        self._database = database
        self._location = location
        self._partitions = partitions

        # What has committed, mirrored in memory: the next offset of each
        # partition, its newest records, and every committed group offset.
        self._end_offsets = list(state.end_offsets)
        limit = None if database is None else TAIL_RECORDS
        self._tails = [_Tail(end, limit) for end in state.end_offsets]
        self._committed = dict(state.committed)

        # Each partition's event is set and replaced whenever records land in
        # it, so readers waiting at the end wake on the append itself.
        self._appended = [trio.Event() for _ in range(partitions)]

        self._pending_appends: list[_PendingAppend] = []
        self._pending_commits: list[_PendingCommit] = []
        self._work_ready = trio.Event()
        self._closing = False
        self._failure: str | None = None
        self._writer_done = trio.Event()
        self._closed = trio.Event()

    @property
    def partitions(self) -> int:
        """How many partitions the log has; stored with the log when it is created."""
        return self._partitions

    def submit(self, records: Sequence[Append]) -> _PendingAppend:
        """Queue records for the next transaction; ``Backplane.submit``.

        Raises ``BackplaneUnavailable`` if the backplane is closed or failed. A
        wait on the result that is cancelled before the records' transaction
        started appends none of them.
        """
        check_appends(records, self._partitions, "the embedded log")
        self._check_writable()
        pending = _PendingAppend(records)
        self._pending_appends.append(pending)
        self._work_ready.set()
        return pending

    async def append(self, partition: int, key: bytes, value: bytes) -> int:
        """Append one record and return its offset once its transaction committed.

        Raises ``BackplaneUnavailable`` if the backplane is closed, closes before
        the record's transaction starts, or failed to write. A cancelled call
        whose record was not yet taken into a transaction appends nothing.
        """
        offsets = await self.submit([(partition, key, value)]).offsets()
        return offsets[0]

    async def read(
        self, partition: int, offset: int, *, max_records: int = 500
    ) -> Sequence[LogRecord]:
        """Return up to ``max_records`` records from ``offset`` on, waiting for one.

        Raises ``BackplaneUnavailable`` once the backplane is closed, also in a
        call that was waiting.
        """
        self._check_partition(partition)
        check_offset(offset)
        if not isinstance(max_records, int) or max_records < 1:
            raise ValueError(f"max_records must be a positive int, not {max_records!r}")

        while offset >= self._end_offsets[partition]:
            self._check_open()
            await self._appended[partition].wait()
        self._check_open()

        tail = self._tails[partition]
        if offset >= tail.start:
            return tail.read(partition, offset, max_records)

        assert self._database is not None, "a log in memory holds every record"
        try:
            return await self._database.run(
                functools.partial(
                    log_file.read,
                    partition=partition,
                    offset=offset,
                    max_records=max_records,
                )
            )
        except trio.ClosedResourceError:
            raise BackplaneUnavailable(self._closed_message()) from None

    async def end_offset(self, partition: int) -> int:
        """The offset the next record appended to ``partition`` will get."""
        self._check_partition(partition)
        self._check_open()
        await trio.lowlevel.checkpoint()
        return self._end_offsets[partition]

    async def commit(self, group: str, partition: int, offset: int) -> None:
        """Durably record ``offset`` as where ``group`` resumes in ``partition``.

        Any offset may be committed, also one lower than the last (a rewind).
        """
        check_group(group)
        self._check_partition(partition)
        check_offset(offset)
        self._check_writable()

        pending = _PendingCommit(group, partition, offset)
        self._pending_commits.append(pending)
        self._work_ready.set()
        await pending.done.wait()

        if pending.failure is not None:
            raise BackplaneUnavailable(pending.failure)

    async def committed(self, group: str, partition: int) -> int | None:
        """The offset ``group`` last committed for ``partition``, or None."""
        check_group(group)
        self._check_partition(partition)
        self._check_open()
        await trio.lowlevel.checkpoint()
        return self._committed.get((group, partition))

    async def aclose(self) -> None:
        """Finish the transaction in flight, fail the waiting ones, close the file.

        Everything acknowledged before stays in the file. Idempotent.
        """
        # Shielded: the wait is one transaction at most, and a half-closed
        # backplane would leave appenders waiting forever.
        with trio.CancelScope(shield=True):
            if self._closing:
                await self._closed.wait()
                return

            self._closing = True
            self._work_ready.set()
            for event in self._appended:
                event.set()

            await self._writer_done.wait()
            if self._database is not None:
                await self._database.aclose()
            self._closed.set()
            logger.info("embedded backplane at %s closed", self._location)

    async def _write_batches(self) -> None:
        """The writer task: one transaction at a time, each taking all that waits."""
        try:
            while True:
                # 1. Wait until there is something to write, or the end.
                while not (
                    self._pending_appends or self._pending_commits or self._closing
                ):
                    self._work_ready = trio.Event()
                    await self._work_ready.wait()
                if self._closing:
                    return

                # 2. Take a batch; its records' offsets become real only if
                # the transaction commits. In memory there is no transaction
                # to wait for, so the batch is what waits now: one pass through
                # the scheduler first lets the appenders ready at this moment
                # join it, and the batch is published at once.
                if self._database is None:
                    await trio.lowlevel.checkpoint()
                appends = self._take_appends()
                commits, self._pending_commits = self._pending_commits, []
                timestamp_ms = time.time_ns() // 1_000_000
                if self._database is None:
                    self._publish(appends, commits, timestamp_ms)
                    continue

                # 3. Write it. Shielded so that a cancelled writer still learns
                # the outcome of a transaction the worker thread carries on with.
                try:
                    with trio.CancelScope(shield=True):
                        await self._database.run(
                            functools.partial(
                                log_file.write,
                                rows=self._rows(appends, timestamp_ms),
                                commits=[
                                    (c.group, c.partition, c.offset) for c in commits
                                ],
                            )
                        )
                except (sqlite3.Error, OSError) as exc:
                    # Whether a failed COMMIT reached the disk is unknown, so no
                    # further offset can be handed out safely until the file is
                    # reopened and read back.
                    logger.error(
                        "embedded backplane at %s failed to write",
                        self._location,
                        exc_info=True,
                    )
                    self._failure = (
                        f"the embedded log at {self._location} failed to write: {exc!r}"
                    )
                    for append in appends:
                        append.settle(None, self._failure)
                    for commit in commits:
                        commit.failure = self._failure
                        commit.done.set()
                    return

                # 4. Publish: no checkpoint from here on, so readers see the new
                # end offset and the records together.
                self._publish(appends, commits, timestamp_ms)
        finally:
            self._fail_pending()
            self._writer_done.set()

    def _take_appends(self) -> list[_PendingAppend]:
        """Submissions for one transaction: whole ones, about MAX_BATCH records."""
        count = taken = 0
        for pending in self._pending_appends:
            if count >= MAX_BATCH:
                break
            count += len(pending.records)
            taken += 1
        batch = self._pending_appends[:taken]
        del self._pending_appends[:taken]
        return [pending for pending in batch if not pending.abandoned]

    def _rows(self, appends: Sequence[_PendingAppend], timestamp_ms: int) -> list[Row]:
        """The batch's rows, numbered from each partition's end as it will be."""
        next_offsets = list(self._end_offsets)
        rows = []
        for append in appends:
            for partition, key, value in append.records:
                rows.append(
                    (partition, next_offsets[partition], key, value, timestamp_ms)
                )
                next_offsets[partition] += 1
        return rows

    def _publish(
        self,
        appends: Sequence[_PendingAppend],
        commits: Sequence[_PendingCommit],
        timestamp_ms: int,
    ) -> None:
        """Number the batch's records as ``_rows`` did and make them readable."""
        end_offsets = self._end_offsets
        added: dict[int, tuple[list[bytes], list[bytes]]] = {}
        for append in appends:
            written = []
            for partition, key, value in append.records:
                written.append(end_offsets[partition])
                end_offsets[partition] += 1
                columns = added.get(partition)
                if columns is None:
                    columns = added[partition] = ([], [])
                columns[0].append(key)
                columns[1].append(value)
            append.settle(written)

        for commit in commits:
            self._committed[commit.group, commit.partition] = commit.offset
            commit.done.set()

        for partition, (keys, values) in added.items():
            self._tails[partition].extend(keys, values, timestamp_ms)
            self._appended[partition].set()
            self._appended[partition] = trio.Event()

    def _fail_pending(self) -> None:
        message = self._failure or self._closed_message()
        for append in self._pending_appends:
            append.settle(None, message)
        for commit in self._pending_commits:
            commit.failure = message
            commit.done.set()
        self._pending_appends.clear()
        self._pending_commits.clear()

    def _closed_message(self) -> str:
        return f"the embedded log at {self._location} is closed"

    def _check_open(self) -> None:
        if self._closing:
            raise BackplaneUnavailable(self._closed_message())

    def _check_writable(self) -> None:
        self._check_open()
        if self._failure is not None:
            raise BackplaneUnavailable(self._failure)

    def _check_partition(self, partition: int) -> None:
        check_partition(partition, self._partitions, "the embedded log")


@asynccontextmanager
async def open_embedded_backplane(
    directory: str | os.PathLike[str] | None, *, partitions: int
) -> AsyncIterator[EmbeddedBackplane]:
    """Open the embedded log in ``directory`` (None: in memory) for the block.

    The directory is created if needed. A new log stores ``partitions``;
    reopening it with another count raises ``ValueError``. The backplane is
    closed when the block exits.
    """
    if not isinstance(partitions, int) or isinstance(partitions, bool):
        raise TypeError(f"partitions must be an int, not {partitions!r}")
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions!r}")
    database = None
    if directory is None:
        location = ":memory:"
        state = StoredState(end_offsets=[0] * partitions, committed={})
    else:
        path = Path(directory)
        location = os.fspath(path)
        connection = await trio.to_thread.run_sync(log_file.connect, path, partitions)
        database = Database(connection)
        try:
            state = await database.run(
                functools.partial(log_file.load, partitions=partitions)
            )
        except BaseException:
            await database.aclose()
            raise
    logger.info(
        "embedded backplane at %s opened with %d partitions", location, partitions
    )

    backplane = EmbeddedBackplane(
        database, location=location, partitions=partitions, state=state
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(backplane._write_batches)
        try:
            yield backplane
        finally:
            await backplane.aclose()
