"""Messaging servers as separate OS processes on a real Kafka, for cluster tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import trio
from support import SECRET, die_with_parent

from msgnet._admin import init_cluster

LISTENING = re.compile(r"listening server=(\S+) host=(\S+) port=(\d+)")
STARTUP_TIMEOUT = 90.0

HEARTBEAT_INTERVAL = 0.25
TAKEOVER_TIMEOUT = 2.0


class ServerProcess:
    """One ``msgnet serve`` process; its log goes to a file the test can read."""

    def __init__(
        self,
        *,
        bootstrap: str,
        topics: tuple[str, str],
        data_dir: Path,
        name: str,
        slot: int,
        log_dir: Path,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.port = 0
        self.ready = threading.Event()
        self._lines: list[str] = []
        inbox, cluster = topics
        command = [
            sys.executable, "-m", "msgnet", "serve",
            "--backplane", "kafka",
            "--kafka-bootstrap", bootstrap,
            "--kafka-topic", inbox,
            "--cluster-topic", cluster,
            "--slot", str(slot),
            "--name", name,
            "--port", "0",
            "--metrics-port", "0",
            "--ws-port", "0",
            "--data-dir", str(data_dir),
            "--secret", SECRET,
            "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
            "--takeover-timeout", str(TAKEOVER_TIMEOUT),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Safe with threads here: the hook makes one system call.
            preexec_fn=die_with_parent,  # noqa: PLW1509
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        with self.log_path.open("w") as log:
            for line in self.process.stderr:
                log.write(line)
                log.flush()
                self._lines.append(line)
                match = LISTENING.search(line)
                if match:
                    self.port = int(match.group(3))
                    self.ready.set()

    async def wait_ready(self) -> None:
        ready = await trio.to_thread.run_sync(self.ready.wait, STARTUP_TIMEOUT)
        if not ready:
            raise AssertionError(f"{self.name} did not start:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "".join(self._lines[-lines:])

    def logged(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in self._lines)

    async def wait_for_log(self, pattern: str, timeout: float = 60.0) -> float:
        """Wait until a log line matches; returns the time the server logged it."""
        with trio.fail_after(timeout):
            while True:
                for line in self._lines:
                    if re.search(pattern, line):
                        return logged_at(line)
                await trio.sleep(0.05)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()


class Cluster:
    """A fresh pair of topics and the servers that share them."""

    def __init__(self, bootstrap: str, tmp_path: Path, *, partitions: int, slots: int):
        tag = uuid.uuid4().hex[:8]
        self.bootstrap = bootstrap
        self.topics = (f"inbox-{tag}", f"cluster-{tag}")
        self.partitions = partitions
        self.slots = slots
        self.data_dir = tmp_path / "data"
        self.log_dir = tmp_path / "logs"
        self.log_dir.mkdir()
        self.servers: list[ServerProcess] = []

    async def init(self) -> None:
        await init_cluster(
            self.bootstrap,
            partitions=self.partitions,
            slots=self.slots,
            inbox_topic=self.topics[0],
            cluster_topic=self.topics[1],
        )

    async def start(self, name: str, slot: int) -> ServerProcess:
        server = ServerProcess(
            bootstrap=self.bootstrap,
            topics=self.topics,
            data_dir=self.data_dir,
            name=name,
            slot=slot,
            log_dir=self.log_dir,
        )
        self.servers.append(server)
        await server.wait_ready()
        return server

    def owner_of_slot(self, slot: int) -> ServerProcess:
        for server in self.servers:
            if server.process.poll() is None and server.logged(
                rf"slot acquired server={server.name} slot={slot} "
            ):
                return server
        raise LookupError(f"no live server acquired slot {slot}")

    def close(self) -> None:
        for server in self.servers:
            server.close()


def logged_at(line: str) -> float:
    """The ``time.time()`` of a log line, from its asctime prefix."""
    stamp, millis = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
