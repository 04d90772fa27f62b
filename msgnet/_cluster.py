"""Cluster membership: heartbeats, slot claims, takeover and self-fencing."""

from __future__ import annotations

import functools
import logging
import math
import secrets
from collections.abc import Awaitable, Callable

import trio

from ._backplane import Backplane, BackplaneUnavailable, until_available
from ._clustermap import (
    ClusterMap,
    Entry,
    Heartbeat,
    SlotClaim,
    decode_entry,
    encode_entry,
)

__all__ = ["CLUSTER_PARTITION", "ClusterMember", "read_cluster_map"]

logger = logging.getLogger(__name__)

CLUSTER_PARTITION = 0
"""The cluster topic has one partition, so every server reads one total order."""

SlotCallback = Callable[[int, SlotClaim], Awaitable[None]]


async def read_cluster_map(
    log: Backplane, *, seen_ms: dict[str, int] | None = None
) -> tuple[ClusterMap, int]:
    """Fold the cluster log from its start to its current end.

    ``seen_ms``, if given, receives each server's latest heartbeat time as the
    log recorded it, for ``msgnet cluster status``.
    """
    cluster_map = ClusterMap()
    end = await log.end_offset(CLUSTER_PARTITION)
    position = 0
    while position < end:
        for record in await log.read(CLUSTER_PARTITION, position):
            entry = _decode(record.key, record.value, record.offset)
            if entry is not None:
                cluster_map.apply(entry)
            if isinstance(entry, Heartbeat) and seen_ms is not None:
                seen_ms[entry.server] = record.timestamp_ms
            position = record.offset + 1
    return cluster_map, position


def _decode(key: bytes, value: bytes, offset: int) -> Entry | None:
    try:
        return decode_entry(key, value)
    except ValueError:
        logger.warning("skipping bad cluster record offset=%d", offset, exc_info=True)
        return None


