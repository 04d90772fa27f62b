"""Session fixtures: a real Apache Kafka broker for the tests marked ``kafka``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from msgnet._devkafka import DevKafka, KafkaToolsMissing


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[DevKafka | None]:
    """The session's development broker, or None when MSGNET_KAFKA_BOOTSTRAP is set.

    Started once per session on free loopback ports. Without Java or Maven the
    Kafka tests are skipped on a developer's machine, but fail under CI=true,
    where a missing broker must never pass as a green run.
    """
    if os.environ.get("MSGNET_KAFKA_BOOTSTRAP"):
        yield None
        return

    broker = DevKafka()
    try:
        broker.start()
    except KafkaToolsMissing as exc:
        broker.close()
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs a real Kafka broker for this test: {exc}")
        pytest.skip(f"no Kafka broker: {exc} (or set MSGNET_KAFKA_BOOTSTRAP)")
    except BaseException:
        broker.close()
        raise

    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_broker: DevKafka | None) -> str:
    """The ``host:port`` of the broker the Kafka tests use."""
    if kafka_broker is None:
        return os.environ["MSGNET_KAFKA_BOOTSTRAP"]
    return kafka_broker.bootstrap
