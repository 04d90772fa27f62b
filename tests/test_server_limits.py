"""Every configurable limit of the server, over real TCP on port 0.

Each test sets the limit small through ``running_server(...)`` and waits on
what the server sends or on the server closing the connection, never on a
fixed sleep.
"""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack

import trio
from support import (
    WAIT,
    RawConnection,
    assert_server_still_serves,
    client,
    expect_fatal_error_then_close,
    next_message,
    raw_connection,
    running_server,
    token,
    users_in_same_partition,
)
from test_server import wait_for_history

import protocol
from msgnet import RequestFailed, RunningServer, ServerRefused
from protocol import ErrorCode

# --- connections -----------------------------------------------------------------


async def test_connection_beyond_max_connections_gets_server_full_then_close() -> None:
    async with (
        running_server(max_connections=2) as server,
        client(server, "alice") as alice,
        client(server, "bob") as bob,
    ):
        async with raw_connection(server) as extra:
            text = await expect_fatal_error_then_close(extra, ErrorCode.SERVER_FULL)
            assert "2" in text

            try:
                async with client(server, "carol"):
                    raise AssertionError("a third connection was accepted")
            except ServerRefused as refused:
                assert refused.code == ErrorCode.SERVER_FULL

            # The two connections inside the limit carry on as before.
            await alice.send("bob", "unaffected")
            with trio.fail_after(WAIT):
                assert (await bob.receive()).body == "unaffected"


# --- frame size ------------------------------------------------------------------


async def test_length_prefix_over_max_frame_size_is_refused_before_the_body() -> None:
    async with running_server(max_frame_size=1024) as server:
        async with raw_connection(server) as raw:
            welcome = await raw.hello("alice")
            assert isinstance(welcome, protocol.Welcome)
            assert welcome.max_frame == 1024

            # Only the prefix is sent: the answer must not wait for 1025 bytes.
            await raw.stream.send_all((1025).to_bytes(4, "big"))
            text = await expect_fatal_error_then_close(raw, ErrorCode.FRAME_TOO_LARGE)
            assert "1025" in text

            await assert_server_still_serves(server)


async def test_oversized_prefix_during_the_handshake_is_refused_too() -> None:
    async with running_server(max_frame_size=1024) as server:
        async with raw_connection(server) as raw:
            await raw.stream.send_all((2**32 - 1).to_bytes(4, "big"))
            await expect_fatal_error_then_close(raw, ErrorCode.FRAME_TOO_LARGE)


async def test_send_whose_delivery_would_not_fit_a_frame_is_refused() -> None:
    """A body that fits the Send frame but not the longer Deliver frame.

    Accepting it would leave a record that no recipient can ever be sent.
    """
    async with (
        running_server(max_frame_size=1024) as server,
        client(server, "alice") as alice,
        client(server, "bob") as bob,
    ):
        try:
            await alice.send("bob", "x" * 930, id="too-big")
        except RequestFailed as refused:
            assert refused.code == ErrorCode.BAD_MESSAGE
            assert "too-big" in refused.text
        else:
            raise AssertionError("an undeliverable message was accepted")

        await alice.send("bob", "x" * 100, id="fits")
        with trio.fail_after(WAIT):
            assert (await bob.receive()).id == "fits"


async def test_history_page_over_the_frame_limit_is_cut_and_pages_on() -> None:
    async with (
        running_server(max_frame_size=4096) as server,
        client(server, "alice") as alice,
    ):
        bodies = [f"{n:02d}" + "y" * 900 for n in range(10)]
        for body in bodies:
            await alice.send("bob", body)
        await wait_for_history(server, range(4))

        pages: list[protocol.HistoryPage] = []
        before = None
        while True:
            page = await alice.history(peer="bob", before=before, limit=200)
            pages.append(page)
            if page.next is None:
                break
            before = page.next

    assert len(pages) > 1
    assert all(len(page.messages) < len(bodies) for page in pages)
    seen = [entry.body for page in reversed(pages) for entry in page.messages]
    assert seen == bodies


# --- timeouts --------------------------------------------------------------------


async def test_silent_connection_gets_handshake_timeout_then_close() -> None:
    async with running_server(handshake_timeout=0.2) as server:
        async with raw_connection(server) as raw:
            text = await expect_fatal_error_then_close(raw, ErrorCode.HANDSHAKE_TIMEOUT)
            assert "0.2" in text
            await assert_server_still_serves(server)


