"""Following the newest records of Kafka partitions: one consumer for every reader.

A server reads each partition it owns at least twice at its end (the partition
owner, and the history writer a moment behind it). A kafka-python consumer per
reader costs a fetch round trip per reader for every few records, and at a few
thousand records a second those round trips were most of a server's CPU. So
one consumer in one thread follows every partition being read, hands what it
fetches to the trio thread, and the newest records of each partition are kept
there for all the readers at the end; a reader further behind (a catch-up)
uses a consumer of its own, as before.
"""

from __future__ import annotations

import array
import bisect
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio
from kafka import TopicPartition
from kafka.errors import OffsetOutOfRangeError

from ._backplane import BackplaneUnavailable, LogRecord

__all__ = ["TailFollower"]

logger = logging.getLogger(__name__)

TAIL_RECORDS = 4096
"""Newest records kept per followed partition (at least; trimmed by halves).

A reader that falls further behind than this reads through a consumer of its
own until it is back among them.
"""

POLL_MS = 50
"""How long one poll of the follower blocks: a new partition to follow waits
at most this long to be picked up."""

LINGER_S = 0.005
"""After a poll that returned records, the follower waits this long before the
next one, so that the records arriving meanwhile come in one fetch instead of
one each: a fetch round trip costs kafka-python far more than a record."""

MAX_RECORDS = 5000
"""The most records one poll returns, across all partitions."""

IDLE_S = 60.0
"""A partition no one has read for this long, and no one waits on, is dropped."""

RETRY_S = 0.5
"""How soon a failed follower, or a partition followed from beyond its end, is
tried again."""

_Batch = tuple[int, list[int], list[bytes], list[bytes], list[int]]
"""What one poll fetched of one partition: partition, offsets, keys, values,
timestamps."""


class _Tail:
    """One followed partition's newest records, on the trio thread.

    Columns of bytes and int arrays rather than a ``LogRecord`` each, so the
    cyclic garbage collector has nothing to visit. Kafka offsets are kept
    explicitly: a partition's offsets may have gaps (retention, control
    records), so a position is found by bisection, not subtraction.
    """

    __slots__ = (
        "appended",
        "end",
        "keys",
        "last_read",
        "offsets",
        "start",
        "timestamps",
        "values",
        "waiting",
    )

    def __init__(self, offset: int) -> None:
        self.start = self.end = offset
        """Records from ``start`` (inclusive) to ``end`` (exclusive) are held."""
        self.offsets = array.array("q")
        self.keys: list[bytes] = []
        self.values: list[bytes] = []
        self.timestamps = array.array("q")
        self.appended = trio.Event()
        """Set and replaced whenever records land, or the backplane closes."""
        self.waiting = 0
        self.last_read = time.monotonic()

    def restart(self, offset: int) -> None:
        """Hold nothing, from ``offset`` on (a reader asked past everything held)."""
        self.start = self.end = offset
        del self.offsets[:], self.keys[:], self.values[:], self.timestamps[:]

    def extend(self, batch: _Batch) -> bool:
        """Add a fetched batch, skipping what is held or older; True if any was new."""
        _, offsets, keys, values, timestamps = batch
        # A batch fetched before a restart, or fetched again after one, may
        # begin before the end; the records past it are new.
        first = bisect.bisect_left(offsets, self.end)
        if first == len(offsets):
            return False
        self.offsets.extend(offsets[first:])
        self.keys += keys[first:]
        self.values += values[first:]
        self.timestamps.extend(timestamps[first:])
        self.end = offsets[-1] + 1
        if len(self.values) >= 2 * TAIL_RECORDS:
            drop = len(self.values) - TAIL_RECORDS
            del self.offsets[:drop], self.keys[:drop]
            del self.values[:drop], self.timestamps[:drop]
            self.start = self.offsets[0]
        return True

    def read(self, partition: int, offset: int, max_records: int) -> list[LogRecord]:
        """Up to ``max_records`` from the first held record at or after ``offset``."""
        first = bisect.bisect_left(self.offsets, offset)
        last = min(len(self.offsets), first + max_records)
        offsets, keys, values = self.offsets, self.keys, self.values
        timestamps = self.timestamps
        return [
            LogRecord(partition, offsets[i], keys[i], values[i], timestamps[i])
            for i in range(first, last)
        ]


