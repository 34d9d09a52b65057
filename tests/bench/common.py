"""Helpers shared by the benchmarks: /proc accounting, tool lookup, ratios, the Markdown report.

Every benchmark owns one marker-delimited section of ``docs/benchmarks.md`` (``update_doc``)
and measures CPU and memory of the processes it drives with ``Meter``, including the CPU that
other work on the machine takes from the cores meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from p2pd.oci.chunkmap import MIN_CHUNKS, TARGET_CHUNKS, chunk_size_for
from tests.harness.tools import clean_env

MIB = 1024 * 1024
DOC_HEADER = (
    "# Benchmarks\n\n"
    "Numbers measured by `make bench` on the machine described in each section. Every section is\n"
    "rewritten by its benchmark; raw results are in `docs/bench/`. Treat small differences as noise.\n"
)
_TICK = os.sysconf("SC_CLK_TCK")
X = "\u00d7"  # multiplication sign, for ratios
DASH = "\u2013"  # en dash, for ranges


class BenchError(Exception):
    """The benchmark cannot run or a server misbehaved."""


# ---- /proc accounting -------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` value of /proc/PID/status, e.g. ``VmHWM`` (peak RSS) or ``VmRSS``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def reset_peak_rss(pid: int) -> bool:
    """Resets VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``, Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values)
    return (total - idle) / _TICK, total / _TICK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def busy_cores(seconds: float) -> float:
    """How many cores the machine kept busy over the next ``seconds`` (before we start anything)."""
    busy0, total0 = machine_cpu_seconds()
    time.sleep(seconds)
    busy1, total1 = machine_cpu_seconds()
    ncpu = os.cpu_count() or 1
    return round(ncpu * (busy1 - busy0) / max(total1 - total0, 1e-9), 2)


class Meter:
    """CPU and memory used while one measurement runs against server ``pid``.

    ``others`` names further long-running processes whose CPU is recorded too (as
    ``<name>_cpu_s``) and is not counted as other work; reaped children (the clients) are
    ``client_cpu_s``.
    """

    def __init__(self, pid: int, others: Mapping[str, int] | None = None) -> None:
        self.pid = pid
        self.others = dict(others or {})
        self.rss_reset = reset_peak_rss(pid)
        self.server0 = process_cpu_seconds(pid)
        self.others0 = {name: process_cpu_seconds(p) for name, p in self.others.items()}
        self.children0 = children_cpu_seconds()
        self.self0 = self_cpu_seconds()
        self.machine0 = machine_cpu_seconds()[0]
        self.wall0 = time.perf_counter()

    def finish(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall0
        server = process_cpu_seconds(self.pid) - self.server0
        others = {name: process_cpu_seconds(p) - self.others0[name] for name, p in self.others.items()}
        clients = children_cpu_seconds() - self.children0
        ours = self_cpu_seconds() - self.self0
        machine = machine_cpu_seconds()[0] - self.machine0
        peak = process_status_kib(self.pid, "VmHWM")
        return {
            "wall_s": round(wall, 4),
            "server_cpu_s": round(server, 3),
            **{f"{name}_cpu_s": round(value, 3) for name, value in others.items()},
            "client_cpu_s": round(clients, 3),
            "bench_cpu_s": round(ours, 3),
            "machine_busy_cpu_s": round(machine, 3),
            # Everything else on the machine (other people's work) competing for the cores.
            "other_cpu_s": round(max(machine - server - sum(others.values()) - clients - ours, 0.0), 3),
            "server_peak_rss_kib": peak,
            "peak_rss_since_reset": self.rss_reset,
        }


# ---- tools ------------------------------------------------------------------------------


def find_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        raise BenchError(f"{name!r} not found; install it (make system-deps)")
    return path


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, timeout=10, check=False, env=clean_env())
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).decode("utf-8", "replace").strip()
    return text.splitlines()[0] if text else "unknown"


# ---- report -----------------------------------------------------------------------------


def recut(blob_bytes: int, chunk_size: int) -> str | None:
    """Why a benchmark run with ``chunk_size`` as the agents' largest chunk would not measure
    that size on a blob of ``blob_bytes`` (``chunk_size_for`` cuts smaller blobs smaller), and
    the smallest blob that would; None when it would measure it."""
    cut = chunk_size_for(blob_bytes, chunk_size)
    if cut == chunk_size:
        return None
    least = next(chunk_size * count for count in (MIN_CHUNKS, TARGET_CHUNKS)
                 if chunk_size_for(chunk_size * count, chunk_size) == chunk_size)
    return (f"a {blob_bytes / MIB:g} MiB blob is cut in {cut // 1024} KiB chunks, not {chunk_size // 1024} "
            f"(chunk_size_for); use a blob of at least {least / MIB:g} MiB")


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def update_doc(path: Path, section: str, mark_start: str, mark_end: str) -> None:
    """Replaces the marked section of ``path`` (appends it if absent; creates the file if missing)."""
    text = path.read_text() if path.exists() else DOC_HEADER
    block = f"{mark_start}\n{section}{mark_end}\n"
    start, end = text.find(mark_start), text.find(mark_end)
    if start != -1 and end > start:
        rest = text[end + len(mark_end):].lstrip("\n")
        text = text[:start] + block + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def run_and_publish(parser: argparse.ArgumentParser, argv: list[str] | None,
                    run: Callable[[argparse.Namespace, Callable[[str], None]], dict[str, Any]],
                    render: Callable[[dict[str, Any]], str], log: Callable[[str], None], *, name: str,
                    mark_start: str, mark_end: str) -> int:
    """A benchmark's ``main``: parses ``argv`` (``parser`` has the benchmark's own options; ``--out``
    and ``--json`` are added here), runs it, logs its section, writes the section into ``--out``
    (between its marks) and the raw report as JSON (``--json``, by default ``bench/<name>.json``
    next to ``--out``)."""
    parser.add_argument("--out", type=Path, help="Markdown file whose section of this benchmark is rewritten")
    parser.add_argument("--json", type=Path, help=f"raw results (default: docs/bench/{name}.json next to --out)")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    report = run(args, log)
    section = render(report)
    log(section)
    json_path = args.json
    if args.out is not None:
        update_doc(args.out, section, mark_start, mark_end)
        json_path = json_path or args.out.parent / "bench" / f"{name}.json"
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def machine_basics() -> dict[str, Any]:
    """CPUs, memory, kernel, Python and this tree's version."""
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
    try:
        from importlib.metadata import version

        seed_version = version("p2pd")
    except Exception:
        seed_version = "unknown"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_gib": round(mem_kib / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "seed_version": seed_version,
    }


def report_header(benchmark: str, argv: list[str]) -> dict[str, Any]:
    """The first keys of every benchmark's JSON report."""
    return {
        "benchmark": benchmark,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"python -m tests.bench.{benchmark} " + shlex.join(argv),
    }


def load_report(
    measurements: Sequence[Mapping[str, Any]], load_start: list[float], busy_before: float
) -> dict[str, Any]:
    """How busy the machine was before and during ``measurements`` (each with ``wall_s``,
    ``other_cpu_s`` and ``machine_busy_cpu_s``)."""
    other = sum(r["other_cpu_s"] for r in measurements)
    capacity = sum(r["wall_s"] for r in measurements) * (os.cpu_count() or 1)
    return {
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
        "busy_cores_before": busy_before,
        "other_cpu_s_during_measurements": round(other, 2),
        "machine_busy_cpu_s_during_measurements": round(sum(r["machine_busy_cpu_s"] for r in measurements), 2),
        "other_cpu_share": round(other / capacity, 3) if capacity else 0.0,
    }
