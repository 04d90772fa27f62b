"""How many authenticated idle connections one server holds, and at what memory.

Run from the repository root::

    python -m bench.connections --connections 50000 --workers 4
    python -m bench.connections --connections max --workers 2

The server runs in a subprocess with a high --max-connections and a long
--idle-timeout; client processes connect from several loopback addresses
(127.0.0.2, 127.0.0.3, ...) so that no single source address runs out of
ephemeral ports, and hold the connections open. Loopback only.

Each connection costs the server one file descriptor, so its open-file limit
caps the count: a request above what that limit allows is refused before any
client connects, with the largest count that fits; ``--connections max`` runs
at that count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

import protocol
from msgnet._auth import mint_token
from msgnet._transport import StreamTransport

from ._support import (
    machine,
    open_file_limit,
    open_files,
    raise_nofile,
    rss_bytes,
    start_server,
)

__all__ = ["TooManyConnections", "hold_connections", "main"]

SOURCES_PER_WORKER = 2
"""Loopback source addresses per client process (about 28,000 ports each)."""

SERVER_SPARE_FILES = 16
"""Descriptors left free in the server beyond those it holds before any client:
the accept in progress, a thread's wakeup pipe, a file the log opens."""

WORKER_SPARE_FILES = 64
"""Descriptors a client process needs besides its connections (the interpreter,
its pipe to the bench, trio's epoll and wakeup sockets)."""


class TooManyConnections(ValueError):
    """More connections were asked for than an open-file limit allows."""


@attrs.frozen(kw_only=True)
class _Job:
    """One client process's share: where to connect and how many to hold."""

    host: str
    port: int
    secret: str
    worker: int
    count: int
    limit: float


async def _hold(job: _Job, control: Any) -> None:
    host, port, secret, worker = job.host, job.port, job.secret, job.worker
    count, limit = job.count, job.limit
    transports: list[StreamTransport] = []
    failures: dict[str, int] = {}
    token_user = f"idle{worker}"
    limiter = trio.CapacityLimiter(256)
    started = time.monotonic()

    async def connect(i: int) -> None:
        source = f"127.0.0.{2 + worker * SOURCES_PER_WORKER + i % SOURCES_PER_WORKER}"
        user = f"{token_user}x{i}"
        async with limiter:
            try:
                stream = await trio.open_tcp_stream(host, port, local_address=source)
                transport = StreamTransport(stream, role=protocol.Role.CLIENT)
                hello = protocol.Hello(
                    version=protocol.PROTOCOL_VERSION,
                    user=user,
                    token=mint_token(secret, user, ttl=3600),
                    device="idle",
                    resume=None,
                )
                with trio.fail_after(30):
                    await transport.send([hello])
                    reply = await transport.receive()
            except (OSError, trio.TooSlowError, protocol.ProtocolError) as exc:
                key = type(exc).__name__ + (
                    f" errno {exc.errno}" if isinstance(exc, OSError) else ""
                )
                failures[key] = failures.get(key, 0) + 1
                return
            if isinstance(reply, protocol.Welcome):
                transports.append(transport)
            else:
                key = f"refused: {getattr(reply, 'code', reply)}"
                failures[key] = failures.get(key, 0) + 1
                await transport.aclose()

    with trio.move_on_after(limit):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(connect, i)
    control.send(
        {
            "held": len(transports),
            "seconds": time.monotonic() - started,
            "failures": failures,
        }
    )
    # Hold them until the parent has read the server's memory.
    await trio.to_thread.run_sync(control.recv)
    for transport in transports:
        await transport.aclose()


def _worker(job: _Job, control: Any) -> None:
    raise_nofile()
    trio.run(_hold, job, control)


def _split(connections: int, workers: int) -> list[int]:
    return [
        connections // workers + (i < connections % workers) for i in range(workers)
    ]


def _check_workers(connections: int, workers: int) -> None:
    """Each client process holds its share open: it must fit its own limit."""
    limit = raise_nofile()
    share = max(_split(connections, workers))
    if share > limit - WORKER_SPARE_FILES:
        raise TooManyConnections(
            f"{connections:,} connections over {workers} client processes is "
            f"{share:,} each, but a client process's open-file limit {limit:,} "
            f"allows at most {limit - WORKER_SPARE_FILES:,}; use more --workers"
        )


