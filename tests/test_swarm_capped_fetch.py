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
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio

from p2pd.config import AgentConfig, FetchConfig, UpstreamConfig
from p2pd.fetcher import Fetcher
from p2pd.metrics import AgentMetrics
from p2pd.oci.chunkmap import ChunkHasher
from p2pd.oci.digest import Digest
from p2pd.store import BlobStore
from p2pd.swarm.engine import Swarm, SwarmTransfer
from p2pd.swarm.grants import GrantStore
from p2pd.swarm.membership import Member, Membership
from p2pd.swarm.peers import PeerClient
from p2pd.upstream import HttpUpstream

CHUNK = 128 * 1024
DATA = random.Random(23).randbytes(3 * CHUNK)
DIGEST = Digest.parse("sha256:" + hashlib.sha256(DATA).hexdigest())
RATE = 256 * 1024  # bytes/s


def _holder(tmp_path: Path, **caps: int) -> tuple[Swarm, SwarmTransfer]:
    """One node alone in its site (its own budget keeper), about to fetch DATA as a range holder."""
    async def no_hello(address: str) -> tuple[str, str]:
        raise AssertionError("no peers in this test")

    me = Member("holder", "127.0.0.1:1", "site")
    swarm = Swarm(me=me, membership=Membership(me, no_hello), client=PeerClient("holder", None),
                  metrics=AgentMetrics(), chunk_size=CHUNK, lease_ttl=15.0, coordinator_backups=1, peer_timeout=5.0,
                  max_parallel_chunks=16, max_requests_per_peer=2, ban_seconds=60.0,
                  grants=GrantStore(tmp_path / "peer-grants"), **caps)
    store = BlobStore(tmp_path / "store", max_bytes=1 << 30)
    hasher = ChunkHasher(CHUNK)
    hasher.update(DATA)
    fd, _existing = store.open_partial(DIGEST)
    return swarm, swarm.start_transfer(DIGEST, len(DATA), fd, hasher.finish(DIGEST))


async def _fetch(tmp_path: Path, delay: float = 0.0, *, range_ignored: bool = False,
                 **caps: int) -> tuple[float, list[tuple[float, int, int]]]:
    """The holder fetches DATA's three chunks from the upstream, the upstream answering each
    request ``delay`` seconds after it came (and saying it ignored the Range, as the fetcher does
    for a 200 with the whole blob, when ``range_ignored``); returns when its buckets began and
    each request (time, start, end)."""
    began = time.monotonic()
    swarm, transfer = _holder(tmp_path, **caps)
    requests: list[tuple[float, int, int]] = []

    async def upstream(start: int, end: int, accept, on_range_ignored=None) -> bool:  # type: ignore[no-untyped-def]
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


class _RangeIgnoringUpstream:
    """The fetcher's range over the real HTTP client, wired as ``Fetcher._fetch_swarm`` wires a
    range holder, whose mock transport answers every request with the whole blob and notes
    when each piece of it is taken (``taken``) and what each request asked for (``asked``)."""

    def __init__(self, swarm: Swarm, piece: int = 16 * 1024) -> None:
        self.taken: list[tuple[float, int]] = []  # (when the client took it, bytes)
        self.asked: list[str] = []

        async def whole_blob() -> AsyncIterator[bytes]:
            for start in range(0, len(DATA), piece):
                self.taken.append((time.monotonic(), min(piece, len(DATA) - start)))
                yield DATA[start:start + piece]

        async def ignores_range(request: httpx.Request) -> httpx.Response:
            self.asked.append(request.headers["range"])  # asked for a range, answered with the whole blob
            return httpx.Response(200, headers={"Content-Length": str(len(DATA))}, content=whole_blob())

        self.upstream = HttpUpstream(UpstreamConfig(namespace="registry.test", url="https://registry.test"),
                                     FetchConfig(), transport=httpx.MockTransport(ignores_range))
        self.fetcher = Fetcher(AgentConfig(), None, None, AgentMetrics())  # type: ignore[arg-type]  # range path uses neither
        self.swarm = swarm
        self.piece = piece

    async def __call__(self, start: int, end: int, accept: Callable[[bytes], Awaitable[None]],
                       on_range_ignored: Callable[[int], int] | None = None) -> bool:
        return await self.fetcher._upstream_range(self.upstream, "app", DIGEST, start, end, accept,
                                                  dropped=self.swarm.pay_for_upstream_bytes,
                                                  on_range_ignored=on_range_ignored)

    def read(self) -> int:
        return sum(length for _at, length in self.taken)

    def assert_paid_as_read(self, began: float) -> None:
        """What the client had taken by each piece is within the rate since ``began``, the
        bucket's second of burst and the piece itself (a piece is paid for once it is read)."""
        read = 0
        for at, length in self.taken:
            assert read <= RATE * (at - began) + RATE + self.piece, (read, at - began)
            read += length


