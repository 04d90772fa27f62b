"""Frames per second through ``protocol`` versus bare msgpack on the same messages.

Run from the repository root: ``python -m bench.codec``. Both sides write and
read whole frames (4-byte length prefix, msgpack map): ``protocol`` builds and
checks message objects, bare msgpack only packs and unpacks the dicts.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import msgpack

import protocol
from protocol._codec import message_to_map

__all__ = ["compare", "main"]


def _messages(count: int, size: int) -> dict[str, list[protocol.Message]]:
    body = "x" * size
    return {
        "Send": [
            protocol.Send(id=f"m{i:08d}", to=f"user{i % 1000}", body=body)
            for i in range(count)
        ],
        "Deliver": [
            protocol.Deliver(
                id=f"m{i:08d}",
                sender=f"user{i % 997}",
                to=f"user{i % 1000}",
                body=body,
                ts=1_700_000_000_000 + i,
                partition=i % 16,
                offset=i,
            )
            for i in range(count)
        ],
    }


def _rate(run: Callable[[], object], count: int, seconds: float) -> float:
    """Frames per second: the best of repeated runs lasting ``seconds`` in all."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
        if time.perf_counter() > deadline:
            return count / best


def _split(stream: bytes) -> list[bytes]:
    bodies, at = [], 0
    while at < len(stream):
        length = int.from_bytes(stream[at : at + 4], "big")
        bodies.append(stream[at + 4 : at + 4 + length])
        at += 4 + length
    return bodies


def _protocol_encode(messages: list[protocol.Message]) -> bytes:
    return b"".join([protocol.encode_frame(message) for message in messages])


def _bare_encode(pack: Callable[[Any], bytes], maps: list[dict[str, Any]]) -> bytes:
    return b"".join([len(body).to_bytes(4, "big") + body for body in map(pack, maps)])


RECEIVE_SIZE = 64 * 1024
"""Bytes fed to the decoder at a time, as the server's transport reads them."""


def _protocol_decode(frames: bytes) -> list[protocol.Message]:
    decoder = protocol.FrameDecoder()
    decode = protocol.decode_message
    out = []
    for at in range(0, len(frames), RECEIVE_SIZE):
        decoder.feed(frames[at : at + RECEIVE_SIZE])
        while (body := decoder.next_frame()) is not None:
            out.append(decode(body))
    return out


def _bare_decode(frames: bytes) -> list[Any]:
    unpackb = msgpack.unpackb
    return [unpackb(body) for body in _split(frames)]


def compare(
    *, count: int = 20_000, size: int = 100, seconds: float = 2.0
) -> dict[str, Any]:
    """Encode and decode rates of both codecs, per message type, and their ratio."""
    figures: dict[str, Any] = {}
    for name, messages in _messages(count, size).items():
        maps = [message_to_map(message) for message in messages]
        pack = msgpack.Packer().pack
        frames = b"".join(protocol.encode_frame(message) for message in messages)
        bare_frames = b"".join(
            len(body).to_bytes(4, "big") + body for body in map(pack, maps)
        )
        assert frames == bare_frames, "both codecs must put the same bytes on the wire"

        row = {
            "encode_per_s": _rate(partial(_protocol_encode, messages), count, seconds),
            "bare_encode_per_s": _rate(
                partial(_bare_encode, pack, maps), count, seconds
            ),
            "decode_per_s": _rate(partial(_protocol_decode, frames), count, seconds),
            "bare_decode_per_s": _rate(
                partial(_bare_decode, bare_frames), count, seconds
            ),
        }
        row["encode_ratio"] = row["encode_per_s"] / row["bare_encode_per_s"]
        row["decode_ratio"] = row["decode_per_s"] / row["bare_decode_per_s"]
        figures[name] = row
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="frames per run")
    parser.add_argument("--size", type=int, default=100, help="body characters")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    figures = compare(count=args.count, size=args.size, seconds=args.seconds)
    for name, row in figures.items():
        for way in ("encode", "decode"):
            print(
                f"{name:<8} {way}: protocol {row[f'{way}_per_s']:>10,.0f} frames/s, "
                f"bare msgpack {row[f'bare_{way}_per_s']:>10,.0f} frames/s, "
                f"ratio {row[f'{way}_ratio']:.0%}"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(figures, out, indent=2)


if __name__ == "__main__":
    main()
