"""``make bench-p2pd``: containerd pulls through the p2pd agent vs straight from the seed.

One run, same machine, same images, same client (a private containerd driven by
``ctr images pull``), loopback only:

1. Build a busybox image offline (umoci) and two images on top of it with one random
   (incompressible, gzip) layer each: ``--layer-mib`` (default 64) and ``--big-layer-mib``
   (default 256). Push both (and busybox alone, tag ``base``) to a seed with skopeo.
2. Start a private containerd and a p2pd agent (``--upstream <seed host>=<seed URL>``).
   Two hosts.toml directories: *direct* (only ``server`` = the seed) and *p2pd* (``server`` =
   the seed, the agent as mirror with capabilities pull + resolve).
3. For every image and every repetition (order alternating between repetitions), three
   pulls, each cold for containerd (``PrivateContainerd.remove_all`` first):
   - **direct**: straight from the seed;
   - **p2pd cold**: through a freshly restarted agent with an empty data directory (the agent
     fetches from the seed while it streams to containerd). The new agent process is first
     warmed up with the manifest and config of ``bench/p2pd:base`` (busybox alone, nothing the
     measured images use), so that Python start-up work is not counted (``--no-prime``: it is);
   - **p2pd warm**: through the same agent again, its cache kept (served with sendfile).
   ``ctr images pull`` in containerd 1.6 has no ``--skip-unpack``: every time is fetch +
   unpack (gunzip + overlayfs snapshot), the same for all variants.
4. For every pull: wall time of ``ctr``; CPU time of the agent, the seed, containerd, ``ctr``
   and everything else on the machine (other work competing for the cores); the agent's peak
   RSS (``VmHWM``, reset through ``/proc/PID/clear_refs`` before the pull, plus ``VmRSS``
   sampled every 20 ms); and where the bytes came from (seed and agent ``/metrics``), so a
   pull that silently fell back from the agent to the seed is detected.

Writes the section between ``<!-- bench-p2pd:start -->`` and ``<!-- bench-p2pd:end -->`` of the
Markdown file given by ``--out`` (other sections are kept) and the raw numbers as JSON
(default ``docs/bench/p2pd_pull.json`` next to it); prints the section to stdout.

    python -m tests.bench.p2pd_pull --out docs/benchmarks.md [--layer-mib 64] [--big-layer-mib 256] ...
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    find_tool,
    load_report,
    loadavg,
    machine_basics,
    process_status_kib,
    ratio,
    report_header,
    tool_version,
    update_doc,
)
from tests.harness import images, skopeo
from tests.harness.containerd import PrivateContainerd, write_hosts_toml
from tests.harness.p2pd_process import P2pdProcess, Samples
from tests.harness.seed_process import SeedProcess
from tests.harness.tools import tail

REPO = "bench/p2pd"
PRIME_TAG = "base"  # busybox alone: what a fresh agent is warmed with (see prime)
MARK_START = "<!-- bench-p2pd:start -->"
MARK_END = "<!-- bench-p2pd:end -->"
SECTION_TITLE = "## Pulls through the p2pd agent (make bench-p2pd)"
VARIANTS = ("direct", "p2pd-cold", "p2pd-warm")
LABELS = {"direct": "direct from the seed", "p2pd-cold": "p2pd, cold cache", "p2pd-warm": "p2pd, warm cache"}
COLD_GOAL = 1.10  # p2pd cold pull / direct pull
RSS_GOAL_MIB = 10.0  # the agent's peak RSS may not grow by more than this from the small to the big layer
_RSS_SAMPLE_S = 0.02
_TOOLS = ("containerd", "ctr", "skopeo", "umoci", "busybox")


# ---- the agent ----------------------------------------------------------------------------


def restart_fresh(agent: P2pdProcess) -> None:
    """Stops the agent, deletes its data directory and starts it on a new, empty one."""
    agent.stop()
    shutil.rmtree(agent.data_dir, ignore_errors=True)
    generation = int(agent.data_dir.name.rpartition("-")[2]) + 1
    agent.data_dir = agent.data_dir.with_name(f"data-{generation}")
    agent.start()


def prime(agent: P2pdProcess, seed: SeedProcess) -> None:
    """Warms a freshly started agent (lazy imports, upstream client, connection to the seed) with
    the manifest and config of the ``base`` image, which no measured image shares."""
    base, params = f"{agent.url}/v2/{REPO}", {"ns": seed.host}
    with httpx.Client(trust_env=False, timeout=30.0) as client:
        manifest = client.get(f"{base}/manifests/{PRIME_TAG}", params=params,
                              headers={"Accept": f"{images.MT_OCI_MANIFEST}, {images.MT_OCI_INDEX}"})
        if manifest.status_code != 200:
            raise BenchError(f"priming the agent: manifest -> {manifest.status_code} {manifest.text[:300]}")
        config = client.get(f"{base}/blobs/{manifest.json()['config']['digest']}", params=params)
        if config.status_code != 200:
            raise BenchError(f"priming the agent: config blob -> {config.status_code} {config.text[:300]}")


def _pid(proc: subprocess.Popen[bytes] | None) -> int:
    if proc is None:
        raise BenchError("a process of the benchmark is not running")
    return proc.pid


# ---- measurement ------------------------------------------------------------------------


class RssSampler:
    """Samples ``VmRSS`` of ``pid`` every 20 ms in a thread; ``stop()`` returns the maximum (KiB)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples = 0
        self.max_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = process_status_kib(self.pid, "VmRSS") or 0
            except OSError:
                return
            self.max_kib = max(self.max_kib, rss)
            self.samples += 1
            self._stop.wait(_RSS_SAMPLE_S)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.max_kib


