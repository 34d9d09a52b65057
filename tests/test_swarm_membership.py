"""The member table (p2pd.swarm.membership) with a scripted hello, on trio's mock clock."""

from __future__ import annotations

import trio
import trio.testing

from p2pd.swarm.discovery import Sighting
from p2pd.swarm.membership import Member, Membership

ME = Member("me", "10.0.0.1:7080", "site-a")
PEER = Member("peer", "10.0.0.2:7080", "site-a")


class _Hello:
    """Answers like ``PEER`` while ``up``; counts the probes."""

    def __init__(self) -> None:
        self.up = True
        self.calls = 0

    async def __call__(self, address: str) -> tuple[str, str]:
        self.calls += 1
        if not self.up or address != PEER.address:
            raise OSError("connection refused")
        return PEER.node_id, PEER.site


async def test_a_suspended_peer_that_sends_a_request_is_probed_and_usable_again_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer restarts mid-pull: its requests reach us while we still hold it suspended. One
    authenticated request gets it probed (not after suspend_seconds); a flood of them does not
    flood it with probes; and the request is not a discovery source (an mDNS goodbye still
    removes a member found only by mDNS)."""
    hello = _Hello()
    membership = Membership(ME, hello, suspend_after=3, suspend_seconds=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)
        await membership.sightings.send(Sighting("mdns", PEER.address, PEER.node_id, PEER.site))
        await trio.sleep(0.1)
        assert PEER in membership.live()

        hello.up = False  # it dies; our chunk requests fail
        for _ in range(3):
            membership.failure(PEER.node_id)
        assert PEER not in membership.live()

        await trio.sleep(2.0)  # it is back and asks us for chunks
        hello.up = True
        probes = hello.calls
        for _ in range(50):
            membership.heard_from(PEER.node_id)
        membership.heard_from("stranger")  # unknown nodes are ignored
        await trio.sleep(0.1)
        assert PEER in membership.live()
        assert hello.calls == probes + 1

        # Not suspended: a request costs nothing.
        membership.heard_from(PEER.node_id)
        await trio.sleep(0.1)
        assert hello.calls == probes + 1

        await membership.sightings.send(Sighting("mdns", PEER.address, None, None, gone=True))
        await trio.sleep(0.1)
        assert PEER not in membership.live() and membership.get(PEER.node_id) is None
        nursery.cancel_scope.cancel()


async def test_a_suspended_peer_that_still_does_not_answer_stays_suspended(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Its requests reach us but ours do not reach it (one-way reachability): each request
    asks for at most one probe a second, and it stays out of use while probes fail."""
    hello = _Hello()
    membership = Membership(ME, hello, suspend_after=3, suspend_seconds=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)
        await membership.sightings.send(Sighting("static", PEER.address, None, None))
        await trio.sleep(0.1)
        hello.up = False
        for _ in range(3):
            membership.failure(PEER.node_id)
        probes = hello.calls
        for _ in range(20):  # a request every 0.25 s for 5 s
            membership.heard_from(PEER.node_id)
            await trio.sleep(0.25)
        assert PEER not in membership.live()
        assert hello.calls - probes <= 6
        nursery.cancel_scope.cancel()


async def test_a_node_that_talks_to_us_before_we_confirmed_it_is_probed_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A static peer that was not up when we started is re-probed with a growing backoff (up to
    10 s). When it starts and says hello, the addresses not confirmed yet are probed at once, so
    it is in our view before it pulls (two views of the membership mean two coordinators for a
    digest, and ranges fetched twice)."""
    hello = _Hello()
    hello.up = False
    membership = Membership(ME, hello)
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)
        await membership.sightings.send(Sighting("static", PEER.address, None, None))
        await trio.sleep(5.0)  # probed at 0, 0.25, ~0.75, ~1.75, ~3.75; next at ~7.75
        hello.up = True
        membership.heard_from(PEER.node_id)
        await trio.sleep(0.05)
        assert PEER in membership.live()
        # It came from the static list, not from its request: a later goodbye by that source removes it.
        await membership.sightings.send(Sighting("static", PEER.address, None, None, gone=True))
        await trio.sleep(0.05)
        assert membership.get(PEER.node_id) is None
        nursery.cancel_scope.cancel()


class _BusyPeer:
    """A peer that is busy starting: the first hello to it is answered after ``answer_after``
    seconds; hellos sent while one is in flight fail after ``refuse_after`` (their handshakes
    given up). Counts the hellos in flight at once."""

    def __init__(self, answer_after: float, refuse_after: float) -> None:
        self.answer_after = answer_after
        self.refuse_after = refuse_after
        self.in_flight = 0
        self.most_in_flight = 0
        self.calls = 0

    async def __call__(self, address: str) -> tuple[str, str]:
        self.calls += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.in_flight > 1:
                await trio.sleep(self.refuse_after)
                raise OSError("handshake given up")
            await trio.sleep(self.answer_after)
            return PEER.node_id, PEER.site
        finally:
            self.in_flight -= 1


async def test_a_peer_slow_to_answer_its_first_hello_is_not_suspended_once_it_joined(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Nodes that start together on busy machines answer handshakes slowly. Our discovery, the
    re-probe loop and the requests of other newcomers all asked for hellos to an address that
    had not answered yet; the extra ones failed after the first had made it a member, counted
    as its failures and suspended it for ``suspend_seconds`` (the N = 32 testbed: membership
    took 16-25 s after every agent was ready). One hello at a time per address."""
    peer = _BusyPeer(answer_after=1.5, refuse_after=0.75)
    membership = Membership(ME, peer, suspend_after=3, suspend_seconds=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)
        await membership.sightings.send(Sighting("mdns", PEER.address, PEER.node_id, PEER.site))
        await trio.sleep(0.3)  # the re-probe loop's tick has passed
        membership.heard_from("newcomer-1")  # nodes we do not know yet ask us for things
        await trio.sleep(1.0)
        membership.heard_from("newcomer-2")
        await membership.sightings.send(Sighting("dns", PEER.address, None, None))
        await trio.sleep(3.0)
        assert PEER in membership.live()
        assert peer.most_in_flight == 1
        nursery.cancel_scope.cancel()


