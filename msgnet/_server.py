"""The messaging server: listeners, partition owners, history writers, shutdown."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import trio

import protocol

from ._auth import load_or_create_secret
from ._backplane import Backplane
from ._cluster import ClusterMember
from ._cluster_groups import ClusterGroups
from ._clustermap import SlotClaim
from ._config import ServerConfig
from ._context import OwnerAddress, ServerContext
from ._embedded import open_embedded_backplane
from ._groups import open_group_directory
from ._history import open_history_store
from ._history_store import HistoryStore
from ._history_writer import HISTORY_GROUP, write_history
from ._metrics import ServerMetrics, serve_metrics
from ._partition import PartitionOwner
from ._session import Session
from ._transport import StreamTransport
from ._web import open_web_listeners, serve_web

__all__ = ["RunningServer", "open_backplane", "serve"]

logger = logging.getLogger(__name__)


@attrs.define(eq=False)
class RunningServer:
    """A handle on a started server: where it listens, and how to stop it."""

    host: str
    port: int
    metrics_port: int | None
    context: ServerContext
    ws_port: int | None = None
    """The WebSocket and chat page port, or None when ``ws_enabled`` is off."""
    _shutdown: trio.Event = attrs.field(factory=trio.Event)
    stopped: trio.Event = attrs.field(factory=trio.Event)

    def shutdown(self) -> None:
        """Begin a graceful shutdown; ``serve`` returns once it is complete."""
        self._shutdown.set()


@asynccontextmanager
async def open_backplane(config: ServerConfig) -> AsyncIterator[Backplane]:
    """The configured log: the embedded SQLite one, or Kafka."""
    if config.backplane == "kafka":
        from ._kafka import open_kafka_backplane

        async with open_kafka_backplane(
            config.kafka_bootstrap,
            topic=config.kafka_topic,
            partitions=None,
            linger_ms=config.kafka_linger_ms,
        ) as kafka:
            yield kafka
        return
    directory = None if config.memory else os.path.join(config.data_dir, "log")
    async with open_embedded_backplane(
        directory, partitions=config.partitions
    ) as embedded:
        yield embedded


async def serve(
    config: ServerConfig,
    *,
    partitions: Iterable[int] | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a messaging server until cancelled or shut down.

    On the embedded log the server owns ``partitions`` (default: all of them).
    On Kafka it joins the cluster instead: it owns the partitions of the slot it
    claims (``config.slot``), or stands by to take over a silent server's slot.
    ``task_status`` receives a ``RunningServer`` once the server knows its role
    and accepts connections, so tests can ``await nursery.start(serve, config)``.
    """
    secret = config.secret
    if not secret:
        secret, created = load_or_create_secret(config.data_dir)
        if created:
            logger.info(
                "created a new token secret in %s; mint a client token with: "
                "msgnet token USER --data-dir %s",
                config.data_dir,
                config.data_dir,
            )

    if not config.memory:
        os.makedirs(config.data_dir, exist_ok=True)

    async with AsyncExitStack() as stack:
        backplane = await stack.enter_async_context(open_backplane(config))
        history_path = (
            None if config.memory else os.path.join(config.data_dir, "history.sqlite3")
        )
        history: HistoryStore
        if config.history_store == "postgres":
            from ._history_pg import open_postgres_history_store

            history = await stack.enter_async_context(
                open_postgres_history_store(config.history_dsn)
            )
        else:
            history = await stack.enter_async_context(open_history_store(history_path))
        groups = await stack.enter_async_context(
            open_group_directory(history_path, max_members=config.max_group_members)
        )
        cluster_log = None
        if config.backplane == "kafka":
            from ._kafka import open_kafka_backplane

            cluster_log = await stack.enter_async_context(
                open_kafka_backplane(config.kafka_bootstrap, topic=config.cluster_topic)
            )
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        port = listeners[0].socket.getsockname()[1]
        web_listeners = await open_web_listeners(config)
        ws_port = web_listeners[0].socket.getsockname()[1] if web_listeners else None

        context = ServerContext(
            config=config,
            name=config.name or f"{config.public_host}:{port}",
            secret=secret,
            backplane=backplane,
            history=history,
            history_group=HISTORY_GROUP,
            groups=groups,
            metrics=ServerMetrics(),
        )
        async with trio.open_nursery() as core:
            if cluster_log is None:
                owned = (
                    range(backplane.partitions) if partitions is None else partitions
                )
                await core.start(_serve_partitions, context, sorted(owned), None)
            else:
                await _join_cluster(context, cluster_log, core, port, ws_port)
            running = await _run(context, listeners, web_listeners, core, task_status)
            owners = list(context.owners.values())
            core.cancel_scope.cancel()

        # Only a graceful stop gets here, with the log still open: commit each
        # delivery cursor so a successor resumes exactly where this one stopped.
        for owner in owners:
            await owner.commit()
        running.stopped.set()
        logger.info("stopped server=%s", context.name)


