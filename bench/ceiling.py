"""The ceilings of msgnet's own stack: raw kafka-python, and the raw embedded log.

Run from the repository root::

    python -m bench.ceiling kafka --kafka-bootstrap 127.0.0.1:9092 --records 200000
    python -m bench.ceiling embedded --records 200000

``bench.load`` runs the matching ceiling after its load, with the same number
and size of records in the same partitions, and reports msgnet as a ratio of it.
"""

from __future__ import annotations

import argparse
import json
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

import trio
from kafka import KafkaConsumer, TopicPartition

from msgnet._config import ServerConfig
from msgnet._embedded import open_embedded_backplane
from msgnet._kafka import create_inbox_topic
from msgnet._kafka_producer import new_producer
from msgnet._records import InboxRecord
from msgnet._routing import partition_for

KAFKA_LINGER_MS: int = ServerConfig().kafka_linger_ms
"""The server's producer linger, so the raw pipeline batches as msgnet does."""

__all__ = ["embedded_pipeline", "kafka_pipeline", "main", "sample_records"]

Record = tuple[int, bytes, bytes]
"""(partition, key, value) as the server appends it."""


def sample_records(
    users: Sequence[str], *, partitions: int, size: int, group_size: int
) -> list[Record]:
    """The appends msgnet makes for one message from each of ``users``.

    One-to-one: the recipient's partition, and the sender's when it differs.
    Groups: one copy per partition holding members. Values are real inbox
    records with a body of ``size`` characters.
    """
    records: list[Record] = []
    for i, sender in enumerate(users):
        if group_size:
            first = i - i % group_size
            members = list(users[first : first + group_size])
        else:
            members = [users[(i + 1) % len(users)], sender]
        by_partition: dict[int, list[str]] = {}
        for member in members:
            by_partition.setdefault(partition_for(member, partitions), []).append(
                member
            )
        for partition, recipients in by_partition.items():
            record = InboxRecord(
                id=f"{i}.{secrets.token_hex(4)}",
                sender=sender,
                to=None if group_size else members[0],
                group=f"g{i // group_size}" if group_size else None,
                body="x" * size,
                ts=int(time.time() * 1000),
                recipients=tuple(recipients),
                origin=f"127.0.0.1:7400/{i}/{secrets.token_hex(4)}",
            )
            records.append((partition, recipients[0].encode(), record.encode()))
    return records


def _figures(
    count: int, records: Sequence[Record], produced: float, consumed: float
) -> dict[str, Any]:
    return {
        "records": count,
        "record_bytes": sum(len(v) for _, _, v in records) / len(records),
        "append_per_s": count / produced,
        "pipeline_per_s": count / consumed,
        "append_seconds": produced,
        "pipeline_seconds": consumed,
    }


def kafka_pipeline(
    bootstrap: str,
    records: Sequence[Record],
    *,
    count: int,
    partitions: int,
    rate: float | None = None,
    linger_ms: int = KAFKA_LINGER_MS,
) -> dict[str, Any]:
    """Produce ``count`` records (cycling ``records``) and consume them all, raw.

    The producer is made as msgnet's Kafka backplane makes its own (idempotent,
    acks=all, ``linger_ms``, 64 KiB batches); one consumer reads every partition
    while the producer runs. Blocking.

    Without ``rate`` the records are sent as fast as ``send`` takes them,
    which fills big batches: the most the pipeline can carry. With it, they
    are sent at ``rate`` a second, as a server's clients would hand them over,
    and the figures say what CPU the pipeline alone needs for that
    (``cpu_percent``, 100 = one core, and ``cpu_us_per_record``).
    """
    topic = f"msgnet.bench.ceiling.{secrets.token_hex(4)}"
    create_inbox_topic(bootstrap, topic, partitions=partitions)
    producer = new_producer(
        bootstrap,
        linger_ms=linger_ms,
        delivery_timeout_ms=30_000,
        request_timeout_ms=30_000 - linger_ms - 1,
    )
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    consumer.poll(timeout_ms=100)
    consumed_at: list[float] = []

    def consume() -> None:
        seen = 0
        deadline = time.monotonic() + 300
        while seen < count and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=100, max_records=5000).values():
                seen += len(batch)
        consumed_at.append(time.monotonic())

    reader = threading.Thread(target=consume, daemon=True)
    try:
        cpu_started = time.process_time()
        started = time.monotonic()
        reader.start()
        for i in range(count):
            if rate is not None:
                wait = started + i / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            partition, key, value = records[i % len(records)]
            producer.send(topic, key=key, value=value, partition=partition)
        producer.flush()
        produced = time.monotonic() - started
        reader.join()
        consumed = consumed_at[0] - started
        cpu = time.process_time() - cpu_started
    finally:
        producer.close()
        consumer.close()
    figures = _figures(count, records, produced, consumed)
    figures["cpu_percent"] = 100 * cpu / consumed
    figures["cpu_us_per_record"] = 1e6 * cpu / count
    return figures


