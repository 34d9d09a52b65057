"""The peer endpoint (``--peer-listen``): what other nodes ask this node.

Every request must carry a valid HMAC from the cluster key (401 otherwise); metadata
responses are signed. A chunk's last bytes are served only once the chunk is verified
here; a request for a chunk this node is still downloading waits briefly for it, and
one for the chunk it is fetching from the upstream now is relayed as the bytes arrive (all but the
last ``RELAY_HOLDBACK``, sent once the chunk is verified; ``p2pd.swarm.engine.Arrival``).
Uploads are limited in number (beyond ``max_uploads`` a request waits up to ``slot_wait``
for a slot, then gets 429 + Retry-After) and in rate: ``upload_rate`` is shared among the
uploads in progress by the kernel's pacing of each one's connection (``Request.pace``), so a
node's uploads leave evenly instead of in window-sized bursts that overflow a short queue on
its uplink; a token bucket where a connection cannot be paced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

import msgpack
import trio

from p2pd.httpd import FileBody, Request, Response, SharedPacing
from p2pd.metrics import AgentMetrics
from p2pd.oci.chunkmap import ChunkHasher, chunk_size_for
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from p2pd.oci.manifest import MAX_MANIFEST_SIZE
from p2pd.oci.ranges import parse_range
from p2pd.store import BlobStore

from . import auth
from .discovery import PROTOCOL_VERSION
from .engine import RELAY_HOLDBACK, Arrival, Swarm, SwarmTransfer
from .grants import GRANT_HEADER, GrantRefused, verify_grant
from .messages import Announce, BudgetAsk, MessageError, decode, encode
from .peers import (
    HAVE_HEADER,
    NODE_HEADER,
    PROTOCOL_PREFIX,
    RELAY_HEADER,
    RELAYED_TO_HEADER,
    SIGNATURE_HEADER,
    TIME_HEADER,
    PartialChunkMap,
    TokenBucket,
    encode_chunk_map,
)
from .planning import MIN_CHUNK_RELAYS, chunk_relays

__all__ = ["PeerService"]


class _RelayCut(Exception):
    """A relayed chunk will not complete here: its answer is cut short (the asker retries)."""


log = logging.getLogger("p2pd.swarm.service")

_BLOB_RE = re.compile(rf"{PROTOCOL_PREFIX}/blobs/(?P<digest>[^/]+)")
_MAP_RE = re.compile(rf"{PROTOCOL_PREFIX}/chunkmap/(?P<digest>[^/]+)")
_MANIFEST_RE = re.compile(rf"{PROTOCOL_PREFIX}/manifests/(?P<digest>[^/]+)")
_MAX_ANNOUNCE = 1024 * 1024
_PIECE = 256 * 1024
_MAX_SLOT_WAITERS = 4  # requests waiting for an upload slot, per slot
_RELAYS_PER_SLOT = 8  # chunks relayed while they arrive, per upload slot
# Relays of one arriving chunk (``chunk_relays``): one per range holder of its blob (fetching at
# once), at least 2.
# K holders share the seed's uplink, so a chunk arrives at ~1/K of it, and K relays of it send
# about what the seed does, no more than a node's uplink as fast as the seed's. More relays than
# that share the holder's uplink below the chunk's arrival rate, so every one of them ends later
# than the chunk itself: every reader wants a blob's first chunk at once, and with 31 peers
# relaying it (N = 32, equal links) the holder's own upstream flow starved behind them, the chunk
# took 15 s to arrive and bench clients gave up at byte 0 (docs/benchmarks.md, sixth session);
# with 8 relays of a 512 KiB chunk that 2 holders fetched (a 64 MiB layer as cut until 12-07), each relay ran at an
# eighth of the holder's uplink (27th session). Fewer than K: with 8 relays a chunk, the 15
# peers of an N = 16 site asked each holder for its arriving chunk, 7 of them waited 2 s
# (``chunk_wait``) for nothing, and half of every node's request slots sat in those waits in the
# first seconds of a pull (thirteenth session).

_RELAY_STALL = 30.0  # seconds a relayed chunk may go without a new byte before its answer is cut
_VERIFIED_GRANTS = 4096  # (grant, digest, node) checked once, until the grant expires


def _whole_chunk(transfer: SwarmTransfer, start: int, end: int) -> int | None:
    """The chunk index when bytes start..end are exactly one chunk (what peers ask for)."""
    if transfer.chunk_size <= 0 or start % transfer.chunk_size:
        return None
    index = start // transfer.chunk_size
    offset, length = transfer.bounds(index)
    return index if index < transfer.count and end == offset + length - 1 else None


def _why_not_here(transfer: SwarmTransfer, chunk: int, receiver: str | None) -> str:
    """Why a chunk request was answered 404, in the debug log's words."""
    if receiver is not None:
        return f"its relays here are all taken: sent to {receiver}, which receives it from here"
    if chunk in transfer.arrivals:
        return "arriving, its relays here all taken"
    if chunk in transfer.requested:
        return "asked of a peer, not arriving yet"
    if transfer.in_own_range(chunk):
        return "in this node's range, not arriving from the upstream yet"
    return "not on its way (not fetched here now)"


