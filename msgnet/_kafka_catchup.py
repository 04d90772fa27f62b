"""Reads of a Kafka partition behind its tail: a consumer per read in progress."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import attrs
import trio
from kafka import TopicPartition
from kafka.errors import KafkaError, OffsetOutOfRangeError

from ._backplane import BackplaneUnavailable, LogRecord

__all__ = ["CatchUpReaders", "log_record"]

_POLL_INTERVAL_MS = 500
"""How long one consumer poll blocks; a waiting read notices cancellation this fast."""

_READERS_PER_PARTITION = 4
"""Consumers one partition may have for reads at once: the owner's, and catch-ups."""


@attrs.define(eq=False)
class _PartitionReader:
    """One partition's consumer, used by one thread at a time under ``lock``."""

    partition: TopicPartition
    lock: threading.Lock = attrs.field(factory=threading.Lock)
    consumer: Any = None
    position: int | None = None
    """Where the consumer will fetch next, if a read left it at a known place."""
    busy: bool = False
    """A read on the trio thread has chosen this reader and not yet returned."""


class CatchUpReaders:
    """Reads further behind than the tail follower holds, such as a catch-up.

    A ``KafkaConsumer`` is not thread-safe, so each read has one of its own,
    used by one worker thread at a time. It polls in short steps so that a
    cancelled read gives its thread back quickly, and stays where the last
    read ended, so the next read of the same partition uses the records
    Kafka prefetched.
    """

    def __init__(
        self,
        *,
        topic: str,
        partitions: int,
        new_consumer: Callable[[], Any],
        closed_message: str,
    ) -> None:
        self._topic = topic
        self._new_consumer = new_consumer
        self._closed_message = closed_message
        self._readers = [
            [_PartitionReader(partition=TopicPartition(topic, p))]
            for p in range(partitions)
        ]
        self._cancels: set[threading.Event] = set()
        # Waiting reads hold their thread, so they get a limiter of their own
        # and cannot starve other trio.to_thread users of the default one.
        self._limiter = trio.CapacityLimiter(2 * partitions + 4)

    async def read(
        self, partition: int, offset: int, max_records: int
    ) -> list[LogRecord]:
        """Return up to ``max_records`` records from ``offset`` on, waiting for one.

        Raises ``BackplaneUnavailable`` if the consumer fails, or once
        ``cancel_all`` is called, also in a read that was waiting.
        """
        cancel = threading.Event()
        self._cancels.add(cancel)
        reader = self._idle_reader(partition)
        reader.busy = True
        try:
            records = await trio.to_thread.run_sync(
                self._read_blocking,
                reader,
                offset,
                max_records,
                cancel,
                abandon_on_cancel=True,
                limiter=self._limiter,
            )
        finally:
            # Tells an abandoned thread to stop polling and free the consumer.
            cancel.set()
            self._cancels.discard(cancel)
            reader.busy = False

        if records is None:
            raise BackplaneUnavailable(self._closed_message)
        return records

    def cancel_all(self) -> None:
        """End every read in progress with ``BackplaneUnavailable``."""
        for cancel in self._cancels:
            cancel.set()

    def close(self) -> None:
        """Close every consumer, once each has finished its poll (blocking)."""
        for readers in self._readers:
            for reader in readers:
                with reader.lock:
                    if reader.consumer is not None:
                        reader.consumer.close(autocommit=False)
                        reader.consumer = None

    def _idle_reader(self, partition: int) -> _PartitionReader:
        """A reader of ``partition`` that no other read is using, made if needed.

        A read that waits at the end of the log holds its reader until
        someone sends a message; a catch-up read of older records on the same
        consumer would wait behind it. Past ``_READERS_PER_PARTITION``
        readers, a read queues behind the newest.
        """
        readers = self._readers[partition]
        for reader in readers:
            if not reader.busy:
                return reader
        if len(readers) < _READERS_PER_PARTITION:
            readers.append(_PartitionReader(partition=readers[0].partition))
        return readers[-1]

    # In worker threads.

    def _read_blocking(
        self,
        reader: _PartitionReader,
        offset: int,
        max_records: int,
        cancel: threading.Event,
    ) -> list[LogRecord] | None:
        with reader.lock:
            try:
                if reader.consumer is None:
                    reader.consumer = self._new_consumer()
                    reader.consumer.assign([reader.partition])
                return _poll_until_records(reader, offset, max_records, cancel)
            except KafkaError as exc:
                reader.position = None
                raise BackplaneUnavailable(
                    f"reading {self._topic} partition {reader.partition.partition} "
                    f"at offset {offset} failed: {exc!r}"
                ) from exc


def _poll_until_records(
    reader: _PartitionReader,
    offset: int,
    max_records: int,
    cancel: threading.Event,
) -> list[LogRecord] | None:
    """Poll until records come (returned) or ``cancel`` is set (None)."""
    consumer = reader.consumer
    tp = reader.partition
    while not cancel.is_set():
        if reader.position != offset:
            consumer.seek(tp, offset)
            reader.position = offset
        try:
            batch = consumer.poll(
                timeout_ms=_POLL_INTERVAL_MS, max_records=max_records
            ).get(tp, [])
        except OffsetOutOfRangeError:
            reader.position = None
            start = consumer.beginning_offsets([tp])[tp]
            if offset < start:
                # Retention removed the offset: continue at the oldest record.
                offset = start
            else:
                # Ahead of the end: wait for the log to reach it.
                cancel.wait(_POLL_INTERVAL_MS / 1000)
            continue
        if not batch:
            continue

        reader.position = batch[-1].offset + 1
        return [log_record(record) for record in batch]
    return None


def log_record(record: Any) -> LogRecord:
    """The ``LogRecord`` of a record a ``KafkaConsumer`` polled."""
    return LogRecord(
        partition=record.partition,
        offset=record.offset,
        key=record.key if record.key is not None else b"",
        value=record.value if record.value is not None else b"",
        timestamp_ms=record.timestamp,
    )
