"""What the bench scripts share: a server subprocess, /proc readings, the machine."""

from __future__ import annotations

import os
import platform
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs

__all__ = [
    "ServerProcess",
    "cpu_seconds",
    "free_port",
    "machine",
    "open_file_limit",
    "open_files",
    "raise_nofile",
    "rss_bytes",
    "start_server",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

SERVE = [sys.executable, "-c", "import sys, msgnet._cli; sys.exit(msgnet._cli.main())"]
"""``msgnet serve`` as a module run; the package has no ``__main__``."""


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the server binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and all its threads, from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        # The command name may hold spaces; the fields after it are fixed.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def open_file_limit(pid: int) -> int:
    """The soft open-file limit of a process, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                soft = line.split()[3]
                # An unlimited limit is still capped by the kernel's nr_open.
                return 2**31 - 1 if soft == "unlimited" else int(soft)
    raise ValueError(f"no 'Max open files' line for pid {pid!r}")


def open_files(pid: int) -> int:
    """How many file descriptors a process has open right now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS line for pid {pid!r}")


def machine() -> dict[str, Any]:
    """What the figures ran on: CPU model, cores, memory, Python."""
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        total_kib = int(meminfo.readline().split()[1])
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(total_kib / 2**20, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nofile_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


@attrs.frozen(kw_only=True)
class ServerProcess:
    """A ``msgnet serve`` running in a subprocess of the bench."""

    host: str
    port: int
    secret: str
    pid: int | None
    """None for a server the bench did not start and cannot see."""


def _wait_listening(process: subprocess.Popen[bytes], host: str, port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"msgnet serve exited with status {process.returncode} before "
                f"listening on {host}:{port}"
            )
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"msgnet serve did not listen on {host}:{port} within 60 s")


@contextmanager
def start_server(
    options: Sequence[str] = (), *, host: str = "127.0.0.1"
) -> Iterator[ServerProcess]:
    """Run ``msgnet serve`` with ``options`` in a subprocess for the block.

    The server gets a fresh secret and data directory, no metrics listener,
    limits generous enough not to shape the load, and the highest open-file
    limit the machine allows. It is stopped with SIGTERM afterwards.
    """
    secret = secrets.token_hex(32)
    port = free_port(host)
    with tempfile.TemporaryDirectory(prefix="msgnet-bench-") as data_dir:
        command = [
            *SERVE,
            "serve",
            f"--host={host}",
            f"--port={port}",
            f"--secret={secret}",
            f"--data-dir={data_dir}",
            "--no-metrics-enabled",
            "--no-ws-enabled",
            "--rate-limit=1000000",
            "--rate-burst=1000000",
            *options,
        ]
        log = open(os.path.join(data_dir, "server.log"), "wb")  # noqa: SIM115
        # The server inherits the raised open-file limit.
        raise_nofile()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            try:
                _wait_listening(process, host, port)
            except RuntimeError as exc:
                log.flush()
                with open(log.name, encoding="utf-8", errors="replace") as output:
                    tail = output.read()[-2000:]
                raise RuntimeError(f"{exc}; its output ends:\n{tail}") from None
            yield ServerProcess(host=host, port=port, secret=secret, pid=process.pid)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            log.close()
