"""Bad input from a client: each gets a clear Error frame, and the server goes on.

Frames are built by hand (``wire``) where the protocol package would refuse to
encode them. After every fatal error the server closes that connection, and a
fresh well-behaved client on the same server must still be served.
"""

from __future__ import annotations

import time
from typing import Any

import jwt
import msgpack
import pytest
import trio
from support import (
    SECRET,
    WAIT,
    assert_server_still_serves,
    client,
    expect_fatal_error_then_close,
    next_message,
    raw_connection,
    running_server,
    token,
)

import protocol
from msgnet import RequestFailed, RunningServer, ServerRefused, mint_token
from protocol import ErrorCode


def wire(body: bytes) -> bytes:
    """One frame around ``body``, whatever it holds."""
    return len(body).to_bytes(4, "big") + body


def wire_map(**fields: Any) -> bytes:
    return wire(msgpack.packb(fields))


SEND = {"t": "send", "id": "m1", "to": "bob", "body": "hi"}

BEFORE_HELLO = {
    "malformed msgpack": (wire(b"\xc1\xc1\xc1"), ErrorCode.BAD_FRAME),
    "msgpack but not a map": (wire(msgpack.packb([1, 2, 3])), ErrorCode.BAD_FRAME),
    "unknown type": (wire_map(t="teleport", to="bob"), ErrorCode.UNKNOWN_TYPE),
    "type tag not a string": (wire_map(t=7), ErrorCode.BAD_MESSAGE),
    "send before hello": (wire_map(**SEND), ErrorCode.UNEXPECTED_MESSAGE),
    "server-only welcome": (
        protocol.encode_frame(
            protocol.Welcome(
                version=1,
                user="alice",
                session="s",
                server="x",
                partition=0,
                cursor=0,
                max_frame=1024,
                idle_timeout=60.0,
            )
        ),
        ErrorCode.UNEXPECTED_MESSAGE,
    ),
    "zero-length frame": (b"\x00\x00\x00\x00", ErrorCode.BAD_FRAME),
}

AFTER_WELCOME = {
    "malformed msgpack": (wire(b"\x92\xc1"), ErrorCode.BAD_FRAME),
    "msgpack but not a map": (wire(msgpack.packb("send")), ErrorCode.BAD_FRAME),
    "unknown type": (wire_map(t="teleport"), ErrorCode.UNKNOWN_TYPE),
    "second hello": (
        wire_map(t="hello", version=1, user="alice", token=token("alice")),
        ErrorCode.UNEXPECTED_MESSAGE,
    ),
    "server-only deliver": (
        wire_map(
            t="deliver",
            id="x",
            **{"from": "bob"},
            to="alice",
            body="forged",
            ts=1,
            partition=0,
            offset=0,
        ),
        ErrorCode.UNEXPECTED_MESSAGE,
    ),
    "server-only send ack": (
        wire_map(t="send_ack", id="x", ts=1, positions=[[0, 0]]),
        ErrorCode.UNEXPECTED_MESSAGE,
    ),
    "id with a space": (wire_map(**{**SEND, "id": "m 1"}), ErrorCode.BAD_MESSAGE),
    "recipient too long": (wire_map(**{**SEND, "to": "b" * 65}), ErrorCode.BAD_MESSAGE),
    "body not a string": (wire_map(**{**SEND, "body": 42}), ErrorCode.BAD_MESSAGE),
    "missing field": (wire_map(t="send", id="m1", to="bob"), ErrorCode.BAD_MESSAGE),
    "history with peer and group": (
        wire_map(t="history", rid=1, group="g", **{"with": "bob"}),
        ErrorCode.BAD_MESSAGE,
    ),
    "history limit too big": (
        wire_map(t="history", rid=1, limit=10_000, **{"with": "bob"}),
        ErrorCode.BAD_MESSAGE,
    ),
    "ping counter negative": (wire_map(t="ping", n=-1), ErrorCode.BAD_MESSAGE),
}


@pytest.mark.parametrize(
    ("frame", "code"), list(BEFORE_HELLO.values()), ids=list(BEFORE_HELLO)
)
async def test_bad_first_frame_gets_an_error_and_a_close(
    frame: bytes, code: ErrorCode
) -> None:
    async with running_server() as server:
        async with raw_connection(server) as raw:
            await raw.stream.send_all(frame)
            await expect_fatal_error_then_close(raw, code)
        await assert_server_still_serves(server)


