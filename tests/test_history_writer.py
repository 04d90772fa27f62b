"""The in-server history writer: every record stored, commits that follow the store.

Time is trio's autojump clock, so commit intervals pass without real waiting.
"""

from __future__ import annotations

import trio
import trio.testing

from msgnet._embedded import EmbeddedBackplane, open_embedded_backplane
from msgnet._history import open_history_store
from msgnet._history_writer import COMMIT_INTERVAL, HISTORY_GROUP, write_history
from msgnet._records import InboxRecord


class CountingBackplane:
    """An embedded log that counts the history group's commits."""

    def __init__(self, backplane: EmbeddedBackplane) -> None:
        self._backplane = backplane
        self.commits = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._backplane, name)

    async def commit(self, group: str, partition: int, offset: int) -> None:
        self.commits += 1
        await self._backplane.commit(group, partition, offset)


def _record(n: int) -> bytes:
    return InboxRecord(
        id=f"m{n}",
        sender="alice",
        to="bob",
        group=None,
        body=f"hello {n}",
        ts=1_700_000_000_000 + n,
        recipients=("bob",),
        origin="test/1/abcd",
    ).encode()


async def _committed_reaches(backplane: EmbeddedBackplane, offset: int) -> None:
    while (await backplane.committed(HISTORY_GROUP, 0) or 0) < offset:
        await trio.sleep(0.01)


async def test_a_writer_that_falls_quiet_commits_what_it_stored_within_the_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_embedded_backplane(None, partitions=1) as backplane,
        open_history_store(None) as store,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(write_history, backplane, store, 0)
        for n in range(3):
            await backplane.append(0, b"bob", _record(n))
        appended = trio.current_time()

        await _committed_reaches(backplane, 3)

        assert trio.current_time() - appended <= COMMIT_INTERVAL + 0.1
        assert len(await store.inbox_since("bob", 0, 0, 10)) == 3
        nursery.cancel_scope.cancel()


async def test_a_busy_writer_commits_at_most_once_an_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seconds = 5.0
    async with (
        open_embedded_backplane(None, partitions=1) as embedded,
        open_history_store(None) as store,
        trio.open_nursery() as nursery,
    ):
        backplane = CountingBackplane(embedded)
        await nursery.start(write_history, backplane, store, 0)
        sent = 0
        while trio.current_time() < seconds:
            await backplane.append(0, b"bob", _record(sent))
            sent += 1
            await trio.sleep(0.01)

        await _committed_reaches(embedded, sent)

        assert len(await store.inbox_since("bob", 0, 0, sent + 1)) == sent
        assert backplane.commits <= seconds / COMMIT_INTERVAL + 2
        nursery.cancel_scope.cancel()
