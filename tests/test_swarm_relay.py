"""A range holder relays the chunk it is fetching from the upstream while the bytes arrive.

The real peer endpoint (``PeerService`` behind the real HTTP server, plain TCP on loopback)
and the real chunk wire of the asking node; the upstream is a function the test feeds piece by
piece, so every step is observed, not timed:
- the asker receives bytes of a chunk before the chunk is complete here;
- the last ``RELAY_HOLDBACK`` bytes wait for the chunk's verification, so a chunk that fails
  (or a fetch that ends early) reaches no asker whole: its answer is cut short;
- relays take no upload slot (a holder's peers all want its next chunk at once) and are bounded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from p2pd.errors import UpstreamError, VerificationError
from p2pd.httpd import FileBody, Headers, Request, RequestBody, Response, serve_http
from p2pd.httpd._server import _SO_MAX_PACING_RATE, _pacer
from p2pd.logformat import JsonFormatter
from p2pd.metrics import AgentMetrics
from p2pd.oci.chunkmap import ChunkHasher
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from p2pd.store import BlobStore
from p2pd.swarm.chunkwire import Exchange
from p2pd.swarm.engine import RELAY_HOLDBACK, Swarm, SwarmTransfer
from p2pd.swarm.grants import GrantStore
from p2pd.swarm.membership import Member, Membership
from p2pd.swarm.peers import NODE_HEADER, RELAYED_TO_HEADER, PeerChunk, PeerClient, PeerError, PeerRelayCut
from p2pd.swarm.planning import Bitmap
from p2pd.swarm.rendezvous import coordinators
from p2pd.swarm.service import PeerService
from tests.swarm_cluster import wait_until

CHUNK = 128 * 1024
DATA = random.Random(11).randbytes(3 * CHUNK)
DIGEST = Digest.parse("sha256:" + hashlib.sha256(DATA).hexdigest())

Accept = Callable[[bytes], Awaitable[None]]


class _Holder:
    """One node that holds the upstream lease for DIGEST, with its peer endpoint."""

    def __init__(self, tmp_path: Path, *, max_uploads: int = 4, upload_rate: int = 0, name: str = "holder",
                 peer_timeout: float = 5.0) -> None:
        async def no_hello(address: str) -> tuple[str, str]:
            raise AssertionError("no peers in this test")

        me = Member(name, "127.0.0.1:1", "s")
        self.metrics = AgentMetrics()
        client = PeerClient(name, None, read_timeout=peer_timeout)
        self.swarm = Swarm(me=me, membership=Membership(me, no_hello), client=client,
                           metrics=self.metrics, chunk_size=CHUNK, lease_ttl=15.0, coordinator_backups=1,
                           peer_timeout=peer_timeout, max_parallel_chunks=16, max_requests_per_peer=2,
                           ban_seconds=60.0, grants=GrantStore(tmp_path / "peer-grants"))
        self.store = BlobStore(tmp_path / "store", max_bytes=1 << 30)
        self.service = PeerService(swarm=self.swarm, store=self.store, key=None, metrics=self.metrics,
                                   max_uploads=max_uploads, upload_rate=upload_rate, chunk_wait=2.0, slot_wait=0.0)
        hasher = ChunkHasher(CHUNK)
        hasher.update(DATA)
        fd, _existing = self.store.open_partial(DIGEST)
        self.transfer: SwarmTransfer = self.swarm.start_transfer(DIGEST, len(DATA), fd, hasher.finish(DIGEST))
        self.pieces_in, self.pieces_out = trio.open_memory_channel[bytes | None](0)
        self.fetch_error: BaseException | None = None

    async def upstream(self, start: int, end: int, accept: Accept, on_range_ignored: object = None) -> None:
        """An HTTP Range answer for bytes start..end: the pieces the test feeds, then its end."""
        left = end + 1 - start
        while left > 0:
            piece = await self.pieces_out.receive()
            if piece is None:
                raise UpstreamError("the upstream connection broke")
            left -= len(piece)
            await accept(piece)

    async def fetch(self, first: int, last: int) -> None:
        """The lease holder's upstream run (``Swarm._fetch_run_from_upstream``)."""
        try:
            await self.swarm._fetch_run_from_upstream(self.transfer, first, last, self.upstream, lambda: None)
        except (UpstreamError, VerificationError) as exc:
            self.fetch_error = exc

    async def feed(self, piece: bytes | None) -> None:
        await self.pieces_in.send(piece)
        await trio.testing.wait_all_tasks_blocked()

    async def relay_to_be_cut(self, nursery: trio.Nursery, last: int) -> list[bytes]:
        """Starts the upstream run of chunks 0..last and one relay of chunk 0 whose answer must
        end cut short; returns what the asker received (filled as it arrives)."""
        nursery.start_soon(self.fetch, 0, last)
        await trio.testing.wait_all_tasks_blocked()
        response = await self.service.handle(self.request(0))
        got: list[bytes] = []

        async def read() -> None:
            with pytest.raises(Exception, match="chunk 0 failed or its fetch ended"):
                await _read(response, got)

        nursery.start_soon(read)
        return got

    def request(self, index: int, asker: str = "") -> Request:
        start = index * CHUNK
        target = f"/p2p/v1/blobs/{DIGEST}"
        headers = [("Range", f"bytes={start}-{start + CHUNK - 1}")] + ([(NODE_HEADER, asker)] if asker else [])
        return Request("GET", target, target, {}, Headers(headers),
                       RequestBody(None), ("127.0.0.1", 1), "1.1")  # type: ignore[arg-type]


