"""A tiny run of ``make bench-scan`` (tests/bench/scan.py) so the benchmark cannot rot: the image
is built from this machine's files, scanned by a real seed process through the scan API, and
pulled from with curl while idle and while scanning, end to end on 2 MiB."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench import scan
from tests.harness.tools import require_tool


def test_bench_scan_tiny(tmp_path: Path) -> None:
    require_tool("curl")
    out = tmp_path / "benchmarks.md"
    status = scan.main(["--out", str(out), "--image-mib", "2", "--scan-reps", "1", "--clients", "2", "--batch", "5",
                        "--phase-s", "1", "--rounds", "1", "--max-scan-s", "60",
                        # Normal priority: "idle" lets other work on a busy test machine starve the scan.
                        "--serving-scan", 'priority = "normal"'])
    assert status == 0
    text = out.read_text()
    assert "Scanner throughput and serving while scanning" in text and "scanning / idle" in text
    report = json.loads((tmp_path / "bench" / "scan.json").read_text())
    assert report["params"]["image_mib_built"] >= 2
    throughput = report["throughput"]
    assert throughput["packages"] > 100 and throughput["findings"] > 0 and throughput["mib_s"] > 0
    assert throughput["scan_process_cpu_s"] > 0
    serving = report["serving"]
    assert serving["idle"]["requests"] > 0 and serving["scanning"]["requests"] > 0
    assert serving["idle"]["errors"] == serving["scanning"]["errors"] == 0
    assert serving["scanning"]["scan_cpu_s"] > 0
