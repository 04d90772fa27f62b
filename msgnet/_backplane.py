"""The backplane interface: a partitioned, durable log shared by messaging servers."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol, TypeVar

import trio

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

RETRY_DELAYS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
"""Backoff while the log is unreachable; the last value repeats."""


class BackplaneUnavailable(Exception):
    """The log could not be reached; nothing was appended or committed.

    Raised by ``append`` when the record's durability is unknown or refused, so a
    caller never acknowledges a message on the strength of a failed append.
    """


class LogRecord(NamedTuple):
    """One record read back from a partition of the log.

    A named tuple rather than an attrs class: every record the server
    handles is built once by the log, and this is about five times cheaper.
    """

    partition: int
    """The partition the record lives in."""
    offset: int
    """Its position in the partition: dense, increasing, starting at 0."""
    key: bytes
    """The routing key it was appended with (a user id in UTF-8)."""
    value: bytes
    """The opaque payload (an encoded ``InboxRecord``)."""
    timestamp_ms: int
    """When the log accepted it, in milliseconds since the Unix epoch."""


Append = tuple[int, bytes, bytes]
"""One record to append: (partition, key, value)."""


class Appending(Protocol):
    """Records handed to the log by ``Backplane.submit``, on their way to disk."""

    def settled(self) -> bool:
        """Whether the outcome is known, so ``offsets`` returns without waiting."""
        ...

    async def offsets(self) -> list[int]:
        """Their offsets, in the order submitted, once every one is durable.

        Raises ``BackplaneUnavailable`` if the durability of any is unknown or
        refused; those that did land stay in the log. If the wait is cancelled
        before the records were written, the log may skip them.
        """
        ...


class Backplane(Protocol):
    """What msgnet needs from a pub/sub log; Kafka and the embedded log implement it.

    Every method is a trio coroutine; implementations keep their blocking client
    off the trio thread. Offsets follow Kafka's meaning: a committed offset is
    the offset of the *next* record to read.
    """

    @property
    def partitions(self) -> int:
        """How many partitions the inbox log has; fixed for the log's lifetime."""
        ...

    def submit(self, records: Sequence[Append]) -> Appending:
        """Hand records to the log at once, in order, without waiting for them.

        Records submitted earlier are written earlier in each partition, so a
        caller that submits in order and then waits keeps its order while many
        of its records are in flight. Raises ``BackplaneUnavailable`` if the
        log is closed or has failed.
        """
        ...

    async def append(self, partition: int, key: bytes, value: bytes) -> int:
        """Append one record and return its offset once it is durable.

        Raises ``BackplaneUnavailable`` if durability cannot be confirmed.
        Concurrent calls are batched by the implementation.
        """
        ...

    async def read(
        self, partition: int, offset: int, *, max_records: int = 500
    ) -> Sequence[LogRecord]:
        """Return the records at ``offset`` and after, waiting until there is one.

        Never returns an empty sequence; cancel the call to stop waiting. If the
        log no longer holds ``offset`` (retention), the first record returned has
        a larger offset.
        """
        ...

    async def end_offset(self, partition: int) -> int:
        """The offset the next appended record will get (the high watermark)."""
        ...

    async def commit(self, group: str, partition: int, offset: int) -> None:
        """Durably record that ``group`` has read ``partition`` up to ``offset``."""
        ...

    async def committed(self, group: str, partition: int) -> int | None:
        """The offset last committed by ``group`` for ``partition``, if any."""
        ...

    async def aclose(self) -> None:
        """Release connections and threads; pending appends fail, none is lost."""
        ...


async def until_available(operation: Callable[[], Awaitable[_T]], *, what: str) -> _T:
    """Retry ``operation`` through ``BackplaneUnavailable`` until it succeeds.

    For the server's own background work (delivery, history, the cluster
    map), which must ride out a broker restart rather than give up; requests
    from clients fail fast instead, so no one waits without knowing why.
    """
    failures = 0
    while True:
        try:
            return await operation()
        except BackplaneUnavailable as exc:
            if failures == 0:
                logger.warning("log unavailable while %s; retrying: %s", what, exc)
            await trio.sleep(RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)])
            failures += 1


async def sleep_until_tick(interval: float) -> None:
    """Sleep until the clock's next multiple of ``interval`` seconds.

    Periodic commits wait for this rather than for ``interval`` from their
    own last commit: the tasks of every partition then wake in the same
    scheduler round, and a backplane sends their commits in one request.
    """
    await trio.sleep_until((math.floor(trio.current_time() / interval) + 1) * interval)


# Argument checks shared by every implementation, so that all of them refuse
# the same bad arguments with the same words (the contract suite checks this).


def check_partition(partition: int, partitions: int, where: str) -> None:
    """Refuse a partition number that is not an int in ``[0, partitions)``."""
    if not isinstance(partition, int) or isinstance(partition, bool):
        raise TypeError(f"partition must be an int, not {partition!r}")
    if not 0 <= partition < partitions:
        raise ValueError(
            f"partition {partition!r} is out of range for {where} "
            f"with {partitions} partitions"
        )


def check_offset(offset: int) -> None:
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int, not {offset!r}")
    if offset < 0:
        raise ValueError(f"offset must not be negative, not {offset!r}")


def check_appends(records: Sequence[Append], partitions: int, where: str) -> None:
    """Refuse a submission that is empty or holds a malformed record."""
    if not records:
        raise ValueError("submit needs at least one record")
    for partition, key, value in records:
        check_partition(partition, partitions, where)
        check_bytes("key", key)
        check_bytes("value", value)


def check_bytes(name: str, data: bytes) -> None:
    if not isinstance(data, bytes):
        raise TypeError(f"{name} must be bytes, not {data!r}")


def check_group(group: str) -> None:
    if not isinstance(group, str):
        raise TypeError(f"group must be a str, not {group!r}")
    if not group:
        raise ValueError(f"group must not be empty, not {group!r}")
