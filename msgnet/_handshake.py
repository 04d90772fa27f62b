"""A connection's first exchange: the client's hello, its token, and its place."""

from __future__ import annotations

import trio

import protocol
from protocol import ErrorCode

from ._auth import AuthError, verify_token
from ._context import ServerContext
from ._transport import MessageTransport

__all__ = ["SessionEnded", "receive_hello", "redirect", "welcome"]


class SessionEnded(Exception):
    """Ends a session with an Error frame carrying ``code`` and ``text``."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


async def receive_hello(
    context: ServerContext, transport: MessageTransport
) -> protocol.Hello | None:
    """The client's hello, once its version and token are checked.

    None if the client hung up first. Raises ``SessionEnded`` if no hello
    came in time or its token does not prove its user, and
    ``protocol.RemoteProtocolError`` for a version the server does not speak.
    """
    timeout = context.config.handshake_timeout
    with trio.move_on_after(timeout) as waited:
        hello = await transport.receive()
    if waited.cancelled_caught:
        raise SessionEnded(
            ErrorCode.HANDSHAKE_TIMEOUT, f"no hello within {timeout:g} seconds"
        )
    if hello is None:
        return None
    # The connection's state machine lets nothing else through first.
    assert isinstance(hello, protocol.Hello)

    protocol.check_version(hello)
    try:
        verify_token(context.secret, hello.token, user=hello.user)
    except AuthError as exc:
        raise SessionEnded(ErrorCode.AUTH_FAILED, str(exc)) from None
    return hello


async def redirect(
    context: ServerContext, transport: MessageTransport, partition: int
) -> None:
    """Send the client to the server that owns its partition.

    Raises ``SessionEnded`` if no server owns it right now (a takeover).
    """
    address = context.owner_address(partition)
    if address is None:
        raise SessionEnded(
            ErrorCode.UNAVAILABLE,
            f"partition {partition} has no live owner right now; retry shortly",
        )
    host, port, ws_port = address
    await transport.send(
        [protocol.Redirect(host=host, port=port, partition=partition, ws_port=ws_port)]
    )


def welcome(
    context: ServerContext, *, user: str, session_id: str, partition: int, cursor: int
) -> protocol.Welcome:
    """The server's answer to an accepted hello."""
    config = context.config
    return protocol.Welcome(
        version=protocol.PROTOCOL_VERSION,
        user=user,
        session=session_id[-64:],
        server=context.name[:64],
        partition=partition,
        cursor=cursor,
        max_frame=config.max_frame_size,
        idle_timeout=config.idle_timeout,
    )
