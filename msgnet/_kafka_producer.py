"""Appending to Kafka: one producer, fed by one thread, acknowledged on trio's.

``KafkaProducer.send`` can block (on metadata, or a full buffer), so the trio
thread never calls it: it queues a submission, and a sender thread of its own
hands each record to the producer. Kafka's acknowledgements arrive on the
producer's I/O thread and reach the trio thread in batches, one wake-up for
all that arrived meanwhile, so no thread waits per record.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs
import trio
from kafka import KafkaProducer

from ._backplane import Append, BackplaneUnavailable

__all__ = ["RECONNECT_BACKOFF_MAX_MS", "PendingAppend", "RecordSender", "new_producer"]

logger = logging.getLogger(__name__)

PRODUCER_REPLACE_INTERVAL_S = 5.0
"""Least time between two producer replacements, so an outage does not churn."""

RECONNECT_BACKOFF_MAX_MS = 1000
"""Cap on kafka-python's reconnect backoff (its default grows to 30 s), so a
server notices a restarted broker within a second instead of half a minute."""


def new_producer(
    bootstrap: str, *, linger_ms: int, delivery_timeout_ms: int, request_timeout_ms: int
) -> Any:
    """An idempotent producer with ``acks=all``: an acknowledged record is on
    every in-sync replica, and retries never write it twice."""
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=linger_ms,
        batch_size=64 * 1024,
        delivery_timeout_ms=delivery_timeout_ms,
        request_timeout_ms=request_timeout_ms,
        max_block_ms=delivery_timeout_ms,
        allow_auto_create_topics=False,
        reconnect_backoff_max_ms=RECONNECT_BACKOFF_MAX_MS,
    )


@attrs.define(eq=False)
class PendingAppend:
    """Submitted records handed to the producer, waiting for Kafka's acks."""

    records: Sequence[Append]
    written: list[int | None]
    """Each record's offset, once acknowledged."""
    unacknowledged: int
    done: trio.Event = attrs.field(factory=trio.Event)
    failure: str | None = None

    def settled(self) -> bool:
        """``Appending.settled``."""
        return self.done.is_set()

    async def offsets(self) -> list[int]:
        """``Appending.offsets``: waits for every record's acknowledgement."""
        if not self.done.is_set():
            await self.done.wait()
        if self.failure is not None:
            raise BackplaneUnavailable(self.failure)
        return cast("list[int]", self.written)


