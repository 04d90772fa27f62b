"""The messaging server: listeners, partition owners, history writers, shutdown."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import trio

import protocol

from ._auth import load_or_create_secret
from ._backplane import Backplane
from ._config import ServerConfig
from ._context import ServerContext
from ._embedded import open_embedded_backplane
from ._groups import open_group_directory
from ._history import open_history_store
from ._history_writer import HISTORY_GROUP, write_history
from ._kafka import open_kafka_backplane
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
        async with open_kafka_backplane(
            config.kafka_bootstrap, topic=config.kafka_topic, partitions=None
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

    ``partitions`` limits the inbox partitions this server owns (default: all
    of them, as a single embedded server does). ``task_status`` receives a
    ``RunningServer`` once every owned partition is served and the listener is
    accepting, so tests can ``await nursery.start(serve, config)`` on port 0.
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

    async with AsyncExitStack() as stack:
        backplane = await stack.enter_async_context(open_backplane(config))
        history_path = (
            None if config.memory else os.path.join(config.data_dir, "history.sqlite3")
        )
        history = await stack.enter_async_context(open_history_store(history_path))
        groups = await stack.enter_async_context(
            open_group_directory(history_path, max_members=config.max_group_members)
        )
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
        port = listeners[0].socket.getsockname()[1]
        web_listeners = await open_web_listeners(config)

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
        owned = range(backplane.partitions) if partitions is None else partitions
        await _run(context, listeners, web_listeners, sorted(owned), task_status)


async def _run(
    context: ServerContext,
    listeners: list[trio.SocketListener],
    web_listeners: list[trio.SocketListener],
    owned: list[int],
    task_status: trio.TaskStatus[RunningServer],
) -> None:
    config = context.config
    async with trio.open_nursery() as core:
        # Partitions first: a client is accepted only once its partition is
        # served, so attach() always finds a running owner.
        for partition in owned:
            owner = PartitionOwner(
                partition, context.backplane, metrics=context.metrics
            )
            await core.start(_own_partition, owner)
            context.owners[partition] = owner
            if context.history is not None:
                await core.start(
                    write_history, context.backplane, context.history, partition
                )

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
                *,
                task_status: trio.TaskStatus[list[trio.SocketListener]],
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
                "partitions=%d",
                context.name,
                host,
                port,
                ws_port,
                metrics_port,
                len(owned),
            )
            task_status.started(running)
            await running._shutdown.wait()

            # Graceful shutdown: stop accepting, let each session finish the
            # request in hand and flush its queue, then give up after the grace.
            accepting.cancel()
            for listener in listeners:
                await listener.aclose()
            logger.info(
                "shutting down server=%s sessions=%d",
                context.name,
                len(context.sessions),
            )
            for session in list(context.sessions):
                session.stop()
            connections.cancel_scope.deadline = (
                trio.current_time() + config.shutdown_grace
            )

        core.cancel_scope.cancel()

    # Only a graceful stop gets here; the log is still open, so the cursors of
    # what was delivered are committed and a successor resumes right there.
    for owner in context.owners.values():
        await owner.commit()
    running.stopped.set()
    logger.info("stopped server=%s", context.name)


async def _own_partition(
    owner: PartitionOwner, *, task_status: trio.TaskStatus[None]
) -> None:
    """A dedicated nursery per partition, so each is started and stopped alone."""
    async with trio.open_nursery() as nursery:
        await nursery.start(owner.run)
        task_status.started()