@pytest.fixture
def inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk writes in the test's own thread: with the mock clock, a worker thread would let
    time jump ahead while it runs, and every step here is observed when all tasks wait."""
    async def run_inline(function, *args):  # type: ignore[no-untyped-def]
        return function(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_inline)


async def _ask_past_the_bound(holder: _Holder, statuses: list[int]) -> None:
    """A request for chunk 0 past the relays' bound: it waits (``chunk_wait``) for the chunk and
    is answered from disk, taking the upload slot."""
    response = await holder.service.handle(holder.request(0))
    statuses.append(response.status)
    assert response.on_close is not None
    response.on_close()


async def _read(response: Response, into: list[bytes]) -> None:
    """What the HTTP server does with an answer: send its body, then close it."""
    assert isinstance(response.body, AsyncIterator)
    try:
        async for piece in response.body:
            into.append(piece)
    finally:
        assert response.on_close is not None
        response.on_close()


async def test_a_chunk_is_relayed_while_it_arrives_and_its_tail_waits_for_the_verification(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    holder = _Holder(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder.fetch, 0, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert 0 in holder.transfer.arrivals  # open before the first byte: an asker waits on it, not on the disk
        response = await holder.service.handle(holder.request(0))
        assert response.status == 206 and response.content_length == CHUNK
        assert holder.service.uploads == 0 and holder.service.relays == 1  # no upload slot taken
        assert not response.drained_close  # unpaced: nothing to wait for before it ends
        got: list[bytes] = []
        nursery.start_soon(_read, response, got)
        await holder.feed(DATA[:100_000])
        assert b"".join(got) == DATA[:100_000 - RELAY_HOLDBACK]  # relayed as it arrived, minus the tail
        await holder.feed(DATA[100_000:CHUNK - 1])
        assert len(b"".join(got)) == CHUNK - 1 - RELAY_HOLDBACK  # the tail waits: the chunk is not verified
        await holder.feed(DATA[CHUNK - 1:CHUNK + 10])  # completes chunk 0 (verified) and starts chunk 1
        assert b"".join(got) == DATA[:CHUNK]
        assert 0 in holder.transfer.have and list(holder.transfer.arrivals) == [1]
        assert holder.metrics.chunks_relayed._value.get() == 1
        await holder.feed(DATA[CHUNK + 10:2 * CHUNK])
    assert holder.fetch_error is None and holder.service.relays == 0
    assert os.pread(holder.transfer.fd, 2 * CHUNK, 0) == DATA[:2 * CHUNK]


async def test_a_chunk_that_arrives_slowly_is_relayed_at_least_every_second(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A starved upstream flow (N = 32 equal links: a few KB/s for seconds) crossed no 16 KiB
    step within the askers' read timeout, so every relay of the blob's first chunk was cut and
    its askers queued for upload slots once it landed. Bytes that arrive go on within a second."""
    import types

    import p2pd.swarm.engine as engine_module

    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(monotonic=trio.current_time))
    holder = _Holder(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder.fetch, 0, 0)
        await trio.testing.wait_all_tasks_blocked()
        response = await holder.service.handle(holder.request(0))
        got: list[bytes] = []
        nursery.start_soon(_read, response, got)
        sizes = []
        for step in range(16):  # 3 KiB a second: no 16 KiB step in 4 s
            await holder.feed(DATA[step * 768:(step + 1) * 768])
            sizes.append(len(b"".join(got)))
            await trio.sleep(0.25)
        assert 0 < sizes[4] < sizes[8] < sizes[12]  # each second, more
        assert sizes[-1] <= 16 * 768 - RELAY_HOLDBACK  # never the tail
        await holder.feed(DATA[16 * 768:CHUNK])
    assert b"".join(got) == DATA[:CHUNK] and holder.fetch_error is None


