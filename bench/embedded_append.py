"""Append throughput of the embedded backplane under many concurrent appenders.

Run from the repository root: ``python -m bench.embedded_append --help``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import trio

from msgnet._embedded import open_embedded_backplane


async def measure(
    directory: str | None, *, appenders: int, per_appender: int, partitions: int
) -> float:
    """Run the appenders to completion and return appends per second."""
    value = b"x" * 200

    async with open_embedded_backplane(directory, partitions=partitions) as backplane:

        async def appender(number: int) -> None:
            for i in range(per_appender):
                await backplane.append((number + i) % partitions, b"user", value)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for number in range(appenders):
                nursery.start_soon(appender, number)
        elapsed = time.perf_counter() - started

    return appenders * per_appender / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--appenders", type=int, default=1000)
    parser.add_argument("--per-appender", type=int, default=100)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--memory", action="store_true", help="no file, no fsync")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        rate = trio.run(
            lambda: measure(
                None if args.memory else directory,
                appenders=args.appenders,
                per_appender=args.per_appender,
                partitions=args.partitions,
            )
        )
    print(
        f"{args.appenders} appenders x {args.per_appender} appends "
        f"({'memory' if args.memory else 'sqlite file'}): {rate:,.0f} appends/s"
    )


if __name__ == "__main__":
    main()