async def _join_cluster(
    context: ServerContext,
    cluster_log: Backplane,
    core: trio.Nursery,
    port: int,
    ws_port: int | None,
) -> None:
    """Take this server's place in the cluster: its slot, or standby."""
    config = context.config
    slots: dict[int, trio.CancelScope] = {}

    async def acquire(slot: int, claim: SlotClaim) -> None:
        partitions = list(member.map.partitions_of(slot))
        slots[slot] = await core.start(
            _serve_partitions, context, partitions, member.holds_lease
        )

    async def release(slot: int, claim: SlotClaim) -> None:
        scope = slots.pop(slot, None)
        if scope is not None:
            scope.cancel()

    member = ClusterMember(
        cluster_log,
        server=config.name or f"{config.public_host}:{port}",
        host=config.public_host,
        port=port,
        ws_port=ws_port,
        slot=None if config.slot < 0 else config.slot,
        heartbeat_interval=config.heartbeat_interval,
        takeover_timeout=config.takeover_timeout,
        on_acquire=acquire,
        on_release=release,
    )

    def owner_address(partition: int) -> OwnerAddress | None:
        owner = member.map.owner_of(partition)
        if owner is None or owner.incarnation == member.incarnation:
            return None
        return owner.host, owner.port, owner.ws_port

    context.owner_address = owner_address
    context.cluster = member
    context.groups = ClusterGroups(member, max_members=config.max_group_members)
    await core.start(member.run)


async def _serve_partitions(
    context: ServerContext,
    partitions: list[int],
    lease: Callable[[], bool] | None,
    *,
    task_status: trio.TaskStatus[trio.CancelScope],
) -> None:
    """Own ``partitions`` until cancelled: one owner task each, plus history.

    Cancelling the returned scope stops delivery at once and drops the devices
    attached to these partitions; they reconnect and are redirected to the new
    owner. Each partition gets a nursery of its own, so one failing partition
    does not take the others down with it.
    """
    owners: list[PartitionOwner] = []
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                for partition in partitions:
                    owner = PartitionOwner(
                        partition,
                        context.backplane,
                        metrics=context.metrics,
                        lease=lease,
                    )
                    await nursery.start(_own_partition, owner)
                    owners.append(owner)
                    if context.history is not None and context.config.history_writer:
                        await nursery.start(
                            write_history, context.backplane, context.history, partition
                        )
                # Published only once all are running: a client is accepted
                # only when its partition is served, so attach() always works.
                for owner in owners:
                    context.owners[owner.partition] = owner
                task_status.started(scope)
    finally:
        for owner in owners:
            if context.owners.get(owner.partition) is owner:
                del context.owners[owner.partition]
            owner.evict_all(
                f"partition {owner.partition} moved to another server; "
                "reconnect to be redirected"
            )


async def _run(
    context: ServerContext,
    listeners: list[trio.SocketListener],
    web_listeners: list[trio.SocketListener],
    core: trio.Nursery,
    task_status: trio.TaskStatus[RunningServer],
) -> RunningServer:
    """Serve metrics and client connections until a graceful shutdown."""
    config = context.config
    metrics_port = None
    if config.metrics_enabled:
        metrics_listeners = await trio.open_tcp_listeners(
            config.metrics_port, host=config.host
        )
        metrics_port = metrics_listeners[0].socket.getsockname()[1]
        await core.start(serve_metrics, context.metrics, metrics_listeners)

    host, port = listeners[0].socket.getsockname()[:2]
    ws_port = web_listeners[0].socket.getsockname()[1] if web_listeners else None
    running = RunningServer(host, port, metrics_port, context, ws_port)
    accepting = trio.CancelScope()

    async def handle(stream: trio.SocketStream) -> None:
        transport = StreamTransport(
            stream, role=protocol.Role.SERVER, max_frame_size=config.max_frame_size
        )
        await Session(context, transport).run()

    async with trio.open_nursery() as connections:

        async def accept(
            *, task_status: trio.TaskStatus[list[trio.SocketListener]]
        ) -> None:
            with accepting:
                async with trio.open_nursery() as web:
                    if web_listeners:
                        await web.start(
                            functools.partial(
                                serve_web,
                                context,
                                web_listeners,
                                handler_nursery=connections,
                            )
                        )
                    await trio.serve_listeners(
                        handle,
                        listeners,
                        handler_nursery=connections,
                        task_status=task_status,
                    )

        await connections.start(accept)
        logger.info(
            "listening server=%s host=%s port=%d ws_port=%s metrics_port=%s "
            "partitions=%s",
            context.name,
            host,
            port,
            ws_port,
            metrics_port,
            sorted(context.owners),
        )
        task_status.started(running)
        await running._shutdown.wait()

        # Graceful shutdown: stop accepting, let each session finish the
        # request in hand and flush its queue, then give up after the grace.
        accepting.cancel()
        for listener in listeners:
            await listener.aclose()
        logger.info(
            "shutting down server=%s sessions=%d", context.name, len(context.sessions)
        )
        for session in list(context.sessions):
            session.stop()
        connections.cancel_scope.deadline = trio.current_time() + config.shutdown_grace

    return running


async def _own_partition(
    owner: PartitionOwner, *, task_status: trio.TaskStatus[None]
) -> None:
    """A dedicated nursery per partition, so each is started and stopped alone."""
    async with trio.open_nursery() as nursery:
        await nursery.start(owner.run)
        task_status.started()
