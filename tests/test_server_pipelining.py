"""A connection's sends are handed to the log without waiting, answered in order."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

import protocol
from msgnet._appends import SEND_WINDOW
from msgnet._backplane import BackplaneUnavailable
from tests.support import (
    WAIT,
    client,
    next_message,
    raw_connection,
    running_server,
)


class HeldLog:
    """Wraps a server's backplane so the test decides when submissions settle."""

    def __init__(self, backplane: Any) -> None:
        self.backplane = backplane
        self.original = backplane.submit
        self.submitted: list[Any] = []
        self.release = trio.Event()
        self.failing: set[bytes] = set()
        """Values of records whose submission is refused when released."""

    def __enter__(self) -> HeldLog:
        self.backplane.submit = self.submit
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.backplane.submit = self.original

    def submit(self, records: Any) -> Any:
        """Records reach the real log only once released and waited for."""
        log = self
        self.submitted.append(records)
        fails = any(
            marker in value for _, _, value in records for marker in self.failing
        )

        class Held:
            def settled(self) -> bool:
                return False

            async def offsets(self) -> list[int]:
                await log.release.wait()
                if fails:
                    raise BackplaneUnavailable("refused by the test")
                offsets: list[int] = await log.original(records).offsets()
                return offsets

        return Held()


async def test_a_burst_of_sends_is_acknowledged_in_order_and_delivered_in_order() -> (
    None
):
    async with running_server() as server, client(server, "bob") as bob:
        async with raw_connection(server) as raw:
            assert isinstance(await raw.hello("alice"), protocol.Welcome)
            sends = [
                protocol.Send(id=f"m{n}", to="bob", body=f"body {n}")
                for n in range(3 * SEND_WINDOW)
            ]
            # One write: the server reads every frame before any is durable.
            await raw.stream.send_all(b"".join(raw.protocol.send(s) for s in sends))

            acks = [await next_message(raw) for _ in sends]

        assert [type(ack) for ack in acks] == [protocol.SendAck] * len(sends)
        assert [ack.id for ack in acks] == [s.id for s in sends]  # type: ignore[union-attr]
        with trio.fail_after(WAIT):
            delivered = [(await bob.receive()).body for _ in sends]
        assert delivered == [s.body for s in sends]


async def test_no_more_than_the_window_of_sends_waits_for_the_log() -> None:
    async with running_server() as server, raw_connection(server) as raw:
        assert isinstance(await raw.hello("alice"), protocol.Welcome)
        with HeldLog(server.context.backplane) as log:
            sends = [
                protocol.Send(id=f"m{n}", to="bob", body="x")
                for n in range(SEND_WINDOW + 5)
            ]
            await raw.stream.send_all(b"".join(raw.protocol.send(s) for s in sends))
            with trio.fail_after(WAIT):
                while len(log.submitted) < SEND_WINDOW:
                    await trio.testing.wait_all_tasks_blocked()
            await trio.testing.wait_all_tasks_blocked()

            # The reader waits for room; the rest stay unread in the socket.
            assert len(log.submitted) == SEND_WINDOW

            log.release.set()
            acks = [await next_message(raw) for _ in sends]

        assert [ack.id for ack in acks] == [s.id for s in sends]  # type: ignore[union-attr]
        assert len(log.submitted) == len(sends)


async def test_a_failed_append_refuses_only_its_own_send() -> None:
    async with running_server() as server, raw_connection(server) as raw:
        assert isinstance(await raw.hello("alice"), protocol.Welcome)
        with HeldLog(server.context.backplane) as log:
            log.failing.add(b"doomed")
            for n, body in enumerate(["fine", "doomed", "fine too"]):
                await raw.send(protocol.Send(id=f"m{n}", to="bob", body=body))
            with trio.fail_after(WAIT):
                while len(log.submitted) < 3:
                    await trio.testing.wait_all_tasks_blocked()
            log.release.set()
            replies = [await next_message(raw) for _ in range(3)]

    assert isinstance(replies[0], protocol.SendAck)
    assert isinstance(replies[1], protocol.Error)
    assert replies[1].code == protocol.ErrorCode.UNAVAILABLE
    assert (replies[1].id, replies[1].fatal) == ("m1", False)
    assert isinstance(replies[2], protocol.SendAck)
    assert replies[2].id == "m2"


async def test_sends_read_before_a_goodbye_still_reach_the_log() -> None:
    async with running_server() as server:
        async with raw_connection(server) as raw:
            assert isinstance(await raw.hello("alice"), protocol.Welcome)
            with HeldLog(server.context.backplane) as log:
                frames = [
                    protocol.Send(id=f"m{n}", to="bob", body=f"b{n}") for n in range(5)
                ]
                frames.append(protocol.Goodbye(reason="done"))
                await raw.stream.send_all(
                    b"".join(raw.protocol.send(f) for f in frames)
                )
                with trio.fail_after(WAIT):
                    while len(log.submitted) < 5:
                        await trio.testing.wait_all_tasks_blocked()
                log.release.set()
                # The server closes only after the log has answered every send.
                with trio.fail_after(WAIT):
                    while (await raw.receive()) is not None:
                        pass

        async with client(server, "bob", resume=0) as bob:
            with trio.fail_after(WAIT):
                bodies = [(await bob.receive()).body for _ in range(5)]
        assert bodies == [f"b{n}" for n in range(5)]
