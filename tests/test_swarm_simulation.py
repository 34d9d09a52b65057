"""A 1,000-node swarm simulated in discrete rounds, on the real pure classes.

Nothing here opens a socket or runs trio. Every node runs the transfer loop of
``p2pd.swarm.engine.Swarm.run_transfer`` in simplified form:

- it announces its bitmap to the digest's coordinator, chosen by ``rendezvous.coordinators``
  over the member list (a real ``CoordinatorState``), on schedule, or early when no chunk
  came for a third of ``stuck_after``;
- it learns holders and the site's lease holder from the reply, and fresher bitmaps from
  the have-hints on chunk responses;
- it plans chunk requests with ``plan_requests`` (rarest first, same site first, the lease
  holder as the fallback source, for the chunks just past what it is known to have);
- the lease holder fetches from the upstream; a node without progress for ``stuck_after``
  fetches from the upstream itself.

The announcement interval, the stuck timeout and the request limits come from a real
``Swarm`` and the default ``SwarmConfig``, so the simulation follows the product; the loop
itself is a model of the engine's, whose scheduling is tested at the end of this file by
running the real ``Swarm.run_transfer`` over a fake transport on a mock clock.
A round is ``ROUND`` seconds: a peer serves at most ``max_uploads`` chunks per round
(429 beyond, with the requester retrying that peer after Retry-After), and a request for
a chunk the peer is still fetching waits up to ``CHUNK_WAIT`` seconds, as the peer
endpoint does. Run with ``-s`` to see the numbers.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import random
import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
import trio
import trio.testing

from p2pd.config import SwarmConfig
from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE, SMALLEST_AUTO_CHUNK, ChunkHasher, ChunkMap
from p2pd.oci.digest import Digest
from p2pd.swarm.coordinator import DEFAULT_MAX_RANGES, CoordinatorState, leases_at_once, split_ranges
from p2pd.swarm.engine import Swarm, SwarmTransfer
from p2pd.swarm.grants import GrantStore
from p2pd.swarm.membership import Member
from p2pd.swarm.messages import MAX_HOLDERS, Announce, Reply, encode
from p2pd.swarm.peers import PeerError
from p2pd.swarm.planning import Bitmap, lessee_view, plan_requests
from p2pd.swarm.rendezvous import coordinators, rank

ROUND = 0.25  # simulated seconds per round
CHUNKS = 16  # a 16 MiB layer in 1 MiB chunks
_AT_ONCE = leases_at_once(2**20, DEFAULT_MAX_RANGES)  # a site's range leases live at once
UPSTREAM_CHUNKS_PER_ROUND = 4  # 16 MiB/s from the upstream (or the seed)
CHUNK_WAIT = 2.0  # the peer endpoint waits this long for a chunk in flight
RETRY_AFTER = 1.0  # what a busy peer answers
MAX_ROUNDS = 1200  # five simulated minutes: a bound, never reached


class _Members:
    """The member table a real ``Swarm`` reads (``live``), with ``n`` members."""

    def __init__(self, members: list[Member]) -> None:
        self._members = members

    def live(self) -> list[Member]:
        return self._members


def _product_swarm(n: int) -> Swarm:
    """A real Swarm over ``n`` members: the source of intervals and limits for the simulation."""
    config = SwarmConfig()
    members = [Member(f"node-{i:04d}", f"10.0.0.1:{i}", "s") for i in range(n)]
    return Swarm(
        me=members[0],
        membership=_Members(members),
        client=None,
        metrics=None,  # type: ignore[arg-type]
        chunk_size=config.chunk_size,
        lease_ttl=config.lease_ttl,
        coordinator_backups=config.coordinator_backups,
        peer_timeout=config.peer_timeout,
        max_parallel_chunks=config.max_parallel_chunks,
        max_requests_per_peer=config.max_requests_per_peer,
        ban_seconds=config.ban_seconds,
        grants=GrantStore(Path("/nonexistent/peer-grants")),  # nothing is protected in the simulation
    )


@dataclass(eq=False)
class _Node:
    id: str
    site: str
    have: Bitmap
    mask: int = 0  # ``have`` as an int, for cheap filtering
    known: dict[str, Bitmap] = field(default_factory=dict)
    known_mask: dict[str, int] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)
    leased: bool = False
    lessee: str | None = None
    ranges: tuple[tuple[int, int], ...] = ()  # our range leases
    ranges_told: tuple[tuple[int, int], ...] = ()  # the leases whose completion was announced at once
    lessees: dict[str, tuple[int, int]] = field(default_factory=dict)  # the site's other range holders
    upstream_running: bool = False
    next_announce: float = 0.0
    announced_at: float = 0.0
    last_progress: float = 0.0
    retry_at: dict[str, float] = field(default_factory=dict)
    requested: set[int] = field(default_factory=set)
    busy: Counter[str] = field(default_factory=Counter)
    done_at: float | None = None
    announcements: int = 0
    reply_bytes: int = 0  # the coordinator's replies to it, encoded
    chunk_requests: int = 0
    upstream_chunks: int = 0
    peer_chunks: Counter[str] = field(default_factory=Counter)
    longest_wait: float = 0.0  # the longest time without a new chunk

    def set(self, index: int) -> None:
        self.have.set(index)
        self.mask |= 1 << (CHUNKS - 1 - index)

    def progress(self, now: float) -> None:
        self.longest_wait = max(self.longest_wait, now - self.last_progress)
        self.last_progress = now


@dataclass
class Result:
    n: int
    sites: int
    rounds: int
    seconds: float
    announcements: list[int]
    chunk_requests: list[int]
    upstream_nodes: dict[str, list[str]]  # site -> nodes that fetched from the upstream
    upstream_chunks: int
    coordinator_load: Counter[str]
    peak_announcements_per_second: int
    reply_bytes: list[int]  # per node: the coordinator's replies to it, encoded
    peak_reply_bytes_per_second: int  # the coordinator's busiest second, in reply bytes
    sources_per_node: list[int]
    refused: int
    longest_wait: float
    stuck_after: float

    def line(self) -> str:
        ann = self.announcements
        return (
            f"N={self.n:5d} sites={self.sites}: all done after {self.seconds:5.1f} s; announcements per node "
            f"mean {sum(ann) / len(ann):.2f} max {max(ann)}; chunk requests per node mean "
            f"{sum(self.chunk_requests) / self.n:.1f}; upstream fetches per site "
            f"{sorted(len(v) for v in self.upstream_nodes.values())}, upstream chunks {self.upstream_chunks} "
            f"({self.upstream_chunks / CHUNKS:.2f} blobs); coordinator peak {self.peak_announcements_per_second}"
            f" announcements/s, {self.peak_reply_bytes_per_second / 1e6:.2f} MB/s of replies (per node per pull "
            f"{sum(self.reply_bytes) / len(self.reply_bytes) / 1e3:.1f} kB); peers per node min "
            f"{min(self.sources_per_node)}; 429s {self.refused}; longest wait "
            f"for a chunk {self.longest_wait:.1f} s (stuck after {self.stuck_after:.0f} s)"
        )


class Simulation:
    def __init__(self, n: int, *, sites: int = 1, seed: int = 0, start_spread: float = 0.5) -> None:
        self.rng = random.Random(seed)
        self.swarm = _product_swarm(n)
        config = SwarmConfig()
        self.stuck_after = self.swarm.stuck_after
        self.stalled = self.stuck_after / 3
        self.max_parallel = config.max_parallel_chunks
        self.max_per_peer = config.max_requests_per_peer
        self.max_uploads = config.max_uploads
        self.lease_ttl = config.lease_ttl
        self.digest = Digest("sha256", hashlib.sha256(f"layer-{seed}".encode()).hexdigest())
        self.nodes = {f"node-{i:04d}": _Node(f"node-{i:04d}", f"site-{i % sites}", Bitmap(CHUNKS)) for i in range(n)}
        self.sites = sites
        for node in self.nodes.values():
            node.next_announce = self.rng.uniform(0, start_spread)  # a cold burst: everyone at once
            node.last_progress = node.next_announce
        self.coordinator_id = coordinators(str(self.digest), self.nodes, 1)[0]
        self.states: dict[str, CoordinatorState] = {}
        self.load: Counter[str] = Counter()
        self.per_second: Counter[int] = Counter()
        self.reply_bytes_per_second: Counter[int] = Counter()
        self.pending: dict[str, list[tuple[_Node, int, float]]] = {}  # source -> waiting requests
        self.refused = 0
        self._bitmaps: dict[bytes | None, tuple[Bitmap, int]] = {}

    # ---- messages ---------------------------------------------------------------------

    def _announce(self, node: _Node, now: float, *, complete: bool = False) -> Reply:
        message = Announce(
            self.digest,
            node.id,
            f"{node.id}:7000",
            node.site,
            CHUNKS * 2**20,
            2**20,
            complete,
            None if complete else node.have.to_bytes(),
            not complete,
            leased=node.leased and not complete,
            upstream_bytes=node.upstream_chunks * 2**20,  # as a real node says what it fetched
            compact=True,  # as every node of this version reads its replies
        )
        node.announcements += 1
        state = self.states.setdefault(self.coordinator_id, CoordinatorState(lease_ttl=self.lease_ttl))
        self.load[self.coordinator_id] += 1
        self.per_second[int(now)] += 1
        reply = state.announce(message, now)
        # What the coordinator's link carries for it (the message, without HTTP, TLS and TCP).
        size = len(encode(reply))
        node.reply_bytes += size
        self.reply_bytes_per_second[int(now)] += size
        return reply

    def _absorb(self, node: _Node, reply: Reply) -> None:
        # As the engine does: the ranges this node fetches, and who fetches the others.
        node.ranges = reply.ranges if reply.granted else ()
        node.leased = bool(node.ranges)
        node.lessee = reply.lease_holder
        node.lessees = {lease.node: (lease.first, lease.last) for lease in reply.lessees if lease.node != node.id}
        for peer in reply.holders:
            if peer.node == node.id:
                continue
            node.sites[peer.node] = peer.site
            node.known[peer.node], node.known_mask[peer.node] = self._bitmap(None if peer.complete else peer.have)

    def _bitmap(self, have: bytes | None) -> tuple[Bitmap, int]:
        # Bitmaps from replies are only read, so equal ones are shared (it keeps the simulation fast).
        cached = self._bitmaps.get(have)
        if cached is None:
            bitmap = Bitmap.full(CHUNKS) if have is None else Bitmap(CHUNKS, have)
            mask = int.from_bytes(bitmap.to_bytes(), "big") >> (8 - CHUNKS % 8) % 8
            cached = self._bitmaps[have] = (bitmap, mask)
        return cached

    # ---- one round --------------------------------------------------------------------

    def _plan(self, node: _Node, now: float, inbox: dict[str, list[tuple[_Node, int, float]]]) -> None:
        room = self.max_parallel - sum(node.busy.values())
        if room <= 0:
            return
        needed = [i for i in range(CHUNKS) if i not in node.have and i not in node.requested]
        if not needed:
            return
        needed_mask = sum(1 << (CHUNKS - 1 - i) for i in needed)
        # Sources without any needed chunk cannot be planned: leaving them out changes nothing.
        sources = {
            peer: node.known[peer]
            for peer, mask in node.known_mask.items()
            if mask & needed_mask and node.retry_at.get(peer, 0.0) <= now
        }
        for lessee, (first, last) in node.lessees.items():
            if node.retry_at.get(lessee, 0.0) > now:
                continue
            # As the engine does: what a range holder is known to have, plus the next few
            # chunks of its range (it fetches in order and its endpoint waits for them).
            sources[lessee] = lessee_view(node.known.get(lessee), CHUNKS, first, last, len(node.lessees))
        if not sources:
            return
        same_site = [peer for peer in sources if node.sites.get(peer, self.nodes[peer].site) == node.site]
        plan = plan_requests(
            needed,
            sources,
            busy=node.busy,
            max_per_source=self.max_per_peer,
            limit=room,
            preferred=same_site,
            fallback=list(node.lessees),
            rng=self.rng,
        )
        for request in plan:
            node.requested.add(request.index)
            node.busy[request.source] += 1
            node.chunk_requests += 1
            inbox.setdefault(request.source, []).append((node, request.index, now))

    def _release(self, node: _Node, index: int, source: str) -> None:
        node.requested.discard(index)
        node.busy[source] -= 1

    def _serve(self, now: float, inbox: dict[str, list[tuple[_Node, int, float]]]) -> list[tuple[_Node, int, str]]:
        deliveries: list[tuple[_Node, int, str]] = []
        for source_id in sorted(set(inbox) | set(self.pending)):
            source = self.nodes[source_id]
            waiting = self.pending.pop(source_id, [])
            arrivals = inbox.get(source_id, [])
            self.rng.shuffle(arrivals)
            uploads = 0
            for requester, index, since in waiting:  # already admitted: served as soon as the chunk is here
                if index in source.have:
                    uploads += 1
                    deliveries.append((requester, index, source_id))
                elif now - since < CHUNK_WAIT:
                    self.pending.setdefault(source_id, []).append((requester, index, since))
                else:
                    self._missing(requester, index, source_id, now)
            for requester, index, since in arrivals:
                if uploads >= self.max_uploads:
                    self.refused += 1
                    requester.retry_at[source_id] = now + RETRY_AFTER
                    self._release(requester, index, source_id)
                elif index in source.have:
                    uploads += 1
                    deliveries.append((requester, index, source_id))
                elif source.done_at is None:  # still fetching it: wait for the chunk
                    self.pending.setdefault(source_id, []).append((requester, index, since))
                else:
                    self._missing(requester, index, source_id, now)
        return deliveries

    def _missing(self, requester: _Node, index: int, source_id: str, now: float) -> None:
        requester.retry_at[source_id] = now + 0.2
        if source_id not in requester.lessees:
            requester.known.pop(source_id, None)
            requester.known_mask.pop(source_id, None)
        self._release(requester, index, source_id)

    def _upstream(self, node: _Node, now: float) -> None:
        taken = 0
        stuck = now - node.last_progress > self.stuck_after
        mine = range(CHUNKS) if stuck else [i for first, last in node.ranges for i in range(first, last + 1)]
        for index in mine:
            if taken == UPSTREAM_CHUNKS_PER_ROUND:
                break
            if index not in node.have and index not in node.requested:
                node.set(index)
                node.upstream_chunks += 1
                node.progress(now)
                taken += 1

    def run(self) -> Result:
        active = list(self.nodes.values())
        now = 0.0
        rounds = 0
        for rounds in range(1, MAX_ROUNDS + 1):
            now = rounds * ROUND
            self.rng.shuffle(active)
            for node in active:
                # As the engine does: on schedule, or early when no chunk came for stuck_after / 3.
                stalled = node.announcements and now - max(node.last_progress, node.announced_at) >= self.stalled
                # And at once when its ranges are all here (it gets the next free one), once.
                finished = bool(node.ranges) and node.ranges != node.ranges_told and all(
                    i in node.have for first, last in node.ranges for i in range(first, last + 1))
                if finished:
                    node.ranges_told = node.ranges
                if node.next_announce <= now or stalled or finished:
                    self._absorb(node, self._announce(node, now))
                    node.announced_at = now
                    node.next_announce = now + self.swarm.announce_interval(leased=node.leased)
            for node in active:
                stuck = now - node.last_progress > self.stuck_after
                if (node.leased or stuck) and node.announcements:
                    node.upstream_running = True
                if node.upstream_running:
                    self._upstream(node, now)
            inbox: dict[str, list[tuple[_Node, int, float]]] = {}
            for node in active:
                if node.announcements:  # started
                    self._plan(node, now, inbox)
            for requester, index, source_id in self._serve(now, inbox):
                self._release(requester, index, source_id)
                if index not in requester.have:
                    requester.set(index)
                    requester.peer_chunks[source_id] += 1
                    requester.progress(now)
                source = self.nodes[source_id]
                if source.done_at is None:  # the X-P2PD-Have hint of a node still downloading
                    requester.known[source_id] = Bitmap(CHUNKS, source.have.to_bytes())
                    requester.known_mask[source_id] = source.mask
            still = []
            for node in active:
                if node.have.is_full():
                    node.done_at = now
                    self._announce(node, now, complete=True)
                else:
                    still.append(node)
            active = still
            if not active:
                break
        assert not active, f"{len(active)} nodes did not finish in {MAX_ROUNDS} rounds"
        upstream: dict[str, list[str]] = {f"site-{s}": [] for s in range(self.sites)}
        for node in self.nodes.values():
            if node.upstream_chunks:
                upstream[node.site].append(node.id)
        nodes = list(self.nodes.values())
        return Result(
            len(nodes),
            self.sites,
            rounds,
            now,
            [n.announcements for n in nodes],
            [n.chunk_requests for n in nodes],
            upstream,
            sum(n.upstream_chunks for n in nodes),
            self.load,
            max(self.per_second.values()),
            [n.reply_bytes for n in nodes],
            max(self.reply_bytes_per_second.values()),
            [len(n.peer_chunks) for n in nodes if not n.upstream_chunks],
            self.refused,
            max(n.longest_wait for n in nodes),
            self.stuck_after,
        )


@pytest.fixture(scope="module")
def results() -> dict[tuple[int, int], Result]:
    return {}


def _run(results: dict[tuple[int, int], Result], n: int, sites: int = 1) -> Result:
    if (n, sites) not in results:
        results[(n, sites)] = Simulation(n, sites=sites, seed=n + sites).run()
        print("\n" + results[(n, sites)].line())
    return results[(n, sites)]


@pytest.mark.parametrize("n", [100, 1000])
def test_one_upstream_fetch_per_blob_and_everyone_completes(results: dict[tuple[int, int], Result], n: int) -> None:
    result = _run(results, n)
    # The site's fetch is split into range leases: several nodes carry first copies (as many as
    # leases run at once, at least; a holder done with its range takes the next), and the blob
    # still crosses the uplink exactly once.
    assert [_AT_ONCE <= len(nodes) <= len(split_ranges(CHUNKS, DEFAULT_MAX_RANGES))
            for nodes in result.upstream_nodes.values()] == [True]
    assert result.upstream_chunks == CHUNKS
    # Nobody waited long enough for a chunk to give up on its peers and go to the upstream.
    assert result.longest_wait < result.stuck_after
    # The others assembled the blob from several peers (nearly all of them; one may get lucky
    # with a single fast source).
    several = sum(1 for count in result.sources_per_node if count >= 2)
    assert several >= 0.95 * len(result.sources_per_node)


def test_one_upstream_fetch_per_blob_per_site_with_three_sites(results: dict[tuple[int, int], Result]) -> None:
    result = _run(results, 1000, sites=3)
    ranges = len(split_ranges(CHUNKS, DEFAULT_MAX_RANGES))
    assert sorted(result.upstream_nodes) == ["site-0", "site-1", "site-2"]
    assert all(_AT_ONCE <= len(nodes) <= ranges for nodes in result.upstream_nodes.values())
    assert result.upstream_chunks == 3 * CHUNKS
    assert result.longest_wait < result.stuck_after


def test_announcements_per_pull_do_not_grow_with_the_cluster(results: dict[tuple[int, int], Result]) -> None:
    small, large = _run(results, 100), _run(results, 1000)
    mean_small = sum(small.announcements) / small.n
    mean_large = sum(large.announcements) / large.n
    print(
        f"\nannouncements per node per pull: N=100 mean {mean_small:.2f} max {max(small.announcements)}; "
        f"N=1000 mean {mean_large:.2f} max {max(large.announcements)}"
    )
    # A constant bound, whatever N: one at the start, one at the end, and a few refreshes.
    for result in (small, large):
        assert max(result.announcements) <= 30
    assert mean_large <= 1.5 * mean_small
    # Their bytes do grow with N, up to MAX_HOLDERS holders a reply: bounded, not constant
    # (docs/benchmarks.md, *Swarm at 1,000 nodes*).
    bytes_small = sum(small.reply_bytes) / small.n
    bytes_large = sum(large.reply_bytes) / large.n
    print(f"reply bytes per node per pull: N=100 {bytes_small / 1e3:.1f} kB; N=1000 {bytes_large / 1e3:.1f} kB; "
          f"coordinator's busiest second {small.peak_reply_bytes_per_second / 1e6:.2f} and "
          f"{large.peak_reply_bytes_per_second / 1e6:.2f} MB")
    assert bytes_large <= (MAX_HOLDERS / 100 + 1) * bytes_small
    # Every announcement of a digest goes to one coordinator, which no other digest loads.
    assert len(large.coordinator_load) == 1


def test_coordinator_load_is_spread_over_the_members() -> None:
    """Balls into bins: each digest is coordinated by one member, chosen by rendezvous hashing."""
    for n, digests, bound in ((100, 2000, 2.5), (1000, 1000, 8.0)):
        members = [f"node-{i:04d}" for i in range(n)]
        keys = [str(Digest("sha256", hashlib.sha256(f"blob-{i}".encode()).hexdigest())) for i in range(digests)]
        load = Counter(coordinators(key, members, 1)[0] for key in keys)
        mean = digests / n
        ratio = max(load.values()) / mean
        rng = random.Random(n)
        uniform = Counter(rng.choice(members) for _ in keys)
        baseline = max(uniform.values()) / mean
        print(
            f"\ncoordinator load N={n}, {digests} digests: max {max(load.values())} mean {mean:.1f} "
            f"max/mean {ratio:.2f} (uniform random assignment: {baseline:.2f}); "
            f"{len(load)} of {n} members coordinate"
        )
        assert ratio < bound
        assert ratio <= 1.5 * baseline  # as even as a random assignment


# ---- the real engine over a fake transport, on a mock clock ---------------------------
#
# ``Swarm.run_transfer`` itself (not a model of it), with announcements delivered to
# in-memory ``CoordinatorState``s and the upstream fed by a fake that takes simulated time.

_CHUNK = 64 * 1024


class _FakeMembership:
    def __init__(self, me: Member, others: list[Member]) -> None:
        self.me = me
        self.others = others

    def live(self) -> list[Member]:
        return [self.me, *self.others]

    def is_usable(self, node_id: str) -> bool:
        return True

    def get(self, node_id: str) -> Member | None:
        return next((m for m in self.others if m.node_id == node_id), None)

    def success(self, node_id: str) -> None:
        pass

    def failure(self, node_id: str, *, began: float | None = None) -> bool:
        return False


class _FakeClient:
    """Routes announcements to the coordinator states by address; dead addresses fail."""

    def __init__(self, states: dict[str, CoordinatorState]) -> None:
        self.states = states
        self.dead: set[str] = set()
        self.hung: set[str] = set()  # addresses that never answer
        self.sent: Counter[str] = Counter()
        self.announced_at: dict[str, list[float]] = {}  # by sending node

    async def announce(self, address: str, message: Announce) -> Reply:
        await trio.sleep(0.001)
        if address in self.dead:
            raise PeerError(f"{address}: connection refused")
        if address in self.hung:
            await trio.sleep_forever()
        self.sent[address] += 1
        self.announced_at.setdefault(message.node, []).append(trio.current_time())
        return self.states[address].announce(message, trio.current_time())

    async def fetch_chunk(self, address: str, digest: Digest, start: int, length: int, grant: str | None = None,
                          **_kwargs: object) -> NoReturn:
        raise PeerError(f"{address}: connection refused")  # no peer serves chunks here

    async def chunk_map(self, address: str, digest: Digest, grant: str | None = None) -> NoReturn:
        raise PeerError(f"{address}: connection refused")


def _engine(
    monkeypatch: pytest.MonkeyPatch, members: int, digest: Digest, coordinator_count: int, *,
    coordinating: bool = False, max_ranges: int = 1,
) -> tuple[Swarm, _FakeClient, list[Member]]:
    """A real Swarm for node "lessee" among ``members``, whose digest's coordinators are others
    (``coordinating``: "lessee" is the coordinator, and every other node has a state)."""
    import p2pd.swarm.engine as engine_module
    from p2pd.metrics import AgentMetrics

    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(monotonic=trio.current_time))

    # Disk writes of 64 KiB in the test's own thread: a worker thread would let the mock
    # clock jump ahead while it runs.
    async def run_inline(function, *args):  # type: ignore[no-untyped-def]
        return function(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_inline)
    config = SwarmConfig()
    me = Member("lessee", "10.0.0.1:7000", "s")
    others = [Member(f"node-{i:04d}", f"10.0.1.{i % 250}:{7000 + i}", "s") for i in range(members - 1)]
    ranking = coordinators(str(digest), [m.node_id for m in [me, *others]], coordinator_count)
    assert (ranking[0] == "lessee") if coordinating else ("lessee" not in ranking)
    by_id = {m.node_id: m for m in others}
    # One range by default: these tests follow the single lease of a site through coordinator failures.
    client = _FakeClient({by_id[node].address: CoordinatorState(lease_ttl=config.lease_ttl, max_ranges=max_ranges,
                                                                node_id=node)
                          for node in (by_id if coordinating else ranking)})
    swarm = Swarm(
        me=me,
        membership=_FakeMembership(me, others),
        client=client,  # type: ignore[arg-type]
        metrics=AgentMetrics(),
        chunk_size=_CHUNK,
        lease_ttl=config.lease_ttl,
        coordinator_backups=config.coordinator_backups,
        peer_timeout=config.peer_timeout,
        max_parallel_chunks=config.max_parallel_chunks,
        max_requests_per_peer=config.max_requests_per_peer,
        ban_seconds=config.ban_seconds,
        grants=GrantStore(Path("/nonexistent/peer-grants")),  # nothing is protected in the simulation
    )
    return swarm, client, [by_id[node] for node in ranking if node != "lessee"]


def _digest_coordinated_elsewhere(label: bytes) -> Digest:
    """A digest whose coordinator, among "lessee" and 4 others, is not "lessee" (``_engine``'s node)."""
    members = ["lessee", *(f"node-{i:04d}" for i in range(4))]
    return next(d for d in (Digest("sha256", hashlib.sha256(label + b"%d" % i).hexdigest()) for i in range(100))
                if coordinators(str(d), members, 1) != ["lessee"])


def _recording_upstream(data: bytes):  # type: ignore[no-untyped-def]
    """An upstream that answers every range at once, and the list of the ranges it was asked."""
    asked: list[tuple[int, int]] = []

    async def upstream_range(start: int, end: int, accept, on_range_ignored=None) -> None:  # type: ignore[no-untyped-def]
        asked.append((start, end))
        await accept(data[start:end + 1])

    return upstream_range, asked


def _slow_upstream(seconds_per_chunk: float, data: bytes):  # type: ignore[no-untyped-def]
    async def upstream_range(start: int, end: int, accept, on_range_ignored=None) -> None:  # type: ignore[no-untyped-def]
        for offset in range(start, end + 1, _CHUNK):
            await trio.sleep(seconds_per_chunk)
            await accept(data[offset : min(offset + _CHUNK, end + 1)])

    return upstream_range


async def _compete(
    client: _FakeClient,
    coordinators_in_order: list[Member],
    digest: Digest,
    size: int,
    granted: list[float],
    every: float,
    have: bytes = b"\xc0\x00",
) -> None:
    """Another downloader of the site (by default with a few chunks from peers) that asks for the lease."""
    holds = False
    while True:
        await trio.sleep(every)
        message = Announce(digest, "other", "10.0.9.9:7000", "s", size, _CHUNK, False, have, True, leased=holds)
        for member in coordinators_in_order:
            try:
                reply = await client.announce(member.address, message)
            except PeerError:
                continue
            if reply.granted:
                granted.append(trio.current_time())
                holds = True
            break


@pytest.mark.parametrize("members", [100, 1000, 2000, 5000])
async def test_lease_holder_keeps_its_lease_through_a_long_fetch_in_any_cluster_size(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock, members: int
) -> None:
    data = random.Random(members).randbytes(16 * _CHUNK)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    swarm, client, ranking = _engine(monkeypatch, members, digest, 3)
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        transfer = swarm.start_transfer(digest, len(data), fd, None)
        transfer.last_progress = trio.current_time()
        granted_to_other: list[float] = []
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_compete, client, ranking, digest, len(data), granted_to_other, 1.0)
            # 16 chunks at 4 s each: a 64 s fetch, much longer than the 15 s lease.
            await swarm.run_transfer(transfer, _slow_upstream(4.0, data), lambda: None)
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - started
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    sent = swarm.messages_sent
    print(
        f"\nN={members}: lease holder sent {sent} announcements in a {elapsed:.0f} s fetch "
        f"(interval {swarm.announce_interval():.2f} s); other nodes granted the lease: {granted_to_other}"
    )
    assert transfer.leased and transfer.upstream_bytes == len(data)
    assert granted_to_other == [], "a second node of the site was given the upstream lease"
    # Still a bounded number of messages: at most one per lease_ttl/3 (or per 0.25 s in small clusters).
    assert sent <= elapsed / min(swarm.announce_interval(), SwarmConfig().lease_ttl / 3) + 2


