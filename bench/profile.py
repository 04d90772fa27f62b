"""Where a server's time goes under load: py-spy samples and their summary.

``python -m bench.load --profile ...`` samples the server over the measured
window; ``python -m bench.profile FILE`` summarises a sample file again. Only
the thread holding the GIL is sampled (``--gil``), so the shares are shares
of the one core a server process can use for Python.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ._support import ServerProcess

__all__ = ["main", "start_sampler", "summarise_samples"]

SAMPLE_RATE = 250
"""Samples per second: enough for a 1% share to rest on a few hundred samples."""


def start_sampler(
    server: ServerProcess, out: Path, duration: float
) -> subprocess.Popen[bytes]:
    """Start py-spy on the server for ``duration`` seconds, writing to ``out``."""
    if server.pid is None:
        raise RuntimeError("--profile needs the server's pid (--server-pid)")
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("--profile needs py-spy: pip install py-spy")
    return subprocess.Popen(
        [
            py_spy,
            "record",
            f"--pid={server.pid}",
            f"--duration={max(1, round(duration))}",
            f"--rate={SAMPLE_RATE}",
            "--gil",
            "--nonblocking",
            "--format=raw",
            f"--output={out}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _frame(frame: str) -> str:
    """``function (path/to/module.py:12)`` without the line number."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


def summarise_samples(path: Path, *, top: int = 25) -> str:
    """The functions with the most samples on top of the stack, and inclusive."""
    if not path.exists():
        return f"no profile was written to {path}"
    own: collections.Counter[str] = collections.Counter()
    within: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame(frame) for frame in stack.split(";") if " (" in frame]
        if not frames:
            continue
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            within[frame] += int(count)
    if not total:
        return f"the profile in {path} holds no samples"
    lines = [f"profile: {total} samples holding the GIL, written to {path}"]
    lines.append("  on top of the stack:")
    lines += [f"    {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("  inclusive (msgnet and protocol functions):")
    ours = [
        (f, n) for f, n in within.most_common() if "(msgnet/" in f or "(protocol/" in f
    ]
    lines += [f"    {n / total:6.1%}  {f}" for f, n in ours[:top]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("samples", type=Path, help="a py-spy raw sample file")
    parser.add_argument("--top", type=int, default=25, help="rows per list")
    args = parser.parse_args(argv)
    print(summarise_samples(args.samples, top=args.top))


if __name__ == "__main__":
    main()