class TailFollower:
    """The consumer that follows the end of every partition read at its end.

    ``read`` serves readers from the records held on the trio thread, and
    starts following a partition at the first read of it. The consumer
    itself lives in one thread of its own, which is the only one to touch
    it; the trio side asks it to follow, restart or drop a partition through
    a queue, and it hands each poll's records back through the trio token.
    """

    def __init__(
        self, *, topic: str, new_consumer: Callable[[], Any], closed_message: str
    ) -> None:
        self._topic = topic
        self._new_consumer = new_consumer
        self._closed_message = closed_message
        self._token = trio.lowlevel.current_trio_token()
        self._tails: dict[int, _Tail] = {}
        self._commands: queue.SimpleQueue[tuple[int, int | None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._closing = False
        self._last_sweep = time.monotonic()
        self._thread = threading.Thread(
            target=self._follow, name=f"msgnet-kafka-tail-{topic}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    async def read(
        self, partition: int, offset: int, max_records: int
    ) -> list[LogRecord] | None:
        """Records from ``offset`` on, once there are some; None if it is behind.

        None means the offset is older than the records held for the
        partition: the caller reads it through a consumer of its own. Raises
        ``BackplaneUnavailable`` once the follower is closed, also in a wait.
        """
        tail = self._tails.get(partition)
        if tail is None:
            tail = self._tails[partition] = _Tail(offset)
            self._commands.put((partition, offset))
        elif offset > tail.end + TAIL_RECORDS:
            # Far past everything held (a reader that starts where an earlier
            # run stopped): follow from there; readers left behind read
            # through consumers of their own. A reader only a little ahead
            # waits for the follower instead, which is on its way.
            tail.restart(offset)
            self._commands.put((partition, offset))

        tail.last_read = time.monotonic()
        while offset >= tail.end and offset >= tail.start:
            self._check_open()
            tail.waiting += 1
            try:
                await tail.appended.wait()
            finally:
                tail.waiting -= 1
        self._check_open()
        if offset < tail.start:
            return None
        return tail.read(partition, offset, max_records)

    def close(self) -> None:
        """Wake every waiting read (they raise) and tell the thread to stop."""
        self._closing = True
        for tail in self._tails.values():
            tail.appended.set()
        self._stop.set()
        self._commands.put((-1, None))

    def join(self) -> None:
        """Wait for the thread to close its consumer and end (blocking)."""
        if self._thread.is_alive():
            self._thread.join()

    def _check_open(self) -> None:
        if self._closing:
            raise BackplaneUnavailable(self._closed_message)

    # On the trio thread, from the follower's thread.

    def _land(self, batches: Sequence[_Batch]) -> None:
        for batch in batches:
            tail = self._tails.get(batch[0])
            if tail is not None and tail.extend(batch):
                tail.appended.set()
                tail.appended = trio.Event()
        self._drop_idle()

    def _drop_idle(self) -> None:
        now = time.monotonic()
        if now - self._last_sweep < IDLE_S / 4:
            return
        self._last_sweep = now
        for partition, tail in list(self._tails.items()):
            if not tail.waiting and now - tail.last_read > IDLE_S:
                del self._tails[partition]
                self._commands.put((partition, None))

    # The follower's thread: the only one that touches the consumer.

    def _follow(self) -> None:
        state = _FollowState()
        try:
            while not self._stop.is_set():
                self._take_commands(state)
                if self._stop.is_set() or not state.next_offsets:
                    continue
                try:
                    fetched = self._poll(state)
                except Exception:
                    # Whatever failed (a broker away too long, a bad answer),
                    # a new consumer starts over from where the follower was;
                    # the readers wait meanwhile.
                    logger.warning(
                        "following %s failed; starting over", self._topic, exc_info=True
                    )
                    state.discard_consumer()
                    self._stop.wait(RETRY_S)
                    continue
                if fetched:
                    self._hand_over(state, fetched)
                    self._stop.wait(LINGER_S)
        finally:
            state.discard_consumer()

    def _take_commands(self, state: _FollowState) -> None:
        """Apply what the trio side asked; waits a little for a first request."""
        block = not state.next_offsets
        while True:
            try:
                partition, offset = self._commands.get(
                    block=block, timeout=POLL_MS / 1000
                )
            except queue.Empty:
                return
            block = False
            if partition < 0:
                return
            tp = TopicPartition(self._topic, partition)
            state.reassign = True
            state.paused.pop(tp, None)
            if offset is None:
                state.next_offsets.pop(tp, None)
                state.unseeked.discard(tp)
            else:
                state.next_offsets[tp] = offset
                state.unseeked.add(tp)

    def _poll(self, state: _FollowState) -> dict[Any, list[Any]]:
        consumer = state.consumer
        if consumer is None:
            consumer = state.consumer = self._new_consumer()
            state.reassign = True
            state.unseeked = set(state.next_offsets)
        if state.reassign:
            consumer.assign(list(state.next_offsets))
            state.reassign = False
        for tp in state.unseeked:
            consumer.seek(tp, state.next_offsets[tp])
        state.unseeked.clear()

        now = time.monotonic()
        for tp, at in list(state.paused.items()):
            if now >= at:
                del state.paused[tp]
                consumer.resume(tp)
                consumer.seek(tp, state.next_offsets[tp])

        try:
            fetched: dict[Any, list[Any]] = consumer.poll(
                timeout_ms=POLL_MS, max_records=MAX_RECORDS
            )
        except OffsetOutOfRangeError as exc:
            positions = (
                exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            )
            for tp, offset in positions.items():
                self._out_of_range(state, tp, offset)
            return {}
        return fetched

    def _out_of_range(self, state: _FollowState, tp: Any, offset: int) -> None:
        """A followed offset Kafka does not hold: deleted, or not yet written."""
        if tp not in state.next_offsets:
            return
        consumer = state.consumer
        assert consumer is not None
        start: int = consumer.beginning_offsets([tp])[tp]
        if offset < start:
            # Retention deleted it: go on at the oldest record; readers see
            # the gap as the read contract says.
            state.next_offsets[tp] = start
            consumer.seek(tp, start)
        else:
            # Ahead of the end: wait for the log to reach it, without holding
            # up the other partitions.
            consumer.pause(tp)
            state.paused[tp] = time.monotonic() + RETRY_S

    def _hand_over(self, state: _FollowState, fetched: dict[Any, list[Any]]) -> None:
        batches: list[_Batch] = []
        for tp, records in fetched.items():
            if not records or tp not in state.next_offsets:
                continue
            state.next_offsets[tp] = records[-1].offset + 1
            batches.append(
                (
                    tp.partition,
                    [record.offset for record in records],
                    [b"" if r.key is None else r.key for r in records],
                    [b"" if r.value is None else r.value for r in records],
                    [record.timestamp for record in records],
                )
            )
        if not batches:
            return
        try:
            self._token.run_sync_soon(self._land, batches)
        except trio.RunFinishedError:
            self._stop.set()


class _FollowState:
    """What the follower's thread keeps between polls."""

    def __init__(self) -> None:
        self.consumer: Any = None
        self.next_offsets: dict[Any, int] = {}
        """Each followed partition, and the offset the follower reads next."""
        self.unseeked: set[Any] = set()
        """Followed partitions the consumer has not been moved to yet."""
        self.reassign = False
        """The set of followed partitions changed since the consumer's assign."""
        self.paused: dict[Any, float] = {}
        """Partitions followed from beyond their end, and when to try again."""

    def discard_consumer(self) -> None:
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            try:
                consumer.close(autocommit=False)
            except Exception:
                logger.debug("closing a failed consumer failed", exc_info=True)
        self.paused.clear()