async def test_lease_holder_reclaims_its_lease_when_the_coordinator_dies(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    members = 6
    for seed in range(100):  # a blob whose coordinator and first backup are other nodes
        data = random.Random(seed).randbytes(16 * _CHUNK)
        digest = Digest("sha256", hashlib.sha256(data).hexdigest())
        ids = ["lessee", *(f"node-{i:04d}" for i in range(members - 1))]
        if "lessee" not in coordinators(str(digest), ids, 3):
            break
    swarm, client, ranking = _engine(monkeypatch, members, digest, 3)
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        transfer = swarm.start_transfer(digest, len(data), fd, None)
        transfer.last_progress = trio.current_time()
        granted_to_other: list[float] = []

        async def kill_coordinator() -> None:
            # Just before the other node's next announcement: it reaches the backup first.
            await trio.sleep(10.0)
            client.dead.add(ranking[0].address)  # the coordinator's soft state is gone with it

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_coordinator)
            nursery.start_soon(_compete, client, ranking, digest, len(data), granted_to_other, 1.0)
            await swarm.run_transfer(transfer, _slow_upstream(2.0, data), lambda: None)
            nursery.cancel_scope.cancel()
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    backup = client.states[ranking[1].address]
    print(
        f"\nafter the coordinator died: other node granted the lease at {granted_to_other}; "
        f"backup coordinator handled {client.sent[ranking[1].address]} announcements"
    )
    assert client.sent[ranking[1].address] > 0, "the backup coordinator took over"
    assert granted_to_other == [], "the backup coordinator gave a second node of the site the lease"
    assert backup.leases_granted == 1


