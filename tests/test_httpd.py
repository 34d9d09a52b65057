"""p2pd.httpd against real loopback sockets: framing, timeouts, errors, sendfile, shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import h11
import httpx
import pytest
import trio

from p2pd.httpd import FileBody, Request, Response, ServerInfo, ServerLimits, SharedPacing, serve_http
from p2pd.httpd._server import _drained
from p2pd.oci.errors import OCIError

HOST = "127.0.0.1"
# Small timeouts so the timeout tests are quick; generous enough for a loaded machine.
FAST = ServerLimits(
    header_timeout=0.5,
    idle_timeout=0.5,
    body_read_timeout=0.5,
    send_timeout=5.0,
    graceful_timeout=3.0,
    max_header_bytes=4096,
)


class App:
    """A test application: a handful of endpoints that exercise the server."""

    def __init__(self, file_path: Path | None = None) -> None:
        self.file_path = file_path
        self.seen: list[tuple[str, str]] = []
        self.opened_fds: list[int] = []
        self.slow_started = trio.Event()

    async def __call__(self, request: Request) -> Response:
        self.seen.append((request.method, request.path))
        path = request.path
        if path == "/echo":
            body = await request.body.read(16 * 1024 * 1024)
            return Response(
                200,
                [("X-Method", request.method), ("X-Received", str(len(body))), ("X-Query", json.dumps(request.query))],
                body,
            )
        if path == "/hello":
            return Response(200, [("Content-Type", "text/plain")], b"hello world")
        if path == "/stream":
            return Response(200, [], _pieces([b"first,", b"", b"second,", b"third"]))
        if path == "/stream-known":
            return Response(200, [], _pieces([b"abc", b"def"]), content_length=6)
        if path == "/slow":
            count = int(request.query_one("n") or "5")
            delay = float(request.query_one("delay") or "0.1")
            return Response(200, [], self._slow(count, delay))
        if path == "/boom":
            raise RuntimeError("handler bug")
        if path == "/oci":
            raise OCIError(
                "BLOB_UNKNOWN", "blob unknown to registry", detail={"digest": "sha256:x"}, headers=[("X-Extra", "1")]
            )
        if path == "/noread":
            return Response(200, [], b"did not read")
        if path == "/empty":
            return Response(204, [("X-Empty", "1")])
        if path == "/file":
            assert self.file_path is not None
            offset = int(request.query_one("offset") or "0")
            length = int(request.query_one("length") or str(self.file_path.stat().st_size - offset))
            fd = os.open(self.file_path, os.O_RDONLY)
            self.opened_fds.append(fd)
            return Response(200, [("Content-Type", "application/octet-stream")], FileBody(fd, offset, length))
        raise OCIError("NOT_FOUND", "not found")

    async def _slow(self, count: int, delay: float) -> AsyncIterator[bytes]:
        for i in range(count):
            if i == 1:
                self.slow_started.set()
            yield f"piece{i};".encode()
            await trio.sleep(delay)


async def _pieces(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        await trio.lowlevel.checkpoint()
        yield piece


async def _start(
    nursery: trio.Nursery, app: App, limits: ServerLimits = FAST, shutdown: trio.Event | None = None
) -> ServerInfo:
    return await nursery.start(partial(serve_http, app, HOST, 0, limits=limits, shutdown=shutdown))


class RawClient:
    """An h11 client on a trio stream: full control of what is sent and when."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, info: ServerInfo) -> RawClient:
        return cls(await trio.open_tcp_stream(HOST, info.port))

    async def send(self, *events: h11.Event) -> None:
        for event in events:
            data = self.conn.send(event)
            if data:
                await self.stream.send_all(data)

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes | None = None
    ) -> tuple[h11.Response, bytes]:
        all_headers = [("Host", "test"), *(headers or [])]
        if body is not None and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in all_headers):
            all_headers.append(("Content-Length", str(len(body))))
        await self.send(h11.Request(method=method, target=target, headers=all_headers))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        return await self.read_response()

    async def read_response(self) -> tuple[h11.Response, bytes]:
        response: h11.Response | None = None
        body = bytearray()
        with trio.fail_after(10):
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert response is not None
                    return response, bytes(body)
                elif isinstance(event, h11.ConnectionClosed):
                    raise AssertionError("server closed the connection before a full response")

    def next_cycle(self) -> None:
        self.conn.start_next_cycle()

    async def aclose(self) -> None:
        await self.stream.aclose()


