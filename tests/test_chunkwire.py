"""Chunk downloads on blocking keep-alive connections in worker threads (``p2pd/swarm/chunkwire.py``,
``PeerClient.fetch_chunk``), against a small HTTP/1.1 server on 127.0.0.1 that misbehaves on demand:
connections are reused, a pooled connection the server closed is replaced without an error,
error statuses keep the connection, wrong framing is an error, a cancelled fetch ends at once,
and a new TLS connection resumes the last full handshake's session (for a bounded time). The TLS path
is exercised by every swarm test too (peer TLS is on by default)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from p2pd.oci.digest import Digest
from p2pd.swarm import chunkwire
from p2pd.swarm.peers import PeerBusy, PeerClient, PeerError, PeerMissing, PeerRefused, PeerRelayCut, PeerUnreachable
from p2pd.swarm.tls import PeerTls

BLOB = os.urandom(3 * 65536 + 123)
DIGEST = Digest.parse("sha256:" + hashlib.sha256(BLOB).hexdigest())


@dataclass
class Server:
    """Answers ``GET`` with ``Range``; ``mode`` picks the behaviour of the next answers."""

    mode: str = "ok"
    connections: int = 0
    requests: list[str] = field(default_factory=list)
    port: int = 0

    async def serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        buffer = b""
        try:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                self.requests.append(lines[0])
                headers = dict(line.split(": ", 1) for line in lines[1:])
                if "Range" not in headers:  # a peer message: echo its body (or a large answer)
                    length = int(headers.get("Content-Length", "0"))
                    while len(buffer) < length:
                        buffer += await stream.receive_some(65536)
                    body, buffer = buffer[:length], buffer[length:]
                    await self.answer_message(stream, body)
                    if self.mode == "close":
                        return
                    continue
                first, last = (int(x) for x in headers["Range"].removeprefix("bytes=").split("-"))
                if not await self.answer(stream, first, last):
                    return
        except trio.BrokenResourceError:
            return
        finally:
            await stream.aclose()

    async def answer_message(self, stream: trio.SocketStream, body: bytes) -> None:
        status, text = (404, b"{}") if self.mode == "404" else (200, b"echo:" + body)
        if self.mode == "large":
            text = b"x" * (8 * 1024 * 1024 + 1)
        close = "Connection: close\r\n" if self.mode == "close" else ""
        await stream.send_all(f"HTTP/1.1 {status} X\r\nContent-Length: {len(text)}\r\n{close}\r\n".encode() + text)

    async def answer(self, stream: trio.SocketStream, first: int, last: int) -> bool:
        body = BLOB[first:last + 1]
        mode = self.mode
        if mode in ("404", "403", "429"):
            text = b'{"error": "no"}'
            await stream.send_all(f"HTTP/1.1 {mode} X\r\nContent-Length: {len(text)}\r\nRetry-After: 3\r\n\r\n"
                                  .encode() + text)
            return True
        if mode == "short":
            await stream.send_all(f"HTTP/1.1 206 Partial\r\nContent-Length: {len(body)}\r\n"
                                  f"Content-Range: bytes {first}-{last}/{len(BLOB)}\r\n\r\n".encode() + body[:10])
            return False
        if mode == "stall":
            await trio.sleep_forever()
        if mode in ("trickle", "pause", "stall-body"):
            await self.send_slowly(stream, f"HTTP/1.1 206 Partial\r\nContent-Length: {len(body)}\r\n"
                                           f"Content-Range: bytes {first}-{last}/{len(BLOB)}\r\n\r\n".encode(), body)
            return True
        if mode in ("relay-pause", "plain-pause", "relay-stall"):
            # 30,000 bytes, then a pause (0.7 s, or for ever), then the rest; a relay says so.
            relay = "X-P2PD-Relay: 1\r\n" if mode.startswith("relay") else ""
            await stream.send_all(f"HTTP/1.1 206 Partial\r\nContent-Length: {len(body)}\r\n{relay}"
                                  f"Content-Range: bytes {first}-{last}/{len(BLOB)}\r\n\r\n".encode() + body[:30000])
            if mode == "relay-stall":
                await trio.sleep_forever()
            await trio.sleep(0.7)
            await stream.send_all(body[30000:])
            return True
        if mode == "close":  # the answer, then the connection closed, as the header says
            await stream.send_all(f"HTTP/1.1 206 Partial\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
                                  f"Content-Range: bytes {first}-{last}/{len(BLOB)}\r\n\r\n".encode() + body)
            return False
        if mode == "wrong-range":
            first += 1
        await stream.send_all(f"HTTP/1.1 206 Partial\r\nContent-Length: {len(body)}\r\n"
                              f"Content-Range: bytes {first}-{last}/{len(BLOB)}\r\nX-P2PD-Have: gA==\r\n\r\n"
                              .encode() + body)
        return mode != "close-after"


    async def send_slowly(self, stream: trio.SocketStream, head: bytes, body: bytes) -> None:
        """trickle: 4,000-byte pieces 5 ms apart; pause: 30,000 bytes, ten 1,000-byte pieces
        0.1 s apart, then the rest; stall-body: 30,000 bytes, then nothing."""
        await stream.send_all(head)
        if self.mode == "trickle":
            for offset in range(0, len(body), 4000):
                await stream.send_all(body[offset:offset + 4000])
                await trio.sleep(0.005)
            return
        await stream.send_all(body[:30000])
        if self.mode == "stall-body":
            await trio.sleep_forever()
        for offset in range(30000, 40000, 1000):
            await trio.sleep(0.1)
            await stream.send_all(body[offset:offset + 1000])
        await stream.send_all(body[40000:])


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    state = Server()
    listeners = await nursery.start(functools.partial(trio.serve_tcp, state.serve, 0, host="127.0.0.1"))
    state.port = listeners[0].socket.getsockname()[1]
    return state


async def test_chunks_arrive_verified_over_one_kept_alive_connection(server: Server) -> None:
    client = PeerClient("me", None)
    address = f"127.0.0.1:{server.port}"
    try:
        for start in (0, 65536, 131072):
            chunk = await client.fetch_chunk(address, DIGEST, start, 65536)
            assert bytes(chunk.data) == BLOB[start:start + 65536]
            assert chunk.sha256 == hashlib.sha256(BLOB[start:start + 65536]).digest()
            assert chunk.have == b"\x80"
        assert server.connections == 1
        assert server.requests == [f"GET /p2p/v1/blobs/{DIGEST} HTTP/1.1"] * 3

        # The server closes a connection after its answer: the next fetch opens a new one, no error.
        server.mode = "close-after"
        await client.fetch_chunk(address, DIGEST, 0, 100)
        server.mode = "ok"
        await client.fetch_chunk(address, DIGEST, 100, 100)
        assert server.connections == 2
    finally:
        await client.aclose()


@pytest.mark.parametrize(("mode", "error"), [("404", PeerMissing), ("403", PeerRefused), ("429", PeerBusy)])
async def test_error_statuses_are_peer_errors_and_keep_the_connection(server: Server, mode: str,
                                                                     error: type[PeerError]) -> None:
    client = PeerClient("me", None)
    address = f"127.0.0.1:{server.port}"
    try:
        server.mode = mode
        with pytest.raises(error) as caught:
            await client.fetch_chunk(address, DIGEST, 0, 100)
        if isinstance(caught.value, PeerBusy):
            assert caught.value.retry_after == 3.0
        server.mode = "ok"
        assert bytes((await client.fetch_chunk(address, DIGEST, 0, 100)).data) == BLOB[:100]
        assert server.connections == 1  # the small error body was read: the connection stayed usable
    finally:
        await client.aclose()


@pytest.mark.parametrize("mode", ["short", "wrong-range"])
async def test_bad_framing_is_an_error(server: Server, mode: str) -> None:
    client = PeerClient("me", None)
    try:
        server.mode = mode
        with pytest.raises(PeerError):
            await client.fetch_chunk(f"127.0.0.1:{server.port}", DIGEST, 0, 1000)
    finally:
        await client.aclose()


async def test_a_cancelled_fetch_ends_at_once_and_drops_its_connection(server: Server) -> None:
    client = PeerClient("me", None, read_timeout=60.0)
    address = f"127.0.0.1:{server.port}"
    try:
        server.mode = "stall"
        started = trio.current_time()
        with trio.move_on_after(0.5) as scope:
            await client.fetch_chunk(address, DIGEST, 0, 1000)
        assert scope.cancelled_caught
        assert trio.current_time() - started < 5
        server.mode = "ok"
        await client.fetch_chunk(address, DIGEST, 0, 1000)
        assert server.connections == 2  # the aborted connection was not pooled
    finally:
        await client.aclose()


async def test_a_chunk_is_stored_in_the_fetch_thread_only_when_asked_and_not_after_a_cancel(
        server: Server, tmp_path: Path) -> None:
    client = PeerClient("me", None, read_timeout=60.0)
    address = f"127.0.0.1:{server.port}"
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    calls: list[tuple[bytes, bytes]] = []

    def store(data: bytearray, sha256: bytes) -> bool:
        calls.append((bytes(data), sha256))
        if sha256 != hashlib.sha256(BLOB[65536:131072]).digest():
            return False  # not the chunk the caller's map names: nothing written
        os.pwrite(fd, data, 65536)
        return True

    try:
        chunk = await client.fetch_chunk(address, DIGEST, 65536, 65536, store=store)
        assert chunk.stored and os.pread(fd, 65536, 65536) == BLOB[65536:131072]
        assert calls == [(BLOB[65536:131072], chunk.sha256)]
        chunk = await client.fetch_chunk(address, DIGEST, 0, 65536, store=store)  # a hash store() rejects
        assert not chunk.stored and bytes(chunk.data) == BLOB[:65536]
        assert not (await client.fetch_chunk(address, DIGEST, 0, 100)).stored  # no store given
        # A status other than 206 never reaches store().
        server.mode = "404"
        with pytest.raises(PeerMissing):
            await client.fetch_chunk(address, DIGEST, 65536, 65536, store=store)
        # A cancelled fetch never stores, even if its thread ends later.
        server.mode = "stall"
        with trio.move_on_after(0.3):
            await client.fetch_chunk(address, DIGEST, 65536, 65536, store=store)
        await trio.sleep(0.2)
        assert len(calls) == 2
    finally:
        os.close(fd)
        await client.aclose()


def test_an_action_runs_only_until_the_exchange_is_aborted() -> None:
    exchange = chunkwire.Exchange()
    ran: list[int] = []
    assert exchange.unless_aborted(lambda: ran.append(1))
    exchange.abort()
    assert not exchange.unless_aborted(lambda: ran.append(2))
    assert ran == [1]


async def test_an_unreachable_peer_is_a_peer_error() -> None:
    client = PeerClient("me", None, connect_timeout=1.0)
    try:
        with pytest.raises(PeerError):
            await client.fetch_chunk("127.0.0.1:9", DIGEST, 0, 100)
    finally:
        await client.aclose()


@pytest.mark.parametrize("tls", [False, True])
async def test_a_peer_where_nothing_answers_is_unreachable_and_a_silent_one_is_not(
        nursery: trio.Nursery, tmp_path: Path, tls: bool) -> None:
    """Nothing listening (refused) and a connection closed before any answer are
    ``PeerUnreachable``: the peer's process is gone (the engine then takes a dead coordinator's
    digests over in a short takeover). A peer that takes the connection and says nothing within
    the read timeout is a plain ``PeerError``: it may be overloaded and still at work."""
    client_tls = PeerTls.derived(os.urandom(32), "asker", tmp_path / "asker").client() if tls else None
    client = PeerClient("me", None, connect_timeout=1.0, read_timeout=0.3, tls=client_tls)

    async def close_at_once(stream: trio.SocketStream) -> None:
        await stream.aclose()

    async def say_nothing(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    try:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{probe.getsockname()[1]}"
        probe.close()
        with pytest.raises(PeerUnreachable):
            await client.hello(refused)
        closing = await nursery.start(functools.partial(trio.serve_tcp, close_at_once, 0, host="127.0.0.1"))
        with pytest.raises(PeerUnreachable):
            await client.hello(f"127.0.0.1:{closing[0].socket.getsockname()[1]}")
        silent = await nursery.start(functools.partial(trio.serve_tcp, say_nothing, 0, host="127.0.0.1"))
        with pytest.raises(PeerError) as raised:
            await client.hello(f"127.0.0.1:{silent[0].socket.getsockname()[1]}")
        assert not isinstance(raised.value, PeerUnreachable)
    finally:
        await client.aclose()


async def test_a_pooled_tls_connection_the_peer_dropped_uncleanly_is_replaced_without_an_error(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    """A peer that answers and then drops the connection without a TLS close (killed, or its
    socket closed under TLS): the next request on the pooled connection meets an SSL EOF, and is
    sent once more on a new connection, as for a clean close."""
    key = os.urandom(32)
    server_tls = PeerTls.derived(key, "holder", tmp_path / "holder").server()
    connections = 0

    async def answer_once_then_drop(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        tls_stream = trio.SSLStream(stream, server_tls, server_side=True)
        request = b""
        with contextlib.suppress(trio.BrokenResourceError):
            while b"\r\n\r\n" not in request:
                request += await tls_stream.receive_some(65536)
            first, last = (int(x) for x in request.split(b"Range: bytes=")[1].split(b"\r\n")[0].split(b"-"))
            body = BLOB[first:last + 1]
            await tls_stream.send_all(f"HTTP/1.1 206 Partial\r\nContent-Length: {len(body)}\r\n"
                                      f"Content-Range: bytes {first}-{last}/{len(BLOB)}\r\n\r\n".encode() + body)
        await trio.sleep(0.2)  # the answer is read and the connection pooled
        await stream.aclose()  # the TCP connection, with no TLS close_notify

    listeners = await nursery.start(functools.partial(trio.serve_tcp, answer_once_then_drop, 0, host="127.0.0.1"))
    address = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    client = PeerClient("me", None, tls=PeerTls.derived(key, "asker", tmp_path / "asker").client())
    try:
        assert bytes((await client.fetch_chunk(address, DIGEST, 0, 100)).data) == BLOB[:100]
        await trio.sleep(0.5)
        assert bytes((await client.fetch_chunk(address, DIGEST, 100, 100)).data) == BLOB[100:200]
        assert connections == 2
    finally:
        await client.aclose()


async def _tls_server(nursery: trio.Nursery, state: Server, tmp_path: Path,
                      on_handshake: Callable[[trio.SSLStream[trio.SocketStream]], None] | None = None,
                      ) -> tuple[str, ssl.SSLContext]:
    """``state`` served over mutual TLS as between nodes; returns its address and a client context."""
    key = os.urandom(32)
    server_tls = PeerTls.derived(key, "holder", tmp_path / "holder").server()

    async def serve_tls(stream: trio.SocketStream) -> None:
        tls_stream = trio.SSLStream(stream, server_tls, server_side=True)
        try:
            await tls_stream.do_handshake()
        except trio.BrokenResourceError:
            return
        if on_handshake is not None:
            on_handshake(tls_stream)
        await state.serve(tls_stream)  # type: ignore[arg-type]  # the same byte stream interface

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve_tls, 0, host="127.0.0.1"))
    client_tls = PeerTls.derived(key, "asker", tmp_path / "asker").client()
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}", client_tls


async def test_a_new_tls_connection_resumes_the_last_full_handshakes_session(
        nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mutual TLS as between nodes: a connection after the first resumes its session (cheaper:
    no certificate signing or checking), for ``_SESSION_REUSE`` seconds after the last full
    handshake, then a full one again; the chunks are the same either way."""
    state = Server(mode="close-after")  # every answer ends its connection: every fetch connects anew
    resumed: list[bool] = []
    address, client_tls = await _tls_server(nursery, state, tmp_path,
                                            lambda tls_stream: resumed.append(bool(tls_stream.session_reused)))
    client = PeerClient("asker", None, tls=client_tls)
    try:
        for start in (0, 65536, 131072):
            chunk = await client.fetch_chunk(address, DIGEST, start, 65536)
            assert bytes(chunk.data) == BLOB[start:start + 65536]
        assert resumed == [False, True, True]
        monkeypatch.setattr(chunkwire, "_SESSION_REUSE", 0.0)  # the full handshake is too old now
        await client.fetch_chunk(address, DIGEST, 0, 100)
        assert resumed == [False, True, True, False]
    finally:
        await client.aclose()


