"""A coordinator that takes a digest over asks the member ranked next what it knew (the hand-off,
``Swarm._take_over``), over real loopback sockets: when nothing answers there (the predecessor's
process is gone) the takeover is short; when the member takes the connection and says nothing
(it may be overloaded and still granting) it lasts a lease TTL (``CoordinatorState``)."""

from __future__ import annotations

import functools
import socket
import time
from pathlib import Path

import trio

from p2pd.metrics import AgentMetrics
from p2pd.oci.digest import Digest
from p2pd.swarm.engine import Swarm
from p2pd.swarm.grants import GrantStore
from p2pd.swarm.membership import Member, Membership
from p2pd.swarm.messages import Announce, RangeLease
from p2pd.swarm.peers import PeerClient

LEASE_TTL = 15.0
MIB = 1024 * 1024
DIGEST = Digest.parse("sha256:" + "ab" * 32)


def _swarm(tmp_path: Path, predecessor: str) -> Swarm:
    async def no_hello(address: str) -> tuple[str, str]:
        raise AssertionError("members are added by the test")

    me = Member("successor", "127.0.0.1:1", "s")
    membership = Membership(me, no_hello)
    membership.add(Member("predecessor", predecessor, "s"), "test")
    return Swarm(me=me, membership=membership, client=PeerClient("successor", None, read_timeout=5.0),
                 metrics=AgentMetrics(), chunk_size=MIB, lease_ttl=LEASE_TTL, coordinator_backups=1,
                 peer_timeout=5.0, max_parallel_chunks=16, max_requests_per_peer=2, ban_seconds=60.0,
                 grants=GrantStore(tmp_path / "peer-grants"))


def _announce(node: str, have: int = 0, **fields: object) -> Announce:
    """A node of the transfer (8 chunks, 4 ranges of 2) asking for a range; ``have``: its bitmap."""
    return Announce(DIGEST, node, f"{node}:7000", "s", 8 * MIB, MIB, False, bytes([have]), True, False, False,
                    **fields)  # type: ignore[arg-type]


async def _granted_after(swarm: Swarm, seconds: float) -> bool:
    """Takes the digest over with an announcement that lists its old leases; whether a free range
    is granted ``seconds`` later."""
    lessees = (RangeLease("dead", "dead:7000", 0, 1),)
    started = time.monotonic()
    assert not (await swarm.coordinate(_announce("b", 0b00100000, lessees=lessees))).granted  # taking over
    return swarm.coordinator.announce(_announce("c"), started + seconds).granted


async def test_a_hand_off_that_finds_nothing_answering_starts_a_short_takeover(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    refused = f"127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    short = LEASE_TTL / 3 + 2.0
    assert await _granted_after(_swarm(tmp_path / "a", refused), short + 0.5)
    assert not await _granted_after(_swarm(tmp_path / "b", refused), short - 1.0)


async def test_a_hand_off_that_times_out_keeps_the_full_takeover(nursery: trio.Nursery, tmp_path: Path) -> None:
    async def say_nothing(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, say_nothing, 0, host="127.0.0.1"))
    silent = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    assert not await _granted_after(_swarm(tmp_path, silent), LEASE_TTL / 3 + 2.5)
