"""Write protocol-v1.json, the golden frames of wire protocol v1.

Run from the repository root: ``PYTHONPATH=. python tests/vectors/make_vectors.py``.

The file pins the exact bytes of the wire format, so a change in it is a change
of the protocol. Regenerate it only on a deliberate wire change (together with
docs/protocol.md and, if old peers cannot read the new bytes, a new protocol
version), never to make a failing test pass.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import protocol
from protocol._codec import message_to_map

OUTPUT = pathlib.Path(__file__).with_name("protocol-v1.json")

_ENTRY_ONE = protocol.HistoryEntry(
    id="m-17", sender="alice", to="bob", body="are you there?", ts=1733240000000, seq=41
)
_ENTRY_TWO = protocol.HistoryEntry(
    id="g-3",
    sender="carol",
    group="climbers",
    body="Saturday 9am",
    ts=1733240005000,
    seq=42,
)

SAMPLES: list[tuple[str, protocol.Message]] = [
    (
        "hello",
        protocol.Hello(
            version=1, user="alice", token="secret-token", device="phone", resume=1200
        ),
    ),
    ("hello_defaults", protocol.Hello(version=1, user="alice", token="t")),
    ("send", protocol.Send(id="m-1", to="bob", body="hi bob")),
    ("send_empty_body", protocol.Send(id="m-2", to="bob", body="")),
    ("gsend", protocol.GroupSend(id="g-1", group="climbers", body="hello all")),
    ("dack", protocol.DeliveryAck(cursor=1201)),
    ("history_with", protocol.HistoryRequest(rid=7, peer="bob", before=40, limit=20)),
    ("history_group", protocol.HistoryRequest(rid=8, group="climbers")),
    (
        "group_create",
        protocol.GroupCreate(rid=1, group="climbers", members=("bob", "carol")),
    ),
    ("group_join", protocol.GroupJoin(rid=2, group="climbers")),
    ("group_leave", protocol.GroupLeave(rid=3, group="climbers")),
    ("group_members", protocol.GroupMembers(rid=4, group="climbers")),
    (
        "welcome",
        protocol.Welcome(
            version=1,
            user="alice",
            session="s-9f2c",
            server="slot-0",
            partition=3,
            cursor=1200,
            max_frame=1048576,
            idle_timeout=60.0,
        ),
    ),
    (
        "redirect",
        protocol.Redirect(host="10.0.0.7", port=7000, partition=3, ws_port=7001),
    ),
    (
        "redirect_no_ws",
        protocol.Redirect(host="chat-2.example", port=7000, partition=5),
    ),
    ("send_ack", protocol.SendAck(id="m-1", ts=1733240000000, positions=((3, 1200),))),
    (
        "send_ack_group",
        protocol.SendAck(id="g-1", ts=1733240000001, positions=((1, 7), (3, 1201))),
    ),
    (
        "deliver",
        protocol.Deliver(
            id="m-1",
            sender="alice",
            to="bob",
            body="hi bob",
            ts=1733240000000,
            partition=4,
            offset=99,
        ),
    ),
    (
        "deliver_group",
        protocol.Deliver(
            id="g-1",
            sender="alice",
            group="climbers",
            body="hello all",
            ts=1733240000001,
            partition=4,
            offset=100,
        ),
    ),
    (
        "history_page",
        protocol.HistoryPage(rid=7, messages=(_ENTRY_ONE, _ENTRY_TWO), next=41),
    ),
    ("history_page_last", protocol.HistoryPage(rid=8, messages=())),
    (
        "group_info",
        protocol.GroupInfo(rid=1, group="climbers", members=("alice", "bob", "carol")),
    ),
    ("ping", protocol.Ping(n=5)),
    ("pong", protocol.Pong(n=5)),
    (
        "error",
        protocol.Error(
            code=protocol.ErrorCode.NOT_FOUND, text="no group 'x'", fatal=False, rid=9
        ),
    ),
    (
        "error_fatal",
        protocol.Error(
            code=protocol.ErrorCode.AUTH_FAILED, text="bad token", fatal=True
        ),
    ),
    (
        "error_about_message",
        protocol.Error(
            code=protocol.ErrorCode.RATE_LIMITED, text="slow down", id="m-5"
        ),
    ),
    ("bye", protocol.Goodbye(reason="client quit")),
]


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, protocol.ErrorCode):
        return value.value
    return value


def build() -> list[dict[str, Any]]:
    """Return the vectors: name, wire map as JSON, and the whole frame in hex."""
    return [
        {
            "name": name,
            "message": _jsonable(message_to_map(message)),
            "hex": protocol.encode_frame(message).hex(),
        }
        for name, message in SAMPLES
    ]


def main() -> None:
    OUTPUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {len(SAMPLES)} vectors to {OUTPUT}")


if __name__ == "__main__":
    main()
