"""The seed and five p2pd agents that find each other by mDNS alone, in a private network namespace.

Run by tests/test_swarm_mdns.py as ``unshare -n <python> -m tests.swarm_mdns_driver --workdir DIR``.
It refuses to run unless it is in a network namespace of its own that holds nothing but ``lo``,
so no mDNS packet can reach a real network. Then it:

1. brings ``lo`` up with multicast and a 224.0.0.0/4 route (zeroconf needs both);
2. starts the seed on 127.0.0.1 and agents ``m0``..``m4`` on 127.0.0.50-54, each with the cluster
   key and mDNS on (``--mdns-interface`` left at its default, the advertised host), and no
   ``--peer``: the only way they learn of each other is mDNS;
3. waits until every agent lists the four others as live members found via mDNS, and checks
   that every mDNS socket is an agent's UDP socket on port 5353 bound to loopback or the
   wildcard (which here means loopback: there is no other interface), with 224.0.0.251
   joined on ``lo`` only;
4. pushes an image (a config and a 64 MiB random layer) straight to the seed, then all five
   agents pull it at the same moment through their containerd-facing endpoints;
5. stops everything and prints one JSON line: digests, where every node's bytes came from,
   the seed's egress, the mDNS sockets and the phase timings.

Any failure before the JSON line exits non-zero with the agents' log tails on stderr.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import trio

from p2pd.swarm.auth import generate_key
from tests.harness.images import MT_OCI_CONFIG, MT_OCI_LAYER_TAR, MT_OCI_MANIFEST
from tests.harness.seed_process import SeedProcess
from tests.harness.tools import tail
from tests.swarm_cluster import Agent, MiB, push_blob, sha256
from tests.test_swarm_loopback import pull_like_containerd

AGENTS = 5
BASE = 50  # agents on 127.0.0.50..54
LAYER_MIB = 64
REPOSITORY = "lab/mdns"
TAG = "latest"
MDNS_PORT = 5353
MDNS_GROUP = "224.0.0.251"
DEADLINE = 100  # s for the whole run (the test kills the driver after 120 s)
DISCOVERY_LIMIT = 30.0  # s until every agent sees every other one via mDNS
PULL_LIMIT = 60.0  # s for the five concurrent pulls


class MdnsAgent(Agent):
    """An Agent (tests/swarm_cluster.py) with mDNS on: the same command line without ``--no-mdns``."""

    def argv(self, seed_url: str) -> list[str]:
        return [arg for arg in super().argv(seed_url) if arg != "--no-mdns"]


class Deadline(Exception):
    pass


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise Deadline(f"driver deadline of {DEADLINE}s passed")


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"driver got signal {signum}")


def require_private_namespace() -> None:
    """Exit unless this network namespace is not PID 1's and holds only ``lo``; then set lo up for mDNS."""
    names = {name for _, name in socket.if_nameindex()}
    if names != {"lo"}:
        sys.exit(f"refusing to run mDNS: this network namespace has interfaces {sorted(names)} (run under unshare -n)")
    try:
        shared = os.readlink("/proc/self/ns/net") == os.readlink("/proc/1/ns/net")
    except OSError:
        shared = False  # cannot see PID 1's namespace: the interface check above must do
    if shared:
        sys.exit("refusing to run mDNS in PID 1's network namespace (run under unshare -n)")
    for args in (
        ["link", "set", "lo", "up"],
        ["link", "set", "lo", "multicast", "on"],
        ["route", "add", "224.0.0.0/4", "dev", "lo"],
    ):
        subprocess.run(["ip", *args], check=True, timeout=5)


def _udp_sockets() -> dict[int, tuple[str, int]]:
    """socket inode -> (local IPv4, port) for every UDP/IPv4 socket in this namespace."""
    sockets = {}
    with open("/proc/net/udp") as handle:
        next(handle)
        for line in handle:
            fields = line.split()
            address, port = fields[1].split(":")
            ip = str(ipaddress.IPv4Address(int(address, 16).to_bytes(4, "little")))
            sockets[int(fields[9])] = (ip, int(port, 16))
    return sockets


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _has_udp6_on_mdns_port() -> bool:
    with open("/proc/net/udp6") as handle:
        next(handle)
        return any(int(line.split()[1].rsplit(":", 1)[1], 16) == MDNS_PORT for line in handle)


