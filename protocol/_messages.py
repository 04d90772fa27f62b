"""The message classes of wire protocol v1 and the table of their type tags."""

from __future__ import annotations

from typing import Any, TypeAlias

import attrs

from ._errors import ErrorCode
from ._fields import (
    MAX_GROUP_MEMBERS,
    MAX_HISTORY_LIMIT,
    MAX_ID_LENGTH,
    MAX_TEXT_LENGTH,
    MAX_TOKEN_LENGTH,
    check_body,
    check_bool,
    check_id,
    check_ids,
    check_int,
    check_optional_id,
    check_optional_int,
    check_optional_port,
    check_optional_u32,
    check_port,
    check_positions,
    check_positive_seconds,
    check_str,
    check_u32,
    to_float,
    to_id_tuple,
    to_positions,
)

__all__ = [
    "MESSAGE_TYPES",
    "Deliver",
    "DeliveryAck",
    "Error",
    "Goodbye",
    "GroupCreate",
    "GroupInfo",
    "GroupJoin",
    "GroupLeave",
    "GroupMembers",
    "GroupSend",
    "Hello",
    "HistoryEntry",
    "HistoryPage",
    "HistoryRequest",
    "Message",
    "Ping",
    "Pong",
    "Redirect",
    "Send",
    "SendAck",
    "Welcome",
]

# Field order in every class is the wire order: encoders write "t" first, then
# the fields in the order declared here (docs/protocol.md, "Key order").
#
# The classes keep their fields in an instance __dict__ rather than slots: the
# codec reads the values from that dict, and makes a decoded map that passed the
# same checks the validators make the dict itself, which keeps a round trip
# close to the cost of msgpack itself.

_check_offset = check_int()
_check_version = check_int(1, 2**32)
_check_short = check_str(1, MAX_ID_LENGTH)
_check_text = check_str(0, MAX_TEXT_LENGTH)


# Client -> server


@attrs.frozen(kw_only=True, slots=False)
class Hello:
    """The client's first message: who it is and where to resume delivery from."""

    version: int = attrs.field(validator=_check_version)
    """The protocol version the client speaks."""
    user: str = attrs.field(validator=check_id)
    """The user id the client authenticates as."""
    token: str = attrs.field(validator=check_str(1, MAX_TOKEN_LENGTH))
    """The credential proving the user id."""
    device: str = attrs.field(default="default", validator=check_id)
    """Which of the user's devices this is; delivery cursors are kept per device."""
    resume: int | None = attrs.field(default=None, validator=check_optional_int)
    """Inbox offset to catch up from; None lets the server pick (see the docs)."""


@attrs.frozen(kw_only=True, slots=False)
class Send:
    """A one-to-one message from the client to another user."""

    id: str = attrs.field(validator=check_id)
    """Client-chosen message id, reused verbatim when the send is retried."""
    to: str = attrs.field(validator=check_id)
    """The recipient's user id."""
    body: str = attrs.field(validator=check_body)
    """The message text."""


@attrs.frozen(kw_only=True, slots=False)
class GroupSend:
    """A message from the client to every member of a group."""

    id: str = attrs.field(validator=check_id)
    """Client-chosen message id, reused verbatim when the send is retried."""
    group: str = attrs.field(validator=check_id)
    """The group's name."""
    body: str = attrs.field(validator=check_body)
    """The message text."""


@attrs.frozen(kw_only=True, slots=False)
class DeliveryAck:
    """The client has processed every delivery before ``cursor`` in its inbox."""

    cursor: int = attrs.field(validator=_check_offset)
    """The offset after the last delivery processed, in the client's inbox partition."""


def _check_one_conversation(
    instance: HistoryRequest, attribute: attrs.Attribute[Any], value: str | None
) -> None:
    check_optional_id(instance, attribute, value)

    # attrs runs validators after every field is set, so peer is readable here.
    if (instance.peer is None) == (value is None):
        raise ValueError(
            "HistoryRequest needs exactly one of field 'with' and field 'group', "
            f"got with={instance.peer!r} and group={value!r}"
        )


@attrs.frozen(kw_only=True, slots=False)
class HistoryRequest:
    """Ask for a page of stored history of one conversation."""

    rid: int = attrs.field(validator=check_u32)
    """Request id, echoed in the reply."""
    peer: str | None = attrs.field(default=None, validator=check_optional_id)
    """Wire name ``with``: the other user of a one-to-one conversation."""
    group: str | None = attrs.field(default=None, validator=_check_one_conversation)
    """The group whose conversation is wanted."""
    before: int | None = attrs.field(default=None, validator=check_optional_int)
    """Paging cursor from a previous page's ``next``; None asks for the newest."""
    limit: int = attrs.field(default=50, validator=check_int(1, MAX_HISTORY_LIMIT + 1))
    """Most entries wanted in the page."""


