"""The inbox topic in Kafka: creating it, and checking its partition count."""

from __future__ import annotations

import logging
from typing import Any

from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError, TopicAlreadyExistsError

from ._backplane import BackplaneUnavailable
from ._config import DEFAULT_INBOX_TOPIC

__all__ = ["check_topic", "create_inbox_topic"]

logger = logging.getLogger(__name__)

_UNKNOWN_TOPIC_OR_PARTITION = 3
"""Kafka's error code for a topic that does not exist."""


def _describe_partitions(admin: Any, name: str) -> int | None:
    """The topic's partition count, or None if it does not exist (blocking)."""
    (topic,) = admin.describe_topics([name])
    if topic["error_code"] == _UNKNOWN_TOPIC_OR_PARTITION:
        return None
    if topic["error_code"] != 0:
        raise BackplaneUnavailable(
            f"Kafka could not describe topic {name!r}: error code {topic['error_code']}"
        )
    return len(topic["partitions"])


def _check_partition_count(name: str, found: int | None, expected: int) -> None:
    if found is None:
        raise ValueError(
            f"Kafka topic {name!r} does not exist; create it with {expected} "
            "partitions (create_inbox_topic) before opening the backplane"
        )
    if found != expected:
        raise ValueError(
            f"Kafka topic {name!r} has {found} partitions, not the {expected} "
            "configured; users would be routed to the wrong partitions"
        )


def create_inbox_topic(
    bootstrap: str,
    name: str = DEFAULT_INBOX_TOPIC,
    *,
    partitions: int,
    replication_factor: int = 1,
    configs: dict[str, str] | None = None,
) -> bool:
    """Create the inbox topic, or check the one that exists (blocking).

    ``configs`` adds topic settings, such as ``min.insync.replicas`` or the
    ``cleanup.policy=compact`` of the cluster topic. Returns True if the topic
    was created, False if it already existed with ``partitions`` partitions.
    Raises ``ValueError`` if it exists with another count, and
    ``BackplaneUnavailable`` if Kafka cannot be reached.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, not {partitions!r}")
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    except KafkaError as exc:
        raise BackplaneUnavailable(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    try:
        existing = _describe_partitions(admin, name)
        if existing is None:
            try:
                admin.create_topics(
                    {
                        name: {
                            "num_partitions": partitions,
                            "replication_factor": replication_factor,
                            # A record's timestamp is when the broker appended it,
                            # as LogRecord.timestamp_ms promises, not a client's
                            # clock.
                            "configs": {
                                "message.timestamp.type": "LogAppendTime",
                                **(configs or {}),
                            },
                        }
                    },
                    wait_for_metadata=True,
                )
                logger.info(
                    "created Kafka topic %s with %d partitions", name, partitions
                )
                return True
            except TopicAlreadyExistsError:
                # Another server created it between the describe and the create.
                existing = _describe_partitions(admin, name)
        _check_partition_count(name, existing, partitions)
        return False
    except KafkaError as exc:
        raise BackplaneUnavailable(
            f"Kafka at {bootstrap} failed to create topic {name!r}: {exc}"
        ) from exc
    finally:
        admin.close()


def check_topic(admin: Any, topic: str, partitions: int | None) -> int:
    """Return the topic's partition count, checked against ``partitions`` if
    given (blocking).

    Raises ``ValueError`` if the topic is missing or has another count.
    """
    found = _describe_partitions(admin, topic)
    if partitions is None and found is None:
        raise ValueError(
            f"Kafka topic {topic!r} does not exist; create it (create_inbox_topic) "
            "before opening the backplane"
        )
    expected = partitions if partitions is not None else found
    assert expected is not None
    _check_partition_count(topic, found, expected)
    return expected