async def test_an_address_that_does_not_answer_delays_no_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A hello that hangs until its timeout (5 s) held up the re-probe of every other address
    that had not answered yet; now the re-probes run side by side."""
    silent = "10.0.0.3:7080"
    up_at = trio.current_time() + 1.0

    async def hello(address: str) -> tuple[str, str]:
        if address == silent:
            await trio.sleep_forever()
        if trio.current_time() < up_at:
            raise OSError("connection refused")
        return PEER.node_id, PEER.site

    membership = Membership(ME, hello)
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)
        await membership.sightings.send(Sighting("static", silent, None, None))
        await membership.sightings.send(Sighting("static", PEER.address, None, None))
        await trio.sleep(2.0)  # PEER is up from 1 s; its backoff is at most 1 s by then
        assert PEER in membership.live()
        nursery.cancel_scope.cancel()


async def test_a_hello_that_began_before_the_peer_last_answered_does_not_count_against_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A member with a failed request is probed; the hello hangs. Meanwhile the member answers a
    request, then two others time out. The hello's failure began before that answer and says
    nothing new: two failures, not three, and the member stays in use."""
    hangs = trio.Event()

    async def hello(address: str) -> tuple[str, str]:
        hangs.set()
        await trio.sleep(3.0)
        raise OSError("handshake given up")

    membership = Membership(ME, hello, suspend_after=3, suspend_seconds=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)
        membership.add(PEER, "static")
        membership.failure(PEER.node_id)
        await membership.sightings.send(Sighting("static", PEER.address, None, None))  # re-probed: it failed once
        await hangs.wait()
        membership.success(PEER.node_id)
        membership.failure(PEER.node_id)
        membership.failure(PEER.node_id)
        await trio.sleep(4.0)
        assert PEER in membership.live()
        membership.failure(PEER.node_id)  # a third failure after its answer does suspend it
        assert PEER not in membership.live()
        nursery.cancel_scope.cancel()


async def test_at_most_sixteen_hellos_are_in_flight_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """Forty addresses that never answer (a stale DNS list, a flood of mDNS services): the hellos
    to them wait for one of 16 slots instead of all going out together, and each address still
    gets one."""
    in_flight = most = 0
    asked: set[str] = set()

    async def hello(address: str) -> tuple[str, str]:
        nonlocal in_flight, most
        asked.add(address)
        in_flight += 1
        most = max(most, in_flight)
        try:
            await trio.sleep_forever()
        finally:
            in_flight -= 1
        raise AssertionError("unreachable")

    membership = Membership(ME, hello)
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)
        for host in range(40):
            await membership.sightings.send(Sighting("dns", f"10.0.1.{host}:7080", None, None))
        await trio.sleep(20.0)  # the hellos time out after 5 s each: three rounds of 16
        assert most == 16
        assert len(asked) == 40
        nursery.cancel_scope.cancel()


class _Steps(trio.abc.Instrument):
    """Counts the scheduler steps of every task."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def test_a_membership_with_nothing_to_retry_does_not_wake_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An idle agent's table sleeps: no address waiting for an answer and nobody suspended, no
    wake-ups (the re-probe loop ticked four times a second for nothing); an address that does
    not answer, or a suspended member, wakes it again (the backoff still runs), and it sleeps again
    once the address is gone."""
    hello = _Hello()
    membership = Membership(ME, hello, suspend_after=1, suspend_seconds=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(membership.run)
        await membership.sightings.send(Sighting("mdns", PEER.address, PEER.node_id, PEER.site))
        await trio.sleep(1.0)
        assert PEER in membership.live()
        steps = _Steps()
        trio.lowlevel.add_instrument(steps)
        await trio.sleep(60.0)
        trio.lowlevel.remove_instrument(steps)
        assert steps.steps <= 2  # this test's own sleep

        calls = hello.calls
        await membership.sightings.send(Sighting("static", "10.0.0.9:7080", None, None))  # never answers
        await trio.sleep(10.0)
        assert 4 <= hello.calls - calls <= 7  # the first hello, then 0.5, 1, 2, 4 s backoff (and 8 s)

        membership.remove_address("10.0.0.9:7080", "static")
        await trio.sleep(20.0)  # the loop notices there is nothing left and sleeps again
        steps = _Steps()
        trio.lowlevel.add_instrument(steps)
        await trio.sleep(60.0)
        trio.lowlevel.remove_instrument(steps)
        assert steps.steps <= 2

        membership.failure(PEER.node_id)  # suspended (its end is on the real clock): the loop ticks again
        assert PEER not in membership.live()
        steps = _Steps()
        trio.lowlevel.add_instrument(steps)
        await trio.sleep(1.0)
        trio.lowlevel.remove_instrument(steps)
        assert steps.steps >= 4
        nursery.cancel_scope.cancel()
