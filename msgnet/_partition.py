"""The owner of one inbox partition: reads it and delivers to connected users."""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

import protocol

from ._backplane import (
    Backplane,
    BackplaneUnavailable,
    sleep_until_tick,
    until_available,
)
from ._records import BadRecord, decode_fields

if TYPE_CHECKING:
    from ._metrics import ServerMetrics

__all__ = ["DELIVERY_GROUP", "PartitionOwner", "Recipient"]

logger = logging.getLogger(__name__)

DELIVERY_GROUP = "msgnet-delivery"
"""The consumer group whose committed offset is where live delivery resumes."""

LEASE_POLL_INTERVAL = 0.05
"""Seconds between checks of a lapsed lease while delivery is paused."""

COMMIT_INTERVAL = 0.5
"""Seconds between cursor commits: a takeover re-delivers at most this much."""

LAG_ROUNDS = 10
"""The partition lag gauge is refreshed every this many commit intervals."""


class Recipient(Protocol):
    """A connected device, as a partition owner sees it."""

    user: str
    session_id: str

    def offer(self, delivery: protocol.Deliver) -> None:
        """Queue a delivery without waiting; a full queue is the session's problem."""
        ...

    def fail(self, code: protocol.ErrorCode, text: str) -> None:
        """End the device's session with a fatal error."""
        ...


def deliver_message(
    partition: int, offset: int, value: bytes
) -> tuple[protocol.Deliver, list[str], str] | None:
    """Turn one log record into the Deliver frame, its recipients and its origin."""
    try:
        id_, sender, to, group, body, ts, recipients, origin = decode_fields(value)
    except BadRecord as exc:
        logger.warning(
            "skipping malformed record partition=%d offset=%d: %s",
            partition,
            offset,
            exc,
        )
        return None
    delivery = protocol.Deliver(
        id=id_,
        sender=sender,
        to=to,
        group=group,
        body=body,
        ts=ts,
        partition=partition,
        offset=offset,
    )
    return delivery, recipients, origin


class PartitionOwner:
    """Reads one partition of the inbox from its delivery cursor and fans it out.

    Each owner runs in a nursery of its own, so one partition's failure or
    cancellation (a revoked assignment) never disturbs another's. Delivery is
    never blocked by a recipient: sessions take deliveries with ``offer``, and
    a session that cannot keep up disconnects itself and catches up later.
    """

    def __init__(
        self,
        partition: int,
        backplane: Backplane,
        *,
        metrics: ServerMetrics,
        lease: Callable[[], bool] | None = None,
    ) -> None:
        self.partition = partition
        self._lease = lease
        self._backplane = backplane
        self._metrics = metrics
        self._recipients: dict[str, set[Recipient]] = {}
        self._committed = -1
        self.next_offset = -1
        """The offset of the next record to deliver; -1 until started."""

    def attach(self, recipient: Recipient) -> int:
        """Register a device for live delivery; returns the first offset it gets.

        Records before the returned offset are the session's catch-up; records
        from it on arrive through ``offer``. No await separates reading
        ``next_offset`` from registering, so no record falls between the two.
        """
        if self.next_offset < 0:
            raise RuntimeError(f"partition {self.partition} is not being served yet")
        self._recipients.setdefault(recipient.user, set()).add(recipient)
        return self.next_offset

    def evict_all(self, text: str) -> None:
        """Drop every attached device: this server no longer owns the partition."""
        for devices in list(self._recipients.values()):
            for recipient in list(devices):
                recipient.fail(protocol.ErrorCode.UNAVAILABLE, text)
        self._recipients.clear()

    def detach(self, recipient: Recipient) -> None:
        devices = self._recipients.get(recipient.user)
        if devices is not None:
            devices.discard(recipient)
            if not devices:
                del self._recipients[recipient.user]

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the partition until cancelled.

        The cursor is committed every ``COMMIT_INTERVAL``; the server commits it
        once more after a graceful stop (``commit``), while the log is still open.
        """
        committed = await until_available(
            self._start_offset, what=f"starting partition {self.partition}"
        )
        self.next_offset = self._committed = committed
        logger.info(
            "partition assigned partition=%d offset=%d", self.partition, committed
        )
        task_status.started()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._commit_periodically)
                await self._deliver_forever()
        finally:
            logger.info(
                "partition released partition=%d offset=%d",
                self.partition,
                self.next_offset,
            )

    async def _start_offset(self) -> int:
        committed = await self._backplane.committed(DELIVERY_GROUP, self.partition)
        if committed is None:
            committed = await self._backplane.end_offset(self.partition)
        return committed

    async def _deliver_forever(self) -> None:
        what = f"reading partition {self.partition}"
        while True:
            records = await until_available(
                functools.partial(
                    self._backplane.read, self.partition, self.next_offset
                ),
                what=what,
            )
            await self._wait_for_lease()
            for record in records:
                self._dispatch(record.offset, record.value)
            self.next_offset = records[-1].offset + 1

    def _dispatch(self, offset: int, value: bytes) -> None:
        parsed = deliver_message(self.partition, offset, value)
        if parsed is None:
            return
        delivery, users, origin = parsed
        for user in users:
            for recipient in tuple(self._recipients.get(user, ())):
                if recipient.session_id != origin:
                    recipient.offer(delivery)

    async def _commit_periodically(self) -> None:
        lag = self._metrics.partition_lag.labels(str(self.partition))
        for round_ in itertools.count(1):
            await sleep_until_tick(COMMIT_INTERVAL)
            await self._commit()
            # The end offset is a request to Kafka per partition: a lag gauge
            # this fresh is worth less than the broker round trips it costs.
            if round_ % LAG_ROUNDS:
                continue
            with trio.move_on_after(COMMIT_INTERVAL):
                try:
                    end = await self._backplane.end_offset(self.partition)
                except BackplaneUnavailable:
                    continue
                lag.set(max(0, end - self.next_offset))

    async def _wait_for_lease(self) -> None:
        """In a cluster, deliver only while this server's ownership is confirmed.

        A server that was paused past its lease may already have been replaced;
        it waits here until it either renews the lease or learns that it lost
        the slot, in which case it is cancelled.
        """
        if self._lease is None:
            return
        while not self._lease():
            await trio.sleep(LEASE_POLL_INTERVAL)

    async def commit(self) -> None:
        """Commit the delivery cursor now; a graceful shutdown's last step."""
        await self._commit()

    async def _commit(self) -> None:
        offset = self.next_offset
        if offset <= self._committed:
            return
        if self._lease is not None and not self._lease():
            return
        try:
            await self._backplane.commit(DELIVERY_GROUP, self.partition, offset)
        except BackplaneUnavailable as exc:
            # A lost commit only means some records are delivered again after a
            # restart; clients drop them by message id.
            logger.warning(
                "cannot commit delivery cursor partition=%d: %s", self.partition, exc
            )
            return
        self._committed = offset
