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

    def buffered(self) -> protocol.Message | None:
        """A message already received and waiting to be read, if there is one.

        Lets a reader take a burst of frames without a scope and a trip
        through the scheduler per frame. None says only that ``receive``
        has to wait; bad input raises ``protocol.RemoteProtocolError`` as
        ``receive`` would.
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
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._quiet = True
        """The peer is likely to stay silent a while: it has sent no more than
        its first bytes (a hello), or a deadline cancelled the last read."""
        self._first_read = True

    async def receive(self) -> protocol.Message | None:
        connection = self.connection
        while True:
            event = connection.next_message()
            if event is protocol.NEED_DATA:
                if self._quiet:
                    await self._wait_quietly()
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except trio.Cancelled:
                    self._quiet = True
                    raise
                connection.receive_data(bytes(data))
                continue
            if event is protocol.CLOSED:
                return None
            assert not isinstance(event, protocol.Signal)
            return event

    def buffered(self) -> protocol.Message | None:
        event = self.connection.next_message()
        if isinstance(event, protocol.Signal):
            # NEED_DATA, or CLOSED, which receive reports again.
            return None
        return event

    async def _wait_quietly(self) -> None:
        """Wait for the peer's bytes outside a socket read, which holds more.

        An idle connection spends its life waiting, and a socket read waits
        under a dozen frames where this wait needs a few: on a server with
        tens of thousands of idle devices that is over a kilobyte each. A
        busy connection skips it, since it would cost an extra trip through
        the scheduler per read.
        """
        if self._socket is not None:
            await trio.lowlevel.wait_readable(self._socket)
        # Only once the wait is over: a wait cancelled by a deadline leaves
        # the peer as quiet as it was.
        if self._first_read:
            self._first_read = False
        else:
            self._quiet = False

    async def send(self, messages: Sequence[protocol.Message]) -> None:
        send = self.connection.send
        await self.stream.send_all(b"".join([send(message) for message in messages]))

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