async def test_a_chunk_that_fails_verification_reaches_no_asker_whole(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    holder = _Holder(tmp_path)
    bad = bytearray(DATA[:CHUNK])
    bad[-1] ^= 1  # in the held-back tail: everything before it was relayed already
    async with trio.open_nursery() as nursery:
        got = await holder.relay_to_be_cut(nursery, 0)
        await holder.feed(bytes(bad[:100_000]))
        await holder.feed(bytes(bad[100_000:]))
    assert isinstance(holder.fetch_error, VerificationError)
    assert b"".join(got) == DATA[:100_000 - RELAY_HOLDBACK]  # then the server closes the connection
    assert 0 not in holder.transfer.have and not holder.transfer.arrivals
    # Asked again, the chunk is not here: a fast 404 (the asker tries another peer).
    with pytest.raises(OCIError) as refused:
        await holder.service.handle(holder.request(0))
    assert refused.value.status == 404


async def test_an_upstream_fetch_that_ends_early_cuts_its_relays_short(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    holder = _Holder(tmp_path)
    async with trio.open_nursery() as nursery:
        got = await holder.relay_to_be_cut(nursery, 2)
        await holder.feed(DATA[:50_000])
        await holder.feed(None)  # the upstream connection breaks
    assert isinstance(holder.fetch_error, UpstreamError)
    assert b"".join(got) == DATA[:50_000 - RELAY_HOLDBACK]
    assert not holder.transfer.arrivals and holder.service.relays == 0


@pytest.mark.parametrize(("other_holders", "bound"), [((), 2), (("a", "b", "c"), 4)])
async def test_relays_take_no_upload_slot_and_past_their_bound_per_chunk_a_request_waits_for_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None, other_holders: tuple[str, ...],
    bound: int,
) -> None:
    """The bound per chunk is the blob's range holders (this node and three others), at least 2
    (this node alone): K holders share the seed's uplink, so each one's chunk arrives at ~1/K of
    it, and K relays of it send about what the seed does (more would each run slower than the
    chunk arrives). Not the upload slots: relays take none (one slot here)."""
    holder = _Holder(tmp_path, max_uploads=1)
    holder.transfer.leased = True
    holder.transfer.lessees = {node: (1, 2) for node in other_holders}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder.fetch, 0, 1)
        await trio.testing.wait_all_tasks_blocked()
        relayed = [await holder.service.handle(holder.request(0)) for _ in range(bound)]
        assert holder.service.relays == bound
        assert all(response.status == 206 for response in relayed) and holder.service.uploads == 0
        reads: list[list[bytes]] = [[] for _ in relayed]
        for response, got in zip(relayed, reads, strict=True):
            nursery.start_soon(_read, response, got)
        late: list[int] = []
        nursery.start_soon(_ask_past_the_bound, holder, late)
        await trio.testing.wait_all_tasks_blocked()
        assert late == [] and holder.service.relays == bound
        await holder.feed(DATA[:CHUNK])
        assert late == [206]
        await holder.feed(DATA[CHUNK:2 * CHUNK])
    assert all(b"".join(got) == DATA[:CHUNK] for got in reads)


