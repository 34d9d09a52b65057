"""The member table: which peers are live, fed by every discovery source.

Rules/invariants:
- One task owns the table (``Membership.run``); discovery sources hand it ``Sighting``s
  through a memory channel. Other tasks only read (``live``) or report outcomes
  (``failure``, ``success``, ``ban``), which are plain synchronous updates in trio's
  single thread.
- A sighting is only a hint: an address becomes a member after an authenticated hello
  (the peer proves it holds the cluster key and tells its node id and site), so a spoofed
  mDNS answer or a stale DNS record cannot add a member.
- A peer that fails ``suspend_after`` times in a row is suspended for ``suspend_seconds``
  and probed again afterwards; a banned peer (bad bytes) is ignored until its ban ends.
  An authenticated request from a suspended peer (``heard_from``: it restarted, or its
  trouble is over) has it probed at once, at most once per ``_INBOUND_PROBE_INTERVAL``: a
  node that restarts mid-pull is used again as soon as it answers, not after
  ``suspend_seconds`` in which its peers' views and its own disagree. A request from a node
  not in the table yet (it just started) has the unconfirmed addresses probed at once.
  mDNS goodbyes and vanished DNS records remove members found only by that source.
- One hello at a time per address, at most ``_MAX_PROBES`` at once: peers that start together
  on busy machines answer handshakes slowly, and extra hellos only add to that (N = 32 nodes on
  2 cores: hundreds of handshakes given up by their clients in the first seconds). A hello that
  fails counts against a member only when the member has not answered since the hello began:
  a slow hello from before its first answer says nothing about it now (such stale failures
  suspended a member that had just joined, for ``suspend_seconds``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from .discovery import Sighting

__all__ = ["Member", "Membership"]

log = logging.getLogger("p2pd.swarm.membership")

_PROBE_INTERVAL = 10.0  # longest wait between re-probes of an address that does not answer (seconds)
_PROBE_TICK = 0.25
_INBOUND_PROBE_INTERVAL = 1.0  # seconds between probes of a suspended peer that sends us requests
_INBOUND = "inbound"  # the sighting of a suspended peer that sent a request (not a discovery source)
_MAX_PENDING_PROBES = 16  # unconfirmed addresses probed at once when an unknown node talks to us
_MAX_PROBES = 16  # hellos in flight at once
_HELLO_TIMEOUT = 5.0  # seconds a hello may take


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    address: str  # host:port of the peer endpoint
    site: str


@dataclass(slots=True)
class _Entry:
    member: Member
    sources: set[str] = field(default_factory=set)
    failures: int = 0
    suspended_until: float = 0.0
    banned_until: float = 0.0
    inbound_probe_at: float = float("-inf")  # when its last request asked for a probe
    answered_at: float = float("-inf")  # time.monotonic() of its last answer (hello or request)


# Hello: address → (node id, site), raising on failure or bad authentication.
HelloFunction = Callable[[str], Awaitable[tuple[str, str]]]


class Membership:
    """Live peers by node id, plus our own entry.

    Args:
        me: this node.
        hello: authenticated probe of an address (``PeerClient.hello``).
        suspend_after: consecutive failures before a peer is suspended.
        suspend_seconds: how long a suspension lasts.
    """

    def __init__(self, me: Member, hello: HelloFunction, *, suspend_after: int = 3,
                 suspend_seconds: float = 30.0) -> None:
        self.me = me
        self._hello = hello
        self.suspend_after = suspend_after
        self.suspend_seconds = suspend_seconds
        self._entries: dict[str, _Entry] = {}
        self._by_address: dict[str, str] = {}
        self._pending: dict[str, set[str]] = {}  # address → sources, not yet confirmed by hello
        self._pending_probe_at = float("-inf")  # when an unknown node's request last had them probed
        self._probing: set[str] = set()  # addresses with a hello in flight (or waiting for a slot)
        self._probe_slots = trio.CapacityLimiter(_MAX_PROBES)
        self._changed = trio.Event()
        self._reprobe_work = trio.Event()  # set when an address becomes pending or a member is suspended
        send, receive = trio.open_memory_channel[Sighting](1024)
        self.sightings: trio.MemorySendChannel[Sighting] = send
        self._receive = receive

    # ---- reads ------------------------------------------------------------------------

    def live(self, now: float | None = None) -> list[Member]:
        """Members to use now (never suspended or banned ones), ourselves included."""
        now = time.monotonic() if now is None else now
        members = [self.me]
        for entry in self._entries.values():
            if entry.banned_until <= now and entry.suspended_until <= now:
                members.append(entry.member)
        return members

    def get(self, node_id: str) -> Member | None:
        if node_id == self.me.node_id:
            return self.me
        entry = self._entries.get(node_id)
        return entry.member if entry else None

    def is_usable(self, node_id: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        entry = self._entries.get(node_id)
        return entry is None or (entry.banned_until <= now and entry.suspended_until <= now)

    def known(self) -> list[tuple[Member, str, int, float, float]]:
        """(member, sources, failures, suspended_until, banned_until) for ``p2pd status``."""
        return [(e.member, ",".join(sorted(e.sources)), e.failures, e.suspended_until, e.banned_until)
                for e in self._entries.values()]

    async def wait_changed(self) -> None:
        await self._changed.wait()

    # ---- outcome reports --------------------------------------------------------------

    def success(self, node_id: str) -> None:
        entry = self._entries.get(node_id)
        if entry is not None:
            entry.failures = 0
            entry.answered_at = time.monotonic()

    def failure(self, node_id: str, *, began: float | None = None) -> bool:
        """Counts a failed request to ``node_id`` (enough in a row suspend it); True if counted.
        With ``began`` (the request's ``time.monotonic()`` start) it is not counted when the member
        answered something since: it is alive, the request met a slow moment, not a gone member."""
        entry = self._entries.get(node_id)
        if entry is None or (began is not None and entry.answered_at >= began):
            return False
        entry.failures += 1
        if entry.failures >= self.suspend_after and entry.suspended_until <= time.monotonic():
            entry.suspended_until = time.monotonic() + self.suspend_seconds
            log.info("suspending peer %s (%s) for %.0fs after %d failures", node_id, entry.member.address,
                     self.suspend_seconds, entry.failures)
            self._reprobe_work.set()
            self._notify()
        return True

    def heard_from(self, node_id: str) -> None:
        """An authenticated request came from ``node_id`` (``PeerService``): a suspended peer,
        or, for a node not in the table yet, the addresses not confirmed yet, are probed at once
        (at most once per ``_INBOUND_PROBE_INTERVAL``); a peer that answers is usable again."""
        entry = self._entries.get(node_id)
        now = time.monotonic()
        if entry is None:
            # A node we have not confirmed yet (it just started): the addresses our discovery
            # sources gave us that have not answered yet are probed now, not at their backoff
            # (up to _PROBE_INTERVAL), so the newcomer is in our view before it pulls and the
            # coordinators of its digests agree (two views: two coordinators, ranges fetched twice).
            if self._pending and now - self._pending_probe_at >= _INBOUND_PROBE_INTERVAL:
                self._pending_probe_at = now
                for address in list(self._pending)[:_MAX_PENDING_PROBES]:
                    with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                        self.sightings.send_nowait(Sighting(_INBOUND, address, None, None))
            return
        if entry.suspended_until <= now or now - entry.inbound_probe_at < _INBOUND_PROBE_INTERVAL:
            return
        entry.inbound_probe_at = now
        member = entry.member
        with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):  # a full channel: the re-probe loop
            self.sightings.send_nowait(Sighting(_INBOUND, member.address, member.node_id, member.site))

    def ban(self, node_id: str, seconds: float) -> None:
        entry = self._entries.get(node_id)
        if entry is None:
            return
        entry.banned_until = time.monotonic() + seconds
        log.warning("banning peer %s (%s) for %.0fs", node_id, entry.member.address, seconds)
        self._notify()

    def banned(self) -> int:
        now = time.monotonic()
        return sum(1 for e in self._entries.values() if e.banned_until > now)

    # ---- the owner task ---------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def add(self, member: Member, source: str) -> None:
        """Adds or refreshes a confirmed member (owner task, or tests)."""
        if member.node_id == self.me.node_id:
            return
        entry = self._entries.get(member.node_id)
        if entry is None:
            entry = self._entries[member.node_id] = _Entry(member)
            log.info("peer %s joined at %s (site %s, via %s)", member.node_id, member.address, member.site, source)
        elif entry.member != member:
            self._by_address.pop(entry.member.address, None)
            entry.member = member
        entry.sources.add(source)
        entry.failures = 0
        entry.suspended_until = 0.0
        entry.answered_at = time.monotonic()
        self._by_address[member.address] = member.node_id
        self._notify()

    def remove_address(self, address: str, source: str) -> None:
        self._pending.pop(address, None)
        node_id = self._by_address.get(address)
        if node_id is None:
            return
        entry = self._entries[node_id]
        entry.sources.discard(source)
        if not entry.sources:
            del self._entries[node_id]
            del self._by_address[address]
            log.info("peer %s left (%s)", node_id, source)
            self._notify()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Consumes sightings and probes addresses until cancelled."""
        async with trio.open_nursery() as nursery, self._receive:
            nursery.start_soon(self._reprobe_loop, nursery)
            task_status.started()
            async for sighting in self._receive:
                if sighting.gone:
                    self.remove_address(sighting.address, sighting.source)
                    continue
                known = self._by_address.get(sighting.address)
                if known is not None and known in self._entries:
                    entry = self._entries[known]
                    if sighting.source != _INBOUND:  # only discovery sources keep a member listed
                        entry.sources.add(sighting.source)
                    if entry.suspended_until > time.monotonic() or entry.failures:
                        nursery.start_soon(self._probe, sighting.address)
                    continue
                if sighting.source == _INBOUND:  # not a discovery source: only an address we were given
                    if sighting.address in self._pending:
                        nursery.start_soon(self._probe, sighting.address)
                    continue
                first = sighting.address not in self._pending
                self._pending.setdefault(sighting.address, set()).add(sighting.source)
                if first:
                    self._reprobe_work.set()
                    nursery.start_soon(self._probe, sighting.address)

    async def _probe(self, address: str) -> None:
        if address in self._probing:
            return  # its answer is on the way
        self._probing.add(address)
        began = time.monotonic()  # an answer since then (even while it waits for a slot) makes its failure stale
        try:
            async with self._probe_slots:
                with trio.fail_after(_HELLO_TIMEOUT):
                    node_id, site = await self._hello(address)
        except Exception as exc:  # any failure just leaves the address pending
            log.debug("hello to %s failed: %s", address, exc)
            known = self._by_address.get(address)
            if known is not None:
                self.failure(known, began=began)
            return
        finally:
            self._probing.discard(address)
        sources = self._pending.pop(address, set())
        known = self._by_address.get(address)
        if known is not None and known in self._entries:
            sources |= self._entries[known].sources
        for source in sources or {"probe"}:
            self.add(Member(node_id, address, site), source)

    async def _reprobe_loop(self, nursery: trio.Nursery) -> None:
        # Addresses that did not answer are retried with exponential backoff (peers that
        # start together find each other within a second), capped at _PROBE_INTERVAL; the
        # hellos run side by side, so one that hangs delays no other address. The backoff runs
        # on trio's clock (the loop's own sleeps), suspensions on time.monotonic() like the rest.
        # With nothing pending and nobody suspended it sleeps until there is: a tick four times
        # a second for nothing was most of an idle agent's wake-ups.
        backoff: dict[str, float] = {}
        next_try: dict[str, float] = {}
        while True:
            while not self._pending and not any(e.suspended_until > 0 for e in self._entries.values()):
                self._reprobe_work = trio.Event()
                await self._reprobe_work.wait()
            await trio.sleep(_PROBE_TICK)
            now = time.monotonic()
            tick = trio.current_time()
            addresses = list(self._pending)
            addresses += [e.member.address for e in self._entries.values() if 0 < e.suspended_until <= now]
            for address in addresses:
                if next_try.get(address, -math.inf) > tick or address in self._probing:
                    continue
                nursery.start_soon(self._probe, address)
                delay = min(backoff.get(address, _PROBE_TICK) * 2, _PROBE_INTERVAL)
                backoff[address] = delay
                next_try[address] = tick + delay
            for address in [a for a in backoff if a not in self._pending and a not in self._by_address]:
                backoff.pop(address, None)
                next_try.pop(address, None)

