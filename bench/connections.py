"""How many authenticated idle connections one server holds, and at what memory.

Run from the repository root::

    python -m bench.connections --connections 50000 --workers 4

The server runs in a subprocess with a high --max-connections and a long
--idle-timeout; client processes connect from several loopback addresses
(127.0.0.2, 127.0.0.3, ...) so that no single source address runs out of
ephemeral ports, and hold the connections open. Loopback only.
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

from ._support import machine, raise_nofile, rss_bytes, start_server

__all__ = ["hold_connections", "main"]

SOURCES_PER_WORKER = 2
"""Loopback source addresses per client process (about 28,000 ports each)."""


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


def hold_connections(
    *, connections: int, workers: int, time_limit: float = 300.0
) -> dict[str, Any]:
    """Open ``connections`` idle connections to a fresh server and measure it."""
    per_worker = [
        connections // workers + (i < connections % workers) for i in range(workers)
    ]
    options = [
        f"--max-connections={connections + 1000}",
        "--idle-timeout=86400",
        "--handshake-timeout=120",
        "--memory",
    ]
    context = multiprocessing.get_context("spawn")
    with start_server(options) as server:
        time.sleep(0.5)
        baseline = rss_bytes(server.pid)
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
        "held": held,
        "failures": failures,
        "seconds": seconds,
        "handshakes_per_s": held / seconds if seconds else None,
        "server_rss_baseline_bytes": baseline,
        "server_rss_loaded_bytes": loaded,
        "bytes_per_connection": (loaded - baseline) / held if held else None,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    figures = hold_connections(
        connections=args.connections, workers=args.workers, time_limit=args.time_limit
    )
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
