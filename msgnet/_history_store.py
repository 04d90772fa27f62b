"""What sessions and history writers need from a history store, whatever keeps it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from protocol import HistoryEntry

from ._backplane import LogRecord
from ._records import InboxRecord

__all__ = ["HistoryStore", "HistoryUnavailable", "check_page_arguments"]


class HistoryUnavailable(ConnectionError):
    """The store's server could not be reached; nothing was written or read."""


class HistoryStore(Protocol):
    """Messages, per-user inbox positions and delivery cursors.

    ``SQLiteHistoryStore`` serves one machine; ``PostgresHistoryStore`` is
    shared by every server of a cluster. Both keep the same promises, which
    ``tests/test_history.py`` checks against each:

    - ``write`` is idempotent: a message is one row per ``(sender, id)`` and
      an inbox entry one row per ``(user, partition, offset)``, however often
      and from however many partitions it is written;
    - a message's ``seq`` orders a conversation and is never reused;
    - a saved cursor never moves backwards.
    """

    async def write(self, entries: Sequence[tuple[LogRecord, InboxRecord]]) -> None:
        """Persist a batch of log records atomically; writing them again is harmless."""
        ...

    async def page(
        self,
        *,
        peer_a: str,
        peer_b: str | None = None,
        group: str | None = None,
        before: int | None,
        limit: int,
    ) -> tuple[list[HistoryEntry], int | None]:
        """One page of a conversation, oldest first, and the cursor before it."""
        ...

    async def inbox_since(
        self,
        user: str,
        partition: int,
        offset: int,
        upto: int,
        *,
        limit: int | None = None,
    ) -> list[tuple[int, InboxRecord]]:
        """The user's records at offsets ``offset <= o < upto`` of a partition."""
        ...

    async def save_cursor(self, user: str, device: str, cursor: int) -> None:
        """Remember how far a device has processed; a smaller cursor is ignored."""
        ...

    async def load_cursor(self, user: str, device: str) -> int | None:
        """The device's saved cursor, or None if it never saved one."""
        ...

    async def aclose(self) -> None:
        """Release the store's connections; idempotent."""
        ...


def check_page_arguments(
    *, peer_b: str | None, group: str | None, before: int | None, limit: int
) -> None:
    """Refuse a page request every store would refuse, in the same words."""
    if (peer_b is None) == (group is None):
        raise ValueError(
            f"page needs exactly one of peer_b and group, got peer_b={peer_b!r}"
            f" and group={group!r}"
        )
    if limit < 1:
        raise ValueError(f"page limit must be at least 1, got {limit!r}")
    if before is not None and before < 0:
        raise ValueError(f"page cursor must be >= 0, got {before!r}")
