"""LoginThrottle: pure tests with a fake clock."""

from __future__ import annotations

import pytest

from seed.auth.throttle import LoginThrottle, ThrottleConfig
from seed.errors import ConfigError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(clock: FakeClock, **overrides: float) -> LoginThrottle:
    return LoginThrottle(ThrottleConfig(**overrides), now=clock)  # type: ignore[arg-type]


def fail(throttle: LoginThrottle, times: int, user: str = "alice", address: str = "192.0.2.1") -> None:
    for _ in range(times):
        throttle.record_failure(user, address)


def test_defaults() -> None:
    config = ThrottleConfig()
    assert (config.max_failures_per_user, config.max_failures_per_address) == (10, 30)
    assert (config.window, config.base_lockout, config.max_lockout) == (300.0, 30.0, 900.0)


def test_user_locked_after_limit_and_released_after_lockout() -> None:
    clock = FakeClock()
    throttle = make(clock)
    fail(throttle, 9)
    assert throttle.check("alice", "192.0.2.1") is None
    fail(throttle, 1)
    assert throttle.check("alice", "192.0.2.99") == pytest.approx(30.0)  # any address: the user is locked
    assert throttle.check("bob", "192.0.2.1") is None  # the address has 10 of its 30
    clock.advance(29.5)
    assert throttle.check("alice", "192.0.2.1") == pytest.approx(0.5)
    clock.advance(0.5)
    assert throttle.check("alice", "192.0.2.1") is None


def test_failures_outside_the_window_do_not_count() -> None:
    clock = FakeClock()
    throttle = make(clock)
    for _ in range(20):
        fail(throttle, 1)
        clock.advance(34.0)  # at most 9 failures fall within any 300 s
    assert throttle.check("alice", "192.0.2.1") is None


def test_lockout_doubles_up_to_the_maximum() -> None:
    clock = FakeClock()
    throttle = make(clock)
    seen = []
    for _ in range(8):
        fail(throttle, 10)
        wait = throttle.check("alice", "192.0.2.1")
        assert wait is not None
        seen.append(wait)
        clock.advance(wait)  # comes straight back when the lockout ends
    assert seen == [30.0, 60.0, 120.0, 240.0, 480.0, 900.0, 900.0, 900.0]


def test_lockout_history_forgotten_after_a_quiet_window() -> None:
    clock = FakeClock()
    throttle = make(clock)
    fail(throttle, 10)
    clock.advance(30.0)
    fail(throttle, 10)
    assert throttle.check("alice", "x") == 60.0
    clock.advance(60.0 + 300.0)  # lockout over, then a whole quiet window
    fail(throttle, 10)
    assert throttle.check("alice", "x") == 30.0


def test_a_fresh_allowance_after_each_lockout() -> None:
    clock = FakeClock()
    throttle = make(clock)
    fail(throttle, 10)
    clock.advance(30.0)
    fail(throttle, 9)
    assert throttle.check("alice", "192.0.2.1") is None
    fail(throttle, 1)
    assert throttle.check("alice", "192.0.2.1") == 60.0


def test_failures_while_locked_do_not_extend_the_lock() -> None:
    clock = FakeClock()
    throttle = make(clock)
    fail(throttle, 10)
    clock.advance(10.0)
    fail(throttle, 50, address="192.0.2.2")  # requests that were in flight
    assert throttle.check("alice", "192.0.2.3") == 20.0


def test_address_locked_across_usernames() -> None:
    clock = FakeClock()
    throttle = make(clock)
    for i in range(30):
        throttle.record_failure(f"user{i}", "198.51.100.7")
    assert throttle.check("someone-else", "198.51.100.7") == 30.0
    assert throttle.check("someone-else", "198.51.100.8") is None