def _delta(after: Samples, before: Samples, name: str, **labels: str) -> int:
    key = (name, frozenset(labels.items()))
    return int(after.get(key, 0.0) - before.get(key, 0.0))


@dataclass(frozen=True)
class Image:
    layer_mib: int
    ref: str  # as containerd names it: 127.0.0.1:PORT/bench/p2pd:TAG
    digest: str  # manifest digest
    layer_digest: str
    layer_size: int
    total_size: int  # manifest + config + layers


@dataclass
class Setup:
    seed: SeedProcess
    agent: P2pdProcess
    containerd: PrivateContainerd
    hosts_direct: Path
    hosts_p2pd: Path
    max_time: float
    warm_up_agent: bool  # prime() every freshly started agent

    def write_hosts(self) -> None:
        """hosts.toml for both variants; the p2pd one follows the agent's (new) port."""
        write_hosts_toml(self.hosts_direct, self.seed.host, self.seed.url, [])
        write_hosts_toml(self.hosts_p2pd, self.seed.host, self.seed.url, [self.agent.url])


def pull_once(setup: Setup, image: Image, variant: str) -> dict[str, Any]:
    """One cold-for-containerd pull of ``image``; prepares the agent as ``variant`` needs."""
    ctd, agent = setup.containerd, setup.agent
    ctd.remove_all()
    leftovers = ctd.content_digests()
    if leftovers:
        raise BenchError(f"containerd still holds {leftovers} after remove_all")
    if variant == "p2pd-cold":
        restart_fresh(agent)
        setup.write_hosts()
        if setup.warm_up_agent:
            prime(agent, setup.seed)
    hosts = setup.hosts_direct if variant == "direct" else setup.hosts_p2pd
    seed_before, agent_before = setup.seed.metrics(), agent.metrics()
    agent_pid = _pid(agent.proc)
    rss_before = process_status_kib(agent_pid, "VmRSS")
    sampler = RssSampler(agent_pid)
    meter = Meter(agent_pid, {"seed": _pid(setup.seed.proc), "containerd": _pid(ctd.proc)})
    started = time.perf_counter()
    try:
        proc = ctd.pull(image.ref, hosts_dir=hosts, timeout=setup.max_time, check=False)
    except subprocess.TimeoutExpired:
        sampler.stop()
        raise BenchError(f"ctr images pull {image.ref} ({variant}) took more than {setup.max_time:g} s") from None
    wall = time.perf_counter() - started
    usage = meter.finish()
    sampled = sampler.stop()
    if proc.returncode != 0:
        raise BenchError(f"ctr images pull {image.ref} ({variant}) exit {proc.returncode}: "
                         f"{proc.stderr.decode(errors='replace')[-1500:]}")
    got = ctd.image_digest(image.ref)
    if got != image.digest:
        raise BenchError(f"containerd pulled {got} for {image.ref}, expected {image.digest}")
    if image.layer_digest not in ctd.content_digests():
        raise BenchError(f"{image.layer_digest} missing from containerd's content store after the pull")
    seed_after, agent_after = setup.seed.metrics(), agent.metrics()
    seed_sent = _delta(seed_after, seed_before, "seed_blob_bytes_sent_total")
    agent_served = _delta(agent_after, agent_before, "p2pd_served_bytes_total")
    agent_fetched = _delta(agent_after, agent_before, "p2pd_fetched_bytes_total", source="upstream")
    # Through the agent, containerd must have received the big layer from it (not fallen back).
    via_agent = agent_served >= image.layer_size
    if variant == "p2pd-warm":
        via_agent = via_agent and seed_sent < image.layer_size
    return {
        "variant": variant,
        "layer_mib": image.layer_mib,
        "wall_s": round(wall, 4),
        "mib_s": round(image.total_size / MIB / wall, 1),
        **{k: v for k, v in usage.items() if k != "wall_s"},
        "p2pd_rss_before_kib": rss_before,
        "p2pd_rss_sampled_max_kib": sampled,
        "p2pd_rss_samples": sampler.samples,
        "seed_blob_bytes_sent": seed_sent,
        "p2pd_served_bytes": agent_served,
        "p2pd_fetched_bytes": agent_fetched,
        "p2pd_cache_hits_blob": _delta(agent_after, agent_before, "p2pd_cache_hits_total", kind="blob"),
        "p2pd_cache_misses_blob": _delta(agent_after, agent_before, "p2pd_cache_misses_total", kind="blob"),
        "via_p2pd": via_agent if variant != "direct" else None,
    }


