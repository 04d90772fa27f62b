"""A member of a Kafka consumer group, for work that Kafka may balance on its own."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from ._backplane import BackplaneUnavailable, LogRecord
from ._kafka_catchup import log_record

__all__ = ["KafkaGroupConsumer", "open_group_consumer"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class KafkaGroupConsumer:
    """One member of ``group`` on ``topic``; Kafka shares the partitions out.

    The messaging servers assign their partitions themselves (a partition's
    owner must be the one server its clients are sent to), so they never join
    a group. Work that any process may do, such as writing history, is
    different: Kafka's group balancing hands each partition to exactly one
    live member and moves it when a member stops answering.

    kafka-python blocks and its consumer is not thread-safe, so every call runs
    in a worker thread, one at a time. Offsets are committed only by
    ``commit``, never automatically.
    """

    def __init__(self, consumer: Any, topic: str) -> None:
        self._consumer = consumer
        self._topic = topic
        self._limiter = trio.CapacityLimiter(1)
        self._closed = False

    async def poll(
        self, *, max_records: int, timeout_s: float = 0.5
    ) -> list[LogRecord]:
        """Records of the partitions assigned to this member; empty after a quiet wait.

        Polling is also what keeps the membership alive and takes part in a
        rebalance, so call it at least every ``max_poll_interval_ms``.
        """
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, got {max_records!r}")

        def poll(consumer: Any) -> list[LogRecord]:
            batches = consumer.poll(
                timeout_ms=int(timeout_s * 1000), max_records=max_records
            )
            return [
                log_record(record) for records in batches.values() for record in records
            ]

        return await self._run(poll)

    async def commit(self, offsets: Mapping[int, int]) -> bool:
        """Commit the next offset to read per partition, as this group's member.

        Returns False if the group rebalanced since the records were polled:
        Kafka refuses the commit, and whichever member now holds the partition
        reads from the last committed offset again.
        """

        def commit(consumer: Any) -> bool:
            try:
                consumer.commit(
                    {
                        TopicPartition(self._topic, partition): OffsetAndMetadata(
                            offset, "", -1
                        )
                        for partition, offset in offsets.items()
                    }
                )
            except CommitFailedError:
                return False
            return True

        return await self._run(commit)

    async def assignment(self) -> frozenset[int]:
        """The partitions Kafka has assigned to this member right now."""
        return await self._run(
            lambda consumer: frozenset(tp.partition for tp in consumer.assignment())
        )

    async def aclose(self) -> None:
        """Leave the group so that the partitions move at once; idempotent."""
        with trio.CancelScope(shield=True):
            if self._closed:
                return
            self._closed = True
            await trio.to_thread.run_sync(
                functools.partial(self._consumer.close, autocommit=False),
                limiter=self._limiter,
            )

    async def _run(self, call: Callable[[Any], _T]) -> _T:
        def run() -> _T:
            if self._closed:
                raise BackplaneUnavailable(f"the consumer of {self._topic} is closed")
            return call(self._consumer)

        try:
            return await trio.to_thread.run_sync(run, limiter=self._limiter)
        except KafkaError as exc:
            raise BackplaneUnavailable(
                f"Kafka failed a group request on topic {self._topic}: {exc!r}"
            ) from exc


@asynccontextmanager
async def open_group_consumer(
    bootstrap: str,
    *,
    topic: str,
    group: str,
    session_timeout_s: float = 10.0,
) -> AsyncIterator[KafkaGroupConsumer]:
    """Join ``group`` on ``topic`` for a block; leave it on exit.

    A member that stops heartbeating (killed, frozen) loses its partitions
    after ``session_timeout_s``. A group with no committed offset for a
    partition starts at the partition's oldest record.
    """
    if session_timeout_s <= 0:
        raise ValueError(
            f"session_timeout_s must be positive, got {session_timeout_s!r}"
        )
    session_timeout_ms = int(session_timeout_s * 1000)

    def connect() -> Any:
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=max(100, session_timeout_ms // 3),
            )
            consumer.subscribe([topic])
        except KafkaError as exc:
            raise BackplaneUnavailable(
                f"cannot join group {group!r} on {topic} at {bootstrap}: {exc!r}"
            ) from exc
        return consumer

    consumer = KafkaGroupConsumer(await trio.to_thread.run_sync(connect), topic)
    logger.info("joining consumer group %s on topic %s", group, topic)
    try:
        yield consumer
    finally:
        await consumer.aclose()
