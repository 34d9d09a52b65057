"""The site's upstream budget: ``[swarm] site_upstream_rate`` shared by the site's nodes that
fetch from the upstream, so a site behind a thin uplink never takes more than the operator
allows, however many of its nodes hold range leases at once.

Rules/invariants:
- One member of each site keeps its budget: the site's member ranked first by rendezvous
  hashing of ``budget:<site>`` among the live members of that site (as a digest's coordinator
  is chosen), so every node of the site asks the same keeper while their views agree. No
  tracker, and no message to another site.
- A node that fetches from the upstream asks the keeper for a rate (``want``) and gets a
  grant valid ``ttl`` seconds; it uses the grant until ``ttl`` after it *sent* the request
  (no later than the keeper's own expiry), and asks again before then while it still fetches.
  A node that stops fetching releases its grant (``want = False``); a node that dies loses it
  when it expires.
- The sum of the live grants of a site never exceeds the budget: a node gets at most what
  other nodes' live grants leave free, and at most the fair share (budget ÷ nodes asking).
  A newcomer may get nothing until the others renew (within ``ttl / 3``), then each gets the
  fair share; when a node leaves, the others get its share at their next renewal.
- The budget of a site is the smallest rate its live askers are configured with (a node
  configured with a lower cap lowers it for the site; nodes without a cap do not ask).
- Memory is bounded: at most ``max_sites`` sites and ``max_nodes`` askers per site (the
  oldest are dropped; their grants expire on their own within ``ttl``).

When the keeper cannot be reached, a node takes the static share ``budget ÷ the site's live
members`` for one ``ttl``: the cap still holds once the keeper's grants expire.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .messages import BudgetGrant

__all__ = ["DEFAULT_BUDGET_TTL", "SiteBudgets", "SiteShare"]

DEFAULT_BUDGET_TTL = 2.0
_IDLE_RETRY = 0.25  # a node granted nothing asks again this soon
_BURST_SECONDS = 0.25  # the share's token bucket holds at most this much of its rate


@dataclass(slots=True)
class _Asker:
    cap: int  # the asker's configured site_upstream_rate
    granted: int
    expires: float


class SiteBudgets:
    """The keeper's pure state: ``ask(site, node, cap, want, now)`` returns the node's grant."""

    def __init__(self, *, ttl: float = DEFAULT_BUDGET_TTL, max_sites: int = 64, max_nodes: int = 4096) -> None:
        self.ttl = ttl
        self.max_sites = max_sites
        self.max_nodes = max_nodes
        self._sites: OrderedDict[str, OrderedDict[str, _Asker]] = OrderedDict()
        self.asks = 0

    def ask(self, site: str, node: str, cap: int, want: bool, now: float) -> BudgetGrant:
        self.asks += 1
        askers = self._sites.get(site)
        if askers is None:
            askers = self._sites[site] = OrderedDict()
            while len(self._sites) > self.max_sites:
                self._sites.popitem(last=False)
        else:
            self._sites.move_to_end(site)
        for gone in [n for n, a in askers.items() if a.expires <= now]:
            del askers[gone]
        askers.pop(node, None)
        if not want or cap <= 0:
            if not askers:
                self._sites.pop(site, None)
            return BudgetGrant(0, self.ttl)
        mine = askers[node] = _Asker(cap, 0, now + self.ttl)
        while len(askers) > self.max_nodes:
            askers.popitem(last=False)
        budget = min(a.cap for a in askers.values())
        taken = sum(a.granted for n, a in askers.items() if n != node)
        mine.granted = max(0, min(budget // len(askers), budget - taken))
        return BudgetGrant(mine.granted, self.ttl)

    def granted(self, site: str, now: float) -> int:
        """The sum of the live grants of ``site`` (never above its budget)."""
        return sum(a.granted for a in self._sites.get(site, {}).values() if a.expires > now)

    def sites(self) -> int:
        return len(self._sites)


# The node's side: ask(want) -> the keeper's grant, or None when no keeper answered.
AskFunction = Callable[[bool], Awaitable[BudgetGrant | None]]


class SiteShare:
    """This node's share of its site's upstream budget, as a token bucket whose rate follows the
    keeper's grants.

    Args:
        cap: the configured site budget (bytes/s); 0: no site cap (``take`` returns at once).
        ask: sends a request to the site's keeper (``Swarm.ask_budget``).
        static_share: the share to use while no keeper answers (budget ÷ live site members).
    """

    def __init__(self, cap: int, ask: AskFunction, static_share: Callable[[], int]) -> None:
        self.cap = cap
        self._ask = ask
        self._static_share = static_share
        self.rate = 0
        self._valid_until = 0.0
        self._renew_at = 0.0
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._fetching = 0
        self._lock = trio.Lock()
        self.keeper_misses = 0

    @property
    def enabled(self) -> bool:
        return self.cap > 0

    async def take(self, amount: int) -> None:
        """Waits until ``amount`` bytes may be fetched from the upstream under the site budget."""
        if self.cap <= 0:
            return
        while True:
            now = time.monotonic()
            if now >= self._renew_at:
                await self._renew()
                now = time.monotonic()
            rate = self.rate if now < self._valid_until else 0
            burst = max(1.0, rate * _BURST_SECONDS)
            self._tokens = min(burst, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            if rate > 0 and self._tokens >= min(amount, burst):
                self._tokens -= amount  # may go negative: a large piece is paid for by waiting later
                return
            wait = (min(amount, burst) - self._tokens) / rate if rate > 0 else _IDLE_RETRY
            await trio.sleep(max(0.001, min(wait, self._renew_at - now)))

    async def _renew(self) -> None:
        async with self._lock:
            if time.monotonic() < self._renew_at:
                return  # another task renewed while this one waited
            sent = time.monotonic()
            grant = await self._ask(True)
            if grant is None:
                self.keeper_misses += 1
                grant = BudgetGrant(self._static_share(), DEFAULT_BUDGET_TTL)
            self._set(grant, sent)

    def _set(self, grant: BudgetGrant, sent: float) -> None:
        if grant.rate < self.rate:
            self._tokens = min(self._tokens, grant.rate * _BURST_SECONDS)  # no burst at the old rate
        self.rate = grant.rate
        self._valid_until = sent + grant.ttl
        self._renew_at = sent + (grant.ttl / 3 if grant.rate > 0 else min(_IDLE_RETRY, grant.ttl / 3))

    def start(self) -> None:
        """An upstream fetch begins (the share is asked for at its first ``take``)."""
        self._fetching += 1

    async def stop(self) -> None:
        """An upstream fetch ended: the last one gives the share back to the site at once."""
        self._fetching = max(0, self._fetching - 1)
        if self._fetching or self.cap <= 0 or (self.rate == 0 and self._renew_at == 0.0):
            return
        self.rate, self._valid_until, self._renew_at, self._tokens = 0, 0.0, 0.0, 0.0
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await self._ask(False)