def test_success_clears_the_user_but_not_the_address() -> None:
    clock = FakeClock()
    throttle = make(clock, max_failures_per_address=12)
    fail(throttle, 9)
    throttle.record_success("alice", "192.0.2.1")
    fail(throttle, 2)
    assert throttle.check("alice", "192.0.2.7") is None  # user count restarted: 2 of 10
    fail(throttle, 1)
    assert throttle.check("alice", "192.0.2.1") == 30.0  # the address reached 12
    assert throttle.check("alice", "192.0.2.7") is None


def test_success_resets_the_doubling() -> None:
    clock = FakeClock()
    throttle = make(clock, max_failures_per_address=1000)
    fail(throttle, 10)
    clock.advance(30.0)
    throttle.record_success("alice", "192.0.2.1")
    fail(throttle, 10)
    assert throttle.check("alice", "192.0.2.1") == 30.0


def test_usernames_are_case_folded() -> None:
    clock = FakeClock()
    throttle = make(clock)
    for i in range(10):
        throttle.record_failure("Alice" if i % 2 else "ALICE", f"192.0.2.{i}")
    assert throttle.check("alice", "203.0.113.1") == 30.0


def test_ipv6_grouped_by_64_and_v4_mapped_as_v4() -> None:
    clock = FakeClock()
    throttle = make(clock, max_failures_per_address=4)
    for i in range(4):
        throttle.record_failure(f"u{i}", f"2001:db8:1:2::{i + 1:x}")
    assert throttle.check("new", "2001:db8:1:2:ffff::1") == 30.0
    assert throttle.check("new", "2001:db8:1:3::1") is None
    for i in range(4):
        throttle.record_failure(f"v{i}", "::ffff:192.0.2.9")
    assert throttle.check("new", "192.0.2.9") == 30.0


def test_memory_is_bounded_and_oldest_evicted() -> None:
    clock = FakeClock()
    throttle = make(clock, max_tracked=100, max_failures_per_address=10**6)
    fail(throttle, 10, user="victim", address="192.0.2.1")
    for i in range(1000):
        clock.advance(0.001)
        throttle.record_failure(f"spray{i}", f"10.0.{i // 256}.{i % 256}")
    users, addresses = throttle.tracked()
    assert users <= 100 and addresses <= 100
    assert throttle.check("spray999", "10.0.3.231") is None  # recent, tracked (1 failure)
    assert throttle.check("victim", "203.0.113.1") is None  # oldest: evicted


def test_expired_keys_are_evicted_before_live_ones() -> None:
    clock = FakeClock()
    throttle = make(clock, max_tracked=3)
    fail(throttle, 1, user="old1")
    fail(throttle, 1, user="old2")
    clock.advance(301.0)
    fail(throttle, 10, user="locked")
    fail(throttle, 1, user="new1")  # over the cap: old1 and old2 have expired, they go first
    fail(throttle, 1, user="new2")
    assert throttle.check("locked", "203.0.113.1") is not None
    assert throttle.tracked()[0] == 3


def test_check_forgets_stale_keys() -> None:
    clock = FakeClock()
    throttle = make(clock)
    fail(throttle, 3)
    clock.advance(300.0)
    assert throttle.check("alice", "192.0.2.1") is None
    assert throttle.tracked() == (0, 0)


@pytest.mark.parametrize(
    "overrides",
    [{"max_failures_per_user": 0}, {"max_failures_per_address": 0}, {"window": 0.0},
     {"base_lockout": -1.0}, {"base_lockout": 60.0, "max_lockout": 30.0}, {"max_tracked": 0}],
)
def test_invalid_config_refused(overrides: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        ThrottleConfig(**overrides)  # type: ignore[arg-type]


def test_config_from_toml_table() -> None:
    from p2pd.tomlconfig import build_section

    config = build_section(ThrottleConfig, {"max_failures_per_user": 5, "window": 60}, "auth.throttle")
    assert config == ThrottleConfig(max_failures_per_user=5, window=60.0)
    with pytest.raises(ConfigError):
        build_section(ThrottleConfig, {"max_lockout": 1}, "auth.throttle")