class ClusterMember:
    """This server's part in the cluster: it heartbeats, claims, and fences itself.

    Ownership is a lease. A server may deliver and commit for its slots only
    while ``holds_lease()``: until ``lease`` seconds after sending a heartbeat
    that it has since read back from the log while still owning the slot. A
    standby claims a slot only after ``takeover_timeout`` seconds without a
    heartbeat from its owner, measured while the standby itself could read the
    log. With ``lease`` at most half of ``takeover_timeout``, an owner that was
    paused (SIGSTOP, a long GC, a partition from Kafka) has stopped serving
    before anyone can claim its slot, so two servers never serve a partition
    at once.
    """

    def __init__(
        self,
        log: Backplane,
        *,
        server: str,
        host: str,
        port: int,
        ws_port: int | None,
        slot: int | None,
        heartbeat_interval: float,
        takeover_timeout: float,
        on_acquire: SlotCallback,
        on_release: SlotCallback,
    ) -> None:
        self._log = log
        self.server = server
        self.incarnation = secrets.token_hex(8)
        self._host, self._port, self._ws_port = host, port, ws_port
        self._preferred_slot = slot
        self._interval = heartbeat_interval
        self._takeover_timeout = takeover_timeout
        self._lease = takeover_timeout / 2
        self._on_acquire = on_acquire
        self._on_release = on_release

        self.map = ClusterMap()
        self._position = 0
        self._applied = trio.Condition()
        self._heard: dict[str, float] = {}
        """Local time each incarnation's latest heartbeat was read."""
        self._sequence = 0
        self._sent: dict[int, float] = {}
        self._lease_until = -math.inf
        self._log_healthy_since = math.inf
        self._last_own_heartbeat = -math.inf

    # --- queries ---------------------------------------------------------------

    def holds_lease(self) -> bool:
        """Whether this server may deliver and commit for the slots it owns."""
        return trio.current_time() < self._lease_until

    def owned_slots(self) -> set[int]:
        return self.map.slots_of(self.incarnation)

    @property
    def is_standby(self) -> bool:
        return not self.owned_slots()

    # --- running -----------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Join the cluster; ``started`` once this server knows its role."""
        self.map, self._position = await read_cluster_map(self._log)
        if self.map.layout is None:
            raise LookupError(
                "the cluster topic holds no layout; run `msgnet cluster init` first"
            )
        started_at = trio.current_time()
        for beat in self.map.heartbeats.values():
            self._heard[beat.incarnation] = started_at

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_log)
            nursery.start_soon(self._heartbeat_forever)

            slot = self._preferred_slot
            if slot is not None:
                owner = self.map.owners.get(slot)
                if owner is None or owner.server == self.server:
                    # Vacant, or held by an earlier run of this server: claim
                    # it now; the new epoch fences that earlier run if it is
                    # merely paused.
                    await self._claim(slot)
                else:
                    logger.info(
                        "slot taken; standing by server=%s slot=%d owner=%s epoch=%d",
                        self.server,
                        slot,
                        owner.server,
                        owner.epoch,
                    )
            if self.is_standby:
                logger.info("standing by server=%s", self.server)
            task_status.started()
            await self._take_over_when_silent()

    async def publish(self, entry: Entry) -> int:
        """Append an entry and wait until this server's map has applied it."""
        key, value = encode_entry(entry)
        offset = await self._log.append(CLUSTER_PARTITION, key, value)
        async with self._applied:
            while self._position <= offset:
                await self._applied.wait()
        return offset

    async def sync(self) -> None:
        """Wait until this server's map has applied the whole log as of now.

        Other servers' changes reach the map a moment after they are written;
        a lookup that misses waits for this, so a group created through one
        server is found at once through any other.
        """
        end = await self._log.end_offset(CLUSTER_PARTITION)
        async with self._applied:
            while self._position < end:
                await self._applied.wait()

    async def _claim(self, slot: int) -> bool:
        """Append a claim for ``slot`` at the next epoch; True if it won."""
        claim = SlotClaim(
            slot=slot,
            epoch=self.map.epoch(slot) + 1,
            server=self.server,
            incarnation=self.incarnation,
            host=self._host,
            port=self._port,
            ws_port=self._ws_port,
        )
        sent = trio.current_time()
        await self.publish(claim)
        won = self.map.owners.get(slot) == claim
        if won:
            self._lease_until = max(self._lease_until, sent + self._lease)
        logger.info(
            "claim %s server=%s slot=%d epoch=%d",
            "won" if won else "lost",
            self.server,
            slot,
            claim.epoch,
        )
        return won

    async def _follow_log(self) -> None:
        """Apply every cluster record in order, acquiring and releasing slots."""
        while True:
            records = await until_available(
                functools.partial(self._log.read, CLUSTER_PARTITION, self._position),
                what="following the cluster map",
            )
            now = trio.current_time()
            for record in records:
                entry = _decode(record.key, record.value, record.offset)
                if isinstance(entry, Heartbeat):
                    self._heard[entry.incarnation] = now
                    if entry.incarnation == self.incarnation:
                        self._renew_lease(entry.sequence, now)
                if entry is None:
                    continue
                before = dict(self.map.owners)
                changed = self.map.apply(entry)
                if changed is not None:
                    await self._owner_changed(before.get(changed.slot), changed)
            self._position = records[-1].offset + 1
            async with self._applied:
                self._applied.notify_all()

    async def _owner_changed(
        self, previous: SlotClaim | None, claim: SlotClaim
    ) -> None:
        if claim.incarnation == self.incarnation:
            logger.info(
                "slot acquired server=%s slot=%d epoch=%d partitions=%s",
                self.server,
                claim.slot,
                claim.epoch,
                list(self.map.partitions_of(claim.slot)),
            )
            await self._on_acquire(claim.slot, claim)
        elif previous is not None and previous.incarnation == self.incarnation:
            logger.info(
                "slot lost; fencing server=%s slot=%d new_owner=%s epoch=%d",
                self.server,
                claim.slot,
                claim.server,
                claim.epoch,
            )
            await self._on_release(claim.slot, claim)

    def _renew_lease(self, sequence: int, now: float) -> None:
        if now - self._last_own_heartbeat > 2 * self._interval + self._lease:
            # Our own heartbeats stopped coming back for a while (Kafka was
            # unreachable, or we were paused): other servers' silence is only
            # evidence from here on.
            self._log_healthy_since = now
        self._last_own_heartbeat = now
        sent = self._sent.pop(sequence, None)
        for older in [s for s in self._sent if s < sequence]:
            del self._sent[older]
        if sent is not None and self.owned_slots():
            self._lease_until = max(self._lease_until, sent + self._lease)

    async def _heartbeat_forever(self) -> None:
        while True:
            self._sequence += 1
            beat = Heartbeat(
                server=self.server,
                incarnation=self.incarnation,
                sequence=self._sequence,
                host=self._host,
                port=self._port,
                ws_port=self._ws_port,
                standby=self.is_standby,
            )
            key, value = encode_entry(beat)
            self._sent[self._sequence] = trio.current_time()
            try:
                with trio.fail_after(self._lease):
                    await self._log.append(CLUSTER_PARTITION, key, value)
            except (BackplaneUnavailable, trio.TooSlowError):
                logger.warning("heartbeat not written server=%s", self.server)
            await trio.sleep(self._interval)

    async def _take_over_when_silent(self) -> None:
        """As a standby, claim the first slot whose owner has gone silent."""
        while True:
            await trio.sleep(self._interval)
            if not self.is_standby:
                continue
            now = trio.current_time()
            # Silence only counts while we ourselves can read the log.
            if now - self._last_own_heartbeat > 2 * self._interval:
                continue
            layout = self.map.layout
            assert layout is not None
            for slot in range(layout.slots):
                owner = self.map.owners.get(slot)
                last = self._log_healthy_since
                if owner is not None:
                    last = max(last, self._heard.get(owner.incarnation, -math.inf))
                if now - last > self._takeover_timeout:
                    logger.info(
                        "owner silent; claiming server=%s slot=%d silent_for=%.1fs",
                        self.server,
                        slot,
                        now - last,
                    )
                    if await self._claim(slot):
                        break
