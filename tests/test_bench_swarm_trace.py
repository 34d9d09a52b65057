"""``tests.bench.swarm_trace``: what it makes of agents' DEBUG lines (pure; the lines' format is
checked against the real records in tests/test_swarm_relay.py)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from tests.bench.swarm_trace import main, parse_log, summarize

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def _request(second: float, index: int, source: str, route: str, outcome: str, took: float,
             digest: str = DIGEST) -> str:
    return (f"2026-12-07 10:00:{second:06.3f}".replace(".", ",") + f" DEBUG p2pd.swarm: chunk {index} of {digest} "
            f"from {source} ({route}): {outcome} after {took:.3f} s")


def _refusal(second: float, asker: str, index: int, reason: str) -> str:
    return (f"2026-12-07 10:00:{second:06.3f}".replace(".", ",") + f" DEBUG p2pd.swarm.service: {asker} asked for "
            f"chunk {index} of {DIGEST}: not here, {reason}")


def test_requests_are_counted_in_flight_per_route_and_node_and_404s_per_reason() -> None:
    n1, refused_n1 = parse_log("n1", [
        "2026-12-07 10:00:00,000 INFO p2pd.swarm.membership: peer n2 joined",  # skipped
        _request(3.0, 0, "n3", "range holder", "verified", 3.0),  # in flight 0-3 s
        _request(4.0, 1, "n2", "relay tree", "not there, relayed to n4", 1.0),  # 3-4 s
        _request(5.0, 5, "n3", "range holder", "verified", 1.0, digest=OTHER),  # another blob: not in the summary
    ])
    n2, refused_n2 = parse_log("n2", [
        _request(4.0, 1, "n3", "range holder", "verified", 4.0),  # 0-4 s
        _refusal(3.6, "n1", 1, "its relays here are all taken: sent to n4, which receives it from here"),
        _refusal(3.9, "n1", 2, "not on its way (not fetched here now)"),
    ])
    summary = summarize(n1 + n2, refused_n1 + refused_n2,
                        {"nodes_by_second": {"n1": [[0.5, 0.25], [1.0, 1.0]], "n2": [[0.25, 0.5], [0.5, 0.0]],
                                             "n3": [[0.0, 1.0], [0.0, 1.0]]}}, bin_s=2.0)
    assert summary["digest"] == DIGEST and summary["requests"] == 3 and summary["range_holders"] == 1
    assert summary["outcomes"] == {"range holder: verified": 2, "relay tree: not there": 1}
    first, second = summary["bins"]
    # n3 is the range holder but asked nothing: the "others" are n1 and n2; in flight per node
    # (from the first request: 0-2 s both of their first requests, 2-4 s a half and a whole one).
    assert first["others"] == {"range holder, delivered": 1.0}
    assert second["others"] == {"range holder, delivered": 0.75, "relay tree, not": 0.25}
    assert first["404s"] == {} and second["404s"] == {
        "its relays here are all taken: sent to a receiver": 1, "not on its way (not fetched here now)": 1}
    assert summary["last_chunk_s"] == {"min": 3.0, "median": 3.5, "max": 4.0}
    assert summary["link_use"] == {"others": [[0.38, 0.38], [0.75, 0.5]]}  # n3 asked nothing: not in a group


def test_a_run_without_debug_lines_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bed = tmp_path / "p2pbed-x"
    bed.mkdir()
    (bed / "p2pd-1-n1.log").write_text("2026-12-07 10:00:00,000 INFO p2pd.swarm: swarm node n1\n")
    assert main([str(bed)]) == 1
    assert "--agent-log-level DEBUG" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--keep"):
        main([str(tmp_path / "empty")])


def test_json_lines_are_read_like_text_lines() -> None:
    """``--log-format json`` (the agents' log for a shipper): the same requests and 404s, each at
    its UTC time; lines of other levels and lines that are not JSON objects are skipped."""
    text, refused_text = parse_log("n1", [_request(3.0, 0, "n3", "range holder", "verified", 3.0),
                                          _refusal(3.5, "n2", 1, "not on its way (not fetched here now)")])
    at = datetime.datetime.fromtimestamp(text[0].end, datetime.UTC).isoformat(timespec="milliseconds")
    json_lines = [
        json.dumps({"time": at, "level": "DEBUG", "logger": "p2pd.swarm",
                    "message": f"chunk 0 of {DIGEST} from n3 (range holder): verified after 3.000 s"}),
        json.dumps({"time": at, "level": "INFO", "logger": "p2pd.swarm",
                    "message": f"chunk 1 of {DIGEST} from n3 (range holder): verified after 1.000 s"}),
        json.dumps({"time": at, "level": "DEBUG", "logger": "p2pd.swarm.service",
                    "message": f"n2 asked for chunk 1 of {DIGEST}: not here, not on its way (not fetched here now)"}),
        "{not json", json.dumps(["a", "list"]), json.dumps({"level": "DEBUG", "time": "yesterday"}),
    ]
    got, refused = parse_log("n1", json_lines)
    assert got == text
    assert [(r.asker, r.index, r.reason, r.at) for r in refused] == [
        (r.asker, r.index, r.reason, text[0].end) for r in refused_text]
