"""A cluster of messaging servers as separate processes, joined only by Kafka.

Each test gets fresh topics, three servers owning one slot each and one
standby, all on loopback. Faults are real signals to real processes: SIGKILL
for a crash, SIGSTOP/SIGCONT for a server that was paused and comes back.
"""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import attrs
import pytest
import trio
from cluster_support import Cluster, ServerProcess
from support import token

from msgnet import Client, RequestFailed, open_client
from msgnet._admin import cluster_status
from msgnet._devkafka import DevKafka
from msgnet._routing import partition_for, slot_for_partition

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(240)]

PARTITIONS = 6
SLOTS = 3


def users_of_slot(slot: int, count: int, prefix: str) -> list[str]:
    found: list[str] = []
    n = 0
    while len(found) < count:
        user = f"{prefix}{n}"
        n += 1
        if (
            slot_for_partition(partition_for(user, PARTITIONS), PARTITIONS, SLOTS)
            == slot
        ):
            found.append(user)
    return found


@pytest.fixture
async def cluster(kafka_bootstrap: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    cluster = Cluster(kafka_bootstrap, tmp_path, partitions=PARTITIONS, slots=SLOTS)
    try:
        await cluster.init()
        async with trio.open_nursery() as nursery:
            for slot in range(SLOTS):
                nursery.start_soon(cluster.start, f"s{slot}", slot)
        await cluster.start("standby", -1)
        yield cluster
    finally:
        cluster.close()


def connect(server: ServerProcess, user: str, **options: object):  # type: ignore[no-untyped-def]
    return open_client(
        "127.0.0.1", server.port, user=user, token=token(user), **options
    )


def by_name(cluster: Cluster, name: str) -> ServerProcess:
    return next(server for server in cluster.servers if server.name == name)


async def test_clients_on_different_servers_exchange_direct_and_group_messages(
    cluster: Cluster,
) -> None:
    entry = by_name(cluster, "standby")
    [alice], [bob], [carol] = (users_of_slot(s, 1, "user") for s in range(SLOTS))
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(connect(entry, user))
            for user in (alice, bob, carol)
        ]
        a, b, c = clients
        # Each was redirected to the owner of its slot, three different servers.
        ports = {client.address[1] for client in clients}
        assert ports == {by_name(cluster, f"s{s}").port for s in range(SLOTS)}

        await a.send(bob, "across servers")
        assert (await b.receive()).body == "across servers"
        await b.send(alice, "and back")
        assert (await a.receive()).body == "and back"

        await a.create_group("trio", [bob, carol])
        await c.send_group("trio", "hello from the third server")
        for member in (a, b):
            delivery = await member.receive()
            assert (delivery.group, delivery.sender) == ("trio", carol)

    status = await cluster_status(cluster.bootstrap, cluster_topic=cluster.topics[1])
    owners = {slot: claim["server"] for slot, claim in status["slots"].items()}
    assert owners == {0: "s0", 1: "s1", 2: "s2"}
    assert status["servers"]["standby"]["role"] == "standby"
    assert status["slots"][1]["partitions"] == [1, 4]


@attrs.define
class Tally:
    """What the senders were told and what the recipients' applications saw."""

    acked: set[tuple[str, str]] = attrs.field(factory=set)
    sent: int = 0
    refused: int = 0
    delivered: dict[str, list[tuple[str, str]]] = attrs.field(factory=dict)

    def report(self) -> dict[str, int]:
        seen = [key for keys in self.delivered.values() for key in keys]
        return {
            "sent": self.sent,
            "acknowledged": len(self.acked),
            "delivered": len(set(seen)),
            "lost": len(self.acked - set(seen)),
            "duplicates": len(seen) - len(set(seen)),
            "refused_then_retried": self.refused,
        }


async def stream(
    sender: Client, recipients: list[str], count: int, tally: Tally
) -> None:
    """Send ``count`` messages at a steady pace, retrying refusals with the same id."""
    for n in range(count):
        message_id = f"{sender.user}-{n}"
        recipient = recipients[n % len(recipients)]
        tally.sent += 1
        while True:
            try:
                await sender.send(recipient, f"#{n}", id=message_id)
                break
            except RequestFailed:
                tally.refused += 1
                await trio.sleep(0.2)
        tally.acked.add((sender.user, message_id))
        await trio.sleep(0.01)