# ---- summary and report -----------------------------------------------------------------


def _mib(kib: float | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def summarize(runs: list[dict[str, Any]], sizes: list[int]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for size in sizes:
        for variant in VARIANTS:
            rows = [r for r in runs if r["layer_mib"] == size and r["variant"] == variant]
            if not rows:
                continue
            walls = [r["wall_s"] for r in rows]
            peaks = [r["server_peak_rss_kib"] for r in rows if r["server_peak_rss_kib"]]
            before = [r["p2pd_rss_before_kib"] for r in rows if r["p2pd_rss_before_kib"]]
            summary[f"{size}/{variant}"] = {
                "layer_mib": size,
                "variant": variant,
                "label": LABELS[variant],
                "runs": len(rows),
                "wall_s_median": round(statistics.median(walls), 4),
                "wall_s_min": min(walls),
                "wall_s_max": max(walls),
                "mib_s_median": round(statistics.median(r["mib_s"] for r in rows), 1),
                "p2pd_cpu_s_median": round(statistics.median(r["server_cpu_s"] for r in rows), 2),
                "seed_cpu_s_median": round(statistics.median(r["seed_cpu_s"] for r in rows), 2),
                "containerd_cpu_s_median": round(statistics.median(r["containerd_cpu_s"] for r in rows), 2),
                "ctr_cpu_s_median": round(statistics.median(r["client_cpu_s"] for r in rows), 2),
                "other_cpu_s_median": round(statistics.median(r["other_cpu_s"] for r in rows), 2),
                "p2pd_rss_before_mib_median": _mib(statistics.median(before)) if before else None,
                "p2pd_peak_rss_mib_median": _mib(statistics.median(peaks)) if peaks else None,
                "p2pd_peak_rss_mib_max": _mib(max(peaks)) if peaks else None,
                "p2pd_rss_sampled_max_mib": _mib(max(r["p2pd_rss_sampled_max_kib"] for r in rows)),
                "fallbacks": sum(1 for r in rows if r["via_p2pd"] is False),
            }
    return summary


def render_table(summary: dict[str, dict[str, Any]], sizes: list[int]) -> str:
    reps = max((s["runs"] for s in summary.values()), default=0)
    head = ["Layer", "Pull", f"pull + unpack s (median of {reps}, min{DASH}max)", "vs direct", "MiB/s",
            "p2pd CPU s", "seed CPU s", "containerd CPU s", "ctr CPU s", "other work CPU s",
            "p2pd peak RSS MiB (median, max)"]
    rows = [head, ["---"] * len(head)]
    for size in sizes:
        direct = summary.get(f"{size}/direct")
        for variant in VARIANTS:
            s = summary.get(f"{size}/{variant}")
            if s is None:
                continue
            vs = "1.00" + X if variant == "direct" else (
                f"**{ratio(s['wall_s_median'], direct['wall_s_median']):.2f}{X}**" if direct else "")
            rss = "" if variant == "direct" or s["p2pd_peak_rss_mib_median"] is None else (
                f"{s['p2pd_peak_rss_mib_median']:.0f}, {s['p2pd_peak_rss_mib_max']:.0f}")
            fell_back = f" ({s['fallbacks']} fell back to the seed)" if s["fallbacks"] else ""
            rows.append([f"{size} MiB", s["label"] + fell_back,
                         f"{s['wall_s_median']:.2f} ({s['wall_s_min']:.2f}{DASH}{s['wall_s_max']:.2f})", vs,
                         f"{s['mib_s_median']:.0f}",
                         "" if variant == "direct" else f"{s['p2pd_cpu_s_median']:.2f}",
                         f"{s['seed_cpu_s_median']:.2f}", f"{s['containerd_cpu_s_median']:.2f}",
                         f"{s['ctr_cpu_s_median']:.2f}", f"{s['other_cpu_s_median']:.2f}", rss])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def render_section(report: dict[str, Any]) -> str:
    m, p, load, r = report["machine"], report["params"], report["load"], report["ratios"]
    small, big = p["layer_mib"], p["big_layer_mib"]
    cold = [r[f"cold_vs_direct_{size}"] for size in p["sizes"]]
    cold_verdict = "met" if max(cold) <= COLD_GOAL else "NOT met"
    rss = report["rss"]
    rss_verdict = "met" if rss["growth_mib"] is not None and rss["growth_mib"] <= RSS_GOAL_MIB else "NOT met"
    lines = [
        SECTION_TITLE,
        "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}` (`make bench-p2pd`)",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}",
        f"- Software: p2pd and seed {m['seed_version']} (this tree), {m['containerd_version']} "
        f"(private instance, overlayfs snapshotter), {m['skopeo_version']}",
        f"- Images: busybox + one random (incompressible) gzip layer of {small} MiB, and of {big} MiB, "
        f"pushed to the seed with skopeo as `{REPO}`. Client: `ctr images pull --hosts-dir` "
        "(hosts.toml: only `server` = the seed for *direct*; the agent as mirror with pull + resolve for "
        "*p2pd*). containerd 1.6's `ctr images pull` has no `--skip-unpack`, so every time is fetch + "
        "unpack (gunzip, overlayfs snapshot) for all variants alike.",
        "- Every pull is cold for containerd (images and content removed first). *cold cache*: the agent "
        "restarted on an empty data directory, so it fetches from the seed while it streams to containerd"
        + (f" (the new process is first warmed up with the manifest and config of `{REPO}:{PRIME_TAG}`, busybox "
           "alone, which the measured images do not use, so Python start-up is not counted)" if p["primed"] else "")
        + "; *warm cache*: the same agent again, blob served from its store (sendfile). Order alternates "
        f"between repetitions; loopback only. Machine load: loadavg {' '.join(map(str, load['loadavg_start']))} "
        f"at start, {' '.join(map(str, load['loadavg_end']))} at end; {load['busy_cores_before']} of "
        f"{m['nproc']} cores busy with other work just before the run; other work used "
        f"{load['other_cpu_share']:.0%} of the machine's CPU during the pulls.",
        "",
        report["table"],
        "",
        f"Goal 1 (cold pull through p2pd ≤ {COLD_GOAL:.2f}{X} direct, medians): **{cold_verdict}** — "
        + ", ".join(f"{size} MiB {r[f'cold_vs_direct_{size}']:.2f}{X} (fastest vs fastest "
                    f"{r[f'cold_vs_direct_fastest_{size}']:.2f}{X})" for size in p["sizes"]) + ". "
        "Where the cold overhead goes: "
        + "; ".join(f"{size} MiB {report['overhead'][str(size)]['wall_s']:+.2f} s wall for "
                    f"{report['overhead'][str(size)]['cpu_s']:+.2f} s more CPU (agent "
                    f"{report['overhead'][str(size)]['p2pd_cpu_ms_per_mib']:.1f} ms per MiB of layer)"
                    for size in p["sizes"])
        + ("." if cold_verdict == "met" else
           f" — on {m['nproc']} cores shared with ctr, containerd's unpack and the other work, the agent's CPU "
           "(receive, write, sha256 of every chunk and of the whole blob, read back, send) adds to the pull "
           "instead of overlapping with it."),
        "",
        "Goal 2 (warm pull vs direct, medians): "
        + ", ".join(f"{size} MiB {r[f'warm_vs_direct_{size}']:.2f}{X} (fastest vs fastest "
                    f"{r[f'warm_vs_direct_fastest_{size}']:.2f}{X})" for size in p["sizes"]) + ". "
        "The fastest pull of each variant is the one least disturbed by other work on the machine.",
        "",
        f"Goal 3 (agent RSS does not grow with blob size): **{rss_verdict}** — peak RSS (`VmHWM`) of the "
        f"agent during cold pulls: median {rss['peak_mib'][str(small)]} MiB with the {small} MiB layer, "
        f"{rss['peak_mib'][str(big)]} MiB with the {big} MiB layer ({rss['growth_mib']:+.1f} MiB for "
        f"{big - small} MiB more blob; goal ≤ {RSS_GOAL_MIB:.0f} MiB); idle RSS of a fresh agent "
        f"{rss['idle_mib']} MiB. The highest `VmRSS` sampled every 20 ms in any p2pd pull was "
        f"{rss['sampled_max_mib']} MiB.",
        "",
        "Times are the wall time of `ctr images pull` (the client does the HTTP transfers and streams the "
        "content into containerd, which then unpacks it). CPU columns are medians per pull; `VmHWM` is reset "
        "through `/proc/PID/clear_refs` before each pull. Bytes are checked with the seed's and the agent's "
        "`/metrics`: a p2pd pull counts only if the agent served the whole layer (a warm one also only if "
        "the seed sent no layer bytes).",
        "",
        f"Raw numbers: [`{report['json_link']}`]({report['json_link']}).",
    ]
    if p.get("truncated"):
        lines += ["", f"**Run cut short by the time budget**: {p['truncated']}"]
    return "\n".join(lines) + "\n"


# ---- main -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.p2pd_pull", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="Markdown file to update")
    parser.add_argument("--json", type=Path, help="raw results (default: OUT's dir/bench/p2pd_pull.json)")
    parser.add_argument("--layer-mib", type=int, default=64, help="size of the random layer (cold-pull goal)")
    parser.add_argument("--big-layer-mib", type=int, default=256,
                        help="second layer size, to show that the agent's RSS does not grow with blob size")
    parser.add_argument("--reps", type=int, default=7, help="pulls per variant and layer size (at least 3)")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="stop repeating (after at least one full round) once this much time has passed")
    parser.add_argument("--no-prime", action="store_true",
                        help="measure cold pulls on a just-started agent (default: warm the process first)")
    parser.add_argument("--max-time", type=float, default=90.0, help="timeout of one ctr images pull")
    return parser


