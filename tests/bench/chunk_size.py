"""``make bench-chunks``: which swarm chunk size distributes one blob to a group of agents fastest.

For every chunk size (default 128 KiB, 256 KiB, 512 KiB, 1 MiB), loopback only. A size is the
agents' and the seed's largest; a blob too small for it would be cut in smaller chunks
(``chunk_size_for``: at least 512 chunks of more than 128 KiB), so a size is refused unless the blob
(``--blob-mib``) comes in chunks of exactly that size:

1. One seed per size (``[storage] chunk_size = S``, so the chunk map is computed during the
   push), all pushed the same random blob (``--blob-mib``, default 512), streamed from a file.
2. Each repetition starts ``--agents`` (default 5) fresh agents (new data directories), with
   peer endpoints on distinct addresses 127.0.0.11, 127.0.0.12, ..., static peers, a cluster
   key, no mDNS, ``[swarm] chunk_size = S`` and rate limits that make the transfer
   network-limited instead of CPU-limited on a small machine: ``[swarm] upload_rate``
   (``--upload-rate``, default 20 MiB/s: what each agent serves to peers) and
   ``[swarm] upstream_rate`` (``--upstream-rate``, default 20 MiB/s: what the lease holder
   fetches from the seed). Uploads are paced by the kernel (``SO_MAX_PACING_RATE``, the rate ÷
   uploads in progress); the upstream's token bucket starts with one second of burst. At 40 MiB/s
   the benchmark's processes used ~80 % of a 2-core machine (CPU-bound); at 20 MiB/s about
   half, which every run checks and reports (CPU seconds of all processes vs wall time).
3. Once every agent sees all others, one thread per agent is released at the same moment
   and GETs the blob through its agent (httpx streaming, sha256 while reading). Completion
   time = release to last byte, verified. A body the agent cuts short (no progress for
   ``fetch.stall_timeout``) is resumed with Range, as containerd does, and counted.
4. After every agent committed the blob: seed egress (``seed_blob_bytes_sent_total`` delta /
   blob size), seed blob GETs, peer chunk requests (verified + failed chunks and requests
   answered 429 from the agents' ``/metrics``, timed-out or failed requests from their INFO
   log; announcements, chunk-map requests and 404s are not exported by the agent), the
   distinct sources each node received chunks from
   (``p2pd_peer_fetched_bytes_total{peer}``, plus the seed), and CPU seconds of the seed, every
   agent and this process (the clients), plus what other work on the machine used meanwhile.

Repetitions are interleaved (all sizes, then all sizes again in reverse order, ...) so a
change in background load hits every size alike. After the first full round, a round is
started only if it is likely to end within ``--budget-s``.

Writes the section between ``<!-- bench-chunks:start -->`` and ``<!-- bench-chunks:end -->``
of the Markdown file given by ``--out`` (other sections are kept) and the raw numbers as JSON
(default ``docs/bench/chunk_size.json`` next to it); prints the section to stdout.

    python -m tests.bench.chunk_size --out docs/benchmarks.md [--sizes 128K,256K,512K,1M] [--reps 3] ...
    python -m tests.bench.chunk_size --out docs/benchmarks.md --render-json docs/bench/chunk_size.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.bench.common import (
    DASH,
    MIB,
    BenchError,
    Meter,
    X,
    busy_cores,
    loadavg,
    machine_basics,
    recut,
    report_header,
    update_doc,
)
from tests.bench.seed_throughput import REPO, Blob, make_blob, push_blob
from tests.harness.net import assert_loopback, free_port
from tests.harness.p2pd_process import P2pdProcess, Samples
from tests.harness.seed_process import SeedProcess
from tests.harness.tools import tail

MARK_START = "<!-- bench-chunks:start -->"
MARK_END = "<!-- bench-chunks:end -->"
SECTION_TITLE = "## Swarm chunk size (make bench-chunks)"
DEFAULT_SIZES = "128K,256K,512K,1M"
KIB = 1024
_PEER_HOST = "127.0.0.{}"
_FIRST_HOST = 11  # agents' peer endpoints: 127.0.0.11, 127.0.0.12, ...
_MEMBERSHIP_TIMEOUT_S = 20.0
_MAX_RESUMES = 5
_SETTLE_TIMEOUT_S = 20.0  # for every agent to commit the blob after its client finished
# INFO/WARNING lines of the agent's swarm engine (p2pd/swarm/engine.py) worth counting.
_LOG_EVENTS = {
    "peer_request_errors": re.compile(r"chunk \d+ of \S+ from \S+ failed: "),  # timeout or connection error
    "coordinator_unreachable": re.compile(r"coordinator \S+ unreachable"),
    "stuck_fallbacks": re.compile(r"from peers for \d+s; fetching from the upstream"),
}


def parse_size(text: str) -> int:
    """``256K``, ``1M``, ``16MiB``, ``1048576`` → bytes."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    units = {"k": KIB, "m": MIB, "g": 1024 * MIB}
    try:
        if value and value[-1] in units:
            return int(float(value[:-1]) * units[value[-1]])
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def size_label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB and size % MIB == 0 else f"{size // KIB} KiB"


