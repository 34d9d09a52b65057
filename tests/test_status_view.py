"""``p2pd status``: the table rendered from a status document, and the command against a real agent."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from rich.console import Console

import p2pd.cli
from p2pd.status_view import format_bytes, render_status
from tests.p2pd_support import agent_config, start_agent

MiB = 2**20
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64

SWARM_STATUS: dict[str, Any] = {
    "ready": True,
    "cache_bytes": 512 * MiB,
    "cache_max_bytes": 2048 * MiB,
    "cache_blobs": 7,
    "fetched_bytes": {"upstream": 100 * MiB, "peer": 300 * MiB},
    "served_bytes": 400 * MiB,
    "peer_served_bytes": 3 * MiB,
    "downloads": [{"digest": DIGEST_A, "size": 100 * MiB, "written": 40 * MiB, "released": 30 * MiB}],
    "node": {"id": "node-1", "address": "10.0.0.1:5081", "site": "rack-1"},
    "peers": [
        {"id": "node-2", "address": "10.0.0.2:5081", "site": "rack-1", "sources": ["mdns"], "failures": 0,
         "suspended": False, "banned": False},
        {"id": "node-3", "address": "10.0.1.3:5081", "site": "rack-2", "sources": ["dns", "static"],
         "failures": 4, "suspended": False, "banned": True},
    ],
    "transfers": [
        {"digest": DIGEST_A, "size": 100 * MiB, "chunks": 25, "have": 10, "leased": False, "lessee": "node-2",
         "peer_bytes": {"node-2": 30 * MiB}, "upstream_bytes": 10 * MiB},
        # Fetched for a peer, no local reader: progress from the chunk count.
        {"digest": DIGEST_B, "size": 8 * MiB, "chunks": 2, "have": 1, "leased": True, "lessee": None,
         "peer_bytes": {}, "upstream_bytes": 4 * MiB},
    ],
}


def _text(status: dict[str, Any]) -> str:
    console = Console(width=160, file=io.StringIO())
    console.print(render_status(status))
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def _matches(line: str, cells: tuple[str, ...]) -> bool:
    """Table rows match cell by cell (in order, other cells between allowed); summary lines by substring."""
    if "│" not in line:
        return all(cell in line for cell in cells)
    columns = iter(column.strip() for column in line.split("│"))
    return all(any(column == cell for column in columns) for cell in cells)


def _row(text: str, *cells: str) -> None:
    """Exactly one line shows every cell, in order."""
    lines = [line for line in text.splitlines() if _matches(line, cells)]
    assert len(lines) == 1, (cells, text)


@pytest.mark.parametrize(("value", "shown"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                              (20 * 2**30, "20.0 GiB"), (2**60, "1024.0 PiB")])
def test_format_bytes(value: int, shown: str) -> None:
    assert format_bytes(value) == shown


def test_swarm_status_table() -> None:
    text = _text(SWARM_STATUS)
    _row(text, "agent", "ready")
    _row(text, "node-1", "site rack-1", "10.0.0.1:5081")
    _row(text, "cache", "512.0 MiB of 2.0 GiB (25%)", "7 blobs")
    _row(text, "fetched", "peer", "300.0 MiB")
    _row(text, "fetched", "upstream", "100.0 MiB")
    _row(text, "served", "containerd", "400.0 MiB")
    _row(text, "served", "peers", "3.0 MiB")
    # Sites: this node counts in its own site; a banned peer is known but not live.
    _row(text, "rack-1 (this node)", "2", "2")
    _row(text, "rack-2", "0", "1")
    _row(text, "node-2", "10.0.0.2:5081", "rack-1", "live", "mdns", "0")
    _row(text, "node-3", "10.0.1.3:5081", "rack-2", "banned", "dns, static", "4")
    assert "2 transfers in flight" in text
    # The fetcher's bytes and the swarm's chunks of one blob are one row.
    _row(text, DIGEST_A[:19], "40.0 MiB / 100.0 MiB (40%)", "10/25", "30.0 MiB", "10.0 MiB", "node-2")
    _row(text, DIGEST_B[:19], "4.0 MiB / 8.0 MiB (50%)", "1/2", "0 B", "4.0 MiB", "this node")


def test_status_of_another_version_is_shown_without_the_missing_parts() -> None:
    text = _text({"ready": False, "downloads": [{"digest": DIGEST_A, "size": None, "written": 5}],
                  "fetched_bytes": "garbage", "peers": "garbage"})
    _row(text, "agent", "starting")
    _row(text, "node", "peer-to-peer off")
    _row(text, "cache", "0 B")
    _row(text, "fetched", "(nothing yet)")
    _row(text, DIGEST_A[:19], "size unknown", "5 B")
    assert "found by" not in text and "sites" not in text  # no swarm tables without a node


def test_idle_agent_says_nothing_is_in_flight() -> None:
    text = _text({"ready": True, "cache_bytes": 0, "cache_max_bytes": MiB, "downloads": []})
    assert "no transfers in flight" in text
    _row(text, "cache", "0 B of 1.0 MiB (0%)")


async def test_status_command_against_a_running_agent(
    tmp_path: Path, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    config = agent_config(tmp_path, "http://127.0.0.1:9", cache={"max_bytes": 3 * MiB})
    agent = await start_agent(nursery, config)

    assert await trio.to_thread.run_sync(p2pd.cli.main, ["status", "--endpoint", agent.info.url, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["cache_max_bytes"] == 3 * MiB
    assert document["cache_bytes"] == 0 and document["cache_blobs"] == 0
    assert document["ready"] is True

    assert await trio.to_thread.run_sync(p2pd.cli.main, ["status", "--endpoint", agent.info.url]) == 0
    text = capsys.readouterr().out
    _row(text, "agent", "ready")
    _row(text, "cache", "0 B of 3.0 MiB (0%)", "0 blobs")
    _row(text, "node", "peer-to-peer off")


def test_status_command_reports_an_unreachable_agent(capsys: pytest.CaptureFixture[str]) -> None:
    assert p2pd.cli.main(["status", "--endpoint", "http://127.0.0.1:9"]) == 1
    assert "cannot read status from http://127.0.0.1:9" in capsys.readouterr().err