async def test_a_peer_receives_a_relayed_chunk_before_it_is_complete_at_the_holder(tmp_path: Path) -> None:
    """End to end on loopback, through the asking node's ``PeerClient``: it reads relayed bytes as
    they come and gets the chunk; a relayed chunk that fails at the holder, or stops arriving
    there for longer than the asker's read timeout, ends as ``PeerRelayCut`` (ask again soon: neither
    a failure of the holder, which would get it suspended, nor a false claim), never as a chunk."""
    holder = _Holder(tmp_path)
    client = PeerClient("asker", None, read_timeout=1.0)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(partial(serve_http, holder.service.handle, "127.0.0.1", 0))
        address = f"127.0.0.1:{info.port}"
        nursery.start_soon(holder.fetch, 0, 2)
        await trio.testing.wait_all_tasks_blocked()
        answers: list[object] = []

        async def ask(index: int, exchange: Exchange) -> None:
            try:
                answers.append(await client.fetch_chunk(address, DIGEST, index * CHUNK, CHUNK, exchange=exchange))
            except PeerError as exc:
                answers.append(exc)

        async def relayed_then_fed(index: int, pieces: list[bytes]) -> object:
            exchange = Exchange()
            relayed = holder.metrics.chunks_relayed._value.get()
            nursery.start_soon(ask, index, exchange)
            with trio.fail_after(10):
                await wait_until(lambda: holder.metrics.chunks_relayed._value.get() > relayed, interval=0.01)
            for piece in pieces:
                await holder.pieces_in.send(piece)
                if piece is pieces[0]:
                    with trio.fail_after(10):  # the wire reads in 64 KiB steps
                        await wait_until(lambda: exchange.received >= 64 * 1024, interval=0.01)
                    assert index not in holder.transfer.have  # bytes came before the chunk was complete
            with trio.fail_after(10):
                await wait_until(lambda: bool(answers), interval=0.01)
            return answers.pop()

        answer = await relayed_then_fed(0, [DATA[:100_000], DATA[100_000:CHUNK]])
        assert isinstance(answer, PeerChunk) and answer.sha256 == hashlib.sha256(DATA[:CHUNK]).digest()

        stalled = await relayed_then_fed(1, [DATA[CHUNK:CHUNK + 100_000]])  # then nothing for 1 s
        assert isinstance(stalled, PeerRelayCut), stalled

        bad = bytearray(DATA[CHUNK + 100_000:2 * CHUNK])
        bad[-1] ^= 1
        answer = await relayed_then_fed(1, [bytes(bad)])  # chunk 1 completes: it fails at the holder
        assert isinstance(answer, PeerRelayCut), answer
        nursery.cancel_scope.cancel()
    await client.aclose()
    assert isinstance(holder.fetch_error, VerificationError)