def _metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _label_values(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for (metric, labels), value in samples.items()
            if metric == name and label in dict(labels)}


def _late(started: float, max_time: float) -> bool:
    return time.perf_counter() - started > max_time


def _pid(proc: Any) -> int:
    if proc is None or proc.poll() is not None:
        raise BenchError("a process of the benchmark is not running")
    return int(proc.pid)


# ---- the swarm --------------------------------------------------------------------------


@dataclass
class SizeSetup:
    chunk_size: int
    seed: SeedProcess
    map_bytes: int = 0  # size of the seed's msgpack chunk map for the blob
    runs: list[dict[str, Any]] = field(default_factory=list)


def start_seed(root: Path, chunk_size: int) -> SeedProcess:
    workdir = root / f"seed-{chunk_size}"
    workdir.mkdir(parents=True)
    config = workdir / "seed.toml"
    config.write_text(f"[storage]\nchunk_size = {chunk_size}\n")
    return SeedProcess(workdir / "data", config_path=config, log_level="WARNING",
                       log_path=workdir / "seed.log").start()


def agent_config(path: Path, *, index: int, count: int, ports: list[int], key_file: Path, chunk_size: int,
                 upload_rate: int, upstream_rate: int) -> None:
    peers = [f"{_PEER_HOST.format(_FIRST_HOST + j)}:{ports[j]}" for j in range(count) if j != index]
    path.write_text("\n".join([
        "[swarm]",
        f'peer_listen = "{_PEER_HOST.format(_FIRST_HOST + index)}:{ports[index]}"',
        f'node_id = "bench-{index}"',
        f"peers = {json.dumps(peers)}",
        f'cluster_key_file = "{key_file}"',
        "mdns = false",
        f"chunk_size = {chunk_size}",
        f"upload_rate = {upload_rate}",
        f"upstream_rate = {upstream_rate}",
        "",
    ]))


def start_agents(workdir: Path, seed: SeedProcess, *, count: int, key_file: Path, chunk_size: int,
                 upload_rate: int, upstream_rate: int) -> list[P2pdProcess]:
    """``count`` fresh agents (started in parallel); raises BenchError if one does not start."""
    ports = [free_port(_PEER_HOST.format(_FIRST_HOST + i)) for i in range(count)]
    agents = []
    for i in range(count):
        config = workdir / f"agent-{i}.toml"
        agent_config(config, index=i, count=count, ports=ports, key_file=key_file, chunk_size=chunk_size,
                     upload_rate=upload_rate, upstream_rate=upstream_rate)
        agents.append(P2pdProcess(workdir / f"agent-{i}", [f"{seed.host}={seed.url}"], config_path=config,
                                  log_path=workdir / f"agent-{i}.log"))
    with ThreadPoolExecutor(count) as pool:
        outcomes = list(pool.map(_try_start, agents))
    errors = [error for error in outcomes if error]
    if errors:
        stop_agents(agents)
        raise BenchError("agent did not start: " + errors[0])
    return agents


def _try_start(agent: P2pdProcess) -> str:
    try:
        agent.start()
    except RuntimeError as exc:
        return str(exc)
    return ""


def stop_agents(agents: list[P2pdProcess]) -> None:
    with ThreadPoolExecutor(max(1, len(agents))) as pool:
        list(pool.map(lambda agent: agent.stop(), agents))


def status(client: httpx.Client, agent: P2pdProcess) -> dict[str, Any]:
    response = client.get(f"{agent.url}/debug/status")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def wait_membership(client: httpx.Client, agents: list[P2pdProcess]) -> float:
    """Waits until every agent knows all others and none is suspended or banned; returns seconds."""
    started = time.monotonic()
    deadline = started + _MEMBERSHIP_TIMEOUT_S
    while True:
        views = [status(client, a) for a in agents]
        if all(sum(1 for p in v.get("peers", []) if not p["suspended"] and not p["banned"]) == len(agents) - 1
               for v in views):
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise BenchError(f"agents did not see each other within {_MEMBERSHIP_TIMEOUT_S:.0f} s: "
                             + "; ".join(f"{a.url}: {len(v.get('peers', []))} peers" for a, v in zip(agents, views,
                                                                                                 strict=True)))
        time.sleep(0.1)


