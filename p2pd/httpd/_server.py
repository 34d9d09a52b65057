"""HTTP/1.1 connection handling: h11 for framing, trio for I/O.

Rules/invariants:
- One task per connection; requests on a connection are handled one after another.
- Every wait on the peer has a deadline: the request head (``header_timeout``), the gap
  between body pieces (``body_read_timeout``), each piece sent (``send_timeout``) and the
  wait for the next request on an idle keep-alive connection (``idle_timeout``). A client
  that stops making progress is disconnected, never waited on forever.
- A handler that did not read the whole request body gets its connection closed after the
  response, so unread bytes are never parsed as the next request.
- Exceptions from a handler become an OCI error response (``OCIError``) or a 500; they never
  take the server down. Cancellation is not caught.
- File bodies are sent with ``os.sendfile`` on plain sockets (unless ``ServerLimits.use_sendfile``
  is false: then they are read with ``os.pread`` in a worker thread and sent); the file
  descriptor is always closed by the server, whatever happens.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket as socket_module
import ssl
import struct
import sys
import time
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from typing import Protocol

import h11
import trio

from p2pd.oci.errors import OCIError, error_body

from ._congestion import set_congestion_control

__all__ = [
    "FileBody",
    "Handler",
    "Headers",
    "Request",
    "RequestBody",
    "Response",
    "ServerInfo",
    "ServerLimits",
    "serve_http",
]

log = logging.getLogger("p2pd.httpd")

_RECEIVE_SIZE = 256 * 1024
_FILE_PIECE = 4 * 1024 * 1024
_FALLBACK_READ = 1024 * 1024
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux: a read that fails rather than wait for the disk
_COALESCE = 256 * 1024  # file bodies up to this size are read whole and sent with their head (a copy)
_MAX_QUERY_FIELDS = 64
# Linux's SO_MAX_PACING_RATE (asm-generic/socket.h; Python's socket module does not name it):
# the most bytes a second the kernel sends on the socket, spread evenly (TCP's own pacing).
_SO_MAX_PACING_RATE = getattr(socket_module, "SO_MAX_PACING_RATE", 47)
_UNPACED = 0xFFFFFFFF  # the kernel's "no cap" (~0U)
_SIOCOUTQNSD = 0x894B  # Linux (linux/sockios.h): bytes in a TCP socket's send queue not yet sent
_DRAIN_LOOK_MIN = 0.01  # seconds: the shortest wait between two looks at a draining send queue
_DRAIN_ENOUGH = 4096  # bytes still queued that no longer hold a response's share (three packets)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Bounds that protect the server from slow or hostile clients (seconds, bytes)."""

    max_header_bytes: int = 16 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 75.0
    body_read_timeout: float = 30.0
    send_timeout: float = 60.0
    graceful_timeout: float = 5.0
    max_connections: int = 2048
    # Send file bodies with os.sendfile on plain sockets; false reads them into memory
    # (pread in a worker thread) and sends the bytes, e.g. to compare the two.
    use_sendfile: bool = True


class Headers:
    """Case-insensitive, multi-valued request headers."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._items = [(name.lower(), value) for name, value in items]

    def get(self, name: str, default: str | None = None) -> str | None:
        name = name.lower()
        for key, value in self._items:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self._items if key == name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)


@dataclass(slots=True)
class FileBody:
    """A byte span of an open file, sent with sendfile. The server closes ``fd``."""

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        # h11 accounts for pass-through data by its length.
        return self.length


# An async iterable may yield bytes or FileBody spans of files it keeps open itself.
ResponseBody = bytes | FileBody | AsyncIterable[bytes] | AsyncIterable[bytes | FileBody]


@dataclass(slots=True)
class Response:
    """What a handler returns.

    ``body`` is bytes, a ``FileBody``, or an async iterable of bytes. For an iterable,
    ``content_length`` is sent when known, otherwise the body is chunked. For HEAD requests
    the server sends the headers (including the length) and no body.
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: ResponseBody = b""
    content_length: int | None = None
    # Called once the response is finished or abandoned (e.g. to release a cache entry).
    on_close: Callable[[], None] | None = None
    # A finished response calls on_close only once its last bytes have left the socket's send
    # queue (bounded by send_timeout), not when they are queued: a paced response's share of a
    # shared rate (SharedPacing) ends then. A 64 KiB answer is all in the queue at once.
    drained_close: bool = False

    @classmethod
    def error(cls, exc: OCIError) -> Response:
        body = exc.body()
        return cls(exc.status, [("Content-Type", "application/json"), *exc.headers], body)


