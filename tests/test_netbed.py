"""The namespace testbed of ``make bench-swarm``, small enough for ``make test``.

``test_tiny_bench_swarm`` runs the whole benchmark at N = 3 with a 2 MiB layer (direct, site
cache, p2pd; ctr in every node) so that it cannot rot; the other tests check the testbed's
teardown guarantees and the bound. Needs root and ip/tc/containerd/skopeo/umoci/busybox/
docker-registry: skipped without them, failed with CI=true.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bench.common import X
from tests.bench.netbed import OWNER_DIR, LinkRates, Netbed, cleanup_stale, list_namespaces
from tests.bench.swarm import (
    MARK_END,
    MARK_START,
    SCENARIOS,
    SEED_CONGESTION_CONTROL,
    SEED_SHARE,
    PortSampler,
    bound,
    congestion_text,
    link_use,
    log_events,
    main,
    matrix_cell_met,
    matrix_row,
    merge_reports,
    render_matrix,
    seed_pacing_text,
    seed_upload_rate,
)
from tests.harness.tools import require_root, require_tool

ROOT = Path(__file__).resolve().parents[1]
_TOOLS = ("ip", "tc", "containerd", "ctr", "skopeo", "umoci", "busybox", "docker-registry")


def _require_testbed() -> None:
    require_root()
    for tool in _TOOLS:
        require_tool(tool)


def _run_namespaces(run_id: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(f"p2pbed-{run_id}-")]


def test_bound_matches_the_anchor_example() -> None:
    # shared/notes/anchors.md: 20 nodes, 1 GB, 100 Mb/s uplink, 1 Gb/s LAN -> 80 s; direct 1,600 s.
    result = bound(10**9, 20, LinkRates(seed_up=100, node_up=1000, node_down=1000))
    assert result["seconds"] == pytest.approx(80.0)
    assert result["client_server_s"] == pytest.approx(1600.0)
    # Many nodes with thin uplinks: the aggregate term dominates.
    many = bound(10**9, 1000, LinkRates(seed_up=100, node_up=10, node_down=1000))
    assert many["seconds"] == pytest.approx(1000 * 8e9 / (1e8 + 1000 * 1e7))


def test_holders_copies_count_only_nodes_that_fetched_a_chunk_from_the_seed_and_relays_are_a_share() -> None:
    """A node that fetched only a manifest from the seed is not a range holder: its few bytes
    fetched made the copies ratio read in the thousands. One chunk of the big layer (128 KiB for
    12 MiB) is enough to count. The relayed share is over all nodes: relays sent ÷ chunks taken."""
    mib = 1 << 20
    nodes = [{"agent_upstream_bytes": 6 * mib, "agent_peer_served_bytes": 30 * mib},
             {"agent_upstream_bytes": mib // 8, "agent_peer_served_bytes": mib + mib // 4},
             {"agent_upstream_bytes": 700, "agent_peer_served_bytes": 12 * mib},
             {"agent_upstream_bytes": 0, "agent_peer_served_bytes": 9 * mib}]
    result = {"scenario": {"key": "matrix-1x-4", "nodes": 4}, "rates": {"node_up": 16, "seed_up": 16},
              "bound": {"seconds": 10.0}, "image": {"blobs": {"sha256:l": 12 * mib}, "layer_digest": "sha256:l"},
              "methods": {"p2pd": {"nodes": nodes, "p50_s": 12.0, "max_s": 13.0, "seed_egress_ratio": 1.0,
                                   "failures": 0, "fallbacks": 0, "agent_cpu_ms_per_mib": 30.0,
                                   "cpu": {"machine_share": 0.4}}}}
    for node, wait in zip(nodes, (1.5, 4.25, None, 0.5), strict=True):
        node["client_longest_wait_s"] = wait
    assert matrix_row(result)["relayed_share"] is None  # runs before the count was kept
    result["methods"]["p2pd"]["max_s"] = 12.516  # type: ignore[index]
    assert matrix_row(result)["max_vs_bound"] == 1.25 and matrix_row(result)["max_vs_bound_exact"] == 1.2516
    result["methods"]["p2pd"]["max_s"] = 13.0  # type: ignore[index]
    for node, (relayed, taken) in zip(nodes, ((60, 40), (12, 50), (0, 100), (0, 50)), strict=True):
        node["chunks_relayed"], node["chunks_verified"] = relayed, taken
    row = matrix_row(result)
    assert row["relayed_share"] == pytest.approx(72 / 240)  # relays sent ÷ chunks taken from peers, all nodes
    assert row["holders"] == 2
    assert row["longest_wait_s"] == 4.25  # the longest any client waited for a byte (ctr clients: none)
    assert row["holder_copies_mean"] == pytest.approx(7.5) and row["holder_copies_max"] == pytest.approx(10.0)
    assert row["kernel_share"] is None  # runs before the split was kept
    assert "| 30 | " in render_matrix([result], {})
    result["methods"]["p2pd"]["agent_kernel_share"] = 0.12  # type: ignore[index]
    assert matrix_row(result)["kernel_share"] == 0.12
    assert "| 30 (12%) | " in render_matrix([result], {})  # the agents' CPU per MiB, its kernel share in brackets
    assert row["in_vain_share"] is None and row["up_holders"] is None  # runs before these were kept


def test_an_agents_log_is_counted_for_failed_requests_relays_cut_short_and_stuck_fallbacks(tmp_path: Path) -> None:
    """The agent's INFO/WARNING lines the bench counts per node, as ``p2pd.swarm.engine`` writes
    them (a relay cut's DEBUG line of the request trace is not counted a second time)."""
    digest = "sha256:" + "ab" * 32
    log = tmp_path / "p2pd-1-n3.log"
    log.write_text("\n".join([
        f"2026-12-07 19:12:23,681 INFO p2pd.swarm: chunk 2 of {digest}: 10.88.0.30:7080: relay of {digest} "
        "bytes 131072- cut short: timeout",
        f"2026-12-07 19:12:23,682 DEBUG p2pd.swarm: chunk 2 of {digest} from n20 (range holder): relay cut "
        "after 15.013 s",
        f"2026-12-07 19:12:24,396 INFO p2pd.swarm: chunk 0 of {digest}: 10.88.0.38:7080: relay of {digest} "
        "bytes 0- cut short: connection closed after 0 of 65536 bytes",
        f"2026-12-07 19:12:25,000 INFO p2pd.swarm: chunk 7 of {digest} from n4 failed: 10.88.0.14:7080: timeout",
        f"2026-12-07 19:12:40,000 WARNING p2pd.swarm: no chunks of {digest} from peers for 15s; fetching from "
        "the upstream",
    ]) + "\n")
    counts = log_events(log)
    assert counts["relay_cuts"] == 2 and counts["peer_request_errors"] == 1 and counts["stuck_fallbacks"] == 1
    assert counts["coordinator_unreachable"] == 0
    assert set(log_events(tmp_path / "missing.log").values()) == {0}


def test_the_matrix_says_how_busy_holders_uplinks_were_against_the_others_and_what_was_sent_in_vain() -> None:
    """Range holders' uplinks and the other nodes' are averaged apart (at equal links the holders'
    ran full while the others' idled: thirty-third session); bytes served that no node verified
    as a chunk (cut or cancelled answers) are a share of all bytes served."""
    mib = 1 << 20
    nodes = [{"node": "n1", "agent_upstream_bytes": 6 * mib, "agent_peer_served_bytes": 30 * mib,
              "agent_peer_bytes": 6 * mib},
             {"node": "n2", "agent_upstream_bytes": 0, "agent_peer_served_bytes": 10 * mib,
              "agent_peer_bytes": 18 * mib},
             {"node": "n3", "agent_upstream_bytes": 0, "agent_peer_served_bytes": 0,
              "agent_peer_bytes": 12 * mib}]
    use = {"down_mean": 0.8, "down_min": 0.7, "up_mean": 0.7, "longest_idle_uplink_s": 1.0,
           "up": {"n1": 0.96, "n2": 0.6, "n3": 0.4}}
    result = {"scenario": {"key": "matrix-1x-3", "nodes": 3}, "rates": {"node_up": 16, "seed_up": 16},
              "bound": {"seconds": 10.0}, "image": {"blobs": {"sha256:l": 12 * mib}, "layer_digest": "sha256:l"},
              "methods": {"p2pd": {"nodes": nodes, "p50_s": 12.0, "max_s": 13.0, "seed_egress_ratio": 1.0,
                                   "failures": 0, "fallbacks": 0, "agent_cpu_ms_per_mib": 30.0,
                                   "cpu": {"machine_share": 0.4}, "link_use": use}}}
    row = matrix_row(result)
    assert row["up_holders"] == pytest.approx(0.96) and row["up_others"] == pytest.approx(0.5)
    assert row["in_vain_share"] == pytest.approx(4 / 40)  # 40 MiB served, 36 MiB verified by the askers
    assert row["relay_cuts"] is None  # runs before the relay cuts were counted
    text = render_matrix([result], {})
    assert "uplinks of the range holders 96% and of the others 50%, sent in vain 10%. " in text
    for node, cuts in zip(nodes, (3, 0, 4), strict=True):
        node["relay_cuts"] = cuts
    assert matrix_row(result)["relay_cuts"] == 7
    assert "sent in vain 10% (7 relays cut short)" in render_matrix([result], {})
    for node, cuts in zip(nodes, (1, 0, 0), strict=True):
        node["relay_cuts"] = cuts
    assert "sent in vain 10% (1 relay cut short)" in render_matrix([result], {})


def test_the_seeds_pacing_is_a_share_of_all_its_links_and_each_section_says_it() -> None:
    """``--seed-share``: the seed's ``upload_rate`` is that share of its uplink (one link per site),
    and a section says how its results were run (results from before it recorded nothing: unpaced)."""
    assert seed_upload_rate(SCENARIOS["matrix-1x-8"], 0.97) == 970_000
    assert seed_upload_rate(SCENARIOS["two-sites"], 0.5) == 2_000_000  # 2 sites of 16 Mbit/s
    assert seed_upload_rate(SCENARIOS["matrix-1x-8"], 0.0) == 0
    assert "`[server] upload_rate` = 0.97" in seed_pacing_text([{"seed_share": 0.97}, {"seed_share": 0.97}])
    assert seed_pacing_text([{}, {"seed_share": None}]) == "The seed's downloads were not paced."
    assert "differs" in seed_pacing_text([{}, {"seed_share": 0.97}])


def test_each_section_says_which_congestion_control_the_seed_and_the_peers_used() -> None:
    """Results from before it was recorded ran both on the namespaces' default (BBR here)."""
    both_reno = {"congestion_control": {"seed": "reno", "peers": "reno"}}
    text = congestion_text([both_reno, both_reno])
    assert "the seed's connections reno" in text and "the agents' peer ports reno" in text
    assert "the seed's connections bbr" in congestion_text([{}])
    assert "differ" in congestion_text([{}, both_reno])


def test_a_matrix_cell_meets_the_goal_on_its_unrounded_ratio() -> None:
    """1.2516 shows as 1.25 in the table but is above the goal of 1.25; egress counts too."""
    assert matrix_cell_met(1.25, 1.05)
    assert not matrix_cell_met(1.2516, 1.0)
    assert not matrix_cell_met(1.1, 1.06)
    assert not matrix_cell_met(None, 1.0)


def test_link_use_counts_the_seeds_sending_window_and_idle_uplinks() -> None:
    """Node link use while the seed sends (wire bytes ÷ capacity), from switch-port counters
    sampled every 0.25 s: a node whose uplink carried nothing for 0.75 s shows it, and so does a
    downlink that started slowly (the first quarter of the seed's sending apart from the rest)."""
    rate = SCENARIOS["matrix-1x-8"].node_mbit * 1e6 / 8 * 0.25  # bytes a full link carries in a sample
    sampler = PortSampler.__new__(PortSampler)
    sampler.links = []
    seed = n1_up = n2_up = n1_down = n2_down = 0
    for step in range(10):
        sending = 1 <= step <= 8  # the seed sends in samples 1..8
        seed += int(rate) if sending else 0
        n1_down += (int(0.4 * rate) if step <= 2 else int(rate)) if sending else 0
        n2_down += int(0.6 * rate) if sending else 0
        n1_up += int(0.9 * rate) if sending else 0
        n2_up += 0 if 3 <= step <= 5 else int(0.5 * rate)  # idle for three samples
        sampler.links.append((step * 0.25, {"s0": (seed, 0), "n1": (n1_up, n1_down), "n2": (n2_up, n2_down)}))
    use = link_use(sampler, SCENARIOS["matrix-1x-8"])
    assert use is not None and use["seed_sending_s"] == 2.0
    assert use["down"] == {"n1": pytest.approx(0.85, abs=0.01), "n2": pytest.approx(0.6, abs=0.01)}
    assert use["down_mean"] == pytest.approx(0.725, abs=0.01) and use["down_min"] == pytest.approx(0.6, abs=0.01)
    assert use["down_first_quarter"] == pytest.approx(0.5, abs=0.01)
    assert use["down_rest"] == pytest.approx(0.8, abs=0.01)
    assert use["idle_uplink_s"] == {"n1": 0.0, "n2": 0.75} and use["longest_idle_uplink_s"] == 0.75
    # each second: the nodes' mean downlink share (n1 0.4 then 1.0; n2 0.6), the seed's link share
    seed_share = int(rate) / (SCENARIOS["matrix-1x-8"].seed_mbit * 1e6 / 8 * 0.25)
    assert use["by_second"] == [[1.0, pytest.approx(0.65, abs=0.01), pytest.approx(seed_share, abs=0.01)],
                                [2.0, pytest.approx(0.8, abs=0.01), pytest.approx(seed_share, abs=0.01)]]
    # ... and each node's own [down, up] shares on those seconds (n2's uplink idles in both).
    assert use["nodes_by_second"] == {"n1": [[0.7, 0.9], [1.0, 0.9]], "n2": [[0.6, 0.25], [0.6, 0.38]]}
    sampler.links = [(0.0, {"s0": (5, 0), "n1": (0, 0)}), (0.25, {"s0": (5, 0), "n1": (9, 9)})]
    assert link_use(sampler, SCENARIOS["matrix-1x-8"]) is None  # the seed sent nothing


def test_runs_with_changed_agents_or_rates_are_not_merged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    earlier = tmp_path / "swarm.json"
    earlier.write_text("{}")
    for extra in (["--upload-share", "0.9"], ["--rate-scale", "0.5"]):
        assert main(["--scenarios", "matrix-1x-8", "--merge-into", str(earlier), *extra]) == 2
        assert "not merged" in capsys.readouterr().err


def test_runs_with_other_congestion_controls_are_not_merged() -> None:
    def report(tcp: dict[str, object] | None, key: str) -> dict[str, object]:
        return {"tcp": tcp, "date": "d", "command": "c", "duration_s": 1.0, "results": [{"scenario": {"key": key}}]}

    bbr = {"congestion_control": "bbr", "host_default": True}
    cubic = {"congestion_control": "cubic", "host_default": False}
    assert merge_reports(report(None, "a"), report(bbr, "b"))["tcp"] == bbr  # an older report recorded none
    assert merge_reports(report(bbr, "a"), report(bbr, "b"))["tcp"] == bbr
    with pytest.raises(ValueError, match="congestion"):
        merge_reports(report(bbr, "a"), report(cubic, "b"))


@pytest.mark.root
def test_a_congestion_control_is_set_in_every_namespace(tmp_path: Path) -> None:
    _require_testbed()
    allowed = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
    before = allowed.read_text()
    assert "reno" in before.split()  # always built in and allowed: the host's list is not touched
    with Netbed(1, LinkRates(seed_up=10, node_up=50, node_down=50), workdir=tmp_path,
                congestion_control="reno") as bed:
        for ns in bed.namespaces:
            result = bed.run_in(ns, ["cat", "/proc/sys/net/ipv4/tcp_congestion_control"])
            assert result.stdout.strip() == "reno", ns
    assert allowed.read_text() == before


@pytest.mark.root
def test_teardown_on_exception_kills_processes_and_deletes_namespaces(tmp_path: Path) -> None:
    _require_testbed()
    bed = Netbed(2, LinkRates(seed_up=10, node_up=50, node_down=50), workdir=tmp_path)
    with pytest.raises(RuntimeError, match="boom"), bed:
        proc = bed.start_in(bed.nodes[0], ["sleep", "600"], log_path=tmp_path / "sleep.log")
        # A grandchild that escapes the process group is still found by namespace.
        bed.start_in(bed.nodes[1], ["sh", "-c", "setsid sleep 600 & wait"], log_path=tmp_path / "sh.log")
        assert set(_run_namespaces(bed.run_id)) == set(bed.namespaces)
        ping = bed.run_in(bed.nodes[0], ["busybox", "ping", "-c", "1", "-W", "2", bed.node_ips[1]], check=False)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        # The root namespace has no route into the testbed.
        assert "10.88.0." not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
        raise RuntimeError("boom")
    assert proc.poll() is not None
    assert _run_namespaces(bed.run_id) == []
    assert not bed.dir.exists()
    assert not (OWNER_DIR / f"{bed.run_id}.json").exists()


@pytest.mark.root
def test_two_sites_reach_the_seed_and_not_each_other(tmp_path: Path) -> None:
    _require_testbed()
    with Netbed(4, LinkRates(seed_up=10, node_up=50, node_down=50), workdir=tmp_path, sites=2) as bed:
        assert [bed.site_of(i) for i in range(1, 5)] == [0, 0, 1, 1]
        assert bed.node_ips == ["10.88.0.11", "10.88.0.12", "10.88.1.13", "10.88.1.14"]
        assert bed.seed_ips == ["10.88.0.2", "10.88.1.2"]

        def ping(ns: str, address: str) -> bool:
            return bed.run_in(ns, ["busybox", "ping", "-c", "1", "-W", "1", address], check=False).returncode == 0

        assert ping(bed.nodes[0], bed.node_ips[1]) and ping(bed.nodes[2], bed.node_ips[3])  # within a site
        assert ping(bed.nodes[0], bed.seed_ips[0]) and ping(bed.nodes[3], bed.seed_ips[1])  # each its uplink
        assert not ping(bed.nodes[0], bed.node_ips[2])  # no path between sites
        assert not ping(bed.nodes[0], bed.seed_ips[1])  # nor through the seed's other link
        # Neighbours are pinned within each site (the kernel's shared table would overflow at
        # N = 32 otherwise), and only there.
        pinned = bed.run_in(bed.nodes[0], ["ip", "neigh", "show", "nud", "permanent"]).stdout
        assert f"{bed.seed_ips[0]} dev eth0" in pinned and f"{bed.node_ips[1]} dev eth0" in pinned
        assert bed.node_ips[2] not in pinned and bed.seed_ips[1] not in pinned
        ports = bed.port_bytes()
        assert {"s0", "s1", "n1", "n4"} <= set(ports)
        # One reading: the hosts' own packets after link-up may pass between two (CI, 12-05: a
        # second reading counted one more 90-byte frame, the size of an IPv6 MLD report).
        assert bed.link_bytes(ports)[bed.seed]["up"] == ports["s0"]["up"] + ports["s1"]["up"]
    assert _run_namespaces(bed.run_id) == []


@pytest.mark.root
def test_cleanup_stale_removes_only_dead_runs(tmp_path: Path) -> None:
    _require_testbed()
    rates = LinkRates(seed_up=10, node_up=50, node_down=50)
    with Netbed(1, rates, workdir=tmp_path) as live, Netbed(1, rates, workdir=tmp_path) as dead:
        # Pretend ``dead``'s owner was killed with SIGKILL: its owner file names a process that is gone.
        (OWNER_DIR / f"{dead.run_id}.json").write_text(json.dumps(
            {"pid": 2**22 + 1, "start_time": "0", "workdir": str(dead.dir)}))
        removed = cleanup_stale()
        assert dead.run_id in removed and live.run_id not in removed
        assert _run_namespaces(dead.run_id) == []
        assert set(_run_namespaces(live.run_id)) == set(live.namespaces)
    assert _run_namespaces(live.run_id) == []


@pytest.mark.root
@pytest.mark.slow
def test_tiny_bench_swarm(tmp_path: Path) -> None:
    """``python -m tests.bench.swarm --quick``: N = 3, direct / site cache / p2pd, ctr in every node."""
    _require_testbed()
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    json_path = tmp_path / "bench" / "swarm.json"
    plots = importlib.util.find_spec("matplotlib") is not None  # the ``bench`` extra; optional here
    argv = [sys.executable, "-m", "tests.bench.swarm", "--quick", "--out", str(out), "--json", str(json_path),
            "--workdir", str(tmp_path / "work"), "--deadline-s", "75", *([] if plots else ["--no-plots"]),
            "--agent-log-level", "DEBUG", "--keep"]  # the logs swarm_trace reads (below)
    before = set(list_namespaces())
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=85)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the benchmark tears its testbed down on SIGTERM
        output, _ = proc.communicate(timeout=30)
        pytest.fail(f"the tiny benchmark took more than 85 s:\n{output.decode(errors='replace')[-4000:]}")
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert time.monotonic() - started < 90

    report = json.loads(json_path.read_text())
    (result,) = report["results"]
    assert result["scenario"]["nodes"] == 3
    assert result["seed_share"] == SEED_SHARE  # the seed's downloads shared its uplink, paced
    assert result["congestion_control"] == {"seed": SEED_CONGESTION_CONTROL, "peers": "reno"}
    methods = result["methods"]
    assert set(methods) == {"direct", "cache", "p2pd"}
    image = result["image"]["total_bytes"]
    for method, m in methods.items():
        assert m["failures"] == 0, (method, [n["errors"] for n in m["nodes"]])
        assert len(m["times_s"]) == 3 and all(t > 0 for t in m["times_s"]), (method, m["times_s"])
        # The shaped seed link is respected: nobody finishes faster than the bound.
        assert m["max_s"] >= 0.9 * result["bound"]["seconds"], (method, m["max_s"], result["bound"])
    assert methods["direct"]["seed_egress_bytes"] >= 3 * image * 0.99  # every node from the seed
    p2pd = methods["p2pd"]
    assert p2pd["fallbacks"] == 0 and all(n["via_agent"] for n in p2pd["nodes"])
    assert p2pd["seed_egress_bytes"] < 2 * image  # the swarm shared the image
    assert p2pd["bytes_by_source"]["peers"] > 0
    assert p2pd["agent_peak_rss_mib_max"] and p2pd["agents_cpu_s"] is not None
    assert 0.0 <= p2pd["agent_kernel_share"] <= 1.0
    use = p2pd["link_use"]
    assert use is not None and use["seed_sending_s"] > 0 and set(use["down"]) == {"n1", "n2", "n3"}
    assert 0 < use["down_mean"] < 1.5 and use["longest_idle_uplink_s"] >= 0
    assert use["by_second"] and all(len(row) == 3 and row[0] > 0 for row in use["by_second"])
    assert {node: len(rows) for node, rows in use["nodes_by_second"].items()} == dict.fromkeys(
        ("n1", "n2", "n3"), len(use["by_second"]))

    # The agents logged every chunk request at DEBUG (--agent-log-level), and the kept run's
    # logs are what ``python -m tests.bench.swarm_trace`` reads.
    trace = subprocess.run([sys.executable, "-m", "tests.bench.swarm_trace", str(tmp_path / "work"), "--json",
                            str(json_path)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert trace.returncode == 0, trace.stdout + trace.stderr
    assert " chunk requests by 3 nodes" in trace.stdout and "link use, " in trace.stdout, trace.stdout

    doc = out.read_text()
    assert "<!-- other:start -->\nkept\n<!-- other:end -->" in doc
    section = doc[doc.index(MARK_START):doc.index(MARK_END)]
    assert "| p2pd |" in section and "bound (Kumar" in section and "CPU check" in section
    assert f"`[server] upload_rate` = {SEED_SHARE:g}" in section
    assert f"the seed's connections {SEED_CONGESTION_CONTROL}" in section
    if plots:
        for name in ("swarm-tiny-cdf.png", "swarm-tiny-bytes.png"):
            assert (json_path.parent / name).read_bytes()[:4] == b"\x89PNG"
            assert f"bench/{name}" in section
    # The weak-regime matrix table (make bench-swarm runs nine p2pd-only cells): the tiny p2pd
    # run rendered as a cell, from the raw results.
    cell = json.loads(json.dumps(result))
    cell["scenario"].update(key="matrix-tiny", matrix=True)
    cell["methods"] = {"p2pd": cell["methods"]["p2pd"]}
    report["results"].append(cell)
    json_path.write_text(json.dumps(report))
    rerun = subprocess.run([sys.executable, "-m", "tests.bench.swarm", "--from-json", str(json_path), "--out", str(out),
                            *([] if plots else ["--no-plots"])], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    doc = out.read_text()
    section = doc[doc.index(MARK_START):doc.index(MARK_END)]
    assert "The weak-regime matrix" in section and "| 3 | 5 | 20 / 100 |" in section, section[-3000:]
    assert "Link use while the seed was sending" in section and f"N = 3 at 5{X}: down " in section
    if plots:
        assert "bench/swarm-matrix.png" in section
    # Nothing left behind but what --keep keeps (the testbed's files, logs included): no
    # namespaces, owner files or other work files.
    assert set(list_namespaces()) - before == set()
    assert len(list((tmp_path / "work").glob("p2pbed-*"))) == 1 and not list((tmp_path / "work").glob("bench-swarm-*"))


@pytest.mark.root
@pytest.mark.slow
def test_tiny_bench_swarm_sites_and_churn(tmp_path: Path) -> None:
    """The smallest two-site and churn scenarios of ``make bench-swarm`` (p2pd only)."""
    _require_testbed()
    out = tmp_path / "benchmarks.md"
    json_path = tmp_path / "bench" / "swarm.json"
    argv = [sys.executable, "-m", "tests.bench.swarm", "--scenarios", "tiny-sites,tiny-churn", "--methods", "p2pd",
            "--out", str(out), "--json", str(json_path), "--workdir", str(tmp_path / "work"), "--deadline-s", "150",
            "--no-plots"]
    before = set(list_namespaces())
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          timeout=200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    sites, churn = json.loads(json_path.read_text())["results"]
    p2pd = sites["methods"]["p2pd"]
    assert p2pd["failures"] == 0
    assert [s["nodes"] for s in p2pd["sites"]] == [2, 2]
    for site in p2pd["sites"]:  # each site took the image from the seed once, over its own link
        assert 0.9 <= site["egress_ratio"] <= 1.05 and site["link_ratio"] >= 0.9, site
    assert p2pd["sites"][1]["cap_mbit"] == 10.0 and p2pd["sites"][1]["mean_mbit"] is not None
    assert p2pd["sites"][1]["by_half_second"], p2pd["sites"][1]  # the rate on the site's link over time
    # The httpx client times its longest stretch without a body byte (a fallback's cause).
    waits = [n["client_longest_wait_s"] for n in p2pd["nodes"]]
    assert all(0 < w < 30 for w in waits), waits
    c = churn["methods"]["p2pd"]["churn"]
    assert c["killed"] and c["late"] == [4] and c["lost_pulls"] == [], c
    assert c["roles"]["joined"]["ok"] == 1 and c["roles"]["stayed"]["ok"] == 2
    section = out.read_text()
    assert "Pulls lost to churn: **0**" in section and "Each site pulls once" in section
    assert set(list_namespaces()) - before == set()
