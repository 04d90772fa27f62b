"""Durability and operations: restarts, crashes, graceful shutdown, metrics.

The crash and signal tests run ``python -m msgnet serve`` as a real process on
port 0 and learn its ports from the "listening" log line; the others run the
server in this process on a temporary data directory.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.testing
from support import SECRET, RawConnection, client, running_server, server_config, token

import protocol
from msgnet import Client, ConnectionLost, RunningServer, open_client, serve

WAIT = 5.0
"""Upper bound on any wait for a server; a hit means the test failed."""
STARTUP = 20.0
"""Upper bound on a server process starting (the interpreter and its imports)."""

REPO = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening .*\bport=(\d+)\b.* metrics_port=(\S+)")


# --- a server in this process ------------------------------------------------------


@asynccontextmanager
async def durable_server(data_dir: Path) -> AsyncIterator[RunningServer]:
    """A server on ``data_dir`` that is stopped gracefully when the block ends."""
    config = server_config(memory=False, data_dir=str(data_dir))
    async with trio.open_nursery() as nursery:
        server: RunningServer = await nursery.start(serve, config)
        try:
            yield server
        except BaseException:
            nursery.cancel_scope.cancel()
            raise
        server.shutdown()
        with trio.fail_after(WAIT):
            await server.stopped.wait()


async def test_messages_acknowledged_before_a_restart_are_delivered_after_it(
    tmp_path: Path,
) -> None:
    async with durable_server(tmp_path) as server:
        async with client(server, "bob") as bob:
            cursor = bob.cursor
        async with client(server, "alice") as alice:
            acked = [(await alice.send("bob", f"m{n}")).id for n in range(10)]

    async with durable_server(tmp_path) as server:
        async with client(server, "bob", resume=cursor) as bob:
            with trio.fail_after(WAIT):
                delivered = [(await bob.receive()).id for _ in acked]
    assert delivered == acked


async def test_shutdown_finishes_the_send_in_hand_then_says_goodbye(
    tmp_path: Path,
) -> None:
    """The send's append is held open until the shutdown has begun."""
    async with durable_server(tmp_path) as server:
        async with client(server, "bob") as bob:
            cursor = bob.cursor

        backplane: Any = server.context.backplane
        original = backplane.submit
        entered, release = trio.Event(), trio.Event()

        class Held:
            """The log's answer to the send, withheld until ``release``."""

            def __init__(self, appending: Any) -> None:
                self.appending = appending

            def settled(self) -> bool:
                return release.is_set() and bool(self.appending.settled())

            async def offsets(self) -> list[int]:
                entered.set()
                await release.wait()
                offsets: list[int] = await self.appending.offsets()
                return offsets

        backplane.submit = lambda records: Held(original(records))
        raw = RawConnection(await trio.open_tcp_stream(server.host, server.port))
        async with raw.stream:
            assert isinstance(await raw.hello("alice"), protocol.Welcome)
            await raw.send(protocol.Send(id="in-flight", to="bob", body="made it"))
            with trio.fail_after(WAIT):
                await entered.wait()
                server.shutdown()
                # Everything else is now waiting: the shutdown has stopped
                # reading and waits for this request.
                await trio.testing.wait_all_tasks_blocked()
                release.set()
                replies = [await raw.receive() for _ in range(3)]
        backplane.submit = original

    assert isinstance(replies[0], protocol.SendAck)
    assert replies[0].id == "in-flight"
    assert isinstance(replies[1], protocol.Goodbye)
    assert replies[2] is None

    async with durable_server(tmp_path) as server:
        async with client(server, "bob", resume=cursor) as bob:
            with trio.fail_after(WAIT):
                assert (await bob.receive()).body == "made it"


# --- a server process ------------------------------------------------------------


class ServerProcess:
    """``python -m msgnet serve`` as a child process, with its log collected."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.port = 0
        self.metrics_port: int | None = None
        self.log: list[str] = []
        self.listening = trio.Event()

    async def read_log(self) -> None:
        assert self.process.stderr is not None
        pending = b""
        async for chunk in self.process.stderr:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                self.log.append(text)
                found = LISTENING.search(text)
                if found and not self.listening.is_set():
                    self.port = int(found[1])
                    metrics = found[2]
                    self.metrics_port = None if metrics == "None" else int(metrics)
                    self.listening.set()

    def logged(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in self.log)


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without MSGNET_ settings, plus ``extra``."""
    env = {
        key: value for key, value in os.environ.items() if not key.startswith("MSGNET_")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), env.get("PYTHONPATH")])
    )
    env.update(extra or {})
    return env


@asynccontextmanager
async def server_process(
    data_dir: Path, *flags: str, env: Mapping[str, str] | None = None
) -> AsyncIterator[ServerProcess]:
    """Start a server process and wait for its "listening" line; kill it at the end."""
    command = [sys.executable, "-m", "msgnet", "serve", "--data-dir", str(data_dir)]
    command += ["--port", "0", "--metrics-port", "0", "--ws-port", "0"]
    command += ["--partitions", "4", "--secret", SECRET, *flags]
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=child_environment(env),
        cwd=str(REPO),
    )
    server = ServerProcess(process)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.read_log)
        try:
            with trio.fail_after(STARTUP):
                await server.listening.wait()
            yield server
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