@pytest.mark.parametrize(
    ("frame", "code"), list(AFTER_WELCOME.values()), ids=list(AFTER_WELCOME)
)
async def test_bad_frame_after_welcome_gets_an_error_and_a_close(
    frame: bytes, code: ErrorCode
) -> None:
    async with running_server() as server:
        async with raw_connection(server) as raw:
            assert isinstance(await raw.hello("alice"), protocol.Welcome)
            await raw.stream.send_all(frame)
            await expect_fatal_error_then_close(raw, code)
        await assert_server_still_serves(server)


def expired_token(user: str) -> str:
    now = int(time.time())
    claims = {"sub": user, "iat": now - 3600, "exp": now - 60}
    return jwt.encode(claims, SECRET, algorithm="HS256")


BAD_TOKENS = {
    "garbage": ("alice", "not-a-token"),
    "expired": ("alice", expired_token("alice")),
    "other secret": ("alice", mint_token("another-secret-" + "y" * 40, "alice")),
    "alice's token for bob": ("bob", token("alice")),
    "unsigned": (
        "alice",
        jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "", "none"),
    ),
}


@pytest.mark.parametrize(
    ("user", "bad_token"), list(BAD_TOKENS.values()), ids=list(BAD_TOKENS)
)
async def test_hello_with_a_bad_token_gets_auth_failed(
    user: str, bad_token: str
) -> None:
    async with running_server() as server:
        async with raw_connection(server) as raw:
            await raw.send(
                protocol.Hello(version=1, user=user, token=bad_token, device="d")
            )
            await expect_fatal_error_then_close(raw, ErrorCode.AUTH_FAILED)

        try:
            async with client(server, user, token=bad_token):
                raise AssertionError("a bad token was accepted")
        except ServerRefused as refused:
            assert refused.code == ErrorCode.AUTH_FAILED
        await assert_server_still_serves(server)


async def test_hello_with_an_unsupported_version_is_refused_by_name() -> None:
    async with running_server() as server:
        async with raw_connection(server) as raw:
            await raw.stream.send_all(
                wire_map(t="hello", version=99, user="alice", token=token("alice"))
            )
            text = await expect_fatal_error_then_close(
                raw, ErrorCode.UNSUPPORTED_VERSION
            )
            assert "99" in text
        await assert_server_still_serves(server)


async def test_a_sender_cannot_claim_another_users_name() -> None:
    """Send has no ``from``: a forged one is ignored, the delivery names the sender."""
    async with (
        running_server() as server,
        client(server, "bob") as bob,
        raw_connection(server) as raw,
    ):
        assert isinstance(await raw.hello("mallory"), protocol.Welcome)
        await raw.stream.send_all(wire_map(**SEND, **{"from": "alice"}))
        ack = await next_message(raw)
        assert isinstance(ack, protocol.SendAck)

        with trio.fail_after(WAIT):
            delivery = await bob.receive()
        assert (delivery.id, delivery.sender) == ("m1", "mallory")

        page = await bob.history(peer="alice")
        assert page.messages == ()


async def test_history_only_shows_conversations_the_caller_is_part_of() -> None:
    async with (
        running_server() as server,
        client(server, "alice") as alice,
        client(server, "mallory") as mallory,
    ):
        await alice.send("bob", "private to bob")
        await alice.create_group("team", ["bob"])
        await alice.send_group("team", "team only")
        await mallory.send("bob", "from mallory")
        await wait_until_stored(server)

        # Asking for "the conversation with bob" gives mallory her own only.
        page = await mallory.history(peer="bob")
        assert [entry.body for entry in page.messages] == ["from mallory"]
        page = await mallory.history(peer="alice")
        assert page.messages == ()

        try:
            await mallory.history(group="team")
        except RequestFailed as refused:
            assert refused.code == ErrorCode.FORBIDDEN
        else:
            raise AssertionError("a non-member read a group's history")

        # The same requests from a member do see the messages.
        page = await alice.history(group="team")
        assert [entry.body for entry in page.messages] == ["team only"]


async def wait_until_stored(server: RunningServer) -> None:
    """Wait for the history writer to store everything appended so far."""
    context = server.context
    with trio.fail_after(WAIT):
        for partition in range(context.backplane.partitions):
            end = await context.backplane.end_offset(partition)
            while (
                await context.backplane.committed(context.history_group, partition) or 0
            ) < end:
                await trio.sleep(0.01)
