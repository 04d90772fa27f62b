"""Length-prefixed framing: a 4-byte big-endian body length, then the body."""

from __future__ import annotations

import struct

from ._codec import _local, encode_message
from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ._messages import Message

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "FrameDecoder", "encode_body", "encode_frame"]

DEFAULT_MAX_FRAME_SIZE = 1_048_576
"""Largest frame body, in bytes, accepted unless configured otherwise (1 MiB)."""

_PREFIX = 4
_pack_prefix = struct.Struct(">I").pack
_unpack_prefix = struct.Struct(">I").unpack_from
# The prefix is an unsigned 32-bit number, so no limit can go beyond this.
_MAX_PREFIX_VALUE = 2**32 - 1


def _check_limit(max_frame_size: int) -> None:
    if type(max_frame_size) is not int or not 1 <= max_frame_size <= _MAX_PREFIX_VALUE:
        raise ValueError(
            f"max_frame_size must be an int from 1 to {_MAX_PREFIX_VALUE}, "
            f"got {max_frame_size!r}"
        )


def encode_frame(
    message: Message, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """Return the complete frame (length prefix and body) carrying message.

    Raises LocalProtocolError if the body is larger than max_frame_size, since the
    peer would refuse the frame and close the connection.
    """
    # encode_message and encode_body's check, inline: this runs once for every
    # frame sent. encode_message sets up this thread's encoders the first time,
    # and words the error for something that is not a message.
    try:
        encode = _local.encoders[type(message)]
    except (AttributeError, KeyError):
        body = encode_message(message)
    else:
        body = encode(message)
    if len(body) > max_frame_size:
        raise _too_large(message, body, max_frame_size)
    return _pack_prefix(len(body)) + body


def encode_body(message: Message, *, max_frame_size: int) -> bytes:
    """Return the body alone, for transports that delimit messages themselves.

    Raises LocalProtocolError under the same rule as ``encode_frame``.
    """
    body = encode_message(message)
    if len(body) > max_frame_size:
        raise _too_large(message, body, max_frame_size)
    return body


def _too_large(message: Message, body: bytes, max_frame_size: int) -> Exception:
    return LocalProtocolError(
        f"{type(message).__name__} encodes to {len(body)} bytes, over the "
        f"frame size limit of {max_frame_size}"
    )


class FrameDecoder:
    """Splits a byte stream into frame bodies; does no I/O itself.

    ``feed`` the bytes as they arrive, then call ``next_frame`` until it returns
    None. A bad length prefix raises RemoteProtocolError, and keeps raising it,
    because the stream cannot be resynchronised after it.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        _check_limit(max_frame_size)
        self.max_frame_size = max_frame_size

        # Frames are sliced out of immutable bytes from an offset, so a body
        # costs one copy and consuming it costs nothing. Bytes fed while that
        # buffer still holds a partial frame wait in a list, joined only once
        # the frame is whole: a large frame trickling in is not copied per feed.
        self._data = b""
        self._at = 0
        self._pending: list[bytes] = []
        self._pending_size = 0

    @property
    def buffered(self) -> int:
        """The number of bytes received but not yet returned in a frame."""
        return len(self._data) - self._at + self._pending_size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes received from the peer."""
        # bytes() copies a mutable buffer the caller may reuse, and returns
        # bytes themselves unchanged.
        chunk = bytes(data)
        if self._at == len(self._data) and not self._pending:
            self._data = chunk
            self._at = 0
        else:
            self._pending.append(chunk)
            self._pending_size += len(chunk)

    def next_frame(self) -> bytes | None:
        """Return the next complete frame body, or None if more bytes are needed."""
        # The common case inline: a whole frame of an allowed size is buffered.
        data = self._data
        start = self._at + _PREFIX
        if start <= len(data):
            length = _unpack_prefix(data, start - _PREFIX)[0]
            end = start + length
            if end <= len(data) and 0 < length <= self.max_frame_size:
                self._at = end
                return data[start:end]
        return self._next_frame_slowly()

    def _next_frame_slowly(self) -> bytes | None:
        buffered = self.buffered
        if buffered < _PREFIX:
            # A reader asks until it gets None: once every byte was returned,
            # an idle connection keeps no received bytes alive.
            if not buffered:
                self._data = b""
                self._at = 0
                self._pending.clear()
            return None
        if len(self._data) - self._at < _PREFIX:
            self._join_pending()

        # The length is judged as soon as the prefix is here, before any of the
        # body is waited for, so an oversized claim costs us nothing to refuse.
        length = _unpack_prefix(self._data, self._at)[0]
        if length > self.max_frame_size:
            raise RemoteProtocolError(
                f"frame length {length} is over the limit of {self.max_frame_size} "
                "bytes",
                code=ErrorCode.FRAME_TOO_LARGE,
            )
        if length == 0:
            raise RemoteProtocolError(
                "frame length 0: a frame must hold one msgpack map",
                code=ErrorCode.BAD_FRAME,
            )

        if buffered < _PREFIX + length:
            return None
        if len(self._data) - self._at < _PREFIX + length:
            self._join_pending()
        start = self._at + _PREFIX
        self._at = start + length
        return self._data[start : self._at]

    def _join_pending(self) -> None:
        self._data = b"".join([self._data[self._at :], *self._pending])
        self._at = 0
        self._pending = []
        self._pending_size = 0
