"""The development broker: a real Kafka that clients can use, and that restarts."""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from msgnet._devkafka import DevKafka

pytestmark = pytest.mark.kafka


def _new_topic(bootstrap: str) -> str:
    name = f"test-devkafka-{uuid.uuid4().hex}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics({name: {"num_partitions": 1, "replication_factor": 1}})
    finally:
        admin.close()
    return name


def _produce(bootstrap: str, topic: str, value: bytes) -> int:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        metadata = producer.send(topic, value=value, partition=0).get(timeout=30)
    finally:
        producer.close()
    offset: int = metadata.offset
    return offset


def _consume(bootstrap: str, topic: str, count: int) -> list[bytes]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        consumer_timeout_ms=30_000,
    )
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek(partition, 0)
        values: list[bytes] = []
        for record in consumer:
            values.append(record.value)
            if len(values) == count:
                break
        return values
    finally:
        consumer.close()


def test_broker_stores_a_record_that_a_consumer_reads_back(
    kafka_bootstrap: str,
) -> None:
    topic = _new_topic(kafka_bootstrap)

    offset = _produce(kafka_bootstrap, topic, b"hello")

    assert offset == 0
    assert _consume(kafka_bootstrap, topic, 1) == [b"hello"]


def test_restarted_broker_keeps_its_records_and_accepts_new_ones(
    kafka_broker: DevKafka | None,
) -> None:
    if kafka_broker is None:
        pytest.skip("MSGNET_KAFKA_BOOTSTRAP names an external broker; cannot restart")
    bootstrap = kafka_broker.bootstrap
    topic = _new_topic(bootstrap)
    _produce(bootstrap, topic, b"before")

    kafka_broker.restart()

    assert kafka_broker.bootstrap == bootstrap
    assert _produce(bootstrap, topic, b"after") == 1
    assert _consume(bootstrap, topic, 2) == [b"before", b"after"]
