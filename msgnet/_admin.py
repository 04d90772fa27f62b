"""Cluster administration: create the topics and layout, and show the map."""

from __future__ import annotations

import time
from typing import Any

import trio

from ._cluster import CLUSTER_PARTITION, read_cluster_map
from ._clustermap import ClusterLayout, encode_entry
from ._kafka import DEFAULT_TOPIC, create_inbox_topic, open_kafka_backplane

__all__ = ["cluster_status", "init_cluster"]


async def init_cluster(
    bootstrap: str,
    *,
    partitions: int,
    slots: int,
    replication_factor: int = 1,
    min_insync_replicas: int = 1,
    inbox_topic: str = DEFAULT_TOPIC,
    cluster_topic: str = "msgnet.cluster",
) -> ClusterLayout:
    """Create the inbox and cluster topics and write the layout, once.

    Running it again with the same numbers changes nothing; with other numbers
    it fails, because moving users between partitions would strand their
    messages.
    """
    if not 1 <= slots <= partitions:
        raise ValueError(
            f"slots must be between 1 and the partition count {partitions}, "
            f"got {slots!r}"
        )
    durability = {"min.insync.replicas": str(min_insync_replicas)}
    await trio.to_thread.run_sync(
        lambda: create_inbox_topic(
            bootstrap,
            inbox_topic,
            partitions=partitions,
            replication_factor=replication_factor,
            configs=durability,
        )
    )
    await trio.to_thread.run_sync(
        lambda: create_inbox_topic(
            bootstrap,
            cluster_topic,
            partitions=1,
            replication_factor=replication_factor,
            configs={"cleanup.policy": "compact", **durability},
        )
    )

    layout = ClusterLayout(partitions=partitions, slots=slots)
    async with open_kafka_backplane(bootstrap, topic=cluster_topic) as log:
        cluster_map, _ = await read_cluster_map(log)
        if cluster_map.layout is None:
            key, value = encode_entry(layout)
            await log.append(CLUSTER_PARTITION, key, value)
            cluster_map, _ = await read_cluster_map(log)
        if cluster_map.layout != layout:
            raise ValueError(
                f"the cluster is already laid out as {cluster_map.layout}, not {layout}"
            )
    return layout


async def cluster_status(
    bootstrap: str, *, cluster_topic: str = "msgnet.cluster"
) -> dict[str, Any]:
    """The cluster map as plain data, with each server's heartbeat age."""
    seen_ms: dict[str, int] = {}
    async with open_kafka_backplane(bootstrap, topic=cluster_topic) as log:
        cluster_map, _ = await read_cluster_map(log, seen_ms=seen_ms)
    status = dict(cluster_map.describe())
    now_ms = int(time.time() * 1000)
    owners = {claim["incarnation"] for claim in status["slots"].values()}
    for name, server in status["servers"].items():
        server["heartbeat_age_s"] = round((now_ms - seen_ms.get(name, 0)) / 1000, 1)
        server["role"] = "owner" if server["incarnation"] in owners else "standby"
    if cluster_map.layout is not None:
        for slot, claim in status["slots"].items():
            claim["partitions"] = list(cluster_map.partitions_of(slot))
    return status
