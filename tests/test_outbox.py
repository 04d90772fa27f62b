"""The session outbox: order, bounds, waiting for room, cancellation, closing."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from msgnet._outbox import Outbox


def test_capacity_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="got 0"):
        Outbox[int](0)


async def test_take_returns_items_in_order_up_to_the_limit() -> None:
    outbox = Outbox[int](10)
    for item in range(5):
        outbox.put_nowait(item)

    assert await outbox.take(3) == [0, 1, 2]
    assert await outbox.take(3) == [3, 4]


async def test_put_nowait_on_a_full_outbox_would_block() -> None:
    outbox = Outbox[int](2)
    outbox.put_nowait(1)
    outbox.put_nowait(2)

    with pytest.raises(trio.WouldBlock):
        outbox.put_nowait(3)
    assert await outbox.take(10) == [1, 2]


async def test_take_waits_for_the_first_put() -> None:
    outbox = Outbox[str](4)
    taken: list[str] = []

    async def take() -> None:
        taken.extend(await outbox.take(10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        assert taken == []
        outbox.put_nowait("hello")

    assert taken == ["hello"]


async def test_waiting_put_goes_in_before_a_later_put_nowait() -> None:
    outbox = Outbox[int](1)
    outbox.put_nowait(1)
    put_done = trio.Event()

    async def put() -> None:
        await outbox.put(2)
        put_done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put)
        await trio.testing.wait_all_tasks_blocked()
        assert not put_done.is_set()
        # Room is taken by the waiting put, so a newcomer still finds it full.
        with pytest.raises(trio.WouldBlock):
            outbox.put_nowait(3)

        assert await outbox.take(1) == [1]
        await put_done.wait()

    with pytest.raises(trio.WouldBlock):
        outbox.put_nowait(3)
    assert await outbox.take(1) == [2]


async def test_cancelled_take_leaves_the_outbox_usable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outbox = Outbox[int](2)

    with trio.move_on_after(1):
        await outbox.take(1)

    outbox.put_nowait(7)
    assert await outbox.take(1) == [7]


async def test_cancelled_put_queues_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    outbox = Outbox[int](1)
    outbox.put_nowait(1)

    with trio.move_on_after(1):
        await outbox.put(2)

    assert await outbox.take(5) == [1]
    outbox.put_nowait(3)
    assert await outbox.take(5) == [3]


async def test_close_wakes_a_waiting_taker_and_refuses_puts() -> None:
    outbox = Outbox[int](2)

    async def take() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await outbox.take(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take)
        await trio.testing.wait_all_tasks_blocked()
        outbox.close()

    with pytest.raises(trio.ClosedResourceError):
        outbox.put_nowait(1)
    with pytest.raises(trio.ClosedResourceError):
        await outbox.put(1)


async def test_close_wakes_a_putter_waiting_for_room() -> None:
    outbox = Outbox[int](1)
    outbox.put_nowait(1)

    async def put() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await outbox.put(2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put)
        await trio.testing.wait_all_tasks_blocked()
        outbox.close()


async def test_a_second_waiting_taker_is_refused() -> None:
    outbox = Outbox[int](1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.take, 1)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await outbox.take(1)
        nursery.cancel_scope.cancel()