def log_events(path: Path) -> dict[str, int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return {name: len(pattern.findall(text)) for name, pattern in _LOG_EVENTS.items()}


def wait_settled(client: httpx.Client, agents: list[P2pdProcess]) -> bool:
    """Waits until no agent has a download or swarm transfer in flight (all committed)."""
    deadline = time.monotonic() + _SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        views = [status(client, a) for a in agents]
        if all(not v.get("downloads") and not v.get("transfers") for v in views):
            return True
        time.sleep(0.05)
    return False


# ---- one repetition ---------------------------------------------------------------------


def pull_all(agents: list[P2pdProcess], seed: SeedProcess, blob: Blob, max_time: float) -> list[dict[str, Any]]:
    """One thread per agent, released together; each GETs the blob and hashes it while reading.

    A body cut short (the agent closes a stream that made no progress for ``fetch.stall_timeout``)
    is resumed with ``Range: bytes=N-``, as containerd does, up to ``_MAX_RESUMES`` times.
    """
    results: list[dict[str, Any]] = [{} for _ in agents]
    released = {"at": 0.0}
    barrier = threading.Barrier(len(agents), action=lambda: released.__setitem__("at", time.perf_counter()))

    def pull(index: int) -> None:
        url = f"{agents[index].url}/v2/{REPO}/blobs/{blob.digest}?ns={seed.host}"
        assert_loopback(url)
        sha = hashlib.sha256()
        size = 0
        statuses: list[int] = []
        errors: list[str] = []
        with httpx.Client(trust_env=False, timeout=httpx.Timeout(max_time, connect=10.0)) as client:
            barrier.wait()
            while size < blob.size and len(statuses) <= _MAX_RESUMES and not _late(released["at"], max_time):
                headers = {"Range": f"bytes={size}-"} if size else {}
                try:
                    with client.stream("GET", url, headers=headers) as response:
                        statuses.append(response.status_code)
                        if response.status_code != (206 if size else 200):
                            errors.append(f"HTTP {response.status_code} at byte {size}")
                            break
                        for piece in response.iter_raw(MIB):
                            sha.update(piece)
                            size += len(piece)
                            if _late(released["at"], max_time):
                                break
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__} at byte {size}: {str(exc)[:120]}")
        seconds = time.perf_counter() - released["at"]
        ok = size == blob.size and f"sha256:{sha.hexdigest()}" == blob.digest
        if not ok:
            errors.append(f"{size} of {blob.size} bytes after {seconds:.1f} s"
                          + (", digest mismatch" if size == blob.size else ""))
        results[index] = {"seconds": round(seconds, 3), "ok": ok, "statuses": statuses, "bytes": size,
                          "resumes": max(len(statuses) - 1, 0), "errors": errors}

    threads = [threading.Thread(target=pull, args=(i,), name=f"pull-{i}") for i in range(len(agents))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max_time + 30)
    return results