async def collect(receiver: Client, tally: Tally) -> None:
    seen = tally.delivered.setdefault(receiver.user, [])
    async for delivery in receiver:
        seen.append((delivery.sender, delivery.id))


async def wait_until_delivered(tally: Tally, timeout: float = 90.0) -> None:
    with trio.fail_after(timeout):
        while tally.report()["lost"]:
            await trio.sleep(0.1)


def history_counts(cluster: Cluster) -> dict[tuple[str, str], int]:
    with sqlite3.connect(cluster.data_dir / "history.sqlite3") as db:
        rows = db.execute(
            "SELECT sender, id, COUNT(*) FROM messages GROUP BY sender, id"
        )
        return {(sender, message_id): count for sender, message_id, count in rows}


async def wait_until_stored(
    cluster: Cluster, tally: Tally, timeout: float = 60.0
) -> None:
    with trio.fail_after(timeout):
        while not tally.acked <= history_counts(cluster).keys():
            await trio.sleep(0.2)
    assert set(history_counts(cluster).values()) == {1}


async def run_fault(cluster: Cluster, fault, count: int = 200) -> Tally:  # type: ignore[no-untyped-def]
    """A steady stream into slot 1's users while ``fault`` strikes its owner."""
    senders = users_of_slot(0, 1, "sender") + users_of_slot(2, 1, "sender")
    recipients = users_of_slot(1, 2, "recipient")
    entry = by_name(cluster, "s0")
    tally = Tally()
    async with AsyncExitStack() as stack:
        receivers = [
            await stack.enter_async_context(
                connect(entry, user, reconnect=True, reconnect_give_up=120.0)
            )
            for user in recipients
        ]
        sending = [
            await stack.enter_async_context(connect(entry, user, reconnect=True))
            for user in senders
        ]
        async with trio.open_nursery() as nursery:
            for receiver in receivers:
                nursery.start_soon(collect, receiver, tally)
            async with trio.open_nursery() as senders_nursery:
                for sender in sending:
                    senders_nursery.start_soon(stream, sender, recipients, count, tally)
                await trio.sleep(1.0)
                await fault()
            await wait_until_delivered(tally)
            nursery.cancel_scope.cancel()
    print("fault run:", tally.report())
    return tally


async def test_sigkill_of_an_owner_mid_stream_loses_and_doubles_nothing(
    cluster: Cluster,
) -> None:
    victim = by_name(cluster, "s1")
    standby = by_name(cluster, "standby")
    killed_at = 0.0

    async def crash() -> None:
        nonlocal killed_at
        killed_at = time.time()
        victim.kill()

    tally = await run_fault(cluster, crash)
    taken_over = await standby.wait_for_log(r"slot acquired server=standby slot=1 ")
    report = tally.report()
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    assert report["acknowledged"] == report["sent"]
    await wait_until_stored(cluster, tally)
    print(f"takeover within {taken_over - killed_at:.1f}s of SIGKILL")


async def test_a_paused_owner_is_replaced_and_fences_itself_when_it_resumes(
    cluster: Cluster,
) -> None:
    victim = by_name(cluster, "s1")
    standby = by_name(cluster, "standby")

    async def pause_past_the_timeout() -> None:
        victim.pause()
        await standby.wait_for_log(r"slot acquired server=standby slot=1 ")
        victim.resume()
        await victim.wait_for_log(r"slot lost; fencing server=s1 slot=1 ")

    tally = await run_fault(cluster, pause_past_the_timeout)
    report = tally.report()
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    await wait_until_stored(cluster, tally)
    # The zombie stopped serving slot 1 at once: it released every partition.
    for partition in (1, 4):
        assert victim.logged(rf"partition released partition={partition} ")


async def test_a_broker_restart_under_load_loses_no_acknowledged_message(
    cluster: Cluster, kafka_broker: DevKafka | None
) -> None:
    if kafka_broker is None:
        pytest.skip("the broker is external (MSGNET_KAFKA_BOOTSTRAP); cannot restart")

    async def restart_broker() -> None:
        restart = functools.partial(kafka_broker.restart, grace_s=10)
        await trio.to_thread.run_sync(restart)

    tally = await run_fault(cluster, restart_broker, count=200)
    report = tally.report()
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    # No standby took over: the owners kept their slots through the outage.
    assert not by_name(cluster, "standby").logged("slot acquired")