@asynccontextmanager
async def client_of(
    server: ServerProcess, user: str, **options: Any
) -> AsyncIterator[Client]:
    options.setdefault("token", token(user))
    async with open_client("127.0.0.1", server.port, user=user, **options) as c:
        yield c


async def test_every_acknowledged_message_survives_a_sigkill(tmp_path: Path) -> None:
    acked: list[str] = []
    async with server_process(tmp_path) as server:
        async with client_of(server, "bob") as bob:
            cursor = bob.cursor

        # Alice keeps sending while the process is killed under her.
        twenty_acked = trio.Event()

        async def keep_sending() -> None:
            try:
                async with client_of(server, "alice") as alice:
                    for n in range(10_000):
                        acked.append((await alice.send("bob", f"m{n}", id=f"m{n}")).id)
                        if len(acked) == 20:
                            twenty_acked.set()
            except ConnectionLost:
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_sending)
            with trio.fail_after(WAIT):
                await twenty_acked.wait()
            server.process.send_signal(signal.SIGKILL)
            with trio.fail_after(WAIT):
                await server.process.wait()
        assert server.process.returncode == -signal.SIGKILL

    async with server_process(tmp_path) as server:
        async with client_of(server, "bob", resume=cursor) as bob:
            delivered: set[str] = set()
            with trio.fail_after(WAIT):
                while not delivered >= set(acked):
                    delivered.add((await bob.receive()).id)
    assert len(acked) >= 20


async def test_sigterm_says_goodbye_exits_zero_and_commits_the_delivery_cursor(
    tmp_path: Path,
) -> None:
    async with server_process(tmp_path) as server:
        async with client_of(server, "alice") as alice:
            raw = RawConnection(await trio.open_tcp_stream("127.0.0.1", server.port))
            async with raw.stream:
                assert isinstance(await raw.hello("bob"), protocol.Welcome)
                for n in range(3):
                    await alice.send("bob", f"before {n}")
                    with trio.fail_after(WAIT):
                        assert isinstance(await raw.receive(), protocol.Deliver)

                server.process.send_signal(signal.SIGTERM)
                with trio.fail_after(WAIT):
                    goodbye = await raw.receive()
                    assert await raw.receive() is None
                    assert await server.process.wait() == 0
    assert isinstance(goodbye, protocol.Goodbye)
    assert server.logged(r"received SIGTERM")
    assert server.logged(r"stopped server=")

    # The committed cursor is where live delivery resumes: a device with no
    # cursor of its own gets only what is sent after the restart.
    async with (
        server_process(tmp_path) as server,
        client_of(server, "bob", device="tablet") as tablet,
        client_of(server, "alice") as alice,
    ):
        await alice.send("bob", "after the restart")
        with trio.fail_after(WAIT):
            assert (await tablet.receive()).body == "after the restart"


# --- metrics ---------------------------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, str]:
    """A minimal HTTP/1.1 GET over a raw socket: the status and the body."""
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode("ascii")
            )
            response = b""
            while chunk := await stream.receive_some(65536):
                response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, body.decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name!r} in:\n{text}")


async def test_metrics_endpoint_shows_counters_that_moved() -> None:
    async with running_server() as server:
        assert server.metrics_port is not None
        _, before = await http_get(server.metrics_port, "/metrics")
        async with client(server, "alice") as alice, client(server, "bob") as bob:
            await alice.send("bob", "counted")
            with trio.fail_after(WAIT):
                await bob.receive()
            status, after = await http_get(server.metrics_port, "/metrics")

        missing, _ = await http_get(server.metrics_port, "/nothing-here")

    assert status == 200
    assert metric(before, "msgnet_connections") == 0
    assert metric(after, "msgnet_connections") == 2
    assert metric(before, "msgnet_messages_in_total") == 0
    assert metric(after, "msgnet_messages_in_total") == 1
    assert metric(after, "msgnet_messages_out_total") == 1
    assert metric(after, "msgnet_ack_latency_seconds_count") == 1
    assert "msgnet_slow_consumer_disconnects_total 0.0" in after
    assert missing == 404


async def test_metrics_count_error_frames_by_code() -> None:
    async with running_server() as server:
        assert server.metrics_port is not None
        raw = RawConnection(await trio.open_tcp_stream(server.host, server.port))
        async with raw.stream:
            await raw.send(protocol.Hello(version=1, user="alice", token="forged"))
            with trio.fail_after(WAIT):
                assert isinstance(await raw.receive(), protocol.Error)
        _, text = await http_get(server.metrics_port, "/metrics")
    assert metric(text, 'msgnet_errors_total{code="auth_failed"}') == 1