async def test_peer_messages_go_over_the_chunk_connections(server: Server) -> None:
    # A message and the chunks after it share one kept-alive connection (one TLS handshake per
    # peer, not one per client library); the body of a POST arrives whole.
    opened: list[str] = []
    client = PeerClient("me", None, on_connect=opened.append)
    address = f"127.0.0.1:{server.port}"
    try:
        assert await client.manifest(address, DIGEST) == b"echo:"
        chunk = await client.fetch_chunk(address, DIGEST, 0, 65536)
        assert bytes(chunk.data) == BLOB[:65536]
        answer = await trio.to_thread.run_sync(client._wire.request, address, "POST", "/p2p/v1/announce", {},
                                               b"hello" * 1000, 1024 * 1024, chunkwire.Exchange())
        assert answer.status == 200 and bytes(answer.body) == b"echo:" + b"hello" * 1000
        assert server.connections == 1 and opened == ["plain"]
        assert [line.split()[0] for line in server.requests] == ["GET", "GET", "POST"]
    finally:
        await client.aclose()


@pytest.mark.parametrize("length", [65536, 131072])
async def test_an_answer_that_closes_its_connection_is_read_whole_and_the_connection_not_kept(
        server: Server, length: int) -> None:
    """``Connection: close`` (a peer's server going away, or another implementation): http.client
    hands the socket to the answer and forgets it, and the answer is still read whole with its
    read timeout — chunks of both reading paths and a message — on a new connection each time.
    (Until 12-07 the relay timeout was set through the forgotten socket: an AttributeError that
    failed a coordinator's hand-off and the pull waiting on it.)"""
    opened: list[str] = []
    client = PeerClient("me", None, read_timeout=2.0, on_connect=opened.append)
    address = f"127.0.0.1:{server.port}"
    server.mode = "close"
    try:
        for _ in range(2):
            chunk = await client.fetch_chunk(address, DIGEST, 0, length)
            assert bytes(chunk.data) == BLOB[:length]
        assert await client.manifest(address, DIGEST) == b"echo:"
        assert server.connections == 3 and opened == ["plain"] * 3
    finally:
        await client.aclose()


