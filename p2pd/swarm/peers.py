"""The peer protocol over HTTP: the client one node uses to talk to another, and the
token bucket that limits what a node uploads.

Endpoints served by ``p2pd.swarm.service.PeerService`` on ``--peer-listen``:

    GET  /p2p/v1/hello                       signed msgpack {node, site, address, v}
    POST /p2p/v1/announce                    msgpack Announce → signed msgpack Reply (coordinator)
    POST /p2p/v1/preheat                     JSON prefetch request → signed JSON report (p2pd/preheat.py)
    GET  /p2p/v1/chunkmap/<digest>           signed msgpack {digest, size, chunk_size, chunks: [bytes|nil]}
    GET  /p2p/v1/blobs/<digest>   (Range)    chunk bytes; 404 when not held, 429 + Retry-After when busy
    GET  /p2p/v1/manifests/<digest>          manifest bytes (the requester verifies the digest)

Every request carries the sender's HMAC (``auth.sign_request``); metadata responses carry
the responder's (``auth.sign_response``). Chunk bytes are not signed: they are verified
against a chunk map instead. ``X-P2PD-Have`` on blob responses carries the responder's
current bitmap (base64) as a hint, which keeps requesters' views fresh without extra
messages.
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import httpx
import msgpack
import trio

from p2pd.errors import RemoteError
from p2pd.oci.digest import Digest

from . import auth
from .chunkwire import ChunkAnswer, ChunkWire, ChunkWireError, Exchange
from .grants import GRANT_HEADER
from .messages import Announce, BudgetAsk, BudgetGrant, MessageError, Reply, decode, encode

__all__ = [
    "PROTOCOL_PREFIX",
    "PartialChunkMap",
    "PeerBusy",
    "PeerChunk",
    "PeerClient",
    "PeerError",
    "PeerMissing",
    "PeerRefused",
    "PeerRelayCut",
    "PeerTimeout",
    "PeerUnreachable",
    "TokenBucket",
    "decode_chunk_map",
    "encode_chunk_map",
]

PROTOCOL_PREFIX = "/p2p/v1"
NODE_HEADER = "X-P2PD-Node"
TIME_HEADER = "X-P2PD-Time"
SIGNATURE_HEADER = "X-P2PD-Signature"
HAVE_HEADER = "X-P2PD-Have"
RELAY_HEADER = "X-P2PD-Relay"  # on a chunk answer sent while the chunk still arrives at the sender
# On a 404 for a chunk arriving at the sender whose relays are all taken: a node it relays the
# chunk to now, which passes it on in turn (p2pd.swarm.service, the relay tree).
RELAYED_TO_HEADER = "X-P2PD-Relayed-To"
_MAX_NODE_ID = 64
_MAX_METADATA = 8 * 1024 * 1024
_CHUNK_THREADS = 32  # chunk downloads at once (the engine asks for ~8 per transfer)
_MESSAGE_THREADS = 16  # peer messages (hello, announce, budget, chunk map, manifest) at once
# A relayed chunk's answer may go this many read timeouts without a byte (15 s at the default
# peer_timeout) before the asker cuts it: its bytes come as they reach the relaying node, whose
# own source pauses now and then — a range holder's upstream flow quiet for up to 5-7 s while TCP
# recovers from losses at a thin uplink (and reopened after upstream_stall, 6 s), a relay's
# source waiting out the same. Cut after one read timeout, relays of thin-link chunks ended by the
# hundred, each throwing away what had come and cutting the relays that node fed in turn
# (benchmarks.md, thirty-fourth session). The peer bounds a relay itself (no byte of its chunk for
# 30 s), and the engine bounds every chunk request as a whole.
_RELAY_READ_TIMEOUTS = 3


class PeerError(RemoteError):
    """A peer failed, refused us, or sent something invalid."""


class PeerUnreachable(PeerError):
    """Nothing answers at the peer's address: a new connection was refused, reset or closed
    before any answer (its process is gone or restarting). Not a timeout: a peer slow to answer
    may be overloaded and still at work."""


class PeerTimeout(PeerError):
    """No byte of the answer came for the read timeout: the peer may be gone or stopped, or alive
    behind a congested uplink (``p2pd.swarm.engine`` tells these apart by what else it hears)."""


class PeerMissing(PeerError):
    """The peer does not have the requested content (404). ``relayed_to``: a node that receives
    the chunk from it now, to ask instead (``RELAYED_TO_HEADER``)."""

    def __init__(self, message: str, relayed_to: str | None = None) -> None:
        super().__init__(message)
        self.relayed_to = relayed_to


class PeerRelayCut(PeerError):
    """The peer relayed a chunk still arriving there, and it failed or stopped arriving: not a
    fault of the peer, nor a false claim (``p2pd.swarm.engine.Arrival``)."""


class PeerRefused(PeerError):
    """The peer refused us this content (403: no valid peer grant for a protected blob)."""


class PeerBusy(PeerError):
    """The peer is at its upload limit (429); try another or come back later."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class PartialChunkMap:
    """Chunk hashes a peer knows: all of them (a trusted or finished map) or some."""

    digest: Digest
    size: int
    chunk_size: int
    chunks: tuple[bytes | None, ...]


