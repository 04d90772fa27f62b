"""A real single-node Apache Kafka on loopback, for development and tests."""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "DevKafka",
    "DevKafkaError",
    "KafkaToolsMissing",
    "ensure_kafka_classpath",
    "kafka_version",
    "main",
]

logger = logging.getLogger(__name__)

# The Maven project and the logging configuration ship as package data beside
# this module; msgnet/kafka/ is a data folder, not a package.
_KAFKA_DATA = Path(__file__).parent / "kafka"
_POM = _KAFKA_DATA / "pom.xml"
_LOG4J_CONFIG = _KAFKA_DATA / "log4j2.properties"
_POM_NS = "{http://maven.apache.org/POM/4.0.0}"

# Written last into a resolved classpath folder; it holds the pom's hash, so a
# folder left half-copied by an interrupted run, or resolved from an older pom,
# is resolved again.
_MARKER = ".msgnet-classpath-complete"

# KafkaRaftServer logs this once the broker and controller accept requests.
_READY_LINE = b"Kafka Server started"

_HOST = "127.0.0.1"
_HEAP = "512m"
_LOG_TAIL_LINES = 40


class DevKafkaError(Exception):
    """The development broker could not be prepared, started or stopped."""


class KafkaToolsMissing(DevKafkaError):
    """Java or Maven is not installed, so no development broker can run here."""


def kafka_version() -> str:
    """The Kafka version that ``msgnet/kafka/pom.xml`` resolves."""
    properties = ET.parse(_POM).getroot().find(f"{_POM_NS}properties")
    version = (
        None if properties is None else properties.findtext(f"{_POM_NS}kafka.version")
    )
    if not version:
        raise DevKafkaError(f"{_POM} has no <kafka.version> property")
    return version


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "msgnet" / f"kafka-{kafka_version()}"