async def test_a_stalled_node_asks_for_fresh_holders_before_it_gives_up_on_its_peers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """In a 5,000-node cluster the regular interval is 50 s; a node that gets nothing must not wait that long."""
    data = random.Random(9).randbytes(16 * _CHUNK)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    swarm, client, ranking = _engine(monkeypatch, 5000, digest, 3)
    granted: list[float] = []
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        async with trio.open_nursery() as nursery:
            # Another node of the site holds the lease (and keeps it) but never delivers a chunk.
            nursery.start_soon(_compete, client, ranking, digest, len(data), granted, 1.0, bytes(2))
            await trio.sleep(1.5)
            transfer = swarm.start_transfer(digest, len(data), fd, None)
            transfer.last_progress = started = trio.current_time()
            await swarm.run_transfer(transfer, _slow_upstream(0.1, data), lambda: None)
            nursery.cancel_scope.cancel()
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    times = [t - started for t in client.announced_at["lessee"]]
    print(
        f"\nregular interval {swarm.announce_interval():.0f} s; stuck after {swarm.stuck_after:.0f} s; "
        f"a stalled node announced at {[round(t, 1) for t in times]}"
    )
    assert granted and not transfer.leased  # the other node kept the lease all along
    assert transfer.lessee == "other"
    before_giving_up = [t for t in times if t < swarm.stuck_after]
    assert len(before_giving_up) >= 3  # at the start, and twice more while nothing came
    assert all(b - a <= swarm.stuck_after / 3 + 0.6 for a, b in itertools.pairwise(before_giving_up))
    # It went to the upstream only after stuck_after without a chunk (and got the whole blob).
    assert transfer.upstream_bytes == len(data)