class RequestBody:
    """The request body as it arrives; iterate it once, or ``read`` it with a size cap."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.complete = False
        self.started = False
        self.received = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.started:
            raise RuntimeError("request body already consumed")
        self.started = True
        while not self.complete:
            data = await self._connection.receive_body_piece()
            if data is None:
                self.complete = True
                return
            self.received += len(data)
            yield data

    async def read(self, limit: int) -> bytes:
        """The whole body; raises 413 TOO_LARGE past ``limit`` bytes."""
        parts: list[bytes] = []
        size = 0
        async for data in self:
            size += len(data)
            if size > limit:
                raise OCIError("SIZE_INVALID", "request body too large", status=413, detail={"limit": limit})
            parts.append(data)
        return b"".join(parts)


@dataclass(slots=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: Headers
    body: RequestBody
    client: tuple[str, int] | None
    http_version: str
    # Set by the application for metrics and logs (e.g. "blob", "manifest").
    route: str = "other"
    # Set by the application: who is asking, once it has authenticated the request.
    identity: object | None = None
    # Caps how fast the kernel sends this connection's bytes, in bytes a second (0 lifts the
    # cap); None where the connection has no TCP socket to pace (memory streams in tests).
    pace: Callable[[int], None] | None = None

    def query_one(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


Handler = Callable[[Request], Awaitable[Response]]
# Called once per response with (request, status, body bytes sent, seconds).
ResponseObserver = Callable[[Request, int, int, float], None]


@dataclass(frozen=True, slots=True)
class ServerInfo:
    host: str
    port: int
    scheme: str = "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


class _ClientGone(Exception):
    """The client closed, broke, or stalled the connection."""


class _Connection:
    """One client connection: h11 state plus the stream, with deadlines on every wait."""

    def __init__(self, stream: trio.abc.Stream, limits: ServerLimits) -> None:
        self.stream = stream
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self.bytes_sent = 0

    async def _receive_raw(self) -> bytes:
        try:
            return bytes(await self.stream.receive_some(_RECEIVE_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone from exc

    async def _receive_event(self, seconds: float) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event, which must arrive whole within ``seconds``.

        The deadline covers the whole event, not each read: a client that trickles a request
        head one byte at a time is cut off like one that sends nothing.
        """
        with trio.move_on_after(seconds):
            while True:
                event = self.h11.next_event()
                if event is not h11.NEED_DATA:
                    return event  # type: ignore[return-value]
                self.h11.receive_data(await self._receive_raw())
        raise _ClientGone("receive timed out")

    async def receive_request(self, idle: bool) -> h11.Request | None:
        """The next request head; None when the client closed an idle connection."""
        if idle and not self.h11.trailing_data[0]:
            # An idle keep-alive connection may wait longer for the next request to start
            # than a client that has started sending a request head.
            with trio.move_on_after(self.limits.idle_timeout) as scope:
                data = await self._receive_raw()
            if scope.cancelled_caught:
                raise _ClientGone("idle timeout")
            self.h11.receive_data(data)
        event = await self._receive_event(self.limits.header_timeout)
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            # h11 bounds only a head that is still incomplete; one that arrived whole in a
            # single read is measured here.
            if _head_size(event) > self.limits.max_header_bytes:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            return event
        raise _ClientGone(f"unexpected event {event!r}")

    async def receive_body_piece(self) -> bytes | None:
        if self.h11.they_are_waiting_for_100_continue:
            await self.send_event(h11.InformationalResponse(status_code=100, headers=[]))
        try:
            event = await self._receive_event(self.limits.body_read_timeout)
        except _ClientGone as exc:
            raise OCIError("BLOB_UPLOAD_INVALID", "request body stalled or was cut short", status=400) from exc
        except h11.RemoteProtocolError as exc:
            raise OCIError("BAD_REQUEST", f"malformed request body: {exc}") from exc
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        raise OCIError("BLOB_UPLOAD_INVALID", "request body was cut short", status=400)

    async def send_bytes(self, data: bytes) -> None:
        if not data:
            return
        with trio.move_on_after(self.limits.send_timeout) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ClientGone from exc
        if scope.cancelled_caught:
            raise _ClientGone("send timed out")

    async def send_event(self, event: h11.Event) -> None:
        data = self.h11.send(event)
        if data:
            await self.send_bytes(data)

    async def send_data(self, data: bytes) -> None:
        await self.send_event(h11.Data(data=data))
        self.bytes_sent += len(data)

    async def send_file(self, body: FileBody) -> None:
        pieces = self.h11.send_with_data_passthrough(h11.Data(data=body))  # type: ignore[arg-type]
        for piece in pieces or ():
            if isinstance(piece, FileBody):
                await self._send_file_span(piece)
            else:
                await self.send_bytes(bytes(piece))

    def can_sendfile(self) -> bool:
        return self.limits.use_sendfile and getattr(self.stream, "socket", None) is not None

    async def _send_file_span(self, body: FileBody) -> None:
        socket = getattr(self.stream, "socket", None) if self.limits.use_sendfile else None
        offset, remaining = body.offset, body.length
        if socket is None:
            # Not a plain socket (tests with memory streams, TLS), or sendfile disabled: read and send.
            while remaining:
                data = await _pread(body.fd, min(remaining, _FALLBACK_READ), offset)
                if not data:
                    raise _ClientGone("file shorter than announced")
                await self.send_bytes(data)
                offset += len(data)
                remaining -= len(data)
                self.bytes_sent += len(data)
            return
        fileno = socket.fileno()
        deadline = trio.current_time() + self.limits.send_timeout
        while remaining:
            await trio.lowlevel.checkpoint()
            try:
                sent = os.sendfile(fileno, body.fd, offset, min(remaining, _FILE_PIECE))
            except BlockingIOError:
                with trio.move_on_at(deadline) as scope:
                    await trio.lowlevel.wait_writable(socket)
                if scope.cancelled_caught:
                    raise _ClientGone("send timed out") from None
                continue
            except OSError as exc:
                raise _ClientGone(f"sendfile failed: {exc}") from exc
            if sent == 0:
                raise _ClientGone("file shorter than announced")
            offset += sent
            remaining -= sent
            self.bytes_sent += sent
            deadline = trio.current_time() + self.limits.send_timeout


