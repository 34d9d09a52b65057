"""Soft state kept by the coordinator of a digest: who holds or downloads it, and which
node of each site holds the upstream lease.

Rules/invariants:
- State is soft: every entry expires unless refreshed by the node it describes, so a
  coordinator that restarts (or a backup that takes over) rebuilds it from announcements.
- The upstream fetch of a site is split into disjoint chunk *ranges* (at least
  ``MIN_RANGE_CHUNKS`` chunks each, at most ``max_ranges``), each leased to one node at a
  time: a node that asks for a lease gets the first range nobody holds or finished, and the
  next one when it has finished its own, while fewer than ``leases_at_once`` leases are live
  (1 MiB of chunks in flight to start with, more as the site's upstream rate shows it can).
  So several nodes carry the first copies of the blob's chunks into the site instead of one
  uplink carrying them all, and the site still fetches every chunk from the upstream once. A
  range is finished when its holder's bitmap covers it. Leases are granted only while the site
  has no complete holder, and a lease expires ``lease_ttl`` seconds after its holder's last
  announcement with progress.
  A site has one split per chunk size: nodes cut a blob by its size (``chunk_size_for``), and
  a node that cuts it otherwise (another version or configuration) gets ranges of its own
  split rather than setting the split the others' bitmaps are read against (a second copy
  from the upstream while versions are mixed, not a stalled site).
- A coordinator that learns of a digest from a node that already holds chunks or ranges has
  taken over a transfer in progress (its predecessor died, or membership changed) and does not
  know who holds which range. That node may also be the second it hears from: a node that
  joins can move the digest to itself and be the first to announce, with nothing. From the
  first such node on, for ``lease_ttl`` (holders announce well within that time), it
  gives each holder back the ranges it names (``Announce.ranges``) and grants no other
  range, so no range a holder is fetching goes to a second node (a second upstream fetch).
  A node that lists range leases another coordinator granted (``Announce.lessees``: its
  predecessor is alive but unreachable from some nodes, and a first asker may have no chunks
  yet) starts the takeover too, and the leases listed during it are kept until a lease TTL
  after it (their holders may announce only to the other coordinator).
- A takeover whose predecessor is gone (the hand-off below found nothing answering at its
  address: refused or closed, not timed out) lasts only ``lease_ttl``/3 + ``_RECLAIM_SLACK``:
  a range holder announces at least every ``lease_ttl``/3, so by then every live holder has
  named its ranges, and nobody can be announcing to the dead predecessor instead. The leases
  heard of end with it (their holders never announced here: they died too), and the free and
  the dead holders' ranges are granted then, not a lease TTL later (churn, 12-06: the killed
  coordinator's successor granted nothing for 15 s, and the last node took 27 s instead of
  16-18). A hand-off that timed out keeps the full takeover: a predecessor slow to answer may
  be overloaded and still granting (the N = 32 incident above). The member asked is the
  predecessor while this node's view still lists it; once it does not, another member is asked,
  and if nothing answers there either the takeover is short too. A predecessor that is alive
  but cut off from this node could then lease a range that this node grants as well: one more
  upstream copy of that range, never a failed pull.
- Hand-off: a coordinator that has no state for a digest first asks the member ranked next
  (``handoff`` announcement): when this coordinator has just joined, that member coordinated
  the digest until now. The member answers with its holders and the site's leases and, when the
  asker outranks it for the digest, grants no range for ``lease_ttl`` (the nodes that still
  announce there move to the new coordinator once they learn of it); the new state starts from
  its answer (``adopt``). So a joining node that announces first, with nothing, is granted a
  range nobody is fetching. The takeover above remains for a predecessor that died (nobody to
  ask).
- Claims are checked against what a node serves, by the nodes that ask it: a node that
  answered "not here" for chunks it claimed is *disputed* in the asker's next announcement.
  A disputed node is not listed as a holder, does not count as the site's complete copy and
  loses the site's lease, for ``distrust_ttl`` seconds (then its own announcements count
  again). So a member that falsely claims a complete copy or a lease stalls its site for one
  announcement round, not until ``stuck_after``. One dispute suffices (a site may have two
  nodes); a member that disputes honest nodes costs at most an extra upstream fetch per
  ``distrust_ttl``.
- A finished range is reopened when the site may have lost it: a node of the site is disputed
  (it died, or lied) or gone, and the site's other trusted holders do not cover the range. Its
  holder may have fetched it and died before any peer copied a chunk of it; the range was done,
  so nobody would fetch those chunks until every reader gave up (``stuck_after``).
- A site whose upstream ignores Range (a node says so: ``Announce.whole_blob``) fetches the blob
  in one range: every request to such an upstream brings the blob from its first byte, so each
  range holder would read the start of the blob to drop it (about half the number of ranges
  times the blob over the site's link). The split becomes one range; the lease of the range
  that starts at chunk 0 (its holder reads on to the blob's end) becomes its lease, and the
  others end (their holders gave their requests up). With no such lease, the next asker is
  granted the whole range, and fetches from byte 0 what the site lacks. A coordinator taking
  over gives the one range back to a holder that names a range from chunk 0 (granted before
  the split became one range, by a predecessor that died before it said so).
- A lease is renewed only while its holder makes progress (its bitmap grows); a holder that
  announces but fetches nothing loses the lease ``lease_ttl`` seconds after its last progress.
  Bytes arriving count too (``Announce.upstream_bytes`` grows), for at most
  ``LEASE_PATIENCE_TTLS`` lease TTLs since its last chunk landed: on a thin link a chunk can take
  longer than a TTL to reach its holder (a 1 MiB chunk at 1/16 of an 8 Mbit/s uplink: ~17 s),
  and a lease that lapsed mid-chunk was granted to another node, which fetched the range again
  while the first went on (a test site of five nodes: 1.5 copies). A holder that claims bytes
  it does not fetch keeps its lease no longer than readers wait for a lease holder anyway
  (``p2pd.swarm.engine``).
- Memory is bounded: at most ``max_digests`` digests and ``max_holders`` holders each;
  the least recently touched are dropped first.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

from p2pd.oci.digest import Digest

from .messages import MAX_HOLDERS, MAX_RANGES, Announce, PeerInfo, RangeLease, Reply
from .planning import Bitmap, chunks_within
from .rendezvous import rank

__all__ = ["DEFAULT_MAX_RANGES", "LEASE_PATIENCE_TTLS", "MIN_RANGE_CHUNKS", "CoordinatorState", "leases_at_once",
           "split_ranges"]

MIN_RANGE_CHUNKS = 2  # a range is worth one upstream request: not smaller than this


# How many of a site's range leases run at once. Each holder has one chunk in flight, and when R
# holders share the site's link each chunk (the one every reader needs next too) reaches its
# holder only after R chunks' worth of the link's time: 16 holders of 256 KiB chunks behind
# 3 Mbit/s took 11 s a chunk, readers went 20-38 s without a byte and 44 chunks were rescued from
# the seed (N = 32 equal links, a 32 MiB layer; benchmarks.md, twenty-sixth session). So a site
# starts with RANGE_FLIGHT_BYTES of chunks in flight (16 leases of 64 KiB, 4 of 256 KiB, 2 of
# 1 MiB) and runs more once its measured upstream rate brings that many chunks within
# RANGE_FLIGHT_SECONDS: on a fast link, or where each request has a rate of its own (a far
# upstream, a per-connection limit), more requests at once are more bytes: the 1,000-node
# simulation (a rate per holder) took 22 s instead of 16 with 2 leases of 1 MiB. Never fewer than
# MIN_LEASES_AT_ONCE: one holder's uplink would carry the first copy of every chunk into the site.
# The ranges stay small (a holder that dies loses only its own); the next free one goes to the
# next asker once a lease ends. A member that claims upstream bytes it did not fetch can open at
# most max_ranges leases at once, what a site had before.
RANGE_FLIGHT_BYTES = 1 << 20
RANGE_FLIGHT_SECONDS = 2.0
MIN_LEASES_AT_ONCE = 2
DEFAULT_MAX_RANGES = 16
_RATE_SPAN_MIN = 0.5  # seconds: the shortest span a site's upstream rate is measured over


def leases_at_once(chunk_size: int, max_ranges: int, upstream_rate: float = 0.0) -> int:
    """How many of a site's range leases may run at once for a blob cut in ``chunk_size`` chunks,
    given the site's measured ``upstream_rate`` (bytes a second; 0: not known yet)."""
    flight = max(RANGE_FLIGHT_BYTES, int(upstream_rate * RANGE_FLIGHT_SECONDS))
    return chunks_within(flight, chunk_size, at_least=MIN_LEASES_AT_ONCE, at_most=max_ranges)