async def test_the_chunks_a_local_reader_needs_next_are_requested_first(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Rarest first spreads chunks, but a stream to containerd advances only with the verified
    prefix: the two chunks after it are planned before rarer ones."""
    digest = _digest_coordinated_elsewhere(b"reader")
    swarm, _client, _ranking = _engine(monkeypatch, 5, digest, 1)
    swarm.max_parallel_chunks = 2
    count = 16
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT)
    transfer = swarm.start_transfer(digest, count * _CHUNK, fd, None)
    transfer.hashes = [b"\x00" * 32] * count  # known: no chunk map needed for planning
    transfer.have.set(0)  # the verified prefix is chunk 0
    common = Bitmap.full(count)
    for node in ("node-0001", "node-0002", "node-0003"):
        transfer.sources[node] = common  # chunks everyone has...
    rare = Bitmap(count)
    for index in range(8, count):
        rare.set(index)
    transfer.sources["node-0000"] = rare  # ...and the rare ones, which rarest-first would pick
    for node in transfer.sources:
        transfer.addresses[node] = f"{node}:7000"
    planned: list[int] = []

    async def record(transfer_: object, index: int, node: str, on_progress: object) -> None:
        planned.append(index)

    monkeypatch.setattr(swarm, "_fetch_chunk", record)
    async with trio.open_nursery() as nursery:
        await swarm._schedule_peer_requests(transfer, nursery, lambda: None)
    os.close(fd)
    assert sorted(planned) == [1, 2]


async def test_a_range_holder_that_finished_its_range_asks_for_the_next_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A range holder whose ranges are all here does not wait for its next announcement to be
    given the next range, and its upstream worker starts that range at once (it idled meanwhile).
    Alone, it fetches 4 ranges of 4 chunks at 0.1 s a chunk in one flow each, the first chunks
    4 at once: 1.3 s (2.05 s asking at its next announcement, 4.3 s with a worker that waits for
    some chunk to land before it looks at its ranges again)."""
    data = random.Random(11).randbytes(16 * _CHUNK)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    swarm, _client, _ranking = _engine(monkeypatch, 4, digest, 1, max_ranges=4)
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        hashes = tuple(hashlib.sha256(data[i:i + _CHUNK]).digest() for i in range(0, len(data), _CHUNK))
        transfer = swarm.start_transfer(digest, len(data), fd, ChunkMap(digest, len(data), _CHUNK, hashes))
        started = trio.current_time()
        with trio.fail_after(30):
            await swarm.run_transfer(transfer, _slow_upstream(0.1, data), lambda: None)
        elapsed = trio.current_time() - started
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert transfer.upstream_bytes == len(data)
    assert elapsed < 1.5


async def test_a_node_whose_request_slots_are_full_announces_once_a_second(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Announcements were a busy node's largest CPU cost: with every request slot taken (slow
    holders), a node announces once a second instead of every 0.25 s; its peers' answers carry
    their bitmaps meanwhile."""
    data = random.Random(7).randbytes(16 * _CHUNK)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    swarm, client, ranking = _engine(monkeypatch, 6, digest, 3)
    holders = [m for m in swarm.membership.live() if m.node_id != "lessee"]  # type: ignore[attr-defined]
    # Slots, not sources, must be what runs out: fewer slots than holders x requests per holder.
    swarm.max_parallel_chunks = min(swarm.max_parallel_chunks, len(holders) * swarm.max_requests_per_peer - 1)
    for holder in holders:
        message = Announce(digest, holder.node_id, holder.address, "s", len(data), _CHUNK, True, None, False)
        for member in ranking:
            await client.announce(member.address, message)
    client.announced_at.clear()

    in_flight: list[str] = []

    async def slow_chunk(address: str, *_args: object, **_kwargs: object) -> NoReturn:
        in_flight.append(address)
        await trio.sleep_forever()

    monkeypatch.setattr(client, "fetch_chunk", slow_chunk, raising=False)
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        hashes = tuple(hashlib.sha256(data[i:i + _CHUNK]).digest() for i in range(0, len(data), _CHUNK))
        transfer = swarm.start_transfer(digest, len(data), fd, ChunkMap(digest, len(data), _CHUNK, hashes))
        with trio.move_on_after(10):
            await swarm.run_transfer(transfer, _slow_upstream(1000.0, data), lambda: None)
    finally:
        os.close(fd)
    assert len(in_flight) == swarm.max_parallel_chunks  # every slot taken, none freed in 10 s
    sent = len(client.announced_at["lessee"])
    print(f"\n{sent} announcements in 10 s with every request slot busy")
    assert sent <= 12  # once a second (every 0.25 s would be 40)


async def test_a_node_waits_for_a_progressing_range_holder_past_stuck_after_but_not_forever(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The chunk our reader needs next is in another node's range lease, and that holder's range
    keeps growing, slower than stuck_after per chunk (a thin uplink): the node does not fetch
    it a second time after stuck_after. Bounded: it goes to the upstream after _LEASE_PATIENCE
    lease TTLs without a new chunk of its own (then stuck_after), whatever the holder claims."""
    from p2pd.swarm.engine import _LEASE_PATIENCE

    data = random.Random(11).randbytes(16 * _CHUNK)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    swarm, client, ranking = _engine(monkeypatch, 6, digest, 3)
    ttl = swarm.coordinator.lease_ttl
    upstream_started: list[float] = []

    async def holder() -> None:
        """Holds the site's only range and announces one more chunk every ttl/3 (it never serves)."""
        have = Bitmap(16)
        for index in range(15):
            message = Announce(digest, "other", "10.0.9.9:7000", "s", len(data), _CHUNK, False, have.to_bytes(),
                               True, leased=index > 0)
            assert (await client.announce(ranking[0].address, message)).granted
            have.set(index)
            await trio.sleep(ttl / 3)

    def upstream(start: int, end: int, accept, on_range_ignored=None):  # type: ignore[no-untyped-def]
        upstream_started.append(trio.current_time())
        return _slow_upstream(0.01, data)(start, end, accept)

    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await trio.sleep(0.1)  # the holder has its lease
            transfer = swarm.start_transfer(digest, len(data), fd, None)
            transfer.last_progress = started = trio.current_time()
            await swarm.run_transfer(transfer, upstream, lambda: None)
            nursery.cancel_scope.cancel()
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    waited = upstream_started[0] - started
    print(f"\nwent to the upstream after {waited:.1f} s (stuck_after {swarm.stuck_after:.0f} s, lease_ttl {ttl:.0f} s)")
    assert waited >= _LEASE_PATIENCE * ttl  # not after stuck_after: the holder was progressing
    assert waited <= _LEASE_PATIENCE * ttl + swarm.stuck_after + 2 * ttl / 3  # nor forever


async def test_a_blob_without_a_trusted_map_is_cut_as_every_node_cuts_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the seed's map (a registry that has none) a node cuts the blob by its size
    (chunk_size_for), as every other node does, and announces that chunk size: the
    coordinator splits the site's ranges by it."""
    digest = Digest("sha256", hashlib.sha256(random.Random(7).randbytes(16 * _CHUNK)).hexdigest())
    swarm, _client, _ranking = _engine(monkeypatch, 6, digest, 3)
    swarm.chunk_size = DEFAULT_CHUNK_SIZE
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        transfer = swarm.start_transfer(digest, 12 * 2**20, fd, None)
    finally:
        os.close(fd)
    assert (transfer.chunk_size, transfer.count) == (SMALLEST_AUTO_CHUNK, 192)  # 1 MiB would give 12 chunks
    assert swarm._announcement(transfer, digest, want_lease=True).chunk_size == SMALLEST_AUTO_CHUNK
    # Once it is complete (no transfer left), it still announces the size it used.
    swarm.finish_transfer(transfer)
    assert swarm._announcement(None, digest, complete=True, size=12 * 2**20).chunk_size == SMALLEST_AUTO_CHUNK


async def test_the_last_chunks_still_in_flight_are_asked_of_a_second_peer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Endgame: with every missing chunk requested, a chunk whose only request went to a slow
    peer is asked of another peer that has it; the first verified answer wins and the other
    request is cancelled, not waited for (it would have run until the chunk timeout)."""
    from p2pd.swarm.peers import PeerChunk

    digest = _digest_coordinated_elsewhere(b"endgame")
    swarm, _client, _ranking = _engine(monkeypatch, 5, digest, 1)
    count = 8
    data = os.urandom(count * _CHUNK)
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT)
    transfer = swarm.start_transfer(digest, count * _CHUNK, fd, None)
    transfer.hashes = [hashlib.sha256(data[i * _CHUNK:(i + 1) * _CHUNK]).digest() for i in range(count)]
    os.pwrite(fd, data[:6 * _CHUNK], 0)
    for index in range(6):
        transfer.have.set(index)  # two chunks left: 6 and 7
    crowded, other = "node-0001", "node-0002"
    transfer.sources[crowded] = Bitmap.full(count)
    transfer.sources[other] = Bitmap(count)  # it has nothing we need yet
    for node in (crowded, other):
        transfer.addresses[node] = f"{node}:7000"
    asked: list[tuple[str, int]] = []
    cancelled: list[int] = []

    async def fetch_chunk(address: str, digest_: Digest, start: int, length: int, grant: str | None = None,
                          **_kwargs: object) -> PeerChunk:
        asked.append((address.split(":")[0], start // _CHUNK))
        try:
            await trio.sleep(3600 if address.startswith(crowded) else 0.5)
        except trio.Cancelled:
            cancelled.append(start // _CHUNK)
            raise
        body = bytearray(data[start:start + length])
        return PeerChunk(body, hashlib.sha256(body).digest(), None)

    monkeypatch.setattr(swarm.client, "fetch_chunk", fetch_chunk)
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        await swarm._schedule_peer_requests(transfer, nursery, lambda: None)
        await trio.sleep(1.0)
        assert sorted(asked) == [(crowded, 6), (crowded, 7)]  # only the crowded peer had them
        transfer.sources[other] = Bitmap.full(count)  # now the other one has them too
        await swarm._schedule_peer_requests(transfer, nursery, lambda: None)
        with trio.fail_after(30):  # without the endgame: until the crowded peer's requests time out
            while not transfer.have.is_full():
                await transfer.wait_changed()
    os.close(fd)
    assert sorted(asked) == [(crowded, 6), (crowded, 7), (other, 6), (other, 7)]
    assert sorted(cancelled) == [6, 7]  # the crowded peer's requests were cancelled...
    assert trio.current_time() - started < 2.0  # ...not waited for
    assert transfer.inflight == {} and not transfer.requested and not any(transfer.busy.values())
    assert (tmp_path / "partial").read_bytes() == data


async def test_two_answers_for_one_chunk_in_the_endgame_count_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Both requests for a chunk answer at the same moment and both are verified: while the first
    is written, the second must not count it again (bytes fetched, bytes per peer) — found by the
    mDNS test, whose node fetched 1 MiB more than the image."""
    from p2pd.swarm.peers import PeerChunk

    digest = _digest_coordinated_elsewhere(b"endgame-race")
    swarm, _client, _ranking = _engine(monkeypatch, 5, digest, 1)

    async def run_in_a_moment(function, *args):  # type: ignore[no-untyped-def]
        with trio.CancelScope(shield=True):  # as a worker thread: not cancelled half way
            await trio.sleep(0.3)  # a slow disk write: the other answer arrives meanwhile
        return function(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_in_a_moment)
    count = 2
    data = os.urandom(count * _CHUNK)
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT)
    transfer = swarm.start_transfer(digest, count * _CHUNK, fd, None)
    transfer.hashes = [hashlib.sha256(data[i * _CHUNK:(i + 1) * _CHUNK]).digest() for i in range(count)]
    os.pwrite(fd, data[:_CHUNK], 0)
    transfer.have.set(0)
    for node in ("node-0001", "node-0002"):
        transfer.sources[node] = Bitmap.full(count)
        transfer.addresses[node] = f"{node}:7000"

    async def fetch_chunk(address: str, digest_: Digest, start: int, length: int, grant: str | None = None,
                          **_kwargs: object) -> PeerChunk:
        await trio.sleep(0.5)  # both answer together
        body = bytearray(data[start:start + length])
        return PeerChunk(body, hashlib.sha256(body).digest(), None)

    monkeypatch.setattr(swarm.client, "fetch_chunk", fetch_chunk)
    async with trio.open_nursery() as nursery:
        await swarm._schedule_peer_requests(transfer, nursery, lambda: None)  # chunk 1 from one peer...
        await trio.sleep(0.1)
        await swarm._schedule_peer_requests(transfer, nursery, lambda: None)  # ...and from the other
        await trio.sleep(0.1)
        assert len(transfer.inflight[1]) == 2
    os.close(fd)
    assert transfer.have.is_full() and sum(transfer.peer_bytes.values()) == _CHUNK
    assert swarm.metrics.fetched_bytes.labels("peer")._value.get() == _CHUNK
    assert (tmp_path / "partial").read_bytes() == data


