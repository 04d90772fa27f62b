"""Open-loop load against msgnet servers: latency percentiles, throughput, sweeps.

Run from the repository root::

    python -m bench.load --connections 1000 --rate 10000 --duration 30
    python -m bench.load --sweep --rate 5000 --p99-bound-ms 20
    python -m bench.load --backplane kafka --kafka-bootstrap 127.0.0.1:9092
    python -m bench.load --connect 10.0.0.5:7400 --secret "$MSGNET_SECRET"

Sends are scheduled on a clock at fixed intervals (the target rate), whatever
the server answers, and every latency is measured from the scheduled time, so a
server that stalls cannot hide the stall by slowing the generator down.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import trio
from hdrh.histogram import HdrHistogram
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from msgnet._admin import init_cluster
from msgnet._kafka import create_inbox_topic

from ._loadgen import LoadSpec, new_histogram, run_worker
from ._support import ServerProcess, cpu_seconds, machine, start_server
from .ceiling import (
    KAFKA_LINGER_MS,
    embedded_pipeline,
    kafka_pipeline,
    sample_records,
)
from .profile import start_sampler, summarise_samples

__all__ = ["main", "run_load"]

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def _latency(histogram: HdrHistogram) -> dict[str, float]:
    """Percentiles in milliseconds."""
    figures = {
        f"p{p:g}": histogram.get_value_at_percentile(p) / 1e6 for p in PERCENTILES
    }
    figures["max"] = histogram.get_max_value() / 1e6
    figures["mean"] = histogram.get_mean_value() / 1e6
    figures["count"] = histogram.get_total_count()
    return figures


def _merge(encoded: Sequence[str | bytes]) -> HdrHistogram:
    merged = new_histogram()
    for item in encoded:
        merged.add(HdrHistogram.decode(item))
    return merged


def _split(total: float, parts: int) -> list[int]:
    base, extra = divmod(int(total), parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def run_load(
    server: ServerProcess,
    *,
    connections: int,
    rate: float,
    size: int,
    group_size: int,
    warmup: float,
    duration: float,
    drain: float,
    workers: int,
    progress: bool = True,
    profile: Path | None = None,
) -> dict[str, Any]:
    """One open-loop run at a fixed offered rate; returns every figure.

    With ``profile``, the server is sampled by py-spy over the measured window
    and the samples are written there (see ``bench/profile.py``).
    """
    if connections < 2 * workers:
        raise ValueError(
            f"need at least 2 connections per worker, got {connections!r} "
            f"for {workers!r} workers"
        )
    run_id = secrets.token_hex(3)
    context = multiprocessing.get_context("spawn")
    progress_queue = context.Queue()
    processes, pipes = [], []
    for worker, count in enumerate(_split(connections, workers)):
        spec = LoadSpec(
            host=server.host,
            port=server.port,
            secret=server.secret,
            run_id=run_id,
            connections=count,
            rate=rate * count / connections,
            size=size,
            group_size=group_size,
            warmup=warmup,
            duration=duration,
            drain=drain,
        )
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=run_worker, args=(spec, worker, child_end, progress_queue)
        )
        process.start()
        processes.append(process)
        pipes.append(parent_end)

    try:
        # 1. Ramp-up: every worker opens its connections.
        opened = 0
        for pipe in pipes:
            if not pipe.poll(600):
                raise RuntimeError("a load worker did not connect within 600 s")
            kind, count = pipe.recv()
            assert kind == "ready"
            opened += count

        # 2. A common start, a little ahead so every worker is waiting for it.
        start_ns = time.monotonic_ns() + 500_000_000
        for pipe in pipes:
            pipe.send(start_ns)
        measure_ns = start_ns + int(warmup * 1e9)
        end_ns = measure_ns + int(duration * 1e9)
        pids = [p.pid for p in processes if p.pid is not None]

        # 3. Watch: progress bar, and CPU of generator and server over the window.
        cpu_at: dict[str, dict[int, float]] = {}
        sent: dict[int, int] = {}
        total = int(rate * (warmup + duration))
        bar = tqdm(
            total=total,
            unit="msg",
            desc=f"{rate:,.0f}/s",
            disable=not progress,
            mininterval=1.0,
        )
        results: list[dict[str, Any] | None] = [None] * len(pipes)
        sampler: subprocess.Popen[bytes] | None = None
        while True:
            now = time.monotonic_ns()
            for name, moment in (("start", measure_ns), ("end", end_ns)):
                if name not in cpu_at and now >= moment:
                    cpu_at[name] = {
                        pid: cpu_seconds(pid)
                        for pid in [*pids, server.pid]
                        if pid is not None
                    }
                    if name == "start" and profile is not None:
                        sampler = start_sampler(server, profile, duration)
            # Checked after the readings: workers that report back just after
            # the window's end still get its end reading (an exited worker's
            # /proc entry stays readable until it is joined).
            if all(result is not None for result in results):
                break
            while not progress_queue.empty():
                worker, count, _ = progress_queue.get()
                sent[worker] = count
            done = min(total, sum(sent.values()))
            if done > bar.n:
                bar.update(done - bar.n)
            for i, pipe in enumerate(pipes):
                if results[i] is None and pipe.poll(0.05):
                    kind, result = pipe.recv()
                    assert kind == "result"
                    results[i] = result
            if now > end_ns + int((drain + 120) * 1e9):
                raise RuntimeError("load workers did not report back in time")
        bar.close()
        if sampler is not None:
            sampler.wait(timeout=60)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()

    finished = [result for result in results if result is not None]
    return _summarise(
        finished,
        cpu_at,
        pids,
        server.pid,
        connections=opened,
        rate=rate,
        size=size,
        group_size=group_size,
        warmup=warmup,
        duration=duration,
        workers=workers,
    )


def _summarise(
    results: list[dict[str, Any]],
    cpu_at: dict[str, dict[int, float]],
    pids: list[int],
    server_pid: int | None,
    **parameters: Any,
) -> dict[str, Any]:
    duration = float(parameters["duration"])
    offered = sum(r["offered"] for r in results)
    expected = sum(r["expected"] for r in results)
    errors: Counter[str] = Counter()
    for result in results:
        errors.update(result["errors"])

    ramp_seconds = max(r["ramp"]["seconds"] for r in results)
    ramp_connections = sum(r["ramp"]["connections"] for r in results)

    seconds = sorted({int(k) for r in results for k in r["series"]})
    series = []
    for second in seconds:
        rows = [r["series"].get(str(second), [0, 0, 0]) for r in results]
        p99 = _merge(
            [
                r["series_p99"][str(second)]
                for r in results
                if str(second) in r["series_p99"]
            ]
        )
        series.append(
            {
                "second": second,
                "offered": sum(row[0] for row in rows),
                "acked": sum(row[1] for row in rows),
                "delivered": sum(row[2] for row in rows),
                "p99_ms": p99.get_value_at_percentile(99) / 1e6
                if p99.get_total_count()
                else None,
            }
        )

    cpu = {}
    if "start" in cpu_at and "end" in cpu_at:

        def percent(pid: int) -> float:
            return round(
                100 * (cpu_at["end"][pid] - cpu_at["start"][pid]) / duration, 1
            )

        cpu = {
            "generator_percent_of_one_core": round(
                sum(percent(pid) for pid in pids), 1
            ),
            "generator_per_worker": [percent(pid) for pid in pids],
            "server_percent_of_one_core": None
            if server_pid is None
            else percent(server_pid),
        }

    e2e = _merge([r["e2e"] for r in results])
    ack = _merge([r["ack"] for r in results])
    return {
        "parameters": parameters,
        "machine": machine(),
        "offered_per_s": offered / duration,
        "acked_per_s": sum(r["acked"] for r in results) / duration,
        "delivered_per_s": sum(r["delivered"] for r in results) / duration,
        "expected_deliveries_per_s": expected / duration,
        "undelivered": expected - sum(r["delivered"] for r in results),
        "unacked": offered - sum(r["acked"] for r in results),
        "e2e_latency_ms": _latency(e2e),
        "ack_latency_ms": _latency(ack),
        "ramp": {
            "connections": ramp_connections,
            "seconds": ramp_seconds,
            "connections_per_s": ramp_connections / ramp_seconds
            if ramp_seconds
            else None,
        },
        "errors": dict(errors),
        "disconnects": sum(r["disconnects"] for r in results),
        "cpu": cpu,
        "series": series,
        "_e2e_histogram": e2e.encode().decode("ascii"),
    }


def sustainable(figures: dict[str, Any], p99_bound_ms: float) -> bool:
    """Delivery kept up (99% of it within the drain) and p99 stayed in bound."""
    expected = figures["expected_deliveries_per_s"]
    kept_up: bool = figures["delivered_per_s"] >= 0.99 * expected
    return kept_up and float(figures["e2e_latency_ms"]["p99"]) <= p99_bound_ms


# --- output ----------------------------------------------------------------------


def summary(figures: dict[str, Any]) -> str:
    p = figures["parameters"]
    lines = [
        f"{p['connections']} connections, {p['workers']} workers, offered "
        f"{p['rate']:,.0f} msg/s, body {p['size']} B, "
        + (f"groups of {p['group_size']}" if p["group_size"] else "one-to-one")
        + f", {p['duration']:g} s measured after {p['warmup']:g} s warm-up",
        f"  offered   {figures['offered_per_s']:>10,.0f} msg/s",
        f"  acked     {figures['acked_per_s']:>10,.0f} msg/s",
        f"  delivered {figures['delivered_per_s']:>10,.0f} msg/s "
        f"(expected {figures['expected_deliveries_per_s']:,.0f})",
    ]
    for name in ("e2e_latency_ms", "ack_latency_ms"):
        lat = figures[name]
        lines.append(
            f"  {name[:-11]:<4} latency ms  "
            + "  ".join(
                f"{key} {lat[key]:.2f}" for key in ("p50", "p90", "p99", "p99.9", "max")
            )
        )
    ramp = figures["ramp"]
    if ramp["connections_per_s"]:
        lines.append(
            f"  ramp-up: {ramp['connections']} connections in {ramp['seconds']:.2f} s "
            f"({ramp['connections_per_s']:,.0f}/s)"
        )
    lines.append(
        f"  errors {figures['errors'] or 'none'}, disconnects {figures['disconnects']}"
    )
    if figures["cpu"]:
        cpu = figures["cpu"]
        generator = cpu["generator_percent_of_one_core"]
        server = cpu["server_percent_of_one_core"]
        lines.append(
            f"  CPU (100% = one core): generator {generator}% "
            f"{cpu['generator_per_worker']}, server "
            + ("not seen (give --server-pid)" if server is None else f"{server}%")
        )
    return "\n".join(lines)


def plot(figures: dict[str, Any], prefix: Path) -> list[Path]:
    """The latency percentile distribution, and throughput and p99 over time."""
    written = []
    histogram = HdrHistogram.decode(figures["_e2e_histogram"])
    levels = [50, 75, 90, 95, 99, 99.5, 99.9, 99.95, 99.99, 99.999]
    xs = [1 / (1 - level / 100) for level in levels]
    ys = [histogram.get_value_at_percentile(level) / 1e6 for level in levels]
    fig, axis = _figure(7, 4)
    axis.plot(xs, ys, marker="o")
    axis.set_xscale("log")
    axis.set_xticks(xs, [f"{level:g}%" for level in levels], rotation=45)
    axis.set_xlabel("percentile")
    axis.set_ylabel("end-to-end latency (ms)")
    axis.set_title(_title(figures))
    axis.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = prefix.with_name(prefix.name + "-latency.png")
    fig.savefig(path, dpi=100)
    written.append(path)

    series = figures["series"]
    seconds = [row["second"] for row in series]
    fig, (top, bottom) = _figure(7, 5, rows=2)
    for key in ("offered", "acked", "delivered"):
        top.plot(seconds, [row[key] for row in series], label=key)
    top.set_ylabel("messages / s")
    top.legend()
    top.set_title(_title(figures))
    bottom.plot(seconds, [row["p99_ms"] for row in series], color="tab:red")
    bottom.set_ylabel("p99 end-to-end (ms)")
    bottom.set_xlabel("seconds since start (warm-up included)")
    for axis in (top, bottom):
        axis.axvline(figures["parameters"]["warmup"], color="grey", linestyle=":")
        axis.grid(True, alpha=0.3)
    fig.tight_layout()
    path = prefix.with_name(prefix.name + "-timeline.png")
    fig.savefig(path, dpi=100)
    written.append(path)
    return written


def plot_sweep(steps: list[dict[str, Any]], prefix: Path) -> Path:
    offered = [step["offered_per_s"] for step in steps]
    fig, left = _figure(7, 4)
    left.plot(
        offered,
        [step["delivered_per_s"] for step in steps],
        marker="o",
        label="delivered/s",
    )
    left.plot(
        offered, offered, linestyle=":", color="grey", label="offered = delivered"
    )
    left.set_xlabel("offered messages / s")
    left.set_ylabel("delivered messages / s")
    right = left.twinx()
    right.plot(
        offered,
        [step["e2e_latency_ms"]["p99"] for step in steps],
        marker="s",
        color="tab:red",
        label="p99 ms",
    )
    right.set_yscale("log")
    right.set_ylabel("p99 end-to-end (ms)")
    left.legend(loc="upper left")
    right.legend(loc="lower right")
    left.set_title("sweep: " + _title(steps[0]))
    fig.tight_layout()
    path = prefix.with_name(prefix.name + "-sweep.png")
    fig.savefig(path, dpi=100)
    return path


def _figure(width: float, height: float, *, rows: int = 1) -> tuple[Figure, Any]:
    """A figure drawn by the Agg backend, without pyplot's global state."""
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, sharex=True)
    return figure, axes


