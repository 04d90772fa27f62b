"""The inbox record's encoding: what the partition owners and history writer read."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgnet._records import (
    RECORD_VERSION,
    BadRecord,
    InboxRecord,
    decode_fields,
    decode_record,
)

_text = st.text(max_size=20)


@st.composite
def records(draw: st.DrawFn) -> InboxRecord:
    one_to_one = draw(st.booleans())
    return InboxRecord(
        id=draw(_text),
        sender=draw(_text),
        to=draw(_text) if one_to_one else None,
        group=None if one_to_one else draw(_text),
        body=draw(st.text(max_size=200)),
        ts=draw(st.integers(min_value=0, max_value=2**63 - 1)),
        recipients=tuple(draw(st.lists(_text, max_size=5))),
        origin=draw(_text),
    )


@given(records(), st.lists(_text, max_size=5))
def test_a_copy_encoded_for_other_recipients_decodes_to_the_record_with_them(
    record: InboxRecord, recipients: list[str]
) -> None:
    decoded = decode_record(record.encode(recipients=recipients))

    assert decoded == InboxRecord(
        id=record.id,
        sender=record.sender,
        to=record.to,
        group=record.group,
        body=record.body,
        ts=record.ts,
        recipients=tuple(recipients),
        origin=record.origin,
    )


@given(records())
def test_decode_fields_gives_the_fields_in_wire_order(record: InboxRecord) -> None:
    assert decode_fields(record.encode()) == (
        record.id,
        record.sender,
        record.to,
        record.group,
        record.body,
        record.ts,
        list(record.recipients),
        record.origin,
    )


_GOOD = [RECORD_VERSION, "m1", "alice", "bob", None, "hi", 1, ["bob"], "s/1"]


@pytest.mark.parametrize(
    ("index", "bad"),
    [
        (0, 99),  # an unknown version
        (1, 5),  # id not a str
        (3, None),  # neither a recipient nor a group
        (4, "g"),  # both a recipient and a group
        (6, True),  # a bool is not a timestamp
        (6, 1.5),
        (7, ["bob", 3]),  # a recipient that is not a str
        (8, b"s/1"),
    ],
)
def test_a_record_with_a_bad_field_is_refused(index: int, bad: object) -> None:
    fields = list(_GOOD)
    fields[index] = bad

    with pytest.raises(BadRecord):
        decode_fields(msgpack.packb(fields))


@pytest.mark.parametrize("value", [b"", b"\xc1", msgpack.packb(_GOOD[:-1])])
def test_bytes_that_are_not_a_record_are_refused(value: bytes) -> None:
    with pytest.raises(BadRecord):
        decode_fields(value)
