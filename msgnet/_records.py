"""The payload msgnet appends to an inbox partition, and its binary encoding."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import attrs
import msgpack

__all__ = [
    "RECORD_VERSION",
    "BadRecord",
    "InboxRecord",
    "RecordFields",
    "decode_fields",
    "decode_record",
]

RECORD_VERSION = 1
"""Bumped on any incompatible change; readers skip records of versions they lack."""


_unpackb = msgpack.unpackb
_packers = threading.local()


class BadRecord(ValueError):
    """A log record that is not a well-formed ``InboxRecord``."""


@attrs.frozen(kw_only=True)
class InboxRecord:
    """One message as it sits in one recipient partition of the inbox log.

    A one-to-one message is appended to the recipient's partition and, when the
    sender's partition differs, once more to the sender's so that the sender's
    other devices get a copy. A group message is appended once per partition
    that holds members. Every copy has the same ``(sender, id)``, which is what
    makes history writes and client-side dedupe idempotent.
    """

    id: str
    """The id the sending client chose; unique per sender."""
    sender: str
    """The authenticated user who sent it."""
    to: str | None
    """The recipient of a one-to-one message; None for a group message."""
    group: str | None
    """The group of a group message; None for a one-to-one message."""
    body: str
    """The text of the message."""
    ts: int
    """When the server accepted it, in milliseconds since the Unix epoch."""
    recipients: tuple[str, ...]
    """The users in this partition to deliver this copy to."""
    origin: str
    """The session id of the sending connection, which does not get it echoed."""

    def encode(self, recipients: Sequence[str] | None = None) -> bytes:
        """The bytes appended to the log: a msgpack array, version first.

        ``recipients`` stands in for the record's own, so one record encodes
        each partition's copy without a copy of the record per partition.
        """
        # A Packer per thread, reused: msgpack.packb builds one per call,
        # which costs more than packing a record.
        try:
            pack = _packers.pack
        except AttributeError:
            pack = _packers.pack = msgpack.Packer().pack
        encoded: bytes = pack(
            [
                RECORD_VERSION,
                self.id,
                self.sender,
                self.to,
                self.group,
                self.body,
                self.ts,
                list(self.recipients if recipients is None else recipients),
                self.origin,
            ]
        )
        return encoded

    @property
    def conversation(self) -> tuple[str, str]:
        """The history key: ``("g", group)`` or ``("u", "a\\x00b")`` for a pair.

        A pair's key sorts the two user ids, so both sides of a conversation
        page through the same rows.
        """
        if self.group is not None:
            return ("g", self.group)
        assert self.to is not None
        low, high = sorted((self.sender, self.to))
        return ("u", f"{low}\x00{high}")


RecordFields = tuple[str, str, str | None, str | None, str, int, list[str], str]
"""An inbox record's fields in wire order, after the version: id, sender, to,
group, body, ts, recipients, origin."""


def decode_fields(value: bytes) -> RecordFields:
    """Parse and check a record's bytes into its fields, without building it.

    The partition owners and the history writer read every record; this is
    ``decode_record`` without the object they do not need. Raises
    ``BadRecord`` for anything malformed.
    """
    try:
        fields = _unpackb(value, raw=False, use_list=True)
    except Exception as exc:
        raise BadRecord(f"record is not msgpack: {exc}") from exc
    if type(fields) is not list or len(fields) != 9 or fields[0] != RECORD_VERSION:
        raise BadRecord(f"record has an unknown shape: {fields!r:.200}")

    _, id_, sender, to, group, body, ts, recipients, origin = fields
    if not (
        type(id_) is str
        and type(sender) is str
        and (type(to) is str if group is None else to is None and type(group) is str)
        and type(body) is str
        and type(ts) is int
        and type(recipients) is list
        and all(type(user) is str for user in recipients)
        and type(origin) is str
    ):
        raise BadRecord(f"record has fields of the wrong type: {fields!r:.200}")
    return id_, sender, to, group, body, ts, recipients, origin


def decode_record(value: bytes) -> InboxRecord:
    """Parse a record's bytes, raising ``BadRecord`` for anything malformed."""
    id_, sender, to, group, body, ts, recipients, origin = decode_fields(value)
    return InboxRecord(
        id=id_,
        sender=sender,
        to=to,
        group=group,
        body=body,
        ts=ts,
        recipients=tuple(recipients),
        origin=origin,
    )