def run_once(root: Path, setup: SizeSetup, blob: Blob, rep: int, args: argparse.Namespace,
             key_file: Path) -> dict[str, Any]:
    workdir = root / f"run-{setup.chunk_size}-{rep}"
    workdir.mkdir()
    seed = setup.seed
    agents = start_agents(workdir, seed, count=args.agents, key_file=key_file, chunk_size=setup.chunk_size,
                          upload_rate=int(args.upload_rate * MIB), upstream_rate=int(args.upstream_rate * MIB))
    try:
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            membership_s = wait_membership(client, agents)
            seed_before = seed.metrics()
            pids = {f"agent{i}": _pid(a.proc) for i, a in enumerate(agents)}
            meter = Meter(_pid(seed.proc), pids)
            pulls = pull_all(agents, seed, blob, args.max_time)
            settled = wait_settled(client, agents)
            usage = meter.finish()
            seed_after = seed.metrics()
            agent_samples = [a.metrics() for a in agents]
    finally:
        stop_agents(agents)
    events = [log_events(workdir / f"agent-{i}.log") for i in range(len(agents))]
    failures = [p for p in pulls if not p["ok"]]
    if failures:
        print(f"  failed pulls: {[p['errors'] for p in failures]}", flush=True)
        for i, pulled in enumerate(pulls):
            if not pulled["ok"]:
                print(f"  --- agent {i} log tail:\n{tail(workdir / f'agent-{i}.log', 800)}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)

    def seed_delta(name: str, **labels: str) -> float:
        return _metric(seed_after, name, **labels) - _metric(seed_before, name, **labels)

    nodes = []
    for i, samples in enumerate(agent_samples):
        peer_bytes = {peer: int(v) for peer, v in _label_values(samples, "p2pd_peer_fetched_bytes_total",
                                                                "peer").items() if v > 0}
        upstream = int(_metric(samples, "p2pd_fetched_bytes_total", source="upstream"))
        verified = int(_metric(samples, "p2pd_chunks_verified_total"))
        nodes.append({
            "node": f"bench-{i}",
            "seconds": pulls[i]["seconds"],
            "ok": pulls[i]["ok"],
            "resumes": pulls[i]["resumes"],
            "errors": pulls[i]["errors"],
            "upstream_bytes": upstream,
            "peer_bytes": peer_bytes,
            "distinct_sources": len(peer_bytes) + (1 if upstream else 0),
            "leases": int(_metric(samples, "p2pd_leases_total")),
            "chunks_verified": verified,
            "chunks_failed": int(_metric(samples, "p2pd_chunks_failed_total")),
            "uploads_refused": int(_metric(samples, "p2pd_peer_uploads_refused_total")),
            "peer_served_bytes": int(_metric(samples, "p2pd_peer_served_bytes_total")),
            # Every verified peer chunk is exactly one chunk long (the blob is a multiple of S):
            # this checks that the agents really used the size under test.
            "observed_chunk_size": (sum(peer_bytes.values()) // verified) if verified else None,
            "cpu_s": usage[f"agent{i}_cpu_s"],
            **events[i],
        })
    times = sorted(p["seconds"] for p in pulls if p["ok"])
    lessee = [n["seconds"] for n in nodes if n["upstream_bytes"] and n["ok"]]
    agents_cpu = sum(n["cpu_s"] for n in nodes)
    ours = usage["server_cpu_s"] + agents_cpu + usage["bench_cpu_s"]
    ncpu = len(os.sched_getaffinity(0))
    return {
        "rep": rep,
        "chunk_size": setup.chunk_size,
        "membership_s": round(membership_s, 2),
        "settled": settled,
        "failures": len(failures),
        "client_resumes": sum(p["resumes"] for p in pulls),
        "completion_p50_s": round(statistics.median(times), 3) if times else None,
        "completion_max_s": round(max(times), 3) if times and not failures else None,
        # How long after the (first) node that fetched from the seed the last node was done.
        "behind_lessee_s": round(max(times) - min(lessee), 3) if lessee and not failures else None,
        "seed_egress_bytes": int(seed_delta("seed_blob_bytes_sent_total")),
        "seed_egress_ratio": round(seed_delta("seed_blob_bytes_sent_total") / blob.size, 3),
        "seed_blob_gets": int(seed_delta("seed_http_requests_total", method="GET", route="blob", status="206")
                              + seed_delta("seed_http_requests_total", method="GET", route="blob", status="200")),
        "seed_map_gets": int(seed_delta("seed_http_requests_total", method="GET", route="chunks", status="200")),
        "peer_chunk_requests": sum(n["chunks_verified"] + n["chunks_failed"] + n["uploads_refused"]
                                   + n["peer_request_errors"] for n in nodes),
        "chunks_failed": sum(n["chunks_failed"] for n in nodes),
        "peer_request_errors": sum(n["peer_request_errors"] for n in nodes),
        "coordinator_unreachable": sum(n["coordinator_unreachable"] for n in nodes),
        "stuck_fallbacks": sum(n["stuck_fallbacks"] for n in nodes),
        "uploads_refused": sum(n["uploads_refused"] for n in nodes),
        # Copies of the blob the node(s) fetching from the seed uploaded to peers (ideal: about 1).
        "lessee_upload_ratio": round(sum(n["peer_served_bytes"] for n in nodes if n["upstream_bytes"])
                                     / blob.size, 2),
        "sources_min": min(n["distinct_sources"] for n in nodes),
        "sources_max": max(n["distinct_sources"] for n in nodes),
        "cpu": {
            "seed_s": usage["server_cpu_s"],
            "agents_s": round(agents_cpu, 2),
            "agent_max_share": round(max(n["cpu_s"] for n in nodes) / usage["wall_s"], 3),
            "clients_s": usage["bench_cpu_s"],
            "total_s": round(ours, 2),
            "wall_s": usage["wall_s"],
            "share_of_machine": round(ours / (usage["wall_s"] * ncpu), 3),
            "other_s": usage["other_cpu_s"],
            "machine_busy_s": usage["machine_busy_cpu_s"],
            "machine_busy_share": round(usage["machine_busy_cpu_s"] / (usage["wall_s"] * ncpu), 3),
        },
        "nodes": nodes,
        "pulls": pulls,
    }


# ---- summary and report -----------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(setup: SizeSetup, blob_size: int) -> dict[str, Any]:
    runs = setup.runs
    p50 = [r["completion_p50_s"] for r in runs if r["completion_p50_s"] is not None]
    worst = [r["completion_max_s"] for r in runs if r["completion_max_s"] is not None]
    return {
        "chunk_size": setup.chunk_size,
        "label": size_label(setup.chunk_size),
        "chunks": -(-blob_size // setup.chunk_size),
        "map_bytes": setup.map_bytes,
        "reps": len(runs),
        "failed_pulls": sum(r["failures"] for r in runs),
        "resumes_total": sum(r["client_resumes"] for r in runs),
        "lessee_upload_median": _median([r["lessee_upload_ratio"] for r in runs]),
        "p50_s": _median(p50),
        "max_s_median": _median(worst),
        "max_s_worst": max(worst) if worst and len(worst) == len(runs) else None,
        "behind_lessee_median": _median([r["behind_lessee_s"] for r in runs if r["behind_lessee_s"] is not None]),
        "egress_median": _median([r["seed_egress_ratio"] for r in runs]),
        "egress_max": max(r["seed_egress_ratio"] for r in runs) if runs else None,
        "peer_requests_median": _median([r["peer_chunk_requests"] for r in runs]),
        "request_errors_total": sum(r["peer_request_errors"] for r in runs),
        "refused_total": sum(r["uploads_refused"] for r in runs),
        "chunks_failed_total": sum(r["chunks_failed"] for r in runs),
        "stuck_fallbacks_total": sum(r["stuck_fallbacks"] for r in runs),
        "sources_min": min(r["sources_min"] for r in runs) if runs else None,
        "sources_max": max(r["sources_max"] for r in runs) if runs else None,
        "cpu_total_median": _median([r["cpu"]["total_s"] for r in runs]),
        "cpu_agents_median": _median([r["cpu"]["agents_s"] for r in runs]),
        "cpu_share_max": max(r["cpu"]["share_of_machine"] for r in runs) if runs else None,
        "agent_share_max": max(r["cpu"]["agent_max_share"] for r in runs) if runs else None,
    }


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "?" if value is None else format(value, spec)


def render_table(summary: list[dict[str, Any]], reps: int) -> str:
    head = ["Chunk size", "chunks / map bytes", f"p50 s (median of {reps})", "max s (median; worst)",
            "last node after lease holder s (median)", f"seed egress {X} blob (median; max)",
            "peer chunk GETs (median)",
            "of which timed out or failed / 429 / bad bytes (all reps)",
            f"sources per node (min{DASH}max)", "CPU s all processes (median)", "CPU share of machine (max)",
            "failed pulls (streams resumed)"]
    rows = [head, ["---"] * len(head)]
    for s in summary:
        rows.append([
            s["label"],
            f"{s['chunks']} / {s['map_bytes']}",
            _fmt(s["p50_s"]),
            f"{_fmt(s['max_s_median'])}; {_fmt(s['max_s_worst'])}",
            _fmt(s["behind_lessee_median"]),
            f"{_fmt(s['egress_median'])}; {_fmt(s['egress_max'])}",
            _fmt(s["peer_requests_median"], ".0f"),
            f"{s['request_errors_total']} / {s['refused_total']} / {s['chunks_failed_total']}",
            f"{s['sources_min']}{DASH}{s['sources_max']}",
            _fmt(s["cpu_total_median"], ".1f"),
            "?" if s["cpu_share_max"] is None else f"{s['cpu_share_max']:.0%}",
            f"{s['failed_pulls']} ({s['resumes_total']})",
        ])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


_TIE = 1.05  # sizes within 5 % of the fastest (median time until every node has the blob) are a tie


def _ties(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    complete = [s for s in summary if s["max_s_median"] is not None and s["failed_pulls"] == 0]
    if not complete:
        return []
    fastest = min(s["max_s_median"] for s in complete)
    return [s for s in complete if s["max_s_median"] <= fastest * _TIE]


def best_size(summary: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Fastest to bring every node the blob (median max); among near-ties (5 %) the lowest p50, then CPU."""
    close = _ties(summary)
    return min(close, key=lambda s: (s["p50_s"] or 0.0, s["cpu_total_median"] or 0.0)) if close else None


def conclusion(summary: list[dict[str, Any]], default_size: int) -> list[str]:
    best = best_size(summary)
    if best is None:
        return ["**No chunk size completed every pull**; see the raw numbers."]
    tied = [s for s in _ties(summary) if s is not best]
    default = next((s for s in summary if s["chunk_size"] == default_size), None)
    summary = sorted(summary, key=lambda s: s["chunk_size"])
    head = (f"**Best measured: {best['label']}** — every node had the blob after {best['max_s_median']:.2f} s "
            f"(median over repetitions; p50 {best['p50_s']:.2f} s), with {best['peer_requests_median']:.0f} peer "
            f"chunk requests and {best['cpu_total_median']:.1f} CPU s")
    if tied:
        head += (f"; tied within {_TIE - 1:.0%} with "
                 + ", ".join(f"{s['label']} ({s['max_s_median']:.2f} s, {s['peer_requests_median']:.0f} requests, "
                             f"{s['cpu_total_median']:.1f} CPU s)" for s in tied)
                 + ": on this machine the difference is noise")
    lines = [f"- {head}."]
    slower = [s for s in summary if s is not best and s not in tied]
    if slower:
        lines.append("- Slower: " + "; ".join(
            f"{s['label']} {_fmt(s['max_s_median'])} s ({_fmt(s['peer_requests_median'], '.0f')} requests, "
            f"{_fmt(s['cpu_total_median'], '.1f')} CPU s, {s['failed_pulls']} failed pulls)" for s in slower) + ".")
    smallest, largest = summary[0], summary[-1]
    if smallest is not best and smallest["cpu_total_median"] and best["cpu_total_median"]:
        lines.append(f"- Smallest ({smallest['label']}): {smallest['peer_requests_median']:.0f} peer requests "
                     f"({smallest['peer_requests_median'] / max(best['peer_requests_median'] or 1, 1):.1f}{X} the "
                     f"best), {smallest['cpu_total_median']:.1f} CPU s "
                     f"({smallest['cpu_total_median'] / best['cpu_total_median']:.2f}{X}), a "
                     f"{smallest['map_bytes']}-byte map.")
    if largest is not best and largest["behind_lessee_median"] is not None:
        lines.append(f"- Largest ({largest['label']}): the last node finished {largest['behind_lessee_median']:.2f} s "
                     f"after the lease holder (best: {_fmt(best['behind_lessee_median'])} s); "
                     f"{largest['request_errors_total']} peer requests timed out or failed over all repetitions, "
                     f"and the lease holder uploaded {_fmt(largest['lessee_upload_median'])} copies of the blob "
                     f"(best: {_fmt(best['lessee_upload_median'])}).")
    if default is None:
        pass
    elif default is best:
        lines.append(f"- The default ({size_label(default_size)}) is the best size measured here"
                     + (" (tied, see above)." if tied else "."))
    elif default in tied:
        lines.append(f"- The default ({size_label(default_size)}) is tied with the best (within {_TIE - 1:.0%}).")
    elif default["max_s_median"] is not None and default["failed_pulls"] == 0:
        behind = default["max_s_median"] / best["max_s_median"] - 1
        lines.append(f"- The default ({size_label(default_size)}) is slower than the best "
                     f"({behind:+.0%} on the time until every node has the blob).")
    else:
        lines.append(f"- The default ({size_label(default_size)}) had failed pulls in this run.")
    return lines


def cpu_check_text(check: dict[str, Any], nproc: int) -> str:
    verdict = ("so the rate limits, not the CPU, set the pace" if check["network_limited"]
               else "so some repetitions were at least partly CPU-bound: read the times with care")
    return (f"CPU check (is the machine the bottleneck?): per repetition, the CPU seconds of the seed, all agents and "
            f"the clients over wall {X} {nproc} cores: median {check['share_median']:.0%}, max "
            f"{check['share_max']:.0%}; the busiest agent (one trio thread) used at most "
            f"{check['agent_share_max']:.0%} of one core. The whole machine, other people's work included, was "
            f"busy {check['machine_median']:.0%} (median) and {check['machine_max']:.0%} (max) of its cores; "
            f"{check['saturated_reps']} of {check['reps']} repetitions above 90 % — {verdict}.")


def render_section(report: dict[str, Any]) -> str:
    m, p, load = report["machine"], report["params"], report["load"]
    summary = report["summary"]
    blob_mib = p["blob_mib"]
    lessee_bound = max(blob_mib - p["upstream_rate_mib_s"], 0) / p["upstream_rate_mib_s"]
    lines = [
        SECTION_TITLE,
        "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}` (`make bench-chunks`)",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; p2pd {m['seed_version']} (this tree)",
        f"- Setup: one seed (`[storage] chunk_size = S`) and {p['agents']} agents (`[swarm] chunk_size = S`, "
        f"fresh data directories every repetition, peer endpoints on 127.0.0.{_FIRST_HOST}"
        f"{DASH}{_FIRST_HOST + p['agents'] - 1}, static peers, cluster key, no mDNS). "
        f"`[swarm] upload_rate` = {p['upload_rate_mib_s']:g} MiB/s per agent, `upstream_rate` = "
        f"{p['upstream_rate_mib_s']:g} MiB/s (the lease holder's fetch from the seed); uploads paced by the "
        "kernel (the rate ÷ uploads in progress), the upstream's token bucket starts with one second of burst.",
        f"- Workload: one {blob_mib} MiB random blob; all {p['agents']} agents' clients (httpx, sha256 while "
        f"reading) GET it at the same moment. {p['reps_done']} repetitions per size, interleaved across sizes. "
        f"Lower bound set by the upstream limit: the lease holder needs ≈ {lessee_bound:.1f} s for the blob "
        f"({blob_mib} MiB, the first {p['upstream_rate_mib_s']:g} MiB as burst).",
        f"- Machine load: loadavg {' '.join(map(str, load['loadavg_start']))} at start, "
        f"{' '.join(map(str, load['loadavg_end']))} at end; {load['busy_cores_before']} of {m['nproc']} cores busy "
        f"with other work just before the run; other work used {load['other_cpu_share']:.0%} of the machine's "
        f"CPU during the transfers.",
        "",
        render_table(summary, min((size["reps"] for size in summary), default=p["reps"])),
        "",
        "Times are from the common release of the clients to the last verified byte (p50 over the "
        f"{p['agents']} nodes, then the median over repetitions; *max* is the last node). Seed egress = "
        "`seed_blob_bytes_sent_total` delta / blob size (1.00 = the seed sent the blob once). *Peer chunk "
        "GETs* = chunks received from peers (verified + failed verification) + requests that timed out or "
        "failed (the agents' INFO log) + requests answered 429, summed over the nodes; 404s for chunks a peer "
        "did not have yet, announcements and chunk-map requests are not exported by the agent, so they are "
        "not counted. "
        "*Sources per node* = distinct peers a node received chunks from, plus the seed for the lease holder. "
        "*CPU s* = seed + agents + clients from the release until every agent committed the blob; *CPU share* "
        f"= that / (wall {X} cores).",
        "",
        cpu_check_text(report["cpu_check"], m["nproc"]),
        "",
        *conclusion(summary, p["default_chunk_size"]),
        "",
        "Why: with small chunks every chunk costs a request, a hash check, a write and a bitmap update, "
        "the map grows (32 bytes per chunk) and the announced bitmaps with it; with large chunks a node can "
        "forward a chunk only once it has all of it verified, so each hop in the swarm adds one chunk's "
        "transfer time, the last chunk leaves the lease holder late (a larger tail), fewer chunks are in flight "
        "to spread over the peers, and a whole chunk must arrive within `peer_timeout`.",
        "",
        "Lease holder's uploads to peers, in copies of the blob (median; ideal ≈ 1, the other copies "
        "coming from the other nodes): " + ", ".join(f"{s['label']} {_fmt(s['lessee_upload_median'])}"
                                                       for s in summary) + ".",
        "",
        f"Raw numbers: [`{report['json_link']}`]({report['json_link']}).",
    ]
    if p.get("truncated"):
        lines += ["", f"**Run cut short by the time budget**: {p['truncated']}"]
    return "\n".join(lines) + "\n"


# ---- main -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.chunk_size", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="Markdown file to update")
    parser.add_argument("--json", type=Path, help="raw results (default: OUT's dir/bench/chunk_size.json)")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated chunk sizes (powers of two)")
    parser.add_argument("--agents", type=int, default=5, help="agents per repetition")
    parser.add_argument("--blob-mib", type=int, default=512, help="size of the random blob")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per chunk size")
    parser.add_argument("--upload-rate", type=float, default=20.0, help="MiB/s each agent serves to peers")
    parser.add_argument("--upstream-rate", type=float, default=20.0, help="MiB/s an agent fetches from the seed")
    parser.add_argument("--max-time", type=float, default=120.0, help="seconds a client may take for the blob")
    parser.add_argument("--render-json", type=Path, metavar="JSON",
                        help="do not measure: rewrite the section from results saved by an earlier run")
    parser.add_argument("--budget-s", type=float, default=600.0,
                        help="start no round of repetitions that would likely end after this many seconds")
    return parser


def run(args: argparse.Namespace, sizes: list[int]) -> dict[str, Any]:
    from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE  # the agent's and the seed's default

    began = time.monotonic()
    load_start = loadavg()
    busy_before = busy_cores(1.0)
    root = Path(tempfile.mkdtemp(prefix="bench-chunks-"))
    setups: list[SizeSetup] = []
    truncated = ""
    reps_done = 0
    try:
        key_file = root / "cluster.key"
        key_file.write_text(os.urandom(32).hex() + "\n")
        key_file.chmod(0o600)
        print(f"generating a {args.blob_mib} MiB blob in {root}", flush=True)
        blob = make_blob(root / "blob", args.blob_mib)
        with httpx.Client(trust_env=False, timeout=httpx.Timeout(120.0, connect=10.0)) as client:
            for size in sizes:
                seed = start_seed(root, size)
                setups.append(SizeSetup(size, seed))
                pushed = time.perf_counter()
                with blob.path.open("rb") as content:
                    push_blob(client, seed.url, blob.digest, blob.size, content)
                chunk_map = client.get(f"{seed.url}/v2/{REPO}/blobs/{blob.digest}/chunks", params={"size": size})
                if chunk_map.status_code != 200:
                    raise BenchError(f"chunk map of size {size}: HTTP {chunk_map.status_code}")
                setups[-1].map_bytes = len(chunk_map.content)
                print(f"seed with chunk_size {size_label(size)} at {seed.url}: pushed in "
                      f"{time.perf_counter() - pushed:.1f} s, map {len(chunk_map.content)} bytes", flush=True)
        longest_round = 0.0
        for rep in range(args.reps):
            # A round is started only if it will likely end within the budget (after one full round).
            if rep and time.monotonic() - began + 1.2 * longest_round > args.budget_s:
                truncated = f"stopped after {rep} of {args.reps} repetitions per size"
                break
            round_started = time.monotonic()
            for setup in setups if rep % 2 == 0 else setups[::-1]:
                result = run_once(root, setup, blob, rep, args, key_file)
                setup.runs.append(result)
                print(f"rep {rep + 1} {size_label(setup.chunk_size)}: p50 {_fmt(result['completion_p50_s'])} s, "
                      f"max {_fmt(result['completion_max_s'])} s, egress {result['seed_egress_ratio']:.2f}x, "
                      f"{result['peer_chunk_requests']} peer GETs ({result['peer_request_errors']} timeouts/errors, "
                      f"{result['uploads_refused']} 429, {result['stuck_fallbacks']} stuck fallbacks), "
                      f"sources {result['sources_min']}-{result['sources_max']}, CPU {result['cpu']['total_s']:.1f} s "
                      f"({result['cpu']['share_of_machine']:.0%} of machine, busiest agent "
                      f"{result['cpu']['agent_max_share']:.0%} of a core; other {result['cpu']['other_s']:.1f} s), "
                      f"failures {result['failures']}", flush=True)
            reps_done += 1
            longest_round = max(longest_round, time.monotonic() - round_started)
    finally:
        for setup in setups:
            setup.seed.stop()
        shutil.rmtree(root, ignore_errors=True)

    runs = [r for s in setups for r in s.runs]
    other = sum(r["cpu"]["other_s"] for r in runs)
    capacity = sum(r["cpu"]["wall_s"] for r in runs) * len(os.sched_getaffinity(0))
    other_share = round(other / capacity, 3) if capacity else 0.0
    shares = [r["cpu"]["share_of_machine"] for r in runs] or [0.0]
    machine = [r["cpu"]["machine_busy_share"] for r in runs] or [0.0]
    agent_share_max = max((r["cpu"]["agent_max_share"] for r in runs), default=0.0)
    saturated = sum(1 for v in machine if v > 0.9)
    summary = [summarize(s, blob.size) for s in setups]
    return {
        **report_header("chunk_size", sys.argv[1:]),
        "machine": machine_basics(),
        "load": {
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
            "busy_cores_before": busy_before,
            "other_cpu_s_during_measurements": round(other, 2),
            "other_cpu_share": other_share,
        },
        "params": {
            "sizes": sizes,
            "agents": args.agents,
            "blob_mib": args.blob_mib,
            "blob": {"digest": blob.digest, "size": blob.size},
            "reps": args.reps,
            "reps_done": reps_done,
            "upload_rate_mib_s": args.upload_rate,
            "upstream_rate_mib_s": args.upstream_rate,
            "max_time_s": args.max_time,
            "default_chunk_size": DEFAULT_CHUNK_SIZE,
            "truncated": truncated,
            "duration_s": round(time.monotonic() - began, 1),
        },
        "cpu_check": {
            "share_median": round(statistics.median(shares), 3),
            "share_max": max(shares),
            "agent_share_max": agent_share_max,
            "machine_median": round(statistics.median(machine), 3),
            "machine_max": max(machine),
            "saturated_reps": saturated,
            "reps": len(runs),
            # Our processes well below the cores, no agent pinned on its one thread, and the
            # machine as a whole (other work included) not saturated in most repetitions.
            "network_limited": max(shares) < 0.6 and agent_share_max < 0.85 and saturated <= len(runs) // 4,
        },
        "summary": summary,
        "runs": {size_label(s.chunk_size): s.runs for s in setups},
    }


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = print) -> int:
    args = _parser().parse_args(argv)
    try:
        sizes = [parse_size(v) for v in args.sizes.split(",") if v.strip()]
    except argparse.ArgumentTypeError as exc:
        log(str(exc))
        return 2
    bad = [s for s in sizes if s & (s - 1) or not 64 * KIB <= s <= 64 * MIB]
    if not sizes or bad:
        log(f"--sizes: powers of two between 64 KiB and 64 MiB, got {args.sizes!r}")
        return 2
    if args.agents < 2 or args.reps < 1 or args.blob_mib < 1 or args.upload_rate <= 0 or args.upstream_rate <= 0:
        log("need --agents >= 2, --reps >= 1, --blob-mib >= 1 and positive rates")
        return 2
    problems = [problem for size in sizes if (problem := recut(args.blob_mib * MIB, size)) is not None]
    if problems:
        log(f"--sizes: {'; '.join(problems)}")
        return 2
    json_path = args.json or args.render_json or args.out.parent / "bench" / "chunk_size.json"
    if args.render_json is not None:
        report = json.loads(args.render_json.read_text())
    else:
        try:
            report = run(args, sizes)
        except BenchError as exc:
            log(f"bench-chunks failed: {exc}")
            return 1
    report["json_link"] = os.path.relpath(json_path.resolve(), args.out.resolve().parent)
    section = render_section(report)
    if args.render_json is None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
    update_doc(args.out, section, MARK_START, MARK_END)
    log("")
    log(section)
    log(f"wrote {args.out} and {json_path} ({report['params']['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
