"""An idle session's lighter shape: pings written by the reader, a writer started late.

Real TCP on port 0, as in test_server_limits: each test waits on what the
server sends, never on a fixed sleep.
"""

from __future__ import annotations

import trio
from support import WAIT, client, next_message, raw_connection, running_server

import protocol
from protocol import ErrorCode


async def test_quiet_client_is_pinged_then_gets_deliveries_and_more_pings() -> None:
    """Pings first come from the reader, later through the writer, all in order."""
    async with (
        running_server(idle_timeout=0.3) as server,
        client(server, "alice") as alice,
        raw_connection(server) as raw,
    ):
        assert isinstance(await raw.hello("bob"), protocol.Welcome)
        ping = await next_message(raw)
        assert isinstance(ping, protocol.Ping)
        await raw.send(protocol.Pong(n=ping.n))

        for n in range(3):
            await alice.send("bob", f"hello {n}")
            while isinstance(message := await next_message(raw), protocol.Ping):
                await raw.send(protocol.Pong(n=message.n))
            assert isinstance(message, protocol.Deliver)
            assert message.body == f"hello {n}"

        # Later pings go through the writer, after the deliveries.
        numbers = [ping.n]
        while len(numbers) < 4:
            message = await next_message(raw)
            assert isinstance(message, protocol.Ping)
            await raw.send(protocol.Pong(n=message.n))
            numbers.append(message.n)
        assert numbers == sorted(numbers)
        assert len(set(numbers)) == len(numbers)


async def test_a_pong_queued_when_the_client_closes_is_dropped_not_raised() -> None:
    # The client answers a ping from a task of its own; if the user closes
    # meanwhile, that task gets the connection only after the Goodbye.
    async with running_server() as server, client(server, "alice") as alice:
        alice._spawn_write(protocol.Pong(n=1))
        await alice.aclose()


async def test_idle_client_dropped_after_reader_pings_gets_an_error_frame() -> None:
    async with running_server(idle_timeout=0.3) as server:
        async with raw_connection(server) as raw:
            assert isinstance(await raw.hello("bob"), protocol.Welcome)
            while isinstance(message := await next_message(raw), protocol.Ping):
                pass
            assert isinstance(message, protocol.Error)
            assert (message.code, message.fatal) == (ErrorCode.IDLE_TIMEOUT, True)
            assert await next_message(raw) is None


async def test_shutdown_says_goodbye_to_a_session_that_only_said_hello() -> None:
    async with running_server() as server:
        async with raw_connection(server) as raw:
            assert isinstance(await raw.hello("bob"), protocol.Welcome)

            server.shutdown()
            assert isinstance(await next_message(raw), protocol.Goodbye)
            assert await next_message(raw) is None
            with trio.fail_after(WAIT):
                await server.stopped.wait()


async def test_request_from_an_idle_session_is_answered() -> None:
    async with running_server(idle_timeout=60.0) as server:
        async with raw_connection(server) as raw:
            assert isinstance(await raw.hello("bob"), protocol.Welcome)
            await raw.send(protocol.Ping(n=41))
            assert await next_message(raw) == protocol.Pong(n=41)
