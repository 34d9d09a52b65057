"""A tiny run of ``make bench-signatures`` (tests/bench/signatures.py) so the benchmark cannot rot:
a real seed process, a real GPG key, signed images, warm and cold pulls with the policy on and off."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench import signatures


def test_bench_signatures_tiny(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    assert signatures.main(["--out", str(out), "--pulls", "20", "--rounds", "2", "--cold", "2"]) == 0
    text = out.read_text()
    assert "Signature policy: manifest pull latency" in text and "Goal (at most 5 ms per manifest)" in text
    report = json.loads((tmp_path / "bench" / "signatures.json").read_text())
    assert report["warm"]["on"]["n"] == report["warm"]["off"]["n"] == 40
    assert report["cold"]["on"]["n"] == 2 and report["cold"]["on"]["mean_ms"] > 0
    assert set(report["warm_added"]) == {"mean_ms", "p50_ms", "p99_ms"}
