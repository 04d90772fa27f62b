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
from kafka.errors import KafkaError
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
from ._kafka_catchup import CatchUpReaders
from ._kafka_producer import (
    RECONNECT_BACKOFF_MAX_MS,
    PendingAppend,
    RecordSender,
    new_producer,
)
from ._kafka_tail import TailFollower
from ._kafka_topic import check_topic, create_inbox_topic

__all__ = [
    "DEFAULT_TOPIC",
    "KafkaBackplane",
    "create_inbox_topic",
    "open_kafka_backplane",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_TOPIC = DEFAULT_INBOX_TOPIC


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
      (``_kafka_tail``). A read further behind (a catch-up) has a consumer
      of its own (``CatchUpReaders``, ``_kafka_catchup``).
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

        self._partition_keys = [TopicPartition(topic, p) for p in range(partitions)]
        self._catch_ups = CatchUpReaders(
            topic=topic,
            partitions=partitions,
            new_consumer=functools.partial(self._new_consumer, None),
            closed_message=self._closed_message(),
        )

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
        return await self._catch_ups.read(partition, offset, max_records)

    async def end_offset(self, partition: int) -> int:
        """The partition's high watermark: the offset of the next record."""
        self._check_partition(partition)
        self._check_open()
        tp = self._partition_keys[partition]

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
        tp = self._partition_keys[partition]
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
        tp = self._partition_keys[partition]

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
            self._catch_ups.cancel_all()
            await trio.to_thread.run_sync(self._close_clients)

            # Acknowledgements reported while the producer flushed were queued
            # on the trio token before the thread above returned, so they have
            # run; what is left was never confirmed.
            self._sender.fail_unsettled(self._closed_message())
            self._closed.set()
            logger.info("Kafka backplane on topic %s closed", self._topic)

    # Control calls, run in worker threads.

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
        self._catch_ups.close()
        for client in [self._offsets_client, *self._groups.values()]:
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
            expected = check_topic(admin, topic, partitions)
        finally:
            admin.close()

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
