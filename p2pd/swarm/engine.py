"""Swarm transfer: a blob assembled from chunks fetched from many peers in parallel, with
at most one upstream fetch per site, coordinated without a tracker.

Rules/invariants:
- The coordinator of a digest is the highest-ranked live member (rendezvous hashing), its
  backups the next ones; a node that cannot reach one tries the next, and with none
  reachable it fetches from the upstream itself (a pull never fails when the upstream
  alone could serve it).
- Only a site's range-lease holders fetch from the upstream, each its own chunk ranges.
  Others fetch chunks from holders (rarest first, random among equals, same site first)
  and may ask a range holder for chunks it is still downloading (it relays them); a chunk
  arriving at its holder reaches the others through its relay tree (``_relay_parent``), each
  node passing it on while it arrives there too.
- Every chunk is checked against a chunk map before it is written: the seed's (trusted)
  when the upstream serves one, otherwise the map the lease holder computed while
  fetching, delivered in signed metadata. A peer whose bytes fail is banned. The whole
  blob is checked against its digest before commit and before it is announced complete.
- Readers on this node (containerd) get the contiguous prefix of verified chunks; when the
  map is not the seed's, the last ``HOLDBACK`` bytes wait for the whole-digest check.
- A node that gets no chunk for ``stuck_after`` seconds fetches the missing ranges from
  the upstream itself; a dead lease holder's lease expires and moves to another node.
- A local reader that has waited ``_READER_RESCUE_AFTER`` for its next chunk, one peers have
  and none is sending, gets that one chunk from the upstream (``_rescue_reader``), once; at the
  site's first-ranked nodes that lack it, the others after twice as long.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import trio

from p2pd.metrics import AgentMetrics
from p2pd.oci.chunkmap import ChunkMap, chunk_count, chunk_size_for
from p2pd.oci.digest import Digest

from ..errors import UpstreamError, VerificationError
from .budget import SiteBudgets, SiteShare
from .chunkwire import Exchange
from .coordinator import LEASE_PATIENCE_TTLS, CoordinatorState
from .grants import GrantStore
from .membership import Member, Membership
from .messages import MAX_DISPUTED, MAX_RANGES, Announce, BudgetAsk, BudgetGrant, PeerInfo, RangeLease, Reply
from .peers import (
    PartialChunkMap,
    PeerBusy,
    PeerClient,
    PeerError,
    PeerMissing,
    PeerRefused,
    PeerRelayCut,
    PeerTimeout,
    PeerUnreachable,
    TokenBucket,
)
from .planning import Bitmap, chunk_relays, chunks_within, lessee_view, plan_requests, request_slots
from .rendezvous import coordinators, rank

__all__ = ["HOLDBACK", "RELAY_HOLDBACK", "Arrival", "Swarm", "SwarmTransfer"]

log = logging.getLogger("p2pd.swarm")

HOLDBACK = 1024 * 1024
# Bytes of an arriving chunk relayed only once the whole chunk is verified: any tail keeps a
# chunk that fails from reaching a peer whole; a short one keeps a slow relay's bytes moving.
RELAY_HOLDBACK = 1024
# Relays of an arriving chunk wake up every this many bytes, not for every network read (a
# range holder's share of the upstream arrives in reads of a few KiB, and ~15 peers relay each),
# and at least every _RELAY_TICK seconds while bytes arrive. A starved upstream flow (N = 32
# equal links: 3 KB/s for seconds) crossed no 16 KiB step within the askers' read timeout:
# every relay of a blob's first chunk was cut and the askers queued for the holder's upload
# slots once it landed (the first of them got it 5 s later; two bench clients fell back).
_RELAY_STEP = 16 * 1024
_RELAY_TICK = 1.0
_READ_PIECE = 1024 * 1024
_COMPLETED_MAPS = 4096
_READER_AHEAD = 2  # missing chunks right after the verified prefix, planned before the rarest ones
_FRONT_FLOWS = 4  # a blob's first chunks, fetched from the upstream in a request each, at once
_FRONT_BYTES = 512 * 1024  # ... at most this many bytes of them (fewer flows for bigger chunks)
_ENDGAME_CHUNKS = 4  # chunks missing (all requested) from which one in flight is also asked of a second peer
_ANYONE_ASKS_AFTER_MAX = 3.0  # seconds after which anyone may ask the lease holder for a chunk
_CHUNK_TIMEOUTS = 6  # a chunk request that is still receiving bytes ends after this many peer_timeouts
_JOIN_GRACE = 5.0  # seconds after the start in which a transfer waits for a first peer
_BUSY_ANNOUNCE_INTERVAL = 1.0  # seconds between announcements of a node with enough to request
_HANDOFF_TIMEOUT = 1.0  # seconds a coordinator with no state waits for the member ranked next to answer
_LEASE_PATIENCE = LEASE_PATIENCE_TTLS  # lease TTLs a node waits for a range holder's next chunk before the upstream
# In a site with more nodes than a blob has ranges, a node already busy leaves a new blob's
# ranges to the others for a while (Swarm._asks_for_range): a range holder of another blob ...
_OTHER_RANGE_HOLDER_WAIT = 3.0
# ... and a coordinator answering downloads, after which its own blob's coordinator takes a range
# only when no other downloader of its site lacks one.
_COORDINATOR_RANGE_WAIT = 1.0
# A local reader (containerd's stream) that has had no byte for this long, waiting for a chunk
# peers have and none is sending, gets that one chunk from the upstream (Swarm._rescue_reader).
_READER_RESCUE_AFTER = 20.0
# Of the site's nodes that lack a chunk, the ones ranked first for it (rendezvous) rescue it when
# their readers wait; the others only after twice as long (the rescuers' copies come first). All
# the readers of a site wait at the same chunk at once: 26 of 32 nodes asked the seed for a
# blob's first 512 KiB chunk within two seconds, on top of the range holders' requests (equal
# 3 Mbit/s links, a 64 MiB layer; in another run of that code every client gave up on its agent;
# benchmarks.md, twenty-sixth session).
_RESCUERS_PER_CHUNK = 2
# Under an upstream cap, a range holder asks the upstream for this many seconds of its rate at a
# time (at least _CAPPED_PIECE_MIN bytes), each piece paid for before it is asked for
# (Swarm._pay_upstream_piece); for twice as long as the last piece took to come, when that
# is more (a far upstream: one piece at a time must still carry the rate), up to
# _CAPPED_PIECE_MAX_SECONDS.
_CAPPED_PIECE_SECONDS = 0.25
_CAPPED_PIECE_MAX_SECONDS = 1.0
_CAPPED_PIECE_MIN = 16 * 1024


class UpstreamRange(Protocol):
    """Fetches bytes ``start..end`` of the blob from the upstream and feeds them to ``accept``;
    True when the upstream ignored the Range (it sent the blob from its first byte: see the
    fetcher). ``on_range_ignored``, when given, is called with the offset asked for as soon as
    an answer turns out to ignore the Range, before any of its bytes is read: it returns the
    last byte to read instead of ``end`` (at least ``end``), or raises to give the request up."""

    async def __call__(self, start: int, end: int, accept: Callable[[bytes], Awaitable[None]],
                       on_range_ignored: Callable[[int], int] | None = None) -> bool | None: ...


class _RangeIgnored(Exception):
    """A range holder's request for chunks past the blob's start was answered from its first
    byte: given up before that start is read (``Swarm._fetch_run_from_upstream``)."""


@dataclass(eq=False)
class Arrival:
    """A chunk whose bytes are arriving here (from the upstream or from a peer), readable while
    they arrive.

    A range holder's peers ask it for the chunk it is fetching now; answering only once the
    chunk is complete made every chunk wait a whole chunk-time at the holder, and with every
    holder's upstream share at 1/K of the seed's uplink that was K chunk-times at the start of
    a pull and again at its end (the peers served with its last chunk). The peer service sends
    the bytes as they land (``p2pd.swarm.service``), all but the last ``RELAY_HOLDBACK``, which
    follow only once the chunk is verified; a chunk that fails cuts the answers short, so no
    peer ever receives a whole chunk that was not verified here.

    A chunk arriving from a peer is passed on the same way (``Swarm._fetch_chunk_from``): the
    worker thread that reads it fills ``buffer`` and ``received`` and wakes the relays every
    ``_RELAY_STEP``. That is the second hop of an arriving chunk's relay tree
    (``Swarm._relay_parent``).
    """

    index: int
    buffer: bytearray  # the chunk's length, filled from the front
    received: int = 0
    verified: bool = False
    failed: bool = False
    relays: int = 0  # answers relaying it now (the peer service bounds them)
    from_peer: bool = False  # arriving from a peer (otherwise from the upstream)
    receivers: dict[str, int] = field(default_factory=dict)  # nodes relayed it now → askers sent on to them
    notified_at: float = -math.inf  # time.monotonic() of the last notify
    _changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.notified_at = time.monotonic()
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()


@dataclass(eq=False)
class SwarmTransfer:
    """One blob being assembled here; shared with the peer service to serve our chunks."""

    digest: Digest
    size: int
    chunk_size: int
    fd: int
    trusted: bool  # hashes come from the seed (not from a peer or from ourselves)
    hashes: list[bytes | None]
    have: Bitmap
    requested: set[int] = field(default_factory=set)
    leased: bool = False
    lessee: str | None = None  # holder of the site's first unfinished range (status, older coordinators)
    lessee_address: str | None = None
    ranges: tuple[tuple[int, int], ...] = ()  # chunk ranges this node fetches from the upstream (inclusive)
    lessees: dict[str, tuple[int, int]] = field(default_factory=dict)  # other nodes' range leases
    sources: dict[str, Bitmap] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)
    busy: dict[str, int] = field(default_factory=dict)
    retry_at: dict[str, float] = field(default_factory=dict)
    last_progress: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.monotonic)
    peer_bytes: dict[str, int] = field(default_factory=dict)
    upstream_bytes: int = 0
    lessee_only_since: dict[int, float] = field(default_factory=dict)  # chunk → first seen only at the lessee
    # chunk → (the holders and downloaders it was computed for, we ask its holder, the node we ask instead)
    relay_trees: dict[int, tuple[tuple[int, int, bool], bool, str | None]] = field(default_factory=dict)
    grant: str | None = None  # shown to peers for a protected blob (p2pd.swarm.grants)
    disputed: set[str] = field(default_factory=set)  # peers that lacked chunks they claimed; told to the coordinator
    exchanges: dict[Exchange, int] = field(default_factory=dict)  # chunk requests in flight → their chunk
    inflight: dict[int, dict[str, trio.CancelScope]] = field(default_factory=dict)  # chunk → peer → its request
    arriving: int = 0  # body bytes of the requests in flight, when last looked at
    upstream_received: int = 0  # bytes our upstream fetches received (verified or not yet)
    site_chunks: int = 0  # chunks the coordinator's last reply listed at holders (all nodes together)
    lease_wait: tuple[float, int] | None = None  # waiting for a lease holder since, with this many chunks
    arrivals: dict[int, Arrival] = field(default_factory=dict)  # chunks arriving now (upstream or a peer)
    relay_hints: dict[int, str] = field(default_factory=dict)  # chunk → a node it is relayed to now (ask it)
    tree_missed: set[int] = field(default_factory=set)  # chunks our relay tree's parent did not have: ask the holder
    rescued: set[int] = field(default_factory=set)  # chunks fetched from the upstream for a waiting reader
    # The upstream answered a range request with the whole blob: the site's coordinator is told
    # (``Announce.whole_blob``), and this node fetches from the upstream only from byte 0.
    range_ignored: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def count(self) -> int:
        return len(self.hashes)

    def bounds(self, index: int) -> tuple[int, int]:
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def covers(self, start: int, end: int) -> bool:
        """Whether every chunk overlapping bytes start..end is here and verified."""
        if self.size == 0 or end >= self.size:
            return False
        return all(index in self.have for index in range(start // self.chunk_size, end // self.chunk_size + 1))

    def in_own_range(self, index: int) -> bool:
        """Whether chunk ``index`` is in one of this node's range leases (it fetches it from the
        upstream itself)."""
        return any(first <= index <= last for first, last in self.ranges)

    def ranges_complete(self) -> bool:
        """Whether this node holds every chunk of its range leases (and has some)."""
        return bool(self.ranges) and all(index in self.have for first, last in self.ranges
                                          for index in range(first, last + 1))

    def partial_map(self) -> PartialChunkMap:
        return PartialChunkMap(self.digest, self.size, self.chunk_size, tuple(self.hashes))

    def bytes_arrived(self) -> bool:
        """Whether chunks in flight received bytes since the last look: a transfer whose
        chunks come slowly (peers' uplinks shared by many) is moving, not stuck."""
        arriving = self.upstream_received + sum(exchange.received for exchange in self.exchanges)
        moved = arriving > self.arriving
        self.arriving = arriving
        return moved


class Swarm:
    """The node's swarm: coordinator state, peer client, limits, and active transfers.

    Args:
        me: this node as other members see it.
        membership: live members (``Membership``).
        client: signed requests to peers.
        metrics: the agent's metrics.
    """

    def __init__(self, *, me: Member, membership: Membership, client: PeerClient, metrics: AgentMetrics,
                 chunk_size: int, lease_ttl: float, coordinator_backups: int, peer_timeout: float,
                 max_parallel_chunks: int, max_requests_per_peer: int, ban_seconds: float,
                 grants: GrantStore, download_rate: int = 0, upstream_rate: int = 0, site_upstream_rate: int = 0,
                 rng: random.Random | None = None) -> None:
        self.me = me
        self.membership = membership
        self.client = client
        self.metrics = metrics
        self.chunk_size = chunk_size  # the largest: a blob gets chunk_size_for(size, chunk_size)
        self.coordinator = CoordinatorState(lease_ttl=lease_ttl, node_id=me.node_id)
        self.coordinator_backups = coordinator_backups
        self.peer_timeout = peer_timeout
        self.max_parallel_chunks = max_parallel_chunks
        self.max_requests_per_peer = max_requests_per_peer
        self.ban_seconds = ban_seconds
        self.stuck_after = max(lease_ttl, 3 * peer_timeout)
        self.download_bucket = TokenBucket(download_rate)
        self.upstream_bucket = TokenBucket(upstream_rate)
        # The site's upstream budget: kept by one member of the site, shared by its fetchers.
        self.budgets = SiteBudgets()
        self.site_share = SiteShare(site_upstream_rate, self.ask_budget, self._static_budget_share)
        self.transfers: dict[Digest, SwarmTransfer] = {}
        self.grants = grants  # blobs whose chunks are served only against a peer grant
        # Maps of blobs assembled here, for peers that need hashes (bounded, newest kept).
        self.completed_maps: OrderedDict[Digest, PartialChunkMap] = OrderedDict()
        self.messages_sent = 0
        self._rng = rng or random.Random()
        self.started = time.monotonic()
        self._handoffs: dict[Digest, trio.Event] = {}  # digests whose state is asked of the member ranked next
        self._exchanges_to: dict[str, set[Exchange]] = {}  # node → our chunk requests to it in flight

    # ---- coordination -----------------------------------------------------------------

    def coordinators_for(self, digest: Digest) -> list[Member]:
        live = {m.node_id: m for m in self.membership.live()}
        chosen = coordinators(str(digest), live, 1 + self.coordinator_backups)
        return [live[node] for node in chosen]

    def budget_keeper(self) -> Member:
        """The member of our site that keeps its upstream budget (``p2pd.swarm.budget``)."""
        site = {m.node_id: m for m in self.membership.live() if m.site == self.me.site}
        site[self.me.node_id] = self.me
        return site[coordinators(f"budget:{self.me.site}", site, 1)[0]]

    def keep_budget(self, ask: BudgetAsk) -> BudgetGrant:
        """A node of some site asks us, its keeper, for a share of the site's upstream budget."""
        grant = self.budgets.ask(ask.site, ask.node, ask.cap, ask.want, time.monotonic())
        self.metrics.site_budget_asks.inc()
        return grant

    async def ask_budget(self, want: bool) -> BudgetGrant | None:
        """Our share of the site's upstream budget from its keeper; None when it does not answer."""
        ask = BudgetAsk(self.me.node_id, self.me.site, self.site_share.cap, want)
        keeper = self.budget_keeper()
        if keeper.node_id == self.me.node_id:
            grant: BudgetGrant | None = self.keep_budget(ask)
        else:
            self.messages_sent += 1
            self.metrics.peer_messages.labels("budget").inc()
            try:
                with trio.fail_after(min(2.0, self.peer_timeout)):
                    grant = await self.client.budget(keeper.address, ask)
            except (PeerError, trio.TooSlowError) as exc:
                log.info("site budget keeper %s unreachable: %s", keeper.node_id, exc)
                self.membership.failure(keeper.node_id)
                grant = None
            else:
                self.membership.success(keeper.node_id)
        if want:
            self.metrics.site_upstream_share.set(grant.rate if grant is not None else self._static_budget_share())
        else:
            self.metrics.site_upstream_share.set(0)
        return grant

    def _static_budget_share(self) -> int:
        members = sum(1 for m in self.membership.live() if m.site == self.me.site and m.node_id != self.me.node_id)
        return self.site_share.cap // (members + 1)

    def announce_interval(self, *, leased: bool = False, busy: bool = False) -> float:
        # Small clusters refresh their view of each other's chunks often; large ones keep
        # each coordinator's load near 100 announcements per second per hot digest. A node
        # whose requests fill its slots needs no fresher view (its peers' answers carry their
        # bitmaps): it announces once a second, which was the largest CPU cost of a busy node.
        # However large the cluster, a lease holder refreshes its lease well within the TTL,
        # or a second node of its site would get it and fetch from the upstream too.
        interval = max(_BUSY_ANNOUNCE_INTERVAL if busy else 0.25, len(self.membership.live()) / 100.0)
        return min(interval, self.coordinator.lease_ttl / 3) if leased else interval

    def _asks_for_range(self, transfer: SwarmTransfer) -> bool:
        """Whether this node asks for a range lease of ``transfer``'s blob in its next announcement.

        A range holder's uplink carries the first copies of its range into the site, and a
        coordinator's carries its replies (3.3 KB, several a second per downloader: 23 % of a
        3 Mbit/s uplink at N = 32). A node holding ranges of two blobs was the last to finish in
        8 of 15 runs of the N = 32 equal-links cell, a coordinator holding a range in 2 of 5
        (docs/benchmarks.md, 31st and 32nd sessions). Where the site has more nodes than a blob
        can have ranges (``max_ranges``), such a node leaves the new blob's ranges to the others: a holder of another
        blob's unfinished range for ``_OTHER_RANGE_HOLDER_WAIT`` seconds of the transfer, a
        coordinator answering downloads for ``_COORDINATOR_RANGE_WAIT``, and the blob's own
        coordinator, which sees who asks, for as long as another downloader of its site holds no
        range (that one is granted the next). Afterwards it asks as any node does, so no range
        waits long for a taker. A range holder always asks: a backup coordinator learns from it
        who holds what."""
        if transfer.leased:
            return True
        others = sum(1 for m in self.membership.live() if m.site == self.me.site and m.node_id != self.me.node_id)
        if others <= self.coordinator.max_ranges:
            return True  # the site may need every node for the ranges
        now = time.monotonic()
        waited = now - transfer.started_at
        if waited < _OTHER_RANGE_HOLDER_WAIT and any(
                other is not transfer and other.leased and not other.ranges_complete()
                for other in self.transfers.values()):
            return False
        coordinates_it = self.coordinators_for(transfer.digest)[0].node_id == self.me.node_id
        if not coordinates_it and not self.coordinator.answering_downloads(now):
            return True
        if waited < _COORDINATOR_RANGE_WAIT:
            return False
        return not self.coordinator.downloader_without_range(transfer.digest, self.me.site, self.me.node_id, now)

    async def coordinate(self, message: Announce) -> Reply:
        """Answers an announcement (a peer's or this node's own) as the digest's coordinator."""
        predecessor_gone = False
        if not message.handoff and not message.gone and not self.coordinator.knows(message.digest):
            predecessor_gone = await self._take_over(message)
        return self.coordinator.announce(message, time.monotonic(), predecessor_gone=predecessor_gone)

    async def _take_over(self, message: Announce) -> bool:
        """Before a digest this node has no state for is coordinated here, asks the member ranked
        next for it what it knows (``CoordinatorState.adopt``). When this node has just joined,
        that member coordinated the digest until now, and the running transfer's nodes still
        announce there until they learn of this one: without its leases, this state would grant
        a range they are fetching (a second upstream fetch). When it has just died (the nodes
        came here because it stopped answering), nothing answers at its address: True, and the
        state's takeover is a short one (``CoordinatorState``). Bounded by a short timeout; an
        unknown digest (a new transfer) costs one round trip."""
        pending = self._handoffs.get(message.digest)
        if pending is not None:
            await pending.wait()  # another announcement is asking already
            return False
        others = {m.node_id: m for m in self.membership.live() if m.node_id != self.me.node_id}
        if not others:
            return False
        runner_up = others[coordinators(str(message.digest), others, 1)[0]]
        done = self._handoffs[message.digest] = trio.Event()
        try:
            question = replace(message, node=self.me.node_id, address=self.me.address, have=None, complete=False,
                               want_lease=False, leased=False, disputed=(), ranges=(), handoff=True,
                               lessees=())
            self.messages_sent += 1
            self.metrics.peer_messages.labels("handoff").inc()
            try:
                with trio.fail_after(min(_HANDOFF_TIMEOUT, self.peer_timeout)):
                    reply = await self.client.announce(runner_up.address, question)
            except (PeerError, trio.TooSlowError) as exc:
                gone = isinstance(exc, PeerUnreachable)
                log.info("%s did not say what it knows of %s%s: %s", runner_up.node_id, message.digest,
                         " (nothing answers there)" if gone else "", exc)
                return gone
            self.coordinator.adopt(message, reply, time.monotonic())
            if reply.lessees:
                log.info("took %s over from %s with %d range leases", message.digest, runner_up.node_id,
                         len(reply.lessees))
            return False
        finally:
            del self._handoffs[message.digest]
            done.set()

    async def announce(self, message: Announce) -> Reply | None:
        """Sends ``message`` to the digest's coordinator (or its backups); None if none answer."""
        for member in self.coordinators_for(message.digest):
            if member.node_id == self.me.node_id:
                return await self.coordinate(message)
            self.messages_sent += 1
            self.metrics.peer_messages.labels("announce").inc()
            began = time.monotonic()
            try:
                with trio.fail_after(self.peer_timeout):
                    reply = await self.client.announce(member.address, message)
            except (PeerError, trio.TooSlowError) as exc:
                log.info("coordinator %s unreachable for %s: %s", member.node_id, message.digest,
                         str(exc) or "timeout")
                # A coordinator slow to answer while it answers or sends us other things is alive
                # behind a congested uplink: suspended, its digests would move to a backup that
                # has no state, and the range leases it granted be granted again.
                self._met_slow_peer(member.node_id, exc, began)
                continue
            self.membership.success(member.node_id)
            return reply
        return None

    def _announcement(self, transfer: SwarmTransfer | None, digest: Digest, *, complete: bool = False,
                      want_lease: bool = False, gone: bool = False, size: int | None = None) -> Announce:
        have = None if transfer is None or complete else transfer.have.to_bytes()
        disputed = tuple(sorted(transfer.disputed))[:MAX_DISPUTED] if transfer is not None else ()
        lessees = tuple(RangeLease(node, address, first, last)
                        for node, (first, last) in sorted(transfer.lessees.items())
                        if (address := transfer.addresses.get(node)) is not None)[:MAX_RANGES] \
            if transfer is not None and not complete and not gone else ()
        return Announce(digest, self.me.node_id, self.me.address, self.me.site,
                        transfer.size if transfer else size, self._chunk_size_of(transfer, digest, size),
                        complete, have, want_lease, gone,
                        leased=transfer is not None and transfer.leased, disputed=disputed,
                        ranges=transfer.ranges[:MAX_RANGES] if transfer is not None and transfer.leased else (),
                        lessees=lessees, whole_blob=transfer is not None and transfer.range_ignored,
                        upstream_bytes=transfer.upstream_received if transfer is not None and not complete else 0,
                        compact=True)

    async def announce_complete(self, digest: Digest, size: int) -> None:
        with trio.move_on_after(self.peer_timeout * 2):
            await self.announce(self._announcement(None, digest, complete=True, size=size))

    def _chunk_size_of(self, transfer: SwarmTransfer | None, digest: Digest, size: int | None) -> int:
        """The chunk size this node uses for ``digest`` (the coordinator splits the site's
        ranges by it): its transfer's, its finished map's, or the one every node computes."""
        if transfer is not None:
            return transfer.chunk_size
        finished = self.completed_maps.get(digest)
        if finished is not None:
            return finished.chunk_size
        return chunk_size_for(size or 0, self.chunk_size)

    async def announce_gone(self, digest: Digest) -> None:
        with trio.move_on_after(self.peer_timeout * 2):
            await self.announce(self._announcement(None, digest, gone=True))

    # ---- the transfer -----------------------------------------------------------------

    def start_transfer(self, digest: Digest, size: int, fd: int, trusted_map: ChunkMap | None,
                       grant: str | None = None) -> SwarmTransfer:
        """A transfer of ``digest``; ``grant``: the registry's peer grant for it, shown to peers."""
        if trusted_map is not None:
            chunk_size, hashes = trusted_map.chunk_size, list[bytes | None](trusted_map.hashes)
        else:
            chunk_size = chunk_size_for(size, self.chunk_size)
            hashes = [None] * chunk_count(size, chunk_size)
        transfer = SwarmTransfer(digest, size, chunk_size, fd, trusted_map is not None, hashes, Bitmap(len(hashes)),
                                 grant=grant)
        self.transfers[digest] = transfer
        return transfer

    def remember_map(self, transfer: SwarmTransfer) -> None:
        """Keeps the verified map of a finished blob for peers that ask for it."""
        self.completed_maps[transfer.digest] = transfer.partial_map()
        while len(self.completed_maps) > _COMPLETED_MAPS:
            self.completed_maps.popitem(last=False)

    def finish_transfer(self, transfer: SwarmTransfer) -> None:
        if self.transfers.get(transfer.digest) is transfer:
            del self.transfers[transfer.digest]
        transfer.notify()

    def adopt_existing(self, transfer: SwarmTransfer, existing: int) -> None:
        """Keeps chunks a previous run left that still verify (runs in a thread)."""
        if not transfer.trusted:
            return  # nothing to check them against
        for index in range(transfer.count):
            offset, length = transfer.bounds(index)
            if offset + length > existing:
                break
            data = os.pread(transfer.fd, length, offset)
            expected = transfer.hashes[index]
            if expected is not None and len(data) == length and hashlib.sha256(data).digest() == expected:
                transfer.have.set(index)

    def released(self, transfer: SwarmTransfer) -> int:
        """Bytes a local reader may send: the verified prefix, minus the holdback if untrusted."""
        prefix = min(transfer.have.prefix() * transfer.chunk_size, transfer.size)
        if not transfer.trusted:
            prefix = min(prefix, transfer.size - min(HOLDBACK, transfer.size))
        return prefix

    async def run_transfer(self, transfer: SwarmTransfer, upstream_range: UpstreamRange,
                           on_progress: Callable[[], None], reader_wait: Callable[[], float] = lambda: 0.0) -> None:
        """Fills ``transfer`` from peers and (when leased, or stuck) the upstream.

        ``reader_wait``: how long a local reader of the blob has gone without a byte (0: none
        waits); past a bound, the chunk it needs is rescued (``_rescue_reader``)."""
        await self._wait_for_first_peer()
        async with trio.open_nursery() as nursery:
            next_announce = 0.0
            announced_at = time.monotonic()
            starving = False  # free request slots and nothing known to ask for: announce sooner
            upstream_running = False
            asked_after: tuple[tuple[int, int], ...] = ()  # the finished ranges we asked the next one after
            told_range_ignored = False
            while not transfer.have.is_full():
                now = time.monotonic()
                # A node that gets no chunks asks for fresh holders (early, whatever the cluster
                # size) well before it gives up on its peers and goes to the upstream itself.
                stalled = now - max(transfer.last_progress, announced_at) >= self.stuck_after / 3
                if transfer.leased and transfer.ranges != asked_after and transfer.ranges_complete():
                    # A range holder that finished its ranges asks for the next at once (once):
                    # its upstream flow would otherwise idle until the next announcement.
                    asked_after = transfer.ranges
                    next_announce = now
                if starving and now - announced_at >= self.announce_interval(leased=transfer.leased):
                    next_announce = now
                if transfer.range_ignored and not told_range_ignored:
                    # The coordinator makes the site's split one range at once, so that no other
                    # holder asks for (and is sent) the blob's start again.
                    told_range_ignored = True
                    next_announce = now
                if now >= next_announce or stalled:
                    # The lease holder keeps asking for its lease too: a backup coordinator that
                    # takes over (with no state) then learns who holds it.
                    reply = await self.announce(self._announcement(transfer, transfer.digest,
                                                                   want_lease=self._asks_for_range(transfer)))
                    if reply is None:
                        log.warning("no coordinator reachable for %s; fetching from the upstream", transfer.digest)
                        transfer.leased = True
                        transfer.ranges = ((0, transfer.count - 1),)
                    else:
                        transfer.disputed.clear()  # told
                        grew, leased_next = self._absorb(transfer, reply), self._next_chunk_leased(transfer)
                        if grew or leased_next:
                            # The swarm got new chunks of this blob, or the chunk our reader needs
                            # next is in a live range lease: the client's stream waits for it
                            # (containerd would otherwise fall back to the registry after
                            # stall_timeout, one more copy over the uplink).
                            on_progress()
                        if leased_next and self._may_wait_for_lease(transfer):
                            # Nor does this node go to the upstream for it: a coordinator keeps a
                            # lease only while its holder progresses, so a chunk slower than
                            # stuck_after on a thin uplink is not fetched twice. A holder that
                            # stalls loses its lease after lease_ttl; then stuck_after runs.
                            # Bounded: a coordinator that lies about a lease cannot hold the node
                            # back longer than _LEASE_PATIENCE lease TTLs without a new chunk.
                            transfer.last_progress = time.monotonic()
                    announced_at = time.monotonic()
                    next_announce = announced_at + self.announce_interval(leased=transfer.leased, busy=True)
                stuck = time.monotonic() - transfer.last_progress > self.stuck_after
                if (transfer.leased or stuck) and not upstream_running:
                    if stuck and not transfer.leased:
                        log.warning("no chunks of %s from peers for %.0fs; fetching from the upstream",
                                    transfer.digest, self.stuck_after)
                    upstream_running = True
                    nursery.start_soon(self._upstream_worker, transfer, upstream_range, on_progress)
                starving = await self._schedule_peer_requests(transfer, nursery, on_progress)
                self._rescue_reader(transfer, reader_wait(), nursery, upstream_range, on_progress)
                with trio.move_on_after(min(0.5, self.announce_interval())):
                    await transfer.wait_changed()
                if transfer.bytes_arrived():
                    # Bytes on their way count as progress: neither this node (stuck_after) nor
                    # the client's stream (stall_timeout) gives up on a swarm that is delivering.
                    transfer.last_progress = time.monotonic()
                    on_progress()
            nursery.cancel_scope.cancel()

    def _rescue_reader(self, transfer: SwarmTransfer, waited: float, nursery: trio.Nursery,
                       upstream_range: UpstreamRange, on_progress: Callable[[], None]) -> None:
        """The chunk a local reader needs next, when the reader has waited too long for it.

        A stream to containerd advances only with the verified prefix: its next chunk, asked of
        one peer whose uplink carries dozens of flows, kept a reader at byte 0 for 30 s (N = 32,
        equal links: the bench client then pulled the layer from the seed, one more copy over
        the uplink). Only a chunk that peers have and none is sending is rescued: one not in the
        site yet is its range holder's to bring, one arriving (however slowly) is on its way.
        After ``_READER_RESCUE_AFTER`` it comes from the upstream, once per chunk: a chunk, not
        the blob; and only at the site's first-ranked nodes that lack it (``_rescuers``), the
        others waiting twice as long, so a site's readers stuck at one chunk do not all fetch it.
        (Asking it of more peers at once after 5 s as well was measured and dropped:
        hundreds of extra requests per pull at N = 32, 4 % more bytes on the downlinks, no
        fewer waits.)
        """
        if waited < _READER_RESCUE_AFTER:
            return
        index = transfer.have.prefix()
        arrival = transfer.arrivals.get(index)
        if index >= transfer.count or index in transfer.rescued or (arrival is not None and not arrival.from_peer) \
                or transfer.in_own_range(index):
            return  # rescued already, arriving here from the upstream, or due in this node's own range
        if not any(index in bitmap for bitmap in self._candidate_sources(transfer).values()):
            return  # not in the site yet: its range holder brings it (stuck_after if it died)
        if any(exchange.received for exchange, chunk in transfer.exchanges.items() if chunk == index):
            return  # on its way, if slowly
        if waited < 2 * _READER_RESCUE_AFTER and self.me.node_id not in self._rescuers(transfer, index):
            return  # the site's first-ranked nodes that lack it bring it from the upstream
        transfer.rescued.add(index)
        self.metrics.reader_rescues.inc()
        log.info("chunk %d of %s: a reader waited %.0fs while no peer that has it sent a byte of it; fetching it "
                 "from the upstream", index, transfer.digest, waited)
        nursery.start_soon(self._rescue_from_upstream, transfer, index, upstream_range, on_progress)

    def _rescuers(self, transfer: SwarmTransfer, index: int) -> list[str]:
        """The nodes of this site, as far as this node knows, that pull the blob and lack chunk
        ``index`` (this node among them), ranked for it: the first ``_RESCUERS_PER_CHUNK``. The
        nodes' views differ a little, so a chunk may have a rescuer or two more, not one per node."""
        lacking = [node for node, bitmap in transfer.sources.items()
                   if index not in bitmap and (member := self.membership.get(node)) is not None
                   and member.site == self.me.site]
        return rank(f"{transfer.digest}#{index}", [*lacking, self.me.node_id])[:_RESCUERS_PER_CHUNK]

    async def _rescue_from_upstream(self, transfer: SwarmTransfer, index: int, upstream_range: UpstreamRange,
                                    on_progress: Callable[[], None]) -> None:
        """Chunk ``index`` alone from the upstream; given up as soon as a peer's copy lands."""
        async with trio.open_nursery() as nursery:
            async def until_landed() -> None:
                while index not in transfer.have:
                    await transfer.wait_changed()
                nursery.cancel_scope.cancel()

            async def fetch() -> None:
                try:
                    await self._fetch_run_from_upstream(transfer, index, index, upstream_range, on_progress,
                                                        whole_blob_if_range_ignored=False)
                except (UpstreamError, VerificationError) as exc:
                    log.info("chunk %d of %s from the upstream failed: %s", index, transfer.digest, exc)
                nursery.cancel_scope.cancel()

            nursery.start_soon(until_landed)
            nursery.start_soon(fetch)

    async def _wait_for_first_peer(self) -> None:
        """A node that has just started may not have met its peers yet: alone, it would be its
        own coordinator and take the whole blob from the upstream (a node joining a pull in
        progress would add a copy instead of helping). For ``_JOIN_GRACE`` seconds after the
        start, a transfer waits for a first member; a node that is alone waits no longer."""
        left = self.started + _JOIN_GRACE - time.monotonic()
        with trio.move_on_after(max(0.0, left)):
            while not any(m.node_id != self.me.node_id for m in self.membership.live()):
                await self.membership.wait_changed()

    def _absorb(self, transfer: SwarmTransfer, reply: Reply) -> bool:
        """Takes in a coordinator's reply; True when its holders have more chunks than before."""
        # A coordinator that grants without ranges (an older node) leases the whole blob.
        ranges = (reply.ranges or ((0, transfer.count - 1),)) if reply.granted else ()
        if ranges != transfer.ranges:
            if ranges:
                log.info("holding the upstream lease for %s, chunks %s", transfer.digest,
                         ", ".join(f"{first}-{last}" for first, last in ranges))
                self.metrics.leases.inc()
            transfer.ranges = ranges
            transfer.notify()  # an upstream worker with nothing left to fetch waits for a new range
        transfer.leased = bool(ranges)
        transfer.lessee, transfer.lessee_address = reply.lease_holder, reply.lease_address
        for peer in reply.holders:
            self._learn(transfer, peer)
        lessees = {lease.node: (lease.first, lease.last) for lease in reply.lessees}
        if not reply.lessees and reply.lease_holder:
            lessees[reply.lease_holder] = (0, transfer.count - 1)
        for lease in reply.lessees:
            if lease.node != self.me.node_id:
                transfer.addresses.setdefault(lease.node, lease.address)
        if transfer.lessee and transfer.lessee != self.me.node_id and transfer.lessee_address:
            transfer.addresses.setdefault(transfer.lessee, transfer.lessee_address)
        lessees.pop(self.me.node_id, None)
        transfer.lessees = {node: (max(0, first), min(last, transfer.count - 1))
                            for node, (first, last) in lessees.items() if first < transfer.count}
        site_chunks = 0
        for peer in reply.holders:
            if peer.complete:
                site_chunks += transfer.count
            elif peer.have is not None:
                with contextlib.suppress(ValueError):
                    site_chunks += Bitmap(transfer.count, peer.have).cardinality()
        grew = site_chunks > transfer.site_chunks
        transfer.site_chunks = site_chunks
        return grew

    def _may_wait_for_lease(self, transfer: SwarmTransfer) -> bool:
        """Whether this node may still wait for another node's range lease instead of going to
        the upstream: for at most ``_LEASE_PATIENCE`` lease TTLs without a new chunk here."""
        now, count = time.monotonic(), transfer.have.cardinality()
        if transfer.lease_wait is None or transfer.lease_wait[1] != count:
            transfer.lease_wait = (now, count)
        return now - transfer.lease_wait[0] < _LEASE_PATIENCE * self.coordinator.lease_ttl

    def _next_chunk_leased(self, transfer: SwarmTransfer) -> bool:
        """Whether the chunk the local reader needs next is in a live node's range lease (a
        coordinator keeps a lease only while its holder's range grows: it is on its way)."""
        wanted = transfer.have.prefix()
        return any(first <= wanted <= last and self.membership.is_usable(node)
                   for node, (first, last) in transfer.lessees.items())

    def _learn(self, transfer: SwarmTransfer, peer: PeerInfo) -> None:
        if peer.node == self.me.node_id:
            return
        transfer.addresses[peer.node] = peer.address
        transfer.sites[peer.node] = peer.site
        if peer.complete:
            transfer.sources[peer.node] = Bitmap.full(transfer.count)
        elif peer.have is not None:
            with contextlib.suppress(ValueError):
                transfer.sources[peer.node] = Bitmap(transfer.count, peer.have)

    def _candidate_sources(self, transfer: SwarmTransfer) -> dict[str, Bitmap]:
        now = time.monotonic()
        sources = {node: bitmap for node, bitmap in transfer.sources.items()
                   if self.membership.is_usable(node) and transfer.retry_at.get(node, 0.0) <= now}
        asks: dict[str, Bitmap] = {}
        for index, node in list(transfer.relay_hints.items()):
            if index in transfer.have:
                del transfer.relay_hints[index]
            elif node in transfer.addresses and self.membership.is_usable(node) \
                    and transfer.retry_at.get(node, 0.0) <= now:
                asks.setdefault(node, Bitmap(transfer.count)).set(index)
        if not transfer.lessees:
            return self._with_asks(transfer, sources, asks)
        # Runs each time requests are planned, for every range holder (16 holders, 32 sources):
        # chunk sets as integers, each source's taken once, and what every holder shares
        # (downloaders, the wait) computed once. A test per chunk and source here was ~1/8 of
        # an agent's Python time in a pull (py-spy); 2.2 ms a call at N = 32 (32 sources, 72 chunks), now 0.44 ms.
        masks = {node: bitmap.mask() for node, bitmap in sources.items()}
        downloaders = [node for node, bitmap in transfer.sources.items()
                       if node not in transfer.lessees and not bitmap.is_full()]
        wait = min(_ANYONE_ASKS_AFTER_MAX, 2 * self.announce_interval())
        have = transfer.have.mask()
        for lessee, (first, last) in transfer.lessees.items():
            if not self.membership.is_usable(lessee) or transfer.retry_at.get(lessee, 0.0) > now:
                continue
            known = transfer.sources.get(lessee)
            optimistic = lessee_view(known, transfer.count, first, last, len(transfer.lessees))
            elsewhere = have
            for node, mask in masks.items():
                if node != lessee:
                    elsewhere |= mask
            allowed = self._offered_by_holder(transfer, lessee, optimistic, known, elsewhere, downloaders, wait, now,
                                              asks)
            sources[lessee], masks[lessee] = allowed, allowed.mask()
        return self._with_asks(transfer, sources, asks)

    @staticmethod
    def _with_asks(transfer: SwarmTransfer, sources: dict[str, Bitmap], asks: dict[str, Bitmap]) -> dict[str, Bitmap]:
        """``sources`` with the chunks to take from a node of their relay tree while they arrive
        there (``asks``: node → chunks): not in its bitmap yet, so offered on top of it (a copy:
        the bitmap is the node's own)."""
        for node, chunks in asks.items():
            known = sources.get(node)
            sources[node] = chunks if known is None else Bitmap.from_mask(transfer.count, known.mask() | chunks.mask())
        return sources

    def _offered_by_holder(self, transfer: SwarmTransfer, lessee: str, lessee_bitmap: Bitmap,
                           lessee_has: Bitmap | None, elsewhere: int, downloaders: list[str], wait: float, now: float,
                           asks: dict[str, Bitmap]) -> Bitmap:
        """Which chunks this node may ask the lease holder ``lessee`` for (``lessee_bitmap``: what
        it offers; ``elsewhere``: the chunks this node has or another source holds, as a
        ``Bitmap.mask``). Chunks to ask of another node while they arrive there are added to
        ``asks`` (node → chunks).

        A chunk that only the lease holder has is asked of it by the first nodes of the chunk's
        relay tree, and of them by the others (``_relay_parent``), so that no uplink carries
        more copies of it than the chunk arrives fast enough to fill. Otherwise every downloader
        would ask the lease holder for every new chunk and its uplink would carry the image many
        times over. After ``wait`` seconds anyone may ask the holder, so a slow or lost node of
        the tree costs a short delay, never a stall.
        """
        offered = lessee_bitmap.mask()
        allowed = Bitmap.from_mask(transfer.count, offered & elsewhere)  # plan_requests prefers the other holders
        for index in Bitmap.from_mask(transfer.count, offered & ~elsewhere).indexes():
            direct, parent = self._relay_parent(transfer, index, lessee, downloaders)
            if direct or index in transfer.tree_missed:
                allowed.set(index)
                continue
            if parent is not None and parent in transfer.addresses:
                asks.setdefault(parent, Bitmap(transfer.count)).set(index)
            # The wait starts when the lease holder is known to have the chunk, not while it
            # is still only in its lookahead.
            if lessee_has is not None and index in lessee_has:
                first_seen = transfer.lessee_only_since.setdefault(index, now)
                if now - first_seen >= wait:
                    allowed.set(index)
        return allowed

    def _relay_parent(self, transfer: SwarmTransfer, index: int, lessee: str,
                      downloaders: list[str]) -> tuple[bool, str | None]:
        """Where this node takes chunk ``index`` from while it arrives at its range holder
        ``lessee``: (True, None) from the holder itself, (False, node) from ``node`` as that
        one receives it (a relay of a relay), (False, None) nowhere in particular.

        The chunk's relay tree, which every node computes alike (rendezvous hashing, no
        messages): the nodes that want it, downloaders without a range first, then the other
        range holders (whose uplinks carry their own arriving chunks), each group in the
        chunk's order. The first ``chunk_relays`` of them ask the holder, as many as its
        uplink can feed at the chunk's arrival rate (``p2pd.swarm.service``); each of the rest
        asks the node that many places ahead of it, a chain under each: every node passes an
        arriving chunk on to at most one more, so its uplink carries about what it receives,
        and every node gets every chunk while the holder still receives it, one relay step
        behind per level. With one relay per arriving chunk and the rest fetched complete
        (store-and-forward) the nodes of an N = 32 site with equal links took the first
        copies a chunk-time late, and that debt was the tail (docs/benchmarks.md).

        The tree is a guess from this node's view of the site: a parent that does not fetch the
        chunk says so at once, and the chunk goes to ``SwarmTransfer.tree_missed`` (asked of the
        holder, which relays it or names a node that receives it: ``relay_hints``)."""
        holders = [node for node in transfer.lessees if node != lessee]
        me = self.me.node_id
        direct = chunk_relays(len(transfer.lessees) + (1 if transfer.leased else 0))
        seen = (len(downloaders), len(holders), transfer.leased)
        cached = transfer.relay_trees.get(index)
        if cached is not None and cached[0] == seen:
            return cached[1], cached[2]
        key = f"{transfer.digest}:{index}"
        if transfer.leased:
            order = rank(key, downloaders) + rank(key, [*holders, me])
        else:
            order = rank(key, [*downloaders, me]) + rank(key, holders)
        place = order.index(me)
        answer = (True, None) if place < direct else (False, order[place - direct])
        transfer.relay_trees[index] = (seen, *answer)
        return answer

    async def _schedule_peer_requests(self, transfer: SwarmTransfer, nursery: trio.Nursery,
                                      on_progress: Callable[[], None]) -> bool:
        """Starts requests for free slots; True when slots stay free for want of known sources."""
        room = request_slots(transfer.chunk_size, self.max_parallel_chunks) - sum(transfer.busy.values())
        if room <= 0:
            return False
        needed = [i for i in transfer.have.missing() if i not in transfer.requested]
        if not needed:
            self._endgame(transfer, nursery, on_progress, room)
            return False
        sources = self._candidate_sources(transfer)
        if not sources:
            return True
        same_site = [node for node in sources if transfer.sites.get(node) == self.me.site]
        # The chunks the local reader needs next go first: a stream to containerd advances only
        # with the verified prefix, and one that stops for stall_timeout is cut. Rarest first
        # for the rest, which spreads chunks through the swarm.
        urgent = needed[:_READER_AHEAD]
        plan = plan_requests(urgent, sources, busy=transfer.busy, max_per_source=self.max_requests_per_peer,
                             limit=room, preferred=same_site, fallback=list(transfer.lessees), rng=self._rng)
        busy = dict(transfer.busy)
        for request in plan:
            busy[request.source] = busy.get(request.source, 0) + 1
        planned = {request.index for request in plan}
        if room > len(plan):
            plan += plan_requests([i for i in needed if i not in planned], sources, busy=busy,
                                  max_per_source=self.max_requests_per_peer, limit=room - len(plan),
                                  preferred=same_site, fallback=list(transfer.lessees), rng=self._rng)
        if any(transfer.hashes[request.index] is None for request in plan):
            await self._refresh_hashes(transfer)
            plan = [r for r in plan if transfer.hashes[r.index] is not None]
        for request in plan:
            transfer.requested.add(request.index)
            transfer.busy[request.source] = transfer.busy.get(request.source, 0) + 1
            nursery.start_soon(self._fetch_chunk, transfer, request.index, request.source, on_progress)
        return len(plan) < min(room, len(needed))

    def _endgame(self, transfer: SwarmTransfer, nursery: trio.Nursery, on_progress: Callable[[], None],
                 room: int) -> None:
        """The last few chunks, all requested: each still in flight from a peer is asked of a
        second peer too, and the first verified answer cancels the other. A pull ends with its
        last chunk, and one request to a peer whose uplink is crowded (or that is about to fail)
        made a node finish seconds after all others (N = 16 equal links: the last node 1.6 s behind
        the one before it, waiting for a chunk that 15 peers had). The cost: up to 4 chunks of a
        blob fetched twice in part (the loser is cancelled when the winner is verified), and a blob
        of one chunk (a config) asked of two peers at once."""
        if transfer.count - transfer.have.cardinality() > _ENDGAME_CHUNKS:
            return
        waiting = [i for i, asked in transfer.inflight.items() if len(asked) == 1 and i not in transfer.have]
        if not waiting:
            return
        sources = self._candidate_sources(transfer)
        for index in waiting:
            if room <= 0:
                return
            asked = transfer.inflight[index]
            candidates = [node for node, bitmap in sources.items()
                          if index in bitmap and node not in asked
                          and transfer.busy.get(node, 0) < self.max_requests_per_peer]
            if not candidates:
                continue
            node = min(candidates, key=lambda n: (transfer.busy.get(n, 0), self._rng.random()))
            room -= 1
            transfer.busy[node] = transfer.busy.get(node, 0) + 1
            log.debug("chunk %d of %s: asking %s too (endgame)", index, transfer.digest, node)
            nursery.start_soon(self._fetch_chunk, transfer, index, node, on_progress)

    async def _refresh_hashes(self, transfer: SwarmTransfer) -> None:
        """Fills unknown chunk hashes from the lease holder or a complete holder (signed)."""
        # Without the seed's map, each range holder computed the hashes of its own range.
        candidates = list(transfer.lessees)
        candidates += [n for n, b in transfer.sources.items() if b.is_full() and n not in candidates]
        for node in candidates:
            address = transfer.addresses.get(node)
            if address is None or not self.membership.is_usable(node):
                continue
            self.messages_sent += 1
            self.metrics.peer_messages.labels("chunkmap").inc()
            try:
                with trio.fail_after(self.peer_timeout):
                    chunk_map = await self.client.chunk_map(address, transfer.digest, transfer.grant)
            except (PeerError, trio.TooSlowError) as exc:
                log.debug("chunk map of %s from %s failed: %s", transfer.digest, node, exc)
                continue
            if chunk_map.size != transfer.size or chunk_map.chunk_size != transfer.chunk_size:
                continue
            for index, value in enumerate(chunk_map.chunks):
                if transfer.hashes[index] is None and value is not None:
                    transfer.hashes[index] = value
            if all(value is not None for value in transfer.hashes):
                return

    async def _fetch_chunk(self, transfer: SwarmTransfer, index: int, node: str,
                           on_progress: Callable[[], None]) -> None:
        """One request for chunk ``index`` to ``node``; the scheduler counted it in ``requested``
        and ``busy``. A second request for the same chunk (``_endgame``) may run beside it: the
        first verified answer cancels the other, and the chunk leaves ``requested`` with the last."""
        scope = trio.CancelScope()
        asked = transfer.inflight.setdefault(index, {})
        asked[node] = scope
        started = time.monotonic()
        route = _route(transfer, index, node)
        outcome = "cancelled"
        try:
            with scope:
                outcome = await self._fetch_chunk_from(transfer, index, node, on_progress)
        finally:
            # One line per chunk request, what ``tests.bench.swarm_trace`` reads: where each
            # chunk came from, how, and how long each request took (a 64 KiB chunk's relay from
            # a range holder takes as long as the chunk's arrival there).
            log.debug("chunk %d of %s from %s (%s): %s after %.3f s", index, transfer.digest, node, route, outcome,
                      time.monotonic() - started)
            asked.pop(node, None)
            if not asked:
                transfer.inflight.pop(index, None)
                transfer.requested.discard(index)
            transfer.busy[node] = max(0, transfer.busy.get(node, 1) - 1)
            transfer.notify()  # a request slot is free (and maybe a chunk landed): plan again

    async def _fetch_chunk_from(self, transfer: SwarmTransfer, index: int, node: str,
                                on_progress: Callable[[], None]) -> str:
        """Asks ``node`` for chunk ``index``; what came of it, in words (the debug log)."""
        offset, length = transfer.bounds(index)
        address = transfer.addresses.get(node)
        # Whether it claimed the chunk when asked. A bitmap that says so only while the request
        # is out (in another of its answers, or the coordinator's reply) came after its "not
        # here": it got the chunk meanwhile (N = 32 equal links: a range holder's chunk landed
        # just after it answered, the holder was disputed and its range fetched twice).
        claimed = _claims(transfer, index, node)
        asked_at = time.monotonic()
        self.metrics.peer_messages.labels("chunk").inc()
        try:
            if address is None:
                return "no address"
            await self.download_bucket.take(length)
            mapped = transfer.hashes[index]

            def store(data: bytearray, sha256: bytes) -> bool:
                # In the fetch's worker thread: only bytes that match the chunk map are written
                # (a second copy of a chunk here already is the same bytes).
                if mapped is None or sha256 != mapped:
                    return False
                _pwrite_all(transfer.fd, data, offset)
                return True

            # Passed on while it arrives only when it arrives here as it arrives there: asked of
            # a node that did not claim it (its range holder, or a node of the chunk's relay tree).
            # A chunk a peer has complete comes at the rate of that peer's upload, not of the
            # upstream's, and relays of it (which take no upload slot) would only share this
            # node's uplink further: with 512 KiB chunks they piled up, readers waited 40-55 s
            # and were rescued from the upstream (1.6x the image; benchmarks.md, 29th session).
            arrival = None if claimed else self._open_peer_arrival(transfer, index, length)
            exchange = Exchange(arrival.buffer, _feeder(arrival)) if arrival is not None else Exchange()
            transfer.exchanges[exchange] = index
            to_node = self._exchanges_to.setdefault(node, set())
            to_node.add(exchange)
            try:
                # No byte for peer_timeout fails the request (the wire's read timeout); a chunk
                # that keeps arriving, slowly because its holder serves several peers, may
                # take longer, up to this bound.
                with trio.fail_after(self.peer_timeout * _CHUNK_TIMEOUTS):
                    chunk = await self.client.fetch_chunk(address, transfer.digest, offset, length, transfer.grant,
                                                          exchange=exchange, store=store)
                if arrival is not None and mapped is not None and chunk.sha256 == mapped:
                    arrival.verified = True  # the relays send its last bytes
            finally:
                del transfer.exchanges[exchange]
                to_node.discard(exchange)
                if not to_node and self._exchanges_to.get(node) is to_node:
                    del self._exchanges_to[node]
                transfer.arriving -= exchange.received
                if arrival is not None:
                    _close_arrival(transfer, arrival)
            if chunk.have is not None:
                with contextlib.suppress(ValueError):
                    transfer.sources[node] = Bitmap(transfer.count, chunk.have)
            expected = transfer.hashes[index]
            if expected is None or chunk.sha256 != expected:
                self.metrics.chunks_failed.inc()
                self.metrics.verification_failures.labels("peer").inc()
                log.warning("chunk %d of %s from %s failed verification", index, transfer.digest, node)
                self.membership.ban(node, self.ban_seconds)
                transfer.sources.pop(node, None)
                transfer.disputed.add(node)  # its claims are worth nothing: the coordinator stops counting them
                return "failed verification"
            if index in transfer.have:
                return "already here"
            if not chunk.stored:
                await trio.to_thread.run_sync(_pwrite_all, transfer.fd, chunk.data, offset)
            if index in transfer.have:
                # The endgame's other request for it was written meanwhile (the same verified bytes).
                return "already here"
            transfer.have.set(index)
            for other, request in transfer.inflight.get(index, {}).items():
                if other != node:
                    request.cancel()  # the endgame's other request for it: not needed any more
            transfer.peer_bytes[node] = transfer.peer_bytes.get(node, 0) + length
            transfer.last_progress = time.monotonic()
            self.metrics.chunks_verified.inc()
            self.metrics.fetched_bytes.labels("peer").inc(length)
            self.metrics.peer_fetched_bytes.labels(node).inc(length)
            self.membership.success(node)
            on_progress()
            return "verified"
        except PeerBusy as exc:
            transfer.retry_at[node] = time.monotonic() + exc.retry_after
            return "busy"
        except PeerRelayCut as exc:
            # The chunk stopped arriving at (or failed at) the range holder that relayed it. Not
            # a false claim, nor a dead holder: asked again soon, there or elsewhere.
            log.info("chunk %d of %s: %s", index, transfer.digest, exc)
            transfer.retry_at[node] = time.monotonic() + 0.2
            self._drop_hint(transfer, index, node)
            return "relay cut"
        except PeerMissing as exc:
            # Unclaimed, a chunk on its way to it that has not come yet (a range holder's
            # lookahead, a node of the chunk's relay tree): asked again soon, and not held
            # against it.
            transfer.retry_at[node] = time.monotonic() + 0.2
            self._drop_hint(transfer, index, node)
            if exc.relayed_to is not None and exc.relayed_to != self.me.node_id:
                # Its relays of the chunk are all taken: the node named receives it from it now
                # and passes it on (the next level of the chunk's relay tree).
                transfer.relay_hints[index] = exc.relayed_to
            elif not claimed and node not in transfer.lessees:
                # Our relay tree's guess was wrong (the node does not fetch the chunk now): the
                # holder itself, which relays it or names a node that receives it.
                transfer.tree_missed.add(index)
            if claimed:
                # It said it had this chunk (a complete copy, or its bitmap) and has not: a stale
                # or false claim. The coordinator hears of it with our next announcement.
                log.info("%s claimed chunk %d of %s but does not serve it", node, index, transfer.digest)
                transfer.disputed.add(node)
                transfer.sources.pop(node, None)
                self.metrics.claims_disputed.inc()
            return f"not there, relayed to {exc.relayed_to}" if exc.relayed_to is not None else "not there"
        except PeerRefused:
            # It protects this blob and we have no grant it accepts: not a fault of the peer.
            # Without sources, the stuck timer sends us to the upstream.
            log.info("%s refused %s: no accepted peer grant", node, transfer.digest)
            transfer.sources.pop(node, None)
            transfer.retry_at[node] = time.monotonic() + self.stuck_after
            return "refused"
        except (PeerError, trio.TooSlowError) as exc:
            self._drop_hint(transfer, index, node)
            # str(trio.TooSlowError()) is empty (and an exception is always truthy): name the reason.
            reason = "timeout" if isinstance(exc, trio.TooSlowError) else str(exc) or type(exc).__name__
            transfer.retry_at[node] = time.monotonic() + 1.0
            if self._met_slow_peer(node, exc, asked_at):
                # Silent here, but it answered us or sent bytes of another answer meanwhile: alive,
                # its uplink congested (thin equal links: packets wait out TCP's retransmission
                # timeouts). Asked again later, not counted as a failure: three in a row suspended
                # live range holders, their ranges were disputed and fetched from the upstream
                # again (N = 32 at 1.5 Mbit/s: 1.34x the image; docs/benchmarks.md, 31st session).
                log.info("chunk %d of %s from %s: %s, while it sends other answers (slow, not gone)", index,
                         transfer.digest, node, reason)
                return f"slow: {reason} while it sends other answers"
            log.info("chunk %d of %s from %s failed: %s", index, transfer.digest, node, reason)
            if not self.membership.is_usable(node) and (node in transfer.lessees or node in transfer.sources):
                # It stopped answering (suspended): a dead range holder must not keep its range
                # until lease_ttl while every reader waits for those chunks (containerd gives up
                # after its own timeout). Disputed, the coordinator takes the range back and
                # grants it to a live node at once.
                log.info("%s stopped answering; telling the coordinator of %s", node, transfer.digest)
                transfer.disputed.add(node)
                transfer.sources.pop(node, None)
            return f"failed: {reason}"

    def _met_slow_peer(self, node: str, exc: BaseException, began: float) -> bool:
        """Counts a failed request to ``node`` (begun at ``began``) against it, unless it timed out
        while the node was alive: it answered since the request began (``Membership.failure``'s
        ``began``) or sent bytes of another of our requests meanwhile (``_sending_to_us``). True
        then: the request met a slow peer, not a gone one."""
        if not isinstance(exc, PeerTimeout | trio.TooSlowError):
            self.membership.failure(node)
            return False
        return self._sending_to_us(node) or not self.membership.failure(node, began=began)

    def _sending_to_us(self, node: str) -> bool:
        """Whether ``node`` sent a byte of one of our chunk requests still in flight within the
        last ``peer_timeout``: a request to it that timed out meanwhile met a slow peer, not a
        gone one (a stopped or dead process sends nothing on any connection). Its answers since
        a request began are the other sign (``Membership.failure``'s ``began``)."""
        heard = max((exchange.last_byte_at for exchange in self._exchanges_to.get(node, ())),
                    default=-math.inf)
        return time.monotonic() - heard < self.peer_timeout

    @staticmethod
    def _drop_hint(transfer: SwarmTransfer, index: int, node: str) -> None:
        """The node we were sent to for a chunk (``relay_hints``) did not deliver it."""
        if transfer.relay_hints.get(index) == node:
            del transfer.relay_hints[index]

    @staticmethod
    def _open_peer_arrival(transfer: SwarmTransfer, index: int, length: int) -> Arrival | None:
        """A chunk we start fetching from a peer, open to relays while it arrives (``Arrival``);
        None when it is arriving here already (the upstream, or the endgame's first request)."""
        if index in transfer.arrivals or index in transfer.have:
            return None
        arrival = transfer.arrivals[index] = Arrival(index, bytearray(length), from_peer=True)
        transfer.notify()  # a request for it waiting at the peer service is relayed at once
        return arrival

    async def _upstream_worker(self, transfer: SwarmTransfer, upstream_range: UpstreamRange,
                               on_progress: Callable[[], None]) -> None:
        """Fetches runs of missing chunks from the upstream, in order, until all are here.

        Chunks that live peers hold are left to them (a lease that moved must not refetch
        what the site already has), unless nothing has arrived for ``stuck_after``.
        """
        self.site_share.start()
        try:
            await self._fetch_missing_from_upstream(transfer, upstream_range, on_progress)
        finally:
            await self.site_share.stop()

    async def _fetch_missing_from_upstream(self, transfer: SwarmTransfer, upstream_range: UpstreamRange,
                                           on_progress: Callable[[], None]) -> None:
        await self._fetch_front_from_upstream(transfer, upstream_range, on_progress)
        while not transfer.have.is_full():
            skip = transfer.have.indexes()
            skip_set = set(skip) | transfer.requested | self._held_by_peers(transfer)
            stuck = time.monotonic() - transfer.last_progress > self.stuck_after
            # Our range leases (in order); everything missing once nothing arrives any more.
            allowed = [i for first, last in transfer.ranges for i in range(first, last + 1)]
            mine = set(range(transfer.count)) if stuck else set(allowed)
            first = next((i for i in sorted(mine) if i not in skip_set), None)
            if first is None or (transfer.range_ignored and 0 not in mine):
                with trio.move_on_after(min(1.0, self.stuck_after / 3)):
                    await transfer.wait_changed()
                continue
            if transfer.range_ignored:
                # Every request brings the blob from its first byte: one run from there to its
                # end, landing what is missing, by the node whose lease starts there (the
                # coordinator's one range, once told) or that is stuck.
                first, last = 0, transfer.count - 1
                run = [i for i in range(transfer.count) if i not in skip_set]
            else:
                last = first
                while last + 1 < transfer.count and last + 1 not in skip_set and last + 1 in mine:
                    last += 1
                run = list(range(first, last + 1))
            transfer.requested.update(run)
            try:
                await self._fetch_run_from_upstream(transfer, first, last, upstream_range, on_progress)
            finally:
                transfer.requested.difference_update(run)
                transfer.notify()

    async def _fetch_front_from_upstream(self, transfer: SwarmTransfer, upstream_range: UpstreamRange,
                                         on_progress: Callable[[], None]) -> None:
        """The blob's first ``_FRONT_FLOWS`` chunks, when they are in our range and none is here
        or on its way, one request each, at once; the rest of the range follows in order.

        Every node's reader starts at chunk 0, and a range holder's request gets 1/K of a thin
        uplink shared by K holders, less when its flow starves: at N = 32 with equal links the
        first chunk took 12-22 s to reach its holder (fair share ~6 s), and bench clients gave
        up at byte 0 and fetched the layer from the seed. Requests of their own give the first
        chunks a larger share together, and they do not all starve at once. The bytes are the
        same (one copy per site); a range of many chunks is not split further, so a reader
        that follows it in order is not slowed by parts of it arriving side by side. At most
        ``_FRONT_BYTES`` of them: where chunks are big, few holders fetch at once (the
        coordinator's ``leases_at_once``) and the first chunk's own flow has a large share
        already; split four ways, a 512 KiB chunk 0 (a 64 MiB layer as cut until 12-07) took 11 s instead of 7 s
        to reach its holder (N = 32, equal 3 Mbit/s links; docs/benchmarks.md, 27th session)."""
        front = next(((first, last) for first, last in transfer.ranges if first == 0), None)
        if front is None or front[1] < 1:
            return
        flows = chunks_within(_FRONT_BYTES, transfer.chunk_size, at_least=1, at_most=_FRONT_FLOWS)
        if flows < 2:
            return  # one chunk at a time: the first one alone takes the range's whole share
        chunks = range(0, min(front[1], flows - 1) + 1)
        busy = transfer.requested | self._held_by_peers(transfer)
        if any(i in transfer.have or i in busy for i in chunks):
            return
        transfer.requested.update(chunks)
        try:
            async with trio.open_nursery() as nursery:
                for index in chunks:
                    nursery.start_soon(self._fetch_run_from_upstream, transfer, index, index, upstream_range,
                                       on_progress)
        finally:
            transfer.requested.difference_update(chunks)
            transfer.notify()

    def _held_by_peers(self, transfer: SwarmTransfer) -> set[int]:
        if time.monotonic() - transfer.last_progress > self.stuck_after:
            return set()
        held: set[int] = set()
        for node, bitmap in transfer.sources.items():
            if node != self.me.node_id and self.membership.is_usable(node):
                held.update(bitmap.indexes())
        return held

    async def _fetch_run_from_upstream(self, transfer: SwarmTransfer, first: int, last: int,
                                       upstream_range: UpstreamRange, on_progress: Callable[[], None],
                                       *, whole_blob_if_range_ignored: bool = True) -> None:
        """Chunks ``first..last`` from the upstream in one request, each verified as it completes.
        The chunk being filled is an ``Arrival`` peers may be served from while it arrives.

        An upstream that ignores Range sends the whole blob for every request, from its first
        byte. With ``whole_blob_if_range_ignored`` (a range holder's runs), a run from chunk 0
        then reads on to the blob's end, landing every chunk not here yet, and any other run is
        given up before a byte of it is read (``SwarmTransfer.range_ignored`` tells the
        coordinator, which makes the site's split one range): each holder reading the blob's
        start to drop it cost the site about half the number of ranges times the blob.
        Otherwise (a reader's rescue: one chunk) the start is read, paid for and dropped."""
        start = transfer.bounds(first)[0]
        end_offset, end_length = transfer.bounds(last)
        end = end_offset + end_length - 1
        index = first
        arrival: Arrival | None = None
        next_byte = start  # the first byte not read yet
        paid_to = start - 1  # the last byte paid for before it was asked for

        def open_arrival() -> Arrival | None:
            if index > last or index in transfer.have or index in transfer.arrivals:
                return None  # nothing to relay from this run for it (another request brings it)
            opened = transfer.arrivals[index] = Arrival(index, bytearray(transfer.bounds(index)[1]))
            return opened

        # Under a cap each piece is paid for before it is asked for; bytes past what was paid for
        # are paid for as they are read: all of them with no cap (the takes return at once), the
        # rest of the run once the upstream ignored a piece's Range (below).
        capped = self.upstream_bucket.rate > 0 or self.site_share.enabled

        def on_range_ignored(offset: int) -> int:
            nonlocal last, end
            transfer.range_ignored = True
            transfer.notify()
            if first != 0:
                raise _RangeIgnored
            # From byte 0 (or resumed within a run that began there): the whole blob, at once.
            last = transfer.count - 1
            end = transfer.size - 1
            return end

        async def accept(piece: bytes) -> None:
            nonlocal index, arrival, next_byte, paid_to
            unpaid = next_byte + len(piece) - 1 - paid_to
            if unpaid > 0:
                await self.pay_for_upstream_bytes(unpaid)
                paid_to += unpaid
            next_byte += len(piece)
            transfer.upstream_received += len(piece)
            view = memoryview(piece)
            while view:
                if index > last:
                    raise VerificationError("upstream sent more bytes than asked")
                if arrival is None or arrival.index != index:
                    arrival = open_arrival() or Arrival(index, bytearray(transfer.bounds(index)[1]))
                length = len(arrival.buffer)
                take = min(len(view), length - arrival.received)
                arrival.buffer[arrival.received:arrival.received + take] = view[:take]
                before, arrival.received = arrival.received, arrival.received + take
                view = view[take:]
                if arrival.received < length:
                    if arrival.received // _RELAY_STEP > before // _RELAY_STEP \
                            or time.monotonic() - arrival.notified_at >= _RELAY_TICK:
                        arrival.notify()
                    return
                await self._land_upstream_chunk(transfer, arrival)
                index += 1
                arrival = open_arrival()  # before the notify: a waiting peer request is relayed at once
                transfer.notify()
                on_progress()

        hook = on_range_ignored if whole_blob_if_range_ignored else None
        arrival = open_arrival()
        if arrival is not None:
            transfer.notify()
        try:
            took = 0.0
            in_pieces = capped
            while next_byte <= end and in_pieces:
                paid_to = next_byte + await self._pay_upstream_piece(end + 1 - next_byte, 2 * took) - 1
                asked = time.monotonic()
                # An upstream that ignores Range sends the blob from its first byte for every
                # request: pieces would cost it the square of the blob; the rest in one request.
                in_pieces = not await upstream_range(next_byte, paid_to, accept, hook)
                took = time.monotonic() - asked
            if next_byte <= end:
                await upstream_range(next_byte, end, accept, hook)
        except _RangeIgnored:
            log.info("the upstream ignored the Range of chunks %d-%d of %s; the run from the blob's start brings them",
                     first, last, transfer.digest)
            return
        finally:
            # A run that ends early (an error, a cancel) cuts short the answers relaying its chunk.
            if arrival is not None and not arrival.verified:
                _close_arrival(transfer, arrival)
        if index != last + 1:
            raise UpstreamError(f"upstream ended {transfer.digest} early")

    async def pay_for_upstream_bytes(self, length: int) -> None:
        """Pays the upstream caps for ``length`` bytes read from the upstream that were not paid
        for before they were asked for: a run's bytes when there is no cap (returns at once) or
        once the upstream ignored a Range, and the bytes such an upstream sends that nobody asked
        for (the blob's start before the range, read and dropped, and past its end). Those
        crossed the site's link like the rest; unpaid, they came at the link's rate past the cap."""
        await self.upstream_bucket.take(length)
        await self.site_share.take(length)

    async def _pay_upstream_piece(self, remaining: int, seconds: float) -> int:
        """Under an upstream cap: waits until the next piece of a range holder's run (of
        ``remaining`` bytes) is paid for, and returns its length: ``seconds`` of the rate this
        node may fetch at now, within ``_CAPPED_PIECE_SECONDS``.. ``_CAPPED_PIECE_MAX_SECONDS``.

        The bytes an upstream request brings are paid for before it is sent, not as they are
        read. Read-paced, a request brought a receive buffer's worth at the link's rate before
        any wait (and again each time a read freed it), and the range holders of a site start
        their runs together: a site's 8 nodes took their 16 Mbit/s link for 1.5 s against an
        8 Mbit/s site cap (docs/benchmarks.md, twenty-third session). A bucket's ``take`` lets
        a large amount run it into debt; ``take(0)`` then waits until the debt is paid (and
        the site's share has been asked for, when it is due: the piece is sized by it)."""
        buckets = (self.upstream_bucket, self.site_share)
        for bucket in buckets:
            await bucket.take(0)
        rates = [rate for rate in (self.upstream_bucket.rate, self.site_share.rate) if rate > 0]
        seconds = min(_CAPPED_PIECE_MAX_SECONDS, max(_CAPPED_PIECE_SECONDS, seconds))
        length = min(remaining, max(_CAPPED_PIECE_MIN, int(min(rates, default=0) * seconds)))
        for bucket in buckets:
            await bucket.take(length)
            await bucket.take(0)
        return length

    async def _land_upstream_chunk(self, transfer: SwarmTransfer, arrival: Arrival) -> None:
        """Verifies a complete chunk from the upstream and writes it (unless it is here already)."""
        index = arrival.index
        digest = hashlib.sha256(arrival.buffer).digest()
        expected = transfer.hashes[index]
        if expected is None:
            transfer.hashes[index] = digest  # we are the lease holder: our map for peers
        elif digest != expected:
            self.metrics.verification_failures.labels("upstream").inc()
            raise VerificationError(f"chunk {index} of {transfer.digest} from the upstream failed")
        if index not in transfer.have:
            offset, length = transfer.bounds(index)
            await trio.to_thread.run_sync(_pwrite_all, transfer.fd, arrival.buffer, offset)
            transfer.have.set(index)
            transfer.upstream_bytes += length
            self.metrics.fetched_bytes.labels("upstream").inc(length)
            for request in transfer.inflight.get(index, {}).values():
                request.cancel()  # a peer asked for it too (a reader's rescue): not needed any more
        transfer.last_progress = time.monotonic()
        arrival.verified = True
        _close_arrival(transfer, arrival)

    def have_header(self, digest: Digest) -> str | None:
        transfer = self.transfers.get(digest)
        if transfer is None:
            return None
        return base64.b64encode(transfer.have.to_bytes()).decode()


def _feeder(arrival: Arrival) -> Callable[[int], None]:
    """The progress callback of a chunk fetched from a peer, run in the worker thread reading
    it: counts the bytes in, and wakes the chunk's relays in the event loop every
    ``_RELAY_STEP`` (or ``_RELAY_TICK`` while bytes trickle) when there are any, so a chunk
    nobody relays costs no wake-up."""
    token = trio.lowlevel.current_trio_token()

    def progress(received: int) -> None:
        before, arrival.received = arrival.received, received
        if arrival.relays and (received // _RELAY_STEP > before // _RELAY_STEP
                               or time.monotonic() - arrival.notified_at >= _RELAY_TICK):
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(arrival.notify)

    return progress


def _close_arrival(transfer: SwarmTransfer, arrival: Arrival) -> None:
    """The fetch of an arriving chunk (from the upstream or a peer) ended: verified, its relays
    send the rest; otherwise (a failure, a cancel) they are cut short."""
    if not arrival.verified:
        arrival.failed = True
    arrival.notify()
    if transfer.arrivals.get(arrival.index) is arrival:
        del transfer.arrivals[arrival.index]


def _claims(transfer: SwarmTransfer, index: int, node: str) -> bool:
    """Whether ``node``'s last known bitmap says it has chunk ``index``."""
    known = transfer.sources.get(node)
    return known is not None and index in known


def _route(transfer: SwarmTransfer, index: int, node: str) -> str:
    """How a chunk request to ``node`` finds the chunk there, in the debug log's words: a copy it
    claimed, its range holder's arrival, or a node of its relay tree that receives it now."""
    if _claims(transfer, index, node):
        return "claimed"
    return "range holder" if node in transfer.lessees else "relay tree"


def _pwrite_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written