def encode_chunk_map(chunk_map: PartialChunkMap) -> bytes:
    return msgpack.packb({"digest": str(chunk_map.digest), "size": chunk_map.size,
                          "chunk_size": chunk_map.chunk_size, "chunks": list(chunk_map.chunks)})


def decode_chunk_map(data: bytes, digest: Digest) -> PartialChunkMap:
    try:
        obj = msgpack.unpackb(data, max_bin_len=32, max_array_len=1 << 22, max_map_len=8, max_str_len=300)
        size, chunk_size, chunks = obj["size"], obj["chunk_size"], obj["chunks"]
        ok = (obj["digest"] == str(digest) and isinstance(size, int) and size >= 0 and isinstance(chunk_size, int)
              and chunk_size > 0 and isinstance(chunks, list) and len(chunks) == -(-size // chunk_size)
              and all(c is None or (isinstance(c, bytes) and len(c) == 32) for c in chunks))
    except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise PeerError("malformed chunk map") from exc
    if not ok:
        raise PeerError("malformed chunk map")
    return PartialChunkMap(digest, size, chunk_size, tuple(chunks))


class TokenBucket:
    """Limits a byte rate; ``rate`` 0 means unlimited. Burst is one second of rate."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._stamp = time.monotonic()

    async def take(self, amount: int) -> None:
        """Waits until ``amount`` bytes may be sent."""
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= min(amount, self.rate):
                self._tokens -= amount
                return
            await trio.sleep((min(amount, self.rate) - self._tokens) / self.rate)


def _auth_headers(key: bytes | None, node_id: str, method: str, target: str, body: bytes = b"") -> dict[str, str]:
    now = time.time()
    headers = {NODE_HEADER: node_id, TIME_HEADER: str(int(now))}
    if key is not None:
        headers[SIGNATURE_HEADER] = auth.sign_request(key, method, target, node_id, now, body)
    return headers


def _check_response(key: bytes | None, target: str, status: int, headers: Mapping[str, str], body: bytes) -> None:
    """Headers: lower-case names (``ChunkAnswer``) or httpx's case-insensitive ones."""
    if key is None:
        return
    try:
        auth.verify_response(key, target, status, headers.get(NODE_HEADER.lower(), ""),
                             headers.get(TIME_HEADER.lower(), ""), headers.get(SIGNATURE_HEADER.lower(), ""),
                             time.time(), body)
    except auth.AuthError as exc:
        raise PeerError(f"unauthenticated response: {exc}") from exc


@dataclass(frozen=True, slots=True)
class PeerChunk:
    """A chunk's bytes from a peer (not yet checked against the chunk map), their SHA-256, and
    the peer's bitmap when it sent one."""

    data: bytearray
    sha256: bytes
    have: bytes | None
    stored: bool = False  # the caller's ``store`` wrote it (in the worker thread)


def parse_have(headers: Mapping[str, str]) -> bytes | None:
    """The peer's bitmap from a chunk answer's headers (lower-case names), if it sent one."""
    value = headers.get(HAVE_HEADER) or headers.get(HAVE_HEADER.lower())
    if not value or len(value) > 1 << 20:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        return None


_Answer = TypeVar("_Answer", Reply, BudgetGrant)


class PeerClient:
    """Signed requests to other nodes' peer endpoints: chunks and messages on the pooled blocking
    connections of ``ChunkWire`` (worker threads), preheat (which may last minutes) on httpx.

    Args:
        node_id: our id, sent with every request.
        key: the cluster key, or None with ``--insecure-peers``.
        tls: the client context of mutual TLS (``PeerTls.client()``); None: plain HTTP.
        connect_timeout, read_timeout: per network wait (callers bound whole operations).
        on_connect: told of each new connection's handshake ("full", "resumed", "plain").
    """

    def __init__(self, node_id: str, key: bytes | None, *, connect_timeout: float = 2.0,
                 read_timeout: float = 10.0, tls: ssl.SSLContext | None = None,
                 on_connect: Callable[[str], None] | None = None) -> None:
        self.node_id = node_id
        self.key = key
        self._scheme = "https" if tls is not None else "http"
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            trust_env=False, follow_redirects=False, verify=tls if tls is not None else True)
        # Chunks go over blocking connections in worker threads (see chunkwire: CPU).
        self._wire = ChunkWire(tls=tls, connect_timeout=connect_timeout, read_timeout=read_timeout,
                               relay_header=RELAY_HEADER, relay_read_timeout=_RELAY_READ_TIMEOUTS * read_timeout,
                               on_connect=on_connect)
        self._wire_threads = trio.CapacityLimiter(_CHUNK_THREADS)
        # Messages have threads of their own: an announcement must not wait behind chunk downloads.
        self._message_threads = trio.CapacityLimiter(_MESSAGE_THREADS)

    async def aclose(self) -> None:
        self._wire.close()
        await self._client.aclose()

    def _url(self, address: str, target: str) -> str:
        return f"{self._scheme}://{address}{target}"

    async def _metadata(self, address: str, method: str, target: str, body: bytes = b"", *,
                        grant: str | None = None) -> bytes:
        headers = _auth_headers(self.key, self.node_id, method, target, body)
        if grant is not None:
            headers[GRANT_HEADER] = grant
        exchange = Exchange()
        try:
            answer = await _in_thread(self._message_threads, exchange, self._wire.request, address, method, target,
                                      headers, body, _MAX_METADATA)
        except ChunkWireError as exc:
            error = PeerUnreachable if exc.unreachable else PeerTimeout if exc.timed_out else PeerError
            raise error(f"{address}: {exc}") from None
        status = answer.status
        _raise_refusal(status, answer.headers, f"{address}{target}")
        if status != 200:
            raise PeerError(f"{address}{target}: status {status}")
        data = bytes(answer.body)
        _check_response(self.key, target, status, answer.headers, data)
        return data

    async def hello(self, address: str) -> tuple[str, str]:
        """The node id and site of the peer at ``address`` (authenticated)."""
        data = await self._metadata(address, "GET", f"{PROTOCOL_PREFIX}/hello")
        try:
            obj: Any = msgpack.unpackb(data, max_str_len=300, max_map_len=8)
            node, site = obj["node"], obj["site"]
        except (ValueError, KeyError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise PeerError("malformed hello") from exc
        if not isinstance(node, str) or not isinstance(site, str) or not node or not site:
            raise PeerError("malformed hello")
        return node, site

    async def _post_message(self, address: str, endpoint: str, message: Announce | BudgetAsk,
                            answer: type[_Answer]) -> _Answer:
        """POSTs a peer message and decodes the answer, which must be of type ``answer``."""
        data = await self._metadata(address, "POST", f"{PROTOCOL_PREFIX}/{endpoint}", encode(message))
        try:
            reply = decode(data)
        except MessageError as exc:
            raise PeerError(f"malformed {endpoint} answer: {exc}") from exc
        if not isinstance(reply, answer):
            raise PeerError(f"expected a {answer.__name__} from {endpoint}")
        return reply

    async def announce(self, address: str, message: Announce) -> Reply:
        return await self._post_message(address, "announce", message, Reply)

    async def budget(self, address: str, message: BudgetAsk) -> BudgetGrant:
        """Asks the site's budget keeper at ``address`` for a share of the upstream budget."""
        return await self._post_message(address, "budget", message, BudgetGrant)

    async def chunk_map(self, address: str, digest: Digest, grant: str | None = None) -> PartialChunkMap:
        data = await self._metadata(address, "GET", f"{PROTOCOL_PREFIX}/chunkmap/{digest}", grant=grant)
        return decode_chunk_map(data, digest)

    async def manifest(self, address: str, digest: Digest) -> bytes:
        return await self._metadata(address, "GET", f"{PROTOCOL_PREFIX}/manifests/{digest}")

    async def preheat(self, address: str, request: bytes) -> bytes:
        """Asks the peer to prefetch images (JSON request, JSON report: p2pd/preheat.py).

        The peer answers when its prefetch is over, so no read timeout: the caller bounds it.
        """
        target = f"{PROTOCOL_PREFIX}/preheat"
        headers = _auth_headers(self.key, self.node_id, "POST", target, request)
        try:
            response = await self._client.post(self._url(address, target), headers=headers, content=request,
                                               timeout=httpx.Timeout(None, connect=self._client.timeout.connect))
        except httpx.HTTPError as exc:
            raise PeerError(f"{address}: {type(exc).__name__}") from exc
        if response.status_code != 200 or len(response.content) > _MAX_METADATA:
            raise PeerError(f"{address}{target}: status {response.status_code}")
        _check_response(self.key, target, response.status_code, response.headers, response.content)
        return response.content

    async def fetch_chunk(self, address: str, digest: Digest, start: int, length: int,
                          grant: str | None = None, *, exchange: Exchange | None = None,
                          store: Callable[[bytearray, bytes], bool] | None = None) -> PeerChunk:
        """Bytes ``start..start+length-1`` of a blob from a peer, in one worker thread.

        The caller bounds the call (cancelling it aborts the exchange at once) and may pass an
        ``Exchange`` to watch the bytes arrive. No byte for ``read_timeout`` fails the call.
        ``store(body, sha256)`` runs in the same thread once the whole body is here (it checks
        the hash and writes the chunk, True when it did): one hand-off between threads per chunk
        instead of two, each a GIL round trip on a busy event loop. It never runs once the call
        was cancelled (``Exchange.unless_aborted``).

        Raises:
            PeerMissing: 404. PeerRefused: 403. PeerBusy: 429. PeerRelayCut: a relayed chunk cut
            short (it failed or stopped arriving at the peer). PeerError: anything else.
        """
        target = f"{PROTOCOL_PREFIX}/blobs/{digest}"
        headers = _auth_headers(self.key, self.node_id, "GET", target)
        if grant is not None:
            headers[GRANT_HEADER] = grant
        exchange = exchange or Exchange()
        stored = False

        def fetch(watch: Exchange) -> ChunkAnswer:
            answer = self._wire.get_range(address, target, headers, start, length, watch)
            if store is not None and answer.status == 206 and answer.sha256 is not None:
                body, sha256 = answer.body, answer.sha256

                def keep() -> None:
                    nonlocal stored
                    stored = store(body, sha256)

                watch.unless_aborted(keep)
            return answer

        try:
            answer = await _in_thread(self._wire_threads, exchange, fetch)
        except ChunkWireError as exc:
            if exc.relay_cut:
                # The chunk failed or stopped arriving at the peer while it relayed it: ask
                # again soon (there or elsewhere), as for a chunk that is not there yet.
                raise PeerRelayCut(f"{address}: relay of {digest} bytes {start}- cut short: {exc}") from None
            raise (PeerTimeout if exc.timed_out else PeerError)(f"{address}: {exc}") from None
        status = answer.status
        _raise_refusal(status, answer.headers, f"{address}: {digest} bytes {start}-{start + length - 1}")
        if status != 206 or answer.sha256 is None:
            raise PeerError(f"{address}: status {status} for a chunk")
        if not answer.headers.get("content-range", "").startswith(f"bytes {start}-{start + length - 1}/"):
            raise PeerError(f"{address}: wrong Content-Range")
        return PeerChunk(answer.body, answer.sha256, parse_have(answer.headers), stored)


async def _in_thread(limiter: trio.CapacityLimiter, exchange: Exchange,
                     call: Callable[..., ChunkAnswer], *args: Any) -> ChunkAnswer:
    """One blocking ``ChunkWire`` exchange in a worker thread. Cancelled, it aborts the exchange:
    the thread's read ends now and its connection is dropped (the thread is not waited for)."""
    try:
        return await trio.to_thread.run_sync(partial(call, *args, exchange), limiter=limiter,
                                             abandon_on_cancel=True)
    except ChunkWireError:
        raise
    except BaseException:
        exchange.abort()
        raise


def _raise_refusal(status: int, headers: Mapping[str, str], what: str) -> None:
    """The answers callers tell apart: 404 (not there), 403 (no accepted peer grant), 429 (busy)."""
    if status == 404:
        relayed_to = headers.get(RELAYED_TO_HEADER.lower()) or None
        raise PeerMissing(f"{what}: not found",
                          relayed_to if relayed_to is not None and len(relayed_to) <= _MAX_NODE_ID else None)
    if status == 403:
        raise PeerRefused(f"{what}: refused (peer grant)")
    if status == 429:
        raise PeerBusy(f"{what}: busy", _retry_after(headers))


def _retry_after(headers: Mapping[str, str]) -> float:
    try:
        return max(0.0, min(float(headers.get("retry-after", "1")), 60.0))
    except ValueError:
        return 1.0