@attrs.frozen(kw_only=True, slots=False)
class GroupCreate:
    """Create a group with an initial member list (the creator is added too)."""

    rid: int = attrs.field(validator=check_u32)
    """Request id, echoed in the reply."""
    group: str = attrs.field(validator=check_id)
    """The new group's name."""
    members: tuple[str, ...] = attrs.field(
        default=(), converter=to_id_tuple, validator=check_ids(MAX_GROUP_MEMBERS)
    )
    """User ids to add, without duplicates."""


@attrs.frozen(kw_only=True, slots=False)
class GroupJoin:
    """Join an existing group."""

    rid: int = attrs.field(validator=check_u32)
    """Request id, echoed in the reply."""
    group: str = attrs.field(validator=check_id)
    """The group's name."""


@attrs.frozen(kw_only=True, slots=False)
class GroupLeave:
    """Leave a group."""

    rid: int = attrs.field(validator=check_u32)
    """Request id, echoed in the reply."""
    group: str = attrs.field(validator=check_id)
    """The group's name."""


@attrs.frozen(kw_only=True, slots=False)
class GroupMembers:
    """Ask for a group's member list."""

    rid: int = attrs.field(validator=check_u32)
    """Request id, echoed in the reply."""
    group: str = attrs.field(validator=check_id)
    """The group's name."""


# Server -> client


@attrs.frozen(kw_only=True, slots=False)
class Welcome:
    """The server accepted Hello: the connection is open."""

    version: int = attrs.field(validator=_check_version)
    """The protocol version both sides now speak."""
    user: str = attrs.field(validator=check_id)
    """The authenticated user id."""
    session: str = attrs.field(validator=_check_short)
    """Server-chosen session id, for logs and support."""
    server: str = attrs.field(validator=_check_short)
    """Name of the server (slot) the client is connected to."""
    partition: int = attrs.field(validator=_check_offset)
    """The user's inbox partition."""
    cursor: int = attrs.field(validator=_check_offset)
    """Inbox offset this connection delivers from (catch-up included)."""
    max_frame: int = attrs.field(validator=check_int(1, 2**32))
    """Largest frame body, in bytes, the server accepts."""
    idle_timeout: float = attrs.field(
        converter=to_float, validator=check_positive_seconds
    )
    """Seconds of silence from the client after which the server closes."""


@attrs.frozen(kw_only=True, slots=False)
class Redirect:
    """Another server owns the user's partition: reconnect there and say Hello."""

    host: str = attrs.field(validator=check_str(1, 255))
    """Host name or address of the owning server."""
    port: int = attrs.field(validator=check_port)
    """Its TCP port."""
    partition: int = attrs.field(validator=_check_offset)
    """The user's inbox partition."""
    ws_port: int | None = attrs.field(default=None, validator=check_optional_port)
    """Its WebSocket port, if it serves one."""


@attrs.frozen(kw_only=True, slots=False)
class SendAck:
    """A Send or GroupSend is durable in the log."""

    id: str = attrs.field(validator=check_id)
    """The acknowledged message id."""
    ts: int = attrs.field(validator=_check_offset)
    """Server time of acceptance, milliseconds since the Unix epoch."""
    positions: tuple[tuple[int, int], ...] = attrs.field(
        converter=to_positions, validator=check_positions
    )
    """The (partition, offset) log positions the message was appended at."""


@attrs.frozen(kw_only=True, slots=False)
class Deliver:
    """A message delivered to the client from its inbox."""

    id: str = attrs.field(validator=check_id)
    """The sender's message id."""
    sender: str = attrs.field(validator=check_id)
    """Wire name ``from``: the sending user."""
    to: str | None = attrs.field(default=None, validator=check_optional_id)
    """The recipient user for a one-to-one message; None for group messages."""
    group: str | None = attrs.field(default=None, validator=check_optional_id)
    """The group for a group message."""
    body: str = attrs.field(validator=check_body)
    """The message text."""
    ts: int = attrs.field(validator=_check_offset)
    """Server time of acceptance, milliseconds since the Unix epoch."""
    partition: int = attrs.field(validator=_check_offset)
    """The recipient's inbox partition."""
    offset: int = attrs.field(validator=_check_offset)
    """The delivery's offset in that partition."""


@attrs.frozen(kw_only=True, slots=False)
class HistoryEntry:
    """One stored message inside a HistoryPage (a nested map, not a message)."""

    id: str = attrs.field(validator=check_id)
    """The sender's message id."""
    sender: str = attrs.field(validator=check_id)
    """Wire name ``from``: the sending user."""
    to: str | None = attrs.field(default=None, validator=check_optional_id)
    """The recipient user for a one-to-one message."""
    group: str | None = attrs.field(default=None, validator=check_optional_id)
    """The group for a group message."""
    body: str = attrs.field(validator=check_body)
    """The message text."""
    ts: int = attrs.field(validator=_check_offset)
    """Server time of acceptance, milliseconds since the Unix epoch."""
    seq: int = attrs.field(validator=_check_offset)
    """The history store's ordering key."""