def _header(response: h11.Response, name: str) -> str | None:
    for key, value in response.headers:
        if key.decode().lower() == name.lower():
            return value.decode()
    return None


async def _read_until_closed(stream: trio.SocketStream, limit: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = bytearray()
    with trio.fail_after(limit):
        while True:
            try:
                piece = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not piece:
                break
            data += piece
    return bytes(data)


async def _recv_until(stream: trio.SocketStream, marker: bytes, buffer: bytearray) -> bytes:
    """Receives until ``marker`` is in ``buffer``; returns and removes everything up to it."""
    with trio.fail_after(5):
        while marker not in buffer:
            piece = await stream.receive_some(65536)
            assert piece, f"connection closed while waiting for {marker!r}; got {bytes(buffer)!r}"
            buffer += piece
    head, _, rest = bytes(buffer).partition(marker)
    buffer[:] = rest
    return head + marker


# ---- framing ---------------------------------------------------------------------------


async def test_keep_alive_two_requests_one_connection(nursery: trio.Nursery) -> None:
    app = App()
    info = await _start(nursery, app)
    client = await RawClient.connect(info)
    response, body = await client.request("GET", "/hello")
    assert (response.status_code, body) == (200, b"hello world")
    assert _header(response, "connection") is None
    client.next_cycle()
    response, body = await client.request("POST", "/echo?a=1&b=", body=b"second request")
    assert (response.status_code, body) == (200, b"second request")
    assert json.loads(_header(response, "x-query") or "") == {"a": ["1"], "b": [""]}
    await client.aclose()
    assert app.seen == [("GET", "/hello"), ("POST", "/echo")]

    # The same through httpx, which reuses one pooled connection.
    ports = set()
    async with httpx.AsyncClient(base_url=info.url, trust_env=False) as http:
        for _ in range(3):
            r = await http.get("/hello", extensions={})
            assert r.status_code == 200
            stream = r.extensions["network_stream"]
            ports.add(stream.get_extra_info("client_addr")[1])
    assert len(ports) == 1


async def test_head_has_length_and_no_body(nursery: trio.Nursery, tmp_path: Path) -> None:
    file_path = tmp_path / "blob"
    file_path.write_bytes(b"z" * 5000)
    app = App(file_path)
    info = await _start(nursery, app)
    client = await RawClient.connect(info)
    for target, length in (("/hello", 11), ("/file", 5000), ("/file?offset=100&length=50", 50), ("/stream-known", 6)):
        response, body = await client.request("HEAD", target)
        assert response.status_code == 200
        assert _header(response, "content-length") == str(length)
        assert body == b""
        client.next_cycle()
    # Had any body bytes been sent, this response would be garbled.
    response, body = await client.request("GET", "/hello")
    assert body == b"hello world"
    await client.aclose()
    # FileBody descriptors of HEAD responses are closed too.
    for fd in app.opened_fds:
        with pytest.raises(OSError):
            os.fstat(fd)


async def test_chunked_request_body(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    client = await RawClient.connect(info)
    await client.send(
        h11.Request(method="PUT", target="/echo", headers=[("Host", "t"), ("Transfer-Encoding", "chunked")])
    )
    parts = [b"a" * 10, b"b" * 70_000, b"c", b"d" * 300_000]
    for part in parts:
        await client.send(h11.Data(data=part))
        await trio.sleep(0.01)
    await client.send(h11.EndOfMessage())
    response, body = await client.read_response()
    assert response.status_code == 200
    assert body == b"".join(parts)
    assert _header(response, "x-received") == str(sum(map(len, parts)))
    assert _header(response, "x-method") == "PUT"


async def test_chunked_response(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    stream = await trio.open_tcp_stream(HOST, info.port)
    await stream.send_all(b"GET /stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    raw = await _read_until_closed(stream)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"content-length" not in head.lower()
    assert payload.endswith(b"0\r\n\r\n")
    # Decode it with an h11 client to be sure the framing is right.
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/stream", headers=[("Host", "t")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    body = b""
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Data):
            body += event.data
    assert body == b"first,second,third"

    # A streamed body with a known length is sent with Content-Length instead.
    async with httpx.AsyncClient(base_url=info.url, trust_env=False) as http:
        r = await http.get("/stream-known")
        assert r.headers["content-length"] == "6"
        assert "transfer-encoding" not in r.headers
        assert r.content == b"abcdef"
        r = await http.get("/stream")
        assert r.headers["transfer-encoding"] == "chunked"
        assert r.content == b"first,second,third"


async def test_content_length_request_body(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    payload = random.Random(0).randbytes(3 * 1024 * 1024 + 17)
    async with httpx.AsyncClient(base_url=info.url, trust_env=False) as http:
        r = await http.post("/echo", content=payload)
        assert r.status_code == 200
        assert r.headers["x-received"] == str(len(payload))
        assert r.content == payload
        r = await http.post("/echo", content=b"")
        assert (r.status_code, r.content, r.headers["x-received"]) == (200, b"", "0")


async def test_expect_100_continue(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    stream = await trio.open_tcp_stream(HOST, info.port)
    await stream.send_all(b"PUT /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
    buffer = bytearray()
    interim = await _recv_until(stream, b"\r\n\r\n", buffer)
    assert interim.startswith(b"HTTP/1.1 100 ")
    assert not buffer  # nothing else before the body was sent
    await stream.send_all(b"hello world")
    final = await _recv_until(stream, b"\r\n\r\n", buffer)
    assert final.startswith(b"HTTP/1.1 200 ")
    assert b"content-length: 11" in final.lower()
    while len(buffer) < 11:
        buffer += await stream.receive_some(1024)
    assert bytes(buffer) == b"hello world"
    await stream.aclose()


async def test_expect_100_continue_not_sent_when_body_unread(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    stream = await trio.open_tcp_stream(HOST, info.port)
    await stream.send_all(b"PUT /noread HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
    raw = await _read_until_closed(stream)
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 100" not in raw
    assert b"connection: close" in raw.lower()


async def test_no_body_status(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    client = await RawClient.connect(info)
    response, body = await client.request("GET", "/empty")
    assert response.status_code == 204
    assert _header(response, "content-length") is None
    assert _header(response, "x-empty") == "1"
    assert body == b""
    client.next_cycle()
    response, body = await client.request("GET", "/hello")
    assert body == b"hello world"


# ---- limits and timeouts ---------------------------------------------------------------


async def test_oversize_header_is_rejected_and_closed(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    stream = await trio.open_tcp_stream(HOST, info.port)
    head = b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    await stream.send_all(head)  # one write: h11 alone would accept a head that arrives whole
    raw = await _read_until_closed(stream)
    status_line = raw.split(b"\r\n", 1)[0]
    assert status_line.split()[1] in (b"431", b"400"), raw[:200]
    assert b"connection: close" in raw.lower()
    body = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert body["errors"][0]["code"] in ("TOO_LARGE", "BAD_REQUEST")
    # The server is still there for well-behaved clients.
    client = await RawClient.connect(info)
    assert (await client.request("GET", "/hello"))[1] == b"hello world"


async def test_oversize_header_trickled_in_pieces(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    stream = await trio.open_tcp_stream(HOST, info.port)
    await stream.send_all(b"GET /hello HTTP/1.1\r\nHost: t\r\n")
    with contextlib.suppress(trio.BrokenResourceError):  # the server may close while we write
        for _ in range(10):
            await stream.send_all(b"X-Pad: " + b"p" * 1000 + b"\r\n")
            await trio.sleep(0.01)
    raw = await _read_until_closed(stream)
    assert raw.split(b"\r\n", 1)[0].split()[1] in (b"431", b"400"), raw[:200]


async def test_header_just_under_the_limit_is_accepted(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    client = await RawClient.connect(info)
    response, body = await client.request("GET", "/hello", headers=[("X-Pad", "p" * 3500)])
    assert (response.status_code, body) == (200, b"hello world")


async def test_pipelined_requests(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    stream = await trio.open_tcp_stream(HOST, info.port)
    await stream.send_all(
        b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    raw = await _read_until_closed(stream)
    assert raw.count(b"HTTP/1.1 200 OK") == 3
    assert raw.index(b"hello world") < raw.index(b"abc") < raw.rindex(b"hello world")


async def test_malformed_request_line_is_400(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    stream = await trio.open_tcp_stream(HOST, info.port)
    await stream.send_all(b"THIS IS NOT HTTP\r\n\r\n")
    raw = await _read_until_closed(stream)
    assert raw.startswith(b"HTTP/1.1 400 ")
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["errors"][0]["code"] == "BAD_REQUEST"


async def test_header_timeout_partial_head(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    stream = await trio.open_tcp_stream(HOST, info.port)
    start = trio.current_time()
    await stream.send_all(b"GET /hello HTTP/1.1\r\nHost: t\r\n")  # never finished
    raw = await _read_until_closed(stream, limit=5)
    elapsed = trio.current_time() - start
    assert raw == b""
    assert 0.4 <= elapsed < 2.5


async def test_header_timeout_bounds_a_trickled_head(nursery: trio.Nursery) -> None:
    # Slowloris: one byte at a time, each well within the timeout. The whole head still has
    # to arrive within header_timeout.
    info = await _start(nursery, App())
    stream = await trio.open_tcp_stream(HOST, info.port)
    start = trio.current_time()
    closed_after = None
    with trio.move_on_after(5):
        for byte in b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"x" * 100:
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                closed_after = trio.current_time() - start
                break
            with trio.move_on_after(0.15):
                if await stream.receive_some(1024) == b"":
                    closed_after = trio.current_time() - start
                    break
    assert closed_after is not None, "a trickling client kept the connection open"
    assert closed_after < 2.0


async def test_first_request_waits_header_timeout(nursery: trio.Nursery) -> None:
    limits = ServerLimits(header_timeout=0.3, idle_timeout=30.0)
    info = await _start(nursery, App(), limits)
    stream = await trio.open_tcp_stream(HOST, info.port)
    start = trio.current_time()
    assert await _read_until_closed(stream, limit=5) == b""
    assert trio.current_time() - start < 2.0


async def test_idle_timeout(nursery: trio.Nursery) -> None:
    limits = ServerLimits(header_timeout=5.0, idle_timeout=0.5)
    info = await _start(nursery, App(), limits)
    client = await RawClient.connect(info)
    assert (await client.request("GET", "/hello"))[1] == b"hello world"
    start = trio.current_time()
    assert await _read_until_closed(client.stream, limit=5) == b""
    elapsed = trio.current_time() - start
    assert 0.4 <= elapsed < 2.5


async def test_idle_connection_may_then_send_slowly(nursery: trio.Nursery) -> None:
    # The idle timeout covers the wait for the next request; a request that then starts
    # within it is served.
    limits = ServerLimits(header_timeout=1.0, idle_timeout=1.0)
    info = await _start(nursery, App(), limits)
    client = await RawClient.connect(info)
    assert (await client.request("GET", "/hello"))[1] == b"hello world"
    client.next_cycle()
    await trio.sleep(0.6)
    await client.stream.send_all(b"GET /hello HTTP/1.1\r\n")
    await trio.sleep(0.6)  # 1.2 s after the previous response, 0.6 s into this head
    await client.stream.send_all(b"Host: t\r\n\r\n")
    client.conn.send(h11.Request(method="GET", target="/hello", headers=[("Host", "t")]))
    client.conn.send(h11.EndOfMessage())
    response, body = await client.read_response()
    assert (response.status_code, body) == (200, b"hello world")


async def test_body_read_timeout(nursery: trio.Nursery) -> None:
    app = App()
    info = await _start(nursery, app)
    stream = await trio.open_tcp_stream(HOST, info.port)
    start = trio.current_time()
    await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
    raw = await _read_until_closed(stream, limit=5)
    elapsed = trio.current_time() - start
    assert raw.startswith(b"HTTP/1.1 400 "), raw[:200]
    assert b"connection: close" in raw.lower()
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    assert 0.4 <= elapsed < 2.5


async def test_body_cut_short(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    stream = await trio.open_tcp_stream(HOST, info.port)
    await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nshort")
    await stream.send_eof()
    raw = await _read_until_closed(stream, limit=5)
    assert raw.startswith(b"HTTP/1.1 400 ")


# ---- errors ------------------------------------------------------------------------------


async def test_handler_exception_is_500_json_and_server_keeps_serving(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    info = await _start(nursery, App())
    client = await RawClient.connect(info)
    response, body = await client.request("GET", "/boom")
    assert response.status_code == 500
    assert _header(response, "content-type") == "application/json"
    document = json.loads(body)
    assert document["errors"][0]["code"] == "UNKNOWN"
    assert "handler bug" not in body.decode()  # internals are logged, not sent
    assert "handler failed" in caplog.text
    client.next_cycle()
    assert (await client.request("GET", "/hello"))[1] == b"hello world"
    async with httpx.AsyncClient(base_url=info.url, trust_env=False) as http:
        for _ in range(3):
            assert (await http.get("/boom")).status_code == 500
        assert (await http.get("/hello")).status_code == 200


async def test_oci_error_status_headers_and_json(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    async with httpx.AsyncClient(base_url=info.url, trust_env=False) as http:
        r = await http.get("/oci")
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-extra"] == "1"
        assert r.json() == {
            "errors": [
                {"code": "BLOB_UNKNOWN", "message": "blob unknown to registry", "detail": {"digest": "sha256:x"}}
            ]
        }
        r = await http.head("/oci")
        assert r.status_code == 404
        assert r.content == b""
        r = await http.get("/bad%ffpath")  # not UTF-8 once unquoted
        assert r.status_code == 400
        assert r.json()["errors"][0]["code"] == "BAD_REQUEST"
        r = await http.get("/echo?" + "&".join(f"k{i}=v" for i in range(100)))  # too many query fields
        assert r.status_code == 400


# ---- file bodies ---------------------------------------------------------------------


async def test_file_body_sendfile_with_offsets(nursery: trio.Nursery, tmp_path: Path) -> None:
    data = random.Random(7).randbytes(9 * 1024 * 1024 + 333)
    file_path = tmp_path / "blob"
    file_path.write_bytes(data)
    app = App(file_path)
    info = await _start(nursery, app)
    cases = [
        (0, len(data)),
        (0, 1),
        (1, 1000),
        (4 * 1024 * 1024 - 5, 4 * 1024 * 1024 + 10),
        (len(data) - 1, 1),
        (12345, 0),
        (len(data), 0),
        (777, len(data) - 777),
    ]
    async with httpx.AsyncClient(base_url=info.url, trust_env=False) as http:
        for offset, length in cases:
            r = await http.get("/file", params={"offset": offset, "length": length})
            assert r.status_code == 200
            assert r.headers["content-length"] == str(length)
            assert r.content == data[offset : offset + length], (offset, length)
    assert len(app.opened_fds) == len(cases)
    for fd in app.opened_fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # the server closed every descriptor


async def test_a_cached_file_span_is_read_without_a_worker_thread(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pd.httpd import _server

    data = random.Random(9).randbytes(300_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    threaded: list[int] = []
    run_sync = trio.to_thread.run_sync

    async def counting(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        threaded.append(1)
        return await run_sync(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert await _server._pread(fd, 1000, 5) == data[5:1005]  # just written: in the page cache
        assert threaded == ([] if _server._RWF_NOWAIT else [1])
        # Past the end (a short read) and a span the cache does not hold go to a worker thread.
        assert await _server._pread(fd, 1000, len(data) - 10) == data[-10:]
        # The kernel may keep the pages despite the advice (seen about once in ten runs on the
        # CI's VM): a read that finds them cached is right too, so evict and read again.
        for _attempt in range(20):
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            threaded.clear()
            assert await _server._pread(fd, 200_000, 50_000) == data[50_000:250_000]
            if threaded:
                break
            await trio.sleep(0.05)
        assert threaded == [1]
    finally:
        os.close(fd)


async def test_file_body_to_slow_reader(nursery: trio.Nursery, tmp_path: Path) -> None:
    # The socket buffer fills up, so sendfile has to wait for writability and resume.
    data = random.Random(8).randbytes(6 * 1024 * 1024)
    file_path = tmp_path / "blob"
    file_path.write_bytes(data)
    info = await _start(nursery, App(file_path))
    stream = await trio.open_tcp_stream(HOST, info.port)
    await stream.send_all(b"GET /file HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    received = bytearray()
    await trio.sleep(0.3)
    with trio.fail_after(20):
        while piece := await stream.receive_some(32 * 1024):
            received += piece
            if len(received) < 1024 * 1024:
                await trio.sleep(0.001)
    assert bytes(received).partition(b"\r\n\r\n")[2] == data


async def test_client_disconnect_during_file_body_closes_fd(nursery: trio.Nursery, tmp_path: Path) -> None:
    file_path = tmp_path / "blob"
    file_path.write_bytes(b"q" * (16 * 1024 * 1024))
    app = App(file_path)
    info = await _start(nursery, app)
    stream = await trio.open_tcp_stream(HOST, info.port)
    await stream.send_all(b"GET /file HTTP/1.1\r\nHost: t\r\n\r\n")
    await stream.receive_some(1024)
    await stream.aclose()
    with trio.fail_after(5):
        while True:
            try:
                os.fstat(app.opened_fds[0])
            except OSError:
                break
            await trio.sleep(0.02)
    # And the server goes on.
    async with httpx.AsyncClient(base_url=info.url, trust_env=False) as http:
        assert (await http.get("/hello")).content == b"hello world"


# ---- unread bodies and shutdown ----------------------------------------------------------


async def test_unread_request_body_closes_connection(nursery: trio.Nursery) -> None:
    info = await _start(nursery, App())
    stream = await trio.open_tcp_stream(HOST, info.port)
    # The rest of the body would be parsed as the next request if the server kept going.
    await stream.send_all(b"POST /noread HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nGET /boom HTTP/1.1\r\n")
    raw = await _read_until_closed(stream)
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in raw.lower()
    assert raw.endswith(b"did not read")
    assert raw.count(b"HTTP/1.1") == 1

    # A small body that is entirely buffered but unread: same rule.
    client = await RawClient.connect(info)
    response, _ = await client.request("POST", "/noread", body=b"tiny")
    assert _header(response, "connection") == "close"
    assert await _read_until_closed(client.stream) == b""

    # No body at all: the connection stays open.
    client = await RawClient.connect(info)
    response, _ = await client.request("POST", "/noread", headers=[("Content-Length", "0")])
    assert _header(response, "connection") is None
    client.next_cycle()
    assert (await client.request("GET", "/hello"))[1] == b"hello world"


async def test_graceful_shutdown_finishes_requests_in_progress(nursery: trio.Nursery) -> None:
    app = App()
    shutdown = trio.Event()
    stopped = trio.Event()
    limits = ServerLimits(graceful_timeout=5.0)

    async def run_server(*, task_status: trio.TaskStatus[ServerInfo]) -> None:
        await serve_http(app, HOST, 0, limits=limits, shutdown=shutdown, task_status=task_status)
        stopped.set()

    info = await nursery.start(run_server)
    idle = await RawClient.connect(info)
    assert (await idle.request("GET", "/hello"))[1] == b"hello world"  # then idle, keep-alive

    result: dict[str, object] = {}

    async def slow_request() -> None:
        client = await RawClient.connect(info)
        result["response"], result["body"] = await client.request("GET", "/slow?n=8&delay=0.1")
        # Its head was sent before the shutdown, so it could not say "Connection: close";
        # the server closes the connection once the response is complete.
        result["after"] = await _read_until_closed(client.stream, limit=2)

    async with trio.open_nursery() as inner:
        inner.start_soon(slow_request)
        await app.slow_started.wait()
        shutdown.set()
        await trio.sleep(0.1)
        # The listener is closed: new connections are refused.
        with pytest.raises(OSError):
            await trio.open_tcp_stream(HOST, info.port)
        # The idle keep-alive connection is closed right away.
        with trio.fail_after(1):
            assert await _read_until_closed(idle.stream) == b""
        assert not stopped.is_set()
    response = result["response"]
    assert isinstance(response, h11.Response)
    assert response.status_code == 200
    assert result["body"] == b"".join(f"piece{i};".encode() for i in range(8))
    assert result["after"] == b""
    with trio.fail_after(2):
        await stopped.wait()
    with pytest.raises(OSError):
        await trio.open_tcp_stream(HOST, info.port)


async def test_graceful_shutdown_deadline_cuts_long_requests(nursery: trio.Nursery) -> None:
    app = App()
    shutdown = trio.Event()
    stopped = trio.Event()
    limits = ServerLimits(graceful_timeout=0.3)

    async def run_server(*, task_status: trio.TaskStatus[ServerInfo]) -> None:
        await serve_http(app, HOST, 0, limits=limits, shutdown=shutdown, task_status=task_status)
        stopped.set()

    info = await nursery.start(run_server)
    stream = await trio.open_tcp_stream(HOST, info.port)
    await stream.send_all(b"GET /slow?n=100&delay=0.1 HTTP/1.1\r\nHost: t\r\n\r\n")
    await app.slow_started.wait()
    start = trio.current_time()
    shutdown.set()
    with trio.fail_after(3):
        await stopped.wait()
    assert trio.current_time() - start < 1.5
    raw = await _read_until_closed(stream)
    assert b"piece99;" not in raw  # cut, not completed


def test_shared_pacing_divides_the_rate_among_the_responses_in_progress() -> None:
    """Each paced response gets the rate ÷ the responses in progress, re-divided as they start and
    end; an ended one keeps its last share (its tail may still wait in the socket's buffer), and
    ending twice changes nothing. No rate, or no socket to pace: nothing is paced."""
    pacing = SharedPacing(900)
    paces: list[list[int]] = [[], [], []]
    ends = [pacing.start(paces[i].append) for i in range(3)]
    assert paces == [[900, 450, 300], [450, 300], [300]]
    assert ends[0] is not None and ends[1] is not None
    ends[0]()
    ends[0]()
    assert paces == [[900, 450, 300], [450, 300, 450], [300, 450]]
    ends[1]()
    assert paces[2][-1] == 900 and paces[1][-1] == 450
    assert SharedPacing(0).start(paces[0].append) is None and pacing.start(None) is None
    # The rate changes (a reload): 0 lifts the pace of the response still in progress when the
    # next one ends, not a pace of 1 byte a second.
    pacing.rate = 0
    assert pacing.start(paces[0].append) is None
    later = SharedPacing(600)
    ends = [later.start(paces[i].append) for i in (0, 1)]
    later.rate = 0
    assert ends[0] is not None
    ends[0]()
    assert paces[1][-1] == 0


async def test_a_drained_close_waits_until_the_last_bytes_have_left(nursery: trio.Nursery) -> None:
    """``drained_close``: on_close runs once the response's bytes have left the socket's send
    queue, not when its last byte is queued — a paced response's share of a shared rate
    (``SharedPacing``) must not end while a whole 64 KiB answer still waits in the buffer (a
    paced pull of 64 KiB chunks ran at twice its ``upload_rate``)."""
    closed = trio.Event()
    body = random.Random(3).randbytes(12 * 1024)

    async def app(request: Request) -> Response:
        assert request.pace is not None
        request.pace(1_000_000)  # as SharedPacing does: a paced response's share ends when drained
        return Response(200, [], body, on_close=closed.set, drained_close=True)

    info = await _start(nursery, app)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # before connecting: a window of a few packets
    await sock.connect((HOST, info.port))
    await sock.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    with trio.move_on_after(0.5):
        await closed.wait()
    assert not closed.is_set()  # the body is queued at the server, waiting for our window
    received = bytearray()
    with trio.fail_after(10):
        while not received.endswith(body):
            received += await sock.recv(64 * 1024)
        await closed.wait()
    sock.close()


async def test_drained_looks_when_the_bytes_could_have_left_and_gives_up_at_its_limit(
        autojump_clock: trio.testing.MockClock) -> None:
    """The wait for a send queue to empty looks when the queued bytes could have left at the
    connection's pace (a look or two, not one every few milliseconds), lets the last few packets
    go, ends at its limit whatever, and does not wait at all for an unpaced connection."""
    class Queue:
        def __init__(self, speed: float, rate: int) -> None:
            self.left, self.speed, self.rate, self.looks, self.at = 64 * 1024.0, speed, rate, 0, trio.current_time()

        def unsent(self) -> int:
            now = trio.current_time()
            self.left, self.at = max(0.0, self.left - self.speed * (now - self.at)), now
            self.looks += 1
            return int(self.left)

    paced = Queue(speed=32 * 1024, rate=32 * 1024)  # two seconds to leave, at its pace
    start = trio.current_time()
    await _drained(paced, 60)
    assert paced.left <= 4096 and 1.8 <= trio.current_time() - start < 2.1 and paced.looks <= 3
    slower = Queue(speed=16 * 1024, rate=32 * 1024)  # held back (a full window): leaves at half its pace
    start = trio.current_time()
    await _drained(slower, 60)
    assert slower.left <= 4096 and 3.6 <= trio.current_time() - start < 4.1 and slower.looks <= 8
    stuck = Queue(speed=0, rate=32 * 1024)  # a peer that stopped reading
    start = trio.current_time()
    await _drained(stuck, 5)
    assert trio.current_time() - start == pytest.approx(5, abs=0.01) and stuck.left > 0
    unpaced = Queue(speed=0, rate=0)  # a reload lifted the rate: no share to hold
    start = trio.current_time()
    await _drained(unpaced, 5)
    assert trio.current_time() == start and unpaced.looks == 0