async def _embedded(
    directory: str | None,
    records: Sequence[Record],
    *,
    count: int,
    partitions: int,
    appenders: int,
) -> dict[str, Any]:
    async with open_embedded_backplane(directory, partitions=partitions) as backplane:
        started = time.monotonic()
        produced = consumed = 0.0
        read = 0

        async def append(first: int) -> None:
            for i in range(first, count, appenders):
                partition, key, value = records[i % len(records)]
                await backplane.append(partition, key, value)

        async def follow(partition: int) -> None:
            nonlocal read, consumed
            offset = 0
            while True:
                batch = await backplane.read(partition, offset, max_records=1000)
                offset = batch[-1].offset + 1
                read += len(batch)
                if read >= count:
                    consumed = time.monotonic() - started

        async with trio.open_nursery() as readers:
            for partition in range(partitions):
                readers.start_soon(follow, partition)
            async with trio.open_nursery() as writers:
                for first in range(appenders):
                    writers.start_soon(append, first)
            produced = time.monotonic() - started
            with trio.move_on_after(60):
                while read < count:
                    await trio.sleep(0.005)
            readers.cancel_scope.cancel()
    return _figures(count, records, produced, consumed or time.monotonic() - started)


def embedded_pipeline(
    directory: str | None,
    records: Sequence[Record],
    *,
    count: int,
    partitions: int,
    appenders: int = 1000,
) -> dict[str, Any]:
    """Append ``count`` records with ``appenders`` concurrent appenders, read them."""
    return trio.run(
        lambda: _embedded(
            directory, records, count=count, partitions=partitions, appenders=appenders
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backplane", choices=("kafka", "embedded"))
    parser.add_argument("--kafka-bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--size", type=int, default=100, help="body characters")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=0)
    parser.add_argument("--data-dir", help="embedded: log directory (default: memory)")
    parser.add_argument(
        "--rate", type=float, help="kafka: records/s to send at (default: all at once)"
    )
    parser.add_argument("--linger-ms", type=int, default=KAFKA_LINGER_MS)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)

    users = [f"ceiling{i}" for i in range(args.users)]
    records = sample_records(
        users, partitions=args.partitions, size=args.size, group_size=args.group_size
    )
    if args.backplane == "kafka":
        figures = kafka_pipeline(
            args.kafka_bootstrap,
            records,
            count=args.records,
            partitions=args.partitions,
            rate=args.rate,
            linger_ms=args.linger_ms,
        )
    else:
        figures = embedded_pipeline(
            args.data_dir, records, count=args.records, partitions=args.partitions
        )
    print(
        f"{args.backplane} ceiling: {figures['records']:,} records of "
        f"{figures['record_bytes']:.0f} B: appended {figures['append_per_s']:,.0f}/s, "
        f"appended and read back {figures['pipeline_per_s']:,.0f}/s"
    )
    if "cpu_percent" in figures:
        print(
            f"kafka-python's CPU: {figures['cpu_percent']:.1f}% of a core, "
            f"{figures['cpu_us_per_record']:.0f} us per record"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()