@pytest.mark.parametrize(("mode", "error"), [("404", PeerMissing), ("large", PeerError)])
async def test_a_message_answer_that_is_missing_or_too_large_is_a_peer_error(server: Server, mode: str,
                                                                             error: type[Exception]) -> None:
    server.mode = mode
    client = PeerClient("me", None)
    try:
        with pytest.raises(error):
            await client.manifest(f"127.0.0.1:{server.port}", DIGEST)
    finally:
        await client.aclose()


async def _address(nursery: trio.Nursery, server: Server, tmp_path: Path,
                   tls: bool) -> tuple[str, ssl.SSLContext | None]:
    if tls:
        return await _tls_server(nursery, server, tmp_path)
    return f"127.0.0.1:{server.port}", None


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("mode", ["trickle", "pause"])
async def test_a_large_chunk_arriving_in_small_pieces_is_read_whole_and_keeps_the_connection(
        nursery: trio.Nursery, server: Server, tmp_path: Path, tls: bool, mode: str) -> None:
    """A chunk over 64 KiB is read a record's worth per wake-up (SO_RCVLOWAT): pieces smaller
    than that, and a trickle slower than the gathering wait, arrive whole and in order; a trickle
    is no timeout (1,000 bytes every 0.1 s against a read timeout of 0.35 s); the connection then
    carries the next request."""
    address, client_tls = await _address(nursery, server, tmp_path, tls)
    client = PeerClient("me", None, read_timeout=0.35, tls=client_tls)
    try:
        server.mode = mode
        chunk = await client.fetch_chunk(address, DIGEST, 0, 131072)
        assert bytes(chunk.data) == BLOB[:131072]
        assert chunk.sha256 == hashlib.sha256(BLOB[:131072]).digest()
        server.mode = "ok"
        chunk = await client.fetch_chunk(address, DIGEST, 131072, len(BLOB) - 131072)
        assert bytes(chunk.data) == BLOB[131072:]
        assert server.connections == 1
    finally:
        await client.aclose()


