"""Reading a slow upstream body a few packets at a time costs a pass through the HTTP client's
layers per read; ``p2pd.fetcher`` pauses after a short read until about ``_GATHER_BYTES`` more
could have come at the body's rate so far (at most ``_GATHER_PAUSE``), so the next read takes
what the kernel collected meanwhile. The link is simulated on trio's mock clock: a read returns
every byte that has arrived since the last one, or waits for the next packet, as a socket does."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from p2pd.config import AgentConfig
from p2pd.fetcher import _GATHER_BYTES, _GATHER_PAUSE, Download, Fetcher, _gathered, _ReadGathering, _Transfer
from p2pd.metrics import AgentMetrics
from p2pd.testing import MemoryBlobResponse, MemoryUpstream

PACKET = 1448


async def _link(data: bytes, rate: float, reads: list[int]) -> AsyncIterator[bytes]:
    """``data`` arriving at ``rate`` bytes/s in packets; each read takes all that has arrived."""
    start = trio.current_time()
    taken = 0
    while taken < len(data):
        arrived = min(len(data), int((trio.current_time() - start) * rate) // PACKET * PACKET)
        if arrived <= taken:
            await trio.sleep_until(start + (taken + PACKET) / rate)
            continue
        reads.append(arrived - taken)
        yield data[taken:arrived]
        taken = arrived
    await trio.lowlevel.checkpoint()


def test_no_pause_before_a_rate_is_known_nor_after_a_full_read_nor_at_the_end() -> None:
    gathering = _ReadGathering(100 + _GATHER_BYTES + 1024)
    assert gathering.pause_after(100, 10.0) == 0.0  # the first piece: passed on at once, no rate yet
    assert gathering.pause_after(_GATHER_BYTES, 10.5) == 0.0  # a read that gathered enough
    assert gathering.pause_after(1024, 11.0) == 0.0  # the last piece: nothing more to come


def test_the_pause_lets_a_reads_worth_come_at_the_bodys_rate() -> None:
    gathering = _ReadGathering()
    gathering.pause_after(1024, 0.0)
    # 20 KiB in 10 s since the first piece: 2 KiB/s.
    assert gathering.pause_after(20 * 1024, 10.0) == _GATHER_PAUSE  # _GATHER_BYTES would take 32 s
    rate = 1024 * 1024
    last = _GATHER_BYTES + 1024 - 4096  # leaves 4 KiB of the body to come
    gathering = _ReadGathering(1024 + rate // 100 + _GATHER_BYTES + 1024)
    gathering.pause_after(1024, 0.0)
    assert gathering.pause_after(rate // 100, 0.01) == pytest.approx(_GATHER_BYTES / rate, rel=1e-3)
    # Near the end, the wait is for the rest of the body only (4 KiB).
    assert gathering.pause_after(last, 0.02) == pytest.approx(4096 * 0.02 / (rate // 100 + last))


def test_the_pause_is_bounded_on_a_trickle() -> None:
    gathering = _ReadGathering()
    gathering.pause_after(1, 0.0)
    assert gathering.pause_after(1, 30.0) == _GATHER_PAUSE  # a byte in 30 s does not wait longer


async def test_a_slow_body_is_read_in_fewer_larger_pieces(autojump_clock: trio.testing.MockClock) -> None:
    data = bytes(range(256)) * 2048  # 512 KiB at 256 KiB/s: 2 s, 363 packets
    direct: list[int] = []
    async for _piece in _link(data, 256 * 1024, direct):
        pass
    gathered: list[int] = []
    received = bytearray()
    started = trio.current_time()
    async for piece in _gathered(_link(data, 256 * 1024, gathered), len(data)):
        received.extend(piece)
    assert bytes(received) == data
    assert len(direct) >= 300  # a read per packet (or two) without the pauses
    assert len(gathered) <= len(direct) // 5, (len(gathered), len(direct))
    # The pauses cost (almost) no time: near its end the wait is for the rest of the body only,
    # so it ends about when its last packet is here (not up to _GATHER_PAUSE late, which would
    # start the next request on an idle link).
    assert trio.current_time() - started <= 2.0 + _GATHER_PAUSE / 4


async def test_a_body_of_unknown_length_is_gathered_to_its_end(autojump_clock: trio.testing.MockClock) -> None:
    data = bytes(range(256)) * 1024
    reads: list[int] = []
    assert b"".join([piece async for piece in _gathered(_link(data, 128 * 1024, reads), None)]) == data
    assert len(reads) <= 182 // 5


async def test_a_fast_body_is_never_paused(autojump_clock: trio.testing.MockClock) -> None:
    async def fast() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * _GATHER_BYTES
            await trio.lowlevel.checkpoint()

    started = trio.current_time()
    assert sum([len(piece) async for piece in _gathered(fast(), 8 * _GATHER_BYTES)]) == 8 * _GATHER_BYTES
    assert trio.current_time() == started


_MEMORY_BODY = MemoryBlobResponse.aiter_bytes


class _SlowLinkUpstream(MemoryUpstream):
    """A ``MemoryUpstream`` whose bodies come over a link of ``rate`` bytes/s (``_link``)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate
        self.reads: list[int] = []

    async def _body(self, response: MemoryBlobResponse) -> AsyncIterator[bytes]:
        whole = b"".join([piece async for piece in _MEMORY_BODY(response)])
        async for piece in _link(whole, self.rate, self.reads):
            yield piece


@pytest.mark.parametrize("path", ["swarm range", "whole blob"])
async def test_both_upstream_paths_gather(autojump_clock: trio.testing.MockClock, path: str,
                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A range holder's ranges (``_upstream_range``) and the plain mirror path (``_transfer``)
    read through the same pauses."""
    upstream = _SlowLinkUpstream(128 * 1024)
    data = bytes(range(256)) * 1024  # 256 KiB: 2 s, 182 packets
    digest = upstream.add_blob("lab/blob", data)
    body: Callable[[MemoryBlobResponse], AsyncIterator[bytes]] = upstream._body
    monkeypatch.setattr(MemoryBlobResponse, "aiter_bytes", lambda response, on_dropped=None: body(response))
    fetcher = Fetcher(AgentConfig(), None, None, AgentMetrics())  # type: ignore[arg-type]  # neither path uses them
    if path == "swarm range":
        received = bytearray()

        async def accept(piece: bytes) -> None:
            received.extend(piece)

        await fetcher._upstream_range(upstream, "lab/blob", digest, 0, len(data) - 1, accept)
    else:
        fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            transfer = _Transfer(Download(digest, None, "lab/blob"), fd, None)
            await fetcher._transfer(transfer, upstream, "lab/blob")
            received = bytearray(os.pread(fd, len(data) + 1, 0))
        finally:
            os.close(fd)
    assert bytes(received) == data
    assert len(upstream.reads) <= 182 // 5, upstream.reads