async def test_the_bytes_before_the_range_that_an_upstream_sends_anyway_are_paid_for(tmp_path: Path) -> None:
    """An upstream that ignores Range sends the blob from its first byte; in a reader's rescue
    (one chunk, ``whole_blob_if_range_ignored=False``) the bytes before the chunk are read and
    dropped (``BlobResponse.aiter_bytes``), but they crossed the link like the rest: the cap
    pays for each piece of them as it is read."""
    swarm, transfer = _holder(tmp_path, upstream_rate=RATE)
    upstream = _RangeIgnoringUpstream(swarm)
    began = time.monotonic()
    with trio.fail_after(30):
        # Chunks 1 and 2: each request brings chunk 0 first, read and dropped.
        await swarm._fetch_run_from_upstream(transfer, 1, 2, upstream, lambda: None,
                                             whole_blob_if_range_ignored=False)
    await upstream.upstream.aclose()
    assert transfer.have.indexes() == [1, 2]
    upstream.assert_paid_as_read(began)
    assert upstream.read() > len(DATA)  # chunk 0 came twice (two requests), and was paid for both times


async def test_a_range_holder_gives_its_run_up_when_the_upstream_sends_the_blob_from_its_start(
        tmp_path: Path) -> None:
    """A range holder's run from chunk 1 answered with the whole blob is given up before a byte
    of it is read: the transfer notes that the upstream ignores Range (the coordinator is told,
    and the run from chunk 0 brings the rest). Without it each holder of a site read the blob's
    start to drop it: about half the number of ranges times the blob."""
    swarm, transfer = _holder(tmp_path)
    upstream = _RangeIgnoringUpstream(swarm)
    with trio.fail_after(30):
        await swarm._fetch_run_from_upstream(transfer, 1, 2, upstream, lambda: None)
    await upstream.upstream.aclose()
    assert (transfer.range_ignored, transfer.have.indexes()) == (True, [])
    assert upstream.asked == [f"bytes={CHUNK}-{len(DATA) - 1}"]
    assert upstream.read() == 0 and not transfer.arrivals
    assert swarm._announcement(transfer, DIGEST, want_lease=True).whole_blob


@pytest.mark.parametrize("caps", [{}, {"upstream_rate": RATE}], ids=["no-cap", "upstream_rate"])
async def test_a_run_from_the_first_chunk_reads_a_range_ignoring_answer_to_the_blobs_end(
        tmp_path: Path, caps: dict[str, int]) -> None:
    """The run of chunk 0 alone, answered with the whole blob, lands every chunk from that one
    answer (the blob's bytes cross once): under a cap, what was read by any moment is at most
    the rate times the time so far plus the bucket's second and a piece."""
    swarm, transfer = _holder(tmp_path, **caps)
    upstream = _RangeIgnoringUpstream(swarm)
    began = time.monotonic()
    with trio.fail_after(30):
        await swarm._fetch_run_from_upstream(transfer, 0, 0, upstream, lambda: None)
    await upstream.upstream.aclose()
    assert (transfer.range_ignored, transfer.have.is_full(), len(upstream.asked)) == (True, True, 1)
    assert upstream.read() == len(DATA) == transfer.upstream_bytes
    if caps:
        upstream.assert_paid_as_read(began)
