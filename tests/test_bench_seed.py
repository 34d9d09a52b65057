"""A tiny run of ``make bench-seed`` (tests/bench/seed_throughput.py) so the benchmark cannot rot:
every server and row it reports (sendfile, pread, access control with bearer tokens, token issue
latency, docker-registry) is exercised end to end on a few MiB."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench import seed_throughput
from tests.harness.tools import require_tool


def test_bench_seed_tiny(tmp_path: Path) -> None:
    for tool in ("curl", "docker-registry", "htpasswd"):
        require_tool(tool)
    out = tmp_path / "benchmarks.md"
    status = seed_throughput.main(["--out", str(out), "--blob-mib", "2", "--concurrent-mib", "1", "--clients", "2",
                                   "--single-reps", "1", "--concurrent-reps", "1", "--token-requests", "5",
                                   "--budget-s", "60"])
    assert status == 0
    text = out.read_text()
    assert "seed (access control, bearer token)" in text and "Token issue latency" in text
    report = json.loads((tmp_path / "bench" / "seed_throughput.json").read_text())
    assert report["token_latency"]["requests"] == 5
    assert set(report["summary"]) >= {"seed", "seed-pread", "seed-auth", "seed-https", "docker-registry"}
    assert "HTTPS vs HTTP" in text
