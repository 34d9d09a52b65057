"""Under an upstream cap a range holder asks the upstream only for bytes it has paid for.

A cap (``[swarm] upstream_rate``, or the site's ``site_upstream_rate`` share) used to pace what
a node *read*: the request went out for the whole run, and the bytes the kernel took in before
a read (a receive buffer's worth, again whenever a read freed it) came at the link's rate. The
range holders of a site start their runs together, so a site's link ran at its full rate for
seconds against the cap (docs/benchmarks.md, twenty-third session). Now the run is asked for in
pieces of a quarter second of the rate, each sent once it is paid for: what has been asked for
by any moment is at most the rate times the time so far plus the bucket's burst; an upstream
slow to answer gets larger pieces (twice the time the last one took), still paid before.

The upstream here is a function that records each request and answers it at once, so the
requests alone set the pace. The bounds are upper bounds on the rate: a slow machine only
makes them easier to meet.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

import pytest
import trio

from p2pd.metrics import AgentMetrics
from p2pd.oci.chunkmap import ChunkHasher
from p2pd.oci.digest import Digest
from p2pd.store import BlobStore
from p2pd.swarm.engine import Swarm
from p2pd.swarm.grants import GrantStore
from p2pd.swarm.membership import Member, Membership
from p2pd.swarm.peers import PeerClient

CHUNK = 128 * 1024
DATA = random.Random(23).randbytes(3 * CHUNK)
DIGEST = Digest.parse("sha256:" + hashlib.sha256(DATA).hexdigest())
RATE = 256 * 1024  # bytes/s


async def _fetch(tmp_path: Path, delay: float = 0.0, *, range_ignored: bool = False,
                 **caps: int) -> tuple[float, list[tuple[float, int, int]]]:
    """One node alone in its site (its own budget keeper) fetches DATA's three chunks from the
    upstream as a range holder, the upstream answering each request ``delay`` seconds after it
    came (and saying it ignored the Range, as the fetcher does for a 200 with the whole blob, when
    ``range_ignored``); returns when its buckets began and each request (time, start, end)."""
    async def no_hello(address: str) -> tuple[str, str]:
        raise AssertionError("no peers in this test")

    began = time.monotonic()
    me = Member("holder", "127.0.0.1:1", "site")
    swarm = Swarm(me=me, membership=Membership(me, no_hello), client=PeerClient("holder", None),
                  metrics=AgentMetrics(), chunk_size=CHUNK, lease_ttl=15.0, coordinator_backups=1, peer_timeout=5.0,
                  max_parallel_chunks=16, max_requests_per_peer=2, ban_seconds=60.0,
                  grants=GrantStore(tmp_path / "peer-grants"), **caps)
    store = BlobStore(tmp_path / "store", max_bytes=1 << 30)
    hasher = ChunkHasher(CHUNK)
    hasher.update(DATA)
    fd, _existing = store.open_partial(DIGEST)
    transfer = swarm.start_transfer(DIGEST, len(DATA), fd, hasher.finish(DIGEST))
    requests: list[tuple[float, int, int]] = []

    async def upstream(start: int, end: int, accept) -> bool:  # type: ignore[no-untyped-def]
        requests.append((time.monotonic(), start, end))
        await trio.sleep(delay)
        await accept(DATA[start:end + 1])
        return range_ignored

    with trio.fail_after(30):
        await swarm._fetch_run_from_upstream(transfer, 0, 2, upstream, lambda: None)
    assert transfer.have.is_full()
    return began, requests


async def test_without_a_cap_a_run_is_one_request(tmp_path: Path) -> None:
    _began, requests = await _fetch(tmp_path)
    assert [(start, end) for _t, start, end in requests] == [(0, len(DATA) - 1)]


@pytest.mark.parametrize(("caps", "burst"), [
    ({"upstream_rate": RATE}, RATE),  # the node's own bucket holds a second of its rate
    ({"site_upstream_rate": RATE}, RATE // 4),  # the site share's bucket a quarter second
], ids=["upstream_rate", "site_upstream_rate"])
@pytest.mark.parametrize("delay", [0.0, 0.3], ids=["near", "far"])
async def test_under_a_cap_nothing_is_asked_for_before_it_is_paid_for(
        tmp_path: Path, caps: dict[str, int], burst: int, delay: float) -> None:
    began, requests = await _fetch(tmp_path, delay, **caps)
    # The run, asked for in contiguous pieces: a quarter second of the rate, at most a second's.
    assert [start for _t, start, _end in requests] == [0, *(end + 1 for _t, _start, end in requests[:-1])]
    assert requests[-1][2] == len(DATA) - 1
    sizes = [end + 1 - start for _t, start, end in requests]
    assert sizes[0] <= RATE // 4 and max(sizes) <= RATE, sizes
    if delay:
        # An upstream that takes 0.3 s to answer gets pieces of twice that (one piece at a
        # time would otherwise carry a quarter second of the rate every 0.3 s).
        assert max(sizes[1:]) >= int(RATE * 2 * delay), sizes
    asked = 0
    for at, start, end in requests:
        asked += end + 1 - start
        assert asked <= RATE * (at - began) + burst, (asked, at - began)


async def test_an_upstream_that_ignores_range_gets_the_rest_of_the_run_in_one_request(tmp_path: Path) -> None:
    """Such an upstream sends the blob from its first byte for every request (the fetcher reads
    and drops the bytes before the offset): pieces would cost it the square of the blob."""
    _began, requests = await _fetch(tmp_path, range_ignored=True, site_upstream_rate=RATE)
    assert [(start, end) for _t, start, end in requests] == [(0, RATE // 4 - 1), (RATE // 4, len(DATA) - 1)]
