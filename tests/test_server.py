"""End-to-end behaviour of one server on the embedded log, over real TCP.

Rules for these tests: loopback only, port 0, an in-memory log unless the test
is about durability, and every wait bounded by the suite's timeout.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio
from support import (
    client,
    running_server,
    users_in_different_partitions,
    users_in_same_partition,
)

import protocol
from msgnet import RequestFailed
from msgnet._history_writer import HISTORY_GROUP


async def wait_for_history(server, partitions) -> None:
    """Wait until the history writer has stored everything appended so far."""
    context = server.context
    for partition in partitions:
        end = await context.backplane.end_offset(partition)
        while (await context.backplane.committed(HISTORY_GROUP, partition) or 0) < end:
            await trio.sleep(0.01)


async def test_two_users_exchange_messages() -> None:
    async with running_server() as server:
        async with client(server, "alice") as alice, client(server, "bob") as bob:
            ack = await alice.send("bob", "hi bob", id="m1")
            delivery = await bob.receive()
            await bob.send("alice", "hi alice")
            reply = await alice.receive()

    assert ack.id == "m1"
    assert (delivery.sender, delivery.to, delivery.body) == ("alice", "bob", "hi bob")
    assert (delivery.partition, delivery.offset) in ack.positions
    assert (reply.sender, reply.body) == ("bob", "hi alice")


async def test_every_device_of_a_user_receives_and_the_sender_gets_a_copy() -> None:
    async with (
        running_server() as server,
        client(server, "alice", device="phone") as phone,
        client(server, "alice", device="laptop") as laptop,
        client(server, "bob", device="phone") as bob_phone,
        client(server, "bob", device="laptop") as bob_laptop,
    ):
        await phone.send("bob", "one message, four screens")
        for device in (bob_phone, bob_laptop, laptop):
            assert (await device.receive()).body == "one message, four screens"
        # The sending device itself is not sent its own message back.
        with trio.move_on_after(0.2):
            await phone.receive()
            raise AssertionError("the sending device got its own message")


async def test_offline_user_catches_up_in_order_when_resuming() -> None:
    async with running_server() as server:
        async with client(server, "bob") as bob:
            cursor = bob.cursor
        async with client(server, "alice") as alice:
            for n in range(5):
                await alice.send("bob", f"missed {n}")
        async with client(server, "bob", resume=cursor) as bob:
            bodies = [(await bob.receive()).body for _ in range(5)]
    assert bodies == [f"missed {n}" for n in range(5)]


async def test_without_a_cursor_the_server_resumes_from_the_last_delivery_ack() -> None:
    async with running_server() as server:
        async with client(server, "alice") as alice, client(server, "bob") as bob:
            await alice.send("bob", "read before leaving")
            await bob.receive()
            await bob.ack()
            # The server handles a connection's frames in order: the pong
            # proves the ack was stored.
            await bob.ping()
            await alice.send("bob", "sent while away")
        async with client(server, "bob") as bob:
            delivery = await bob.receive()
    assert delivery.body == "sent while away"


async def test_group_message_reaches_members_on_any_partition_once_per_partition() -> (
    None
):
    async with running_server(partitions=4) as server:
        users = users_in_different_partitions(3, 4) + users_in_same_partition(
            2, 4, prefix="same"
        )
        sender, *others = users
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(client(server, sender, device="a"))
            second = await stack.enter_async_context(client(server, sender, device="b"))
            members = [
                await stack.enter_async_context(client(server, user)) for user in others
            ]
            await first.create_group("team", others)
            ack = await first.send_group("team", "hello team")
            for member in [second, *members]:
                delivery = await member.receive()
                assert (delivery.group, delivery.body) == ("team", "hello team")

    partitions = {server.context.partition_for(user) for user in users}
    assert sorted(p for p, _ in ack.positions) == sorted(partitions)


async def test_history_pages_through_a_conversation_from_either_side() -> None:
    async with running_server() as server:
        async with client(server, "alice") as alice, client(server, "bob") as bob:
            for n in range(25):
                await alice.send("bob", f"message {n}")
            await wait_for_history(server, range(4))

            seen: list[str] = []
            before = None
            while True:
                page = await bob.history(peer="alice", before=before, limit=10)
                seen[:0] = [entry.body for entry in page.messages]
                if page.next is None:
                    break
                before = page.next
            alice_view = await alice.history(peer="bob", limit=200)

    assert seen == [f"message {n}" for n in range(25)]
    assert [entry.body for entry in alice_view.messages] == seen


async def test_catch_up_joins_the_store_and_the_log_without_gap_or_overlap() -> None:
    """Below the history group's offset catch-up reads the store, above it the log.

    The store's copies are marked so the test can see which source each
    delivery came from.
    """
    async with running_server() as server:
        context = server.context
        async with client(server, "bob") as bob:
            cursor = bob.cursor
            partition = bob.welcome.partition
        async with client(server, "alice") as alice:
            for n in range(6):
                await alice.send("bob", f"m{n}")
        await wait_for_history(server, range(4))

        # Pretend the history writer only got half way.
        records = await context.backplane.read(partition, cursor)
        bob_records = [r for r in records if b"bob" in r.value]
        halfway = bob_records[3].offset
        await context.backplane.commit(HISTORY_GROUP, partition, halfway)

        async with client(server, "bob", resume=cursor) as bob:
            bodies = [(await bob.receive()).body for _ in range(6)]
            assert bob.cursor == bob_records[-1].offset + 1
    assert bodies == [f"m{n}" for n in range(6)]


async def test_non_members_cannot_read_or_post_to_a_group() -> None:
    async with (
        running_server() as server,
        client(server, "alice") as alice,
        client(server, "mallory") as mallory,
    ):
        await alice.create_group("private", ["bob"])
        for attempt in (
            mallory.send_group("private", "let me in"),
            mallory.history(group="private"),
            mallory.group_members("private"),
        ):
            try:
                await attempt
            except RequestFailed as exc:
                assert exc.code == protocol.ErrorCode.FORBIDDEN
            else:
                raise AssertionError("a non-member was served")
