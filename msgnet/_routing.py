"""Routing maths: user id to inbox partition, and partition to messaging-server slot."""

from __future__ import annotations

import functools
import struct

__all__ = [
    "MAX_USER_ID_LENGTH",
    "assign_partitions",
    "murmur2",
    "partition_for",
    "slot_for_partition",
]

# The protocol's limit on every id; a longer key is a caller's bug, not a user to route.
MAX_USER_ID_LENGTH = 64

# Kafka's murmur2 constants (Utils.murmur2 in the Java client). They must not change:
# agreeing with every Kafka client that keys records by user id is this module's point.
_SEED = 0x9747B28C
_M = 0x5BD1E995
_R = 24
_MASK32 = 0xFFFFFFFF

# How many (user id, partition count) results to remember. A hit takes about 0.5 us
# against 3 to 13 us for hashing (measured, ids of 6 to 64 characters); an entry costs
# about 150 bytes plus the id it keeps alive, so the cache stays within a few MB.
_CACHE_SIZE = 16_384


def murmur2(data: bytes) -> int:
    """Return Kafka's murmur2 hash of ``data`` as a signed 32-bit int, as Java does.

    Python ints do not wrap, so every step is masked to 32 bits; unsigned
    arithmetic modulo 2**32 gives the same bits as Java's signed ``int``, and the
    result is turned into the signed value only at the end.
    """
    length = len(data)
    h = (_SEED ^ length) & _MASK32

    # 1. Whole 4-byte blocks, read little-endian as the Java code assembles them.
    whole = length >> 2
    for block in struct.unpack_from(f"<{whole}I", data):
        k = (block * _M) & _MASK32
        k ^= k >> _R
        k = (k * _M) & _MASK32
        h = ((h * _M) & _MASK32) ^ k

    # 2. The 1 to 3 trailing bytes; Java's switch falls through, so each case adds
    # its byte and the multiplication happens once, after the last byte.
    tail = length & 3
    base = length - tail
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * _M) & _MASK32

    # 3. Final mixing, then reinterpret the 32 bits as a signed Java int.
    h ^= h >> 13
    h = (h * _M) & _MASK32
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _partition_of(user_id: str, partitions: int) -> int:
    # Called with checked arguments only; an exception is never cached, so an id that
    # cannot be encoded takes no entry.
    try:
        key = user_id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"user id {user_id!r} cannot be encoded as UTF-8: {exc.reason}"
        ) from None

    # Kafka's DefaultPartitioner drops the sign bit rather than taking abs(), which
    # would fail for the most negative int; doing the same keeps us in agreement.
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def _check_count(name: str, value: object) -> int:
    # bool is an int subclass; True partitions is a bug, not a count of one.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}: {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}")
    return value


def partition_for(user_id: str, partitions: int) -> int:
    """Return the inbox partition of ``user_id`` among ``partitions`` partitions.

    This is exactly the partition Kafka's default partitioner picks for a record
    keyed by the UTF-8 bytes of ``user_id``, so any Kafka client agrees with it.
    """
    if not isinstance(user_id, str):
        raise TypeError(
            f"user id must be a str, not {type(user_id).__name__}: {user_id!r}"
        )
    if not 1 <= len(user_id) <= MAX_USER_ID_LENGTH:
        raise ValueError(
            f"user id must be 1 to {MAX_USER_ID_LENGTH} characters long, "
            f"got {len(user_id)}: {user_id!r}"
        )
    _check_count("partitions", partitions)
    return _partition_of(user_id, partitions)


def _check_layout(partitions: object, slots: object) -> tuple[int, int]:
    checked_partitions = _check_count("partitions", partitions)
    checked_slots = _check_count("slots", slots)

    # A slot without a partition would be a server that can only redirect; the
    # partition count is the ceiling on how many servers can share the load, so
    # asking for more slots is refused at startup instead of running idle servers.
    if checked_slots > checked_partitions:
        raise ValueError(
            f"slots ({checked_slots!r}) must not exceed partitions "
            f"({checked_partitions!r}): a slot with no partition would serve no user"
        )
    return checked_partitions, checked_slots


def assign_partitions(partitions: int, slots: int) -> tuple[tuple[int, ...], ...]:
    """Return the partitions each server slot owns: ``result[i]`` is slot ``i``'s.

    Partitions are dealt round-robin, partition ``p`` to slot ``p % slots``, so
    every partition has exactly one owner and slot sizes differ by at most one.
    Round-robin rather than contiguous ranges: the hash already scatters users,
    so both balance users alike, but round-robin also spreads any run of adjacent
    busy partitions over different servers, and its owner rule is one modulo.
    """
    partitions, slots = _check_layout(partitions, slots)
    return tuple(tuple(range(slot, partitions, slots)) for slot in range(slots))


def slot_for_partition(partition: int, partitions: int, slots: int) -> int:
    """Return the slot owning ``partition``; agrees with ``assign_partitions``."""
    partitions, slots = _check_layout(partitions, slots)
    if not isinstance(partition, int) or isinstance(partition, bool):
        raise TypeError(
            f"partition must be an int, not {type(partition).__name__}: {partition!r}"
        )
    if not 0 <= partition < partitions:
        raise ValueError(f"partition must be in 0..{partitions - 1}, got {partition!r}")
    return partition % slots
