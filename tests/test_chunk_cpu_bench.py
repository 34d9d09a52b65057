"""A tiny run of ``make bench-chunk-cpu`` (tests/bench/chunk_cpu.py) so the benchmark cannot rot."""

from __future__ import annotations

from pathlib import Path

from tests.bench import chunk_cpu


def test_bench_chunk_cpu_tiny(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    assert chunk_cpu.main(["--out", str(out), "--cases", "128:2,128:0.5:16", "--repeat", "1"]) == 0
    text = out.read_text()
    assert "CPU per chunk" in text and "| 128 KiB | 2 MiB | no | 16 |" in text
    assert "| 128 KiB | 0.5 MiB | 16 Mbit/s | 4 |" in text
    assert (tmp_path / "bench" / "chunk_cpu.json").exists()
