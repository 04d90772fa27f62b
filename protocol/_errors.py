"""Error codes carried in Error frames, and the exceptions the protocol raises."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from ._fields import MAX_TEXT_LENGTH

if TYPE_CHECKING:
    from ._messages import Error

__all__ = [
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ErrorCode(enum.StrEnum):
    """The ``code`` of an Error frame; each value is the exact wire string."""

    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    UNEXPECTED_MESSAGE = "unexpected_message"
    UNSUPPORTED_VERSION = "unsupported_version"
    AUTH_FAILED = "auth_failed"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    SERVER_FULL = "server_full"
    RATE_LIMITED = "rate_limited"
    SLOW_CONSUMER = "slow_consumer"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    UNAVAILABLE = "unavailable"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """Base class of every error the protocol package raises on purpose."""


class LocalProtocolError(ProtocolError):
    """Our own side misused the protocol, for example by sending a forbidden message.

    Nothing was sent: the connection is unchanged and the caller has a bug to fix.
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes or a message that break the protocol.

    ``code`` is the error code to report back; ``error_message()`` builds the fatal
    Error frame to send before closing the connection.
    """

    def __init__(self, message: str, *, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code

    def error_message(self) -> Error:
        """Return the fatal Error message that tells the peer what went wrong."""
        # Imported here because the message classes themselves use ErrorCode.
        from ._messages import Error  # noqa: PLC0415

        # The Error frame's text is capped on the wire; long messages are cut.
        return Error(code=self.code, text=str(self)[:MAX_TEXT_LENGTH], fatal=True)
