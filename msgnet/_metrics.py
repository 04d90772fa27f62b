"""Prometheus metrics of one server, and the HTTP endpoint that exposes them."""

from __future__ import annotations

import logging

import attrs
import h11
import prometheus_client
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ServerMetrics", "serve_metrics"]

logger = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 16 * 1024
REQUEST_TIMEOUT = 10.0


@attrs.define(eq=False)
class ServerMetrics:
    """The metrics of one server, in a registry of its own.

    A registry per server (rather than prometheus_client's global one) lets
    several servers live in one process, as they do in the tests.
    """

    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)
    connections: Gauge = attrs.field(init=False)
    messages_in: Counter = attrs.field(init=False)
    messages_out: Counter = attrs.field(init=False)
    ack_latency: Histogram = attrs.field(init=False)
    partition_lag: Gauge = attrs.field(init=False)
    slow_consumer_disconnects: Counter = attrs.field(init=False)
    errors: Counter = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self.connections = Gauge(
            "msgnet_connections", "Open client connections", registry=registry
        )
        self.messages_in = Counter(
            "msgnet_messages_in",
            "Messages accepted and acknowledged",
            registry=registry,
        )
        self.messages_out = Counter(
            "msgnet_messages_out",
            "Deliveries written to client connections",
            registry=registry,
        )
        self.ack_latency = Histogram(
            "msgnet_ack_latency_seconds",
            "From a send arriving to its acknowledgement (the durable append)",
            buckets=(
                0.0005,
                0.001,
                0.002,
                0.005,
                0.01,
                0.02,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
            ),
            registry=registry,
        )
        self.partition_lag = Gauge(
            "msgnet_partition_lag",
            "Records in an owned partition not yet delivered",
            ["partition"],
            registry=registry,
        )
        self.slow_consumer_disconnects = Counter(
            "msgnet_slow_consumer_disconnects",
            "Connections dropped because they read too slowly",
            registry=registry,
        )
        self.errors = Counter(
            "msgnet_errors", "Error frames sent, by code", ["code"], registry=registry
        )


async def serve_metrics(
    metrics: ServerMetrics,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer ``GET /metrics`` in the Prometheus text format, on trio, with h11."""

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _answer(stream, metrics)
        except (trio.BrokenResourceError, h11.ProtocolError):
            logger.debug("metrics request failed", exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_listeners(handle, listeners, task_status=task_status)


async def _answer(stream: trio.SocketStream, metrics: ServerMetrics) -> None:
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(4096))
            continue
        break

    if isinstance(event, h11.Request) and event.target.split(b"?")[0] == b"/metrics":
        status, body = 200, prometheus_client.generate_latest(metrics.registry)
        content_type = prometheus_client.CONTENT_TYPE_LATEST.encode()
    else:
        status, body, content_type = 404, b"not found: try /metrics\n", b"text/plain"
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await stream.send_all(
        connection.send(h11.Response(status_code=status, headers=headers))
    )
    await stream.send_all(connection.send(h11.Data(data=body)))
    await stream.send_all(connection.send(h11.EndOfMessage()))
