"""The codec's written-out fast paths give what the slow, validating paths give."""

from __future__ import annotations

import random
import sys
import threading
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from protocol_strategies import messages

import protocol
from protocol._codec import message_to_map
from protocol._fields import WIRE_NAMES

_ATTRIBUTE_NAMES = {wire: name for name, wire in WIRE_NAMES.items()}


def _canonical(message: protocol.Message) -> bytes:
    """The body packed from a fresh wire map, as the codec did before fast paths."""
    packed: bytes = msgpack.packb(message_to_map(message))
    return packed


@given(st.lists(messages, max_size=8))
def test_messages_encoded_one_after_another_give_their_own_bytes(
    sent: list[protocol.Message],
) -> None:
    # Each thread's encoders refill maps kept between messages.
    for message in sent:
        assert protocol.encode_message(message) == _canonical(message)
        assert protocol.encode_frame(message)[4:] == _canonical(message)


@given(messages, st.randoms(use_true_random=False))
def test_keys_in_any_order_decode_to_a_message_that_encodes_canonically(
    message: protocol.Message, shuffler: random.Random
) -> None:
    items = list(msgpack.unpackb(protocol.encode_message(message)).items())
    shuffler.shuffle(items)

    decoded = protocol.decode_message(msgpack.packb(dict(items)))

    assert decoded == message
    assert protocol.encode_message(decoded) == _canonical(message)


@given(st.lists(messages, min_size=1, max_size=8))
def test_encoding_in_another_thread_gives_the_same_bytes(
    sent: list[protocol.Message],
) -> None:
    there: list[bytes] = []
    worker = threading.Thread(
        target=lambda: there.extend(protocol.encode_frame(m) for m in sent)
    )
    worker.start()
    worker.join()

    assert there == [protocol.encode_frame(message) for message in sent]


_SCALAR_CLASSES = [
    protocol.Hello,
    protocol.Send,
    protocol.GroupSend,
    protocol.DeliveryAck,
    protocol.GroupJoin,
    protocol.Redirect,
    protocol.Ping,
    protocol.Goodbye,
]
_VALUES = (
    st.none()
    | st.integers(-2, 2**64 - 1)
    | st.sampled_from(["", "a", "a b", "a\n", "x" * 65, "ok", "default"])
    | st.booleans()
)


@pytest.mark.parametrize("cls", _SCALAR_CLASSES, ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_fast_decoding_accepts_exactly_what_the_constructor_accepts(
    cls: Any, data: st.DataObject
) -> None:
    wires = [WIRE_NAMES.get(field.name, field.name) for field in attrs.fields(cls)]
    fields = data.draw(st.dictionaries(st.sampled_from([*wires, "extra"]), _VALUES))
    tag = next(tag for tag, known in protocol.MESSAGE_TYPES.items() if known is cls)

    kwargs = {
        _ATTRIBUTE_NAMES.get(key, key): value
        for key, value in fields.items()
        if key != "extra"
    }
    try:
        expected: Any = cls(**kwargs)
    except (TypeError, ValueError):
        expected = None
    try:
        decoded: Any = protocol.decode_message(msgpack.packb({"t": tag, **fields}))
    except protocol.RemoteProtocolError:
        decoded = None

    assert decoded == expected


def test_a_drained_frame_decoder_keeps_no_reference_to_the_bytes_fed() -> None:
    chunk = protocol.encode_frame(protocol.Ping(n=1)) * 3
    before = sys.getrefcount(chunk)
    decoder = protocol.FrameDecoder()

    decoder.feed(chunk)
    assert sys.getrefcount(chunk) > before
    while decoder.next_frame() is not None:
        pass

    assert sys.getrefcount(chunk) == before
