"""The payload msgnet appends to an inbox partition, and its binary encoding."""

from __future__ import annotations

import attrs
import msgpack

__all__ = ["RECORD_VERSION", "BadRecord", "InboxRecord", "decode_record"]

RECORD_VERSION = 1
"""Bumped on any incompatible change; readers skip records of versions they lack."""


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

    def encode(self) -> bytes:
        """The bytes appended to the log: a msgpack array, version first."""
        encoded: bytes = msgpack.packb(
            [
                RECORD_VERSION,
                self.id,
                self.sender,
                self.to,
                self.group,
                self.body,
                self.ts,
                list(self.recipients),
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


def decode_record(value: bytes) -> InboxRecord:
    """Parse a record's bytes, raising ``BadRecord`` for anything malformed."""
    try:
        fields = msgpack.unpackb(value, raw=False, use_list=True)
    except Exception as exc:
        raise BadRecord(f"record is not msgpack: {exc}") from exc
    if not isinstance(fields, list) or len(fields) != 9 or fields[0] != RECORD_VERSION:
        raise BadRecord(f"record has an unknown shape: {fields!r:.200}")

    _, id_, sender, to, group, body, ts, recipients, origin = fields
    if not (
        isinstance(id_, str)
        and isinstance(sender, str)
        and (to is None or isinstance(to, str))
        and (group is None or isinstance(group, str))
        and (to is None) != (group is None)
        and isinstance(body, str)
        and isinstance(ts, int)
        and isinstance(recipients, list)
        and all(isinstance(user, str) for user in recipients)
        and isinstance(origin, str)
    ):
        raise BadRecord(f"record has fields of the wrong type: {fields!r:.200}")
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
