"""A range holder's upstream response that stops mid-stream is reopened where it stopped
(``[swarm] upstream_stall``); a slow first byte is not cut (p2pd/fetcher.py, ``_upstream_range``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from p2pd.config import AgentConfig, ConfigError, SwarmConfig, _checked_swarm
from p2pd.fetcher import Fetcher
from p2pd.metrics import AgentMetrics
from p2pd.oci.digest import Digest

DATA = bytes(range(256)) * 64  # 16 KiB
DIGEST = Digest("sha256", "0" * 64)


class _StallingUpstream:
    """Serves ``DATA`` in 1 KiB pieces; the first response stops after ``stall_after`` bytes
    and never sends more, and every response waits ``first_byte`` seconds before its first."""

    def __init__(self, *, stall_after: int | None, first_byte: float = 0.0) -> None:
        self.stall_after = stall_after
        self.first_byte = first_byte
        self.opened: list[tuple[int, int | None]] = []

    @asynccontextmanager
    async def open_blob(self, repository: str, digest: Digest, offset: int = 0,
                        end: int | None = None) -> AsyncIterator[_StallingUpstream]:
        self.opened.append((offset, end))
        self._offset, self._end = offset, len(DATA) - 1 if end is None else end
        yield self

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        stall_after = self.stall_after if len(self.opened) == 1 else None
        await trio.sleep(self.first_byte)
        position = self._offset
        while position <= self._end:
            if stall_after is not None and position >= stall_after:
                await trio.sleep_forever()  # TCP backing off: the connection is open, nothing comes
            piece = DATA[position:min(position + 1024, self._end + 1)]
            position += len(piece)
            yield piece


async def _range(upstream: _StallingUpstream, stall: float) -> tuple[bytes, AgentMetrics]:
    metrics = AgentMetrics()
    fetcher = Fetcher(AgentConfig(), None, None, metrics)  # type: ignore[arg-type]  # the range path uses neither
    received = bytearray()

    async def accept(piece: bytes) -> None:
        received.extend(piece)

    with trio.fail_after(120):
        await fetcher._upstream_range(upstream, "repo", DIGEST, 0, len(DATA) - 1, accept,  # type: ignore[arg-type]
                                      stall=stall)
    return bytes(received), metrics


async def test_a_response_that_stops_mid_stream_is_reopened_where_it_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = _StallingUpstream(stall_after=5 * 1024)
    started = trio.current_time()
    data, metrics = await _range(upstream, stall=3.0)
    assert data == DATA
    assert upstream.opened == [(0, len(DATA) - 1), (5 * 1024, len(DATA) - 1)]
    assert trio.current_time() - started < 5.0  # 3 s of silence, then a new request
    assert metrics.registry.get_sample_value("p2pd_upstream_stalls_total") == 1


async def test_a_slow_first_byte_is_not_a_stall(autojump_clock: trio.testing.MockClock) -> None:
    """A registry may take long to start a blob (a pull-through cache fetching it first)."""
    upstream = _StallingUpstream(stall_after=None, first_byte=20.0)
    data, metrics = await _range(upstream, stall=3.0)
    assert data == DATA and len(upstream.opened) == 1
    assert metrics.registry.get_sample_value("p2pd_upstream_stalls_total") == 0


async def test_without_a_stall_bound_the_response_is_waited_for(autojump_clock: trio.testing.MockClock) -> None:
    upstream = _StallingUpstream(stall_after=5 * 1024)
    with trio.move_on_after(60) as waited:
        await _range(upstream, stall=0.0)
    assert waited.cancelled_caught and len(upstream.opened) == 1


def test_the_stall_bound_is_checked() -> None:
    assert _checked_swarm(SwarmConfig(upstream_stall=0.0)).upstream_stall == 0.0
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="upstream_stall"):
            _checked_swarm(SwarmConfig(upstream_stall=bad))