def _require_tool(name: str, purpose: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise KafkaToolsMissing(
            f"{name!r} is not on PATH; it is needed {purpose} "
            "(on Debian: apt-get install openjdk-17-jre-headless maven)"
        )
    return path


def ensure_kafka_classpath(cache_dir: Path | None = None) -> Path:
    """Return a folder holding Kafka's jars, fetching them with Maven if needed.

    The first call runs ``mvn dependency:copy-dependencies`` on the shipped pom
    (Maven keeps its own cache in ``~/.m2``); later calls find the marker file and
    return at once. The default folder is ``~/.cache/msgnet/kafka-<version>``.
    """
    target = cache_dir if cache_dir is not None else _default_cache_dir()
    pom_hash = hashlib.sha256(_POM.read_bytes()).hexdigest()
    marker = target / _MARKER
    if marker.is_file() and marker.read_text() == pom_hash:
        return target

    mvn = _require_tool("mvn", "to fetch Kafka's jars from Maven Central")
    _require_tool("java", "to run Maven and the Kafka broker")

    # Copy into a fresh sibling folder and rename it into place, so that a
    # concurrent or interrupted run never leaves a half-filled classpath behind.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        command = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(_POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        logger.info("fetching Kafka %s jars into %s", kafka_version(), target)
        result = subprocess.run(command, capture_output=True, check=False)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise DevKafkaError(
                f"mvn exited with status {result.returncode} while fetching Kafka's "
                f"jars for {_POM}:\n{output[-4000:]}"
            )
        (staging / _MARKER).write_text(pom_hash)

        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class DevKafka:
    """One broker+controller process (KRaft) on loopback, restartable in place.

    The ports and the log folder are chosen once, so ``stop()`` then ``start()``
    brings back the same broker with its data, as a fault test needs. Used as a
    context manager it starts on entry and stops (and removes a temporary data
    folder) on exit.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | None = None,
        cache_dir: Path | None = None,
        startup_timeout_s: float = 90.0,
    ) -> None:
        self._cache_dir = cache_dir
        self._startup_timeout_s = startup_timeout_s
        self.port = port if port is not None else _free_port()
        self.controller_port = _free_port()
        self._owns_data_dir = data_dir is None
        self.data_dir = (
            data_dir
            if data_dir is not None
            else Path(tempfile.mkdtemp(prefix="msgnet-dev-kafka-"))
        )
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` address that clients connect to."""
        return f"{_HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The broker's console output, appended to across restarts."""
        return self.data_dir / "broker.log"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def _server_properties(self) -> dict[str, str]:
        return {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{_HOST}:{self.controller_port}",
            "listeners": (
                f"PLAINTEXT://{_HOST}:{self.port},CONTROLLER://{_HOST}:{self.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://{_HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": (
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
            ),
            "log.dirs": str(self.data_dir / "kraft-logs"),
            # Topics exist only when msgnet creates them, with the partition count
            # it routes by; a typo must fail rather than make a 1-partition topic.
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": "1",
            # One offsets partition makes the group coordinator ready sooner.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # The machine has two cores; Kafka's defaults size for servers.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
        }

    def _write_config(self) -> Path:
        path = self.data_dir / "server.properties"
        lines = [f"{key}={value}" for key, value in self._server_properties().items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def _java(self, classpath: Path, *args: str, heap: str) -> list[str]:
        java = _require_tool("java", "to run the Kafka broker")
        return [
            java,
            f"-Xms{heap}",
            f"-Xmx{heap}",
            "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={_LOG4J_CONFIG}",
            "-cp",
            f"{classpath}/*",
            *args,
        ]

    def _run_tool(self, classpath: Path, *args: str) -> str:
        command = self._java(classpath, "kafka.tools.StorageTool", *args, heap="256m")
        result = subprocess.run(command, capture_output=True, check=False)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise DevKafkaError(
                f"kafka.tools.StorageTool {' '.join(args)} exited with status "
                f"{result.returncode}:\n{output[-4000:]}"
            )
        return result.stdout.decode()

    def _format_storage(self, classpath: Path, config: Path) -> None:
        # A formatted log folder holds meta.properties; formatting again would
        # only cost another JVM start.
        if (self.data_dir / "kraft-logs" / "meta.properties").exists():
            return
        cluster_id = self._run_tool(classpath, "random-uuid").strip().splitlines()[-1]
        self._run_tool(
            classpath,
            "format",
            "-t",
            cluster_id,
            "-c",
            str(config),
            "--ignore-formatted",
        )

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the broker's console output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no broker log yet)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Start the broker and return once it serves clients.

        Raises ``DevKafkaError`` with the tail of the broker log if it exits or
        is not ready within the startup timeout.
        """
        if self.running:
            raise DevKafkaError(f"the broker on {self.bootstrap} is already running")

        classpath = ensure_kafka_classpath(self._cache_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        self._format_storage(classpath, config)

        # The log is appended to across restarts; readiness is looked for only
        # in what this start writes.
        with self.log_path.open("ab") as log:
            log_start = log.tell()
            command = self._java(classpath, "kafka.Kafka", str(config), heap=_HEAP)
            # A session of its own keeps a terminal's Ctrl-C from reaching the
            # JVM directly: the broker is stopped by stop(), in one way only.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        started = time.monotonic()
        self._wait_ready(log_start)
        logger.info(
            "Kafka broker ready on %s in %.1f s (log %s)",
            self.bootstrap,
            time.monotonic() - started,
            self.log_path,
        )

    def _wait_ready(self, log_start: int) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self._startup_timeout_s
        with self.log_path.open("rb") as log:
            log.seek(log_start)
            seen = b""
            while True:
                # Keep only a line's worth of the previous read so the ready line
                # is found even when it spans two reads.
                seen = seen[-len(_READY_LINE) :] + log.read()
                if _READY_LINE in seen:
                    return
                status = self._process.poll()
                if status is not None:
                    self._process = None
                    raise DevKafkaError(
                        f"the Kafka broker for {self.bootstrap} exited with status "
                        f"{status} while starting; log {self.log_path} ends:\n"
                        f"{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    self.stop(grace_s=0)
                    raise DevKafkaError(
                        f"the Kafka broker for {self.bootstrap} was not ready after "
                        f"{self._startup_timeout_s:.0f} s; log {self.log_path} ends:\n"
                        f"{self.log_tail()}"
                    )
                # The broker writes the line to a file; there is no event to wait
                # on, so the file is polled.
                time.sleep(0.05)

    def stop(self, *, grace_s: float = 30.0) -> None:
        """Stop the broker: SIGTERM, then SIGKILL if it outlives ``grace_s``.

        ``grace_s=0`` kills it at once, like a crash. Stopping a stopped broker
        does nothing.
        """
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is not None:
            return

        if grace_s > 0:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                logger.warning(
                    "Kafka broker on %s ignored SIGTERM for %.0f s; killing it",
                    self.bootstrap,
                    grace_s,
                )
        process.kill()
        process.wait()

    def restart(self, *, grace_s: float = 30.0) -> None:
        """Stop and start the same broker on the same ports and log folder."""
        self.stop(grace_s=grace_s)
        self.start()

    def close(self) -> None:
        """Stop the broker and remove its data folder if this object made it."""
        self.stop()
        if self._owns_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> DevKafka:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``msgnet dev-kafka``: run a development broker until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="msgnet dev-kafka",
        description="Run a single-node Apache Kafka (KRaft) on 127.0.0.1.",
    )
    parser.add_argument(
        "--port", type=int, default=9092, help="client port (default 9092; 0 for any)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="log folder kept across runs (default: a temporary one, removed on exit)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")

    # Block the stop signals before starting so one that arrives during startup
    # is kept for sigtimedwait below rather than killing Python mid-start.
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    broker = DevKafka(port=args.port or None, data_dir=args.data_dir)
    try:
        with broker:
            print(broker.bootstrap, flush=True)  # noqa: T201 - CLI output
            while broker.running:
                if signal.sigtimedwait(stop_signals, 1.0) is not None:
                    return 0
            print(  # noqa: T201 - CLI output
                f"the broker exited on its own; log {broker.log_path} ends:\n"
                f"{broker.log_tail()}",
                file=sys.stderr,
            )
            return 1
    except DevKafkaError as exc:
        print(f"msgnet dev-kafka: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return 1
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