def _igmp_devices(group: str) -> list[str]:
    """The interfaces that joined an IPv4 multicast group (from /proc/net/igmp)."""
    wanted = ipaddress.IPv4Address(group).packed[::-1].hex().upper()
    devices, device = [], ""
    with open("/proc/net/igmp") as handle:
        next(handle)
        for line in handle:
            if not line[0].isspace():
                device = line.split()[1]
            elif line.split()[0] == wanted:
                devices.append(device)
    return devices


def mdns_sockets(agents: list[MdnsAgent]) -> dict[str, Any]:
    """Where the agents' mDNS sockets are bound, and checks that nothing is outside loopback."""
    udp = _udp_sockets()
    by_agent: dict[str, list[str]] = {}
    for agent in agents:
        assert agent.proc is not None
        bound = [udp[inode] for inode in _socket_inodes(agent.proc.pid) if inode in udp]
        by_agent[agent.node_id] = sorted(f"{ip}:{port}" for ip, port in bound if port == MDNS_PORT)
    all_mdns = sorted(f"{ip}:{port}" for ip, port in udp.values() if port == MDNS_PORT)
    interfaces = sorted(name for _, name in socket.if_nameindex())
    igmp = _igmp_devices(MDNS_GROUP)
    outside = [
        s for s in all_mdns if not (s.startswith("0.0.0.0:") or ipaddress.IPv4Address(s.split(":")[0]).is_loopback)
    ]
    problems = []
    if interfaces != ["lo"]:
        problems.append(f"interfaces {interfaces}")
    if outside:
        problems.append(f"mDNS sockets bound outside loopback: {outside}")
    if set(igmp) != {"lo"}:
        problems.append(f"{MDNS_GROUP} joined on {igmp}")
    if _has_udp6_on_mdns_port():
        problems.append("an IPv6 socket on port 5353")
    if any(not sockets for sockets in by_agent.values()):
        problems.append(f"an agent has no mDNS socket: {by_agent}")
    if sum(len(s) for s in by_agent.values()) != len(all_mdns):
        problems.append(f"port 5353 sockets that belong to no agent: {all_mdns} vs {by_agent}")
    if problems:
        raise AssertionError("; ".join(problems))
    return {"interfaces": interfaces, "igmp_devices": sorted(set(igmp)), "by_agent": by_agent}


def wait_mdns_members(agents: list[MdnsAgent], timeout: float) -> dict[str, dict[str, dict[str, str]]]:
    """Until every agent lists every other as a live member known only from mDNS.

    Returns id -> {peer id: {"address": ..., "sources": ...}} as each agent's /debug/status has it.
    """
    ids = {agent.node_id for agent in agents}
    deadline = time.monotonic() + timeout
    while True:
        seen: dict[str, dict[str, dict[str, str]]] = {}
        for agent in agents:
            peers = agent.status().get("peers", [])
            seen[agent.node_id] = {
                p["id"]: {"address": p["address"], "sources": p["sources"]}
                for p in peers
                if not p["suspended"] and not p["banned"]
            }
        if all(
            set(seen[node]) == ids - {node} and all(p["sources"] == "mdns" for p in seen[node].values())
            for node in seen
        ):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"mDNS membership incomplete after {timeout}s: {seen}")
        time.sleep(0.2)