async def test_half_a_hello_frame_gets_handshake_timeout_then_close() -> None:
    async with running_server(handshake_timeout=0.2) as server:
        async with raw_connection(server) as raw:
            hello = protocol.Hello(version=1, user="alice", token=token("alice"))
            frame = protocol.encode_frame(hello)
            await raw.stream.send_all(frame[: len(frame) // 2])
            await expect_fatal_error_then_close(raw, ErrorCode.HANDSHAKE_TIMEOUT)


async def test_client_that_never_answers_pings_is_pinged_then_dropped() -> None:
    async with running_server(idle_timeout=0.3) as server:
        async with raw_connection(server) as raw:
            assert isinstance(await raw.hello("alice"), protocol.Welcome)

            pings = 0
            while isinstance(message := await next_message(raw), protocol.Ping):
                pings += 1
            assert pings >= 1
            assert isinstance(message, protocol.Error)
            assert (message.code, message.fatal) == (ErrorCode.IDLE_TIMEOUT, True)
            assert await next_message(raw) is None

            await assert_server_still_serves(server)


async def test_client_that_answers_pings_outlives_several_idle_timeouts() -> None:
    """The Client answers pings by itself; it sends nothing else meanwhile.

    Three silent raw connections opened one after another are each dropped for
    idleness, so the Client has lived through at least three idle timeouts.
    """
    async with (
        running_server(idle_timeout=0.3) as server,
        client(server, "alice") as alice,
    ):
        for _ in range(3):
            async with raw_connection(server) as raw:
                assert isinstance(await raw.hello("silent"), protocol.Welcome)
                while isinstance(message := await next_message(raw), protocol.Ping):
                    pass
                assert isinstance(message, protocol.Error)
                assert message.code == ErrorCode.IDLE_TIMEOUT
                assert await next_message(raw) is None

        await alice.ping()
        assert alice.reconnects == 0
        users = {session.user for session in server.context.sessions}
        assert users == {"alice"}


# --- rate limit ------------------------------------------------------------------


async def test_burst_over_the_rate_limit_is_refused_per_message_not_delivered() -> None:
    async with (
        running_server(rate_limit=1.0, rate_burst=3) as server,
        client(server, "bob") as bob,
        client(server, "carol") as carol,
    ):
        async with raw_connection(server) as raw:
            assert isinstance(await raw.hello("alice"), protocol.Welcome)
            ids = [f"m{n}" for n in range(10)]
            await raw.stream.send_all(
                b"".join(
                    raw.protocol.send(protocol.Send(id=id, to="bob", body=id))
                    for id in ids
                )
            )

            accepted: list[str] = []
            refused: list[str] = []
            while len(accepted) + len(refused) < len(ids):
                reply = await next_message(raw)
                if isinstance(reply, protocol.SendAck):
                    accepted.append(reply.id)
                else:
                    assert isinstance(reply, protocol.Error), reply
                    assert (reply.code, reply.fatal) == (ErrorCode.RATE_LIMITED, False)
                    assert reply.id is not None
                    refused.append(reply.id)
            assert sorted(accepted + refused) == sorted(ids)
            assert 3 <= len(accepted) < len(ids)

            # Still usable: a ping is answered on the same connection.
            await raw.send(protocol.Ping(n=7))
            assert await next_message(raw) == protocol.Pong(n=7)

            # Bob gets exactly the accepted ones: carol's marker, appended to his
            # partition after all of them, comes right after.
            await carol.send("bob", "marker", id="marker")
            received = []
            with trio.fail_after(WAIT):
                while (delivery := await bob.receive()).id != "marker":
                    received.append(delivery.id)
            assert received == accepted


# --- slow consumer ---------------------------------------------------------------


async def open_unread_connection(
    server: RunningServer, user: str
) -> tuple[RawConnection, protocol.Welcome]:
    """A connection whose receive buffer is tiny and which will never be read."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((server.host, server.port))
    raw = RawConnection(trio.SocketStream(sock))
    welcome = await raw.hello(user)
    assert isinstance(welcome, protocol.Welcome)
    return raw, welcome


def complete_frames(data: bytes) -> list[protocol.Message]:
    """Every whole frame in ``data``; a torn last frame is left out."""
    decoder = protocol.FrameDecoder()
    decoder.feed(data)
    messages = []
    while (body := decoder.next_frame()) is not None:
        messages.append(protocol.decode_message(body))
    return messages


async def test_slow_consumer_is_dropped_without_stalling_others_and_loses_nothing() -> (
    None
):
    slow_user, fast_user = users_in_same_partition(2, 4, prefix="reader")
    async with (
        running_server(outbound_queue=16) as server,
        client(server, "sender") as sender,
        client(server, fast_user) as fast,
        AsyncExitStack() as stack,
    ):
        metrics = server.context.metrics
        slow, welcome = await open_unread_connection(server, slow_user)
        stack.push_async_callback(slow.aclose)
        await sender.create_group("readers", [slow_user, fast_user])

        # 64 KiB bodies until they fill both socket buffers and the queue, then
        # a few more, which the slow reader must catch up on later.
        def dropped() -> float:
            name = "msgnet_slow_consumer_disconnects_total"
            return metrics.registry.get_sample_value(name) or 0.0

        sent: list[str] = []
        more = 5
        while more:
            ack = await sender.send_group("readers", f"{len(sent)}:" + "z" * 65_000)
            sent.append(ack.id)
            if dropped():
                more -= 1
            assert len(sent) < 2000, "the slow reader was never dropped"
        with trio.fail_after(WAIT):
            received = [(await fast.receive()).id for _ in sent]
        assert received == sent
        assert dropped() == 1

        # The slow reader now reads what reached it before it was dropped.
        with trio.fail_after(WAIT):
            frames = complete_frames(await slow.receive_raw_until_closed())
        got_before = [m for m in frames if isinstance(m, protocol.Deliver)]
        errors = [m for m in frames if isinstance(m, protocol.Error)]
        assert len(got_before) < len(sent)
        assert all(e.code == ErrorCode.SLOW_CONSUMER for e in errors)

        # Resuming from its cursor, it catches up on all the rest. (Its socket
        # buffer is smaller than one delivery, so it may have got none whole.)
        cursor = got_before[-1].offset + 1 if got_before else welcome.cursor
        async with client(server, slow_user, resume=cursor) as again:
            with trio.fail_after(WAIT):
                caught_up = [
                    (await again.receive()).id
                    for _ in range(len(sent) - len(got_before))
                ]
    assert [d.id for d in got_before] + caught_up == sent