def _check_entries(
    instance: HistoryPage, attribute: attrs.Attribute[Any], value: object
) -> None:
    if type(value) is tuple and len(value) <= MAX_HISTORY_LIMIT:
        if all(type(entry) is HistoryEntry for entry in value):
            return
        bad = next(entry for entry in value if type(entry) is not HistoryEntry)
        raise TypeError(
            f"HistoryPage field 'messages' must hold HistoryEntry values, got {bad!r}"
        )
    raise ValueError(
        f"HistoryPage field 'messages' must be a list of at most {MAX_HISTORY_LIMIT} "
        f"entries, got {type(value).__name__} of length {len(value)}"
        if isinstance(value, tuple | list)
        else f"HistoryPage field 'messages' must be a list, got {value!r}"
    )


def _to_entries(
    value: tuple[HistoryEntry, ...] | list[HistoryEntry],
) -> tuple[HistoryEntry, ...]:
    return tuple(value) if isinstance(value, list) else value


@attrs.frozen(kw_only=True, slots=False)
class HistoryPage:
    """A page of history, oldest first."""

    rid: int = attrs.field(validator=check_u32)
    """The request id of the HistoryRequest answered."""
    messages: tuple[HistoryEntry, ...] = attrs.field(
        converter=_to_entries, validator=_check_entries
    )
    """The entries, oldest first."""
    next: int | None = attrs.field(default=None, validator=check_optional_int)
    """Pass as ``before`` to get the page before this one; None: no older entries."""


@attrs.frozen(kw_only=True, slots=False)
class GroupInfo:
    """Reply to a group request: the group's members after it took effect."""

    rid: int = attrs.field(validator=check_u32)
    """The request id answered."""
    group: str = attrs.field(validator=check_id)
    """The group's name."""
    members: tuple[str, ...] = attrs.field(
        converter=to_id_tuple, validator=check_ids(MAX_GROUP_MEMBERS)
    )
    """The member user ids."""


# Both directions


@attrs.frozen(kw_only=True, slots=False)
class Ping:
    """Liveness probe; the peer answers with a Pong carrying the same ``n``."""

    n: int = attrs.field(default=0, validator=check_u32)
    """Any number, echoed in the Pong."""


@attrs.frozen(kw_only=True, slots=False)
class Pong:
    """Answer to a Ping."""

    n: int = attrs.field(default=0, validator=check_u32)
    """The ``n`` of the Ping answered."""


_KNOWN_CODES: dict[str, ErrorCode | str] = {code.value: code for code in ErrorCode}


def _check_code(
    instance: Error, attribute: attrs.Attribute[Any], value: object
) -> None:
    # ErrorCode members are str subclasses, so the exact-type check of the
    # scalar validators would refuse them.
    if not (isinstance(value, str) and 1 <= len(value) <= MAX_ID_LENGTH):
        raise ValueError(
            f"Error field 'code' must be a str of 1..{MAX_ID_LENGTH} characters, "
            f"got {value!r:.80}"
        )


def _to_error_code(value: ErrorCode | str) -> ErrorCode | str:
    # Known codes become ErrorCode members; codes added by a newer peer stay str.
    if type(value) is str:
        return _KNOWN_CODES.get(value, value)
    return value


@attrs.frozen(kw_only=True, slots=False)
class Error:
    """Something went wrong; if ``fatal`` the sender closes the connection after it."""

    code: ErrorCode | str = attrs.field(converter=_to_error_code, validator=_check_code)
    """What went wrong: an ErrorCode value, or a code from a newer protocol."""
    text: str = attrs.field(default="", validator=_check_text)
    """Human-readable detail."""
    fatal: bool = attrs.field(default=False, validator=check_bool)
    """Whether the connection closes after this error."""
    rid: int | None = attrs.field(default=None, validator=check_optional_u32)
    """The request id the error answers, if any."""
    id: str | None = attrs.field(default=None, validator=check_optional_id)
    """The message id the error refers to, if any."""


@attrs.frozen(kw_only=True, slots=False)
class Goodbye:
    """The sender is closing the connection on purpose."""

    reason: str = attrs.field(default="", validator=_check_text)
    """Human-readable reason."""


Message: TypeAlias = (
    Hello
    | Send
    | GroupSend
    | DeliveryAck
    | HistoryRequest
    | GroupCreate
    | GroupJoin
    | GroupLeave
    | GroupMembers
    | Welcome
    | Redirect
    | SendAck
    | Deliver
    | HistoryPage
    | GroupInfo
    | Ping
    | Pong
    | Error
    | Goodbye
)
"""Any message that can travel in a frame."""

MESSAGE_TYPES: dict[str, type[Message]] = {
    "hello": Hello,
    "send": Send,
    "gsend": GroupSend,
    "dack": DeliveryAck,
    "history": HistoryRequest,
    "group_create": GroupCreate,
    "group_join": GroupJoin,
    "group_leave": GroupLeave,
    "group_members": GroupMembers,
    "welcome": Welcome,
    "redirect": Redirect,
    "send_ack": SendAck,
    "deliver": Deliver,
    "history_page": HistoryPage,
    "group_info": GroupInfo,
    "ping": Ping,
    "pong": Pong,
    "error": Error,
    "bye": Goodbye,
}
"""The one table of wire type tags: ``"t"`` value -> message class."""