class PeerService:
    """Request handler of the peer endpoint."""

    def __init__(self, *, swarm: Swarm, store: BlobStore, key: bytes | None, metrics: AgentMetrics,
                 max_uploads: int, upload_rate: int, chunk_wait: float, slot_wait: float = 0.0) -> None:
        self.swarm = swarm
        self.store = store
        self.key = key
        self.metrics = metrics
        self.max_uploads = max_uploads
        self.uploads = 0
        # A request that finds every upload slot taken waits this long for one (at most
        # _MAX_SLOT_WAITERS of them), then is refused. Slots free every fraction of a second
        # when chunks are small; a 429 costs the asker its Retry-After second on this node.
        self.slot_wait = slot_wait
        self._slot_waiters = 0
        self._slot_freed = trio.lowlevel.ParkingLot()
        metrics.uploads_active.set_function(lambda: self.uploads)
        metrics.uploads_waiting.set_function(lambda: self._slot_waiters)
        self.upload_bucket = TokenBucket(upload_rate)
        # The uploads in progress (chunks and relays), each paced at upload_rate ÷ their number
        # (``start`` returns what ends an upload's share, or None when it is not paced).
        self._pacing = SharedPacing(upload_rate)
        self.chunk_wait = chunk_wait
        self.relays = 0
        self.max_relays = _RELAYS_PER_SLOT * max_uploads
        self._verified_grants: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        # POST /p2p/v1/preheat: JSON request body in, JSON report out (p2pd/preheat.py); None: 404.
        self.preheat_handler: Callable[[bytes], Awaitable[bytes]] | None = None

    async def handle(self, request: Request) -> Response:
        request.route = "peer"
        if not request.path.startswith(PROTOCOL_PREFIX + "/"):
            raise OCIError("NOT_FOUND", "not a peer endpoint")
        body = b""
        if request.method == "POST":
            body = await request.body.read(_MAX_ANNOUNCE)
        self._authenticate(request, body)
        path = request.path
        if path == f"{PROTOCOL_PREFIX}/hello" and request.method == "GET":
            request.route = "hello"
            me = self.swarm.me
            return self._signed(request, msgpack.packb({"node": me.node_id, "site": me.site, "address": me.address,
                                                        "v": PROTOCOL_VERSION}))
        if path == f"{PROTOCOL_PREFIX}/announce" and request.method == "POST":
            request.route = "announce"
            try:
                message = decode(body)
            except MessageError as exc:
                raise OCIError("BAD_REQUEST", f"malformed announcement: {exc}") from exc
            if not isinstance(message, Announce) or message.node != request.headers.get(NODE_HEADER):
                raise OCIError("BAD_REQUEST", "announcement must come from its own node")
            reply = await self.swarm.coordinate(message)
            return self._signed(request, encode(reply))
        if path == f"{PROTOCOL_PREFIX}/budget" and request.method == "POST":
            request.route = "budget"
            try:
                ask = decode(body)
            except MessageError as exc:
                raise OCIError("BAD_REQUEST", f"malformed budget request: {exc}") from exc
            if not isinstance(ask, BudgetAsk) or ask.node != request.headers.get(NODE_HEADER):
                raise OCIError("BAD_REQUEST", "a budget request must come from its own node")
            return self._signed(request, encode(self.swarm.keep_budget(ask)))
        if path == f"{PROTOCOL_PREFIX}/preheat" and request.method == "POST" and self.preheat_handler is not None:
            request.route = "preheat"
            return self._signed(request, await self.preheat_handler(body))
        if request.method not in ("GET", "HEAD"):
            raise OCIError("UNSUPPORTED", "method not allowed", status=405)
        if match := _BLOB_RE.fullmatch(path):
            request.route = "chunk"
            return await self._blob(request, Digest.parse(match["digest"]))
        if match := _MAP_RE.fullmatch(path):
            request.route = "map"
            return await self._chunk_map(request, Digest.parse(match["digest"]))
        if match := _MANIFEST_RE.fullmatch(path):
            request.route = "manifest"
            digest = Digest.parse(match["digest"])
            data = await trio.to_thread.run_sync(self.store.read_small, digest, MAX_MANIFEST_SIZE)
            if data is None:
                raise OCIError("MANIFEST_UNKNOWN", "not here", status=404)
            return self._signed(request, data)
        raise OCIError("NOT_FOUND", "no such peer endpoint")

    # ---- authentication ---------------------------------------------------------------

    def _authenticate(self, request: Request, body: bytes) -> None:
        if self.key is None:
            return
        try:
            auth.verify_request(self.key, request.method, request.target, request.headers.get(NODE_HEADER, "") or "",
                                request.headers.get(TIME_HEADER, "") or "",
                                request.headers.get(SIGNATURE_HEADER, "") or "", time.time(), body)
        except auth.AuthError as exc:
            log.info("refused unauthenticated peer request from %s (claims node %r): %s", request.client,
                     (request.headers.get(NODE_HEADER) or "")[:64], exc)
            raise OCIError("UNAUTHORIZED", "peer authentication failed", status=401) from exc
        # A suspended peer that talks to us again (it restarted) is probed now, not after its suspension.
        self.swarm.membership.heard_from(request.headers.get(NODE_HEADER, "") or "")

    def _signed(self, request: Request, body: bytes) -> Response:
        headers = [("Content-Type", "application/msgpack")]
        now = time.time()
        headers += [(NODE_HEADER, self.swarm.me.node_id), (TIME_HEADER, str(int(now)))]
        if self.key is not None:
            headers.append((SIGNATURE_HEADER, auth.sign_response(self.key, request.target, 200,
                                                                 self.swarm.me.node_id, now, body)))
        return Response(200, headers, body)

    # ---- content ----------------------------------------------------------------------

    def _check_grant(self, request: Request, digest: Digest) -> None:
        """A protected blob's chunks and map go only to a member showing the registry's grant for
        it, naming that member (``p2pd.swarm.grants``); others get 403 and are counted."""
        keys = self.swarm.grants.keys_for(digest)
        if keys is None:
            return
        node = request.headers.get(NODE_HEADER, "") or ""
        token = request.headers.get(GRANT_HEADER)
        now = time.time()
        # A node shows the same grant with every chunk: one signature check per grant, not per chunk.
        cache_key = (hashlib.sha256((token or "").encode()).hexdigest(), str(digest), node)
        expires_at = self._verified_grants.get(cache_key)
        if expires_at is not None and now < expires_at:
            return
        try:
            grant = verify_grant(token, keys, digest=digest, node=node, now=now)
        except GrantRefused as exc:
            self.metrics.peer_grants_refused.labels(exc.reason).inc()
            log.info("refused %s to node %r: peer grant %s", digest, node[:64], exc.reason)
            raise OCIError("DENIED", f"a peer grant for this blob is required ({exc.reason})", status=403) from None
        self._verified_grants[cache_key] = grant.expires_at
        self._verified_grants.move_to_end(cache_key)
        while len(self._verified_grants) > _VERIFIED_GRANTS:
            self._verified_grants.popitem(last=False)

    async def _chunk_map(self, request: Request, digest: Digest) -> Response:
        self._check_grant(request, digest)
        transfer = self.swarm.transfers.get(digest)
        if transfer is not None:
            return self._signed(request, encode_chunk_map(transfer.partial_map()))
        size = self.store.size(digest)
        if size is None:
            raise OCIError("BLOB_UNKNOWN", "not here", status=404)
        cached = self.swarm.completed_maps.get(digest)
        if cached is None:
            # After a restart: the blob was verified whole, so a map computed from it is sound.
            cached = await trio.to_thread.run_sync(self._compute_map, digest, size)
            self.swarm.completed_maps[digest] = cached
        return self._signed(request, encode_chunk_map(cached))

    def _compute_map(self, digest: Digest, size: int) -> PartialChunkMap:
        # The size every node computes for it (what a trusted map from a seed of this version has).
        hasher = ChunkHasher(chunk_size_for(size, self.swarm.chunk_size))
        with open(self.store.blob_path(digest), "rb") as handle:
            while piece := handle.read(1024 * 1024):
                hasher.update(piece)
        chunk_map = hasher.finish(digest)
        return PartialChunkMap(digest, chunk_map.size, chunk_map.chunk_size, tuple(chunk_map.hashes))

    async def _blob(self, request: Request, digest: Digest) -> Response:
        self._check_grant(request, digest)
        headers = [("Content-Type", "application/octet-stream"), ("Docker-Content-Digest", str(digest))]
        if self.store.size(digest) is not None:
            await self._take_slot()
            try:
                fd, size = self.store.open_blob(digest)
            except KeyError:
                pass
            else:
                return self._range_response(request, digest, fd, size, headers)
        transfer = self.swarm.transfers.get(digest)
        if transfer is None:
            log.debug("%s asked for %s: not fetched here (yet)", request.headers.get(NODE_HEADER) or "a peer", digest)
            raise OCIError("BLOB_UNKNOWN", "not here", status=404)
        byte_range = parse_range(request.headers.get("range"), transfer.size)
        start, end = (0, transfer.size - 1) if byte_range is None else (byte_range.start, byte_range.end)
        # A chunk still on its way here is worth a short wait: this is how the swarm
        # forwards chunks as soon as they are verified, or relays one while it arrives.
        chunk = _whole_chunk(transfer, start, end)

        asker = request.headers.get(NODE_HEADER, "") or ""

        def relayable() -> Arrival | None:
            arrival = transfer.arrivals.get(chunk) if chunk is not None else None
            if arrival is None or self.relays >= self.max_relays \
                    or arrival.relays >= self._relays_per(transfer, arrival):
                return None
            return arrival

        def relayed_to() -> str | None:
            """A node this one relays the chunk to now, when its relays of it are all taken: the
            asker takes it from there (the next level of the chunk's relay tree) instead of
            waiting here for nothing."""
            arrival = transfer.arrivals.get(chunk) if chunk is not None else None
            if arrival is None or arrival.failed:
                return None
            receivers = [node for node in arrival.receivers if node != asker]
            return min(receivers, key=lambda node: arrival.receivers[node]) if receivers else None

        def on_its_way() -> bool:
            """Whether the chunk may come here soon: asked of a peer now, arriving, or in this
            node's own ranges. Otherwise nothing is worth waiting for: a node of a chunk's relay
            tree that is not fetching it says so at once, and the asker takes it from the holder
            (with 4 request slots, as for 512 KiB chunks, askers that waited chunk_wait at such
            nodes for nothing took a 64 MiB pull past 4x the bound; benchmarks.md, 29th session)."""
            if chunk is None:
                return True
            return chunk in transfer.requested or chunk in transfer.arrivals \
                or transfer.in_own_range(chunk)

        with trio.move_on_after(self.chunk_wait):
            while not transfer.covers(start, end) and relayable() is None and relayed_to() is None \
                    and on_its_way():
                if self.swarm.transfers.get(digest) is not transfer:
                    break
                await transfer.wait_changed()
        have = self.swarm.have_header(digest)
        if have:
            headers.append((HAVE_HEADER, have))
        arrival = relayable()
        if not transfer.covers(start, end) and arrival is not None:
            return self._relay_response(request, transfer, arrival, asker, headers)
        if not transfer.covers(start, end):
            missing = [(HAVE_HEADER, have)] if have else []
            receiver = relayed_to()
            if receiver is not None and chunk is not None:
                transfer.arrivals[chunk].receivers[receiver] += 1
                missing.append((RELAYED_TO_HEADER, receiver))
            if chunk is not None and log.isEnabledFor(logging.DEBUG):
                log.debug("%s asked for chunk %d of %s: not here, %s", asker or "a peer", chunk, digest,
                          _why_not_here(transfer, chunk, receiver))
            raise OCIError("BLOB_UNKNOWN", "those chunks are not here yet", status=404, headers=missing)
        await self._take_slot()
        try:
            fd = os.open(self.store.partial_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            try:
                fd, _size = self.store.open_blob(digest)  # committed meanwhile
            except KeyError:
                raise OCIError("BLOB_UNKNOWN", "not here", status=404) from None
        return self._range_response(request, digest, fd, transfer.size, headers)

    @staticmethod
    def _relays_per(transfer: SwarmTransfer, arrival: Arrival) -> int:
        """How many answers may relay ``arrival`` (a chunk of ``transfer``) while it arrives:
        from the upstream, the blob's range holders (the other nodes' leases this node knows
        of, and its own), at least 2 (the comment above ``chunk_relays``); from a peer,
        ``MIN_CHUNK_RELAYS``: a relay tree's node passes each arriving chunk on to a few, so
        that its uplink carries about what it receives (``p2pd.swarm.engine.Swarm._relay_parent``)."""
        if arrival.from_peer:
            return MIN_CHUNK_RELAYS
        return chunk_relays(len(transfer.lessees) + (1 if transfer.leased else 0))

    async def _take_slot(self) -> None:
        """Waits (bounded) for an upload slot; raises 429 when none frees in time."""
        if self.uploads >= self.max_uploads and self._slot_waiters < _MAX_SLOT_WAITERS * self.max_uploads:
            self._slot_waiters += 1
            try:
                with trio.move_on_after(self.slot_wait):
                    while self.uploads >= self.max_uploads:
                        await self._slot_freed.park()
            finally:
                self._slot_waiters -= 1
        if self.uploads >= self.max_uploads:
            self.metrics.uploads_refused.inc()
            raise OCIError("TOOMANYREQUESTS", "upload limit reached", status=429, headers=[("Retry-After", "1")])

    def _relay_response(self, request: Request, transfer: SwarmTransfer, arrival: Arrival, asker: str,
                        headers: list[tuple[str, str]]) -> Response:
        """A chunk still arriving here (from the upstream or a peer), sent as its bytes land
        (``Arrival``); ``asker`` (its node id) may be named to askers past the bound.

        Relays take no upload slot: each runs at the rate the chunk arrives, a fraction of the
        uplink, and a range holder's peers all wait for its next chunk at once. They are
        bounded by ``max_relays`` and, per chunk, by ``_relays_per`` instead; past that, a
        request is sent to one of the nodes the chunk is relayed to (``RELAYED_TO_HEADER``).
        """
        offset, length = transfer.bounds(arrival.index)
        headers += [("Content-Range", f"bytes {offset}-{offset + length - 1}/{transfer.size}"), (RELAY_HEADER, "1")]
        self.relays += 1
        arrival.relays += 1
        if asker:  # (an asker that does not name itself cannot be named to others)
            arrival.receivers[asker] = 0
        self.metrics.chunks_relayed.inc()
        end_pacing = self._pacing.start(request.pace)

        def done() -> None:
            self.relays -= 1
            arrival.relays -= 1
            arrival.receivers.pop(asker, None)
            if end_pacing is not None:
                end_pacing()

        return Response(206, headers, self._relayed(arrival, paced=end_pacing is not None), content_length=length,
                        on_close=done, drained_close=end_pacing is not None)

    async def _relayed(self, arrival: Arrival, *, paced: bool) -> AsyncIterator[bytes]:
        length = len(arrival.buffer)
        sent = 0
        while sent < length:
            if arrival.failed:
                raise _RelayCut(f"chunk {arrival.index} failed or its fetch ended")
            ready = length if arrival.verified else max(0, arrival.received - RELAY_HOLDBACK)
            if ready > sent:
                piece = bytes(memoryview(arrival.buffer)[sent:ready])  # one copy, not two
                if not paced:
                    await self.upload_bucket.take(len(piece))
                sent += len(piece)
                self.metrics.peer_served_bytes.inc(len(piece))
                yield piece
                continue
            # A chunk that stops arriving here (this node's upstream flow starved) keeps the
            # asker's bytes so far until its read timeout, after which it asks again soon and
            # does not count it as a failure of this node (RELAY_HEADER); this bound only frees
            # the answer of an asker that never gives up.
            with trio.move_on_after(_RELAY_STALL) as waited:
                await arrival.wait_changed()
            if waited.cancelled_caught:
                raise _RelayCut(f"chunk {arrival.index} stopped arriving")

    def _range_response(self, request: Request, digest: Digest, fd: int, size: int,
                        headers: list[tuple[str, str]]) -> Response:
        try:
            byte_range = parse_range(request.headers.get("range"), size)
        except OCIError:
            os.close(fd)
            raise
        start, end = (0, size - 1) if byte_range is None else (byte_range.start, byte_range.end)
        status = 200
        if byte_range is not None:
            headers.append(("Content-Range", byte_range.content_range(size)))
            status = 206
        self.uploads += 1
        end_pacing = self._pacing.start(request.pace)

        def done() -> None:
            self.uploads -= 1
            self._slot_freed.unpark()
            if end_pacing is not None:
                end_pacing()

        if self.upload_bucket.rate <= 0 or end_pacing is not None:
            body: FileBody | AsyncIterator[bytes] = FileBody(fd, start, end - start + 1)
            self.metrics.peer_served_bytes.inc(end - start + 1)
            return Response(status, headers, body, on_close=done, drained_close=end_pacing is not None)
        return Response(status, headers, self._limited(fd, start, end), content_length=end - start + 1,
                        on_close=done)

    async def _limited(self, fd: int, start: int, end: int) -> AsyncIterator[bytes]:
        try:
            position = start
            while position <= end:
                length = min(_PIECE, end + 1 - position)
                await self.upload_bucket.take(length)
                data = await trio.to_thread.run_sync(os.pread, fd, length, position)
                if not data:
                    return
                position += len(data)
                self.metrics.peer_served_bytes.inc(len(data))
                yield data
        finally:
            os.close(fd)

