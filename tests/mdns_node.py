"""Two ``run_mdns`` nodes and a spoofer on loopback, inside a private network namespace.

Run by tests/test_discovery.py as ``unshare -n <python> tests/mdns_node.py``. It refuses to run
unless the network namespace holds nothing but ``lo``, so no mDNS packet can reach a real network.
Prints one JSON line: every sighting each node received (with its time) and the phase timings.

Scenario:
1. A raw Zeroconf (the spoofer) registers services with malformed or incompatible TXT records,
   plus one valid "canary" so we know its announcements were seen and resolved.
2. node-a and node-b start; we wait until each sees the other and the canary, then listen a
   little longer so late (spoofed) sightings would show up.
3. node-b is cancelled (it sends goodbyes); we wait for node-a's ``gone=True`` sighting.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from functools import partial
from typing import Any

import trio
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from p2pd.swarm.discovery import SERVICE_TYPE, Sighting, run_mdns

LOOPBACK = "127.0.0.1"
NODES = {"node-a": ("site-1", f"{LOOPBACK}:7001"), "node-b": ("site-2", f"{LOOPBACK}:7002")}
CANARY = ("canary", "site-3", 7003)
SETTLE = 1.0  # s to keep listening after discovery, for late spoofed sightings
PHASE_LIMIT = 10.0  # s per phase

# instance name -> TXT properties; none of these may ever be sighted.
SPOOFS: dict[str, dict[str, str | bytes | None]] = {
    "spoof-version": {"node": "spoof-version", "port": "7100", "v": "2", "site": "s"},
    "spoof-dots": {"node": "evil.node", "port": "7101", "v": "1", "site": "s"},
    "spoof-noport": {"node": "spoof-noport", "v": "1", "site": "s"},
    "spoof-bigport": {"node": "spoof-bigport", "port": "70000", "v": "1", "site": "s"},
    "spoof-binary": {"node": b"\xff\xfe", "port": "7104", "v": "1", "site": "s"},
    "spoof-site": {"node": "spoof-site", "port": "7105", "v": "1", "site": "a b"},
    "spoof-novalue": {"node": None, "port": "7106", "v": "1", "site": "s"},
    # A well-formed record claiming node-b's id under another instance name.
    "spoof-impostor": {"node": "node-b", "port": "7107", "v": "1", "site": "site-2"},
}


def _require_private_namespace() -> None:
    names = {name for _, name in socket.if_nameindex()}
    if names != {"lo"}:
        sys.exit(f"refusing to run mDNS: this network namespace has interfaces {sorted(names)} (run under unshare -n)")
    for args in (
        ["link", "set", "lo", "up"],
        ["link", "set", "lo", "multicast", "on"],
        ["route", "add", "224.0.0.0/4", "dev", "lo"],
    ):
        subprocess.run(["ip", *args], check=True, timeout=5)


def _info(instance: str, properties: dict[str, Any], port: int) -> ServiceInfo:
    return ServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        port=port,
        properties=properties,
        server=f"{instance}.local.",
        parsed_addresses=[LOOPBACK],
    )


def _record(sighting: Sighting, start: float) -> dict[str, Any]:
    return {
        "t": round(time.monotonic() - start, 3),
        "address": sighting.address,
        "node_id": sighting.node_id,
        "site": sighting.site,
        "gone": sighting.gone,
        "source": sighting.source,
    }


async def main() -> dict[str, Any]:
    start = time.monotonic()
    timings: dict[str, float] = {}
    seen: dict[str, list[dict[str, Any]]] = {name: [] for name in NODES}
    changed = trio.Event()

    def wake() -> None:
        nonlocal changed
        changed.set()
        changed = trio.Event()

    async def collect(name: str, recv: trio.MemoryReceiveChannel[Sighting]) -> None:
        async for sighting in recv:
            seen[name].append(_record(sighting, start))
            wake()

    async def wait_for(predicate: Any) -> None:
        with trio.fail_after(PHASE_LIMIT):
            while not predicate():
                await changed.wait()

    def sees(name: str, node: str) -> bool:
        return any(s["node_id"] == node and not s["gone"] for s in seen[name])

    spoofer = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only))
    try:
        infos = [_info(instance, txt, 7100 + i) for i, (instance, txt) in enumerate(SPOOFS.items())]
        node, site, port = CANARY
        infos.append(_info(node, {"node": node, "port": str(port), "v": "1", "site": site}, port))
        async with trio.open_nursery() as nursery:
            for info in infos:
                nursery.start_soon(partial(trio.to_thread.run_sync, spoofer.register_service, info))
        timings["spoofs_registered"] = time.monotonic() - start

        async with trio.open_nursery() as nursery:
            scopes = {}
            for name, (site, address) in NODES.items():
                send, recv = trio.open_memory_channel[Sighting](100)
                nursery.start_soon(collect, name, recv)
                scopes[name] = trio.CancelScope()

                async def node_task(
                    name: str = name,
                    site: str = site,
                    address: str = address,
                    send: trio.MemorySendChannel[Sighting] = send,
                ) -> None:
                    with scopes[name]:
                        await run_mdns(node_id=name, site=site, address=address, interface=LOOPBACK, send=send)

                nursery.start_soon(node_task)
            await wait_for(
                lambda: (
                    all(sees("node-a", n) for n in ("node-b", "canary"))
                    and all(sees("node-b", n) for n in ("node-a", "canary"))
                )
            )
            timings["mutual"] = time.monotonic() - start
            await trio.sleep(SETTLE)

            scopes["node-b"].cancel()
            cancelled = time.monotonic()
            await wait_for(lambda: any(s["node_id"] == "node-b" and s["gone"] for s in seen["node-a"]))
            timings["goodbye_after_cancel"] = time.monotonic() - cancelled
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(spoofer.close)
    return {"sightings": seen, "timings": {k: round(v, 3) for k, v in timings.items()}, "spoofs": sorted(SPOOFS)}


if __name__ == "__main__":
    _require_private_namespace()
    print(json.dumps(trio.run(main)), flush=True)
