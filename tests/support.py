"""Helpers shared by the server tests: a server on port 0 and clients for it."""

from __future__ import annotations

import ctypes
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

import protocol
from msgnet import Client, RunningServer, ServerConfig, mint_token, open_client, serve
from msgnet._routing import partition_for
from protocol import ErrorCode

SECRET = "test-secret-" + "x" * 40


def server_config(**overrides: Any) -> ServerConfig:
    """An in-memory server on free loopback ports, with a fixed secret."""
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "ws_port": 0,
        "memory": True,
        "secret": SECRET,
        "partitions": 4,
        "data_dir": "/nonexistent-msgnet-test-dir",
    }
    settings.update(overrides)
    return ServerConfig(**settings)


@asynccontextmanager
async def running_server(**overrides: Any) -> AsyncIterator[RunningServer]:
    async with trio.open_nursery() as nursery:
        server: RunningServer = await nursery.start(serve, server_config(**overrides))
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


def token(user: str, secret: str = SECRET) -> str:
    return mint_token(secret, user)


@asynccontextmanager
async def client(
    server: RunningServer, user: str, **options: Any
) -> AsyncIterator[Client]:
    options.setdefault("token", token(user))
    async with open_client(server.host, server.port, user=user, **options) as c:
        yield c


def users_in_same_partition(
    count: int, partitions: int, prefix: str = "u"
) -> list[str]:
    """``count`` user ids that all hash to one partition."""
    by_partition: dict[int, list[str]] = {}
    n = 0
    while True:
        user = f"{prefix}{n}"
        n += 1
        found = by_partition.setdefault(partition_for(user, partitions), [])
        found.append(user)
        if len(found) == count:
            return found


def users_in_different_partitions(count: int, partitions: int) -> list[str]:
    chosen: dict[int, str] = {}
    n = 0
    while len(chosen) < count:
        user = f"p{n}"
        n += 1
        chosen.setdefault(partition_for(user, partitions), user)
    return list(chosen.values())


class RawConnection:
    """A bare TCP client speaking frames by hand, for bad-input tests."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.protocol = protocol.Connection(protocol.Role.CLIENT)

    @classmethod
    async def open(cls, server: RunningServer) -> RawConnection:
        return cls(await trio.open_tcp_stream(server.host, server.port))

    async def hello(self, user: str, **fields: Any) -> protocol.Message | None:
        fields.setdefault("token", token(user))
        fields.setdefault("version", protocol.PROTOCOL_VERSION)
        await self.send(protocol.Hello(user=user, **fields))
        return await self.receive()

    async def send(self, message: protocol.Message) -> None:
        await self.stream.send_all(self.protocol.send(message))

    async def receive(self) -> protocol.Message | None:
        """The next message, or None when the server closed the connection."""
        while True:
            event = self.protocol.next_message()
            if event is protocol.NEED_DATA:
                data = await self.stream.receive_some(65536)
                self.protocol.receive_data(data)
                continue
            if event is protocol.CLOSED:
                return None
            assert isinstance(event, protocol.Message.__args__)  # type: ignore[attr-defined]
            return event

    async def receive_raw_until_closed(self) -> bytes:
        data = b""
        while chunk := await self.stream.receive_some(65536):
            data += chunk
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


WAIT = 5.0
"""Upper bound on any wait for the server; a hit means the test failed."""


@asynccontextmanager
async def raw_connection(server: RunningServer) -> AsyncIterator[RawConnection]:
    raw = await RawConnection.open(server)
    try:
        yield raw
    finally:
        await raw.aclose()


async def next_message(raw: RawConnection) -> protocol.Message | None:
    with trio.fail_after(WAIT):
        return await raw.receive()


async def expect_fatal_error_then_close(raw: RawConnection, code: ErrorCode) -> str:
    """The next frame is a fatal Error with ``code``, then the server closes."""
    error = await next_message(raw)
    assert isinstance(error, protocol.Error), error
    assert (error.code, error.fatal) == (code, True), error
    assert await next_message(raw) is None
    return error.text


async def assert_server_still_serves(server: RunningServer) -> None:
    async with client(server, "after-a") as sender, client(server, "after-b") as peer:
        await sender.send("after-b", "still here")
        with trio.fail_after(WAIT):
            assert (await peer.receive()).body == "still here"


def die_with_parent() -> None:
    """``preexec_fn`` for server subprocesses: SIGKILL them when pytest dies.

    A test run killed by its timeout never reaches its fixtures' cleanup;
    without this its servers would live on and load the machine. (Linux's
    PR_SET_PDEATHSIG; the spawning thread must outlive the child, which holds
    for processes started from the test's trio thread.)
    """
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


PR_SET_PDEATHSIG = 1
# Looked up in the parent: the child, between fork and exec, only calls it.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