def split_ranges(count: int, max_ranges: int) -> list[tuple[int, int]]:
    """``count`` chunks in at most ``max_ranges`` contiguous ranges of about equal size (inclusive)."""
    if count <= 0:
        return []
    parts = max(1, min(max_ranges, count // MIN_RANGE_CHUNKS))
    bounds = [count * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(parts)]

_EXPIRY_INTERVAL = 1.0  # seconds between expiry scans of one digest's holders
_RECLAIM_SLACK = 2.0  # seconds past a holder's longest gap between announcements (lease_ttl / 3)
# Lease TTLs a lease lives on bytes arriving without a chunk landing (see the rules); the engine
# waits as long for a range holder's next chunk before it goes to the upstream itself.
LEASE_PATIENCE_TTLS = 4


@dataclass(slots=True)
class _Holder:
    info: PeerInfo
    updated: float


@dataclass(slots=True)
class _Lease:
    node: str
    address: str
    expires: float
    progressed: float  # when the holder's bitmap last grew (or the lease was granted)
    chunks: int = 0  # chunks the holder had then
    first: int = 0  # the leased range of chunks (inclusive)
    last: int = -1  # -1: the whole blob (size unknown when granted)
    received: int = 0  # the holder's upstream bytes for the blob, as last announced
    landed: float | None = None  # when a chunk of the range last landed (None: the grant)


@dataclass(slots=True)
class _SiteRanges:
    ranges: list[tuple[int, int]]
    leases: dict[int, _Lease] = field(default_factory=dict)  # range index → live lease
    done: set[int] = field(default_factory=set)
    whole: bool = False  # one range: the site's upstream ignores Range (see the module's rules)
    chunk_size: int = 0
    upstream: dict[str, int] = field(default_factory=dict)  # node → its upstream bytes for the blob
    started: float | None = None  # when the first lease was granted

    def upstream_rate(self, now: float) -> float:
        """The site's upstream bytes a second since its first lease (counted over at least
        ``_RATE_SPAN_MIN``: a range of a few chunks may be done within its first round)."""
        if self.started is None:
            return 0.0
        return sum(self.upstream.values()) / max(now - self.started, _RATE_SPAN_MIN)

    def make_whole(self) -> None:
        """The split as one range, leased to the holder of the range from chunk 0 if any."""
        count = self.ranges[-1][1] + 1
        front = next((lease for lease in self.leases.values() if lease.first == 0), None)
        self.ranges, self.done, self.leases, self.whole = [(0, count - 1)], set(), {}, True
        if front is not None:
            front.last = count - 1
            self.leases[0] = front


@dataclass(slots=True)
class _DigestState:
    holders: OrderedDict[str, _Holder] = field(default_factory=OrderedDict)
    expired_at: float = float("-inf")
    # The range leases of each site, per chunk size: nodes cut a blob by its size
    # (chunk_size_for), but one of another version or configuration may cut it otherwise, and
    # its announcement must not set the split the others' bitmaps are read against.
    sites: dict[tuple[str, int], _SiteRanges] = field(default_factory=dict)
    takeover_until: float = 0.0  # until then, only a node that says it holds the lease gets it
    distrusted: dict[str, float] = field(default_factory=dict)  # node → until (its claims are ignored)
    handed_off_until: float = 0.0  # a member that outranks this one took the digest over: no grants
    predecessor_gone: bool = False  # its hand-off found nothing answering: a short takeover


class CoordinatorState:
    """Pure state machine: ``announce(message, now)`` returns the reply to send."""

    def __init__(self, *, lease_ttl: float = 15.0, holder_ttl: float = 60.0, complete_ttl: float = 1800.0,
                 max_digests: int = 20_000, max_holders: int = 4096, distrust_ttl: float | None = None,
                 max_ranges: int = DEFAULT_MAX_RANGES, node_id: str | None = None) -> None:
        self.node_id = node_id  # this coordinator's node: a hand-off pauses it only for a node that outranks it
        self.max_ranges = min(max_ranges, MAX_RANGES)
        self.lease_ttl = lease_ttl
        self.distrust_ttl = lease_ttl if distrust_ttl is None else distrust_ttl
        self.disputes = 0
        self.holder_ttl = holder_ttl
        self.complete_ttl = complete_ttl
        self.max_digests = max_digests
        self.max_holders = max_holders
        self._digests: OrderedDict[Digest, _DigestState] = OrderedDict()
        self.announcements = 0
        self.leases_granted = 0
        self._downloads_heard_at = float("-inf")  # the last announcement of another node still downloading

    def _expire(self, state: _DigestState, now: float) -> None:
        for site in state.sites.values():
            for index in [i for i, lease in site.leases.items() if lease.expires <= now]:
                del site.leases[index]
        for node in [n for n, until in state.distrusted.items() if until <= now]:
            del state.distrusted[node]
        # A holder scan costs O(holders): at most once per second per digest, not per
        # message (replies skip stale holders on their own).
        if now - state.expired_at < _EXPIRY_INTERVAL:
            return
        state.expired_at = now
        for node in [n for n, h in state.holders.items() if not self._fresh(h, now)]:
            del state.holders[node]

    def _fresh(self, holder: _Holder, now: float) -> bool:
        return now - holder.updated <= (self.complete_ttl if holder.info.complete else self.holder_ttl)

    def _takeover_span(self, state: _DigestState) -> float:
        """How long a takeover grants no free range: until every live holder has named its
        ranges when the predecessor is gone, else a lease TTL (see the module's rules)."""
        return min(self.lease_ttl, self.lease_ttl / 3 + _RECLAIM_SLACK) if state.predecessor_gone else self.lease_ttl

    def announce(self, message: Announce, now: float, *, predecessor_gone: bool = False) -> Reply:
        """The reply to ``message``. ``predecessor_gone``: the hand-off this coordinator tried
        before it handled the digest found nothing answering (used when the state is created)."""
        self.announcements += 1
        if message.handoff:
            return self._hand_off(message, now)
        if message.node != self.node_id and not message.complete and not message.gone:
            self._downloads_heard_at = now
        state = self._digests.get(message.digest)
        if state is None:
            state = self._digests[message.digest] = _DigestState(predecessor_gone=predecessor_gone)
            if _worked_elsewhere(message):
                state.takeover_until = now + self._takeover_span(state)
            while len(self._digests) > self.max_digests:
                self._digests.popitem(last=False)
        else:
            self._digests.move_to_end(message.digest)
            if message.node not in state.holders and _worked_elsewhere(message) and now >= state.takeover_until:
                # This state began with a node that had nothing (a node that just joined, and
                # whose joining moved the digest here), but the transfer was running under
                # another coordinator, whose leases are unknown here: take over from now on.
                # One takeover lasts its span from its start, however many such nodes arrive.
                state.takeover_until = now + self._takeover_span(state)
        self._expire(state, now)
        lost_holder = self._dispute(state, message, now) or (message.gone and message.node in state.holders)
        trusted = message.node not in state.distrusted

        if message.gone:
            state.holders.pop(message.node, None)
            self._release(state, message.node)
        elif message.complete or message.have is not None:
            state.holders[message.node] = _Holder(
                PeerInfo(message.node, message.address, message.site, message.complete,
                         None if message.complete else message.have), now)
            state.holders.move_to_end(message.node)
            while len(state.holders) > self.max_holders:
                state.holders.popitem(last=False)

        if lost_holder:
            self._reopen_lost_ranges(state, now)
        site = self._site(state, message)
        if site is not None and message.whole_blob and not site.whole and site.ranges:
            site.make_whole()
        have = _bitmap(message.complete, message.have, site)
        if site is not None and message.upstream_bytes > 0 and trusted \
                and (message.node in site.upstream or len(site.upstream) < self.max_holders):
            site.upstream[message.node] = max(site.upstream.get(message.node, 0), message.upstream_bytes)
        if message.complete:
            self._release(state, message.node)  # done: the blob is in the site now
        elif site is not None:
            if have is not None:
                for index, (first, last) in enumerate(site.ranges):
                    if index not in site.done and all(i in have for i in range(first, last + 1)):
                        site.done.add(index)  # this range is in the site now, whoever fetched it
                        site.leases.pop(index, None)
            for lease in list(site.leases.values()):
                if lease.node != message.node:
                    continue
                # Progress on its own range: chunks from peers do not keep a range lease alive.
                chunks = sum(1 for i in range(lease.first, lease.last + 1) if i in have) if have is not None else 0
                landed = lease.progressed if lease.landed is None else lease.landed
                if chunks > lease.chunks:
                    lease.chunks, lease.progressed, lease.landed = chunks, now, now
                elif message.upstream_bytes > lease.received and now - landed < LEASE_PATIENCE_TTLS * self.lease_ttl:
                    lease.progressed = now  # its chunk is arriving, slower than a lease TTL
                lease.received = max(lease.received, message.upstream_bytes)
                if now - lease.progressed < self.lease_ttl:
                    lease.expires = now + self.lease_ttl  # the lessee is alive and working
        site_has_copy = any(h.info.complete and h.info.site == message.site and h.info.node not in state.distrusted
                            for h in state.holders.values())
        taking_over = now < state.takeover_until
        if taking_over and trusted and site is not None and message.leased and message.want_lease \
                and not site_has_copy and not message.gone:
            self._reclaim(site, message, have, now)
        if taking_over and trusted and site is not None and message.lessees and not site_has_copy:
            # The leases its last coordinator listed. Their holders may go on announcing there
            # (this coordinator may be standing in only for the nodes that could not reach it),
            # so each lasts a lease TTL past the takeover, not one from now. Only while taking
            # over: this state's own replies, listed back to it, must not keep a dead holder's
            # lease alive. With the predecessor gone nobody announces there: a lease whose
            # holder has not named it here by the end of the takeover died with it.
            extra = 0.0 if state.predecessor_gone else self.lease_ttl
            self._adopt_leases(state, site, message.lessees, {}, now, state.takeover_until + extra)
        # While taking over, only a holder that does not name its ranges (an older node) gets a
        # free one; a node naming its ranges got back what is still its own.
        may_grant = trusted and (not taking_over or (message.leased and not message.ranges)) \
            and now >= state.handed_off_until
        mine = [lease for lease in site.leases.values() if lease.node == message.node] if site is not None else []
        if message.want_lease and not mine and site is not None and not site_has_copy and not message.gone \
                and may_grant:
            free = next((i for i in range(len(site.ranges)) if i not in site.leases and i not in site.done), None)
            at_once = leases_at_once(site.chunk_size, self.max_ranges, site.upstream_rate(now))
            if free is not None and len(site.leases) < at_once:
                first, last = site.ranges[free]
                held = site.leases[free] = _Lease(message.node, message.address, now + self.lease_ttl, now,
                                                  0, first, last, message.upstream_bytes)
                self.leases_granted += 1
                if site.started is None:
                    site.started = now
                mine = [held]
        return self._reply(state, site, message, mine if message.want_lease else [], now)

    def _reply(self, state: _DigestState, site: _SiteRanges | None, message: Announce, mine: list[_Lease],
               now: float) -> Reply:
        live = sorted(site.leases.items()) if site is not None else []
        first_lease = live[0][1] if live else None
        # Same-site holders first, complete ones first within each group, newest first among
        # equals; only the best MAX_HOLDERS are needed (O(holders), no full sort).
        ranked = enumerate(reversed(state.holders.values()))
        others = heapq.nsmallest(MAX_HOLDERS, ((h.info.site != message.site, not h.info.complete, order, h.info)
                                               for order, h in ranked
                                               if h.info.node != message.node and self._fresh(h, now)
                                               and h.info.node not in state.distrusted))
        holders = tuple(entry[3] for entry in others)
        return Reply(holders, first_lease.node if first_lease else None,
                     first_lease.address if first_lease else None, bool(mine), self.lease_ttl,
                     ranges=tuple((held.first, held.last) for held in mine),
                     lessees=tuple(RangeLease(held.node, held.address, held.first, held.last)
                                   for _index, held in live[:MAX_RANGES]),
                     compact=message.compact, site=message.site if message.compact else None)

    def answering_downloads(self, now: float) -> bool:
        """Whether other nodes downloading a blob announce here now (within a third of a lease
        TTL, within which every downloader announces): this node's uplink carries the replies."""
        return now - self._downloads_heard_at <= self.lease_ttl / 3

    def downloader_without_range(self, digest: Digest, site: str, node: str, now: float) -> bool:
        """Whether a node of ``site`` other than ``node`` announced ``digest`` here lately (within
        a third of a lease TTL), still downloading it, trusted, and holding none of its ranges: the
        next free range goes to it when it asks."""
        state = self._digests.get(digest)
        if state is None:
            return False
        leased = {lease.node for (its_site, _size), ranges in state.sites.items() if its_site == site
                  for lease in ranges.leases.values()}
        return any(h.info.site == site and h.info.node != node and not h.info.complete
                   and now - h.updated <= self.lease_ttl / 3 and h.info.node not in state.distrusted
                   and h.info.node not in leased for h in state.holders.values())

    def knows(self, digest: Digest) -> bool:
        """Whether this coordinator has state for ``digest`` (else it may be taking it over)."""
        return digest in self._digests

    def _hand_off(self, message: Announce, now: float) -> Reply:
        """A coordinator with no state for the digest asks what this one knows: the holders and
        the site's range leases. When the asker outranks this node for the digest (it joined, so
        the digest is its now), this state grants no range for a lease TTL from now on (its nodes
        move to the asker once they learn of it), so no range is leased by both. An asker ranked
        below this node got the digest's announcements from a node whose view lacks this one (a
        flap): it learns what is known here, and this state goes on granting. A digest unknown
        here is not created by the question."""
        state = self._digests.get(message.digest)
        if state is None:
            return Reply((), None, None, False, self.lease_ttl, compact=message.compact,
                         site=message.site if message.compact else None)
        self._expire(state, now)
        if self.node_id is not None and rank(str(message.digest), [message.node, self.node_id])[0] == message.node:
            state.handed_off_until = now + self.lease_ttl
        return self._reply(state, self._site(state, message), message, [], now)

    def adopt(self, message: Announce, reply: Reply, now: float) -> None:
        """Starts the state of a digest this coordinator does not know from what the member ranked
        next knew (its ``_hand_off`` reply): its holders, and its leases of ``message``'s site. A
        range a holder's bitmap covers is in the site. So a node that joins mid-pull (and moved
        the digest here) is granted a range nobody fetches, not one the running transfer leased
        under the old coordinator."""
        if message.digest in self._digests or (not reply.holders and not reply.lessees):
            return
        state = self._digests[message.digest] = _DigestState()
        while len(self._digests) > self.max_digests:
            self._digests.popitem(last=False)
        for peer in reversed(reply.holders[:self.max_holders]):  # the reply lists the best first
            state.holders[peer.node] = _Holder(peer, now)
        site = self._site(state, message)
        if site is None:
            return
        bitmaps = {peer.node: bitmap for peer in reply.holders if peer.site == message.site
                   and (bitmap := _bitmap(peer.complete, peer.have, site)) is not None}
        for index, (first, last) in enumerate(site.ranges):
            if any(all(i in have for i in range(first, last + 1)) for have in bitmaps.values()):
                site.done.add(index)
        self._adopt_leases(state, site, reply.lessees, bitmaps, now, now + self.lease_ttl)

    def _adopt_leases(self, state: _DigestState, site: _SiteRanges, lessees: tuple[RangeLease, ...],
                      bitmaps: dict[str, Bitmap], now: float, expires: float) -> None:
        """Takes in range leases another coordinator granted (as its hand-off reply, or an
        announcing node, lists them): ranges of this split that are neither in nor leased here.
        Each lasts until ``expires`` unless its holder announces here (and progresses)."""
        for lease in lessees:
            try:
                index = site.ranges.index((lease.first, lease.last))
            except ValueError:
                continue  # not a range of this split
            if index in site.done or index in site.leases or lease.node in state.distrusted:
                continue
            have = bitmaps.get(lease.node)
            chunks = sum(1 for i in range(lease.first, lease.last + 1) if i in have) if have is not None else 0
            site.leases[index] = _Lease(lease.node, lease.address, expires, now, chunks, lease.first, lease.last)

    def _site(self, state: _DigestState, message: Announce) -> _SiteRanges | None:
        """The site's ranges; made from the blob's size when a node of the site first names it."""
        key = (message.site, message.chunk_size)
        site = state.sites.get(key)
        if site is None and message.size is not None and message.chunk_size > 0:
            count = -(-message.size // message.chunk_size)
            site = state.sites[key] = _SiteRanges(split_ranges(max(count, 1), self.max_ranges),
                                                  chunk_size=message.chunk_size)
        return site

    def _reclaim(self, site: _SiteRanges, message: Announce, have: Bitmap | None, now: float) -> None:
        """A coordinator taking over gives a holder back the ranges it names (those of this
        site's split, unfinished and leased to nobody else): the range it is half way through
        is not handed to another node and fetched twice."""
        for first, last in message.ranges:
            if site.whole and first == 0:
                # Its range from chunk 0, named as granted before the split became one range (its
                # run reads on to the blob's end): the one range is its own.
                first, last = site.ranges[0]
            try:
                index = site.ranges.index((first, last))
            except ValueError:
                continue  # not a range of this split (another chunk size or an older coordinator's)
            held = site.leases.get(index)
            if index in site.done or held is not None:
                continue  # in, leased to another node, or already given back to this one
            chunks = sum(1 for i in range(first, last + 1) if i in have) if have is not None else 0
            site.leases[index] = _Lease(message.node, message.address, now + self.lease_ttl, now, chunks, first, last,
                                        message.upstream_bytes)
            self.leases_granted += 1  # granted again, by this coordinator

    def _release(self, state: _DigestState, node: str) -> None:
        for site in state.sites.values():
            for index in [i for i, lease in site.leases.items() if lease.node == node]:
                del site.leases[index]

    def _dispute(self, state: _DigestState, message: Announce, now: float) -> bool:
        """Distrusts the nodes ``message`` disputes; True when one was trusted until now."""
        newly = False
        for node in message.disputed:
            if node == message.node or (node not in state.holders and all(
                    lease.node != node for site in state.sites.values() for lease in site.leases.values())):
                continue  # nothing to take back (and a node cannot dispute itself)
            self.disputes += 1
            newly = newly or node not in state.distrusted
            state.distrusted[node] = now + self.distrust_ttl
            self._release(state, node)
            while len(state.distrusted) > self.max_holders:
                state.distrusted.pop(next(iter(state.distrusted)))
        return newly

    def _reopen_lost_ranges(self, state: _DigestState, now: float) -> None:
        """Takes back ``done`` from each finished range that the site's fresh, trusted holders no
        longer cover (their last announced bitmaps), so the next node that asks is granted it.
        A bitmap a few announcements old may reopen a range a peer just copied: one more range
        from the upstream, against a pull that fails. Runs only when a holder is lost (O(holders))."""
        for (site_name, _chunk_size), site in state.sites.items():
            if not site.done:
                continue
            count = site.ranges[-1][1] + 1
            covered = 0
            for holder in state.holders.values():
                info = holder.info
                if info.site != site_name or info.node in state.distrusted or not self._fresh(holder, now):
                    continue
                bitmap = _bitmap(info.complete, info.have, site)
                if bitmap is not None:
                    covered |= bitmap.mask()
            held = Bitmap.from_mask(count, covered)
            for index in [i for i in site.done if not all(c in held for c in range(site.ranges[i][0],
                                                                                      site.ranges[i][1] + 1))]:
                site.done.discard(index)

    def digests(self) -> int:
        return len(self._digests)


def _worked_elsewhere(message: Announce) -> bool:
    """The node holds chunks or ranges of a transfer this coordinator has not seen it in, or
    knows of range leases another coordinator granted."""
    return not message.gone and not message.complete and (
        bool(message.ranges) or bool(message.lessees) or (message.have is not None and any(message.have)))


def _bitmap(complete: bool, have: bytes | None, site: _SiteRanges | None) -> Bitmap | None:
    """A node's announced bitmap (all set for a complete copy), or None when it does not fit the blob."""
    if site is None or not site.ranges:
        return None
    count = site.ranges[-1][1] + 1
    if complete:
        return Bitmap.full(count)
    if have is None:
        return None
    try:
        return Bitmap(count, have)
    except ValueError:
        return None