@pytest.mark.parametrize("tls", [False, True])
async def test_a_large_chunk_that_stops_mid_body_times_out_and_a_cancel_ends_it_at_once(
        nursery: trio.Nursery, server: Server, tmp_path: Path, tls: bool) -> None:
    address, client_tls = await _address(nursery, server, tmp_path, tls)
    client = PeerClient("me", None, read_timeout=0.35, tls=client_tls)
    try:
        server.mode = "stall-body"
        started = trio.current_time()
        with pytest.raises(PeerError, match="timeout"):
            await client.fetch_chunk(address, DIGEST, 0, 131072)
        assert trio.current_time() - started < 3
    finally:
        await client.aclose()
    slow = PeerClient("me", None, read_timeout=60.0, tls=client_tls)
    try:
        started = trio.current_time()
        with trio.move_on_after(0.5) as scope:
            await slow.fetch_chunk(address, DIGEST, 0, 131072)
        assert scope.cancelled_caught and trio.current_time() - started < 3
    finally:
        await slow.aclose()


@pytest.mark.parametrize("length", [65536, 131072])
async def test_a_relayed_answer_may_pause_longer_than_the_read_timeout_and_is_cut_after_its_own(
        server: Server, length: int) -> None:
    """A relayed chunk (``X-P2PD-Relay``) comes as fast as it reaches the peer, whose own source
    may pause: its answer is read with three read timeouts of patience (1.5 s here), a direct
    answer with one (0.5 s). A relay that stops for good is cut short after its own timeout.
    Both ways of reading a body: a 64 KiB chunk in buffered steps, a larger one gathered. (The
    pause, 0.7 s, is nearer the direct timeout than the relay's: a loaded machine only makes it
    longer, and 0.3 s of margin on the relay's side was once not enough under a CPU hog.)"""
    client = PeerClient("me", None, read_timeout=0.5)
    address = f"127.0.0.1:{server.port}"
    try:
        server.mode = "relay-pause"  # 0.7 s without a byte, mid-body
        chunk = await client.fetch_chunk(address, DIGEST, 0, length)
        assert bytes(chunk.data) == BLOB[:length]
        server.mode = "plain-pause"
        with pytest.raises(PeerError, match="timeout"):
            await client.fetch_chunk(address, DIGEST, 0, length)
        server.mode = "relay-stall"
        started = trio.current_time()
        with pytest.raises(PeerRelayCut, match="timeout"):
            await client.fetch_chunk(address, DIGEST, 0, length)
        assert 1.4 <= trio.current_time() - started < 4
        # The connection a relay used is not left with the relay's patience: a direct answer
        # that pauses on a connection from the pool still times out after one read timeout.
        server.mode = "relay-pause"
        await client.fetch_chunk(address, DIGEST, 0, length)
        server.mode = "plain-pause"
        with pytest.raises(PeerError, match="timeout"):
            await client.fetch_chunk(address, DIGEST, 0, length)
    finally:
        await client.aclose()


