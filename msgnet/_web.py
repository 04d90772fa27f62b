"""The browser front door: WebSocket sessions and the chat page on one port."""

from __future__ import annotations

import functools
import importlib.resources
import logging
from collections.abc import Mapping

import attrs
import h11
import trio
import trio_websocket

import protocol

from ._config import ServerConfig
from ._context import ServerContext
from ._session import Session
from ._websocket import WebSocketTransport

__all__ = ["StaticFile", "load_static_files", "open_web_listeners", "serve_web"]

logger = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 16 * 1024
"""Largest HTTP request line plus headers accepted, in bytes."""

RECEIVE_SIZE = 4096

MESSAGE_QUEUE_SIZE = 1
"""WebSocket messages trio-websocket buffers ahead of the session: with one,
a connection holds at most one unread message beyond the one being handled."""

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
"""The only kinds of file the page directory serves; anything else stays private."""


@attrs.frozen(kw_only=True)
class StaticFile:
    """One file of the chat page, read once at start-up."""

    content_type: str
    """The Content-Type header value."""
    body: bytes
    """The file's bytes."""


def load_static_files() -> dict[str, StaticFile]:
    """The chat page's files by URL path, from the package's ``web`` directory.

    Only files whose suffix is in ``CONTENT_TYPES`` are served, so build
    scripts and package manifests next to them are never exposed; ``/`` is
    ``index.html``.
    """
    files: dict[str, StaticFile] = {}
    pending = [(importlib.resources.files("msgnet") / "web", "")]
    while pending:
        directory, prefix = pending.pop()
        if not directory.is_dir():
            continue
        for entry in directory.iterdir():
            if entry.is_dir():
                pending.append((entry, f"{prefix}/{entry.name}"))
                continue
            suffix = "." + entry.name.rpartition(".")[2]
            if suffix in CONTENT_TYPES:
                files[f"{prefix}/{entry.name}"] = StaticFile(
                    content_type=CONTENT_TYPES[suffix], body=entry.read_bytes()
                )
    if "/index.html" in files:
        files["/"] = files["/index.html"]
    return files


async def open_web_listeners(config: ServerConfig) -> list[trio.SocketListener]:
    """Listeners on ``config.ws_port``, or none when WebSocket is disabled.

    Opened before the server starts serving so that its WebSocket port is
    known when it announces itself (Redirect carries it).
    """
    if not config.ws_enabled:
        return []
    return await trio.open_tcp_listeners(config.ws_port, host=config.host)


async def serve_web(
    context: ServerContext,
    listeners: list[trio.SocketListener],
    *,
    handler_nursery: trio.Nursery,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept browsers until cancelled: a WebSocket upgrade gets a Session, any
    other request an answer from the chat page's files.

    Each connection runs in ``handler_nursery``, next to the TCP sessions, so
    a server shutdown treats both alike.
    """
    files = load_static_files()
    handler = functools.partial(_serve_connection, context, files)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(
                trio.serve_listeners,
                handler,
                listeners,
                handler_nursery=handler_nursery,
            )
        )
        task_status.started()


async def _serve_connection(
    context: ServerContext, files: Mapping[str, StaticFile], stream: trio.SocketStream
) -> None:
    config = context.config
    try:
        # 1. Read the request head; the WebSocket handshake starts the same way.
        with trio.move_on_after(config.handshake_timeout):
            received = await _read_head(stream)
        if received is None:
            return
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        http.receive_data(received)
        try:
            request = http.next_event()
        except h11.RemoteProtocolError as exc:
            await _respond(stream, http, 400, text=f"bad HTTP request: {exc}")
            return
        if not isinstance(request, h11.Request):
            await _respond(stream, http, 400, text="incomplete HTTP request head")
            return

        # 2. An upgrade becomes a protocol session; anything else is a page file.
        if _wants_websocket(request):
            await _serve_websocket(context, _Replay(received, stream))
        else:
            await _serve_file(stream, http, request, files)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        logger.debug("web connection lost")
    finally:
        await trio.aclose_forcefully(stream)


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes | None:
    """Bytes up to and including the blank line ending the head, perhaps more."""
    received = bytearray()
    while b"\r\n\r\n" not in received:
        if len(received) > MAX_REQUEST_HEAD:
            return bytes(received)
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            return None
        received += data
    return bytes(received)


def _wants_websocket(request: h11.Request) -> bool:
    for name, value in request.headers:
        if name == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


async def _serve_websocket(context: ServerContext, stream: trio.abc.Stream) -> None:
    config = context.config
    async with trio.open_nursery() as nursery:
        # trio-websocket closes with 1009 by itself above its own limit, with
        # no chance to send an Error first. Twice the frame limit leaves room
        # for the session to refuse an oversized message with frame_too_large,
        # while a connection never buffers more than that.
        websocket = None
        with trio.move_on_after(config.handshake_timeout):
            request = await trio_websocket.wrap_server_stream(
                nursery,
                stream,
                message_queue_size=MESSAGE_QUEUE_SIZE,
                max_message_size=2 * config.max_frame_size,
            )
            websocket = await request.accept()
        if websocket is None:
            # A handshake wsproto refused never becomes a request to wait for.
            nursery.cancel_scope.cancel()
            return
        transport = WebSocketTransport(
            websocket, role=protocol.Role.SERVER, max_frame_size=config.max_frame_size
        )
        await Session(context, transport).run()


async def _serve_file(
    stream: trio.abc.Stream,
    http: h11.Connection,
    request: h11.Request,
    files: Mapping[str, StaticFile],
) -> None:
    if request.method not in (b"GET", b"HEAD"):
        await _respond(stream, http, 405, text="only GET and HEAD are served here")
        return
    path = request.target.decode("ascii", "replace").partition("?")[0]
    page_file = files.get(path)
    if page_file is None:
        await _respond(stream, http, 404, text=f"no file {path!r} here")
        return
    await _respond(
        stream,
        http,
        200,
        content_type=page_file.content_type,
        body=b"" if request.method == b"HEAD" else page_file.body,
        length=len(page_file.body),
    )


async def _respond(
    stream: trio.abc.Stream,
    http: h11.Connection,
    status: int,
    *,
    text: str = "",
    content_type: str = "text/plain; charset=utf-8",
    body: bytes | None = None,
    length: int | None = None,
) -> None:
    """One response, then the connection closes: the page is four small files."""
    if body is None:
        body = (text + "\n").encode()
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body) if length is None else length)),
        ("cache-control", "no-cache"),
        ("x-content-type-options", "nosniff"),
        ("connection", "close"),
    ]
    try:
        data = http.send(h11.Response(status_code=status, headers=headers))
        if body:
            data += http.send(h11.Data(data=body))
        data += http.send(h11.EndOfMessage())
    except h11.LocalProtocolError:
        # h11 refuses to answer some broken requests; closing says enough.
        return
    await stream.send_all(data)


class _Replay(trio.abc.Stream):
    """A stream that first gives back bytes already read from it.

    The request head had to be read to tell a WebSocket upgrade from a page
    request; trio-websocket then reads the same handshake again from here.
    """

    def __init__(self, received: bytes, stream: trio.abc.Stream) -> None:
        self._received = received
        self._stream = stream

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._received:
            size = len(self._received) if max_bytes is None else max_bytes
            data, self._received = self._received[:size], self._received[size:]
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
