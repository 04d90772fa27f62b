"""The Kafka backplane: the inbox log as a Kafka topic, reached through kafka-python."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, OffsetOutOfRangeError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from ._backplane import (
    Append,
    BackplaneUnavailable,
    LogRecord,
    check_appends,
    check_group,
    check_offset,
    check_partition,
)
from ._config import DEFAULT_INBOX_TOPIC
from ._kafka_producer import (
    RECONNECT_BACKOFF_MAX_MS,
    PendingAppend,
    RecordSender,
    new_producer,
)
from ._kafka_tail import TailFollower

__all__ = [
    "DEFAULT_TOPIC",
    "KafkaBackplane",
    "create_inbox_topic",
    "open_kafka_backplane",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_TOPIC = DEFAULT_INBOX_TOPIC

_POLL_INTERVAL_MS = 500
"""How long one consumer poll blocks; a waiting read notices cancellation this fast."""

_READERS_PER_PARTITION = 4
"""Consumers one partition may have for reads at once: the owner's, and catch-ups."""

_UNKNOWN_TOPIC_OR_PARTITION = 3
"""Kafka's error code for a topic that does not exist."""


def _describe_partitions(admin: Any, name: str) -> int | None:
    """The topic's partition count, or None if it does not exist (blocking)."""
    (topic,) = admin.describe_topics([name])
    if topic["error_code"] == _UNKNOWN_TOPIC_OR_PARTITION:
        return None
    if topic["error_code"] != 0:
        raise BackplaneUnavailable(
            f"Kafka could not describe topic {name!r}: error code {topic['error_code']}"
        )
    return len(topic["partitions"])


def _check_partition_count(name: str, found: int | None, expected: int) -> None:
    if found is None:
        raise ValueError(
            f"Kafka topic {name!r} does not exist; create it with {expected} "
            "partitions (create_inbox_topic) before opening the backplane"
        )
    if found != expected:
        raise ValueError(
            f"Kafka topic {name!r} has {found} partitions, not the {expected} "
            "configured; users would be routed to the wrong partitions"
        )