class RecordSender:
    """Hands submitted records to a producer and settles them as Kafka answers.

    Made on the trio thread, whose token carries the acknowledgements back.
    ``submit`` and ``fail_unsettled`` run there; ``close`` blocks, and runs in
    a worker thread.
    """

    def __init__(
        self,
        *,
        topic: str,
        producer: Any,
        new_producer: Callable[[], Any],
        close_timeout_s: float,
    ) -> None:
        self._topic = topic
        self._producer = producer
        self._new_producer = new_producer
        self._close_timeout_s = close_timeout_s
        self._producer_failed = threading.Event()
        self._producer_replaced_at = -math.inf
        self._token = trio.lowlevel.current_trio_token()

        self._queue: queue.SimpleQueue[PendingAppend | None] = queue.SimpleQueue()
        self._unsettled: set[PendingAppend] = set()
        self._outcomes: list[tuple[PendingAppend, int, int | None, str | None]] = []
        self._outcomes_lock = threading.Lock()
        self._outcomes_scheduled = False
        self._thread = threading.Thread(
            target=self._send_loop, name=f"msgnet-kafka-sender-{topic}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def submit(self, records: Sequence[Append]) -> PendingAppend:
        """Queue records for the producer; the caller checked them."""
        pending = PendingAppend(
            records, written=[None] * len(records), unacknowledged=len(records)
        )
        self._unsettled.add(pending)
        self._queue.put(pending)
        return pending

    def close(self) -> None:
        """Stop taking records and flush the producer (blocking).

        Every record handed to the producer is acknowledged or failed (after
        at most the delivery timeout) before this returns; the outcomes are
        queued on the trio token by then.
        """
        self._queue.put(None)
        self._thread.join()
        self._producer.close(timeout=self._close_timeout_s)

    def fail_unsettled(self, failure: str) -> None:
        """Fail every submission still waiting (after ``close``: never confirmed)."""
        for pending in self._unsettled:
            if pending.failure is None:
                pending.failure = failure
            pending.done.set()
        self._unsettled.clear()

    # The sender thread.

    def _send_loop(self) -> None:
        while (pending := self._queue.get()) is not None:
            for index, (partition, key, value) in enumerate(pending.records):
                if self._producer_failed.is_set():
                    self._replace_producer()
                try:
                    future = self._producer.send(
                        self._topic, key=key, value=value, partition=partition
                    )
                except Exception as exc:
                    # send() raises for a full buffer or unknown metadata past
                    # max_block_ms, or a producer closed under it.
                    self._settle_soon(
                        pending, index, None, f"Kafka refused the record: {exc!r}"
                    )
                    self._producer_failed.set()
                    continue
                future.add_callback(self._on_delivered, pending, index)
                future.add_errback(self._on_failed, pending, index)

    def _replace_producer(self) -> None:
        """Start over with a new producer after one failed to deliver.

        A kafka-python producer that lost its broker with batches in flight
        can stay stuck after the broker is back (seen with broker restarts
        under load: every later record expired). A new producer gets a new
        producer id and fresh connections; records the old one may still have
        written are duplicates that readers drop by message id.
        """
        now = time.monotonic()
        if now - self._producer_replaced_at < PRODUCER_REPLACE_INTERVAL_S:
            return
        self._producer_replaced_at = now
        self._producer_failed.clear()
        try:
            new = self._new_producer()
        except Exception:
            # Kafka is still away; the next failure tries again.
            logger.warning("cannot replace the Kafka producer yet", exc_info=True)
            return
        old, self._producer = self._producer, new
        logger.warning(
            "replaced the Kafka producer for %s after a failure", self._topic
        )
        threading.Thread(
            target=old.close,
            kwargs={"timeout": 0},
            name="msgnet-kafka-close",
            daemon=True,
        ).start()

    # The producer's I/O thread.

    def _on_delivered(self, pending: PendingAppend, index: int, metadata: Any) -> None:
        self._settle_soon(pending, index, metadata.offset, None)

    def _on_failed(
        self, pending: PendingAppend, index: int, exc: BaseException
    ) -> None:
        self._producer_failed.set()
        self._settle_soon(
            pending,
            index,
            None,
            f"Kafka did not confirm the append to {self._topic}: {exc!r}",
        )

    def _settle_soon(
        self,
        pending: PendingAppend,
        index: int,
        offset: int | None,
        failure: str | None,
    ) -> None:
        # Only the trio thread may touch the pending append's event. Outcomes
        # are collected and handed over in batches.
        with self._outcomes_lock:
            self._outcomes.append((pending, index, offset, failure))
            if self._outcomes_scheduled:
                return
            self._outcomes_scheduled = True
        try:
            self._token.run_sync_soon(self._settle_outcomes)
        except trio.RunFinishedError:
            logger.warning(
                "Kafka acknowledgements arrived after trio exited; dropped them"
            )

    # The trio thread.

    def _settle_outcomes(self) -> None:
        with self._outcomes_lock:
            outcomes, self._outcomes = self._outcomes, []
            self._outcomes_scheduled = False
        for pending, index, offset, failure in outcomes:
            if pending not in self._unsettled:
                continue
            pending.written[index] = offset
            if failure is not None and pending.failure is None:
                pending.failure = failure
            pending.unacknowledged -= 1
            if pending.unacknowledged == 0:
                self._unsettled.discard(pending)
                pending.done.set()
