"""Soft state kept by the coordinator of a digest: who holds or downloads it, and which
node of each site holds the upstream lease.

Rules/invariants:
- State is soft: every entry expires unless refreshed by the node it describes, so a
  coordinator that restarts (or a backup that takes over) rebuilds it from announcements.
- At most one node per (digest, site) holds the upstream lease at a time; it is granted
  only when the site has no complete holder and no live lease, and it expires
  ``lease_ttl`` seconds after the holder's last announcement.
- A coordinator that learns of a digest from a node that already holds chunks has taken
  over a transfer in progress (its predecessor died, or membership changed) and does not
  know who holds the lease. For ``lease_ttl`` it grants the lease only to a node that says
  it holds one (``Announce.leased``; the holder announces well within that time), so the
  site does not get a second upstream fetch.
- Claims are checked against what a node serves, by the nodes that ask it: a node that
  answered "not here" for chunks it claimed is *disputed* in the asker's next announcement.
  A disputed node is not listed as a holder, does not count as the site's complete copy and
  loses the site's lease, for ``distrust_ttl`` seconds (then its own announcements count
  again). So a member that falsely claims a complete copy or a lease stalls its site for one
  announcement round, not until ``stuck_after``. One dispute suffices (a site may have two
  nodes); a member that disputes honest nodes costs at most an extra upstream fetch per
  ``distrust_ttl``.
- A lease is renewed only while its holder makes progress (its bitmap grows); a holder that
  announces but fetches nothing loses the lease ``lease_ttl`` seconds after its last progress.
- Memory is bounded: at most ``max_digests`` digests and ``max_holders`` holders each;
  the least recently touched are dropped first.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

from p2pd.oci.digest import Digest

from .messages import MAX_HOLDERS, Announce, PeerInfo, Reply

__all__ = ["CoordinatorState"]

_EXPIRY_INTERVAL = 1.0  # seconds between expiry scans of one digest's holders


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


@dataclass(slots=True)
class _DigestState:
    holders: OrderedDict[str, _Holder] = field(default_factory=OrderedDict)
    expired_at: float = float("-inf")
    leases: dict[str, _Lease] = field(default_factory=dict)  # by site
    takeover_until: float = 0.0  # until then, only a node that says it holds the lease gets it
    distrusted: dict[str, float] = field(default_factory=dict)  # node → until (its claims are ignored)


class CoordinatorState:
    """Pure state machine: ``announce(message, now)`` returns the reply to send."""

    def __init__(self, *, lease_ttl: float = 15.0, holder_ttl: float = 60.0, complete_ttl: float = 1800.0,
                 max_digests: int = 20_000, max_holders: int = 4096, distrust_ttl: float | None = None) -> None:
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

    def _expire(self, state: _DigestState, now: float) -> None:
        for site in [s for s, lease in state.leases.items() if lease.expires <= now]:
            del state.leases[site]
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

    def announce(self, message: Announce, now: float) -> Reply:
        self.announcements += 1
        state = self._digests.get(message.digest)
        if state is None:
            state = self._digests[message.digest] = _DigestState()
            if message.have is not None and any(message.have):
                state.takeover_until = now + self.lease_ttl
            while len(self._digests) > self.max_digests:
                self._digests.popitem(last=False)
        else:
            self._digests.move_to_end(message.digest)
        self._expire(state, now)
        self._dispute(state, message, now)
        trusted = message.node not in state.distrusted

        if message.gone:
            state.holders.pop(message.node, None)
            lease = state.leases.get(message.site)
            if lease is not None and lease.node == message.node:
                del state.leases[message.site]
        elif message.complete or message.have is not None:
            state.holders[message.node] = _Holder(
                PeerInfo(message.node, message.address, message.site, message.complete,
                         None if message.complete else message.have), now)
            state.holders.move_to_end(message.node)
            while len(state.holders) > self.max_holders:
                state.holders.popitem(last=False)

        lease = state.leases.get(message.site)
        if lease is not None and lease.node == message.node:
            if message.complete:
                del state.leases[message.site]  # done: the blob is in the site now
                lease = None
            else:
                chunks = _count(message.have)
                if chunks > lease.chunks:
                    lease.chunks, lease.progressed = chunks, now
                if now - lease.progressed < self.lease_ttl:
                    lease.expires = now + self.lease_ttl  # the lessee is alive and working
        granted = False
        site_has_copy = any(h.info.complete and h.info.site == message.site and h.info.node not in state.distrusted
                            for h in state.holders.values())
        may_grant = trusted and (message.leased or now >= state.takeover_until)
        if message.want_lease and lease is None and not site_has_copy and not message.gone and may_grant:
            lease = state.leases[message.site] = _Lease(message.node, message.address, now + self.lease_ttl, now,
                                                        _count(message.have))
            self.leases_granted += 1
            granted = True
        elif lease is not None and lease.node == message.node and message.want_lease:
            granted = True

        # Same-site holders first, complete ones first within each group, newest first among
        # equals; only the best MAX_HOLDERS are needed (O(holders), no full sort).
        ranked = enumerate(reversed(state.holders.values()))
        others = heapq.nsmallest(MAX_HOLDERS, ((h.info.site != message.site, not h.info.complete, order, h.info)
                                               for order, h in ranked
                                               if h.info.node != message.node and self._fresh(h, now)
                                               and h.info.node not in state.distrusted))
        holders = tuple(entry[3] for entry in others)
        return Reply(holders, lease.node if lease else None, lease.address if lease else None,
                     granted, self.lease_ttl)

    def _dispute(self, state: _DigestState, message: Announce, now: float) -> None:
        for node in message.disputed:
            if node == message.node or (node not in state.holders and all(
                    lease.node != node for lease in state.leases.values())):
                continue  # nothing to take back (and a node cannot dispute itself)
            self.disputes += 1
            state.distrusted[node] = now + self.distrust_ttl
            for site in [s for s, lease in state.leases.items() if lease.node == node]:
                del state.leases[site]
            while len(state.distrusted) > self.max_holders:
                state.distrusted.pop(next(iter(state.distrusted)))

    def digests(self) -> int:
        return len(self._digests)


def _count(have: bytes | None) -> int:
    """Chunks set in an announced bitmap."""
    return 0 if have is None else sum(byte.bit_count() for byte in have)