def create_inbox_topic(
    bootstrap: str,
    name: str = DEFAULT_TOPIC,
    *,
    partitions: int,
    replication_factor: int = 1,
    configs: dict[str, str] | None = None,
) -> bool:
    """Create the inbox topic, or check the one that exists (blocking).

    ``configs`` adds topic settings, such as ``min.insync.replicas`` or the
    ``cleanup.policy=compact`` of the cluster topic. Returns True if the topic
    was created, False if it already existed with ``partitions`` partitions.
    Raises ``ValueError`` if it exists with another count, and
    ``BackplaneUnavailable`` if Kafka cannot be reached.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions!r}")
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    except KafkaError as exc:
        raise BackplaneUnavailable(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    try:
        existing = _describe_partitions(admin, name)
        if existing is None:
            try:
                admin.create_topics(
                    {
                        name: {
                            "num_partitions": partitions,
                            "replication_factor": replication_factor,
                            # A record's timestamp is when the broker appended it,
                            # as LogRecord.timestamp_ms promises, not a client's
                            # clock.
                            "configs": {
                                "message.timestamp.type": "LogAppendTime",
                                **(configs or {}),
                            },
                        }
                    },
                    wait_for_metadata=True,
                )
                logger.info(
                    "created Kafka topic %s with %d partitions", name, partitions
                )
                return True
            except TopicAlreadyExistsError:
                # Another server created it between the describe and the create.
                existing = _describe_partitions(admin, name)
        _check_partition_count(name, existing, partitions)
        return False
    except KafkaError as exc:
        raise BackplaneUnavailable(
            f"Kafka at {bootstrap} failed to create topic {name!r}: {exc}"
        ) from exc
    finally:
        admin.close()


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


@attrs.define(eq=False)
class _CommitBatch:
    """Offsets of one group committed together, in one request to Kafka."""

    offsets: dict[TopicPartition, int] = attrs.field(factory=dict)
    done: trio.Event = attrs.field(factory=trio.Event)
    failure: str | None = None


@attrs.define(eq=False)
class _GroupClient:
    """A consumer that commits for one group without joining it."""

    lock: threading.Lock = attrs.field(factory=threading.Lock)
    consumer: Any = None
    gathering: _CommitBatch | None = None
    """The batch that commits made now join; its first commit sends it."""


class KafkaBackplane:
    """A ``Backplane`` on one Kafka topic; open it with ``open_kafka_backplane``.

    kafka-python blocks, so it runs off the trio thread:

    - Appends go through one thread-safe ``KafkaProducer``, which batches them,
      fed and settled by a ``RecordSender`` (``_kafka_producer``).
    - Reads at the end of a partition (its owner, the history writer) share
      one consumer that follows every such partition, a ``TailFollower``
      (``_kafka_tail``). A read further behind (a catch-up) has a
      ``KafkaConsumer`` of its own (a consumer is not thread-safe), used by
      one worker thread at a time; it polls in short steps so that a
      cancelled read gives its thread back quickly, and stays where the last
      read ended, so the next read uses Kafka's prefetched records.
    - Commits go through one consumer per group that never joins the group: it
      commits explicit offsets (generation -1), which Kafka accepts for a group
      with no subscribed members.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        topic: str,
        partitions: int,
        producer: Any,
        new_producer: Callable[[], Any],
        request_timeout_ms: int,
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = topic
        self._partitions = partitions
        self._request_timeout_ms = request_timeout_ms
        self._sender = RecordSender(
            topic=topic,
            producer=producer,
            new_producer=new_producer,
            close_timeout_s=request_timeout_ms / 1000 + 5,
        )

        self._readers = [
            [_PartitionReader(partition=TopicPartition(topic, p))]
            for p in range(partitions)
        ]
        self._read_cancels: set[threading.Event] = set()
        # Waiting reads hold their thread, so they get a limiter of their own
        # and cannot starve other trio.to_thread users of the default one.
        self._read_limiter = trio.CapacityLimiter(2 * partitions + 4)

        self._offsets_client = _GroupClient()
        self._groups: dict[str, _GroupClient] = {}
        self._follower = TailFollower(
            topic=topic,
            new_consumer=functools.partial(self._new_consumer, None),
            closed_message=self._closed_message(),
        )

        self._closing = False
        self._closed = trio.Event()

    @property
    def partitions(self) -> int:
        """The topic's partition count, checked when the backplane was opened."""
        return self._partitions

    def submit(self, records: Sequence[Append]) -> PendingAppend:
        """Hand records to the producer's queue; ``Backplane.submit``.

        Raises ``BackplaneUnavailable`` if the backplane is closed. A record
        whose wait is cancelled may still be appended.
        """
        check_appends(records, self._partitions, f"topic {self._topic}")
        self._check_open()
        return self._sender.submit(records)

    async def append(self, partition: int, key: bytes, value: bytes) -> int:
        """Append one record and return its offset once every in-sync replica has it.

        Raises ``BackplaneUnavailable`` if Kafka refuses it or does not confirm
        it within the delivery timeout, or if the backplane is closed. A
        cancelled call may still have appended its record.
        """
        offsets = await self.submit([(partition, key, value)]).offsets()
        return offsets[0]

    async def read(
        self, partition: int, offset: int, *, max_records: int = 500
    ) -> Sequence[LogRecord]:
        """Return up to ``max_records`` records from ``offset`` on, waiting for one.

        Raises ``BackplaneUnavailable`` once the backplane closes, also in a call
        that was waiting, or if the consumer fails.
        """
        self._check_partition(partition)
        check_offset(offset)
        if not isinstance(max_records, int) or max_records < 1:
            raise ValueError(f"max_records must be a positive int, not {max_records!r}")
        self._check_open()

        followed = await self._follower.read(partition, offset, max_records)
        if followed is not None:
            return followed

        # Behind the records the follower holds (a catch-up): a consumer of
        # its own, left where this read ends for the next one.
        cancel = threading.Event()
        self._read_cancels.add(cancel)
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
                limiter=self._read_limiter,
            )
        finally:
            # Tells an abandoned thread to stop polling and free the consumer.
            cancel.set()
            self._read_cancels.discard(cancel)
            reader.busy = False

        if records is None:
            raise BackplaneUnavailable(self._closed_message())
        return records

    async def end_offset(self, partition: int) -> int:
        """The partition's high watermark: the offset of the next record."""
        self._check_partition(partition)
        self._check_open()
        tp = self._readers[partition][0].partition

        def fetch(consumer: Any) -> int:
            end: int = consumer.end_offsets([tp], timeout_ms=self._request_timeout_ms)[
                tp
            ]
            return end

        return await self._run_control(self._offsets_client, None, fetch)

    async def commit(self, group: str, partition: int, offset: int) -> None:
        """Commit ``offset`` for ``group`` in Kafka; the latest commit wins.

        Commits of one group made in the same scheduler round share one
        request: every owned partition's owner, and its history writer, commit
        on the same timer, and a request each was a broker round trip and a
        worker thread each. A commit whose wait is cancelled may still be made.
        """
        check_group(group)
        self._check_partition(partition)
        check_offset(offset)
        self._check_open()
        tp = self._readers[partition][0].partition
        client = self._group_client(group)

        batch = client.gathering
        if batch is not None:
            batch.offsets[tp] = offset
            await batch.done.wait()
            if batch.failure is not None:
                raise BackplaneUnavailable(batch.failure)
            return

        batch = client.gathering = _CommitBatch({tp: offset})
        try:
            # Let the commits made in this round join, then send them all.
            # Shielded, as the request itself is: the others wait on it.
            await trio.lowlevel.cancel_shielded_checkpoint()
            client.gathering = None
            offsets = {
                tp: OffsetAndMetadata(offset, "", -1)
                for tp, offset in batch.offsets.items()
            }
            await self._run_control(
                client,
                group,
                lambda consumer: consumer.commit(
                    offsets, timeout_ms=self._request_timeout_ms
                ),
            )
        except BaseException as exc:
            batch.failure = str(exc) or repr(exc)
            raise
        finally:
            if client.gathering is batch:
                client.gathering = None
            batch.done.set()

    async def committed(self, group: str, partition: int) -> int | None:
        """The offset ``group`` last committed for ``partition``, or None."""
        check_group(group)
        self._check_partition(partition)
        self._check_open()
        tp = self._readers[partition][0].partition

        def fetch(consumer: Any) -> int | None:
            offset: int | None = consumer.committed(
                tp, timeout_ms=self._request_timeout_ms
            )
            return offset

        return await self._run_control(self._group_client(group), group, fetch)

    async def aclose(self) -> None:
        """Flush the producer, fail what it could not confirm, close every client.

        Waiting reads end with ``BackplaneUnavailable``. Idempotent.
        """
        # Shielded: closing waits for Kafka to confirm what is in flight, and a
        # half-closed backplane would leave appenders waiting forever.
        with trio.CancelScope(shield=True):
            if self._closing:
                await self._closed.wait()
                return

            self._closing = True
            self._follower.close()
            for cancel in self._read_cancels:
                cancel.set()
            await trio.to_thread.run_sync(self._close_clients)

            # Acknowledgements reported while the producer flushed were queued
            # on the trio token before the thread above returned, so they have
            # run; what is left was never confirmed.
            self._sender.fail_unsettled(self._closed_message())
            self._closed.set()
            logger.info("Kafka backplane on topic %s closed", self._topic)

    # Reading and control calls, run in worker threads.

    def _new_consumer(self, group: str | None) -> Any:
        return KafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=group,
            enable_auto_commit=False,
            # An offset that is out of range is handled by _read_blocking, so a
            # reader is never moved backwards behind its caller's back.
            auto_offset_reset="none",
            request_timeout_ms=self._request_timeout_ms,
            reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
        )

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
                    reader.consumer = self._new_consumer(None)
                    reader.consumer.assign([reader.partition])
                return self._poll_until_records(reader, offset, max_records, cancel)
            except KafkaError as exc:
                reader.position = None
                raise BackplaneUnavailable(
                    f"reading {self._topic} partition {reader.partition.partition} "
                    f"at offset {offset} failed: {exc!r}"
                ) from exc

    def _poll_until_records(
        self,
        reader: _PartitionReader,
        offset: int,
        max_records: int,
        cancel: threading.Event,
    ) -> list[LogRecord] | None:
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
            return [
                LogRecord(
                    partition=tp.partition,
                    offset=record.offset,
                    key=record.key if record.key is not None else b"",
                    value=record.value if record.value is not None else b"",
                    timestamp_ms=record.timestamp,
                )
                for record in batch
            ]
        return None

    def _idle_reader(self, partition: int) -> _PartitionReader:
        """A reader of ``partition`` that no other read is using, made if needed.

        The partition owner's read waits at the end of the log for the next
        record; a catch-up read of older records on the same consumer would
        wait behind it until someone sent a message. Past
        ``_READERS_PER_PARTITION`` readers, a read queues behind the newest.
        """
        readers = self._readers[partition]
        for reader in readers:
            if not reader.busy:
                return reader
        if len(readers) < _READERS_PER_PARTITION:
            readers.append(_PartitionReader(partition=readers[0].partition))
        return readers[-1]

    def _group_client(self, group: str) -> _GroupClient:
        client = self._groups.get(group)
        if client is None:
            client = self._groups[group] = _GroupClient()
        return client

    async def _run_control(
        self, client: _GroupClient, group: str | None, call: Callable[[Any], _T]
    ) -> _T:
        def run() -> _T:
            with client.lock:
                if self._closing:
                    raise BackplaneUnavailable(self._closed_message())
                if client.consumer is None:
                    client.consumer = self._new_consumer(group)
                return call(client.consumer)

        try:
            return await trio.to_thread.run_sync(run)
        except KafkaError as exc:
            raise BackplaneUnavailable(
                f"Kafka at {self._bootstrap} failed a request for topic "
                f"{self._topic}: {exc!r}"
            ) from exc

    def _close_clients(self) -> None:
        self._sender.close()
        self._follower.join()
        clients: list[_GroupClient | _PartitionReader] = [
            self._offsets_client,
            *self._groups.values(),
            *(reader for readers in self._readers for reader in readers),
        ]
        for client in clients:
            with client.lock:
                if client.consumer is not None:
                    client.consumer.close(autocommit=False)
                    client.consumer = None

    # Argument and state checks.

    def _closed_message(self) -> str:
        return f"the Kafka backplane on topic {self._topic} is closed"

    def _check_open(self) -> None:
        if self._closing:
            raise BackplaneUnavailable(self._closed_message())

    def _check_partition(self, partition: int) -> None:
        check_partition(partition, self._partitions, f"topic {self._topic}")


