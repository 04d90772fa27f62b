"""Session fixtures: a real Apache Kafka broker for the tests marked ``kafka``."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from msgnet._devkafka import DevKafka, KafkaToolsMissing


def pytest_configure(config: pytest.Config) -> None:
    # kafka-python 3.0 loads its protocol schemas with the legacy
    # importlib.resources.read_text, which warns (and, inside it, open_text warns)
    # on Python 3.11. setup.cfg turns warnings into errors; these two are let
    # through so the Kafka tests can import kafka. read_text is matched only when
    # kafka's modules call it, so another library's use still fails.
    config.addinivalue_line(
        "filterwarnings", r"ignore:read_text is deprecated:DeprecationWarning:kafka\."
    )
    config.addinivalue_line(
        "filterwarnings",
        r"ignore:open_text is deprecated:DeprecationWarning:importlib\.resources",
    )


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