def hold_connections(
    *, connections: int | None, workers: int, time_limit: float = 300.0
) -> dict[str, Any]:
    """Open ``connections`` idle connections to a fresh server and measure it.

    None means as many as the server's open-file limit allows. A count above
    that limit raises ``TooManyConnections`` before any client connects.
    """
    # The server inherits this process's limit, raised to the hard one; the
    # exact count it allows is known once it runs and its own files are open.
    limit = raise_nofile()
    if connections is not None and connections > limit - SERVER_SPARE_FILES:
        raise TooManyConnections(
            f"{connections:,} connections asked for, but the server's open-file "
            f"limit {limit:,} allows at most {limit - SERVER_SPARE_FILES:,} less "
            "the files the server opens itself; this limit, not the server, caps "
            "one process here: run with --connections max"
        )
    if connections is not None:
        _check_workers(connections, workers)
    options = [
        f"--max-connections={(connections or limit) + 1000}",
        "--idle-timeout=86400",
        "--handshake-timeout=120",
        "--memory",
    ]
    context = multiprocessing.get_context("spawn")
    with start_server(options) as server:
        assert server.pid is not None
        time.sleep(0.5)
        baseline = rss_bytes(server.pid)
        server_limit = open_file_limit(server.pid)
        server_files = open_files(server.pid)
        allowed = server_limit - server_files - SERVER_SPARE_FILES
        if connections is None:
            connections = allowed
            _check_workers(connections, workers)
        elif connections > allowed:
            raise TooManyConnections(
                f"{connections:,} connections asked for, but the server's open-file "
                f"limit {server_limit:,} allows at most {allowed:,} (it holds "
                f"{server_files} files before any client connects and keeps "
                f"{SERVER_SPARE_FILES} spare); run with --connections {allowed} "
                "or --connections max"
            )
        per_worker = _split(connections, workers)
        pipes, processes = [], []
        for worker, count in enumerate(per_worker):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_worker,
                args=(
                    _Job(
                        host=server.host,
                        port=server.port,
                        secret=server.secret,
                        worker=worker,
                        count=count,
                        limit=time_limit,
                    ),
                    child_end,
                ),
            )
            process.start()
            pipes.append(parent_end)
            processes.append(process)
        reports = [pipe.recv() for pipe in pipes]
        time.sleep(1.0)
        loaded = rss_bytes(server.pid)
        for pipe in pipes:
            pipe.send("done")
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()

    held = sum(report["held"] for report in reports)
    seconds = max(report["seconds"] for report in reports)
    failures: dict[str, int] = {}
    for report in reports:
        for key, value in report["failures"].items():
            failures[key] = failures.get(key, 0) + value
    return {
        "machine": machine(),
        "attempted": connections,
        "server_open_file_limit": server_limit,
        "server_files_before_clients": server_files,
        "most_connections_allowed": allowed,
        "held": held,
        "failures": failures,
        "seconds": seconds,
        "handshakes_per_s": held / seconds if seconds else None,
        "server_rss_baseline_bytes": baseline,
        "server_rss_loaded_bytes": loaded,
        "bytes_per_connection": (loaded - baseline) / held if held else None,
    }


def _count(text: str) -> int | None:
    if text == "max":
        return None
    count = int(text)
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1 or 'max', got {text!r}")
    return count


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--connections",
        type=_count,
        default=50_000,
        help="how many to hold, or 'max' for as many as the server's "
        "open-file limit allows",
    )
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    try:
        figures = hold_connections(
            connections=args.connections,
            workers=args.workers,
            time_limit=args.time_limit,
        )
    except TooManyConnections as exc:
        parser.exit(2, f"bench.connections: {exc}\n")
    per = figures["bytes_per_connection"]
    print(
        f"held {figures['held']:,} of {figures['attempted']:,} connections in "
        f"{figures['seconds']:.1f} s ({figures['handshakes_per_s'] or 0:,.0f} "
        f"handshakes/s); server RSS {figures['server_rss_baseline_bytes'] / 2**20:.0f} "
        f"-> {figures['server_rss_loaded_bytes'] / 2**20:.0f} MiB, "
        + (f"{per / 1024:.1f} KiB per connection" if per else "no connections")
        + (f"; failures {figures['failures']}" if figures["failures"] else "")
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()