@pytest.mark.parametrize("length", [65536, 131072])
async def test_a_chunk_read_for_relaying_lands_in_the_given_buffer_and_reports_each_read(
        nursery: trio.Nursery, server: Server, length: int) -> None:
    """An ``Exchange`` with a buffer and a progress callback (a chunk that this node passes on
    while it arrives: ``p2pd.swarm.engine.Arrival``): the body is read into that buffer, and the
    callback hears the bytes so far after every read, a record's worth at a time at most for a
    64 KiB chunk too (it is otherwise read in one 64 KiB step), ending at the chunk's length."""
    client = PeerClient("me", None, read_timeout=2.0)
    buffer = bytearray(length)
    seen: list[int] = []
    try:
        server.mode = "trickle"
        exchange = chunkwire.Exchange(buffer, seen.append)
        chunk = await client.fetch_chunk(f"127.0.0.1:{server.port}", DIGEST, 0, length, exchange=exchange)
        assert chunk.data is buffer and bytes(buffer) == BLOB[:length]
        assert seen == sorted(seen) and seen[-1] == length == exchange.received
        assert len(seen) >= length // (16 * 1024)
        assert all(later - earlier <= 16 * 1024 + 8192 for earlier, later in zip([0, *seen], seen, strict=False))
        # A buffer of another length is not used: the body gets one of its own.
        server.mode = "ok"
        other = await client.fetch_chunk(f"127.0.0.1:{server.port}", DIGEST, 0, 1000,
                                         exchange=chunkwire.Exchange(bytearray(10), seen.append))
        assert bytes(other.data) == BLOB[:1000] and len(other.data) == 1000
    finally:
        await client.aclose()