def _check_prerequisites() -> dict[str, str]:
    if os.geteuid() != 0:
        raise BenchError("needs root (containerd, overlayfs snapshots)")
    return {name: find_tool(name) for name in _TOOLS}


def build_images(root: Path, seed: SeedProcess, sizes: list[int]) -> dict[int, Image]:
    layout = images.build_busybox_layout(root / "image")
    skopeo.copy(layout.ref("busybox"), f"docker://{seed.host}/{REPO}:{PRIME_TAG}")
    result = {}
    for size in sizes:
        tag = f"layer{size}"
        images.add_random_layer(layout, "busybox", tag, size)
        pushed = time.perf_counter()
        digest = skopeo.copy(layout.ref(tag), f"docker://{seed.host}/{REPO}:{tag}")
        manifest = layout.manifest(tag)
        big = max(manifest["layers"], key=lambda d: d["size"])
        total = layout.blob_path(digest).stat().st_size + manifest["config"]["size"] + sum(
            d["size"] for d in manifest["layers"])
        result[size] = Image(size, f"{seed.host}/{REPO}:{tag}", digest, big["digest"], big["size"], total)
        print(f"pushed {seed.host}/{REPO}:{tag} ({total / MIB:.1f} MiB, layer {big['digest'][:19]}…) "
              f"in {time.perf_counter() - pushed:.1f} s", flush=True)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    tools = _check_prerequisites()
    load_start = loadavg()
    busy_before = busy_cores(1.0)
    sizes = [args.layer_mib] if args.big_layer_mib == args.layer_mib else [args.layer_mib, args.big_layer_mib]
    root = Path(tempfile.mkdtemp(prefix="bench-p2pd-"))
    seed = SeedProcess(root / "seed-data", log_level="WARNING", log_path=root / "seed.log")
    agent = P2pdProcess(root / "p2pd" / "data-0", [], log_path=root / "p2pd.log")
    containerd = PrivateContainerd(root / "containerd", namespace="bench", log_level="warn")
    runs: list[dict[str, Any]] = []
    truncated: list[str] = []
    rounds_done = 0
    try:
        seed.start()
        print(f"seed on {seed.url}; building and pushing images ({' and '.join(map(str, sizes))} MiB layers) "
              f"in {root}", flush=True)
        built = build_images(root, seed, sizes)
        containerd.start()
        agent.upstreams = [f"{seed.host}={seed.url}"]
        agent.start()
        setup = Setup(seed, agent, containerd, root / "hosts-direct", root / "hosts-p2pd", args.max_time,
                      not args.no_prime)
        setup.write_hosts()
        # Untimed warm-up: proves the wiring (the agent must serve the layer) and warms the caches.
        for variant in ("direct", "p2pd-cold"):
            check = pull_once(setup, built[sizes[0]], variant)
            if check["via_p2pd"] is False:
                raise BenchError(f"warm-up pull did not go through the agent: {check}\n{tail(agent.log_path)}")
            print(f"warm-up {variant}: {check['wall_s']:.2f} s", flush=True)
        per_round = None
        for rep in range(args.reps):
            elapsed = time.monotonic() - began
            if rep and per_round is not None and elapsed + per_round > args.budget_s:
                truncated.append(f"stopped after {rep} of {args.reps} rounds ({elapsed:.0f} s)")
                break
            round_began = time.monotonic()
            order = VARIANTS if rep % 2 == 0 else ("p2pd-cold", "p2pd-warm", "direct")
            for size in (sizes if rep % 2 == 0 else sizes[::-1]):
                for variant in order:
                    result = pull_once(setup, built[size], variant)
                    result["rep"] = rep + 1
                    runs.append(result)
                    peak = result["server_peak_rss_kib"]
                    print(f"#{rep + 1} {size} MiB {variant}: {result['wall_s']:.2f} s, p2pd CPU "
                          f"{result['server_cpu_s']:.2f} s, peak RSS {peak / 1024 if peak else 0:.0f} MiB, "
                          f"other load {result['other_cpu_s']:.2f} s"
                          + ("" if result["via_p2pd"] is not False else " (FELL BACK to the seed)"), flush=True)
            rounds_done += 1
            per_round = time.monotonic() - round_began
        info = {
            **machine_basics(),
            "containerd_version": " ".join(tool_version([tools["containerd"], "--version"]).split()[:3]),
            "skopeo_version": tool_version([tools["skopeo"], "--version"]),
        }
    finally:
        agent.stop()
        containerd.stop()
        seed.stop()
        shutil.rmtree(root, ignore_errors=True)

    summary = summarize(runs, sizes)
    ratios: dict[str, float] = {}
    for size in sizes:
        direct = summary[f"{size}/direct"]["wall_s_median"]
        ratios[f"cold_vs_direct_{size}"] = ratio(summary[f"{size}/p2pd-cold"]["wall_s_median"], direct)
        ratios[f"warm_vs_direct_{size}"] = ratio(summary[f"{size}/p2pd-warm"]["wall_s_median"], direct)
        # The fastest pull of each variant is the one least disturbed by other work on the machine.
        fastest = summary[f"{size}/direct"]["wall_s_min"]
        ratios[f"cold_vs_direct_fastest_{size}"] = ratio(summary[f"{size}/p2pd-cold"]["wall_s_min"], fastest)
        ratios[f"warm_vs_direct_fastest_{size}"] = ratio(summary[f"{size}/p2pd-warm"]["wall_s_min"], fastest)
    overhead = {}
    for size in sizes:
        cold, direct = summary[f"{size}/p2pd-cold"], summary[f"{size}/direct"]
        extra_cpu = sum(cold[k] - direct[k] for k in ("p2pd_cpu_s_median", "seed_cpu_s_median",
                                                        "containerd_cpu_s_median", "ctr_cpu_s_median"))
        overhead[str(size)] = {
            "wall_s": round(cold["wall_s_median"] - direct["wall_s_median"], 3),
            "cpu_s": round(extra_cpu, 3),
            "p2pd_cpu_ms_per_mib": round(1000 * cold["p2pd_cpu_s_median"] / size, 2),
        }
    cold_peaks = {size: summary[f"{size}/p2pd-cold"]["p2pd_peak_rss_mib_median"] for size in sizes}
    idle = [r["p2pd_rss_before_kib"] for r in runs if r["variant"] == "p2pd-cold" and r["p2pd_rss_before_kib"]]
    p2pd_runs = [r for r in runs if r["variant"] != "direct"]
    report: dict[str, Any] = {
        **report_header("p2pd_pull", sys.argv[1:]),
        "machine": info,
        "load": load_report(runs, load_start, busy_before),
        "params": {
            "layer_mib": args.layer_mib,
            "big_layer_mib": args.big_layer_mib,
            "sizes": sizes,
            "reps": args.reps,
            "rounds_done": rounds_done,
            "repository": REPO,
            "primed": not args.no_prime,
            "images": {str(size): {"ref": i.ref, "digest": i.digest, "layer_digest": i.layer_digest,
                                   "layer_size": i.layer_size, "total_size": i.total_size}
                       for size, i in built.items()},
            "truncated": "; ".join(truncated),
            "duration_s": round(time.monotonic() - began, 1),
        },
        "summary": summary,
        "ratios": ratios,
        "overhead": overhead,
        "rss": {
            "peak_mib": {str(size): peak for size, peak in cold_peaks.items()},
            "growth_mib": round(cold_peaks[sizes[-1]] - cold_peaks[sizes[0]], 1)
            if None not in cold_peaks.values() else None,
            "idle_mib": _mib(statistics.median(idle)) if idle else None,
            "sampled_max_mib": _mib(max((r["p2pd_rss_sampled_max_kib"] for r in p2pd_runs), default=0)),
        },
        "runs": runs,
    }
    report["table"] = render_table(summary, sizes)
    return report


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = print) -> int:
    args = _parser().parse_args(argv)
    for name, least in (("layer_mib", 1), ("big_layer_mib", 1), ("reps", 1)):
        if getattr(args, name) < least:
            log(f"--{name.replace('_', '-')} must be at least {least}")
            return 2
    try:
        report = run(args)
    except BenchError as exc:
        log(f"bench-p2pd failed: {exc}")
        return 1
    json_path = args.json or args.out.parent / "bench" / "p2pd_pull.json"
    report["json_link"] = os.path.relpath(json_path.resolve(), args.out.resolve().parent)
    section = render_section(report)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    update_doc(args.out, section, MARK_START, MARK_END)
    log("")
    log(section)
    log(f"wrote {args.out} and {json_path} ({report['params']['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
