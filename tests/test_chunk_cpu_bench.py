"""A tiny run of ``make bench-chunk-cpu`` (tests/bench/chunk_cpu.py) so the benchmark cannot rot."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.bench import chunk_cpu


def test_bench_chunk_cpu_tiny(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    assert chunk_cpu.main(["--out", str(out), "--cases", "64:2,64:0.5:16", "--repeat", "1"]) == 0
    text = out.read_text()
    assert "CPU per chunk" in text and "| 64 KiB | 2 MiB | no | 32 |" in text
    assert "| 64 KiB | 0.5 MiB | 16 Mbit/s | 8 |" in text
    assert "transport floor (receiver / sender)" in text
    floors = re.findall(r"\| ([0-9.]+) / ([0-9.]+) ms/MiB \|$", text, re.MULTILINE)
    assert len(floors) == 2 and all(float(value) > 0 for pair in floors for value in pair), floors
    assert (tmp_path / "bench" / "chunk_cpu.json").exists()
    if os.geteuid() == 0:
        # As root it runs where packets are a real link's size (its own namespace's loopback).
        assert "private network namespace with a 1500-byte MTU" in text


def test_a_case_whose_blob_would_be_cut_smaller_is_refused(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The chunk size of a case is the agents' largest: a blob under TARGET_CHUNKS of them would
    be measured in smaller chunks than its row says."""
    with pytest.raises(SystemExit):
        chunk_cpu.main(["--out", str(tmp_path / "b.md"), "--cases", "128:2", "--repeat", "1"])
    assert "cut in 64 KiB chunks, not 128 (chunk_size_for); use a blob of at least 16 MiB" in capsys.readouterr().err