async def test_past_the_bound_a_request_is_sent_at_once_to_a_node_the_chunk_is_relayed_to(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    """The relay tree's next level: a holder whose relays of its arriving chunk are all taken
    answers a further asker 404 at once, naming one of the nodes it relays the chunk to
    (``RELAYED_TO_HEADER``; the one named least so far, never the asker itself), which passes it
    on as it arrives there. Waiting ``chunk_wait`` for the chunk instead kept half the askers of
    an N = 32 site idle for 2 s at the start of a pull, each holding a request slot."""
    holder = _Holder(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder.fetch, 0, 0)
        await trio.testing.wait_all_tasks_blocked()
        relayed = [await holder.service.handle(holder.request(0, asker)) for asker in ("a", "b")]
        assert all(response.status == 206 for response in relayed)
        started = trio.current_time()
        named = []
        for asker in ("c", "d", "e", "a"):
            with pytest.raises(OCIError) as missing:
                await holder.service.handle(holder.request(0, asker))
            assert missing.value.status == 404
            named.append(dict(missing.value.headers)[RELAYED_TO_HEADER])
        assert trio.current_time() == started  # no wait
        assert named[:2] in (["a", "b"], ["b", "a"]) and named[2] in ("a", "b") and named[3] == "b"
        reads: list[list[bytes]] = [[], []]
        for response, got in zip(relayed, reads, strict=True):
            nursery.start_soon(_read, response, got)
        await holder.feed(DATA[:CHUNK])
    assert all(b"".join(got) == DATA[:CHUNK] for got in reads)
    assert not holder.transfer.arrivals
    # Once the chunk is here, a request is served from disk as before (nothing to send it on to).
    response = await holder.service.handle(holder.request(0, "f"))
    assert response.status == 206
    assert response.on_close is not None
    response.on_close()


async def test_an_asker_that_does_not_name_itself_is_never_named_to_others(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    """A relay to a request without a node id (no such asker among agents, which always send
    one) leaves nobody to name: a later asker is named a receiver that has an id, or waits."""
    holder = _Holder(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder.fetch, 0, 0)
        await trio.testing.wait_all_tasks_blocked()
        relayed = [await holder.service.handle(holder.request(0, asker)) for asker in ("", "a")]
        for _ in range(2):
            with pytest.raises(OCIError) as missing:
                await holder.service.handle(holder.request(0, "c"))
            assert dict(missing.value.headers)[RELAYED_TO_HEADER] == "a"
        reads: list[list[bytes]] = [[], []]
        for response, got in zip(relayed, reads, strict=True):
            nursery.start_soon(_read, response, got)
        await holder.feed(DATA[:CHUNK])
    assert all(b"".join(got) == DATA[:CHUNK] for got in reads)


async def test_a_node_not_fetching_a_chunk_says_so_at_once_and_one_fetching_it_waits_for_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    """A request for a chunk that is neither here, nor on its way (asked of a peer now, arriving,
    or in this node's own ranges) is answered 404 at once: a relay tree's guess that this node
    receives it was wrong, and the asker goes to the holder. One on its way waits for it as
    before (``chunk_wait``): this is how chunks are forwarded as soon as they are verified."""
    node = _Holder(tmp_path)
    started = trio.current_time()
    with pytest.raises(OCIError) as missing:
        await node.service.handle(node.request(1, "asker"))
    assert missing.value.status == 404 and trio.current_time() == started
    node.transfer.requested.add(1)  # asked of a peer now
    with pytest.raises(OCIError):
        await node.service.handle(node.request(1, "asker"))
    assert trio.current_time() - started == pytest.approx(node.service.chunk_wait)


async def test_a_chunk_arriving_from_a_peer_is_passed_on_while_it_arrives(tmp_path: Path) -> None:
    """The second hop, end to end on loopback with the real chunk wire: a node fetching a chunk
    from the range holder (which relays it from the upstream) passes it on to a third node as the
    bytes reach it, all but ``RELAY_HOLDBACK`` until it has verified the chunk itself. A chunk that
    fails at the holder cuts both answers short (``PeerRelayCut``): no node receives it whole.
    Its relays are bounded by ``MIN_CHUNK_RELAYS`` (a tree node passes each arriving chunk on to
    a few); past that, an asker is sent on to one of them."""
    holder = _Holder(tmp_path / "holder")
    middle = _Holder(tmp_path / "middle", name="middle")
    client = PeerClient("third", None, read_timeout=2.0)
    async with trio.open_nursery() as nursery:
        holder_info = await nursery.start(partial(serve_http, holder.service.handle, "127.0.0.1", 0))
        middle_info = await nursery.start(partial(serve_http, middle.service.handle, "127.0.0.1", 0))
        middle.transfer.addresses["holder"] = f"127.0.0.1:{holder_info.port}"
        nursery.start_soon(holder.fetch, 0, 2)
        await trio.testing.wait_all_tasks_blocked()

        async def pass_on(index: int, pieces: list[bytes]) -> tuple[object, bytes]:
            """The middle fetches chunk ``index`` from the holder; the third node asks the middle
            for it once it is arriving there; the holder is fed ``pieces``."""
            nursery.start_soon(middle.swarm._fetch_chunk_from, middle.transfer, index, "holder", lambda: None)
            with trio.fail_after(10):
                await wait_until(lambda: index in middle.transfer.arrivals, interval=0.01)
            arrival = middle.transfer.arrivals[index]
            assert arrival.from_peer
            exchange = Exchange()
            answers: list[object] = []

            async def ask() -> None:
                try:
                    answers.append(await client.fetch_chunk(f"127.0.0.1:{middle_info.port}", DIGEST, index * CHUNK,
                                                            CHUNK, exchange=exchange))
                except PeerError as exc:
                    answers.append(exc)

            nursery.start_soon(ask)
            with trio.fail_after(10):
                await wait_until(lambda: arrival.relays == 1, interval=0.01)
            await holder.pieces_in.send(pieces[0])
            with trio.fail_after(10):
                await wait_until(lambda: exchange.received >= 64 * 1024, interval=0.01)
            assert index not in holder.transfer.have and index not in middle.transfer.have
            assert arrival.received < CHUNK
            for piece in pieces[1:]:
                await holder.pieces_in.send(piece)
            with trio.fail_after(10):
                await wait_until(lambda: bool(answers), interval=0.01)
            return answers[0], os.pread(middle.transfer.fd, CHUNK, index * CHUNK)

        answer, written = await pass_on(0, [DATA[:100_000], DATA[100_000:CHUNK]])
        assert isinstance(answer, PeerChunk) and answer.sha256 == hashlib.sha256(DATA[:CHUNK]).digest()
        assert 0 in middle.transfer.have and written == DATA[:CHUNK] and not middle.transfer.arrivals
        assert middle.metrics.chunks_relayed._value.get() == 1

        bad = bytearray(DATA[CHUNK:2 * CHUNK])
        bad[-1] ^= 1
        answer, _written = await pass_on(1, [bytes(bad[:100_000]), bytes(bad[100_000:])])
        assert isinstance(answer, PeerRelayCut), answer
        assert 1 not in middle.transfer.have and not middle.transfer.arrivals
        nursery.cancel_scope.cancel()
    await client.aclose()
    await middle.swarm.client.aclose()
    assert isinstance(holder.fetch_error, VerificationError)


async def test_a_peer_arrivals_relays_are_bounded_and_past_them_an_asker_is_sent_on(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    """A node relays a chunk arriving from a peer to ``MIN_CHUNK_RELAYS`` askers (a tree node
    passes it on to a few, so that its uplink carries about what it receives), whatever the
    blob's range holders; a further asker is named one of them."""
    from p2pd.swarm.engine import Arrival
    from p2pd.swarm.planning import MIN_CHUNK_RELAYS

    node = _Holder(tmp_path)
    node.transfer.lessees = {f"h{i}": (i, i) for i in range(8)}  # 8 holders: their own chunks get 8 relays
    arrival = node.transfer.arrivals[0] = Arrival(0, bytearray(CHUNK), from_peer=True)
    relayed = [await node.service.handle(node.request(0, f"a{i}")) for i in range(MIN_CHUNK_RELAYS)]
    assert all(response.status == 206 for response in relayed) and arrival.relays == MIN_CHUNK_RELAYS
    with pytest.raises(OCIError) as missing:
        await node.service.handle(node.request(0, "late"))
    assert dict(missing.value.headers)[RELAYED_TO_HEADER] in {f"a{i}" for i in range(MIN_CHUNK_RELAYS)}
    for response in relayed:
        assert response.on_close is not None
        response.on_close()
    assert arrival.relays == 0 and not arrival.receivers


async def test_the_blobs_first_chunks_come_from_the_upstream_in_a_request_each_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    """Every node's reader starts at chunk 0: the holder of the first range fetches its first
    chunks (up to four) in a request each, at once (a larger share of a thin uplink, and not all
    starved together); any other range comes in one request, in order. Each byte is asked for once."""
    holder = _Holder(tmp_path)
    transfer = holder.transfer
    asked: list[tuple[int, int]] = []
    running = peak = 0

    async def upstream(start: int, end: int, accept: Accept, on_range_ignored: object = None) -> None:
        nonlocal running, peak
        asked.append((start, end))
        running += 1
        peak = max(peak, running)
        await trio.sleep(1)  # all of them are open before any byte comes
        try:
            for offset in range(start, end + 1, 10_000):
                await accept(DATA[offset:min(offset + 10_000, end + 1)])
        finally:
            running -= 1

    transfer.ranges = ((0, 2),)
    await holder.swarm._fetch_missing_from_upstream(transfer, upstream, lambda: None)
    assert sorted(asked) == [(0, CHUNK - 1), (CHUNK, 2 * CHUNK - 1), (2 * CHUNK, 3 * CHUNK - 1)] and peak == 3
    assert transfer.have.is_full() and not transfer.requested
    assert os.pread(transfer.fd, len(DATA), 0) == DATA
    # Another range: one request.
    other = _Holder(tmp_path / "other")
    other.transfer.ranges = ((1, 2),)
    other.transfer.have.set(0)
    asked.clear()
    await other.swarm._fetch_missing_from_upstream(other.transfer, upstream, lambda: None)
    assert asked == [(CHUNK, 3 * CHUNK - 1)]



async def test_the_upload_rate_is_shared_by_pacing_each_uploads_connection(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, inline_threads: None
) -> None:
    """With ``upload_rate`` the kernel paces each upload's connection at the rate ÷ the uploads
    in progress (a relay counts too), and a landed chunk stays a file the server sends whole
    (not pieces through the token bucket); an ended upload's connection keeps its share (its tail
    may still wait in the socket's buffer)."""
    holder = _Holder(tmp_path, upload_rate=1_200_000)
    paces: list[list[int]] = [[], [], []]

    def asking(index: int, pacer: int) -> Request:
        request = holder.request(index)
        request.pace = paces[pacer].append
        return request

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder.fetch, 0, 1)
        await trio.testing.wait_all_tasks_blocked()
        await holder.feed(DATA[:CHUNK + 10])  # chunk 0 lands; chunk 1 starts arriving
        assert 0 in holder.transfer.have and list(holder.transfer.arrivals) == [1]
        landed = [await holder.service.handle(asking(0, pacer)) for pacer in (0, 1)]
        assert all(isinstance(response.body, FileBody) for response in landed)
        assert paces[0] == [1_200_000, 600_000] and paces[1] == [600_000]
        relay = await holder.service.handle(asking(1, 2))
        assert holder.service.relays == 1
        assert paces[2] == [400_000] and paces[0][-1] == paces[1][-1] == 400_000
        got: list[bytes] = []
        nursery.start_soon(_read, relay, got)
        await holder.feed(DATA[CHUNK + 10:2 * CHUNK])
    assert b"".join(got) == DATA[CHUNK:2 * CHUNK]  # relayed unthrottled by the bucket: the kernel paces it
    assert paces[0][-1] == paces[1][-1] == 600_000 and paces[2][-1] == 400_000
    assert relay.drained_close  # its share ends once its last bytes have left the socket
    for response in landed:
        assert response.on_close is not None and isinstance(response.body, FileBody)
        assert response.drained_close
        response.on_close()
        os.close(response.body.fd)
    assert paces[0][-1] == 600_000  # ended: kept its share
    assert paces[1][-1] == 1_200_000 and not holder.service._pacing._paced  # the last upload had the whole rate


def test_a_connection_is_paced_by_the_kernel() -> None:
    """``Request.pace`` sets SO_MAX_PACING_RATE on the connection's socket; 0 lifts it."""
    with socket.socket() as sock:
        pace = _pacer(sock)
        assert pace is not None
        pace(1_500_000)
        assert struct.unpack("=I", sock.getsockopt(socket.SOL_SOCKET, _SO_MAX_PACING_RATE, 4)) == (1_500_000,)
        pace(0)
        assert struct.unpack("=I", sock.getsockopt(socket.SOL_SOCKET, _SO_MAX_PACING_RATE, 4)) == (0xFFFFFFFF,)
    assert _pacer(None) is None


async def test_each_chunk_request_and_each_404_is_a_debug_line_the_swarm_trace_reads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At DEBUG, a node logs every chunk request it makes (source, route, outcome, time) and its
    peer service every 404 it answers (why): the lines ``tests.bench.swarm_trace`` reads from a
    kept ``make bench-swarm`` run, parsed here from the real records so the two cannot drift."""
    from tests.bench.swarm_trace import parse_log, summarize

    caplog.set_level(logging.DEBUG, logger="p2pd.swarm")
    holder = _Holder(tmp_path / "holder")
    middle = _Holder(tmp_path / "middle", name="middle")
    async with trio.open_nursery() as nursery:
        holder_info = await nursery.start(partial(serve_http, holder.service.handle, "127.0.0.1", 0))
        middle.transfer.addresses["holder"] = f"127.0.0.1:{holder_info.port}"
        middle.transfer.lessees = {"holder": (0, 0)}
        nursery.start_soon(holder.fetch, 0, 0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(middle.swarm._fetch_chunk, middle.transfer, 0, "holder", lambda: None)
        with trio.fail_after(10):
            await wait_until(lambda: 0 in holder.transfer.arrivals, interval=0.01)
        await holder.pieces_in.send(DATA[:CHUNK])
        with trio.fail_after(10):
            await wait_until(lambda: 0 in middle.transfer.have, interval=0.01)
        with pytest.raises(OCIError):  # neither here nor on its way: 404 at once
            await holder.service.handle(holder.request(2, "middle"))
        nursery.cancel_scope.cancel()
    await middle.swarm.client.aclose()
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    requests, refusals = parse_log("n", [text.format(record) for record in caplog.records])
    assert [(r.index, r.source, r.route, r.outcome) for r in requests] == [(0, "holder", "range holder", "verified")]
    assert requests[0].digest == str(DIGEST) and 0 <= requests[0].end - requests[0].start < 10
    assert [(r.asker, r.index, r.reason) for r in refusals] == [("middle", 2, "not on its way (not fetched here now)")]
    # The same records as --log-format json writes them: the same requests, at the same times
    # (the text format's local time to the millisecond, the JSON's UTC).
    in_json, refused_in_json = parse_log("n", [JsonFormatter().format(record) for record in caplog.records])
    assert [(r.index, r.source, r.route, r.outcome) for r in in_json] == [(0, "holder", "range holder", "verified")]
    assert abs(in_json[0].end - requests[0].end) < 0.002
    assert [(r.asker, r.index, r.reason) for r in refused_in_json] == [(r.asker, r.index, r.reason) for r in refusals]
    summary = summarize(requests, refusals)
    assert summary["requests"] == 1 and summary["range_holders"] == 1
    assert summary["outcomes"] == {"range holder: verified": 1}


async def _never_answering(nursery: trio.Nursery) -> str:
    """An address that accepts connections and never answers on them: a stopped process, or a
    peer behind a congested uplink as its askers see it."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.abc.Stream] = []

    async def accept() -> None:
        while True:
            held.append(await listeners[0].accept())

    nursery.start_soon(accept)
    return f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"


def _failures(membership: Membership, node: str) -> int:
    """The failures in a row ``membership`` counts for ``node``."""
    return next(count for member, _, count, _, _ in membership.known() if member.node_id == node)


async def test_a_chunk_request_that_times_out_counts_against_a_silent_peer_not_a_slow_one(tmp_path: Path) -> None:
    """No byte of an answer for the read timeout: a peer that sent us nothing else meanwhile (a
    stopped or dead process) gets a failure — three in a row suspend it, and a suspended range
    holder is disputed; one that answered us lately, or is sending another answer now, is alive
    behind a congested uplink: asked again a second later, and not held against it (on thin
    equal links live range holders were suspended, disputed and their ranges fetched again)."""
    asker = _Holder(tmp_path, name="asker", peer_timeout=0.3)
    transfer, swarm = asker.transfer, asker.swarm
    async with trio.open_nursery() as nursery:
        address = await _never_answering(nursery)
        for node in ("gone", "answered", "sending"):
            swarm.membership.add(Member(node, address, "s"), "test")
            transfer.addresses[node] = address
            transfer.sources[node] = Bitmap.full(transfer.count)  # it claims every chunk
        sending = Exchange()
        swarm._exchanges_to["sending"] = {sending}  # another request of ours to it, in flight
        outcomes: dict[str, str] = {}

        async def ask(node: str) -> None:
            outcomes[node] = await swarm._fetch_chunk_from(transfer, 0, node, lambda: None)

        with trio.fail_after(10):
            async with trio.open_nursery() as requests:
                for node in ("gone", "answered", "sending"):
                    requests.start_soon(ask, node)
                await trio.sleep(0.15)  # while the three wait for their answers' first byte:
                swarm.membership.success("answered")  # a verified chunk from it
                sending._advance(1)  # a byte of its other answer
        nursery.cancel_scope.cancel()
    await swarm.client.aclose()
    assert outcomes["gone"].startswith("failed: ") and "timeout" in outcomes["gone"]
    assert _failures(swarm.membership, "gone") == 1
    for node in ("answered", "sending"):
        assert outcomes[node].startswith("slow: ") and _failures(swarm.membership, node) == 0
        assert transfer.retry_at[node] > 0 and node in transfer.sources  # asked again later, its claim kept


async def test_an_announcement_that_times_out_counts_against_a_silent_coordinator_not_a_slow_one(
    tmp_path: Path
) -> None:
    """The same for a digest's coordinator: an announcement it leaves unanswered for the peer
    timeout counts as its failure (three suspend it, and its digests move to the next member)
    unless it answered us meanwhile — then it is alive behind a congested uplink, and the
    announcement goes to the backup this once without holding it against the coordinator."""
    asker = _Holder(tmp_path, name="asker", peer_timeout=0.3)
    swarm = asker.swarm
    # A node id the digest's rendezvous ranks above the asker: its coordinator, the asker its backup.
    coordinator = next(node for node in (f"c{i}" for i in range(100))
                       if coordinators(str(DIGEST), [node, "asker"], 1) == [node])

    async def announce(answered_meanwhile: bool) -> None:
        async with trio.open_nursery() as waiting:
            if answered_meanwhile:
                async def answer_elsewhere() -> None:
                    await trio.sleep(0.15)
                    swarm.membership.success(coordinator)  # e.g. a verified chunk from it
                waiting.start_soon(answer_elsewhere)
            with trio.fail_after(10):
                reply = await swarm.announce(swarm._announcement(asker.transfer, DIGEST, want_lease=True))
            assert reply is not None  # from the backup (the asker itself)

    async with trio.open_nursery() as nursery:
        swarm.membership.add(Member(coordinator, await _never_answering(nursery), "s"), "test")
        await announce(answered_meanwhile=True)
        assert _failures(swarm.membership, coordinator) == 0
        await announce(answered_meanwhile=False)
        assert _failures(swarm.membership, coordinator) == 1
        nursery.cancel_scope.cancel()
    await swarm.client.aclose()