def _title(figures: dict[str, Any]) -> str:
    p = figures["parameters"]
    return (
        f"{p.get('backplane', '')} {p['connections']} conns, "
        f"{p['rate']:,.0f} msg/s offered, {p['size']} B"
    )


# --- command line ----------------------------------------------------------------


@contextmanager
def _server(args: argparse.Namespace) -> Iterator[ServerProcess]:
    """The server under load: one we start, or the one at --connect."""
    if args.connect:
        host, _, port = args.connect.rpartition(":")
        if not args.secret:
            raise SystemExit("--connect needs --secret to mint client tokens")
        yield ServerProcess(
            host=host, port=int(port), secret=args.secret, pid=args.server_pid
        )
        return
    options = [
        *args.server_arg,
        f"--max-connections={2 * args.connections + 100}",
        "--idle-timeout=3600",
        f"--partitions={args.partitions}",
    ]
    if args.backplane == "kafka":
        run = secrets.token_hex(4)
        topic, cluster_topic = f"msgnet.bench.{run}", f"msgnet.bench.cluster.{run}"
        create_inbox_topic(args.kafka_bootstrap, topic, partitions=args.partitions)
        # A Kafka server finds its partitions in the cluster map: one slot,
        # owned by the one server, holds them all.
        trio.run(
            functools.partial(
                init_cluster,
                args.kafka_bootstrap,
                partitions=args.partitions,
                slots=1,
                inbox_topic=topic,
                cluster_topic=cluster_topic,
            )
        )
        options += [
            "--backplane=kafka",
            f"--kafka-bootstrap={args.kafka_bootstrap}",
            f"--kafka-linger-ms={args.kafka_linger_ms}",
            f"--kafka-topic={topic}",
            f"--cluster-topic={cluster_topic}",
            "--slot=0",
        ]
    elif args.memory:
        options.append("--memory")
    with start_server(options) as server:
        yield server


