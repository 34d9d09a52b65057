"""A tiny run of ``make bench-p2pd-auth`` (tests/bench/p2pd_auth.py) so the benchmark cannot rot."""

from __future__ import annotations

from pathlib import Path

from tests.bench import p2pd_auth


def test_bench_p2pd_auth_tiny(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    assert p2pd_auth.main(["--out", str(out), "--layers", "1", "--layer-mib", "0.5", "--repeat", "1",
                           "--decisions", "200"]) == 0
    text = out.read_text()
    assert "authorization at the node" in text and "| tls+checks |" in text
