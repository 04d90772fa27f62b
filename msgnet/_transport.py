"""Message transports: the protocol state machine joined to a byte stream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio

import protocol

__all__ = ["MessageTransport", "StreamTransport"]

RECEIVE_SIZE = 64 * 1024


class MessageTransport(Protocol):
    """What a session needs from its connection, whatever carries the bytes."""

    async def receive(self) -> protocol.Message | None:
        """The next message, or None once the peer has closed cleanly.

        Raises ``protocol.RemoteProtocolError`` for bad input.
        """
        ...

    async def send(self, messages: Sequence[protocol.Message]) -> None:
        """Send messages in order, in as few writes as possible."""
        ...

    async def aclose(self) -> None: ...


class StreamTransport:
    """Length-prefixed frames over a trio stream (TCP), for either role."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        role: protocol.Role,
        max_frame_size: int = protocol.DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.stream = stream
        self.connection = protocol.Connection(role, max_frame_size=max_frame_size)

    async def receive(self) -> protocol.Message | None:
        connection = self.connection
        while True:
            event = connection.next_message()
            if event is protocol.NEED_DATA:
                connection.receive_data(
                    bytes(await self.stream.receive_some(RECEIVE_SIZE))
                )
                continue
            if event is protocol.CLOSED:
                return None
            assert not isinstance(event, protocol.Signal)
            return event

    async def send(self, messages: Sequence[protocol.Message]) -> None:
        send = self.connection.send
        await self.stream.send_all(b"".join([send(message) for message in messages]))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
