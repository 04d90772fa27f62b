"""The Kafka backplane sends a group's commits made together in one request."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from kafka.errors import KafkaTimeoutError

from msgnet._backplane import BackplaneUnavailable
from msgnet._kafka import KafkaBackplane, create_inbox_topic, open_kafka_backplane

pytestmark = pytest.mark.kafka

PARTITIONS = 4


@pytest.fixture
async def backplane(kafka_bootstrap: str) -> AsyncIterator[KafkaBackplane]:
    topic = f"test-commits-{uuid.uuid4().hex}"
    await trio.to_thread.run_sync(
        functools.partial(
            create_inbox_topic, kafka_bootstrap, topic, partitions=PARTITIONS
        )
    )
    async with open_kafka_backplane(
        kafka_bootstrap, topic=topic, partitions=PARTITIONS
    ) as opened:
        yield opened


async def _requests(backplane: KafkaBackplane, group: str) -> list[dict[int, int]]:
    """Record every commit request the group's client sends from now on.

    The group's consumer is made by its first commit, so one is made here.
    """
    await backplane.commit(group, 0, 0)
    consumer = backplane._groups[group].consumer
    requests: list[dict[int, int]] = []
    send = consumer.commit

    def recording(offsets: dict[Any, Any], **options: Any) -> None:
        requests.append({tp.partition: meta.offset for tp, meta in offsets.items()})
        send(offsets, **options)

    consumer.commit = recording
    return requests


async def _commit_all(backplane: KafkaBackplane, group: str, base: int) -> None:
    async with trio.open_nursery() as nursery:
        for partition in range(PARTITIONS):
            nursery.start_soon(backplane.commit, group, partition, base + partition)


async def test_commits_made_together_are_one_request(
    backplane: KafkaBackplane,
) -> None:
    requests = await _requests(backplane, "delivery")

    await _commit_all(backplane, "delivery", 10)

    assert requests == [{0: 10, 1: 11, 2: 12, 3: 13}]
    for partition in range(PARTITIONS):
        assert await backplane.committed("delivery", partition) == 10 + partition


async def test_commits_made_one_after_another_are_a_request_each(
    backplane: KafkaBackplane,
) -> None:
    requests = await _requests(backplane, "delivery")

    await backplane.commit("delivery", 1, 5)
    await backplane.commit("delivery", 1, 6)

    assert requests == [{1: 5}, {1: 6}]


async def test_a_failed_request_fails_every_commit_in_it_and_not_the_next(
    backplane: KafkaBackplane,
) -> None:
    await backplane.commit("delivery", 0, 0)
    consumer = backplane._groups["delivery"].consumer
    send = consumer.commit

    def failing(offsets: dict[Any, Any], **options: Any) -> None:
        raise KafkaTimeoutError("the broker did not answer")

    consumer.commit = failing
    failures: list[BackplaneUnavailable] = []

    async def commit(partition: int) -> None:
        try:
            await backplane.commit("delivery", partition, 20)
        except BackplaneUnavailable as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for partition in range(PARTITIONS):
            nursery.start_soon(commit, partition)

    assert len(failures) == PARTITIONS
    assert all("did not answer" in str(exc) for exc in failures)

    consumer.commit = send
    await backplane.commit("delivery", 2, 30)
    assert await backplane.committed("delivery", 2) == 30