class _SocketPace:
    """Sets ``SO_MAX_PACING_RATE`` on a socket (``Request.pace``): the kernel spreads the
    connection's packets evenly at that rate instead of sending a window at once, so a shaped
    link's short queue does not overflow. Best effort: a kernel that refuses it leaves the
    connection unpaced. ``unsent()``: what a finished response still has to send."""

    __slots__ = ("_sock", "rate")

    def __init__(self, sock: socket_module.socket | trio.socket.SocketType) -> None:
        self._sock = sock
        self.rate = 0  # the pace last set (bytes/s; 0: none)

    def __call__(self, rate: int) -> None:
        self.rate = max(0, rate)
        value = min(rate, _UNPACED - 1) if rate > 0 else _UNPACED
        try:
            self._sock.setsockopt(socket_module.SOL_SOCKET, _SO_MAX_PACING_RATE, struct.pack("=I", value))
        except OSError as exc:
            log.debug("SO_MAX_PACING_RATE refused: %s", exc)

    def unsent(self) -> int:
        """Bytes in the socket's send queue not sent yet (Linux ``SIOCOUTQNSD``; 0 if unknown)."""
        try:
            answer = fcntl.ioctl(self._sock.fileno(), _SIOCOUTQNSD, b"\0\0\0\0")
        except (OSError, ValueError):
            return 0
        return max(0, int(struct.unpack("=i", answer)[0]))


def _pacer(sock: socket_module.socket | trio.socket.SocketType | None) -> _SocketPace | None:
    if sock is None or not sys.platform.startswith("linux"):
        return None
    return _SocketPace(sock)


class _SendQueue(Protocol):
    rate: int

    def unsent(self) -> int: ...


async def _drained(queue: _SendQueue, limit: float) -> None:
    """Returns once the connection's send queue is (nearly) empty, or after ``limit`` seconds; at
    once when the connection is not paced (a reload lifted the rate: no share to hold). It looks
    when the queued bytes could have left at the connection's pace (``rate``): they cannot leave
    faster, so no look is early — a look or two per response, not one every few milliseconds."""
    if queue.rate <= 0:
        return
    with trio.move_on_after(limit):
        while True:
            left = queue.unsent()  # a poll: the kernel tells no one when a send queue empties
            if left <= _DRAIN_ENOUGH:
                return
            await trio.sleep(max(_DRAIN_LOOK_MIN, left / queue.rate))


