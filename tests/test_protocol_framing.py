"""Length-prefixed framing: every way the bytes of a frame can arrive."""

from __future__ import annotations

import json
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_strategies import messages

import protocol

FRAMES = [
    bytes.fromhex(vector["hex"])
    for vector in json.loads(
        (pathlib.Path(__file__).parent / "vectors" / "protocol-v1.json").read_text()
    )
]
NEXT = protocol.encode_frame(protocol.Ping(n=1))


def drain(decoder: protocol.FrameDecoder) -> list[bytes]:
    bodies = []
    while (body := decoder.next_frame()) is not None:
        bodies.append(body)
    return bodies


@pytest.mark.parametrize("frame", FRAMES)
def test_frame_fed_whole_gives_its_body(frame: bytes) -> None:
    decoder = protocol.FrameDecoder()
    decoder.feed(frame)
    assert drain(decoder) == [frame[4:]]
    assert decoder.buffered == 0


@pytest.mark.parametrize("frame", FRAMES)
def test_frame_fed_byte_by_byte_gives_its_body_only_at_the_last_byte(
    frame: bytes,
) -> None:
    decoder = protocol.FrameDecoder()
    for index in range(len(frame) - 1):
        decoder.feed(frame[index : index + 1])
        assert decoder.next_frame() is None
    decoder.feed(frame[-1:])
    assert drain(decoder) == [frame[4:]]


@pytest.mark.parametrize("frame", FRAMES)
def test_trailing_bytes_of_the_next_frame_are_kept_for_it(frame: bytes) -> None:
    decoder = protocol.FrameDecoder()
    decoder.feed(frame + NEXT[:3])
    assert drain(decoder) == [frame[4:]]
    assert decoder.buffered == 3

    decoder.feed(NEXT[3:])
    assert drain(decoder) == [NEXT[4:]]


@given(st.lists(messages, min_size=1, max_size=5), st.data())
def test_any_chunking_of_a_stream_gives_the_same_messages(
    sent: list[protocol.Message], data: st.DataObject
) -> None:
    stream = b"".join(protocol.encode_frame(message) for message in sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = protocol.FrameDecoder()
    received = []

    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoder.feed(stream[start:end])
        received.extend(protocol.decode_message(body) for body in drain(decoder))

    assert received == sent
    assert decoder.buffered == 0


def test_oversized_length_is_refused_from_the_prefix_alone() -> None:
    decoder = protocol.FrameDecoder(max_frame_size=100)
    decoder.feed((101).to_bytes(4, "big"))

    with pytest.raises(protocol.RemoteProtocolError, match="101") as info:
        decoder.next_frame()
    assert info.value.code is protocol.ErrorCode.FRAME_TOO_LARGE

    # The stream cannot be resynchronised, so the error repeats.
    decoder.feed(b"more")
    with pytest.raises(protocol.RemoteProtocolError):
        decoder.next_frame()


def test_default_limit_is_one_mebibyte() -> None:
    decoder = protocol.FrameDecoder()
    decoder.feed(protocol.DEFAULT_MAX_FRAME_SIZE.to_bytes(4, "big"))
    assert decoder.next_frame() is None

    decoder = protocol.FrameDecoder()
    decoder.feed((protocol.DEFAULT_MAX_FRAME_SIZE + 1).to_bytes(4, "big"))
    with pytest.raises(protocol.RemoteProtocolError):
        decoder.next_frame()


def test_frame_of_exactly_the_limit_is_accepted() -> None:
    frame = protocol.encode_frame(protocol.Ping(n=7))
    decoder = protocol.FrameDecoder(max_frame_size=len(frame) - 4)
    decoder.feed(frame)
    assert drain(decoder) == [frame[4:]]


def test_zero_length_frame_is_a_bad_frame() -> None:
    decoder = protocol.FrameDecoder()
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(protocol.RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code is protocol.ErrorCode.BAD_FRAME


def test_encoding_a_frame_over_the_limit_is_a_local_error() -> None:
    big = protocol.Send(id="m", to="b", body="x" * 200)
    with pytest.raises(protocol.LocalProtocolError, match="over the frame size"):
        protocol.encode_frame(big, max_frame_size=100)


def test_frame_prefix_is_the_big_endian_body_length() -> None:
    frame = protocol.encode_frame(protocol.Ping(n=1))
    assert frame[:4] == len(protocol.encode_message(protocol.Ping(n=1))).to_bytes(
        4, "big"
    )


@pytest.mark.parametrize("limit", [0, -1, 2**32, 1.5, True])
def test_frame_limit_must_be_a_positive_32_bit_int(limit: int) -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        protocol.FrameDecoder(max_frame_size=limit)
