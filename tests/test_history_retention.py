"""Catch-up across records that Kafka's retention deleted: the store, or an error."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from kafka import TopicPartition
from kafka.admin import KafkaAdminClient
from support import (
    client,
    expect_fatal_error_then_close,
    next_message,
    raw_connection,
    running_server,
)

import protocol
from msgnet._admin import init_cluster
from msgnet._routing import partition_for
from msgnet._server import RunningServer
from protocol import ErrorCode

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]

PARTITIONS = 2


async def new_topics(bootstrap: str, inbox: str | None = None) -> tuple[str, str]:
    """A fresh cluster map whose one slot owns every partition of ``inbox``
    (a fresh one too, unless given)."""
    inbox = inbox or f"test-retention-{uuid.uuid4().hex}"
    cluster = f"test-retention-cluster-{uuid.uuid4().hex}"
    await init_cluster(
        bootstrap,
        partitions=PARTITIONS,
        slots=1,
        inbox_topic=inbox,
        cluster_topic=cluster,
    )
    return inbox, cluster


@asynccontextmanager
async def kafka_server(
    bootstrap: str, topics: tuple[str, str] | None = None, **overrides: object
) -> AsyncIterator[tuple[RunningServer, str]]:
    inbox, cluster = topics or await new_topics(bootstrap)
    async with running_server(
        backplane="kafka",
        kafka_bootstrap=bootstrap,
        kafka_topic=inbox,
        cluster_topic=cluster,
        slot=0,
        **overrides,
    ) as server:
        yield server, inbox


async def send_three_to_bob(server: RunningServer) -> list[int]:
    """Bob's offsets of three messages, once his partition's owner is past them.

    An owner still behind the deleted records would skip them in live
    delivery instead, which is not what these tests are about.
    """
    bob_partition = partition_for("bob", PARTITIONS)
    offsets = []
    async with client(server, "alice") as alice:
        for n in range(3):
            ack = await alice.send("bob", f"m{n}")
            offsets += [o for p, o in ack.positions if p == bob_partition]
    owner = server.context.owners[bob_partition]
    with trio.fail_after(30):
        while owner.next_offset <= offsets[-1]:
            await trio.sleep(0.05)
    return offsets


def delete_before(bootstrap: str, topic: str, offset: int) -> None:
    """What retention does: the partition's log now starts at ``offset``."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_records(
            {TopicPartition(topic, partition_for("bob", PARTITIONS)): offset}
        )
    finally:
        admin.close()


async def test_records_deleted_before_history_stored_them_end_catch_up_with_an_error(
    kafka_bootstrap: str,
) -> None:
    # No history writer runs, so the store holds nothing of these records.
    async with kafka_server(kafka_bootstrap, history_writer=False) as (server, inbox):
        first, second, third = await send_three_to_bob(server)
    await trio.to_thread.run_sync(
        functools.partial(delete_before, kafka_bootstrap, inbox, second)
    )

    # A server started after the deletion, as retention deletes records far
    # older than any server keeps in memory: it finds them gone from Kafka.
    # (A cluster map of its own, so it owns the slot without a takeover.)
    topics = await new_topics(kafka_bootstrap, inbox)
    async with kafka_server(kafka_bootstrap, topics, history_writer=False) as (
        server,
        _,
    ):
        async with raw_connection(server) as raw:
            welcome = await raw.hello("bob", device="phone", resume=first)
            assert isinstance(welcome, protocol.Welcome), welcome
            text = await expect_fatal_error_then_close(raw, ErrorCode.UNAVAILABLE)
        assert f"offsets {first}..{second - 1} were deleted" in text
        assert f"resume={second}" in text

        # Resuming where the error says delivers what the log still has.
        async with raw_connection(server) as raw:
            await raw.hello("bob", device="phone", resume=second)
            bodies = []
            for _ in range(2):
                delivery = await next_message(raw)
                assert isinstance(delivery, protocol.Deliver), delivery
                bodies.append((delivery.offset, delivery.body))
        assert bodies == [(second, "m1"), (third, "m2")]


async def test_records_deleted_after_history_stored_them_come_from_the_store(
    kafka_bootstrap: str,
) -> None:
    async with kafka_server(kafka_bootstrap) as (server, inbox):
        first, _, third = await send_three_to_bob(server)
        backplane = server.context.backplane
        partition = partition_for("bob", PARTITIONS)
        with trio.fail_after(30):
            while (
                await backplane.committed("msgnet-history", partition) or 0
            ) <= third:
                await trio.sleep(0.1)
        await trio.to_thread.run_sync(
            functools.partial(delete_before, kafka_bootstrap, inbox, third + 1)
        )

        async with raw_connection(server) as raw:
            await raw.hello("bob", device="phone", resume=first)
            bodies = []
            for _ in range(3):
                delivery = await next_message(raw)
                assert isinstance(delivery, protocol.Deliver), delivery
                bodies.append(delivery.body)
        assert bodies == ["m0", "m1", "m2"]
