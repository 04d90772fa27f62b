"""The sans-I/O connection state machine: bytes in, messages out, and back."""

from __future__ import annotations

import enum

from ._codec import decode_message
from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ._framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, encode_body, encode_frame
from ._messages import (
    Deliver,
    DeliveryAck,
    Error,
    Goodbye,
    GroupCreate,
    GroupInfo,
    GroupJoin,
    GroupLeave,
    GroupMembers,
    GroupSend,
    Hello,
    HistoryPage,
    HistoryRequest,
    Message,
    Ping,
    Pong,
    Redirect,
    Send,
    SendAck,
    Welcome,
)

__all__ = [
    "CLOSED",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Connection",
    "Role",
    "Signal",
    "State",
    "check_version",
]

PROTOCOL_VERSION = 1
"""The protocol version this package speaks and puts in Hello and Welcome."""
SUPPORTED_VERSIONS = frozenset({1})
"""Every version a server built on this package accepts in Hello."""


class Role(enum.Enum):
    """Which end of the connection this object is."""

    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Where the connection is in its life (docs/protocol.md, "Lifecycle")."""

    HANDSHAKE = "handshake"
    """Before Welcome: only Hello and its answers may flow."""
    OPEN = "open"
    """Welcome was sent or received: every message of the role may flow."""
    CLOSED = "closed"
    """A side said Goodbye, a fatal Error or Redirect, or the peer hung up."""
    FAILED = "failed"
    """The peer broke the protocol; only Error and Goodbye may still be sent."""


class Signal(enum.Enum):
    """What next_message returns when it has no message to give."""

    NEED_DATA = "need_data"
    """Feed more bytes with receive_data, then ask again."""
    CLOSED = "closed"
    """The peer closed the stream cleanly: nothing more will arrive."""


NEED_DATA = Signal.NEED_DATA
CLOSED = Signal.CLOSED

# Error and Goodbye may be sent by either side at any time, to explain a close.
_ANY_TIME: frozenset[type[Message]] = frozenset({Error, Goodbye})
_CLIENT_SENDS: frozenset[type[Message]] = _ANY_TIME | {
    Hello,
    Send,
    GroupSend,
    DeliveryAck,
    HistoryRequest,
    GroupCreate,
    GroupJoin,
    GroupLeave,
    GroupMembers,
    Ping,
    Pong,
}
_SERVER_SENDS: frozenset[type[Message]] = _ANY_TIME | {
    Welcome,
    Redirect,
    SendAck,
    Deliver,
    HistoryPage,
    GroupInfo,
    Ping,
    Pong,
}
_SENDS = {Role.CLIENT: _CLIENT_SENDS, Role.SERVER: _SERVER_SENDS}
# What changes or ends the state when sent, so it is always checked in full.
_STATEFUL: frozenset[type[Message]] = _ANY_TIME | {Hello, Welcome, Redirect}
# What the server may send between receiving Hello and sending Welcome.
_SERVER_HANDSHAKE = _ANY_TIME | {Welcome, Redirect}
# What each role may send while open without changing the state: made once
# here, not per connection, because a server holds one per connected device.
_STEADY = {role: sends - _STATEFUL for role, sends in _SENDS.items()}


def check_version(hello: Hello) -> None:
    """Raise RemoteProtocolError(UNSUPPORTED_VERSION) unless hello's version is known.

    Servers call this after receiving Hello and send the error's fatal Error.
    """
    if hello.version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(version) for version in sorted(SUPPORTED_VERSIONS))
        raise RemoteProtocolError(
            f"protocol version {hello.version} is not supported; "
            f"supported versions: {supported}",
            code=ErrorCode.UNSUPPORTED_VERSION,
        )


def _closes(message: Message) -> bool:
    """Whether sending or receiving this message ends the connection."""
    return type(message) in (Goodbye, Redirect) or (
        type(message) is Error and message.fatal
    )


class Connection:
    """One end of a protocol connection, with no I/O of its own.

    Feed received bytes to ``receive_data`` and take messages from
    ``next_message``; turn outgoing messages into bytes with ``send``.

    A transport that delimits messages itself (one WebSocket message per
    body) uses ``receive_body`` and ``send_body`` instead: the same size and
    state rules, without the length prefix. One connection uses one style.
    """

    def __init__(
        self, role: Role, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    ) -> None:
        self.role = role
        self._decoder = FrameDecoder(max_frame_size=max_frame_size)
        self.max_frame_size = max_frame_size
        self._peer_role = Role.SERVER if role is Role.CLIENT else Role.CLIENT

        self._steady_sends = _STEADY[role]
        """What this role may send while open without changing the state."""
        self._steady_receives = _STEADY[self._peer_role]
        """What the peer may send while open without changing the state."""
        self._hello_done = False
        """Client: Hello sent. Server: Hello received."""
        self._welcomed = False
        self._we_closed = False
        self._peer_closed = False
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def state(self) -> State:
        """The connection's current state."""
        if self._error is not None:
            return State.FAILED
        if self._we_closed or self._peer_closed:
            return State.CLOSED
        if self._welcomed:
            return State.OPEN
        return State.HANDSHAKE

    # Receiving

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes received from the peer; ``b""`` means the peer closed."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError(
                f"received {len(data)} bytes after the end of the stream"
            )
        self._decoder.feed(data)

    def next_message(self) -> Message | Signal:
        """Return the next message, NEED_DATA, or CLOSED after a clean end of stream.

        Raises RemoteProtocolError if the peer broke the protocol; the connection
        is FAILED from then on and every later call raises the same error.
        """
        if self._error is not None:
            raise self._error

        try:
            body = self._decoder.next_frame()
            if body is None:
                return self._no_frame()
            message = decode_message(body)

            # Nearly every message is one that neither changes nor ends the
            # state, on an open connection the peer has not closed: it passes
            # every check below. Welcome, sent or received, comes after Hello.
            if not (
                type(message) in self._steady_receives
                and self._welcomed
                and not self._peer_closed
            ):
                self._check_received(message)
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        return message

    def receive_body(self, body: bytes) -> Message:
        """Decode and check one whole message body that arrived unframed.

        Raises RemoteProtocolError as ``next_message`` does, with
        ``frame_too_large`` for a body over the limit and ``bad_frame`` for an
        empty one; the connection is FAILED from then on. An end of stream is
        still told with ``receive_data(b"")`` and read with ``next_message``.
        """
        if self._error is not None:
            raise self._error
        if self._eof or self._decoder.buffered:
            raise LocalProtocolError(
                "receive_body cannot follow the end of the stream or framed bytes "
                f"({self._decoder.buffered} buffered)"
            )

        try:
            if len(body) > self.max_frame_size:
                raise RemoteProtocolError(
                    f"message of {len(body)} bytes is over the limit of "
                    f"{self.max_frame_size} bytes",
                    code=ErrorCode.FRAME_TOO_LARGE,
                )
            if not body:
                raise RemoteProtocolError(
                    "empty message: a message must hold one msgpack map",
                    code=ErrorCode.BAD_FRAME,
                )
            message = decode_message(body)
            self._check_received(message)
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        return message

    def _no_frame(self) -> Signal:
        if not self._eof:
            return NEED_DATA
        if self._decoder.buffered:
            raise RemoteProtocolError(
                f"stream ended inside a frame, {self._decoder.buffered} bytes "
                "left over",
                code=ErrorCode.BAD_FRAME,
            )
        self._peer_closed = True
        return CLOSED

    def _unexpected(self, message: Message, why: str) -> RemoteProtocolError:
        return RemoteProtocolError(
            f"unexpected {type(message).__name__} from the {self._peer_role.value}: "
            f"{why}",
            code=ErrorCode.UNEXPECTED_MESSAGE,
        )

    def _check_received(self, message: Message) -> None:
        kind = type(message)

        # 1. Nothing may follow the peer's own close.
        if self._peer_closed:
            raise self._unexpected(message, "the peer had already closed")

        # 2. Each role sends only its own kinds of message.
        if kind not in _SENDS[self._peer_role]:
            raise self._unexpected(message, "that role never sends it")

        # 3. The handshake order.
        if kind not in _ANY_TIME:
            if self.role is Role.SERVER:
                self._check_received_by_server(message)
            else:
                self._check_received_by_client(message)

        if _closes(message):
            self._peer_closed = True

    def _check_received_by_server(self, message: Message) -> None:
        if type(message) is Hello:
            if self._hello_done:
                raise self._unexpected(message, "Hello was already received")
            self._hello_done = True
        elif not self._hello_done:
            raise self._unexpected(message, "the first message must be Hello")
        elif not self._welcomed:
            raise self._unexpected(message, "Welcome has not been sent yet")

    def _check_received_by_client(self, message: Message) -> None:
        kind = type(message)
        if not self._hello_done:
            raise self._unexpected(message, "Hello has not been sent yet")
        if kind is Welcome:
            if self._welcomed:
                raise self._unexpected(message, "Welcome was already received")
            self._welcomed = True
        elif not self._welcomed and kind is not Redirect:
            raise self._unexpected(message, "Welcome has not been received yet")

    # Sending

    def send(self, message: Message) -> bytes:
        """Return the frame carrying message, after checking this side may send it.

        Raises LocalProtocolError if the role or the state forbids it; nothing is
        changed then.
        """
        # Nearly every frame is one that neither changes nor ends the state, on
        # an open connection: it needs none of the checks below.
        if (
            type(message) in self._steady_sends
            and self._welcomed
            and self._error is None
            and not (self._we_closed or self._peer_closed)
        ):
            return encode_frame(message, max_frame_size=self.max_frame_size)
        self._check_send(message)
        data = encode_frame(message, max_frame_size=self.max_frame_size)
        self._sent(message)
        return data

    def send_body(self, message: Message) -> bytes:
        """Like ``send``, but return the body alone, without the length prefix."""
        self._check_send(message)
        data = encode_body(message, max_frame_size=self.max_frame_size)
        self._sent(message)
        return data

    def _check_send(self, message: Message) -> None:
        kind = type(message)
        refusal = self._send_refusal(kind)
        if refusal is not None:
            raise LocalProtocolError(
                f"a {self.role.value} may not send {kind.__name__} {refusal}"
            )

    def _sent(self, message: Message) -> None:
        kind = type(message)
        if kind is Hello:
            self._hello_done = True
        elif kind is Welcome:
            self._welcomed = True
        if _closes(message):
            self._we_closed = True

    def _send_refusal(self, kind: type[Message]) -> str | None:
        """Return why kind may not be sent now, or None if it may."""
        if kind not in _SENDS[self.role]:
            return "in any state"
        if kind in _ANY_TIME:
            return None
        if self._error is not None:
            return "after the peer broke the protocol"
        if self._we_closed or self._peer_closed:
            return "after the connection closed"

        if self.role is Role.CLIENT:
            if kind is Hello:
                return "twice" if self._hello_done else None
            if not self._hello_done:
                return "before Hello"
            if not self._welcomed:
                return "before Welcome is received"
            return None

        if not self._hello_done:
            return "before Hello is received"
        if kind is Welcome:
            return "twice" if self._welcomed else None
        if not self._welcomed and kind not in _SERVER_HANDSHAKE:
            return "before Welcome"
        return None
