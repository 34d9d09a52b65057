"""Brute-force protection for logins: failed attempts per username and per source address.

Rules/invariants:
- Pure: no I/O, no threads, the clock is injected. It is used from the trio thread only (the
  authenticator checks it before asking any provider, so a locked-out caller costs no bcrypt
  or LDAP round trip) and is not thread-safe.
- A key (a username or an address) is locked when it reaches its failure limit within the
  window. The lockout starts at ``base_lockout`` and doubles with each further lockout of the
  same key, up to ``max_lockout``. A lock clears the key's failure list, so after it expires
  the key gets a fresh allowance of attempts, not a single one.
- A key's state, including how many lockouts it has had, is forgotten ``window`` seconds
  after its last failure or the end of its last lockout, whichever is later. Waiting out a
  lockout and coming straight back therefore keeps the doubling going.
- A success clears the username's state only: an attacker with one valid account must not be
  able to reset the failure count of the address it sprays from.
- Memory is bounded: at most ``max_tracked`` keys per kind. Keys are kept in order of their
  last failure; a new key first drops expired keys from the front, then the least recently
  failed one.
- Usernames are case-folded (LDAP logins are case-insensitive, so ``Alice`` and ``alice`` are
  one account to an attacker too); IPv6 addresses are grouped by /64, the block a single
  host usually has.

Per-username locking lets anyone lock a user out by failing on purpose. That is the price of
stopping a password guesser that spreads over many addresses; ``max_lockout`` bounds it.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError

__all__ = ["LoginThrottle", "ThrottleConfig"]


@dataclass(frozen=True)
class ThrottleConfig:
    """``[auth.throttle]``: how many failed logins are tolerated, and for how long one is locked out.

    Attributes:
        max_failures_per_user: failures for one username within ``window`` before it is locked.
        max_failures_per_address: failures from one source address (IPv6: one /64) within ``window``.
        window: seconds over which failures are counted.
        base_lockout: seconds of the first lockout of a key; each further lockout doubles it.
        max_lockout: ceiling of the lockout, seconds.
        max_tracked: keys remembered per kind (usernames, addresses): bounds memory.
    """

    max_failures_per_user: int = 10
    max_failures_per_address: int = 30
    window: float = 300.0
    base_lockout: float = 30.0
    max_lockout: float = 900.0
    max_tracked: int = 10_000

    def __post_init__(self) -> None:
        if self.max_failures_per_user < 1 or self.max_failures_per_address < 1:
            raise ConfigError("auth.throttle: max_failures_per_user and max_failures_per_address must be at least 1")
        if self.window <= 0 or self.base_lockout <= 0:
            raise ConfigError("auth.throttle: window and base_lockout must be positive")
        if self.max_lockout < self.base_lockout:
            raise ConfigError("auth.throttle: max_lockout must be at least base_lockout")
        if self.max_tracked < 1:
            raise ConfigError("auth.throttle: max_tracked must be at least 1")


@dataclass
class _KeyState:
    failures: list[float] = field(default_factory=list)  # times of recent failures, oldest first
    locked_until: float = 0.0
    lockouts: int = 0  # lockouts so far: the next one lasts base_lockout * 2**lockouts
    last_failure: float = 0.0

    def forget_at(self, window: float) -> float:
        return max(self.last_failure, self.locked_until) + window


class _Tracker:
    """Failures of one kind of key (usernames or addresses), bounded to ``config.max_tracked`` keys."""

    def __init__(self, limit: int, config: ThrottleConfig) -> None:
        self._limit = limit
        self._config = config
        # Ordered by last failure (move_to_end on each), so the front is the best eviction victim.
        self._states: OrderedDict[str, _KeyState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def wait(self, key: str, now: float) -> float | None:
        state = self._states.get(key)
        if state is None:
            return None
        if now >= state.forget_at(self._config.window):
            del self._states[key]
            return None
        return state.locked_until - now if state.locked_until > now else None

    def failure(self, key: str, now: float) -> None:
        config = self._config
        state = self._states.get(key)
        if state is not None and now >= state.forget_at(config.window):
            state = None
        if state is None:
            self._make_room(now)
            state = _KeyState()
            self._states[key] = state
        self._states.move_to_end(key)
        state.last_failure = now
        if state.locked_until > now:
            # An attempt that was already in flight when the lock started: the lock stands as it is.
            return
        horizon = now - config.window
        state.failures = [t for t in state.failures if t > horizon]
        state.failures.append(now)
        if len(state.failures) >= self._limit:
            lockout = min(config.base_lockout * 2 ** min(state.lockouts, 62), config.max_lockout)
            state.locked_until = now + lockout
            state.lockouts += 1
            state.failures.clear()

    def clear(self, key: str) -> None:
        self._states.pop(key, None)

    def _make_room(self, now: float) -> None:
        """Frees a slot for one more key: expired keys at the front first, then the least recently failed.

        Only the front is looked at, so making room costs O(1) amortized even while a spray of
        new usernames keeps the table full.
        """
        states = self._states
        window = self._config.window
        while states:
            oldest = next(iter(states.values()))
            if now < oldest.forget_at(window):
                break
            states.popitem(last=False)
        while len(states) >= self._config.max_tracked:
            states.popitem(last=False)


def _user_key(username: str) -> str:
    return username.casefold()


def _address_key(address: str) -> str:
    """One key per IPv4 address and per IPv6 /64 (a v4-mapped address counts as the IPv4 one)."""
    try:
        parsed = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)


class LoginThrottle:
    """Counts failed logins per username and per source address and says how long to wait.

    Args:
        config: the limits (``[auth.throttle]``).
        now: clock in seconds; monotonic by default (tests pass a fake).

    The caller checks before trying the credentials and records the outcome after::

        wait = throttle.check(username, address)
        if wait is not None:
            ...  # answer 429 with Retry-After: ceil(wait)
        ...
        throttle.record_failure(username, address)  # or record_success
    """

    def __init__(self, config: ThrottleConfig | None = None, *, now: Callable[[], float] = time.monotonic) -> None:
        self.config = config if config is not None else ThrottleConfig()
        self._now = now
        self._users = _Tracker(self.config.max_failures_per_user, self.config)
        self._addresses = _Tracker(self.config.max_failures_per_address, self.config)

    def check(self, username: str, address: str) -> float | None:
        """Seconds the caller must wait before trying again, or ``None`` when it may try now.

        The longer of the username's and the address's lockouts wins.
        """
        now = self._now()
        waits = [w for w in (self._users.wait(_user_key(username), now),
                             self._addresses.wait(_address_key(address), now)) if w is not None]
        return max(waits) if waits else None

    def record_failure(self, username: str, address: str) -> None:
        """Counts a failed login against both the username and the address."""
        now = self._now()
        self._users.failure(_user_key(username), now)
        self._addresses.failure(_address_key(address), now)

    def record_success(self, username: str, address: str) -> None:
        """Clears the username's failures and lockout history; the address keeps its count."""
        self._users.clear(_user_key(username))

    def tracked(self) -> tuple[int, int]:
        """How many usernames and addresses are remembered (for metrics and tests)."""
        return len(self._users), len(self._addresses)