def push_image(registry_url: str) -> tuple[str, dict[str, int]]:
    """Pushes a config and one 64 MiB random layer plus their manifest; returns (manifest digest, blob sizes)."""
    layer = os.urandom(LAYER_MIB * MiB)
    layer_digest = push_blob(registry_url, REPOSITORY, layer)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}
    ).encode()
    config_digest = push_blob(registry_url, REPOSITORY, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": MT_OCI_LAYER_TAR, "digest": layer_digest, "size": len(layer)}],
        }
    ).encode()
    response = httpx.put(
        f"{registry_url}/v2/{REPOSITORY}/manifests/{TAG}",
        content=manifest,
        headers={"Content-Type": MT_OCI_MANIFEST},
        trust_env=False,
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return sha256(manifest), {layer_digest: len(layer), config_digest: len(config)}


async def pull_all(agents: list[MdnsAgent]) -> dict[str, dict[str, Any]]:
    """All agents pull the image at once, as containerd would; returns id -> manifest digest, blob hashes, time."""
    results: dict[str, dict[str, Any]] = {}
    start = trio.current_time()

    async def pull(agent: MdnsAgent) -> None:
        digest, received = await pull_like_containerd(agent, REPOSITORY, TAG)
        results[agent.node_id] = {
            "manifest": digest,
            "blobs": received,
            "seconds": round(trio.current_time() - start, 2),
        }

    with trio.fail_after(PULL_LIMIT):
        async with trio.open_nursery() as nursery:
            for agent in agents:
                nursery.start_soon(pull, agent)
    return results


def node_report(agent: MdnsAgent) -> dict[str, Any]:
    metrics = agent.metrics()

    def value(name: str, **labels: str) -> float:
        return metrics.get((name, frozenset(labels.items())), 0.0)

    return {
        "upstream_bytes": value("p2pd_fetched_bytes_total", source="upstream"),
        "peer_bytes": value("p2pd_fetched_bytes_total", source="peer"),
        "from_peers": {
            dict(labels)["peer"]: v for (name, labels), v in metrics.items() if name == "p2pd_peer_fetched_bytes_total"
        },
        "served_to_peers": value("p2pd_peer_served_bytes_total"),
        "chunks_failed": value("p2pd_chunks_failed_total"),
    }


def run(workdir: Path) -> dict[str, Any]:
    started = time.monotonic()
    timings: dict[str, float] = {}

    def mark(phase: str) -> None:
        timings[phase] = round(time.monotonic() - started, 2)

    workdir.mkdir(parents=True, exist_ok=True)
    key_file = workdir / "cluster.key"
    key_file.write_text(generate_key() + "\n")
    key_file.chmod(0o600)
    seed = SeedProcess(workdir / "seed", log_level="INFO")
    agents = [
        MdnsAgent(f"m{i}", f"127.0.0.{BASE + i}", workdir / f"m{i}", ["--cluster-key-file", str(key_file)])
        for i in range(AGENTS)
    ]
    try:
        seed.start()
        for agent in agents:
            agent.start(seed.url)
        for agent in agents:
            agent.wait_ready()
        mark("started")
        members = wait_mdns_members(agents, DISCOVERY_LIMIT)
        mark("discovered")
        sockets = mdns_sockets(agents)
        manifest_digest, sizes = push_image(seed.url)
        mark("pushed")
        seed_before = seed.metric("seed_blob_bytes_sent_total")
        pulls = trio.run(pull_all, agents)
        mark("pulled")
        seed_sent = seed.metric("seed_blob_bytes_sent_total") - seed_before
        nodes = {
            agent.node_id: {**node_report(agent), **pulls[agent.node_id], "members": members[agent.node_id]}
            for agent in agents
        }
    except BaseException:
        for agent in agents:
            print(f"--- {agent.node_id} log\n{tail(agent.log_path, 3000)}", file=sys.stderr)
        print(f"--- seed log\n{tail(seed.log_path, 2000)}", file=sys.stderr)
        raise
    finally:
        for agent in agents:  # all at once: graceful shutdowns (mDNS goodbyes) overlap
            if agent.is_running():
                assert agent.proc is not None
                agent.proc.terminate()
        for agent in agents:
            agent.stop()
        seed.stop()
        mark("stopped")
    return {
        "agents": {agent.node_id: agent.peer_address for agent in agents},
        "manifest": manifest_digest,
        "blobs": sizes,
        "image_bytes": sum(sizes.values()),
        "seed_sent": seed_sent,
        "nodes": nodes,
        "mdns": sockets,
        "timings": timings,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="data directories and logs")
    args = parser.parse_args()
    require_private_namespace()
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(DEADLINE)
    result = run(args.workdir)
    signal.alarm(0)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