def _connect(
    bootstrap: str,
    *,
    topic: str,
    partitions: int | None,
    linger_ms: int,
    delivery_timeout_ms: int,
    request_timeout_ms: int,
) -> tuple[Any, int]:
    """Check the topic, connect a producer; return it and the partition count."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            found = _describe_partitions(admin, topic)
        finally:
            admin.close()
        if partitions is None and found is None:
            raise ValueError(
                f"Kafka topic {topic!r} does not exist; create it (create_inbox_topic) "
                "before opening the backplane"
            )
        expected = partitions if partitions is not None else found
        assert expected is not None
        _check_partition_count(topic, found, expected)

        producer = new_producer(
            bootstrap,
            linger_ms=linger_ms,
            delivery_timeout_ms=delivery_timeout_ms,
            request_timeout_ms=request_timeout_ms,
        )
    except KafkaError as exc:
        raise BackplaneUnavailable(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    return producer, expected


@asynccontextmanager
async def open_kafka_backplane(
    bootstrap: str,
    *,
    topic: str = DEFAULT_TOPIC,
    partitions: int | None = None,
    linger_ms: int = 2,
    delivery_timeout_s: float = 30.0,
) -> AsyncIterator[KafkaBackplane]:
    """Open a backplane on an existing ``topic``.

    With ``partitions`` given, the topic must have that many; without, the
    backplane takes the topic's count.
    ``linger_ms`` is how long the producer waits to fill a batch;
    ``delivery_timeout_s`` bounds how long an append may wait for Kafka before
    it fails with ``BackplaneUnavailable`` (it rides out a broker restart).
    Raises ``ValueError`` if the topic is missing or has another partition
    count. The backplane is closed when the block exits.
    """
    if partitions is not None and partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions!r}")
    if delivery_timeout_s <= 0:
        raise ValueError(
            f"delivery_timeout_s must be positive, not {delivery_timeout_s!r}"
        )
    delivery_timeout_ms = int(delivery_timeout_s * 1000)
    # Kafka requires delivery.timeout.ms >= linger.ms + request.timeout.ms.
    request_timeout_ms = max(1000, min(30_000, delivery_timeout_ms - linger_ms))

    producer, count = await trio.to_thread.run_sync(
        functools.partial(
            _connect,
            bootstrap,
            topic=topic,
            partitions=partitions,
            linger_ms=linger_ms,
            delivery_timeout_ms=delivery_timeout_ms,
            request_timeout_ms=request_timeout_ms,
        )
    )
    backplane = KafkaBackplane(
        bootstrap=bootstrap,
        topic=topic,
        partitions=count,
        producer=producer,
        new_producer=functools.partial(
            new_producer,
            bootstrap,
            linger_ms=linger_ms,
            delivery_timeout_ms=delivery_timeout_ms,
            request_timeout_ms=request_timeout_ms,
        ),
        request_timeout_ms=request_timeout_ms,
    )
    backplane._sender.start()
    backplane._follower.start()
    logger.info(
        "Kafka backplane on topic %s at %s opened with %d partitions",
        topic,
        bootstrap,
        count,
    )
    try:
        yield backplane
    finally:
        await backplane.aclose()