def _ceiling(args: argparse.Namespace, messages: int) -> dict[str, Any]:
    """The raw log under the same records as the run, for the ratio."""
    users = [f"ceiling{i}" for i in range(args.connections)]
    records = sample_records(
        users, partitions=args.partitions, size=args.size, group_size=args.group_size
    )
    appends_per_message = len(records) / len(users)
    count = max(10_000, int(messages * appends_per_message))
    if args.backplane == "kafka":
        figures = kafka_pipeline(
            args.kafka_bootstrap,
            records,
            count=count,
            partitions=args.partitions,
            linger_ms=args.kafka_linger_ms,
        )
    else:
        with ExitStack() as stack:
            directory = (
                None
                if args.memory
                else stack.enter_context(tempfile.TemporaryDirectory())
            )
            figures = embedded_pipeline(
                directory,
                records,
                count=count,
                partitions=args.partitions,
                appenders=min(args.connections, 1000),
            )
    figures["appends_per_message"] = appends_per_message
    figures["messages_per_s"] = figures["pipeline_per_s"] / appends_per_message
    if args.backplane == "kafka":
        # The same records again, sent at the run's pace rather than all at
        # once: what kafka-python alone costs at the rate the server carried.
        paced_count = max(1, int(messages * appends_per_message))
        paced = kafka_pipeline(
            args.kafka_bootstrap,
            records,
            count=paced_count,
            partitions=args.partitions,
            rate=paced_count / args.duration,
            linger_ms=args.kafka_linger_ms,
        )
        figures["paced"] = {
            "records_per_s": paced_count / args.duration,
            "cpu_percent": paced["cpu_percent"],
            "cpu_us_per_record": paced["cpu_us_per_record"],
        }
    return figures


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = parser.add_argument_group("server under load")
    target.add_argument("--connect", metavar="HOST:PORT", help="a running server")
    target.add_argument(
        "--secret", default="", help="its token secret (with --connect)"
    )
    target.add_argument(
        "--server-pid",
        type=int,
        help="its process id, to report its CPU (with --connect, same machine)",
    )
    target.add_argument(
        "--backplane", choices=("embedded", "kafka"), default="embedded"
    )
    target.add_argument("--kafka-bootstrap", default="127.0.0.1:9092")
    target.add_argument(
        "--kafka-linger-ms",
        type=int,
        default=KAFKA_LINGER_MS,
        help="the server's producer linger, also used by the ceiling",
    )
    target.add_argument("--memory", action="store_true", help="embedded log in memory")
    target.add_argument("--partitions", type=int, default=16)
    target.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to the msgnet serve it starts, e.g. "
        "--server-arg=--outbound-queue=5000 (repeatable)",
    )
    load = parser.add_argument_group("load")
    load.add_argument("--connections", type=int, default=200)
    load.add_argument("--rate", type=float, default=2000, help="messages/s offered")
    load.add_argument("--size", type=int, default=100, help="body characters")
    load.add_argument("--group-size", type=int, default=0, help="0: one-to-one")
    load.add_argument("--warmup", type=float, default=5.0, help="seconds")
    load.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    load.add_argument("--drain", type=float, default=10.0, help="seconds to wait after")
    load.add_argument("--workers", type=int, default=1, help="generator processes")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--sweep", action="store_true", help="step the rate up")
    sweep.add_argument("--sweep-factor", type=float, default=1.25)
    sweep.add_argument("--max-rate", type=float, default=200_000)
    sweep.add_argument("--p99-bound-ms", type=float, default=50.0)
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="bench-results", help="directory")
    output.add_argument("--name", help="file name prefix (default: backplane-mode)")
    output.add_argument("--no-ceiling", action="store_true", help="skip the ceiling")
    output.add_argument("--no-plots", action="store_true")
    output.add_argument("--no-progress", action="store_true")
    output.add_argument(
        "--profile",
        action="store_true",
        help="sample the server with py-spy over the measured window (needs "
        "py-spy and permission to trace it) and write NAME-profile.txt",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = f"group{args.group_size}" if args.group_size else "direct"
    prefix = out / (
        args.name or f"{args.backplane}-{mode}" + ("-sweep" if args.sweep else "")
    )
    samples = prefix.with_name(prefix.name + "-profile.txt")
    parameters = {
        "backplane": "remote" if args.connect else args.backplane,
        "memory": args.memory,
        "partitions": args.partitions,
        "command": "python -m bench.load "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }

    def one(server: ServerProcess, rate: float) -> dict[str, Any]:
        figures = run_load(
            server,
            connections=args.connections,
            rate=rate,
            size=args.size,
            group_size=args.group_size,
            warmup=args.warmup,
            duration=args.duration,
            drain=args.drain,
            workers=args.workers,
            progress=not args.no_progress,
            profile=samples if args.profile else None,
        )
        figures["parameters"].update(parameters)
        print(summary(figures), flush=True)
        if args.profile:
            print(summarise_samples(samples), flush=True)
        return figures

    with _server(args) as server:
        if not args.sweep:
            result = one(server, args.rate)
            best = result
        else:
            steps: list[dict[str, Any]] = []
            rate = args.rate
            best = None
            while rate <= args.max_rate:
                step = one(server, rate)
                steps.append(step)
                if not sustainable(step, args.p99_bound_ms):
                    break
                best = step
                rate *= args.sweep_factor
            result = {
                "sweep": [
                    {k: v for k, v in s.items() if k != "_e2e_histogram"} for s in steps
                ],
                "p99_bound_ms": args.p99_bound_ms,
                "sustainable_rate": best["offered_per_s"] if best else None,
                "best": best,
            }
            sustained = f"{best['offered_per_s']:,.0f}" if best else "none"
            print(
                f"highest sustainable offered rate: {sustained} msg/s "
                f"(delivery kept up, p99 <= {args.p99_bound_ms:g} ms)"
            )

    if not args.no_ceiling and not args.connect and best is not None:
        measured = best["acked_per_s"]
        ceiling = _ceiling(args, int(measured * args.duration))
        ceiling["msgnet_ratio"] = measured / ceiling["messages_per_s"]
        result["ceiling"] = ceiling
        print(
            f"{args.backplane} ceiling: {ceiling['messages_per_s']:,.0f} msg/s "
            f"({ceiling['pipeline_per_s']:,.0f} records/s appended and read, "
            f"{ceiling['appends_per_message']:.2f} per message); msgnet at "
            f"{measured:,.0f} msg/s is {ceiling['msgnet_ratio']:.0%} of it"
        )
        if "paced" in ceiling:
            paced = ceiling["paced"]
            print(
                f"  raw kafka-python sending the same records at the run's pace "
                f"({paced['records_per_s']:,.0f}/s) and reading them: "
                f"{paced['cpu_percent']:.0f}% of a core "
                f"({paced['cpu_us_per_record']:.0f} us per record)"
            )

    written = []
    if not args.no_plots:
        if best is not None:
            written += plot(best, prefix)
        if args.sweep and result["sweep"]:
            written.append(plot_sweep(result["sweep"], prefix))
    json_path = prefix.with_name(prefix.name + ".json")
    json_path.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    print("wrote " + ", ".join(str(p) for p in [json_path, *written]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
