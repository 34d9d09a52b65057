"""``make bench-swarm``: one image to many nodes on a shaped network — direct, site cache, p2pd, bound.

On the namespace testbed of :mod:`tests.bench.netbed` (a switch namespace with a bridge, one seed
host, N node hosts, every link shaped with tc tbf, nothing in the root namespace), for every
scenario, in one run:

1. The seed (this tree's ``seed serve``) starts in the seed host; an image built offline (busybox
   + one random layer of F MiB) is pushed to it with skopeo from inside the seed host (loopback,
   so the push does not cross the shaped link).
2. Three methods pull that image on all N nodes at the same moment (every node cold):
   - **direct**: every node pulls straight from the seed;
   - **cache**: every node pulls through one site-local pull-through cache, Debian's
     ``docker-registry`` (CNCF distribution 2.8) with ``proxy.remoteurl`` = the seed, running
     on node 1 — what an edge operator would deploy instead;
   - **p2pd**: every node pulls through its own p2pd (``--listen 127.0.0.1:5080`` inside the
     node, ``--peer-listen <node ip>:7080 --mdns-interface <node ip>``, a shared cluster key);
     the agents find each other by mDNS on the private bridge only.
   Clients: ``ctr images pull --hosts-dir`` with a private containerd per node (started inside
   the node; ctr does the HTTP itself, so it runs inside the node too), or, for large N, the
   containerd-like httpx client of :mod:`tests.bench.nsworker` (HEAD the tag with ``ns=``, GET
   the manifest, GET the blobs in parallel, verify sha256, fall back host by host like
   hosts.toml). hosts.toml / host lists: direct = the seed only; cache = the cache, then the
   seed; p2pd = the local agent, then the seed (a fallback shows up as seed bytes).
3. 4th line, the **bound**: the Kumar-Ross minimum for the shaped rates,
   ``max(F/u_s, F/d_min, N·F/(u_s + Σu_i))`` with F = all bytes of the image.
   Scenarios: *cluster burst* (N = 16, httpx client, seed 10 Mbit/s, nodes 5 times faster),
   its sensitivity run with node links 10 times the seed's (p2pd only), *edge site* (N = 8, ctr,
   20 Mbit/s uplink, LAN 10 times faster). p2pd runs 3 times per scenario (fresh agents; it takes
   seconds where the others take minutes, and its times vary from run to run): the table shows the
   median run, the text all of them.
4. Recorded per pull: every node's completion time (from the common start), seed egress (the
   seed's ``seed_blob_bytes_sent_total`` and the bytes on its link), bytes by source (client
   per-host counters, agent ``/metrics``), CPU seconds and peak RSS (``VmHWM``) of the agents
   (p2pd or docker-registry), CPU of the seed, containerds, clients, and of the whole machine
   sampled every 0.5 s (is the 2-core machine the bottleneck?).

Writes the section between ``<!-- bench-swarm:start -->`` and ``<!-- bench-swarm:end -->`` of
``--out`` (other sections kept), the raw results as JSON (default ``docs/bench/swarm.json``) and
the plots ``docs/bench/swarm-<scenario>-cdf.png`` / ``-bytes.png`` (matplotlib, the ``bench``
extra). ``--quick`` runs the tiny scenario (N = 3, 2 MiB) used by ``tests/test_netbed.py``;
``--from-json`` re-renders the section and plots from an earlier run's raw results.
Needs root, iproute2, containerd, skopeo, umoci, busybox-static and docker-registry.

    python -m tests.bench.swarm --out docs/benchmarks.md [--quick] [--scenarios edge-site,...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from p2pd.config import SwarmConfig
from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE, chunk_size_for
from tests.bench.common import (
    DASH,
    MIB,
    BenchError,
    X,
    find_tool,
    loadavg,
    machine_basics,
    machine_cpu_seconds,
    process_status_kib,
    reset_peak_rss,
    tool_version,
    update_doc,
)
from tests.bench.netbed import (
    LinkRates,
    Netbed,
    NetbedError,
    NsWorker,
    cleanup_stale,
    host_congestion_control,
    install_signal_handlers,
)
from tests.harness import images
from tests.harness.containerd import PrivateContainerd
from tests.harness.p2pd_process import Samples, parse_metrics
from tests.harness.tools import tail

MARK_START = "<!-- bench-swarm:start -->"
MARK_END = "<!-- bench-swarm:end -->"
SECTION_TITLE = "## One image to many nodes on a shaped network (make bench-swarm)"
REPO = "bench/swarm"
SEED_PORT = 5000
AGENT_PORT = 5080
PEER_PORT = 7080
CACHE_PORT = 5000
CTR_NAMESPACE = "bench"
METHODS = ("direct", "cache", "p2pd")
# p2pd with peer traffic in clear (peer_tls = false): what mutual TLS on the peer port costs.
ALL_METHODS = (*METHODS, "p2pd-plain")
LABELS = {"direct": "direct from the seed", "cache": "site cache (docker-registry proxy)", "p2pd": "p2pd",
          "p2pd-plain": "p2pd, peers without TLS"}
COLORS = {"direct": "tab:red", "cache": "tab:orange", "p2pd": "tab:blue", "p2pd-plain": "tab:cyan"}
GOAL_TIME = 1.3  # p2pd's last node / the bound
GOAL_EGRESS = 1.05  # seed egress / image size with p2pd
MATRIX_GOAL_TIME = 1.25  # issue 11: the last node / the bound, in every cell of the matrix
_SAMPLE_S = 0.5
_LINK_SAMPLE_S = 0.25  # bytes on the switch ports (link use, two sites' rates)
_SATURATED = 0.95  # a 0.5 s sample with the machine this busy counts as saturated
_MEMBERSHIP_TIMEOUT_S = 45.0
_SETTLE_TIMEOUT_S = 15.0
_TOOLS = ("ip", "tc", "containerd", "ctr", "skopeo", "umoci", "busybox", "docker-registry")
# INFO/WARNING lines of the agent worth counting (p2pd/swarm/engine.py).
_LOG_EVENTS = {
    "peer_request_errors": re.compile(r"chunk \d+ of \S+ from \S+ failed: "),
    "coordinator_unreachable": re.compile(r"coordinator \S+ unreachable"),
    "stuck_fallbacks": re.compile(r"from peers for \d+s; fetching from the upstream"),
    # A relayed chunk's answer cut short: its source failed or stopped, or (the asker) no byte of
    # it came for the relay read timeout; what had come is sent again by someone.
    "relay_cuts": re.compile(r"relay of \S+ bytes \d+- cut short: "),
}
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    nodes: int
    seed_mbit: float  # the seed's (site's) uplink
    node_mbit: float  # every node's link, both directions
    layer_mib: int
    client: str  # "ctr" | "httpx"
    description: str = ""
    methods: tuple[str, ...] = METHODS
    variant_of: str | None = None  # a sensitivity run: reported in a line under that scenario
    matrix: bool = False  # a cell of the weak-regime matrix: one row of its table
    p2pd_runs: int = 3  # p2pd repeats (cheap, and its times vary from run to run); the median run is shown
    # Two sites (or more) sharing the seed: ``nodes`` split evenly, each site on its own bridge with
    # its own ``seed_mbit`` link to the seed; ``site_caps_mbit[k]``: site k's [swarm]
    # site_upstream_rate (0: none).
    sites: int = 1
    site_caps_mbit: tuple[float, ...] = ()
    # Churn: a quarter of the nodes start late and join mid-pull, and a quarter of the others
    # (the busiest range holder among them) are killed mid-pull.
    churn: bool = False

    @property
    def rates(self) -> LinkRates:
        return LinkRates(seed_up=self.seed_mbit, node_up=self.node_mbit, node_down=self.node_mbit)

    def site_cap_mbit(self, site: int) -> float:
        return self.site_caps_mbit[site] if site < len(self.site_caps_mbit) else 0.0

    def site_rates(self, site: int) -> LinkRates:
        """The rates a site sees: its link to the seed, or its cap when lower."""
        cap = self.site_cap_mbit(site)
        return LinkRates(seed_up=min(self.seed_mbit, cap) if cap else self.seed_mbit, node_up=self.node_mbit,
                         node_down=self.node_mbit)


SCENARIOS = {
    "cluster-burst": Scenario(
        "cluster-burst", "Cluster burst", nodes=16, seed_mbit=10, node_mbit=50, layer_mib=12, client="httpx",
        methods=ALL_METHODS,
        description="a deployment rolls out on 16 nodes at once; the registry's uplink is 5 times slower than a "
                    "node's link"),
    "edge-site": Scenario(
        "edge-site", "Edge site", nodes=8, seed_mbit=20, node_mbit=200, layer_mib=24, client="ctr",
        methods=ALL_METHODS,
        description="8 nodes behind a thin 20 Mbit/s uplink, LAN 10 times faster"),
}
# Issue 11's matrix: node link ÷ seed uplink ∈ {1, 2, 10} by N ∈ {8, 16, 32}, p2pd only, one run
# each. The seed's rate shrinks as N grows so the 2-core machine stays below ~70 % busy: at the
# bound every node receives about u_s (the F/u_s term dominates once node links are no slower
# than the seed's), so the testbed moves ~2·N·u_s of payload a second. The check is measured, not
# assumed: each cell reports the machine's busy share during its pull (CPU check below). At
# 16/8 Mbit/s (N = 8/16) the machine was 74-97 % busy on the slower VM of 12-05; at half those
# rates 55-70 % in the 1x cells (--rate-scale 0.5) and 58-79 % across the six cells of the
# table's run, so they run at 8 and 4 Mbit/s. N = 32 stays at
# 3 Mbit/s: 98 % busy on 12-05, 59-65 % in the 12-06 tables. At 1.5 Mbit/s a blob's first chunk
# took over 20 s to reach most readers (28 of 32 agents rescued chunk 0 from the seed) and
# clients fell back to the seed (docs/benchmarks.md, 12-05 session); again on 12-06 (--rate-scale
# 0.5, the machine 43 % busy): 1.53x the bound against 1.47-1.52x at 3 Mbit/s, 15 reader rescues,
# seed egress 1.04x - the slower rate is no kinder to the swarm, so it is not hidden by it, and
# the cell is reported as not met.
MATRIX_RATIOS = (1, 2, 10)
# The seed's [server] upload_rate as a share of its uplink (--seed-share): its blob downloads share
# it, each connection paced by the kernel. Unpaced, the flows to a site's range holders started
# together, overflowed the uplink's queue, and some stalled for seconds in retransmission
# timeouts while others ran at many times their share (docs/benchmarks.md, fifteenth session).
SEED_SHARE = 0.97
# The seed's TCP congestion control (--seed-congestion-control; "" = the host's). The host's BBR
# re-sent ~4.5 % of what the seed sent to a site's range holders, whose shallow downlink queues
# the peers' relays share; with reno (the agents' peer ports too, their default) 1x/16 went
# 1.31-1.32x -> 1.24-1.27x the bound (docs/benchmarks.md, nineteenth session).
SEED_CONGESTION_CONTROL = "reno"
MATRIX_NODES = {8: 8.0, 16: 4.0, 32: 3.0}  # N -> seed uplink (Mbit/s)
MATRIX_LAYER_MIB = {8: 12, 16: 12, 32: 8}
for _n, _seed in MATRIX_NODES.items():
    for _ratio in MATRIX_RATIOS:
        _key = f"matrix-{_ratio}x-{_n}"
        SCENARIOS[_key] = Scenario(
            _key, f"Node links {_ratio}x the seed's, N = {_n}", nodes=_n, seed_mbit=_seed, node_mbit=_seed * _ratio,
            layer_mib=MATRIX_LAYER_MIB[_n], client="httpx", methods=("p2pd",), p2pd_runs=1, matrix=True)
# Issue 11: two sites sharing one seed, each over its own 16 Mbit/s link; site 1 caps its
# upstream at half of it ([swarm] site_upstream_rate), site 0 does not.
SCENARIOS["two-sites"] = Scenario(
    "two-sites", "Two sites sharing one seed", nodes=16, seed_mbit=16, node_mbit=160, layer_mib=16, client="httpx",
    methods=("p2pd",), p2pd_runs=1, sites=2, site_caps_mbit=(0.0, 8.0),
    description="two sites of 8 nodes, each behind its own 16 Mbit/s link to the same seed; site 1 caps its "
                "upstream at 8 Mbit/s")
# Issue 11's CPU goal at the chunk size real layers get: the matrix's 8-12 MiB layers are cut in
# 64 KiB chunks, a layer of 512 MiB or more in 1 MiB ones (chunk_size_for). The N = 8, 2x cell's
# ratio at twice its rates (so that 512 MiB take ~4.5 min); tells a per-chunk cost (requests,
# planning, handshakes) from a per-byte one.
SCENARIOS["big-chunks"] = Scenario(
    "big-chunks", "Big layer (1 MiB chunks)", nodes=8, seed_mbit=16, node_mbit=32, layer_mib=512, client="httpx",
    methods=("p2pd",), p2pd_runs=1,
    description="N = 8, node links 2x the seed's (16 and 32 Mbit/s) with a 512 MiB layer, cut in 1 MiB chunks "
                "instead of 64 KiB: "
                "CPU per MiB at the chunk size of real layers")
# Issue 11: churn during a cluster burst.
SCENARIOS["churn"] = Scenario(
    "churn", "Churn", nodes=16, seed_mbit=10, node_mbit=50, layer_mib=16, client="httpx", methods=("p2pd",),
    p2pd_runs=1, churn=True,
    description="12 nodes pull at once; at 40 % of the bound the 4 newest range holders of the big layer are "
                "killed (SIGKILL) and 4 more nodes start, each pulling as soon as its agent is ready")
QUICK = Scenario("tiny", "Tiny (make test)", nodes=3, seed_mbit=20, node_mbit=100, layer_mib=2, client="ctr",
                 description="the smallest version, run by tests/test_netbed.py", p2pd_runs=1)
# The smallest versions of the two-site and churn scenarios (tests/test_netbed.py; not in the default run).
TINY = {
    "tiny-sites": Scenario("tiny-sites", "Two sites (tiny)", nodes=4, seed_mbit=20, node_mbit=100, layer_mib=3,
                           client="httpx", methods=("p2pd",), p2pd_runs=1, sites=2, site_caps_mbit=(0.0, 10.0),
                           description="two sites of 2 nodes; site 1 caps its upstream at 10 Mbit/s"),
    "tiny-churn": Scenario("tiny-churn", "Churn (tiny)", nodes=4, seed_mbit=10, node_mbit=50, layer_mib=4,
                           client="httpx", methods=("p2pd",), p2pd_runs=1, churn=True,
                           description="3 nodes pull; one range holder is killed and a 4th node joins mid-pull"),
}


# ---- small helpers ------------------------------------------------------------------------


def bound(image_bytes: int, nodes: int, rates: LinkRates) -> dict[str, float]:
    """Kumar-Ross minimum time (s) for ``nodes`` peers to get ``image_bytes`` and its three terms."""
    bits = image_bytes * 8
    u_s = rates.seed_up * 1e6
    seed = bits / u_s
    download = bits / (rates.node_down * 1e6)
    aggregate = nodes * bits / (u_s + nodes * rates.node_up * 1e6)
    return {"seconds": max(seed, download, aggregate), "seed_term_s": seed, "download_term_s": download,
            "aggregate_term_s": aggregate, "client_server_s": max(nodes * bits / u_s, download)}


def proc_cpu_seconds(pid: int, *, children: bool = False, kernel_only: bool = False) -> float:
    """utime + stime of ``pid`` (plus its reaped children's with ``children``), 0 if it is gone;
    ``kernel_only``: stime alone (the system calls, and the network stack's work done for them)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    if kernel_only:
        return (int(fields[12]) + (int(fields[14]) if children else 0)) / _TICK
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / _TICK


def _metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _label_values(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for (metric, labels), value in samples.items()
            if metric == name and label in dict(labels)}


def _counts(before: Samples, after: Samples, name: str, *labels: str) -> dict[str, int]:
    """A counter's increase per label combination ("route status"), zero ones left out."""
    counts: dict[str, int] = {}
    for (metric, pairs), value in after.items():
        if metric != name:
            continue
        named = dict(pairs)
        grew = int(value - before.get((metric, pairs), 0.0))
        if grew:
            counts[" ".join(named.get(label, "") for label in labels)] = grew
    return dict(sorted(counts.items()))


def _parallel(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(item) for item in items]``, concurrently. On an error (or Ctrl-C) it does not wait for the
    other calls: teardown stops the workers they wait for, which ends them."""
    pool = ThreadPoolExecutor(max(1, len(items)))
    try:
        futures = [pool.submit(fn, item) for item in items]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


class CpuSampler:
    """CPU use every 0.5 s in a thread: of the whole machine and of the run's own processes.

    Both are shares of all cores (1.0 = every core busy for the whole interval). The processes'
    own time only: a child's (ctr's) CPU reaches its parent's counters in one lump when it is
    reaped, so it is left out of the samples (the totals per pull include it).
    """

    def __init__(self, pids: dict[str, tuple[int, bool]]) -> None:
        self.pids = pids
        self.machine: list[float] = []
        self.ours: list[float] = []
        self._ncpu = len(os.sched_getaffinity(0))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()

    def _ours(self) -> float:
        return sum(proc_cpu_seconds(pid) for pid, _ in self.pids.values())

    def _run(self) -> None:
        busy0, total0 = machine_cpu_seconds()
        ours0, t0 = self._ours(), time.monotonic()
        while not self._stop.wait(_SAMPLE_S):
            busy1, total1 = machine_cpu_seconds()
            ours1, t1 = self._ours(), time.monotonic()
            if total1 > total0 and t1 > t0:
                self.machine.append(round((busy1 - busy0) / (total1 - total0), 3))
                self.ours.append(round(min((ours1 - ours0) / ((t1 - t0) * self._ncpu), 1.0), 3))
            busy0, total0, ours0, t0 = busy1, total1, ours1, t1

    def stop(self) -> tuple[list[float], list[float]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.machine, self.ours


# ---- the testbed's services ---------------------------------------------------------------


class NsContainerd(PrivateContainerd):
    """A private containerd started inside a testbed host (``ip netns exec``), driven with ctr.

    The daemon does no network I/O in ``ctr images pull`` (ctr fetches), but it runs in the node
    like on a real host; its mounts live in the mount namespace ``ip netns exec`` creates and
    vanish with it. No containers are run, so stopping it needs no task cleanup.
    """

    def __init__(self, bed: Netbed, ns: str, workdir: Path) -> None:
        super().__init__(workdir, namespace=CTR_NAMESPACE, log_level="warn")
        self.bed = bed
        self.ns = ns

    def start(self) -> NsContainerd:
        self._ctr = find_tool("ctr")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        self.state.mkdir(exist_ok=True)
        self.sockdir = self.bed.short_dir()
        self.config_path.write_text(self._config())
        self.proc = self.bed.start_in(self.ns, [find_tool("containerd"), "--config", str(self.config_path)],
                                      log_path=self.log_path)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if Path(self.address).exists():
                probe = subprocess.run([self._ctr, "--address", self.address, "version"], capture_output=True,
                                       timeout=5, check=False)
                if probe.returncode == 0:
                    return self
            time.sleep(0.1)
        raise BenchError(f"containerd in {self.ns} did not start (exit {self.proc.poll()}):\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None:
            self.bed.stop_proc(self.proc)
            self.proc = None
        if self.sockdir is not None:
            shutil.rmtree(self.sockdir, ignore_errors=True)
            self.sockdir = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def pull_argv(self, ref: str, hosts_dir: Path | None) -> list[str]:
        """``ctr images pull`` through ``hosts_dir``, or straight from the ref's registry over plain HTTP.

        (containerd 1.6 rejects a hosts.toml without a ``[host]`` table, so *direct* uses
        ``--plain-http`` instead of a hosts.toml holding only ``server``.)
        """
        where = ["--hosts-dir", str(hosts_dir)] if hosts_dir is not None else ["--plain-http"]
        return [self._ctr, "--address", self.address, "--namespace", CTR_NAMESPACE, "images", "pull",
                "--snapshotter", self.snapshotter, *where, ref]


@dataclass(frozen=True)
class Image:
    ref: str  # as the nodes name it: 10.88.0.2:5000/bench/swarm:TAG
    tag: str
    digest: str
    total_bytes: int  # manifest + config + layers
    blob_bytes: int  # config + layers
    blobs: dict[str, int]  # digest -> size (config and layers)
    layer_digest: str  # the big layer


def write_hosts_toml(hosts_dir: Path, registry: str, server: str, mirrors: Sequence[str]) -> None:
    """hosts.toml for containerd inside the testbed (10.88.0.0/24 exists only in its namespaces)."""
    lines = [f'server = "{server}"', ""]
    for url in mirrors:
        lines += [f'[host."{url}"]', '  capabilities = ["pull", "resolve"]', ""]
    path = hosts_dir / registry / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


@dataclass
class Bed:
    """A started testbed with its seed and one worker per host."""

    net: Netbed
    seed_proc: subprocess.Popen[bytes]
    seed_worker: NsWorker
    workers: list[NsWorker]  # index i is node i + 1
    key_file: Path
    p2pd_generation: int = 0  # every p2pd run gets fresh data directories and logs
    # Each agent's [swarm] upload_rate as a share of its node link (--upload-share; 0: none).
    upload_share: float = 0.0
    # Each agent's [swarm] peer_congestion_control (--peer-congestion-control; None: its default).
    peer_congestion_control: str | None = None
    # The agents' --log-level (--agent-log-level): DEBUG logs every chunk request (tests.bench.swarm_trace).
    agent_log_level: str = "INFO"

    @property
    def seed_host(self) -> str:
        return f"{self.net.seed_ip}:{SEED_PORT}"

    @property
    def seed_url(self) -> str:
        return f"http://{self.seed_host}"

    def seed_host_of(self, node: int) -> str:
        """The seed as node ``node`` (1-based) reaches it: over its site's link."""
        return f"{self.net.seed_ips[self.net.site_of(node)]}:{SEED_PORT}"

    def seed_metrics(self) -> Samples:
        answer = self.seed_worker.get(f"http://127.0.0.1:{SEED_PORT}/metrics")
        if answer["status"] != 200:
            raise BenchError(f"seed /metrics: {answer}")
        return parse_metrics(answer["text"])


def wait_http(worker: NsWorker, url: str, seconds: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"the server behind {url} in {worker.ns} exited")
        last = worker.get(url, timeout=2)
        if last["status"] == 200:
            return
        time.sleep(0.1)
    raise BenchError(f"{url} in {worker.ns} not ready after {seconds:g} s: {last}")


def start_bed(net: Netbed, seed_upload_rate: int = 0, seed_congestion_control: str = "") -> Bed:
    """The seed (its blob downloads sharing ``seed_upload_rate`` bytes/s, paced; 0: unpaced; its
    connections' congestion control ``seed_congestion_control``, "": the host's) and a worker in
    every namespace."""
    seed_data = net.dir / "seed-data"
    seed_proc = net.start_in(net.seed, [sys.executable, "-m", "seed", "--log-level", "WARNING", "serve",
                                        "--listen", f"0.0.0.0:{SEED_PORT}", "--data", str(seed_data),
                                        "--open",
                                        *(["--upload-rate", str(seed_upload_rate)] if seed_upload_rate else []),
                                        "--congestion-control", seed_congestion_control],
                             log_path=net.dir / "seed.log")
    workers = _parallel(lambda ns: NsWorker(net, ns), [net.seed, *net.nodes])
    seed_worker = workers[0]
    wait_http(seed_worker, f"http://127.0.0.1:{SEED_PORT}/v2/", 30, lambda: seed_proc.poll() is None)
    key_file = net.dir / "cluster.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    key_file.chmod(0o600)
    return Bed(net, seed_proc, seed_worker, workers[1:], key_file)


def push_image(bed: Bed, layout: images.OciLayout, tag: str) -> Image:
    """skopeo copy from the layout to the seed, run inside the seed host over its loopback."""
    work = bed.net.dir / "skopeo"
    (work / "registries.d").mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    (work / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    (work / "registries.conf").write_text("")
    (work / "auth.json").write_text("{}")
    env = {"CONTAINERS_REGISTRIES_CONF": str(work / "registries.conf"),
           "REGISTRIES_CONFIG_PATH": str(work / "registries.conf"),
           "REGISTRY_AUTH_FILE": str(work / "auth.json"), "DOCKER_CONFIG": str(work)}
    digest_file = work / f"digest-{tag}"
    bed.net.run_in(bed.net.seed, [find_tool("skopeo"), "--policy", str(work / "policy.json"), "--registries.d",
                                  str(work / "registries.d"), "--tmpdir", str(work / "tmp"), "copy", "--quiet",
                                  "--dest-tls-verify=false", "--digestfile", str(digest_file), layout.ref(tag),
                                  f"docker://127.0.0.1:{SEED_PORT}/{REPO}:{tag}"], timeout=300, env=env)
    digest = digest_file.read_text().strip()
    manifest = layout.manifest(tag)
    manifest_bytes = layout.blob_path(layout.manifest_digest(tag)).stat().st_size
    if layout.manifest_digest(tag) != digest:
        raise BenchError(f"the seed stored {digest}, the layout has {layout.manifest_digest(tag)}")
    blobs = {manifest["config"]["digest"]: int(manifest["config"]["size"])}
    blobs.update({layer["digest"]: int(layer["size"]) for layer in manifest["layers"]})
    biggest = max(manifest["layers"], key=lambda layer: int(layer["size"]))
    return Image(ref=f"{bed.seed_host}/{REPO}:{tag}", tag=tag, digest=digest,
                 total_bytes=manifest_bytes + sum(blobs.values()), blob_bytes=sum(blobs.values()),
                 blobs=blobs, layer_digest=biggest["digest"])


# ---- one method -------------------------------------------------------------------------


@dataclass
class MethodSetup:
    """The processes one method adds to the bed (agents: p2pd per node, or the cache on node 1)."""

    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # ns -> process
    containerds: list[NsContainerd] = field(default_factory=list)
    hosts: list[dict[str, Any]] = field(default_factory=list)  # the httpx client's host list
    hosts_dir: Path | None = None
    membership_s: float | None = None


def start_cache(bed: Bed, setup: MethodSetup) -> None:
    net = bed.net
    ns = net.nodes[0]
    workdir = net.dir / "cache"
    workdir.mkdir()
    config = {
        "version": 0.1,
        "log": {"level": "error", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(workdir / "data")}, "delete": {"enabled": True},
                    "cache": {"blobdescriptor": "inmemory"}, "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": {"addr": f"0.0.0.0:{CACHE_PORT}"},
        "proxy": {"remoteurl": bed.seed_url},
    }
    (workdir / "config.yml").write_text(json.dumps(config, indent=2))
    proc = net.start_in(ns, [find_tool("docker-registry"), "serve", str(workdir / "config.yml")],
                        log_path=workdir / "registry.log", unset_prefixes=("REGISTRY_",))
    setup.agents[ns] = proc
    wait_http(bed.workers[0], f"http://127.0.0.1:{CACHE_PORT}/v2/", 30, lambda: proc.poll() is None)


def p2pd_log(bed: Bed, node: int) -> Path:
    return bed.net.dir / f"p2pd-{bed.p2pd_generation}-n{node}.log"


def is_p2pd(method: str) -> bool:
    return method in ("p2pd", "p2pd-plain")


def start_p2pd(bed: Bed, setup: MethodSetup, scenario: Scenario, *, peer_tls: bool = True,
               nodes: Sequence[int] | None = None) -> None:
    """p2pd on ``nodes`` (1-based; default all), ready and members of each other (per site)."""
    net = bed.net
    if nodes is None:
        bed.p2pd_generation += 1
    started = list(nodes if nodes is not None else range(1, len(net.nodes) + 1))
    for i in started:
        setup.agents[net.nodes[i - 1]] = start_agent(bed, scenario, i, peer_tls=peer_tls)
    for i in started:
        worker, proc = bed.workers[i - 1], setup.agents[net.nodes[i - 1]]
        wait_http(worker, f"http://127.0.0.1:{AGENT_PORT}/readyz", 60, lambda p=proc: p.poll() is None)
    setup.membership_s = wait_membership(bed, started)


def start_agent(bed: Bed, scenario: Scenario, i: int, *, peer_tls: bool = True) -> subprocess.Popen[bytes]:
    """Starts p2pd on node ``i`` (1-based): upstream = the seed over its site's link."""
    net = bed.net
    address = net.node_ips[i - 1]
    seed_host = bed.seed_host_of(i)
    cap = scenario.site_cap_mbit(net.site_of(i))
    argv = [sys.executable, "-m", "p2pd", "--log-level", bed.agent_log_level, "serve", "--listen",
            f"127.0.0.1:{AGENT_PORT}", "--data", str(net.dir / f"p2pd-{bed.p2pd_generation}-n{i}"),
            "--upstream", f"{seed_host}=http://{seed_host}", "--peer-listen", f"{address}:{PEER_PORT}",
            "--mdns-interface", address, "--cluster-key-file", str(bed.key_file), "--node-id", f"n{i}",
            *([] if peer_tls else ["--no-peer-tls"]),
            *(["--site-upstream-rate", str(int(cap * 1e6 / 8))] if cap else []),
            *(["--upload-rate", str(int(bed.upload_share * scenario.node_mbit * 1e6 / 8))] if bed.upload_share else []),
            *(["--peer-congestion-control", bed.peer_congestion_control]
              if bed.peer_congestion_control is not None else [])]
    return net.start_in(net.nodes[i - 1], argv, log_path=p2pd_log(bed, i))


def agent_status(worker: NsWorker) -> dict[str, Any]:
    answer = worker.get(f"http://127.0.0.1:{AGENT_PORT}/debug/status", timeout=5)
    if answer["status"] != 200:
        raise BenchError(f"/debug/status in {worker.ns}: {answer}")
    result: dict[str, Any] = json.loads(answer["text"])
    return result


def wait_membership(bed: Bed, nodes: Sequence[int] | None = None) -> float:
    """Waits until every agent of ``nodes`` (default all) has found (mDNS) and authenticated all
    the others of its site."""
    started = time.monotonic()
    nodes = list(nodes if nodes is not None else range(1, len(bed.workers) + 1))
    workers = [bed.workers[i - 1] for i in nodes]
    sites = [bed.net.site_of(i) for i in nodes]
    wants = [sites.count(site) - 1 for site in sites]
    while True:
        views = _parallel(agent_status, workers)
        live = [sum(1 for p in v.get("peers", []) if not p["suspended"] and not p["banned"]) for v in views]
        if all(n >= want for n, want in zip(live, wants, strict=True)):
            return round(time.monotonic() - started, 2)
        if time.monotonic() - started > _MEMBERSHIP_TIMEOUT_S:
            raise BenchError(f"agents did not find each other by mDNS within {_MEMBERSHIP_TIMEOUT_S:g} s: "
                             f"live peers per node {live} (want {wants})")
        time.sleep(0.25)


def wait_settled(bed: Bed, workers: Sequence[NsWorker] | None = None) -> bool:
    deadline = time.monotonic() + _SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        views = _parallel(agent_status, workers if workers is not None else bed.workers)
        if all(not v.get("downloads") and not v.get("transfers") for v in views):
            return True
        time.sleep(0.1)
    return False


def hosts_for(bed: Bed, method: str, node: int) -> list[dict[str, Any]]:
    """Where node ``node`` (1-based) pulls from, in order (like a hosts.toml)."""
    seed = {"url": f"http://{bed.seed_host_of(node)}", "mirror": False, "role": "seed"}
    if method == "cache":
        return [{"url": f"http://{bed.net.node_ips[0]}:{CACHE_PORT}", "mirror": True, "role": "cache"}, seed]
    if is_p2pd(method):
        return [{"url": f"http://127.0.0.1:{AGENT_PORT}", "mirror": True, "role": "p2pd"}, seed]
    return [seed]


def setup_method(bed: Bed, scenario: Scenario, method: str) -> MethodSetup:
    setup = MethodSetup()
    net = bed.net
    if scenario.client == "ctr":
        setup.containerds = [NsContainerd(net, ns, net.dir / f"ctd-{method}-n{i}")
                             for i, ns in enumerate(net.nodes, 1)]
        errors = _parallel(_try_start, setup.containerds)
        if any(errors):
            raise BenchError(next(e for e in errors if e))
        if method != "direct":
            setup.hosts_dir = net.dir / f"hosts-{method}"
            mirror = f"http://{net.node_ips[0]}:{CACHE_PORT}" if method == "cache" else f"http://127.0.0.1:{AGENT_PORT}"
            write_hosts_toml(setup.hosts_dir, bed.seed_host, bed.seed_url, [mirror])
    if method == "cache":
        start_cache(bed, setup)
    elif is_p2pd(method):
        start_p2pd(bed, setup, scenario, peer_tls=method == "p2pd")
    return setup


def _try_start(ctd: NsContainerd) -> str:
    try:
        ctd.start()
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return ""


def teardown_method(bed: Bed, setup: MethodSetup) -> None:
    for proc in setup.agents.values():
        with contextlib.suppress(Exception):
            proc.terminate()  # all at once; stop_proc below waits (SIGKILL after 10 s)
    for proc in setup.agents.values():
        bed.net.stop_proc(proc)
    _parallel(lambda ctd: ctd.stop(), setup.containerds)


@dataclass
class Snapshot:
    at: float
    seed: Samples
    links: dict[str, dict[str, int]]
    cpu: dict[str, float]  # name -> CPU seconds
    cpu_kernel: dict[str, float]  # agent name -> its CPU seconds in the kernel (stime)
    machine_busy: float
    agents: dict[str, Samples]
    drops: dict[str, int]


def _pids(bed: Bed, setup: MethodSetup) -> dict[str, tuple[int, bool]]:
    """Processes whose CPU is measured: name -> (pid, include reaped children)."""
    pids: dict[str, tuple[int, bool]] = {"seed": (bed.seed_proc.pid, False)}
    for ns, proc in setup.agents.items():
        pids[f"agent:{ns}"] = (proc.pid, False)
    for ctd in setup.containerds:
        if ctd.proc is not None:
            pids[f"containerd:{ctd.ns}"] = (ctd.proc.pid, False)
    for worker in [bed.seed_worker, *bed.workers]:
        pids[f"client:{worker.ns}"] = (worker.proc.pid, True)  # the client, and ctr (its child)
    return pids


def snapshot(bed: Bed, setup: MethodSetup, method: str) -> Snapshot:
    agents: dict[str, Samples] = {}
    if is_p2pd(method):
        texts = _parallel(lambda w: w.get(f"http://127.0.0.1:{AGENT_PORT}/metrics", timeout=5), bed.workers)
        agents = {w.ns: parse_metrics(t["text"]) for w, t in zip(bed.workers, texts, strict=True)}
    pids = _pids(bed, setup)
    return Snapshot(at=time.monotonic(), seed=bed.seed_metrics(), links=bed.net.link_bytes(),
                    cpu={name: proc_cpu_seconds(pid, children=ch) for name, (pid, ch) in pids.items()},
                    cpu_kernel={name: proc_cpu_seconds(pid, kernel_only=True) for name, (pid, _ch) in pids.items()
                                if name.startswith("agent:")},
                    machine_busy=machine_cpu_seconds()[0], agents=agents, drops=bed.net.qdisc_drops())


def pull_all(bed: Bed, scenario: Scenario, setup: MethodSetup, method: str, image: Image,
             max_time: float) -> tuple[float, list[dict[str, Any]]]:
    """Releases every node's client at the same monotonic instant; returns (that instant, results)."""
    at = time.monotonic() + 0.5

    def one(index: int) -> dict[str, Any]:
        worker = bed.workers[index]
        if scenario.client == "ctr":
            argv = setup.containerds[index].pull_argv(image.ref, setup.hosts_dir)
            return worker.call("run", timeout=max_time + 30, argv=argv, at=at, timeout_s=max_time)
        return worker.call("pull", timeout=max_time + 30, at=at, hosts=hosts_for(bed, method, index + 1),
                           repo=REPO, reference=image.tag, ns=bed.seed_host_of(index + 1), max_time=max_time)

    return at, _parallel(one, list(range(len(bed.workers))))


def check_ctr(ctd: NsContainerd, image: Image) -> list[str]:
    """What is wrong with the image in a node's containerd after ``ctr images pull`` (empty: nothing)."""
    problems = []
    try:
        got = ctd.image_digest(image.ref)
        if got != image.digest:
            problems.append(f"image is {got}, expected {image.digest}")
        missing = set(image.blobs) - set(ctd.content_digests())
        if missing:
            problems.append(f"blobs missing from the content store: {sorted(missing)}")
    except Exception as exc:
        problems.append(f"checking the image: {exc}")
    return problems


def log_events(path: Path) -> dict[str, int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return {name: len(pattern.findall(text)) for name, pattern in _LOG_EVENTS.items()}


def run_method(bed: Bed, scenario: Scenario, method: str, image: Image, max_time: float) -> dict[str, Any]:
    net = bed.net
    churn: dict[str, Any] = {}
    setup = MethodSetup() if scenario.churn else setup_method(bed, scenario, method)
    if scenario.churn:
        start_p2pd(bed, setup, scenario, nodes=churn_plan(len(net.nodes))[0])
    try:
        for name, (pid, _) in _pids(bed, setup).items():
            if name.startswith("agent:"):
                reset_peak_rss(pid)
        before = snapshot(bed, setup, method)
        sampler = CpuSampler(_pids(bed, setup))
        ports = PortSampler(net) if scenario.sites > 1 or is_p2pd(method) else None
        if scenario.churn:
            at, results = pull_with_churn(bed, scenario, setup, image, max_time, churn)
        else:
            at, results = pull_all(bed, scenario, setup, method, image, max_time)
        finished = time.monotonic()
        alive = [w for w in bed.workers if (proc := setup.agents.get(w.ns)) is not None and proc.poll() is None]
        settled = wait_settled(bed, alive) if is_p2pd(method) else True
        samples, our_samples = sampler.stop()
        port_sampler = ports.stop() if ports is not None else None
        after = snapshot(bed, setup, method)
        rss = {name: process_status_kib(pid, "VmHWM") for name, (pid, _) in _pids(bed, setup).items()
               if name.startswith("agent:") and Path(f"/proc/{pid}/status").exists()}  # killed ones are gone
        problems = [check_ctr(ctd, image) for ctd in setup.containerds] if scenario.client == "ctr" else []
    finally:
        teardown_method(bed, setup)
    events = {f"n{i}": log_events(p2pd_log(bed, i)) for i in range(1, len(net.nodes) + 1)} \
        if is_p2pd(method) else {}
    result = summarize_method(bed, scenario, method, image, setup, at, finished, results, before, after,
                              (samples, our_samples), rss, problems, settled, events)
    if scenario.sites > 1:
        result["sites"] = site_summaries(bed, scenario, image, result, at,
                                         port_sampler.samples if port_sampler is not None else [])
    elif port_sampler is not None:
        result["link_use"] = link_use(port_sampler, scenario)
    if scenario.churn:
        for node, answer in zip(result["nodes"], results, strict=True):
            if "joined_s" in answer:
                node["joined_s"] = answer["joined_s"]
        result["churn"] = churn_summary(churn, result, image, at)
        # A killed node's own pull dies with it: failures and the last node count the others.
        kept = [n for n in result["nodes"] if n["role"] != "killed"]
        result["failures"] = sum(1 for n in kept if not n["ok"])
        result["fallbacks"] = sum(1 for n in kept if not n.get("via_agent", True))
        result["max_s"] = max(n["seconds"] for n in kept) if not result["failures"] else None
        result["p50_s"] = _median([n["seconds"] for n in kept if n["ok"]])
    return result


# ---- two sites ------------------------------------------------------------------------------

_RATE_WINDOW_S = 2.0  # the site's cap is checked over windows this long
# How far over a site's cap (on the wire) its mean rate, and its highest window, may be. A
# window may hold the site's fetchers' burst (a quarter second of each one's share) on top.
_CAP_MEAN_SLACK = 1.05
_CAP_WINDOW_SLACK = 1.15


class PortSampler:
    """Bytes on every switch port, every ``_LINK_SAMPLE_S``, in a thread: ``samples`` has what the
    seed sent on each site's link (ports ``s<k>``), ``links`` each port's (up, down) counters."""

    def __init__(self, net: Netbed) -> None:
        self.net = net
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.links: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="port-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        ports = self.net.port_bytes()
        now = time.monotonic()
        self.samples.append((now, {k: v["up"] for k, v in ports.items() if k.startswith("s")}))
        self.links.append((now, {k: (v["up"], v["down"]) for k, v in ports.items()}))

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(_LINK_SAMPLE_S):
            with contextlib.suppress(NetbedError):
                self._sample()

    def stop(self) -> PortSampler:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(NetbedError):
            self._sample()
        return self


_IDLE_SHARE = 0.1  # a link carrying less than this share of its rate over a sample is idle


def link_use(sampler: PortSampler, scenario: Scenario) -> dict[str, Any] | None:
    """How busy the node links were while the seed was sending (from its first sample with bytes
    on the seed's link to its last): bytes on the wire (headers included) ÷ what the link could
    carry meanwhile, per node down and up, and the longest stretch a node's uplink stayed idle;
    and ``by_second``: [seconds since the seed's first byte, mean downlink share, seed link
    share] each second until the last sample.
    At node links as fast as the seed's, the bound asks every downlink to run full all along."""
    points = sampler.links

    def seed_sent(i: int) -> int:
        return sum(v[0] for k, v in points[i][1].items() if k.startswith("s"))

    seed_moves = [i for i in range(1, len(points)) if seed_sent(i) > seed_sent(i - 1) + 16 * 1024]
    if not seed_moves:
        return None
    first, last = seed_moves[0] - 1, seed_moves[-1]
    span = points[last][0] - points[first][0]
    capacity = scenario.node_mbit * 1e6 / 8
    nodes = sorted((k for k in points[first][1] if k.startswith("n")), key=lambda k: int(k[1:]))
    # The first quarter of the seed's sending apart: at equal links a downlink that idles early
    # never catches up (it can take no more than the seed sends), and the deficit is the tail.
    quarter = next(i for i in range(first, last + 1) if points[i][0] - points[first][0] >= span / 4)

    def down_share(a: int, b: int) -> float | None:
        seconds = points[b][0] - points[a][0]
        live = [n for n in nodes if n in points[a][1] and n in points[b][1]]
        if seconds <= 0 or not live:
            return None
        moved = sum(points[b][1][n][1] - points[a][1][n][1] for n in live)
        return round(moved / (capacity * seconds * len(live)), 3)

    down, up, idle = {}, {}, {}
    for node in nodes:
        if node not in points[last][1]:
            continue
        down[node] = round((points[last][1][node][1] - points[first][1][node][1]) / (capacity * span), 3)
        up[node] = round((points[last][1][node][0] - points[first][1][node][0]) / (capacity * span), 3)
        longest = run = 0.0
        for i in range(first + 1, last + 1):
            dt = points[i][0] - points[i - 1][0]
            sent = points[i][1][node][0] - points[i - 1][1][node][0]
            run = run + dt if sent < _IDLE_SHARE * capacity * dt else 0.0
            longest = max(longest, run)
        idle[node] = round(longest, 2)
    if not down:
        return None
    # Second by second from the seed's first byte to the last sample (the tail included): the
    # mean downlink share and the seed link's. At equal links a downlink below the seed's rate
    # is a deficit the tail pays back after the seed's last byte (docs/benchmarks.md).
    step = max(1, round(1.0 / _LINK_SAMPLE_S))
    seed_capacity = scenario.seed_mbit * 1e6 / 8

    def seed_share(a: int, b: int) -> float:
        return round((seed_sent(b) - seed_sent(a)) / (seed_capacity * (points[b][0] - points[a][0])), 3)

    seconds = [i for i in range(first + step, len(points), step) if points[i][0] > points[i - step][0]]
    by_second = [[round(points[i][0] - points[first][0], 2), down_share(i - step, i), seed_share(i - step, i)]
                 for i in seconds]

    def node_share(node: str, a: int, b: int, way: int) -> float | None:
        if node not in points[a][1] or node not in points[b][1]:
            return None
        moved = points[b][1][node][way] - points[a][1][node][way]
        return round(moved / (capacity * (points[b][0] - points[a][0])), 2)

    # Each node's own [down, up] shares on the same seconds: who idles in the ramp (a range
    # holder or a node without a range) is what the mean cannot say.
    nodes_by_second = {node: [[node_share(node, i - step, i, 1), node_share(node, i - step, i, 0)] for i in seconds]
                       for node in nodes}
    return {"seed_sending_s": round(span, 2), "sample_s": _LINK_SAMPLE_S, "by_second": by_second,
            "nodes_by_second": nodes_by_second,
            "down_mean": round(sum(down.values()) / len(down), 3), "down_min": min(down.values()),
            "up_mean": round(sum(up.values()) / len(up), 3), "longest_idle_uplink_s": max(idle.values()),
            "down_first_quarter": down_share(first, quarter), "down_rest": down_share(quarter, last),
            "down": down, "up": up, "idle_uplink_s": idle}


def rate_profile(samples: Sequence[tuple[float, dict[str, int]]], port: str) -> dict[str, Any]:
    """Mbit/s on ``port``: the highest over any ``_RATE_WINDOW_S`` window, the mean while bytes
    flowed, and each half second's (``by_half_second``: [seconds since the first sample, Mbit/s])."""
    points = [(t, counts.get(port, 0)) for t, counts in samples]
    series = [[round(t1 - points[0][0], 2), round((b1 - b0) * 8 / (t1 - t0) / 1e6, 2)]
              for (t0, b0), (t1, b1) in zip(points[::2], points[2::2], strict=False) if t1 > t0]
    peak = 0.0
    for i, (t0, b0) in enumerate(points):
        for t1, b1 in points[i + 1:]:
            if t1 - t0 >= _RATE_WINDOW_S:
                peak = max(peak, (b1 - b0) * 8 / (t1 - t0) / 1e6)
                break
    moving = [i for i in range(1, len(points)) if points[i][1] - points[i - 1][1] > 64 * 1024]
    if not moving:
        return {"peak_mbit": round(peak, 2), "mean_mbit": None, "by_half_second": series}
    first, last = moving[0] - 1, moving[-1]
    span = points[last][0] - points[first][0]
    mean = (points[last][1] - points[first][1]) * 8 / span / 1e6 if span > 0 else None
    return {"peak_mbit": round(peak, 2), "mean_mbit": None if mean is None else round(mean, 2),
            "by_half_second": series}


def site_summaries(bed: Bed, scenario: Scenario, image: Image, result: dict[str, Any], at: float,
                   port_samples: Sequence[tuple[float, dict[str, int]]]) -> list[dict[str, Any]]:
    """Per site: completion times ÷ the site's own bound, its egress from the seed (agents' content
    bytes and bytes on its link), and the rate on its link against its cap."""
    net = bed.net
    first, last = port_samples[0][1] if port_samples else {}, port_samples[-1][1] if port_samples else {}
    summaries = []
    for k in range(scenario.sites):
        members = [n for i, n in enumerate(result["nodes"], 1) if net.site_of(i) == k]
        times = sorted(n["seconds"] for n in members if n["ok"])
        limit = bound(image.total_bytes, len(members), scenario.site_rates(k))["seconds"]
        content = sum(n.get("agent_upstream_bytes", 0) for n in members)
        link = last.get(f"s{k}", 0) - first.get(f"s{k}", 0)
        summaries.append({
            "site": k, "nodes": len(members), "cap_mbit": scenario.site_cap_mbit(k) or None,
            "link_mbit": scenario.seed_mbit, "bound_s": round(limit, 2),
            "p50_s": _median(times), "max_s": times[-1] if times and len(times) == len(members) else None,
            "max_vs_bound": ratio_or_none(times[-1], limit) if times and len(times) == len(members) else None,
            "failures": sum(1 for n in members if not n["ok"]),
            "fallbacks": sum(1 for n in members if not n.get("via_agent", True)),
            "egress_ratio": round(content / image.total_bytes, 3),
            "link_ratio": round(link / image.total_bytes, 3),
            **rate_profile(port_samples, f"s{k}"),
        })
    return summaries


# ---- churn ----------------------------------------------------------------------------------


def churn_plan(nodes: int) -> tuple[list[int], list[int], int]:
    """(nodes started at once, nodes started mid-pull, how many of the first are killed): a quarter
    of the nodes join late and as many of the others are killed."""
    quarter = max(1, nodes // 4)
    return list(range(1, nodes - quarter + 1)), list(range(nodes - quarter + 1, nodes + 1)), quarter


_LEASE_LINE = re.compile(r"holding the upstream lease for (\S+), chunks (\d+)-(\d+)")


def pull_with_churn(bed: Bed, scenario: Scenario, setup: MethodSetup, image: Image, max_time: float,
                    churn: dict[str, Any]) -> tuple[float, list[dict[str, Any]]]:
    """The first nodes pull at once; at ~40 % of the bound the range holders of the big layer (the
    newest first, then others) are SIGKILLed — a quarter of the nodes — and the late quarter's
    agents start, each pulling as soon as it is ready. Hosts: the local agent only (no fallback
    to the seed), so a pull that the churn breaks fails instead of hiding behind the seed."""
    net = bed.net
    first, late, kill_count = churn_plan(len(net.nodes))
    limit = bound(image.total_bytes, len(net.nodes), scenario.rates)["seconds"]
    at = time.monotonic() + 0.5
    churn_at = at + 0.4 * limit
    agent_only = [{"url": f"http://127.0.0.1:{AGENT_PORT}", "mirror": True, "role": "p2pd"}]
    churn.update({"first": first, "late": late, "churn_at_s": round(churn_at - at, 2)})

    def pull(index: int, when: float) -> dict[str, Any]:
        return bed.workers[index - 1].call("pull", timeout=max_time + 30, at=when, hosts=agent_only, repo=REPO,
                                           reference=image.tag, ns=bed.seed_host_of(index), max_time=max_time)

    def join(index: int) -> dict[str, Any]:
        time.sleep(max(0.0, churn_at - time.monotonic()))
        worker = bed.workers[index - 1]
        proc = setup.agents[net.nodes[index - 1]] = start_agent(bed, scenario, index)
        wait_http(worker, f"http://127.0.0.1:{AGENT_PORT}/readyz", 60, lambda: proc.poll() is None)
        joined = time.monotonic()
        result = pull(index, joined)
        result["joined_s"] = round(joined - at, 3)
        return result

    def kill() -> dict[str, Any]:
        time.sleep(max(0.0, churn_at - time.monotonic()))
        holders: dict[int, int] = {}  # node -> position of its newest lease line on the big layer
        for i in first:
            text = p2pd_log(bed, i).read_text(errors="replace") if p2pd_log(bed, i).exists() else ""
            leases = [m for m in _LEASE_LINE.finditer(text) if m.group(1) == image.layer_digest]
            if leases:
                holders[i] = leases[-1].start()
        ranked = sorted(holders, key=lambda i: -holders[i]) + [i for i in first if i not in holders]
        victims = ranked[:kill_count]
        for i in victims:
            setup.agents[net.nodes[i - 1]].kill()
        churn.update({"killed": victims, "killed_holders": [i for i in victims if i in holders],
                      "killed_at_s": round(time.monotonic() - at, 2)})
        return {}

    jobs: list[Callable[[], dict[str, Any]]] = [partial(pull, i, at) for i in first]
    jobs += [partial(join, i) for i in late] + [kill]
    answers = _parallel(lambda job: job(), jobs)
    return at, answers[:len(first) + len(late)]


def churn_summary(churn: dict[str, Any], result: dict[str, Any], image: Image, at: float) -> dict[str, Any]:
    killed = set(churn.get("killed", []))
    roles = {i: "killed" if i in killed else "joined" if i in churn["late"] else "stayed"
             for i in [*churn["first"], *churn["late"]]}
    by_role: dict[str, dict[str, Any]] = {}
    for i, node in enumerate(result["nodes"], 1):
        node["role"] = roles[i]
    for role in ("stayed", "joined", "killed"):
        members = [n for n in result["nodes"] if n["role"] == role]
        times = sorted(n["seconds"] for n in members if n["ok"])
        since_join = sorted(n["seconds"] - n.get("joined_s", 0.0) for n in members if n["ok"])
        by_role[role] = {"nodes": len(members), "ok": len(times), "p50_s": _median(times),
                         "max_s": times[-1] if times else None,
                         "max_since_join_s": round(since_join[-1], 3) if since_join else None}
    lost = [n["node"] for n in result["nodes"] if n["role"] != "killed" and not n["ok"]]
    return {**churn, "roles": by_role, "lost_pulls": lost, "seed_egress_ratio": result["seed_egress_ratio"]}


def summarize_method(bed: Bed, scenario: Scenario, method: str, image: Image, setup: MethodSetup, at: float,
                     finished: float, results: list[dict[str, Any]], before: Snapshot, after: Snapshot,
                     cpu_samples: tuple[list[float], list[float]], rss: dict[str, int | None],
                     problems: list[list[str]], settled: bool,
                     events: dict[str, dict[str, int]]) -> dict[str, Any]:
    net = bed.net
    samples, our_samples = cpu_samples
    nodes = []
    for i, (ns, result) in enumerate(zip(net.nodes, results, strict=True), 1):
        seconds = round(result["end"] - at, 3)
        node: dict[str, Any] = {"node": f"n{i}", "seconds": seconds, "start_skew_s": round(result["start"] - at, 4),
                                "client_cpu_s": result["cpu_s"]}
        if scenario.client == "ctr":
            node_problems = problems[i - 1]
            if result["rc"] != 0:
                node_problems = [f"ctr exit {result['rc']}: {result['stderr'][-600:]}", *node_problems]
            node["ok"] = not node_problems
            node["errors"] = node_problems
        else:
            node["ok"] = bool(result["ok"])
            node["errors"] = result["errors"]
            by_role: dict[str, int] = {}
            roles = {h["url"]: h["role"] for h in hosts_for(bed, method, i)}
            for blob in result["blobs"]:
                for url, n in blob["bytes_by_host"].items():
                    by_role[roles.get(url, url)] = by_role.get(roles.get(url, url), 0) + n
            node["client_bytes_by_source"] = by_role
            # The longest the client went without a body byte (a blob's first byte included): a
            # stream to containerd moves only with the verified prefix, and the client leaves a
            # host that sent nothing for 30 s (a fallback; after some bytes it resumes there).
            longest = max(result["blobs"], key=lambda blob: blob["longest_wait_s"], default=None)
            node["client_longest_wait_s"] = None
            if longest is not None:
                node["client_longest_wait_s"] = longest["longest_wait_s"]
                # Where it was: which blob (its size), at which byte, and when it ended (seconds
                # from that blob's first request).
                node["client_longest_wait_where"] = {
                    "blob_bytes": longest["size"], "at_byte": longest["longest_wait_at_byte"],
                    "ended_s": longest["longest_wait_ended_s"]}
        link_b, link_a = before.links.get(ns, {}), after.links.get(ns, {})
        node["link_down_bytes"] = link_a.get("down", 0) - link_b.get("down", 0)
        node["link_up_bytes"] = link_a.get("up", 0) - link_b.get("up", 0)
        if is_p2pd(method):
            b, a = before.agents[ns], after.agents[ns]

            def delta(name: str, b: Samples = b, a: Samples = a, **labels: str) -> int:
                return int(_metric(a, name, **labels) - _metric(b, name, **labels))

            peers = {peer: int(v - _label_values(b, "p2pd_peer_fetched_bytes_total", "peer").get(peer, 0.0))
                     for peer, v in _label_values(a, "p2pd_peer_fetched_bytes_total", "peer").items()}
            node.update({
                "agent_upstream_bytes": delta("p2pd_fetched_bytes_total", source="upstream"),
                "agent_peer_bytes": delta("p2pd_fetched_bytes_total", source="peer"),
                "agent_bytes_by_peer": {p: v for p, v in peers.items() if v > 0},
                "agent_served_bytes": delta("p2pd_served_bytes_total"),
                "agent_peer_served_bytes": delta("p2pd_peer_served_bytes_total"),
                "leases": delta("p2pd_leases_total"),
                "chunks_failed": delta("p2pd_chunks_failed_total"),
                "uploads_refused": delta("p2pd_peer_uploads_refused_total"),
                "chunks_relayed": delta("p2pd_peer_chunks_relayed_total"),
                "chunks_verified": delta("p2pd_chunks_verified_total"),
                "announcements_sent": delta("p2pd_peer_messages_total", kind="announce"),
                "upstream_stalls": delta("p2pd_upstream_stalls_total"),
                "peer_connections": _counts(b, a, "p2pd_peer_connections_total", "handshake"),
                "peer_requests_served": _counts(b, a, "p2pd_peer_requests_served_total", "route", "status"),
                "reader_rescues": delta("p2pd_swarm_reader_rescues_total"),
                **events.get(f"n{i}", {}),
            })
            # containerd (or the client) got the image from its agent unless it fell back to the seed.
            node["via_agent"] = node["agent_served_bytes"] >= image.total_bytes - 4096
        agent_name = f"agent:{ns}"
        if agent_name in after.cpu:
            node["agent_cpu_s"] = round(max(0.0, after.cpu[agent_name] - before.cpu.get(agent_name, 0.0)), 3)
            peak = rss.get(agent_name)
            node["agent_peak_rss_mib"] = None if peak is None else round(peak / 1024, 1)
        nodes.append(node)

    seed_blob = int(_metric(after.seed, "seed_blob_bytes_sent_total") - _metric(before.seed,
                                                                                  "seed_blob_bytes_sent_total"))
    seed_link = after.links[net.seed]["up"] - before.links[net.seed]["up"]
    wall = after.at - before.at
    # max(0, ...): a killed agent's counters are gone with it (churn)
    cpu = {name: round(max(0.0, after.cpu[name] - before.cpu.get(name, 0.0)), 3) for name in after.cpu}
    ours = sum(cpu.values())
    ncpu = len(os.sched_getaffinity(0))
    machine = after.machine_busy - before.machine_busy
    ok_times = sorted(n["seconds"] for n in nodes if n["ok"])
    agents_cpu = [v for k, v in cpu.items() if k.startswith("agent:")]
    agents_kernel = sum(max(0.0, spent - before.cpu_kernel.get(name, 0.0)) for name, spent in after.cpu_kernel.items())
    agent_rss = [n["agent_peak_rss_mib"] for n in nodes if n.get("agent_peak_rss_mib") is not None]
    sources = bytes_by_source(method, scenario, nodes, seed_blob, image)
    return {
        "method": method,
        "label": LABELS[method],
        "client": scenario.client,
        "nodes": nodes,
        "failures": sum(1 for n in nodes if not n["ok"]),
        "p50_s": _median(ok_times),
        "max_s": max(ok_times) if ok_times and len(ok_times) == len(nodes) else None,
        "times_s": [n["seconds"] for n in nodes],
        "pull_window_s": round(finished - at, 3),
        "settled": settled,
        "membership_s": setup.membership_s,
        "seed_egress_bytes": seed_blob,
        "seed_egress_ratio": round(seed_blob / image.total_bytes, 3),
        "seed_link_bytes": seed_link,
        "seed_link_ratio": round(seed_link / image.total_bytes, 3),
        "bytes_by_source": sources,
        "agents_cpu_s": round(sum(agents_cpu), 2) if agents_cpu else None,
        "agent_cpu_max_s": round(max(agents_cpu), 2) if agents_cpu else None,
        "agent_cpu_ms_per_mib": _cpu_per_mib(agents_cpu, nodes) if is_p2pd(method) else None,
        # What the agents' CPU spent in the kernel: a small share says the cost is the agents' own
        # (Python) work per chunk, not the network stack's per byte or packet.
        "agent_kernel_share": round(agents_kernel / sum(agents_cpu), 3) if agents_cpu and sum(agents_cpu) else None,
        "agent_peak_rss_mib_max": max(agent_rss) if agent_rss else None,
        "agent_peak_rss_mib_median": _median(agent_rss),
        "fallbacks": fallbacks(method, scenario, nodes),
        "cpu": {
            "wall_s": round(wall, 2),
            "by_process_s": cpu,
            "seed_s": cpu.get("seed", 0.0),
            "agents_s": round(sum(agents_cpu), 2),
            "containerd_s": round(sum(v for k, v in cpu.items() if k.startswith("containerd:")), 2),
            "clients_s": round(sum(v for k, v in cpu.items() if k.startswith("client:")), 2),
            "ours_s": round(ours, 2),
            "ours_share": round(ours / (wall * ncpu), 3),
            "machine_busy_s": round(machine, 2),
            "machine_share": round(machine / (wall * ncpu), 3),
            "other_s": round(max(machine - ours, 0.0), 2),
            "samples": samples,
            "sample_max": max(samples) if samples else None,
            "samples_saturated": sum(1 for s in samples if s >= _SATURATED),
            "ours_samples": our_samples,
            "ours_sample_max": max(our_samples) if our_samples else None,
        },
        "uplink_drops": {ns.rsplit("-", 1)[1]: after.drops.get(ns, 0) - before.drops.get(ns, 0)
                         for ns in after.drops if after.drops.get(ns, 0) > before.drops.get(ns, 0)},
    }


def fallbacks(method: str, scenario: Scenario, nodes: list[dict[str, Any]]) -> int | None:
    """Nodes whose client got bytes from the seed instead of its mirror (None: not measurable).

    p2pd: the agent served less than the image to its client; httpx client: bytes counted from the
    seed host. ctr through the site cache: not observable without ctr's debug log.
    """
    if method == "direct":
        return 0
    if is_p2pd(method):
        return sum(1 for n in nodes if not n["via_agent"])
    if scenario.client == "httpx":
        return sum(1 for n in nodes if n["client_bytes_by_source"].get("seed"))
    return None


def bytes_by_source(method: str, scenario: Scenario, nodes: list[dict[str, Any]], seed_blob: int,
                    image: Image) -> dict[str, int]:
    """Bytes the nodes received over the network, by source: seed, site cache, peers.

    direct: every byte from the seed; cache: the seed's egress went to the cache (or, after a
    fallback, to a node) and the cache served every node's image; p2pd: the agents' counters.
    """
    if method == "direct":
        return {"seed": seed_blob}
    if is_p2pd(method):
        return {"seed": sum(n["agent_upstream_bytes"] for n in nodes),
                "peers": sum(n["agent_peer_bytes"] for n in nodes)}
    if scenario.client == "httpx":
        from_cache = sum(n["client_bytes_by_source"].get("cache", 0) for n in nodes)
    else:
        from_cache = sum(image.blob_bytes for n in nodes if n["ok"])  # ctr verified every blob
    return {"seed": seed_blob, "cache": from_cache}


# ---- one scenario -----------------------------------------------------------------------


def run_scenario(scenario: Scenario, layout: images.OciLayout, args: argparse.Namespace,
                 deadline: float) -> dict[str, Any]:
    began = time.monotonic()
    print(f"== {scenario.title}: {scenario.nodes} nodes, seed uplink {scenario.seed_mbit:g} Mbit/s, node links "
          f"{scenario.node_mbit:g} Mbit/s, layer {scenario.layer_mib} MiB, client {scenario.client}", flush=True)
    tag = f"{scenario.key}-{os.getpid()}"
    images.add_random_layer(layout, "busybox", tag, scenario.layer_mib)
    methods: dict[str, dict[str, Any]] = {}
    with Netbed(scenario.nodes, scenario.rates, workdir=args.workdir, keep_files=args.keep,
                sites=scenario.sites, congestion_control=args.congestion_control) as net:
        bed = start_bed(net, seed_upload_rate(scenario, args.seed_share), args.seed_congestion_control)
        bed.upload_share = args.upload_share
        bed.peer_congestion_control = args.peer_congestion_control
        bed.agent_log_level = args.agent_log_level
        image = push_image(bed, layout, tag)
        limit = bound(image.total_bytes, scenario.nodes, scenario.rates)
        print(f"   pushed {image.ref} ({image.total_bytes / MIB:.2f} MiB); bound {limit['seconds']:.1f} s, "
              f"client-server {limit['client_server_s']:.1f} s; testbed up in {time.monotonic() - began:.1f} s",
              flush=True)
        for method in [m for m in args.methods if m in scenario.methods]:
            runs: list[dict[str, Any]] = []
            for _ in range(scenario.p2pd_runs if is_p2pd(method) else 1):
                left = deadline - time.monotonic()
                # A pull may take N*F/u_s (everything through the seed's link), more with the cache's double fetch.
                max_time = min(max(4 * limit["client_server_s"], 60.0), left - 30)
                if runs and left < 120:
                    break  # repetitions are extra: keep the time budget
                if max_time < 10:
                    raise BenchError(f"out of time before {method} of {scenario.key}")
                t0 = time.monotonic()
                result = run_method(bed, scenario, method, image, max_time)
                runs.append(result)
                print(f"   {method:6}: p50 {_fmt(result['p50_s'])} s, max {_fmt(result['max_s'])} s "
                      f"({_fmt(ratio_or_none(result['max_s'], limit['seconds']))}{X} bound), seed egress "
                      f"{result['seed_egress_ratio']:.2f}{X} image, failures {result['failures']}, fallbacks "
                      f"{result['fallbacks']}; CPU ours {result['cpu']['ours_share']:.0%} / machine "
                      f"{result['cpu']['machine_share']:.0%} of {len(os.sched_getaffinity(0))} cores "
                      f"(max 0.5 s sample: ours {_pct(result['cpu']['ours_sample_max'])}, machine "
                      f"{_pct(result['cpu']['sample_max'])}); {time.monotonic() - t0:.0f} s",
                      flush=True)
                for node in result["nodes"]:
                    if not node["ok"]:
                        print(f"     {node['node']} failed: {node['errors'][:3]}", flush=True)
            methods[method] = median_run(runs, image.total_bytes, limit["seconds"])
    return {"scenario": asdict(scenario), "image": asdict(image), "bound": limit, "methods": methods,
            "rates": asdict(scenario.rates), "seed_share": args.seed_share or None,
            "congestion_control": planned_congestion(args),
            "duration_s": round(time.monotonic() - began, 1)}


def seed_upload_rate(scenario: Scenario, share: float) -> int:
    """The seed's ``[server] upload_rate`` for ``share`` of its uplink (all its site links), bytes/s."""
    return int(share * scenario.seed_mbit * scenario.sites * 1e6 / 8)


def seed_pacing_text(results: Sequence[dict[str, Any]]) -> str:
    """How the seed's downloads were paced in ``results`` (older results did not record it: unpaced)."""
    shares = sorted({r.get("seed_share") or 0.0 for r in results})
    if shares == [0.0]:
        return "The seed's downloads were not paced."
    if len(shares) == 1:
        return (f"The seed ran with `[server] upload_rate` = {shares[0]:g}{X} its uplink (`--seed-share`): its blob "
                "downloads in progress share that rate, each connection paced by the kernel at its part.")
    return ("The seed's pacing differs between these results (`seed_share` in the JSON; none recorded: "
            "unpaced).")


def seed_setup_text(results: Sequence[dict[str, Any]]) -> str:
    """How the seed was paced and which congestion control it and the peer ports used."""
    return seed_pacing_text(results) + " " + congestion_text(results)


def planned_congestion(args: argparse.Namespace) -> dict[str, str]:
    """The congestion control of the seed's connections and of the agents' peer ports in a run
    (the algorithm's name; the namespaces' default where neither sets one)."""
    namespaces = args.congestion_control or host_congestion_control()
    peers = args.peer_congestion_control
    if peers is None:
        peers = SwarmConfig().peer_congestion_control
    return {"seed": args.seed_congestion_control or namespaces, "peers": peers or namespaces}


def congestion_text(results: Sequence[dict[str, Any]]) -> str:
    """Which congestion control the seed and the agents' peer ports used in ``results`` (older
    results did not record it: both used the namespaces' default, BBR on this host)."""
    seen = {json.dumps(r.get("congestion_control") or {"seed": "bbr", "peers": "bbr"}, sort_keys=True)
            for r in results}
    if len(seen) > 1:
        return ("The seed's and the agents' TCP congestion control differ between these results "
                "(`congestion_control` in the JSON; none recorded: the namespaces' default, BBR).")
    used = json.loads(seen.pop())
    return (f"TCP congestion control: the seed's connections {used['seed']} (`--seed-congestion-control`), "
            f"the agents' peer ports {used['peers']} (`[swarm] peer_congestion_control`).")


def median_run(runs: list[dict[str, Any]], image_bytes: int, limit: float) -> dict[str, Any]:
    """The run whose last node is the median one (a failed run counts as the slowest), with a summary
    of every run under ``runs`` when there were several."""
    order = sorted(range(len(runs)), key=lambda i: runs[i]["max_s"] if runs[i]["max_s"] is not None else float("inf"))
    chosen = dict(runs[order[(len(runs) - 1) // 2]])
    if len(runs) > 1:
        chosen["runs"] = [run_summary(run, image_bytes, limit) for run in runs]
        chosen["shown_run"] = order[(len(runs) - 1) // 2]
    return chosen


def run_summary(run: dict[str, Any], image_bytes: int, limit: float) -> dict[str, Any]:
    holder = max(run["nodes"], key=lambda n: n.get("agent_upstream_bytes", 0))
    return {"p50_s": run["p50_s"], "max_s": run["max_s"], "max_vs_bound": ratio_or_none(run["max_s"], limit),
            "seed_egress_ratio": run["seed_egress_ratio"], "failures": run["failures"],
            "holder_s": holder["seconds"],
            "holder_copies": holder.get("agent_peer_served_bytes", 0) / image_bytes}


def ratio_or_none(value: float | None, base: float) -> float | None:
    return None if value is None or not base else round(value / base, 2)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return DASH if value is None else format(value, spec)


def _counted(count: int, noun: str) -> str:
    """``count`` and ``noun``, plural unless one: "1 relay", "108 relays"."""
    return f"{count} {noun if count == 1 else noun + 's'}"


def _size(count: int) -> str:
    return f"{count / MIB:.2f} MiB" if count >= MIB // 10 else f"{count / 1024:.1f} KiB"


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{value:.0%}"


# ---- report -----------------------------------------------------------------------------


def _cpu_per_mib(agents_cpu: list[float], nodes: list[dict[str, Any]]) -> float | None:
    """The agents' CPU per MiB they received (upstream + peers) plus sent to peers: the issue's
    swarm CPU measure (goal ≤ 15 ms/MiB; the plain mirror path is ~4)."""
    moved = sum(n.get("agent_upstream_bytes", 0) + n.get("agent_peer_bytes", 0)
                + n.get("agent_peer_served_bytes", 0) for n in nodes)
    if not agents_cpu or not moved:
        return None
    return round(sum(agents_cpu) * 1000 / (moved / MIB), 1)


def render_table(result: dict[str, Any]) -> str:
    limit = result["bound"]["seconds"]
    head = ["Method", "client", "p50 s", "max s", f"p50 {X} bound", f"max {X} bound",
            f"seed egress {X} image", "bytes by source MiB", "agent CPU s (sum; busiest node; ms per MiB moved)",
            "agent peak RSS MiB (max)", f"CPU: ours / machine (mean; samples ≥ {_SATURATED:.0%})",
            "failed (fell back)"]
    rows = [head, ["---"] * len(head)]
    for method in ALL_METHODS:
        m = result["methods"].get(method)
        if m is None:
            continue
        r50, rmax = ratio_or_none(m["p50_s"], limit), ratio_or_none(m["max_s"], limit)
        sources = ", ".join(f"{k} {v / MIB:.0f}" for k, v in m["bytes_by_source"].items())
        cpu = m["cpu"]
        rows.append([
            m["label"], m["client"], _fmt(m["p50_s"]), _fmt(m["max_s"]),
            f"{_fmt(r50)}{X}", f"**{_fmt(rmax)}{X}**" if method == "p2pd" else f"{_fmt(rmax)}{X}",
            f"**{m['seed_egress_ratio']:.2f}{X}**" if method == "p2pd" else f"{m['seed_egress_ratio']:.2f}{X}",
            sources,
            DASH if m["agents_cpu_s"] is None else f"{m['agents_cpu_s']:.1f}; {m['agent_cpu_max_s']:.1f}"
            + (f"; {m['agent_cpu_ms_per_mib']}" if m.get("agent_cpu_ms_per_mib") is not None else ""),
            _fmt(m["agent_peak_rss_mib_max"], ".0f"),
            f"{_pct(cpu['ours_share'])} / {_pct(cpu['machine_share'])}; "
            f"{cpu['samples_saturated']} of {len(cpu['samples'])}",
            f"{m['failures']} ({_fmt(m['fallbacks'], 'd')})",
        ])
    b = result["bound"]
    rows.append([f"bound (Kumar{DASH}Ross)", "", _fmt(b["seconds"]), _fmt(b["seconds"]), f"1.00{X}",
                 f"1.00{X}", f"1.00{X}", "", "", "", "", ""])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def goal_lines(result: dict[str, Any], *, has_variants: bool = False) -> list[str]:
    """The goals (p2pd <= 1.3 x the bound, seed egress <= 1.05 x the image) and what limits us."""
    p = result["methods"].get("p2pd")
    limit = result["bound"]
    if p is None:
        return ["p2pd was not run."]
    rmax = ratio_or_none(p["max_s"], limit["seconds"])
    time_ok = rmax is not None and rmax <= GOAL_TIME
    egress_ok = p["seed_egress_ratio"] <= GOAL_EGRESS
    runs = p.get("runs", [])
    shown = f" (the median of {len(runs)} p2pd runs)" if len(runs) > 1 else ""
    lines = [f"Goals: p2pd's last node {_fmt(rmax)}{X} the bound{shown} (goal ≤ {GOAL_TIME}{X}): "
             f"**{'met' if time_ok else 'NOT met'}**; seed egress {p['seed_egress_ratio']:.2f}{X} the image "
             f"(goal ≤ {GOAL_EGRESS}{X}): **{'met' if egress_ok else 'NOT met'}**."]
    if len(runs) > 1:
        ratios = [r["max_vs_bound"] for r in runs if r["max_vs_bound"] is not None]
        met = sum(1 for r in ratios if r <= GOAL_TIME)
        lines.append(f"All {len(runs)} p2pd runs (same testbed, same image, fresh agents): last node "
                     + ", ".join(f"{_fmt(r['max_vs_bound'])}{X}" for r in runs)
                     + f" the bound ({met} of {len(runs)} within {GOAL_TIME}{X}); seed egress "
                     + ", ".join(f"{r['seed_egress_ratio']:.2f}{X}" for r in runs)
                     + "; lease holder's copies to peers " + ", ".join(f"{r['holder_copies']:.1f}" for r in runs)
                     + ".")
    nodes = p["nodes"]
    holders = sorted((n for n in nodes if n.get("agent_upstream_bytes", 0) > 0),
                     key=lambda n: -n["agent_upstream_bytes"])
    if holders and p["max_s"] is not None:
        first = holders[0]  # the big layer's lease holder
        lines.append(
            f"Where the time goes: the seed's term F/u_s is {limit['seed_term_s']:.2f} s; the big layer's lease "
            f"holder ({first['node']}, {first['agent_upstream_bytes'] / MIB:.1f} MiB from the seed) finished after "
            f"{first['seconds']:.2f} s ({first['seconds'] / limit['seed_term_s']:.2f}{X} F/u_s), the last node "
            f"{p['max_s'] - first['seconds']:+.2f} s later. Nodes that fetched from the seed: "
            + ", ".join(f"{n['node']} {_size(n['agent_upstream_bytes'])}" for n in holders) + "; "
            f"{_counted(sum(n.get('stuck_fallbacks', 0) for n in nodes), 'stuck fallback')}, "
            f"{_counted(sum(n.get('peer_request_errors', 0) for n in nodes), 'failed peer request')}, "
            f"{_counted(sum(n.get('relay_cuts', 0) for n in nodes), 'relay')} cut short, "
            f"{_counted(p['fallbacks'], 'client fallback')} to the seed; membership by mDNS took {p['membership_s']} s "
            "before the start (not counted).")
        copies = first["agent_peer_served_bytes"] / result["image"]["total_bytes"]
        rates = result["rates"]
        headroom = rates["node_up"] / rates["seed_up"]
        drops = p.get("uplink_drops", {}).get(first["node"], 0)
        lines.append(
            f"The lease holder sent {copies:.1f} copies of the image to peers (the bound assumes about 1: each chunk "
            f"leaves it once and the peers relay it) over an uplink {headroom:g}{X} the seed's; its uplink queue "
            f"dropped {drops} packets.")
        if not time_ok and copies > 2:
            lines.append(
                f"**What limits us**: the lease holder's uplink. It sent {copies:.1f} copies where the bound "
                "assumes about one, so its uplink, only "
                f"{headroom:g}{X} the seed's, is saturated: the other nodes get the newest chunks late and the "
                "last ones after it has finished, and its own download slows (its ACKs queue behind that "
                "upload). Each new chunk leaving the lease holder about once and spreading peer to peer is what "
                "would close the gap; node links much faster than the seed's hide it"
                + (" (the sensitivity run below)." if has_variants else "."))
    plain = result["methods"].get("p2pd-plain")
    if plain is not None and plain["max_s"] and p["max_s"]:
        tls_ratio = p["max_s"] / plain["max_s"]
        cpu_tls, cpu_plain = p.get("agents_cpu_s"), plain.get("agents_cpu_s")
        cpu_text = (f"; agents' CPU {cpu_tls:.1f} s vs {cpu_plain:.1f} s ({cpu_tls / cpu_plain:.2f}{X})"
                    if cpu_tls and cpu_plain else "")
        lines.append(f"Peer TLS (mutual, key-derived certificates) vs peers in clear: last node {p['max_s']:.2f} s vs "
                     f"{plain['max_s']:.2f} s = **{tls_ratio:.2f}{X}** (goal ≤ 1.05{X}: "
                     f"{'met' if tls_ratio <= 1.05 else 'NOT met'}){cpu_text}.")
    return lines


def variant_line(result: dict[str, Any], base: dict[str, Any]) -> str:
    """One line for a sensitivity run of ``base`` (p2pd only, other link rates)."""
    p, rates, limit = result["methods"].get("p2pd"), result["rates"], result["bound"]["seconds"]
    if p is None or p["max_s"] is None:
        return f"Sensitivity run {result['scenario']['title']}: p2pd did not complete."
    fetchers = [n for n in p["nodes"] if n.get("agent_upstream_bytes", 0) > 0]
    holder = max(p["nodes"], key=lambda n: n.get("agent_upstream_bytes", 0))
    copies = holder.get("agent_peer_served_bytes", 0) / result["image"]["total_bytes"]
    cpu = p.get("agent_cpu_ms_per_mib")
    return (f"Sensitivity — {result['scenario']['title']}: N = {result['scenario']['nodes']}, seed "
            f"{rates['seed_up']:g} Mbit/s, node links {rates['node_up']:g} Mbit/s "
            f"({rates['node_up'] / rates['seed_up']:g}{X} the seed's; base scenario "
            f"{base['rates']['node_up'] / base['rates']['seed_up']:g}{X}), p2pd only: p50 {p['p50_s']:.2f} s, "
            f"last node {p['max_s']:.2f} s = **{p['max_s'] / limit:.2f}{X} the bound** ({limit:.2f} s); "
            f"{len(fetchers)} nodes fetched ranges from the seed, the busiest "
            f"({holder['agent_upstream_bytes'] / MIB:.1f} MiB) sent {copies:.1f} copies of the image to peers; "
            f"seed egress {p['seed_egress_ratio']:.2f}{X}"
            + (f"; agents' CPU {cpu} ms per MiB moved." if cpu is not None else "."))


def render_scenario(result: dict[str, Any], plots: dict[str, str], variants: Sequence[dict[str, Any]] = ()) -> str:
    sc, image, limit, rates = result["scenario"], result["image"], result["bound"], result["rates"]
    n = sc["nodes"]
    client = ("`ctr images pull --hosts-dir` (containerd 1.6, a private containerd per node, fetch + unpack)"
              if sc["client"] == "ctr" else
              "the containerd-like httpx client (`tests/bench/nsworker.py`: HEAD tag, GET manifest, GET blobs "
              "in parallel, sha256 verified)")
    lines = [
        f"### {sc['title']}: N = {n}, seed uplink {rates['seed_up']:g} Mbit/s, node links "
        f"{rates['node_up']:g} Mbit/s",
        "",
        f"{sc['description'][:1].upper() + sc['description'][1:]}. Image: busybox + one random layer of "
        f"{sc['layer_mib']} MiB, F = {image['total_bytes'] / MIB:.2f} MiB in all. Client: {client}. "
        f"Bound = max(F/u_s {limit['seed_term_s']:.2f} s, F/d_min {limit['download_term_s']:.2f} s, "
        f"N·F/(u_s + Σu_i) {limit['aggregate_term_s']:.2f} s) = **{limit['seconds']:.2f} s**; client-server "
        f"minimum max(N·F/u_s, F/d_min) = {limit['client_server_s']:.1f} s. " + seed_setup_text([result]),
        "",
        render_table(result),
        "",
        *goal_lines(result, has_variants=bool(variants)),
        *(variant_line(v, result) for v in variants),
        "",
    ]
    for key in ("cdf", "bytes"):
        if key in plots:
            lines.append(f"![{sc['title']}: {'completion-time CDF' if key == 'cdf' else 'bytes by source'}]"
                         f"({plots[key]})")
    if plots:
        lines.append("")
    return "\n".join(lines)


def matrix_row(result: dict[str, Any]) -> dict[str, Any]:
    """One cell of the weak-regime matrix, from its p2pd run."""
    sc, rates, limit = result["scenario"], result["rates"], result["bound"]["seconds"]
    p = result["methods"]["p2pd"]
    nodes = p["nodes"]
    # Range-lease holders: the nodes that fetched at least a chunk of the big layer from the seed
    # (not only manifests or a small layer, which made the ratio below meaningless); their copies
    # to peers per copy received.
    chunk = _layer_chunk_size(result["image"])
    holders = [n for n in nodes if n.get("agent_upstream_bytes", 0) >= chunk]
    copies = [n.get("agent_peer_served_bytes", 0) / n["agent_upstream_bytes"] for n in holders]
    rss = [n["agent_peak_rss_mib"] for n in nodes if n.get("agent_peak_rss_mib") is not None]
    waits = [n["client_longest_wait_s"] for n in nodes if n.get("client_longest_wait_s") is not None]
    # Of the chunks the nodes took from peers, the share a range holder relayed while it still
    # arrived from the seed (the rest were sent complete, later): at equal links every node must
    # get each chunk about as it lands somewhere, and what reaches it later is its tail. Relays
    # are counted as they begin (a cut one too; they are few, and its chunk is asked again).
    taken = sum(n.get("chunks_verified", 0) for n in nodes)
    relayed = sum(n.get("chunks_relayed", 0) for n in nodes)
    # Peer bytes sent in vain: answers cut or cancelled before their chunk was verified (the
    # endgame's second requests, relays whose own source failed), uplink time that delivered
    # nothing; an upper bound, for p2pd_peer_served_bytes counts a complete chunk's answer when it
    # starts. And the range holders' uplinks against the others': at equal links a holder's
    # carries the first copies of its arriving chunks, and holders' uplinks full while the others'
    # idle is upload the site lacks (thirty-third session).
    served = sum(n.get("agent_peer_served_bytes", 0) for n in nodes)
    verified = sum(n.get("agent_peer_bytes", 0) for n in nodes)
    up = (p.get("link_use") or {}).get("up") or {}

    def mean_uplink(group: Sequence[dict[str, Any]]) -> float | None:
        shares = [up[n["node"]] for n in group if n.get("node") in up]
        return sum(shares) / len(shares) if shares else None

    return {
        "relayed_share": relayed / taken if taken else None,
        "in_vain_share": (served - verified) / served if served and verified else None,
        # Relayed answers cut short (their askers' logs): a cause of bytes sent in vain; at half
        # the 1x/32 rates 761-901 a pull before relays got a read timeout of their own (34th session).
        "relay_cuts": sum(n["relay_cuts"] for n in nodes) if all("relay_cuts" in n for n in nodes) else None,
        "up_holders": mean_uplink(holders),
        "up_others": mean_uplink([n for n in nodes if n not in holders]),
        "longest_wait_s": max(waits) if waits else None,
        "link_use": p.get("link_use"),
        "key": sc["key"], "nodes": sc["nodes"], "ratio": rates["node_up"] / rates["seed_up"],
        "seed_mbit": rates["seed_up"], "node_mbit": rates["node_up"], "bound_s": limit,
        "p50_vs_bound": ratio_or_none(p["p50_s"], limit), "max_vs_bound": ratio_or_none(p["max_s"], limit),
        # The goal is checked on the unrounded ratio: 1.2516 shows as 1.25 in the table but is not ≤ 1.25.
        "max_vs_bound_exact": p["max_s"] / limit if p.get("max_s") is not None and limit else None,
        "egress": p["seed_egress_ratio"], "failures": p["failures"], "fallbacks": p["fallbacks"],
        "holders": len(holders), "holder_copies_mean": sum(copies) / len(copies) if copies else None,
        "holder_copies_max": max(copies) if copies else None, "cpu_ms_per_mib": p.get("agent_cpu_ms_per_mib"),
        "kernel_share": p.get("agent_kernel_share"),
        "rss_max_mib": max(rss) if rss else None, "machine_share": p["cpu"]["machine_share"],
    }


def matrix_cell_met(max_vs_bound: float | None, egress: float) -> bool:
    """Issue 11's goal for one matrix cell; given the unrounded ratio, 1.2516 is not ≤ 1.25."""
    return max_vs_bound is not None and max_vs_bound <= MATRIX_GOAL_TIME and egress <= GOAL_EGRESS


def render_matrix(cells: Sequence[dict[str, Any]], plots: dict[str, str]) -> str:
    rows = sorted((matrix_row(r) for r in cells), key=lambda row: (row["nodes"], row["ratio"]))
    met = [r for r in rows if matrix_cell_met(r["max_vs_bound_exact"], r["egress"])]
    # Cells the table's two decimals show at the goal that are above it.
    narrow = [r for r in rows if r not in met and matrix_cell_met(r["max_vs_bound"], r["egress"])]
    lines = [
        "### The weak-regime matrix: node link ÷ seed uplink, by N (p2pd only)",
        "",
        "Every node pulls the image at once (busybox + one random layer: 12 MiB for N = 8 and 16, 8 MiB for "
        "N = 32; the httpx client). The seed's uplink shrinks as N grows ("
        + ", ".join(f"{MATRIX_NODES[n]:g}" for n in sorted(MATRIX_NODES)) + " Mbit/s) to keep the 2-core "
        "machine near the ~70 % busy the issue allows (the *machine busy* column, measured during the pull, "
        "says where that holds; why N = 32 runs faster: the comment at MATRIX_NODES in tests/bench/swarm.py). "
        "*Longest client wait*: the longest any client went without a body byte (a blob's first byte "
        "included; the client gives up on a host after 30 s without one). *Holders' copies*: "
        "bytes a range-lease holder (a node that fetched at least one chunk of the layer from the seed) sent "
        "to peers ÷ bytes it fetched from the seed (mean; max). CPU = the agents' "
        "CPU per MiB they received plus sent; in brackets the share of it spent in the kernel (system time: "
        "system calls and the network stack's work for them; the rest is the agents' own code). One run per "
        "cell. " + seed_setup_text(cells),
        "",
        "| N | node ÷ seed | links (Mbit/s) | bound | p50 ÷ bound | max ÷ bound | seed egress ÷ image | failed | "
        "client fallbacks | longest client wait | range holders | holders' copies | CPU ms/MiB | peak RSS (MiB) | "
        "machine busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wait = DASH if r["longest_wait_s"] is None else f"{r['longest_wait_s']:.1f} s"
        copies = (DASH if r["holder_copies_mean"] is None
                  else f"{r['holder_copies_mean']:.1f}; {r['holder_copies_max']:.1f}")
        lines.append(
            f"| {r['nodes']} | {r['ratio']:g} | {r['seed_mbit']:g} / {r['node_mbit']:g} | {r['bound_s']:.1f} s | "
            f"{_fmt(r['p50_vs_bound'])}{X} | **{_fmt(r['max_vs_bound'])}{X}** | {r['egress']:.2f}{X} | "
            f"{r['failures']} | {r['fallbacks']} | {wait} | {r['holders']} | "
            f"{copies} | {_fmt(r['cpu_ms_per_mib'], '.0f')}"
            + ("" if r.get("kernel_share") is None else f" ({_pct(r['kernel_share'])})") + " | "
            f"{_fmt(r['rss_max_mib'], '.0f')} | {_pct(r['machine_share'])} |")
    lines += ["", f"Goal (issue 11): every cell ≤ {MATRIX_GOAL_TIME}{X} the bound with seed egress ≤ "
              f"{GOAL_EGRESS}{X}: **{len(met)} of {len(rows)} cells met**"
              + (" (" + ", ".join(f"N = {r['nodes']} at {r['ratio']:g}{X}" for r in met) + ")." if met else ".")
              + "".join(f" N = {r['nodes']} at {r['ratio']:g}{X}: {r['max_vs_bound_exact']:.3f}{X}, above the goal by "
                        "less than the table's rounding." for r in narrow),
              ""]
    uses = [(r, r["link_use"]) for r in rows if r["link_use"]]
    if uses:
        lines += ["Link use while the seed was sending (bytes on the wire, headers included, ÷ what the link could "
                  "carry meanwhile; mean of the nodes, lowest node in brackets; and the longest stretch any node's "
                  f"uplink carried under {_IDLE_SHARE:.0%} of its rate, sampled every {_LINK_SAMPLE_S:g} s): "
                  + "; ".join(f"N = {r['nodes']} at {r['ratio']:g}{X}: down {_pct(u['down_mean'])} "
                              f"({_pct(u['down_min'])}; first quarter {_pct(u.get('down_first_quarter'))}, "
                              f"the rest {_pct(u.get('down_rest'))}), up {_pct(u['up_mean'])}, idle uplink "
                              f"{u['longest_idle_uplink_s']:g} s, relayed {_pct(r.get('relayed_share'))}, "
                              f"uplinks of the range holders {_pct(r.get('up_holders'))} and of the others "
                              f"{_pct(r.get('up_others'))}, sent in vain {_pct(r.get('in_vain_share'))}"
                              + (f" ({_counted(r['relay_cuts'], 'relay')} cut short)"
                                 if r.get("relay_cuts") is not None else "")
                              for r, u in uses) + ". *Relayed*: of the chunks nodes took from peers, the share "
                  "sent by a range holder while the chunk still arrived there from the seed (the rest went "
                  "out complete, later). *Range holders*: nodes that fetched at least a chunk's worth from the "
                  "seed (a range of any blob of the image). *Sent in vain*: of the chunk bytes nodes answered "
                  "peers with (a complete chunk counted when its answer starts, a relay as each piece goes "
                  "out), those that no node verified (answers cut or cancelled: the endgame's second "
                  "requests, relays whose own source failed or that sent no byte for their asker's relay read "
                  "timeout; the relays cut short, counted from the askers' logs, in brackets).", ""]
    if "matrix" in plots:
        lines += [f"![time ÷ bound per matrix cell]({plots['matrix']})", ""]
    return "\n".join(lines)


def _special(result: dict[str, Any]) -> bool:
    """Scenarios with a table of their own (churn, several sites)."""
    return bool(result["scenario"].get("churn")) or result["scenario"].get("sites", 1) > 1


def _plot_lines(title: str, plots: dict[str, str]) -> list[str]:
    return [f"![{title}: {'completion-time CDF' if key == 'cdf' else 'bytes by source'}]({plots[key]})"
            for key in ("cdf", "bytes") if key in plots]


def render_sites(result: dict[str, Any], plots: dict[str, str]) -> str:
    sc, image = result["scenario"], result["image"]
    p = result["methods"].get("p2pd")
    lines = [f"### {sc['title']}: {sc['sites']} sites of {sc['nodes'] // sc['sites']} nodes, "
             f"{sc['seed_mbit']:g} Mbit/s each to the seed, node links {sc['node_mbit']:g} Mbit/s (p2pd only)", "",
             f"{sc['description'][:1].upper() + sc['description'][1:]}. Each site is its own bridge and subnet "
             "(mDNS stays inside it, no path between sites), with its own shaped link to the seed's interface for "
             f"it. Image: busybox + {sc['layer_mib']} MiB, F = {image['total_bytes'] / MIB:.2f} MiB; all 16 nodes "
             "pull at once (httpx client, agent then seed). Per site: the bound uses the site's link, or its cap "
             "when lower; *egress* = bytes the site's agents fetched from the seed ÷ F, *on its link* = bytes the "
             f"seed sent on the site's link (TCP/IP headers included, ≈ +4.4 %) ÷ F; rates on the link: the "
             f"highest over any {_RATE_WINDOW_S:g} s window and the mean while bytes flowed (sampled every "
             f"{_LINK_SAMPLE_S:g} s; headers included). " + seed_setup_text([result]), ""]
    if p is None or "sites" not in p:
        return "\n".join([*lines, "p2pd was not run.", ""])
    lines += ["| site | cap | bound | p50 ÷ bound | max ÷ bound | egress ÷ F | on its link ÷ F | peak rate (2 s) | "
              "mean rate | failed (fell back) |", "|---|---|---|---|---|---|---|---|---|---|"]
    held = []
    for site in p["sites"]:
        cap = site["cap_mbit"]
        bound_s = site["bound_s"]
        lines.append(
            f"| {site['site']} | {DASH if cap is None else f'{cap:g} Mbit/s'} | {bound_s:.1f} s | "
            f"{_fmt(ratio_or_none(site['p50_s'], bound_s))}{X} | **{_fmt(site['max_vs_bound'])}{X}** | "
            f"**{site['egress_ratio']:.2f}{X}** | {site['link_ratio']:.2f}{X} | {site['peak_mbit']:.1f} Mbit/s | "
            f"{_fmt(site['mean_mbit'], '.1f')} Mbit/s | {site['failures']} ({site['fallbacks']}) |")
        if cap is not None:
            held.append((site["site"], cap, site["peak_mbit"], site["mean_mbit"]))
    once = all(site["egress_ratio"] <= GOAL_EGRESS for site in p["sites"])
    lines += ["", f"Each site pulls once (egress ≤ {GOAL_EGRESS}{X} per site): **{'met' if once else 'NOT met'}**."]
    for site, cap, peak, mean in held:
        wire = cap * 1.045
        ok = mean is not None and mean <= wire * _CAP_MEAN_SLACK and peak <= wire * _CAP_WINDOW_SLACK
        verdict = "holds" if ok else "NOT held"
        lines.append(f"Site {site}'s cap of {cap:g} Mbit/s (content; ≈ {wire:.1f} Mbit/s on the wire): mean "
                     f"{_fmt(mean, '.1f')} Mbit/s while its bytes flowed, highest {_RATE_WINDOW_S:g} s window "
                     f"{peak:.1f} Mbit/s ({peak / wire:.2f}{X} the cap on the wire) — **{verdict}** "
                     f"(goal: the mean within {round((_CAP_MEAN_SLACK - 1) * 100)} % of the cap on the wire, every "
                     f"{_RATE_WINDOW_S:g} s window within {round((_CAP_WINDOW_SLACK - 1) * 100)} %). A range holder "
                     "asks the seed for a quarter second of its share at a time, each piece paid for before it is "
                     "asked for (p2pd/swarm/engine.py, `_pay_upstream_piece`).")
    lines += ["", *_plot_lines(sc["title"], plots), ""]
    return "\n".join(lines)


def _layer_chunk_size(image: dict[str, Any]) -> int:
    """The chunk size the agents (default [swarm] chunk_size) use for the big layer."""
    return chunk_size_for(image["blobs"][image["layer_digest"]], DEFAULT_CHUNK_SIZE)


def _largest_range(image: dict[str, Any]) -> int:
    """Bytes of the largest range lease of the big layer (its chunk size, the coordinator's split)."""
    from p2pd.swarm.coordinator import split_ranges

    chunk = _layer_chunk_size(image)
    chunks = -(-image["blobs"][image["layer_digest"]] // chunk)
    return max(last - first + 1 for first, last in split_ranges(chunks, 16)) * chunk


def render_churn(result: dict[str, Any], plots: dict[str, str]) -> str:
    sc, image, limit = result["scenario"], result["image"], result["bound"]["seconds"]
    p = result["methods"].get("p2pd")
    lines = [f"### {sc['title']}: N = {sc['nodes']}, seed uplink {sc['seed_mbit']:g} Mbit/s, node links "
             f"{sc['node_mbit']:g} Mbit/s (p2pd only)", "",
             f"{sc['description'][:1].upper() + sc['description'][1:]}. Image: busybox + {sc['layer_mib']} MiB, "
             f"F = {image['total_bytes'] / MIB:.2f} MiB; bound for all {sc['nodes']} nodes {limit:.1f} s. Each "
             "client's only host is its own agent (no fallback to the seed), so a pull the churn breaks fails "
             "instead of hiding behind the seed; a killed node's own pull is lost with it (not counted). "
             + seed_setup_text([result]), ""]
    if p is None or "churn" not in p:
        return "\n".join([*lines, "p2pd was not run.", ""])
    churn = p["churn"]
    holders, largest = len(churn.get("killed_holders", [])), _largest_range(image)
    lines += ["| nodes | count | completed | p50 s | max s | max since start or join |", "|---|---|---|---|---|---|"]
    for role, label in (("stayed", "pulled from the start"), ("joined", "started mid-pull"),
                        ("killed", "killed mid-pull")):
        r = churn["roles"][role]
        lines.append(f"| {label} | {r['nodes']} | {r['ok']} | {_fmt(r['p50_s'])} | {_fmt(r['max_s'])} | "
                     f"{_fmt(r['max_since_join_s'])} |")
    lost = churn["lost_pulls"]
    lines += ["", f"Killed at {churn.get('killed_at_s', DASH)} s: "
              + ", ".join(f"n{i}" for i in churn.get("killed", []))
              + f" ({len(churn.get('killed_holders', []))} of them range holders of the big layer); joined: "
              + ", ".join(f"n{i}" for i in churn["late"]) + ". "
              f"Seed egress {churn['seed_egress_ratio']:.2f}{X} the image; the issue's allowance — the killed "
              f"holders' unfinished ranges, at most {holders} times the largest range "
              f"({largest / MIB:.0f} MiB) — is {1 + holders * largest / image['total_bytes']:.2f}{X}. "
              f"Pulls lost to churn: **{len(lost)}**" + (f" ({', '.join(lost)})." if lost else " (goal: none)."),
              "", *_plot_lines(sc["title"], plots), ""]
    return "\n".join(lines)


def cpu_check(report: dict[str, Any]) -> dict[str, Any]:
    """Was the machine the bottleneck? Our processes' and the whole machine's CPU during every pull."""
    rows = [(r["scenario"]["title"], m) for r in report["results"] for m in r["methods"].values()]
    p2pd = [m["cpu"] for _, m in rows if m["method"] == "p2pd"]
    samples = [s for c in p2pd for s in c["samples"]]
    ours_max = max((c["ours_sample_max"] or 0.0 for c in p2pd), default=0.0)
    saturated = sum(1 for s in samples if s >= _SATURATED)
    return {
        "ours_mean_min": min((m["cpu"]["ours_share"] for _, m in rows), default=0.0),
        "ours_mean_max": max((m["cpu"]["ours_share"] for _, m in rows), default=0.0),
        "machine_mean_min": min((m["cpu"]["machine_share"] for _, m in rows), default=0.0),
        "machine_mean_max": max((m["cpu"]["machine_share"] for _, m in rows), default=0.0),
        "p2pd": {title: {"ours": m["cpu"]["ours_share"], "machine": m["cpu"]["machine_share"],
                         "ours_sample_max": m["cpu"]["ours_sample_max"]}
                 for title, m in rows if m["method"] == "p2pd"},
        "p2pd_ours_sample_max": ours_max,
        "p2pd_samples": len(samples),
        "p2pd_samples_saturated": saturated,
        # The machine was saturated for more than a quarter of the p2pd pulls (single samples at the
        # start and at the end, when all nodes do the same work at once, do not make a pull CPU-bound).
        "cpu_bound": bool(samples) and saturated / len(samples) > 0.25,
    }


def cpu_check_text(report: dict[str, Any]) -> str:
    check = report["cpu_check"]
    ncpu = report["machine"]["nproc"]
    if not check["p2pd"]:
        return ""
    text = (f"CPU check (is the {ncpu}-core machine the bottleneck?): the run samples, every {_SAMPLE_S:g} s, "
            f"the CPU time of its own processes (seed, agents, containerds, clients with ctr) and of the whole "
            f"machine (kernel networking and shaping included, and other people's work running meanwhile). "
            f"Averaged over each pull, our processes used {check['ours_mean_min']:.0%}{DASH}"
            f"{check['ours_mean_max']:.0%} of the {ncpu} cores and the machine was busy "
            f"{check['machine_mean_min']:.0%}{DASH}{check['machine_mean_max']:.0%}. The CPU-heavy method is p2pd ("
            + "; ".join(f"{title}: ours {v['ours']:.0%} on average, at most {_pct(v['ours_sample_max'])} in a "
                        f"{_SAMPLE_S:g} s sample; machine {v['machine']:.0%}" for title, v in check["p2pd"].items())
            + f"); the machine was ≥ {_SATURATED:.0%} busy in {check['p2pd_samples_saturated']} of "
            f"{check['p2pd_samples']} samples during the p2pd pulls. The highest samples come at the release (every "
            "agent resolves the tag and plans at once) and at the end (every node verifies the whole blob and, "
            "with ctr, every containerd unpacks at the same moment — on one 2-core machine instead of N hosts). ")
    if check["cpu_bound"]:
        text += ("**Verdict: partly CPU-bound** — the machine was saturated for more than a quarter of the p2pd "
                 "pulls; the p2pd times are an upper bound.")
    else:
        aggregate = ", ".join(f"{r['scenario']['title']} {r['scenario']['nodes'] * r['rates']['seed_up'] / 8:.0f} MB/s"
                              for r in report["results"])
        text += ("Verdict: not CPU-bound — the shaped links set the pace. (The rates were chosen for it: at the "
                 f"bound the nodes receive N{chr(0xB7)}u_s together — {aggregate}.)")
    return text


def tree_text(tree: dict[str, Any] | None) -> str:
    if not tree:
        return "this tree"
    start, end = tree["start"], tree["end"]

    def one(state: dict[str, Any]) -> str:
        dirty = state["uncommitted_files"]
        return f"commit {state['commit']}" + (f" + {dirty} uncommitted files in p2pd/ and seed/" if dirty else "")

    if start == end:
        return f"this tree: {one(start)}"
    return f"this tree; **it changed during the run**: {one(start)} at the start, {one(end)} at the end"


def _tcp_text(tcp: dict[str, Any] | None) -> str:
    if not tcp:
        return "TCP congestion control: not recorded (the host's default)."
    how = ("this host's default, which the namespaces inherit; Debian's default is CUBIC" if tcp["host_default"]
           else "set in every namespace with `--congestion-control`")
    return f"TCP congestion control: {tcp['congestion_control']} ({how})."


def render_section(report: dict[str, Any]) -> str:
    m, load = report["machine"], report["load"]
    lines = [
        SECTION_TITLE,
        "",
        f"- Date: {report['date']}; duration {report['duration_s']:.0f} s",
        f"- Command: `{report['command']}` (`make bench-swarm`)",
        *(f"- Later run merged in: {run['scenarios']} on {run['date']} by `{run['command']}` "
          f"({tree_text(run.get('tree'))}; {run['duration_s']:.0f} s)" for run in report.get("merged_runs", [])),
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; p2pd and seed {m['seed_version']} ({tree_text(report.get('tree'))}), "
        f"{report['versions']['containerd']}, {report['versions']['registry']}",
        "- Testbed (`tests/bench/netbed.py`): Linux network namespaces — a switch namespace holding a bridge, "
        "one seed host, N node hosts, each attached by a veth pair; `tc tbf` shapes both directions of every "
        "link (host egress and switch-port egress; rate = the figure given, burst ≥ 64 KiB; queue: "
        f"{report['queues']['seed_ms']:g} ms on the seed's uplink, {report['queues']['node_ms']:g} ms on node links). "
        + _tcp_text(report.get("tcp")) + " " + _agents_text(report.get("agents")) +
        "Nothing in the root namespace; mDNS only on the private bridge. No latency or loss emulation "
        "(this kernel has no netem). Rates are tc's (10^6 bit/s of Ethernet frames): TCP/IP headers take "
        f"≈ 4.4 % of them, so even a perfect transfer shows ≈ 1.05{X} a bound computed from payload bytes.",
        "- Method: every node cold; all clients released at the same instant; completion = from that instant "
        "to the node's verified image. *direct*: straight from the seed. *site cache*: Debian's "
        "`docker-registry` 2.8 in proxy mode on node 1, hosts.toml (or host list) = cache, then seed. *p2pd*: an "
        "agent per node (`--listen 127.0.0.1:5080`, `--peer-listen <node>:7080 --mdns-interface <node>`, shared "
        "cluster key, defaults otherwise), found by mDNS, hosts.toml = agent, then seed. Seed egress = "
        "`seed_blob_bytes_sent_total` (content bytes; on the wire add the headers — see the JSON) ÷ F. "
        "*Agent* = p2pd or the cache.",
        f"- Machine load: loadavg {' '.join(map(str, load['loadavg_start']))} at start, "
        f"{' '.join(map(str, load['loadavg_end']))} at end.",
        "",
    ]
    results = report["results"]
    cells = [r for r in results if r["scenario"].get("matrix")]
    for result in (r for r in results if not r["scenario"].get("variant_of") and not r["scenario"].get("matrix")
                   and not _special(r)):
        variants = [r for r in results if r["scenario"].get("variant_of") == result["scenario"]["key"]]
        lines.append(render_scenario(result, report["plots"].get(result["scenario"]["key"], {}), variants))
    cache = [(r["scenario"]["nodes"], r["methods"]["cache"]["seed_egress_ratio"]) for r in report["results"]
             if "cache" in r["methods"]]
    if cells:
        lines.append(render_matrix(cells, report["plots"].get("matrix", {})))
    for result in (r for r in results if r["scenario"].get("churn")):
        lines.append(render_churn(result, report["plots"].get(result["scenario"]["key"], {})))
    for result in (r for r in results if r["scenario"].get("sites", 1) > 1):
        lines.append(render_sites(result, report["plots"].get(result["scenario"]["key"], {})))
    lines += [cpu_check_text(report), ""]
    if cache:
        lines += ["Why the site cache does not help a cold burst: its seed egress was "
                  + ", ".join(f"{ratio:.2f}{X} the image with N = {n}" for n, ratio in cache)
                  + ". distribution 2.8's proxy does not share an in-flight download: every concurrent request "
                  "for a blob it does not hold yet is fetched from the upstream again (plus once more to store "
                  "it), so the seed sends N to N + 1 copies and the nodes wait as long as with direct pulls; "
                  "the cache only helps the *next* pull.", ""]
    lines += [f"Raw numbers: [`{report['json_link']}`]({report['json_link']}).", ""]
    if report.get("truncated"):
        lines += [f"**Run incomplete**: {report['truncated']}", ""]
    return "\n".join(lines)


def make_plots(report: dict[str, Any], out_dir: Path, link_prefix: str) -> dict[str, dict[str, str]]:
    """Completion-time CDF per method and bytes by source, one PNG each per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, dict[str, str]] = {}
    for result in report["results"]:
        sc = result["scenario"]
        if sc.get("variant_of") or sc.get("matrix"):
            continue
        key, limit = sc["key"], result["bound"]["seconds"]
        files = {}
        fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
        every = [t for m in result["methods"].values() for t in m["times_s"]]
        low = 0.7 * min([limit, *every])
        for method in METHODS:
            m = result["methods"].get(method)
            if m is None:
                continue
            times = sorted(t for t, n in zip(m["times_s"], m["nodes"], strict=True) if n["ok"])
            if times:
                ys = [(i + 1) / len(m["nodes"]) for i in range(len(times))]
                ax.step([low, *times], [0.0, *ys], where="post", color=COLORS[method], label=m["label"])
        ax.axvline(limit, color="black", linestyle="--", label=f"bound {limit:.1f} s")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("completion time since the common start (s, log scale)")
        ax.set_ylabel("fraction of nodes done")
        ax.set_ylim(0, 1.02)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # outside: the lines fill the plot
        ax.set_title(f"{sc['title']}: N = {sc['nodes']}, {result['image']['total_bytes'] / MIB:.1f} MiB image")
        fig.tight_layout()
        name = f"swarm-{key}-cdf.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        files["cdf"] = f"{link_prefix}{name}"

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=100, gridspec_kw={"width_ratios": [1, 1.6]})
        sources = [("seed", "tab:red", "from the seed"), ("cache", "tab:orange", "from the site cache"),
                   ("peers", "tab:blue", "from peers (p2pd)")]
        methods = [mt for mt in METHODS if mt in result["methods"]]
        bottoms = [0.0] * len(methods)
        image_mib = result["image"]["total_bytes"] / MIB
        for source, color, label in sources:
            values = [result["methods"][mt]["bytes_by_source"].get(source, 0) / MIB for mt in methods]
            if any(values):
                left.bar(methods, values, bottom=bottoms, color=color, label=label)
                bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
        left.axhline(image_mib, color="black", linestyle=":", label="one image")
        left.set_ylabel("MiB received over the network")
        left.set_title("all nodes: bytes received, by sender")
        left.legend(fontsize=7, loc="upper left")
        p = result["methods"].get("p2pd")
        if p is not None:
            names = [n["node"] for n in p["nodes"]]
            up = [n.get("agent_upstream_bytes", 0) / MIB for n in p["nodes"]]
            peer = [n.get("agent_peer_bytes", 0) / MIB for n in p["nodes"]]
            served = [n.get("agent_peer_served_bytes", 0) / MIB for n in p["nodes"]]
            right.bar(names, up, color="tab:red", label="received from the seed")
            right.bar(names, peer, bottom=up, color="tab:blue", label="received from peers")
            right.plot(names, served, "k.", label="sent to peers")
            right.set_title("p2pd, per node")
            right.set_ylabel("MiB")
            right.tick_params(axis="x", labelsize=7, rotation=90)
            right.legend(fontsize=7)
        else:
            right.axis("off")
        fig.suptitle(f"{sc['title']}: bytes by source")
        fig.tight_layout()
        name = f"swarm-{key}-bytes.png"
        fig.savefig(out_dir / name)
        plt.close(fig)
        files["bytes"] = f"{link_prefix}{name}"
        plots[key] = files
    rows = [matrix_row(r) for r in report["results"] if r["scenario"].get("matrix")]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
        counts = sorted({r["nodes"] for r in rows})
        ratios = sorted({r["ratio"] for r in rows})
        width = 0.8 / len(ratios)
        for j, ratio in enumerate(ratios):
            values = [next((r["max_vs_bound"] or 0.0 for r in rows if r["nodes"] == n and r["ratio"] == ratio), 0.0)
                      for n in counts]
            ax.bar([i + (j - (len(ratios) - 1) / 2) * width for i in range(len(counts))], values, width,
                   label=f"node links {ratio:g}{X} the seed's")
        ax.axhline(MATRIX_GOAL_TIME, color="black", linestyle="--", label=f"goal {MATRIX_GOAL_TIME}{X}")
        ax.axhline(1.0, color="grey", linestyle=":", label="the bound")
        ax.set_xticks(range(len(counts)), [f"N = {n}" for n in counts])
        ax.set_ylabel("last node ÷ bound")
        ax.set_title("p2pd in the weak-regime matrix")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "swarm-matrix.png")
        plt.close(fig)
        plots["matrix"] = {"matrix": f"{link_prefix}swarm-matrix.png"}
    return plots


# ---- main -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.swarm", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="Markdown file to update")
    parser.add_argument("--json", type=Path, help="raw results (default: OUT's dir/bench/swarm.json)")
    parser.add_argument("--quick", action="store_true", help="only the tiny scenario (N = 3, 2 MiB layer)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated, run in this order: " + ", ".join(SCENARIOS))
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        help="comma-separated: " + ", ".join(ALL_METHODS) + " (each scenario runs those it lists)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNGs (matplotlib not needed)")
    parser.add_argument("--deadline-s", type=float, default=1680.0,
                        help="the whole run is stopped (and torn down) after this many seconds")
    parser.add_argument("--workdir", type=Path, help="parent of the run's files (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the run's files (logs) for debugging")
    parser.add_argument("--agent-log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING"),
                        help="the agents' log level (DEBUG: a line per chunk request, which "
                             "python -m tests.bench.swarm_trace reads from a --keep run; default %(default)s)")
    parser.add_argument("--congestion-control", metavar="NAME",
                        help="TCP congestion control in every namespace (e.g. cubic, Debian's default; "
                             "default: the host's, which new namespaces inherit)")
    parser.add_argument("--upload-share", type=float, default=0.0, metavar="SHARE",
                        help="run every agent with [swarm] upload_rate = SHARE x its node link (default: no cap)")
    parser.add_argument("--seed-share", type=float, default=SEED_SHARE, metavar="SHARE",
                        help="run the seed with [server] upload_rate = SHARE x its uplink (its downloads share it, "
                             f"paced; default {SEED_SHARE:g}, as an operator who knows the uplink sets it; 0: unpaced)")
    parser.add_argument("--seed-congestion-control", default=SEED_CONGESTION_CONTROL, metavar="NAME",
                        help="the seed's [server] congestion_control (default %(default)s; '' for the namespaces')")
    parser.add_argument("--peer-congestion-control", metavar="NAME",
                        help="every agent's [swarm] peer_congestion_control (default: the agent's, "
                             f"{SwarmConfig().peer_congestion_control}; '' for the namespaces')")
    parser.add_argument("--rate-scale", type=float, default=1.0, metavar="FACTOR",
                        help="multiply every link rate (and site cap) by FACTOR: is a cell held back by the "
                             "machine? (such a run is not merged into another)")
    parser.add_argument("--from-json", type=Path, metavar="JSON",
                        help="run nothing: rewrite the section and plots from the raw results of an earlier run")
    parser.add_argument("--merge-into", type=Path, metavar="JSON",
                        help="run --scenarios, then put their results into an earlier run's raw results (replacing "
                             "scenarios with the same key; the section names both runs) and rewrite from those")
    return parser


class _Deadline(BaseException):
    """The run's time budget is spent."""


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, tc, containerd)")
    for name in _TOOLS:
        find_tool(name)


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def expired(signum: int, frame: FrameType | None) -> None:
        raise _Deadline(f"time budget of {seconds:g} s spent")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def remove_stale_workdirs(parent: Path) -> None:
    """Removes ``bench-swarm-<pid>-*`` directories (the image build) of runs whose process is gone."""
    for path in parent.glob("bench-swarm-*-*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)


def tree_state() -> dict[str, Any]:
    """The commit of this tree and how many files under p2pd/ and seed/ differ from it (the code measured)."""
    root = Path(__file__).resolve().parents[2]

    def git(*argv: str) -> str:
        try:
            out = subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=10,
                                 check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    changed = git("status", "--porcelain", "--", "p2pd", "seed")
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "uncommitted_files": len(changed.splitlines()) if changed else 0}


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    deadline = began + args.deadline_s
    tree_start = tree_state()
    scenarios = [QUICK] if args.quick else [{**SCENARIOS, **TINY}[k] for k in args.scenarios.split(",") if k]
    if args.rate_scale != 1.0:
        scenarios = [dataclasses.replace(sc, seed_mbit=sc.seed_mbit * args.rate_scale,
                                         node_mbit=sc.node_mbit * args.rate_scale,
                                         site_caps_mbit=tuple(c * args.rate_scale for c in sc.site_caps_mbit))
                     for sc in scenarios]
    load_start = loadavg()
    removed = cleanup_stale()
    if removed:
        print(f"removed leftovers of killed runs: {removed}", flush=True)
    results = []
    truncated = ""
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    remove_stale_workdirs(Path(args.workdir or tempfile.gettempdir()))
    root = Path(tempfile.mkdtemp(prefix=f"bench-swarm-{os.getpid()}-", dir=args.workdir))
    try:
        with _alarm(args.deadline_s):
            layout = images.build_busybox_layout(root / "image")
            for scenario in scenarios:
                results.append(run_scenario(scenario, layout, args, deadline))
    except _Deadline as exc:
        truncated = f"{exc}; finished scenarios: {[r['scenario']['key'] for r in results]}"
        print(f"!! {truncated}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "benchmark": "swarm",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m tests.bench.swarm " + shlex.join(sys.argv[1:]),
        "machine": machine_basics(),
        "versions": {"containerd": tool_version([find_tool("containerd"), "--version"]),
                     "registry": tool_version([find_tool("docker-registry"), "--version"])},
        "load": {"loadavg_start": load_start, "loadavg_end": loadavg()},
        "queues": {"seed_ms": LinkRates(0, 0, 0).seed_queue_ms, "node_ms": LinkRates(0, 0, 0).node_queue_ms},
        "tcp": _planned_tcp(args),
        "agents": {"upload_share": args.upload_share or None, "rate_scale": args.rate_scale},
        "results": results,
        "truncated": truncated,
        "duration_s": round(time.monotonic() - began, 1),
        "tree": {"start": tree_start, "end": tree_state()},
        "goals": {"time_vs_bound": GOAL_TIME, "seed_egress_vs_image": GOAL_EGRESS},
    }


def write_report(report: dict[str, Any], out: Path, json_path: Path | None, *, plots: bool) -> str:
    json_path = json_path or out.parent / "bench" / "swarm.json"
    report["json_link"] = os.path.relpath(json_path, out.parent)
    report["cpu_check"] = cpu_check(report)
    link_prefix = os.path.relpath(json_path.parent, out.parent) + "/"
    report["plots"] = make_plots(report, json_path.parent, link_prefix) if plots else {}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    section = render_section(report)
    update_doc(out, section, MARK_START, MARK_END)
    return section


def _agents_text(agents: dict[str, Any] | None) -> str:
    """What the run changed from the agents' defaults and the scenarios' rates (nothing: empty)."""
    if not agents:
        return ""
    parts = []
    if agents.get("upload_share"):
        parts.append(f"Every agent ran with `[swarm] upload_rate` = {agents['upload_share']:g}{X} its node link "
                     "(`--upload-share`).")
    if agents.get("rate_scale", 1.0) != 1.0:
        parts.append(f"Every link rate was scaled by {agents['rate_scale']:g} (`--rate-scale`).")
    return " ".join(parts) + (" " if parts else "")


def _planned_tcp(args: argparse.Namespace) -> dict[str, Any]:
    """The TCP congestion control the run's namespaces use (recorded with the results)."""
    return {"congestion_control": args.congestion_control or host_congestion_control(),
            "host_default": args.congestion_control is None}


def merge_reports(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``earlier`` with ``later``'s scenarios put in (same key: replaced) and ``later`` named."""
    keys = {r["scenario"]["key"] for r in later["results"]}
    if earlier.get("tcp") not in (None, later.get("tcp")):  # main() refuses such a run before it starts
        raise ValueError(f"runs with other TCP congestion controls: {earlier['tcp']}, {later.get('tcp')}")
    merged = dict(earlier)
    merged["tcp"] = later.get("tcp")
    merged["results"] = [r for r in earlier["results"] if r["scenario"]["key"] not in keys] + later["results"]
    # An earlier merged run whose scenarios are all replaced now is no longer shown.
    kept = [run for run in earlier.get("merged_runs", []) if set(run["scenarios"]) - keys]
    merged["merged_runs"] = [*kept, {"date": later["date"], "command": later["command"], "tree": later.get("tree"),
                                     "scenarios": sorted(keys), "duration_s": later["duration_s"]}]
    return merged


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(ALL_METHODS)
    if unknown or any(k not in SCENARIOS and k not in TINY for k in args.scenarios.split(",") if k):
        print(f"unknown method or scenario: {sorted(unknown) or args.scenarios}", file=sys.stderr)
        return 2
    if args.from_json is not None:
        report = json.loads(args.from_json.read_text())
        print(write_report(report, args.out, args.json, plots=not args.no_plots))
        return 0
    if args.merge_into is not None and (args.upload_share or args.rate_scale != 1.0):
        print("bench-swarm: runs with --upload-share or --rate-scale are not merged into another", file=sys.stderr)
        return 2
    if args.merge_into is not None:
        earlier = json.loads(args.merge_into.read_text()).get("tcp")
        if earlier not in (None, _planned_tcp(args)):
            print(f"bench-swarm: {args.merge_into} was measured with TCP {earlier}; this run would use "
                  f"{_planned_tcp(args)}: write it to a report of its own", file=sys.stderr)
            return 2
    install_signal_handlers()
    try:
        _check_prerequisites()
        report = run(args)
    except (BenchError, NetbedError) as exc:
        print(f"bench-swarm: {exc}", file=sys.stderr)
        return 1
    fresh = report
    if args.merge_into is not None:
        report = merge_reports(json.loads(args.merge_into.read_text()), fresh)
    section = write_report(report, args.out, args.json, plots=not args.no_plots)
    print(section)
    failed = sum(m["failures"] for r in fresh["results"] for m in r["methods"].values())
    return 1 if fresh["truncated"] or failed or not fresh["results"] else 0


if __name__ == "__main__":
    sys.exit(main())
