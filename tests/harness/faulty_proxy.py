"""A misbehaving HTTP proxy for registry traffic: truncate, corrupt, throttle, stall or count blobs.

``serve_faulty_proxy(upstream_url, faults, task_status=...)`` runs our HTTP server
(``p2pd.httpd.serve_http``) on 127.0.0.1 and forwards every request to ``upstream_url`` with
an ``httpx.AsyncClient``, streaming bodies both ways. Faults apply to blob bodies only
(``GET /v2/<name>/blobs/<digest>``); manifests, chunk maps and everything else pass through
unchanged unless a fault says otherwise. Start it from a trio test::

    proxy = await nursery.start(partial(serve_faulty_proxy, seed_url, ProxyFaults(truncate_after=300_000)))
    ... proxy.url ... proxy.blob_gets() ... proxy.faults.rate = None  # faults can change at any time

Unlike the rest of ``tests.harness`` this module imports ``p2pd.httpd`` (the shared HTTP
server); nothing in ``fixtures`` imports it, so the harness still runs without the product.

Every wait is bounded: a stalled or hanging response sleeps until the proxy is cancelled,
which the test's nursery does when it ends.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

import httpx
import trio

from p2pd.httpd import Request, Response, ServerInfo, serve_http

from .net import assert_loopback

__all__ = ["FaultyProxy", "ProxyFaults", "ProxyRequest", "serve_faulty_proxy"]

_BLOB_RE = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+:[a-zA-Z0-9=_-]+)")
_CHUNKS_RE = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[a-z0-9]+:[a-zA-Z0-9=_-]+)/chunks")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
# Hop-by-hop headers and the ones httpx or our server set themselves.
_DROP_REQUEST = {
    "host",
    "connection",
    "keep-alive",
    "content-length",
    "transfer-encoding",
    "te",
    "upgrade",
    "proxy-connection",
    "expect",
}
_DROP_RESPONSE = {"connection", "keep-alive", "content-length", "transfer-encoding", "date", "server"}
_PIECE = 64 * 1024
_MAX_REQUEST_BODY = 64 * 1024 * 1024


@dataclass
class ProxyFaults:
    """What the proxy does to blob responses (all off by default; change them at any time).

    Attributes:
        truncate_after: each blob response sends at most this many body bytes, then the
            connection is closed (the client sees fewer bytes than ``Content-Length``).
        corrupt: the byte in the middle of the blob (offset ``size // 2``) is flipped in
            every response that carries it, Range responses included.
        rate: blob bodies are sent at about this many bytes per second (per response).
        stall_after: after this many body bytes of a blob response nothing more is sent
            (the connection stays open) until the proxy is cancelled, or for ``pause``
            seconds when that is set (then the rest flows, as when TCP recovers by itself).
        pause: see ``stall_after``.
        hang: blob and chunk-map requests are never answered (no status line).
        chunk_maps: False answers chunk-map requests (``.../blobs/<digest>/chunks``) 404
            like a registry without the endpoint.
        ignore_range: blob GETs are forwarded without their ``Range`` header (a proxy, or an old
            registry, that answers every one with the whole blob); ``ProxyRequest.range`` still
            records what was asked.
    """

    truncate_after: int | None = None
    corrupt: bool = False
    rate: float | None = None
    stall_after: int | None = None
    pause: float | None = None
    hang: bool = False
    chunk_maps: bool = True
    ignore_range: bool = False


@dataclass
class ProxyRequest:
    """One request the proxy saw, and what it sent back (``body_bytes`` grows while streaming)."""

    method: str
    path: str
    route: str  # "blob", "chunks", "manifest" or "other"
    range: str | None
    status: int | None = None
    body_bytes: int = 0
    cut: bool = False  # the proxy cut the body short on purpose (truncate)


@dataclass
class FaultyProxy:
    """A running proxy: where it listens, its faults, and what it has seen."""

    info: ServerInfo
    upstream_url: str
    faults: ProxyFaults
    requests: list[ProxyRequest] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.info.url

    @property
    def host(self) -> str:
        return f"{self.info.host}:{self.info.port}"

    def blob_gets(self, digest: str | None = None) -> list[ProxyRequest]:
        """The blob GETs seen so far (of one digest, when given)."""
        return [
            r
            for r in self.requests
            if r.route == "blob" and r.method == "GET" and (digest is None or r.path.endswith("/" + digest))
        ]

    def blob_bytes(self, digest: str | None = None) -> int:
        """Blob body bytes sent to clients so far (of one digest, when given)."""
        return sum(r.body_bytes for r in self.blob_gets(digest))


def _route(path: str) -> str:
    if _CHUNKS_RE.fullmatch(path):
        return "chunks"
    if "/blobs/uploads" in path:
        return "other"
    if _BLOB_RE.fullmatch(path):
        return "blob"
    if "/manifests/" in path:
        return "manifest"
    return "other"


def _blob_span(response: httpx.Response) -> tuple[int, int] | None:
    """(offset of the first body byte in the blob, blob size) of a 200 or 206 blob answer."""
    if response.status_code == 200:
        length = response.headers.get("content-length", "")
        return (0, int(length)) if length.isdigit() else None
    if response.status_code == 206:
        match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("content-range", "").strip())
        return (int(match.group(1)), int(match.group(3))) if match else None
    return None


class _Cut(Exception):
    """Raised inside a body to make the server close the connection."""


async def serve_faulty_proxy(
    upstream_url: str,
    faults: ProxyFaults | None = None,
    *,
    task_status: trio.TaskStatus[FaultyProxy] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs the proxy on 127.0.0.1 (a free port) until cancelled.

    Args:
        upstream_url: the registry every request is forwarded to (loopback only).
        faults: what to do to blob responses; the same object stays live on the proxy.

    ``task_status.started`` receives the ``FaultyProxy``.
    """
    assert_loopback(upstream_url)
    upstream_url = upstream_url.rstrip("/")
    state: FaultyProxy | None = None
    timeout = httpx.Timeout(30.0, connect=5.0)
    async with httpx.AsyncClient(trust_env=False, timeout=timeout, follow_redirects=False) as client:

        async def handle(request: Request) -> Response:
            assert state is not None
            faults = state.faults
            route = _route(request.path)
            request.route = route
            seen = ProxyRequest(request.method, request.path, route, request.headers.get("range"))
            state.requests.append(seen)
            if faults.hang and route in ("blob", "chunks"):
                await trio.sleep_forever()
            if route == "chunks" and not faults.chunk_maps:
                seen.status = 404
                return Response(404, [("Content-Type", "text/plain")], b"404 page not found\n")
            body = await request.body.read(_MAX_REQUEST_BODY)
            headers = [(k, v) for k, v in request.headers.items() if k not in _DROP_REQUEST
                       and not (faults.ignore_range and route == "blob" and k == "range")]
            outgoing = client.build_request(
                request.method, upstream_url + request.target, headers=headers, content=body or None
            )
            upstream = await client.send(outgoing, stream=True)
            seen.status = upstream.status_code
            response_headers = [(k, v) for k, v in upstream.headers.multi_items() if k.lower() not in _DROP_RESPONSE]
            length_text = upstream.headers.get("content-length", "")
            length = int(length_text) if length_text.isdigit() else None
            if request.method == "HEAD" or route != "blob" or request.method != "GET":
                try:
                    data = b"" if request.method == "HEAD" else await upstream.aread()
                finally:
                    await upstream.aclose()
                seen.body_bytes = len(data)
                return Response(
                    upstream.status_code,
                    response_headers,
                    data,
                    content_length=length if request.method == "HEAD" else None,
                )
            span = _blob_span(upstream)
            return Response(
                upstream.status_code, response_headers, _blob_body(upstream, span, faults, seen), content_length=length
            )

        async with trio.open_nursery() as nursery:
            info = await nursery.start(partial(serve_http, handle, "127.0.0.1", 0))
            state = FaultyProxy(info, upstream_url, faults or ProxyFaults())
            task_status.started(state)


async def _blob_body(
    upstream: httpx.Response, span: tuple[int, int] | None, faults: ProxyFaults, seen: ProxyRequest
) -> AsyncIterator[bytes]:
    """The upstream body with the faults applied; always closes the upstream response."""
    start = trio.current_time()
    offset, size = span if span is not None else (0, 0)
    paused = False
    try:
        async for data in upstream.aiter_raw(_PIECE):
            piece = data
            sent = seen.body_bytes
            if faults.stall_after is not None and not paused and sent + len(piece) > faults.stall_after:
                before = piece[: max(0, faults.stall_after - sent)]
                if before:
                    seen.body_bytes += len(before)
                    yield before
                if faults.pause is None:
                    await trio.sleep_forever()
                await trio.sleep(faults.pause)
                paused = True
                piece, sent = piece[len(before):], seen.body_bytes
                if not piece:
                    continue
            if faults.truncate_after is not None and sent + len(piece) >= faults.truncate_after:
                piece = piece[: faults.truncate_after - sent]
                if piece:
                    seen.body_bytes += len(piece)
                    yield piece
                seen.cut = True
                raise _Cut(f"truncated after {faults.truncate_after} bytes")
            if faults.corrupt and span is not None:
                middle = size // 2 - (offset + sent)
                if 0 <= middle < len(piece):
                    piece = piece[:middle] + bytes([piece[middle] ^ 0xFF]) + piece[middle + 1 :]
            if faults.rate:
                # Pace against the start of the response, so the average is the rate.
                await trio.sleep_until(start + (sent + len(piece)) / faults.rate)
            seen.body_bytes += len(piece)
            yield piece
    finally:
        with contextlib.suppress(httpx.HTTPError):
            await upstream.aclose()