async def test_a_coordinator_without_state_asks_the_member_ranked_next_once_and_never_waits_long(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """This node has just become a digest's coordinator (it outranks the one before). Three
    announcements reach it at once with nothing: one question goes to the member ranked next,
    whose range lease then stands here (nobody is granted it again), and that member grants no
    more ranges. A member ranked next that never answers delays the answer by at most 1 s."""
    ids = ["lessee", "node-0000", "node-0001", "node-0002"]
    digests = (Digest("sha256", hashlib.sha256(bytes([i])).hexdigest()) for i in range(256))
    digest, other = itertools.islice((d for d in digests if coordinators(str(d), ids, 1) == ["lessee"]), 2)
    swarm, client, ranking = _engine(monkeypatch, 4, digest, 3, coordinating=True)
    swarm.coordinator.max_ranges = 1  # the others' split (one range)
    size = 16 * _CHUNK
    old = client.states[ranking[0].address]
    assert old.announce(Announce(digest, "node-x", "10.0.9.1:7000", "s", size, _CHUNK, False, bytes(2), True),
                        trio.current_time()).granted

    def asking(node: str, blob: Digest = digest) -> Announce:
        return Announce(blob, node, f"{node}:7000", "s", size, _CHUNK, False, bytes(2), True)

    replies: list[Reply] = []

    async def ask(node: str) -> None:
        replies.append(await swarm.coordinate(asking(node)))

    async with trio.open_nursery() as nursery:
        for node in ("lessee", "node-a", "node-b"):
            nursery.start_soon(ask, node)
    assert client.sent[ranking[0].address] == 1  # one question for the three
    assert len(replies) == 3 and not any(reply.granted for reply in replies)
    assert all(reply.lease_holder == "node-x" for reply in replies)
    assert not old.announce(asking("node-y"), trio.current_time()).granted  # handed off
    # The member ranked next for another digest never answers: a new transfer after at most 1 s.
    for member in ranking:
        client.hung.add(member.address)
    started = trio.current_time()
    reply = await swarm.coordinate(asking("lessee", other))
    assert reply.granted and trio.current_time() - started <= 1.01


@pytest.mark.parametrize("answer", ["relay cut short", "not here"])
async def test_a_relay_cut_short_is_neither_a_failure_nor_a_false_claim(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock, answer: str
) -> None:
    """A range holder relayed a chunk still arriving there and the chunk stalled (or failed): by
    the time the asker gives up, the holder may have it and its bitmap say so. Found at N = 32
    with equal links: counted as a false claim, the holder was disputed and its range fetched from
    the seed a second time. A plain "not here" for a claimed chunk is still disputed."""
    from p2pd.swarm.peers import PeerMissing, PeerRelayCut

    members = ["lessee", *(f"node-{i:04d}" for i in range(4))]
    digest = next(d for d in (Digest("sha256", hashlib.sha256(b"relay-cut%d" % i).hexdigest())
                              for i in range(100)) if coordinators(str(d), members, 1) != ["lessee"])
    swarm, _client, _ranking = _engine(monkeypatch, 5, digest, 1)
    failures: list[str] = []
    monkeypatch.setattr(swarm.membership, "failure", failures.append)
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT)
    transfer = swarm.start_transfer(digest, 4 * _CHUNK, fd, None)
    transfer.hashes = [bytes(32)] * 4
    holder = "node-0001"
    transfer.sources[holder] = Bitmap(4)
    transfer.sources[holder].set(1)  # in its bitmap by now (it completed while the relay stalled)
    transfer.addresses[holder] = f"{holder}:7000"
    transfer.lessees[holder] = (0, 3)

    async def fetch_chunk(*_args: object, **_kwargs: object) -> None:
        raise PeerRelayCut("relay cut short: timeout") if answer == "relay cut short" else PeerMissing("not here")

    monkeypatch.setattr(swarm.client, "fetch_chunk", fetch_chunk)
    transfer.requested.add(1)
    transfer.busy[holder] = 1
    await swarm._fetch_chunk(transfer, 1, holder, lambda: None)
    os.close(fd)
    assert failures == []
    assert transfer.retry_at[holder] <= trio.current_time() + 0.2  # asked again soon
    if answer == "relay cut short":
        assert holder not in transfer.disputed and holder in transfer.sources
    else:
        assert holder in transfer.disputed and holder not in transfer.sources


