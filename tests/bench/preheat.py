"""Preheat benchmark: ``p2pd preheat`` of one image to N nodes on the namespace testbed, then a
rollout pull on every node that must send nothing upstream.

Reuses the swarm benchmark's testbed (tests/bench/swarm.py: seed + N agents in network
namespaces with shaped links, mDNS membership, a cluster key). Reported: the preheat's time
against the Kumar-Ross bound, the seed's egress per image during the preheat, and the seed's
egress during the rollout (must be 0).

    python -m tests.bench.preheat [--nodes 8] [--layer-mib 200] [--json docs/bench/preheat.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.bench.netbed import LinkRates, Netbed
from tests.bench.swarm import (
    AGENT_PORT,
    Scenario,
    bound,
    pull_all,
    push_image,
    setup_method,
    start_bed,
    teardown_method,
)
from tests.harness import images
from tests.harness.p2pd_process import Samples

MIB = 1024 * 1024


def _seed_egress(bed: Any) -> float:
    samples: Samples = bed.seed_metrics()
    return sum(value for (name, _), value in samples.items() if name == "seed_blob_bytes_sent_total")


def run(nodes: int, layer_mib: int, seed_mbit: float, node_mbit: float, workdir: Path | None) -> dict[str, Any]:
    scenario = Scenario("preheat", "Preheat then rollout", nodes=nodes, seed_mbit=seed_mbit, node_mbit=node_mbit,
                        layer_mib=layer_mib, client="httpx", methods=("p2pd",), p2pd_runs=1)
    # The image's layout is built beside the testbed's files and removed with the run: a
    # temporary directory of its own was left behind in /tmp by every run (a test's too).
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="preheat-layout-", dir=workdir) as build:
        return _run_in(Path(build), scenario, nodes, layer_mib, seed_mbit, node_mbit, workdir)


def _run_in(build: Path, scenario: Scenario, nodes: int, layer_mib: int, seed_mbit: float, node_mbit: float,
            workdir: Path | None) -> dict[str, Any]:
    layout = images.build_busybox_layout(build)
    tag = f"preheat-{os.getpid()}"
    images.add_random_layer(layout, "busybox", tag, layer_mib)
    rates = LinkRates(seed_up=seed_mbit, node_up=node_mbit, node_down=node_mbit)
    with Netbed(nodes, rates, workdir=workdir) as net:
        bed = start_bed(net)
        image = push_image(bed, layout, tag)
        limit = bound(image.total_bytes, nodes, rates)
        setup = setup_method(bed, scenario, "p2pd")
        try:
            egress0 = _seed_egress(bed)
            started = time.monotonic()
            preheat = net.run_in(net.nodes[0], [sys.executable, "-m", "p2pd", "preheat", image.ref, "--endpoint",
                                                f"http://127.0.0.1:{AGENT_PORT}"],
                                 timeout=max(600.0, 20 * limit["client_server_s"]), check=False)
            preheat_s = time.monotonic() - started
            egress1 = _seed_egress(bed)
            max_time = max(60.0, 4 * limit["client_server_s"])
            _, results = pull_all(bed, scenario, setup, "p2pd", image, max_time)
            egress2 = _seed_egress(bed)
        finally:
            teardown_method(bed, setup)
    return {"nodes": nodes, "image_bytes": image.total_bytes, "rates": asdict(rates), "bound_s": limit["seconds"],
            "preheat_rc": preheat.returncode, "preheat_output": preheat.stdout[-3000:],
            "preheat_s": round(preheat_s, 2), "preheat_over_bound": round(preheat_s / limit["seconds"], 2),
            "seed_egress_preheat_over_image": round((egress1 - egress0) / image.total_bytes, 3),
            "seed_egress_rollout_bytes": egress2 - egress1,
            "rollout_ok": all(bool(r.get("ok")) for r in results),
            "rollout_max_s": round(max(r["end"] - r["start"] for r in results), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--layer-mib", type=int, default=200)
    parser.add_argument("--seed-mbit", type=float, default=200)
    parser.add_argument("--node-mbit", type=float, default=1000)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    result = run(args.nodes, args.layer_mib, args.seed_mbit, args.node_mbit, args.workdir)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    ok = result["preheat_rc"] == 0 and result["rollout_ok"] and result["seed_egress_rollout_bytes"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
