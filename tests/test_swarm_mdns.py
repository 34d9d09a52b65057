"""Five agents that find each other by mDNS alone pull one image at the same moment.

Like tests/test_swarm_loopback.py, but with no ``--peer``: the agents run mDNS (zeroconf) and
that is the only way they learn of each other. Zeroconf never runs in this process (the root
network namespace) and never on the host's interfaces: tests/swarm_mdns_driver.py runs under
``unshare -n``, in a network namespace holding only ``lo``, and starts the seed and the agents
there. It prints one JSON line; the assertions are here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import p2pd
from tests.harness import tools
from tests.swarm_cluster import MiB

pytestmark = [pytest.mark.slow, pytest.mark.root]

ROOT = Path(p2pd.__file__).parent.parent
DRIVER_TIMEOUT = 120.0  # s; the driver gives up by itself after 100 s
LAYER_MIB = 64


def _processes_in(netns: str) -> list[int]:
    """PIDs of the processes in the network namespace ``netns`` (a /proc/PID/ns/net link)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") == netns:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def run_driver(unshare: str, workdir: Path) -> dict[str, Any]:
    """Runs the driver in a new network namespace and returns its JSON result.

    On timeout the driver gets SIGTERM (it stops its agents and the seed); whatever is still
    alive in its namespace after that is killed, so the namespace goes away with it.
    """
    argv = [unshare, "--net", sys.executable, "-m", "tests.swarm_mdns_driver", "--workdir", str(workdir)]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=tools.clean_env()
    )
    try:
        stdout, stderr = proc.communicate(timeout=DRIVER_TIMEOUT)
    except subprocess.TimeoutExpired:
        try:
            netns = os.readlink(f"/proc/{proc.pid}/ns/net")
        except OSError:  # it exited just now
            netns = os.readlink("/proc/self/ns/net")
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate(timeout=10)
        if netns != os.readlink("/proc/self/ns/net"):  # never anything in the test's own namespace
            for pid in _processes_in(netns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        pytest.fail(
            f"mDNS swarm driver timed out after {DRIVER_TIMEOUT}s\n--- stderr:\n"
            f"{stderr.decode(errors='replace')[-8000:]}"
        )
    if proc.returncode != 0:
        pytest.fail(
            f"mDNS swarm driver failed (exit {proc.returncode})\n--- stdout:\n"
            f"{stdout.decode(errors='replace')[-2000:]}\n--- stderr:\n{stderr.decode(errors='replace')[-8000:]}"
        )
    return json.loads(stdout.decode().strip().splitlines()[-1])


def test_five_agents_found_by_mdns_pull_an_image_at_once(tmp_path: Path) -> None:
    unshare = tools.require_tool("unshare")
    tools.require_tool("ip")
    tools.require_root()
    started = time.monotonic()
    result = run_driver(unshare, tmp_path / "swarm")
    elapsed = time.monotonic() - started

    agents: dict[str, str] = result["agents"]  # node id -> advertised peer address
    sizes: dict[str, int] = result["blobs"]
    nodes: dict[str, dict[str, Any]] = result["nodes"]
    image_bytes = result["image_bytes"]
    big_digest = max(sizes, key=lambda d: sizes[d])
    assert sizes[big_digest] >= LAYER_MIB * MiB and image_bytes == sum(sizes.values())
    assert set(nodes) == set(agents) and len(agents) == 5

    # Discovery: each agent knows the four others, at the addresses they advertise, from mDNS only.
    for node_id, node in nodes.items():
        expected = {
            peer: {"address": address, "sources": "mdns"} for peer, address in agents.items() if peer != node_id
        }
        assert node["members"] == expected, node_id
    # mDNS ran in every agent, on loopback only (the namespace has no other interface).
    mdns = result["mdns"]
    assert mdns["interfaces"] == ["lo"] and mdns["igmp_devices"] == ["lo"]
    for node_id, address in agents.items():
        own = address.rsplit(":", 1)[0]
        assert mdns["by_agent"][node_id] and set(mdns["by_agent"][node_id]) <= {"0.0.0.0:5353", f"{own}:5353"}

    # Every digest is right, wherever the bytes came from.
    for node_id, node in nodes.items():
        assert node["manifest"] == result["manifest"], node_id
        assert node["blobs"] == {digest: digest for digest in sizes}, node_id

    # The seed sent the image about once, for five nodes.
    ratio = result["seed_sent"] / image_bytes
    lines = [
        f"{node_id}: upstream {n['upstream_bytes'] / MiB:.1f} MiB, peers {n['peer_bytes'] / MiB:.1f} MiB from "
        + ", ".join(f"{peer} {value / MiB:.1f}" for peer, value in sorted(n["from_peers"].items()))
        + f"; pull {n['seconds']:.1f} s"
        for node_id, n in sorted(nodes.items())
    ]
    print(
        f"\nimage {image_bytes / MiB:.1f} MiB; seed sent {result['seed_sent'] / MiB:.1f} MiB = {ratio:.3f} x "
        f"the image for 5 nodes; driver {elapsed:.1f} s, phases {result['timings']}\n" + "\n".join(lines)
    )
    assert 1.0 <= ratio <= 1.05

    for node_id, node in nodes.items():
        assert node["upstream_bytes"] + node["peer_bytes"] == image_bytes, (
            f"{node_id} fetched chunks twice or missed some"
        )
    # The site's upstream fetch was split into range leases among several nodes (none fetched
    # the whole big layer), and every node assembled the rest from at least two peers.
    fetchers = [node_id for node_id, node in nodes.items() if node["upstream_bytes"] >= MiB]
    assert len(fetchers) >= 2 and all(node["upstream_bytes"] < sizes[big_digest] for node in nodes.values()), nodes
    for node_id, node in nodes.items():
        sources = [peer for peer, value in node["from_peers"].items() if value >= MiB]
        assert len(sources) >= 2, f"{node_id} got chunks from {node['from_peers']}"
        assert set(node["from_peers"]) <= set(agents) - {node_id}
        assert node["served_to_peers"] > 0, node_id
        assert node["chunks_failed"] == 0, node_id