async def test_a_chunk_claimed_only_while_it_was_asked_for_is_not_a_false_claim(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A peer answers "not here" for a chunk and gets it a moment later; its bitmap saying so
    (in another of its answers, or a coordinator's reply) reaches the asker before the "not
    here" is handled. Judged against that bitmap, the honest peer was disputed, lost its range
    lease, and the range came from the seed twice (N = 32 equal links, 1.04x egress)."""
    from p2pd.swarm.peers import PeerMissing

    members = ["lessee", *(f"node-{i:04d}" for i in range(4))]
    digest = next(d for d in (Digest("sha256", hashlib.sha256(b"late-claim%d" % i).hexdigest())
                              for i in range(100)) if coordinators(str(d), members, 1) != ["lessee"])
    swarm, _client, _ranking = _engine(monkeypatch, 5, digest, 1)
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT)
    transfer = swarm.start_transfer(digest, 4 * _CHUNK, fd, None)
    transfer.hashes = [bytes(32)] * 4
    holder = "node-0001"
    transfer.sources[holder] = Bitmap(4)  # it has nothing yet when asked
    transfer.addresses[holder] = f"{holder}:7000"
    transfer.lessees[holder] = (0, 3)

    async def fetch_chunk(*_args: object, **_kwargs: object) -> None:
        fresher = Bitmap(4)
        fresher.set(1)
        transfer.sources[holder] = fresher  # its newer bitmap arrives while the request is out
        raise PeerMissing("not here")

    monkeypatch.setattr(swarm.client, "fetch_chunk", fetch_chunk)
    transfer.requested.add(1)
    transfer.busy[holder] = 1
    await swarm._fetch_chunk(transfer, 1, holder, lambda: None)
    os.close(fd)
    assert holder not in transfer.disputed and holder in transfer.sources
    assert transfer.retry_at[holder] <= trio.current_time() + 0.2  # asked again soon


@pytest.mark.parametrize(("members", "chunk", "in_flight"), [
    (12, 64 * 1024, 16), (12, 256 * 1024, 8), (12, 512 * 1024, 4), (20, 64 * 1024, 16)])
async def test_a_node_keeps_a_blobs_request_slots_by_their_bytes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock, members: int,
    chunk: int, in_flight: int,
) -> None:
    """Sixteen chunk requests of 64 KiB in flight, as many of bigger chunks as hold 2 MiB (at
    least 4): every peer holds the whole blob and answers nothing, so the scheduler fills every
    slot it has, and no more. A site with more other nodes than a blob has ranges (20 members)
    keeps 16 as well: 24 there (a5ab90f) made thin links worse (docs/benchmarks.md, thirty-third
    session)."""
    digest = _digest_coordinated_elsewhere(b"slots")
    swarm, _client, _ranking = _engine(monkeypatch, members, digest, 1)
    asked: list[int] = []

    async def fetch_chunk(address: str, digest_: Digest, start: int, length: int, grant: str | None = None,
                          **_kwargs: object) -> NoReturn:
        asked.append(start // chunk)
        await trio.sleep_forever()

    monkeypatch.setattr(swarm.client, "fetch_chunk", fetch_chunk)
    data = os.urandom(32 * chunk)
    hasher = ChunkHasher(chunk)
    hasher.update(data)
    fd = os.open(tmp_path / "blob", os.O_RDWR | os.O_CREAT)
    transfer = swarm.start_transfer(digest, len(data), fd, hasher.finish(digest))
    for member in swarm.membership.live()[1:]:
        transfer.sources[member.node_id] = Bitmap.full(transfer.count)
        transfer.addresses[member.node_id] = member.address
    try:
        async with trio.open_nursery() as nursery:
            await swarm._schedule_peer_requests(transfer, nursery, lambda: None)
            await trio.testing.wait_all_tasks_blocked()
            assert len(asked) == len(set(asked)) == in_flight
            await swarm._schedule_peer_requests(transfer, nursery, lambda: None)  # no free slot: nothing more
            await trio.testing.wait_all_tasks_blocked()
            assert len(asked) == in_flight
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)


@pytest.mark.parametrize(("chunk", "flows"), [(64 * 1024, 4), (128 * 1024, 4), (256 * 1024, 2), (512 * 1024, 1)])
async def test_the_front_holder_fetches_up_to_half_a_mebibyte_of_first_chunks_in_requests_of_their_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, chunk: int, flows: int
) -> None:
    """The holder of a blob's first range fetches its first chunks in a request each, at once (a
    larger share of a thin uplink for what every reader needs first), but at most 512 KiB of them:
    where chunks are big few holders fetch at once, chunk 0's flow has a large share already, and
    four flows of 512 KiB took chunk 0 (a 64 MiB layer as cut until 12-07) 11 s to its holder instead of 7 s."""
    digest = _digest_coordinated_elsewhere(b"front")
    swarm, _client, _ranking = _engine(monkeypatch, 5, digest, 1)
    data = os.urandom(8 * chunk)
    hasher = ChunkHasher(chunk)
    hasher.update(data)
    fd = os.open(tmp_path / "blob", os.O_RDWR | os.O_CREAT)
    transfer = swarm.start_transfer(digest, len(data), fd, hasher.finish(digest))
    transfer.leased, transfer.ranges = True, ((0, 7),)
    upstream_range, asked = _recording_upstream(data)
    try:
        await swarm._fetch_front_from_upstream(transfer, upstream_range, lambda: None)
    finally:
        os.close(fd)
    front = [(i * chunk, (i + 1) * chunk - 1) for i in range(flows)] if flows > 1 else []
    assert sorted(asked) == front
    assert transfer.have.indexes() == [i for i in range(8) if (i * chunk, (i + 1) * chunk - 1) in front]


async def test_a_reader_that_waits_gets_its_chunk_from_the_upstream_when_no_peer_sends_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A local reader (containerd's stream) stuck at its next chunk, asked of the one peer that has
    it, which sends no byte (its uplink crowded): after ``_READER_RESCUE_AFTER`` that one chunk
    (not the blob) comes from the upstream, once, and the peer's request for it ends. N = 32
    with equal links: bench clients gave up at byte 0 after 30 s and pulled the layer from the
    seed instead. Not rescued: a chunk no peer has yet, or one whose bytes are coming."""
    from p2pd.swarm.chunkwire import Exchange
    from p2pd.swarm.engine import _READER_RESCUE_AFTER as RESCUE_AFTER
    from p2pd.swarm.peers import PeerChunk

    digest = _digest_coordinated_elsewhere(b"reader")
    swarm, _client, _ranking = _engine(monkeypatch, 5, digest, 1)
    count = 4
    data = os.urandom(count * _CHUNK)
    crowded = "node-0001"
    asked: list[int] = []
    cancelled: list[int] = []

    async def fetch_chunk(address: str, digest_: Digest, start: int, length: int, grant: str | None = None,
                          **_kwargs: object) -> PeerChunk:
        asked.append(start // _CHUNK)
        try:
            await trio.sleep(3600)
        except trio.Cancelled:
            cancelled.append(start // _CHUNK)
            raise
        raise AssertionError("unreachable")

    monkeypatch.setattr(swarm.client, "fetch_chunk", fetch_chunk)
    upstream_range, upstream_asked = _recording_upstream(data)

    def transfer_with(holding: Bitmap, name: str) -> tuple[SwarmTransfer, int]:
        swarm.transfers.pop(digest, None)
        fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT)
        transfer = swarm.start_transfer(digest, count * _CHUNK, fd, None)
        transfer.hashes = [hashlib.sha256(data[i * _CHUNK:(i + 1) * _CHUNK]).digest() for i in range(count)]
        transfer.sources[crowded] = holding
        transfer.addresses[crowded] = f"{crowded}:7000"
        return transfer, fd

    transfer, fd = transfer_with(Bitmap.full(count), "rescued")
    async with trio.open_nursery() as nursery:
        await swarm._schedule_peer_requests(transfer, nursery, lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        assert 0 in asked
        swarm._rescue_reader(transfer, RESCUE_AFTER - 0.1, nursery, upstream_range, lambda: None)
        await trio.testing.wait_all_tasks_blocked()
        assert not upstream_asked  # until then the reader waits for its peers
        swarm._rescue_reader(transfer, RESCUE_AFTER, nursery, upstream_range, lambda: None)
        swarm._rescue_reader(transfer, RESCUE_AFTER + 1, nursery, upstream_range, lambda: None)  # once per chunk
        with trio.fail_after(5):
            while 0 not in transfer.have:
                await transfer.wait_changed()
        nursery.cancel_scope.cancel()
    os.close(fd)
    assert upstream_asked == [(0, _CHUNK - 1)] and transfer.upstream_bytes == _CHUNK
    assert 0 in cancelled  # the peer's request for it ended when the chunk landed
    assert swarm.metrics.reader_rescues._value.get() == 1
    assert (tmp_path / "rescued").read_bytes()[:_CHUNK] == data[:_CHUNK]

    # Nothing to rescue: a chunk no peer has yet (its range holder's to bring), or one whose
    # bytes are coming, however slowly.
    transfer, fd = transfer_with(Bitmap(count), "not-rescued")
    async with trio.open_nursery() as nursery:
        swarm._rescue_reader(transfer, 2 * RESCUE_AFTER, nursery, upstream_range, lambda: None)
        transfer.sources[crowded] = Bitmap.full(count)
        slow = Exchange()
        slow.received = 1000
        transfer.exchanges[slow] = 0
        swarm._rescue_reader(transfer, 2 * RESCUE_AFTER, nursery, upstream_range, lambda: None)
        await trio.testing.wait_all_tasks_blocked()
    os.close(fd)
    assert upstream_asked == [(0, _CHUNK - 1)] and not transfer.rescued


async def test_a_chunk_all_the_readers_of_a_site_wait_for_is_rescued_by_its_first_ranked_nodes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Every reader of a site waits at the same chunk at once (a blob's first, at first): 26 of 32
    nodes asked the seed for a 512 KiB chunk 0 within two seconds (equal 3 Mbit/s links; in
    another run every client gave up on its agent). Of the nodes that lack the chunk, the first
    ``_RESCUERS_PER_CHUNK`` ranked for it (rendezvous, the same ranking on every node) rescue it
    after ``_READER_RESCUE_AFTER``; the others after twice that, if it is still not here."""
    from p2pd.swarm.engine import _READER_RESCUE_AFTER as RESCUE_AFTER
    from p2pd.swarm.engine import _RESCUERS_PER_CHUNK
    from p2pd.swarm.peers import PeerChunk

    members = ["lessee", *(f"node-{i:04d}" for i in range(7))]
    crowded, lacking = members[1], members[2:]

    def ranked(digest: Digest) -> list[str]:
        return rank(f"{digest}#0", ["lessee", *lacking])

    digest = next(d for d in (Digest("sha256", hashlib.sha256(b"rescuers%d" % i).hexdigest()) for i in range(200))
                  if coordinators(str(d), members, 1) != ["lessee"]
                  and ranked(d).index("lessee") >= _RESCUERS_PER_CHUNK)
    ahead = ranked(digest)[:ranked(digest).index("lessee")]  # the nodes ranked before this one
    swarm, _client, _ranking = _engine(monkeypatch, len(members), digest, 1)
    count = 4
    data = os.urandom(count * _CHUNK)

    async def fetch_chunk(address: str, digest_: Digest, start: int, length: int, grant: str | None = None,
                          **_kwargs: object) -> PeerChunk:
        await trio.sleep(3600)  # the crowded peer sends no byte
        raise AssertionError("unreachable")

    monkeypatch.setattr(swarm.client, "fetch_chunk", fetch_chunk)
    upstream_range, upstream_asked = _recording_upstream(data)

    def transfer_with(holders: list[str], name: str) -> tuple[SwarmTransfer, int]:
        swarm.transfers.pop(digest, None)
        fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT)
        transfer = swarm.start_transfer(digest, count * _CHUNK, fd, None)
        transfer.hashes = [hashlib.sha256(data[i * _CHUNK:(i + 1) * _CHUNK]).digest() for i in range(count)]
        for node in members[1:]:
            transfer.sources[node] = Bitmap.full(count) if node in holders else Bitmap(count)
            transfer.addresses[node] = f"{node}:7000"
        return transfer, fd

    async def rescued(transfer: SwarmTransfer, fd: int, *, not_yet: tuple[float, ...], at: float) -> None:
        """The reader has waited each of ``not_yet`` (no rescue), then ``at``: chunk 0 comes from
        the upstream, alone."""
        async with trio.open_nursery() as nursery:
            await swarm._schedule_peer_requests(transfer, nursery, lambda: None)
            await trio.testing.wait_all_tasks_blocked()
            for waited in not_yet:
                swarm._rescue_reader(transfer, waited, nursery, upstream_range, lambda: None)
            await trio.testing.wait_all_tasks_blocked()
            assert not upstream_asked and not transfer.rescued
            swarm._rescue_reader(transfer, at, nursery, upstream_range, lambda: None)
            with trio.fail_after(5):
                while 0 not in transfer.have:
                    await transfer.wait_changed()
            nursery.cancel_scope.cancel()
        os.close(fd)
        assert upstream_asked == [(0, _CHUNK - 1)]
        upstream_asked.clear()

    # Ranked after two other nodes that lack it: not before twice the wait.
    await rescued(*transfer_with([crowded], "waits"), not_yet=(RESCUE_AFTER, 2 * RESCUE_AFTER - 0.1),
                  at=2 * RESCUE_AFTER)
    # Once the nodes ranked before it have the chunk (sources, not lacking it), it is ranked first.
    await rescued(*transfer_with([crowded, *ahead], "rescues"), not_yet=(RESCUE_AFTER - 0.1,), at=RESCUE_AFTER)


def _site_transfer(digest: Digest, count: int, *, me: str, holders: dict[str, tuple[int, int]],
                   downloaders: list[str], fd: int = -1) -> SwarmTransfer:
    """A transfer as node ``me`` sees it: the range ``holders`` (``me`` among them or not), and
    ``downloaders`` known from their bitmaps (none complete)."""
    transfer = SwarmTransfer(digest, count * _CHUNK, _CHUNK, fd, True, [None] * count, Bitmap(count))
    transfer.leased = me in holders
    transfer.ranges = (holders[me],) if me in holders else ()
    transfer.lessees = {node: lease for node, lease in holders.items() if node != me}
    for node in [*holders, *downloaders]:
        if node != me:
            transfer.sources[node] = Bitmap(count)
            transfer.addresses[node] = f"{node}:7000"
    return transfer


@pytest.mark.parametrize(("holders", "downloaders"), [(16, 16), (2, 30), (8, 0), (4, 3)])
def test_an_arriving_chunks_relay_tree_is_the_same_at_every_node(holders: int, downloaders: int) -> None:
    """Every node computes the relay tree of a chunk arriving at its range holder alike, without
    messages: the first ``chunk_relays`` (the holder's bound) ask the holder, downloaders without
    a range before the other holders (whose uplinks carry their own arriving chunks); each other
    node asks the one that many places ahead of it, so a node passes an arriving chunk on to at
    most one more (its uplink carries about what it receives), and every node is in the tree."""
    from p2pd.swarm.planning import chunk_relays

    digest = Digest.parse("sha256:" + hashlib.sha256(b"tree").hexdigest())
    count = 4 * holders
    leases = {f"h{i:02d}": (4 * i, 4 * i + 3) for i in range(holders)}
    others = [f"d{i:02d}" for i in range(downloaders)]
    everyone = [*leases, *others]
    for index in (0, 5, count - 1):
        lessee = next(node for node, (first, last) in leases.items() if first <= index <= last)
        views = {}
        for node in everyone:
            if node == lessee:
                continue
            transfer = _site_transfer(digest, count, me=node, holders=leases,
                                      downloaders=[d for d in others if d != node])
            swarm = types.SimpleNamespace(me=Member(node, f"{node}:7000", "s"))
            downloading = [n for n, bitmap in transfer.sources.items()
                           if n not in transfer.lessees and not bitmap.is_full()]
            views[node] = Swarm._relay_parent(swarm, transfer, index, lessee, downloading)  # type: ignore[arg-type]
            assert Swarm._relay_parent(swarm, transfer, index, lessee, downloading) == views[node]  # cached
        direct = [node for node, (asks_holder, _parent) in views.items() if asks_holder]
        assert len(direct) == min(len(views), chunk_relays(holders))
        if downloaders >= len(direct):
            assert all(node.startswith("d") for node in direct)  # downloaders without a range first
        children = Counter(parent for _asks, parent in views.values() if parent is not None)
        assert all(count_ == 1 for count_ in children.values())
        assert set(children) <= set(views) and lessee not in children
        # Every node reaches the holder through its parents.
        for node in views:
            hops = 0
            while not views[node][0]:
                node = views[node][1]  # type: ignore[assignment]
                hops += 1
                assert hops <= len(views)


async def test_a_busy_node_of_a_large_site_leaves_a_new_blobs_ranges_to_the_others(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """In a site with more nodes than a blob has ranges, the blob's coordinator (its uplink
    carries the replies) asks for no range in the transfer's first second, then only once no
    other downloader of its site lacks one; a holder of another blob's unfinished range asks for
    none for 3 s. In a site no larger than a blob's ranges every node asks at once."""
    members = 20
    ids = ["lessee", *(f"node-{i:04d}" for i in range(members - 1))]
    digests = (Digest("sha256", hashlib.sha256(b"busy%d" % i).hexdigest()) for i in range(1000))
    digest, other = itertools.islice((d for d in digests if coordinators(str(d), ids, 1) == ["lessee"]), 2)
    swarm, _client, _ranking = _engine(monkeypatch, members, digest, 1, coordinating=True)
    assert members - 1 > swarm.coordinator.max_ranges
    count = 64
    transfer = _site_transfer(digest, count, me="lessee", holders={}, downloaders=[])
    transfer.started_at = trio.current_time()
    swarm.transfers[digest] = transfer

    def downloading(node: str, *, asks: bool = True) -> Reply:
        return swarm.coordinator.announce(Announce(digest, node, f"{node}:7000", "s", count * _CHUNK, _CHUNK, False,
                                                   bytes(count // 8), asks), trio.current_time())

    assert not swarm._asks_for_range(transfer)  # its first second: the others ask first
    await trio.sleep(1.0)
    assert swarm._asks_for_range(transfer)  # nobody else asked: it takes a range after all
    assert downloading("node-0000").granted and downloading("node-0001").granted
    downloading("node-0002", asks=False)  # busy with another blob's range: it asks later
    assert not swarm._asks_for_range(transfer)  # node-0002 lacks a range: it gets the next one
    await trio.sleep(swarm.coordinator.lease_ttl / 3 + 0.1)  # node-0002 stopped announcing
    downloading("node-0000")
    assert swarm._asks_for_range(transfer)

    # A node that fetches a range of another blob, and coordinates nothing.
    swarm.coordinator = CoordinatorState(lease_ttl=swarm.coordinator.lease_ttl, node_id="lessee")
    del swarm.transfers[digest]
    fetching = _site_transfer(other, count, me="lessee", holders={"lessee": (0, 3)}, downloaders=[])
    swarm.transfers[other] = fetching
    new = _site_transfer(_digest_coordinated_elsewhere(b"busy new"), count, me="lessee", holders={}, downloaders=[])
    new.started_at = trio.current_time()
    swarm.transfers[new.digest] = new
    assert not swarm._asks_for_range(new)
    for index in range(4):
        fetching.have.set(index)  # its range is done
    assert swarm._asks_for_range(new)
    fetching.have = Bitmap(count)
    await trio.sleep(3.0)
    assert swarm._asks_for_range(new)  # 3 s: it asks anyway

    # A site no larger than a blob's ranges: every node may be needed.
    small, _client, _ranking = _engine(monkeypatch, 5, _digest_coordinated_elsewhere(b"small"), 1)
    small.transfers = {other: fetching, new.digest: new}
    new.started_at = trio.current_time()
    assert small._asks_for_range(new)


async def test_a_node_sent_on_by_a_holder_asks_the_node_named_and_forgets_it_when_that_fails(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    """A 404 that names a node the chunk is relayed to (the holder's relays of it are all
    taken): the chunk is offered at that node on the next plan, although its bitmap lacks it;
    the named node not sending it (a 404 of its own, a cut relay, an error) drops the hint,
    and the node that said "not here" is not taken for a false claimant."""
    from p2pd.swarm.peers import PeerChunk, PeerMissing

    digest = _digest_coordinated_elsewhere(b"hint")
    swarm, _client, _ranking = _engine(monkeypatch, 5, digest, 1)
    count = 4
    transfer = _site_transfer(digest, count, me="lessee", holders={"node-0000": (0, 3)}, downloaders=["node-0001"])
    transfer.hashes = [hashlib.sha256(bytes([i]) * _CHUNK).digest() for i in range(count)]
    answers: dict[tuple[int, str], BaseException] = {(0, "node-0000"): PeerMissing("full", relayed_to="node-0001"),
                                                      (0, "node-0001"): PeerMissing("not yet")}

    async def fetch_chunk(address: str, digest_: Digest, start: int, length: int, grant: str | None = None,
                          **_kwargs: object) -> PeerChunk:
        raise answers[(start // _CHUNK, address.split(":")[0])]

    monkeypatch.setattr(swarm.client, "fetch_chunk", fetch_chunk)
    assert 0 not in swarm._candidate_sources(transfer)["node-0001"]
    await swarm._fetch_chunk_from(transfer, 0, "node-0000", lambda: None)
    assert transfer.relay_hints == {0: "node-0001"}
    assert 0 in swarm._candidate_sources(transfer)["node-0001"]
    assert "node-0001" in transfer.sources and 0 not in transfer.sources["node-0001"]  # its own bitmap untouched
    await swarm._fetch_chunk_from(transfer, 0, "node-0001", lambda: None)
    assert transfer.relay_hints == {} and not transfer.disputed and "node-0001" in transfer.sources
    assert transfer.tree_missed == {0}  # next, the holder itself


def test_a_chunk_our_relay_tree_parent_did_not_have_is_asked_of_its_holder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay tree is a guess every node makes alike; a parent that answers "not here" for a
    chunk (it does not fetch it now) sends the node to the chunk's holder, which relays it or
    names a node that receives it: a slot is not spent again on the same guess."""
    digest = Digest.parse("sha256:" + hashlib.sha256(b"missed").hexdigest())
    swarm = types.SimpleNamespace(me=Member("lessee", "lessee:7000", "s"))
    swarm._relay_parent = functools.partial(Swarm._relay_parent, swarm)
    transfer = _site_transfer(digest, 4, me="lessee", holders={"h": (0, 3)},
                              downloaders=[f"d{i}" for i in range(6)])
    downloaders = [f"d{i}" for i in range(6)]
    index = next(i for i in range(4)
                 if not Swarm._relay_parent(swarm, transfer, i, "h", downloaders)[0])  # type: ignore[arg-type]
    offered = Bitmap(4)
    offered.set(index)
    asks: dict[str, Bitmap] = {}
    allowed = Swarm._offered_by_holder(swarm, transfer, "h", offered, None, 0, downloaders, 3.0, 0.0, asks)  # type: ignore[arg-type]
    assert index not in allowed and any(index in chunks for chunks in asks.values())
    transfer.tree_missed.add(index)
    allowed = Swarm._offered_by_holder(swarm, transfer, "h", offered, None, 0, downloaders, 3.0, 0.0, {})  # type: ignore[arg-type]
    assert index in allowed


async def test_only_a_chunk_asked_of_a_node_that_did_not_claim_it_is_passed_on_while_it_arrives(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A chunk asked of its range holder or of a node of its relay tree (not in their bitmaps:
    it is arriving there) is open to relays here while it arrives; one a peer has complete is
    not (it comes at the rate of that peer's upload, and relays of it would only share this
    node's uplink further). The arrival ends with the fetch: verified, or cut."""
    from p2pd.swarm.peers import PeerChunk

    digest = _digest_coordinated_elsewhere(b"claimed")
    swarm, _client, _ranking = _engine(monkeypatch, 5, digest, 1)
    fd = os.open(tmp_path / "blob", os.O_RDWR | os.O_CREAT)
    transfer = _site_transfer(digest, 4, me="lessee", holders={"node-0000": (0, 3)}, downloaders=["node-0001"], fd=fd)
    data = [bytes([i]) * _CHUNK for i in range(4)]
    transfer.hashes = [hashlib.sha256(chunk).digest() for chunk in data]
    transfer.sources["node-0001"].set(1)
    opened: dict[int, bool] = {}

    async def fetch_chunk(address: str, digest_: Digest, start: int, length: int, grant: str | None = None,
                          **kwargs: object) -> PeerChunk:
        index = start // _CHUNK
        arrival = transfer.arrivals.get(index)
        opened[index] = arrival is not None and arrival.from_peer
        exchange = kwargs["exchange"]
        assert (getattr(exchange, "buffer", None) is not None) == opened[index]
        body = bytearray(data[index])
        return PeerChunk(body, hashlib.sha256(body).digest(), None, False)

    monkeypatch.setattr(swarm.client, "fetch_chunk", fetch_chunk)
    await swarm._fetch_chunk_from(transfer, 0, "node-0000", lambda: None)  # arriving at its holder
    await swarm._fetch_chunk_from(transfer, 1, "node-0001", lambda: None)  # complete there
    assert opened == {0: True, 1: False}
    assert {0, 1} <= set(transfer.have.indexes()) and not transfer.arrivals
    assert os.pread(fd, 2 * _CHUNK, 0) == data[0] + data[1]
    os.close(fd)


@pytest.mark.parametrize(("members", "first_ask_after"), [(20, 3.0), (5, 0.0)])
async def test_the_transfer_loop_asks_for_a_range_only_when_the_busy_node_rule_lets_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, autojump_clock: trio.testing.MockClock,
    members: int, first_ask_after: float,
) -> None:
    """``Swarm.run_transfer`` itself, not only the decision: in a site of 20, a node fetching
    another blob's unfinished range announces the new blob without asking for a range during
    the transfer's first 3 s, then asks, is granted the (only) range and fetches the blob. In a
    site of 5 the same node asks in its first announcement."""
    data = random.Random(members).randbytes(8 * _CHUNK)
    digest = Digest("sha256", hashlib.sha256(data).hexdigest())
    swarm, client, _ranking = _engine(monkeypatch, members, digest, 1)
    asked: list[tuple[float, bool]] = []
    deliver = client.announce

    async def announce(address: str, message: Announce) -> Reply:
        if message.digest == digest:
            asked.append((trio.current_time(), message.want_lease))
        return await deliver(address, message)

    monkeypatch.setattr(client, "announce", announce)
    busy = _site_transfer(_digest_coordinated_elsewhere(b"busy"), 16, me="lessee", holders={"lessee": (0, 7)},
                          downloaders=[])
    swarm.transfers[busy.digest] = busy  # its range unfinished throughout
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        began = trio.current_time()
        transfer = swarm.start_transfer(digest, len(data), fd, None)
        transfer.started_at = transfer.last_progress = began  # the mock clock's, as the engine's
        await swarm.run_transfer(transfer, _slow_upstream(0.1, data), lambda: None)
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    assert transfer.upstream_bytes == len(data)
    first_ask = next(at for at, wants in asked if wants) - began
    assert first_ask_after <= first_ask < first_ask_after + 1.0, asked
    assert all(not wants for at, wants in asked if at - began < first_ask_after), asked
    if first_ask_after:
        assert sum(1 for _at, wants in asked if not wants) >= 2, "it announced meanwhile, without asking"
