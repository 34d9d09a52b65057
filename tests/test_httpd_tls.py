"""HTTPS in the shared server (p2pd/httpd): file bodies over TLS, keep-alive, handshake
deadline, plaintext on the TLS port, client certificates, and reloading the certificate
without touching open connections."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from p2pd.errors import ConfigError
from p2pd.httpd import FileBody, Request, Response, ServerInfo, ServerLimits, TlsContextProvider, TlsFiles, serve_http
from p2pd.oci.ranges import parse_range
from tests.harness.certs import Ca, Issued, make_ca

DATA = os.urandom(3 * 1024 * 1024 + 17)


@dataclass
class TlsServer:
    info: ServerInfo
    ca: Ca
    server: Issued
    provider: TlsContextProvider
    peers: list[tuple[str, int] | None]
    paceable: list[bool]


def _client_context(ca: Ca, client: Issued | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    if client is not None:
        context.load_cert_chain(client.cert_file, client.key_file)
    return context


async def _start(nursery: trio.Nursery, tmp_path: Path, *, client_ca: Path | None = None) -> TlsServer:
    ca = make_ca(tmp_path / "pki", "server")
    issued = ca.issue("seed")
    live = TlsFiles(tmp_path / "live.crt", tmp_path / "live.key", client_ca)
    shutil.copy(issued.cert_file, live.cert_file)
    shutil.copy(issued.key_file, live.key_file)
    provider = TlsContextProvider(live)
    data_file = tmp_path / "blob"
    data_file.write_bytes(DATA)
    peers: list[tuple[str, int] | None] = []
    paceable: list[bool] = []

    async def handler(request: Request) -> Response:
        peers.append(request.client)
        paceable.append(request.pace is not None)
        if request.path == "/file":
            fd = os.open(data_file, os.O_RDONLY)
            byte_range = parse_range(request.headers.get("range"), len(DATA))
            if byte_range is None:
                return Response(200, [], FileBody(fd, 0, len(DATA)))
            return Response(206, [("Content-Range", byte_range.content_range(len(DATA)))],
                            FileBody(fd, byte_range.start, byte_range.length))
        return Response(200, [("Content-Type", "text/plain")], b"hello")

    limits = ServerLimits(header_timeout=0.5)
    info = await nursery.start(partial(serve_http, handler, "127.0.0.1", 0, limits=limits, tls=provider.context))
    return TlsServer(info, ca, issued, provider, peers, paceable)


@pytest.fixture
async def tls_server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[TlsServer]:
    yield await _start(nursery, tmp_path)


async def test_file_bodies_ranges_head_and_keep_alive_over_tls(tls_server: TlsServer) -> None:
    assert tls_server.info.url.startswith("https://")
    async with httpx.AsyncClient(base_url=tls_server.info.url, verify=_client_context(tls_server.ca),
                                 trust_env=False, timeout=10) as client:
        r = await client.get("/file")
        assert r.status_code == 200 and r.content == DATA
        r = await client.get("/file", headers={"Range": "bytes=1000-1999"})
        assert r.status_code == 206 and r.content == DATA[1000:2000]
        r = await client.head("/file")
        assert r.status_code == 200 and int(r.headers["content-length"]) == len(DATA) and r.content == b""
    # One TLS connection carried all three requests, and the client address is known.
    assert len({peer for peer in tls_server.peers}) == 1 and tls_server.peers[0] is not None
    # The handler can pace the connection: its TCP socket is found under the TLS stream.
    assert tls_server.paceable == [True, True, True]


async def test_a_small_answer_leaves_in_one_tls_record_with_its_head(tls_server: TlsServer) -> None:
    # A peer asks for thousands of small chunks: each answer's head and body go out in one
    # send, so one TLS read returns the whole answer (a read returns one record at most).
    def exchange(path: str, extra: str = "") -> bytes:
        context = _client_context(tls_server.ca)
        with socket.create_connection(("127.0.0.1", tls_server.info.port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nHost: seed\r\n{extra}\r\n".encode())
            time.sleep(0.5)  # the whole answer is here by now, in as many records as it was sent
            return tls.recv(1 << 20)

    first_read = await trio.to_thread.run_sync(exchange, "/file", "Range: bytes=0-999\r\n")
    head, _, body = first_read.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206") and body == DATA[:1000]
    head, _, body = (await trio.to_thread.run_sync(exchange, "/")).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b"hello"


async def test_untrusted_server_certificate_fails_at_the_client(tls_server: TlsServer, tmp_path: Path) -> None:
    other = make_ca(tmp_path / "other", "other")
    async with httpx.AsyncClient(base_url=tls_server.info.url, verify=_client_context(other), trust_env=False,
                                 timeout=10) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get("/")


async def test_silent_client_is_dropped_after_the_handshake_deadline(tls_server: TlsServer) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", tls_server.info.port)
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""  # closed by the server, ~0.5 s
    await stream.aclose()


async def test_plaintext_on_the_tls_port_is_closed(tls_server: TlsServer) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", tls_server.info.port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    received = b""
    with trio.fail_after(5):
        while True:
            piece = await stream.receive_some(1000)
            if not piece:
                break
            received += piece
    assert b"hello" not in received  # no HTTP answer in clear; the server survives:
    await stream.aclose()
    async with httpx.AsyncClient(base_url=tls_server.info.url, verify=_client_context(tls_server.ca),
                                 trust_env=False, timeout=10) as client:
        assert (await client.get("/")).text == "hello"


async def test_client_certificates_when_a_client_ca_is_set(nursery: trio.Nursery, tmp_path: Path) -> None:
    clients = make_ca(tmp_path / "clients", "clients")
    server = await _start(nursery, tmp_path, client_ca=clients.cert_file)
    good = clients.issue("node-1", client=True)
    stranger = make_ca(tmp_path / "stranger", "stranger").issue("node-x", client=True)
    expired = clients.issue("node-old", client=True, expired=True)
    for client_cert in (None, stranger, expired):
        async with httpx.AsyncClient(base_url=server.info.url, verify=_client_context(server.ca, client_cert),
                                     trust_env=False, timeout=10) as client:
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                await client.get("/")
    async with httpx.AsyncClient(base_url=server.info.url, verify=_client_context(server.ca, good),
                                 trust_env=False, timeout=10) as client:
        assert (await client.get("/")).text == "hello"


def _peer_fingerprint(port: int, ca: Ca) -> bytes:
    import socket

    context = _client_context(ca)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def test_reload_changes_new_connections_only(tls_server: TlsServer, tmp_path: Path) -> None:
    before = await trio.to_thread.run_sync(_peer_fingerprint, tls_server.info.port, tls_server.ca)
    async with httpx.AsyncClient(base_url=tls_server.info.url, verify=_client_context(tls_server.ca),
                                 trust_env=False, timeout=10) as kept:
        assert (await kept.get("/")).text == "hello"
        renewed = tls_server.ca.issue("seed", file_name="renewed")
        shutil.copy(renewed.cert_file, tls_server.provider.files.cert_file)
        shutil.copy(renewed.key_file, tls_server.provider.files.key_file)
        assert tls_server.provider.reload()
        after = await trio.to_thread.run_sync(_peer_fingerprint, tls_server.info.port, tls_server.ca)
        assert after != before
        # The connection opened before the reload goes on as it was.
        assert (await kept.get("/")).text == "hello"
        assert len(set(tls_server.peers[:2])) == 1
        # A broken file: the reload says no, the server keeps the renewed certificate.
        tls_server.provider.files.key_file.write_text("not a key")
        assert not tls_server.provider.reload()
        assert await trio.to_thread.run_sync(_peer_fingerprint, tls_server.info.port, tls_server.ca) == after


def test_unloadable_files_are_config_errors(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "x")
    a, b = ca.issue("a"), ca.issue("b")
    with pytest.raises(ConfigError):
        TlsContextProvider(TlsFiles(a.cert_file, b.key_file))  # key of another certificate
    with pytest.raises(ConfigError):
        TlsContextProvider(TlsFiles(tmp_path / "missing.crt", a.key_file))
