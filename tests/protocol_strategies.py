"""Hypothesis strategies that build valid instances of every protocol message."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

import protocol

# isprintable() is False exactly for these categories (and True for the space,
# which ids exclude separately).
_ID_ALPHABET = st.characters(
    exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")
)

ids = st.text(_ID_ALPHABET, min_size=1, max_size=protocol.MAX_ID_LENGTH)
optional_ids = st.none() | ids
bodies = st.text(max_size=300)
int64 = st.integers(0, 2**63 - 1)
optional_int64 = st.none() | int64
u32 = st.integers(0, 2**32 - 1)
ports = st.integers(1, 65535)
texts = st.text(max_size=protocol.MAX_TEXT_LENGTH)
short = st.text(min_size=1, max_size=64)
members = st.lists(ids, max_size=20, unique=True).map(tuple)

entries = st.builds(
    protocol.HistoryEntry,
    id=ids,
    sender=ids,
    to=optional_ids,
    group=optional_ids,
    body=bodies,
    ts=int64,
    seq=int64,
)


def _history_request(draw: Any) -> protocol.HistoryRequest:
    conversation = draw(st.sampled_from(["peer", "group"]))
    return protocol.HistoryRequest(
        rid=draw(u32),
        before=draw(optional_int64),
        limit=draw(st.integers(1, protocol.MAX_HISTORY_LIMIT)),
        **{conversation: draw(ids)},
    )


BY_CLASS: dict[type[Any], st.SearchStrategy[Any]] = {
    protocol.Hello: st.builds(
        protocol.Hello,
        version=st.integers(1, 2**32 - 1),
        user=ids,
        token=st.text(min_size=1, max_size=protocol.MAX_TOKEN_LENGTH),
        device=ids,
        resume=optional_int64,
    ),
    protocol.Send: st.builds(protocol.Send, id=ids, to=ids, body=bodies),
    protocol.GroupSend: st.builds(protocol.GroupSend, id=ids, group=ids, body=bodies),
    protocol.DeliveryAck: st.builds(protocol.DeliveryAck, cursor=int64),
    protocol.HistoryRequest: st.composite(_history_request)(),
    protocol.GroupCreate: st.builds(
        protocol.GroupCreate, rid=u32, group=ids, members=members
    ),
    protocol.GroupJoin: st.builds(protocol.GroupJoin, rid=u32, group=ids),
    protocol.GroupLeave: st.builds(protocol.GroupLeave, rid=u32, group=ids),
    protocol.GroupMembers: st.builds(protocol.GroupMembers, rid=u32, group=ids),
    protocol.Welcome: st.builds(
        protocol.Welcome,
        version=st.integers(1, 2**32 - 1),
        user=ids,
        session=short,
        server=short,
        partition=int64,
        cursor=int64,
        max_frame=st.integers(1, 2**32 - 1),
        idle_timeout=st.floats(
            min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False
        ),
    ),
    protocol.Redirect: st.builds(
        protocol.Redirect,
        host=st.text(min_size=1, max_size=255),
        port=ports,
        partition=int64,
        ws_port=st.none() | ports,
    ),
    protocol.SendAck: st.builds(
        protocol.SendAck,
        id=ids,
        ts=int64,
        positions=st.lists(st.tuples(int64, int64), min_size=1, max_size=5).map(tuple),
    ),
    protocol.Deliver: st.builds(
        protocol.Deliver,
        id=ids,
        sender=ids,
        to=optional_ids,
        group=optional_ids,
        body=bodies,
        ts=int64,
        partition=int64,
        offset=int64,
    ),
    protocol.HistoryPage: st.builds(
        protocol.HistoryPage,
        rid=u32,
        messages=st.lists(entries, max_size=5).map(tuple),
        next=optional_int64,
    ),
    protocol.GroupInfo: st.builds(
        protocol.GroupInfo, rid=u32, group=ids, members=members
    ),
    protocol.Ping: st.builds(protocol.Ping, n=u32),
    protocol.Pong: st.builds(protocol.Pong, n=u32),
    protocol.Error: st.builds(
        protocol.Error,
        code=st.sampled_from(protocol.ErrorCode) | short,
        text=texts,
        fatal=st.booleans(),
        rid=st.none() | u32,
        id=optional_ids,
    ),
    protocol.Goodbye: st.builds(protocol.Goodbye, reason=texts),
}

messages: st.SearchStrategy[protocol.Message] = st.one_of(*BY_CLASS.values())


def only_sent_by(role: protocol.Role) -> st.SearchStrategy[protocol.Message]:
    """Open-state messages of the kinds only the given role may send."""
    if role is protocol.Role.CLIENT:
        kinds: list[type[Any]] = [
            protocol.Send,
            protocol.GroupSend,
            protocol.DeliveryAck,
            protocol.HistoryRequest,
            protocol.GroupCreate,
            protocol.GroupJoin,
            protocol.GroupLeave,
            protocol.GroupMembers,
        ]
    else:
        kinds = [
            protocol.SendAck,
            protocol.Deliver,
            protocol.HistoryPage,
            protocol.GroupInfo,
        ]
    return st.one_of(*(BY_CLASS[kind] for kind in kinds))
