"""The protocol over WebSocket: one binary WebSocket message per message body."""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence

import trio
import trio_websocket

import protocol
from protocol import ErrorCode

__all__ = ["CloseCode", "WebSocketTransport", "close_code_for"]

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0
"""Seconds the WebSocket closing handshake may take before the socket is cut."""


class CloseCode(enum.IntEnum):
    """The WebSocket close codes (RFC 6455, section 7.4.1) this binding uses."""

    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


# Fatal errors that are not the peer's fault get their own close codes, so a
# browser can tell "come back later" from "you sent something wrong" without
# having read the Error message.
_CLOSE_CODES = {
    ErrorCode.FRAME_TOO_LARGE: CloseCode.MESSAGE_TOO_BIG,
    ErrorCode.SERVER_FULL: CloseCode.TRY_AGAIN_LATER,
    ErrorCode.UNAVAILABLE: CloseCode.TRY_AGAIN_LATER,
    ErrorCode.SHUTTING_DOWN: CloseCode.GOING_AWAY,
    ErrorCode.INTERNAL: CloseCode.INTERNAL_ERROR,
}


def close_code_for(code: ErrorCode | str) -> int:
    """The WebSocket close code that follows a fatal Error with this code."""
    try:
        return _CLOSE_CODES[ErrorCode(code)]
    except (ValueError, KeyError):
        return CloseCode.POLICY_VIOLATION


class WebSocketTransport:
    """Message bodies over a trio-websocket connection, for either role.

    WebSocket delimits messages itself, so there is no length prefix: each
    binary message is one body, checked by the same ``protocol.Connection``
    state machine as a TCP stream (docs/protocol.md, "WebSocket"). The close
    code sent at the end follows what ended the connection.
    """

    def __init__(
        self,
        websocket: trio_websocket.WebSocketConnection,
        *,
        role: protocol.Role,
        max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.websocket = websocket
        self.connection = protocol.Connection(role, max_frame_size=max_frame_size)
        self.close_code: int | None = None
        """Chosen by the first thing that ends the connection; None: normal."""
        self.close_reason = ""

    async def receive(self) -> protocol.Message | None:
        try:
            data = await self.websocket.get_message()
        except trio_websocket.ConnectionClosed as closed:
            self._closed(closed.reason)
            return None

        if isinstance(data, str):
            self._choose_close(CloseCode.UNSUPPORTED_DATA, ErrorCode.BAD_FRAME)
            raise protocol.RemoteProtocolError(
                f"text WebSocket message of {len(data)} characters; every message "
                "must be a binary one holding a msgpack body",
                code=ErrorCode.BAD_FRAME,
            )
        try:
            return self.connection.receive_body(data)
        except protocol.RemoteProtocolError as exc:
            self._choose_close(close_code_for(exc.code), exc.code)
            raise

    def buffered(self) -> protocol.Message | None:
        """Always None: each WebSocket message is taken by ``receive``."""
        return None

    def _closed(self, reason: trio_websocket.CloseReason | None) -> None:
        # trio-websocket refuses a message far over its own size limit by
        # closing with 1009 before we see it; report that as the protocol
        # error it is, though no Error message can follow the close any more.
        if reason is not None and reason.code == CloseCode.MESSAGE_TOO_BIG:
            self._choose_close(CloseCode.MESSAGE_TOO_BIG, ErrorCode.FRAME_TOO_LARGE)
            raise protocol.RemoteProtocolError(
                f"WebSocket closed with 1009: {reason.reason}",
                code=ErrorCode.FRAME_TOO_LARGE,
            )
        logger.debug("websocket closed reason=%s", reason)
        self.connection.receive_data(b"")
        signal = self.connection.next_message()
        assert signal is protocol.CLOSED

    async def send(self, messages: Sequence[protocol.Message]) -> None:
        for message in messages:
            body = self.connection.send_body(message)
            if isinstance(message, protocol.Error) and message.fatal:
                self._choose_close(close_code_for(message.code), message.code)
            try:
                await self.websocket.send_message(body)
            except trio_websocket.ConnectionClosed as closed:
                raise trio.BrokenResourceError(
                    f"WebSocket closed: {closed.reason}"
                ) from closed

    def _choose_close(self, code: int, reason: str) -> None:
        """Remember the first reason to close; the Error code is the close reason."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = str(reason)

    async def aclose(self) -> None:
        code = self.close_code or CloseCode.NORMAL
        with trio.move_on_after(CLOSE_TIMEOUT):
            # On timeout or cancellation trio-websocket still closes the socket.
            await self.websocket.aclose(code, self.close_reason or None)
