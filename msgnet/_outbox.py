"""A session's queue of frames to send: small while idle, bounded when busy."""

from __future__ import annotations

from typing import Generic, TypeVar

import outcome
import trio

__all__ = ["Outbox"]

_T = TypeVar("_T")


class Outbox(Generic[_T]):
    """A bounded first-in first-out queue with one taker and one waiting putter.

    It does what a trio memory channel of the same capacity does for a
    session, in a few hundred bytes less: a server holds one per connected
    device, and most of them sit empty. The taker (the session's writer) takes
    everything queued at once, up to a limit; one task (the reader) may wait
    for room, while any task may put without waiting and is told when the
    queue is full. Like a channel, a put waiting for room goes in ahead of any
    put that comes after it.
    """

    __slots__ = ("_capacity", "_closed", "_items", "_putter", "_taker", "_waiting")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity!r}")
        self._capacity = capacity
        self._items: list[_T] = []
        self._taker: trio.lowlevel.Task | None = None
        self._putter: trio.lowlevel.Task | None = None
        self._waiting: _T | None = None
        """The item of the putter waiting for room."""
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: _T) -> None:
        """Queue ``item``; raises ``trio.WouldBlock`` if the queue is full."""
        if self._closed:
            raise trio.ClosedResourceError("the outbox is closed")
        if len(self._items) >= self._capacity or self._putter is not None:
            raise trio.WouldBlock
        self._items.append(item)
        self._wake_taker()

    async def put(self, item: _T) -> None:
        """Queue ``item``, waiting for room if the queue is full."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.put_nowait(item)
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return

        if self._putter is not None:
            raise trio.BusyResourceError("another task is already waiting for room")
        self._putter = trio.lowlevel.current_task()
        self._waiting = item
        await trio.lowlevel.wait_task_rescheduled(self._abort_put)

    async def take(self, limit: int) -> list[_T]:
        """The oldest items, at most ``limit``, waiting until there is one."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._items:
            if self._closed:
                raise trio.ClosedResourceError("the outbox is closed")
            if self._taker is not None:
                raise trio.BusyResourceError("another task is already taking")
            self._taker = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_take)
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()

        items = self._items
        taken = items[:limit]
        del items[:limit]
        # The waiting putter's item goes in now, before anyone else's.
        putter = self._putter
        if putter is not None:
            items.append(self._waiting)  # type: ignore[arg-type]
            self._putter = None
            self._waiting = None
            trio.lowlevel.reschedule(putter)
        return taken

    def close(self) -> None:
        """Refuse further puts; a waiting taker or putter is woken with an error."""
        self._closed = True
        closed = outcome.Error(trio.ClosedResourceError("the outbox is closed"))
        for task in (self._taker, self._putter):
            if task is not None:
                trio.lowlevel.reschedule(task, closed)
        self._taker = self._putter = None
        self._waiting = None

    # A bound method rather than a closure per wait: the taker of an idle
    # session waits for as long as the session lives.
    def _abort_take(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._taker = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _abort_put(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._putter = None
        self._waiting = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake_taker(self) -> None:
        taker = self._taker
        if taker is not None:
            self._taker = None
            trio.lowlevel.reschedule(taker)
