"""The cluster map: which server owns which slot, folded from the cluster log.

Every server reads the same single-partition cluster topic from the start and
applies each record here, in log order. Because the fold is a pure function of
the log, every server arrives at the same map without talking to any other:
that is what makes the map centralized without a separate coordination service.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import msgpack

from ._routing import slot_for_partition

__all__ = [
    "ClusterLayout",
    "ClusterMap",
    "GroupCreated",
    "Heartbeat",
    "Membership",
    "SlotClaim",
    "decode_entry",
    "encode_entry",
]

LAYOUT_KEY = "layout"
CLAIM_PREFIX = "claim/"
HEARTBEAT_PREFIX = "hb/"
GROUP_PREFIX = "group/"
MEMBER_PREFIX = "member/"


@attrs.frozen(kw_only=True)
class ClusterLayout:
    """The fixed shape of the cluster, written once by ``msgnet cluster init``."""

    partitions: int
    """Partitions of the inbox topic."""
    slots: int
    """Server slots the partitions are divided among (round-robin)."""


@attrs.frozen(kw_only=True)
class SlotClaim:
    """A server's claim to own a slot at an epoch; the first of an epoch wins."""

    slot: int
    epoch: int
    """One more than the epoch of the owner it replaces; 1 for a vacant slot."""
    server: str
    """The claiming server's name."""
    incarnation: str
    """A random id of the claiming process, so a restarted server under the
    same name fences its own paused predecessor."""
    host: str
    port: int
    ws_port: int | None = None


@attrs.frozen(kw_only=True)
class Heartbeat:
    """A server saying it is alive, and whether it is waiting as a standby."""

    server: str
    incarnation: str
    sequence: int
    """Increases with every heartbeat of one incarnation."""
    host: str
    port: int
    ws_port: int | None = None
    standby: bool = False


def _to_tuple(members: Iterable[str]) -> tuple[str, ...]:
    return tuple(members)


@attrs.frozen(kw_only=True)
class GroupCreated:
    """A group's creation; of two creations of one name, the first in the log wins."""

    group: str
    owner: str
    members: tuple[str, ...] = attrs.field(converter=_to_tuple)
    """The initial members, the owner among them."""
    nonce: str
    """Tells the creator whether the winning creation was its own."""


@attrs.frozen(kw_only=True)
class Membership:
    """A user joining (``member``) or leaving a group."""

    group: str
    user: str
    member: bool


Entry = ClusterLayout | SlotClaim | Heartbeat | GroupCreated | Membership


def encode_entry(entry: Entry) -> tuple[bytes, bytes]:
    """The key and value of a cluster-log record.

    Keys let Kafka compact the topic: a server's heartbeats share a key, so
    only the latest is kept, while every claim keeps a key of its own (slot,
    epoch and claimant), so compaction can never drop the claim that won.
    """
    fields = attrs.asdict(entry)
    if isinstance(entry, ClusterLayout):
        key = LAYOUT_KEY
    elif isinstance(entry, SlotClaim):
        key = f"{CLAIM_PREFIX}{entry.slot}/{entry.epoch}/{entry.incarnation}"
    elif isinstance(entry, Heartbeat):
        key = f"{HEARTBEAT_PREFIX}{entry.server}"
    elif isinstance(entry, GroupCreated):
        key = f"{GROUP_PREFIX}{entry.group}\x00{entry.nonce}"
    else:
        # One key per (group, user): compaction keeps only the latest change.
        key = f"{MEMBER_PREFIX}{entry.group}\x00{entry.user}"
    value: bytes = msgpack.packb(fields)
    return key.encode(), value


def decode_entry(key: bytes, value: bytes) -> Entry | None:
    """Parse a cluster-log record; None for a key this version does not know."""
    name = key.decode("utf-8", "replace")
    fields: Any = msgpack.unpackb(value, raw=False)
    if not isinstance(fields, dict):
        raise ValueError(f"cluster record {name!r} is not a map: {fields!r:.100}")
    try:
        if name == LAYOUT_KEY:
            return ClusterLayout(**fields)
        if name.startswith(CLAIM_PREFIX):
            return SlotClaim(**fields)
        if name.startswith(HEARTBEAT_PREFIX):
            return Heartbeat(**fields)
        if name.startswith(GROUP_PREFIX):
            return GroupCreated(**fields)
        if name.startswith(MEMBER_PREFIX):
            return Membership(**fields)
    except TypeError as exc:
        raise ValueError(f"cluster record {name!r} is malformed: {exc}") from exc
    return None


@attrs.define
class ClusterMap:
    """The cluster as of some position in the cluster log.

    ``owners`` changes only through claims, in log order: a claim is accepted
    when its epoch is exactly one more than the slot's current epoch, so of two
    standbys racing for the same dead owner's slot, the one whose claim the log
    holds first wins, and every server agrees which one that is.
    """

    layout: ClusterLayout | None = None
    owners: dict[int, SlotClaim] = attrs.field(factory=dict)
    """The winning claim of each slot that has an owner."""
    heartbeats: dict[str, Heartbeat] = attrs.field(factory=dict)
    """The latest heartbeat of each server, by name."""
    groups: dict[str, set[str]] = attrs.field(factory=dict)
    """Each group's members."""
    group_nonces: dict[str, str] = attrs.field(factory=dict)
    """The nonce of the creation that won, by group."""

    def apply(self, entry: Entry) -> SlotClaim | None:
        """Fold one entry in; returns the claim if it changed a slot's owner."""
        if isinstance(entry, ClusterLayout):
            if self.layout is None:
                self.layout = entry
            return None
        if isinstance(entry, Heartbeat):
            self.heartbeats[entry.server] = entry
            return None
        if isinstance(entry, GroupCreated):
            if entry.group not in self.groups:
                self.groups[entry.group] = {entry.owner, *entry.members}
                self.group_nonces[entry.group] = entry.nonce
            return None
        if isinstance(entry, Membership):
            members = self.groups.get(entry.group)
            if members is not None:
                if entry.member:
                    members.add(entry.user)
                else:
                    members.discard(entry.user)
            return None
        if self.layout is None or not 0 <= entry.slot < self.layout.slots:
            return None
        if entry.epoch != self.epoch(entry.slot) + 1:
            return None
        self.owners[entry.slot] = entry
        return entry

    def epoch(self, slot: int) -> int:
        owner = self.owners.get(slot)
        return 0 if owner is None else owner.epoch

    def slot_of(self, partition: int) -> int:
        layout = self._layout()
        return slot_for_partition(partition, layout.partitions, layout.slots)

    def owner_of(self, partition: int) -> SlotClaim | None:
        """The claim of the server that owns ``partition``, if any."""
        return self.owners.get(self.slot_of(partition))

    def partitions_of(self, slot: int) -> tuple[int, ...]:
        layout = self._layout()
        return tuple(range(slot, layout.partitions, layout.slots))

    def slots_of(self, incarnation: str) -> set[int]:
        return {
            slot
            for slot, claim in self.owners.items()
            if claim.incarnation == incarnation
        }

    def describe(self) -> Mapping[str, Any]:
        """A plain-data view for ``msgnet cluster status``."""
        return {
            "layout": None if self.layout is None else attrs.asdict(self.layout),
            "slots": {
                slot: attrs.asdict(claim) for slot, claim in sorted(self.owners.items())
            },
            "servers": {
                name: attrs.asdict(beat)
                for name, beat in sorted(self.heartbeats.items())
            },
        }

    def _layout(self) -> ClusterLayout:
        if self.layout is None:
            raise LookupError("the cluster log has no layout; run msgnet cluster init")
        return self.layout