def _head_size(request: h11.Request) -> int:
    """Approximate size on the wire of a request head (request line and header lines)."""
    return (len(request.method) + len(request.target) + 12
            + sum(len(name) + len(value) + 4 for name, value in request.headers))


def _parse_target(target: str) -> tuple[str, dict[str, list[str]]]:
    raw_path, _, raw_query = target.partition("?")
    if not raw_path.startswith("/"):
        raise OCIError("BAD_REQUEST", "request target must be an absolute path")
    try:
        path = urllib.parse.unquote(raw_path, errors="strict")
    except UnicodeDecodeError as exc:
        raise OCIError("BAD_REQUEST", "request path is not valid UTF-8") from exc
    try:
        query = urllib.parse.parse_qs(raw_query, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS,
                                      errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise OCIError("BAD_REQUEST", "malformed query string") from exc
    return path, query


def _prepare_headers(response: Response, method: str) -> tuple[list[tuple[str, str]], int | None]:
    headers = [(name, value) for name, value in response.headers if name.lower() != "content-length"]
    body = response.body
    if response.content_length is not None:
        # Explicit lengths win: a HEAD answer announces the size of a body it does not send.
        length: int | None = response.content_length
    elif isinstance(body, bytes):
        length = len(body)
    elif isinstance(body, FileBody):
        length = body.length
    else:
        length = None
    no_body_status = response.status in (204, 304) or 100 <= response.status < 200
    if length is not None and not no_body_status:
        headers.append(("Content-Length", str(length)))
    return headers, length


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


async def _close_file(body: ResponseBody) -> None:
    if isinstance(body, FileBody):
        os.close(body.fd)
    elif hasattr(body, "aclose"):
        await body.aclose()


async def _pread(fd: int, length: int, offset: int) -> bytes:
    """``os.pread``, here when the page cache holds the bytes, else in a worker thread.

    Each read in a worker thread is a hand-off and a GIL round trip with the event loop; a peer
    asks for chunks this node wrote moments ago (in the page cache), and those hand-offs were
    ~5 % of an agent's Python time in a swarm pull (py-spy). ``RWF_NOWAIT`` reads only what is
    cached and never waits for the disk; anything else (a cold file, a kernel or file system
    without it) is read in a thread as before."""
    if _RWF_NOWAIT:
        buffer = bytearray(length)
        try:
            if os.preadv(fd, [buffer], offset, _RWF_NOWAIT) == length:
                return bytes(buffer)
        except OSError:
            pass  # EAGAIN (not cached), EOPNOTSUPP: read it the slow way
    return await trio.to_thread.run_sync(os.pread, fd, length, offset)


async def _send_response(conn: _Connection, request: h11.Request, response: Response,
                         close_after: bool) -> None:
    method = request.method.decode("ascii")
    headers, _ = _prepare_headers(response, method)
    if close_after:
        headers.append(("Connection", "close"))
    head = conn.h11.send(h11.Response(status_code=response.status, headers=headers, reason=_reason(response.status)))
    body = response.body
    if method == "HEAD" or response.status in (204, 304):
        await conn.send_bytes(head + (conn.h11.send(h11.EndOfMessage()) or b""))
        return
    # A small answer goes out in one send with its head: over TLS every send is a pass through
    # the TLS stream's layers and at least one record, and a peer asks for thousands of chunks.
    data: bytes | None = None
    if isinstance(body, bytes):
        data = body
    elif isinstance(body, FileBody) and body.length <= _COALESCE and not conn.can_sendfile():
        data = await _pread(body.fd, body.length, body.offset)
        if len(data) != body.length:
            raise _ClientGone("file shorter than announced")
    if data is not None:
        framed = conn.h11.send(h11.Data(data=data)) if data else b""
        conn.bytes_sent += len(data)
        await conn.send_bytes(b"".join((head, framed or b"", conn.h11.send(h11.EndOfMessage()) or b"")))
        return
    await conn.send_bytes(head)
    if isinstance(body, FileBody):
        await conn.send_file(body)
    elif not isinstance(body, bytes):
        await _send_stream(conn, body)
    await conn.send_event(h11.EndOfMessage())


async def _send_stream(conn: _Connection, body: AsyncIterable[bytes | FileBody]) -> None:
    # The status line is already on the wire: a body that fails now can only be cut
    # short. Closing the connection tells the client the body is incomplete (it sees
    # fewer bytes than Content-Length, or no final chunk) so it can retry or fall back.
    iterator = body.__aiter__()
    while True:
        try:
            piece = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except Exception as exc:
            log.info("aborting response body: %s", exc)
            raise _ClientGone(str(exc)) from exc
        if isinstance(piece, FileBody):
            # A span of a file the iterator keeps open (and closes): sent with sendfile.
            if piece.length:
                await conn.send_file(piece)
        elif piece:
            await conn.send_data(piece)



async def _serve_connection(stream: trio.SocketStream | trio.abc.Stream, handler: Handler,
                            limits: ServerLimits, observer: ResponseObserver | None,
                            shutting_down: trio.Event, idle_waits: set[trio.CancelScope]) -> None:
    conn = _Connection(stream, limits)
    client: tuple[str, int] | None = None
    # Over TLS the socket is the transport's (SSLStream wraps a SocketStream).
    socket = getattr(stream, "socket", None) or getattr(getattr(stream, "transport_stream", None), "socket", None)
    pace = _pacer(socket)
    if socket is not None:
        try:
            peer = socket.getpeername()
            client = (str(peer[0]), int(peer[1]))
        except OSError:
            client = None
    first = True
    try:
        while not shutting_down.is_set():
            head = None
            with trio.CancelScope() as idle_wait:
                # Only the wait for a new request is cancelled by a shutdown; a request
                # that has started is allowed to finish within the grace period.
                idle_waits.add(idle_wait)
                try:
                    head = await conn.receive_request(idle=not first)
                except h11.RemoteProtocolError as exc:
                    await _reject(conn, exc)
                    return
                finally:
                    idle_waits.discard(idle_wait)
            if head is None:
                return
            first = False
            if not await _handle_one(conn, head, handler, observer, client, shutting_down, pace):
                return
            conn.h11.start_next_cycle()
    except _ClientGone:
        return
    finally:
        await trio.aclose_forcefully(stream)


def _request_finished(conn: _Connection, body: RequestBody) -> bool:
    """Whether the whole request was received, without waiting for more bytes."""
    if body.complete or conn.h11.their_state is not h11.SEND_BODY:
        return True
    # A request without a body (GET, HEAD) ends with an EndOfMessage that h11 already has.
    try:
        event = conn.h11.next_event()
    except h11.RemoteProtocolError:
        return False
    if isinstance(event, h11.EndOfMessage):
        body.complete = True
        return True
    return False


async def _reject(conn: _Connection, exc: h11.RemoteProtocolError) -> None:
    """Answers a malformed request head, if the protocol state still allows it."""
    if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    status = exc.error_status_hint if 400 <= exc.error_status_hint < 600 else 400
    code = "TOO_LARGE" if status == 431 else "BAD_REQUEST"
    body = error_body(code, str(exc) or "malformed request")
    try:
        await conn.send_event(h11.Response(status_code=status, headers=[
            ("Content-Type", "application/json"), ("Content-Length", str(len(body))), ("Connection", "close")]))
        await conn.send_event(h11.Data(data=body))
        await conn.send_event(h11.EndOfMessage())
    except (_ClientGone, h11.LocalProtocolError):
        pass


async def _handle_one(conn: _Connection, head: h11.Request, handler: Handler,
                      observer: ResponseObserver | None, client: tuple[str, int] | None,
                      shutting_down: trio.Event, pace: _SocketPace | None = None) -> bool:
    """Handles one request; returns whether the connection can serve another."""
    started = time.monotonic()
    target = head.target.decode("ascii", errors="replace")
    headers = Headers((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers)
    body = RequestBody(conn)
    request = Request(method=head.method.decode("ascii", errors="replace"), target=target, path="",
                      query={}, headers=headers, body=body, client=client,
                      http_version=head.http_version.decode("ascii"), pace=pace)
    try:
        request.path, request.query = _parse_target(target)
        response = await handler(request)
    except OCIError as exc:
        response = Response.error(exc)
    except Exception:
        log.exception("handler failed: %s %s", request.method, target[:200])
        response = Response.error(OCIError("UNKNOWN", "internal server error"))

    close_after = shutting_down.is_set() or not _request_finished(conn, body)
    conn.bytes_sent = 0
    status = response.status
    try:
        await _send_response(conn, head, response, close_after)
        if response.drained_close and pace is not None:
            await _drained(pace, conn.limits.send_timeout)
    except h11.LocalProtocolError:
        log.exception("response framing error: %s %s", request.method, target[:200])
        raise _ClientGone("framing error") from None
    finally:
        await _close_file(response.body)
        if response.on_close is not None:
            response.on_close()
        if observer is not None:
            observer(request, status, conn.bytes_sent, time.monotonic() - started)
    return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE and not close_after


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: ServerLimits | None = None,
    observer: ResponseObserver | None = None,
    shutdown: trio.Event | None = None,
    tls: Callable[[], ssl.SSLContext] | None = None,
    on_tls_refused: Callable[[BaseException | None], None] | None = None,
    congestion_control: str = "",
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serves HTTP/1.1 (or HTTPS) on ``host:port`` until cancelled or until ``shutdown`` is set.

    Args:
        handler: called once per request; returns a ``Response`` or raises ``OCIError``.
        host, port: where to listen; port 0 picks a free port (see the started value).
        limits: timeouts and sizes; defaults to ``ServerLimits()``.
        observer: called after every response with the body bytes actually sent.
        shutdown: when set, the server stops accepting, lets requests in progress finish
            for ``limits.graceful_timeout`` seconds, then returns.
        tls: returns the server's ``SSLContext``; asked once per connection, so swapping the
            context (``TlsContextProvider.reload``) changes what new connections get and
            leaves open ones alone. The handshake must finish within ``header_timeout``.
            File bodies are then read and sent (no sendfile through TLS).
        on_tls_refused: called with the cause (an ``ssl.SSLError``, or None for a timeout) of
            every handshake that failed, e.g. a peer without a certificate from the cluster CA.
        congestion_control: the TCP congestion control of every accepted connection ("": the
            host's default; one the kernel refuses is logged and the default kept).

    The value passed to ``task_status.started`` is a ``ServerInfo`` with the bound port.
    """
    limits = limits or ServerLimits()
    shutdown = shutdown if shutdown is not None else trio.Event()
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = listeners[0].socket.getsockname()[1]
    set_congestion_control((listener.socket for listener in listeners), congestion_control)
    connection_slots = trio.CapacityLimiter(limits.max_connections)
    idle_waits: set[trio.CancelScope] = set()

    async def run_connection(stream: trio.SocketStream) -> None:
        try:
            connection_slots.acquire_on_behalf_of_nowait(stream)
        except trio.WouldBlock:
            await _refuse_overloaded(stream)
            return
        try:
            if tls is None:
                await _serve_connection(stream, handler, limits, observer, shutdown, idle_waits)
                return
            secure = trio.SSLStream(stream, tls(), server_side=True, https_compatible=True)
            with trio.move_on_after(limits.header_timeout) as handshake:
                try:
                    await secure.do_handshake()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.debug("TLS handshake failed: %s", exc.__cause__ or exc)
                    if on_tls_refused is not None:
                        on_tls_refused(exc.__cause__)
                    await trio.aclose_forcefully(secure)
                    return
            if handshake.cancelled_caught:
                log.debug("TLS handshake timed out")
                if on_tls_refused is not None:
                    on_tls_refused(None)
                await trio.aclose_forcefully(secure)
                return
            await _serve_connection(secure, handler, limits, observer, shutdown, idle_waits)
        finally:
            connection_slots.release_on_behalf_of(stream)

    async with trio.open_nursery() as handler_nursery:
        async with trio.open_nursery() as accept_nursery:
            for listener in listeners:
                accept_nursery.start_soon(partial(trio.serve_listeners, run_connection, [listener],
                                                  handler_nursery=handler_nursery))
            task_status.started(ServerInfo(host, bound_port, "https" if tls is not None else "http"))
            await shutdown.wait()
            accept_nursery.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        # Idle keep-alive connections close now; requests in progress get a grace period.
        for idle_wait in list(idle_waits):
            idle_wait.cancel()
        handler_nursery.cancel_scope.deadline = trio.current_time() + limits.graceful_timeout


async def _refuse_overloaded(stream: trio.SocketStream) -> None:
    body = error_body("TOOMANYREQUESTS", "too many connections")
    head = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(head + body)
    await trio.aclose_forcefully(stream)

