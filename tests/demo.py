"""``make demo``: a seed and three p2pd agents on loopback, an image built offline and
pushed with skopeo, three concurrent pulls through the agents with live progress, then
where every byte came from.

Run: ``.venv/bin/python -m tests.demo``. Needs skopeo, umoci and busybox-static (``make
demo`` installs them when run as root). No root needed otherwise: the agents find each
other as static peers on 127.0.0.x. Everything lives in a temp dir and every process is
stopped on exit.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
from rich.table import Table

from tests.harness import images, skopeo
from tests.harness.net import free_port, wait_http_ok
from tests.harness.tools import start_process, stop_process

AGENTS = 3
LAYER_MIB = 64
REPOSITORY = "demo/app"
MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"

console = Console()


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _peer_sources(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^p2pd_peer_fetched_bytes_total\{peer="([^"]+)"\} ([0-9.e+]+)$', text, re.M)}


async def _pull(name: str, agent: str, ns: str, progress: Progress) -> tuple[float, bool]:
    """Pulls the image like containerd: resolve the tag, fetch the manifest, then the blobs."""
    started = time.monotonic()
    ok = True
    async with httpx.AsyncClient(base_url=agent, timeout=120, trust_env=False) as client:
        head = await client.head(f"/v2/{REPOSITORY}/manifests/v1", params={"ns": ns},
                                 headers={"Accept": MANIFEST_ACCEPT})
        digest = head.headers["docker-content-digest"]
        manifest = (await client.get(f"/v2/{REPOSITORY}/manifests/{digest}", params={"ns": ns},
                                     headers={"Accept": MANIFEST_ACCEPT})).json()
        blobs = [manifest["config"], *manifest["layers"]]
        task = progress.add_task(name, total=sum(b["size"] for b in blobs))

        async def fetch(blob: dict[str, object]) -> None:
            nonlocal ok
            hasher = hashlib.sha256()
            async with client.stream("GET", f"/v2/{REPOSITORY}/blobs/{blob['digest']}", params={"ns": ns}) as r:
                async for piece in r.aiter_raw():
                    hasher.update(piece)
                    progress.advance(task, len(piece))
            ok = ok and f"sha256:{hasher.hexdigest()}" == blob["digest"]

        async with trio.open_nursery() as nursery:
            for blob in blobs:
                nursery.start_soon(fetch, blob)
    return time.monotonic() - started, ok


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="p2pd-demo-") as tmp:
        work = Path(tmp)
        seed_port = free_port()
        seed_url = f"http://127.0.0.1:{seed_port}"
        ns = f"127.0.0.1:{seed_port}"
        key_file = work / "cluster.key"
        key_file.write_text(secrets.token_hex(32))
        processes = []
        try:
            console.print(f"[bold]1.[/] seed registry on {seed_url}")
            processes.append(start_process(
                [sys.executable, "-m", "seed", "serve", "--listen", f"127.0.0.1:{seed_port}",
                 "--data", str(work / "seed")], log_path=work / "seed.log"))
            agents, peer_addresses = [], []
            for index in range(AGENTS):
                host = f"127.0.0.{11 + index}"
                agents.append(f"http://{host}:{free_port(host)}")
                peer_addresses.append(f"{host}:{free_port(host)}")
            for index, agent in enumerate(agents):
                peers = [arg for j, address in enumerate(peer_addresses) if j != index
                         for arg in ("--peer", address)]
                processes.append(start_process(
                    [sys.executable, "-m", "p2pd", "serve", "--listen", agent.removeprefix("http://"),
                     "--data", str(work / f"agent{index + 1}"), "--upstream", f"{ns}={seed_url}",
                     "--peer-listen", peer_addresses[index], "--cluster-key-file", str(key_file), "--no-mdns",
                     "--node-id", f"agent{index + 1}", *peers], log_path=work / f"agent{index + 1}.log"))
            wait_http_ok(f"{seed_url}/v2/", 20)
            for agent in agents:
                wait_http_ok(f"{agent}/v2/", 20)
            console.print(f"[bold]2.[/] {AGENTS} agents (static peers, cluster key): "
                          + ", ".join(f"agent{i + 1} {a.removeprefix('http://')}" for i, a in enumerate(agents)))

            console.print(f"[bold]3.[/] building an image offline (umoci + busybox-static + {LAYER_MIB} MiB layer)")
            layout = images.build_busybox_layout(work / "image")
            images.add_random_layer(layout, "busybox", "demo", LAYER_MIB)
            pushed = skopeo.copy(layout.ref("demo"), f"docker://{ns}/{REPOSITORY}:v1")
            manifest = layout.manifest("demo")
            image_bytes = sum(d["size"] for d in [manifest["config"], *manifest["layers"]])
            console.print(f"   pushed with skopeo: {pushed} ({image_bytes / 2**20:.1f} MiB of blobs)")

            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # wait until every agent knows the other two
                counts = [len(httpx.get(f"{a}/debug/status", trust_env=False).json().get("peers", []))
                          for a in agents]
                if min(counts) >= AGENTS - 1:
                    break
                time.sleep(0.2)

            console.print(f"[bold]4.[/] {AGENTS} concurrent pulls through the agents")
            columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                       TimeElapsedColumn())
            results: dict[str, tuple[float, bool]] = {}

            async def pull_all() -> None:
                with Progress(*columns, console=console) as progress:
                    async def one(name: str, agent: str) -> None:
                        results[agent] = await _pull(name, agent, ns, progress)

                    async with trio.open_nursery() as nursery:
                        for index, agent in enumerate(agents):
                            nursery.start_soon(one, f"agent{index + 1}", agent)

            trio.run(pull_all)

            console.print("[bold]5.[/] where the bytes came from")
            table = Table("agent", "time", "digests", "from seed", "from peers", "peers used", "served to peers")
            for index, agent in enumerate(agents):
                text = httpx.get(f"{agent}/metrics", trust_env=False).text
                seconds, ok = results[agent]
                sources = _peer_sources(text)
                upstream = _metric(text, "p2pd_fetched_bytes_total", '{source="upstream"}')
                from_peers = _metric(text, "p2pd_fetched_bytes_total", '{source="peer"}')
                table.add_row(
                    f"agent{index + 1}", f"{seconds:.2f}s", "ok" if ok else "MISMATCH",
                    f"{upstream / 2**20:.1f} MiB", f"{from_peers / 2**20:.1f} MiB",
                    ", ".join(f"{peer} {value / 2**20:.0f}" for peer, value in sorted(sources.items())) or "-",
                    f"{_metric(text, 'p2pd_peer_served_bytes_total') / 2**20:.1f} MiB")
            console.print(table)
            seed_text = httpx.get(f"{seed_url}/metrics", trust_env=False).text
            egress = _metric(seed_text, "seed_blob_bytes_sent_total")
            console.print(f"seed egress: {egress / 2**20:.1f} MiB for {AGENTS} pulls of a "
                          f"{image_bytes / 2**20:.1f} MiB image = {egress / image_bytes:.2f}x the image "
                          f"(direct pulls would send {AGENTS:.0f}x)")
            status = httpx.get(f"{agents[0]}/debug/status", trust_env=False).json()
            console.print(f"agent1 status: {json.dumps(status.get('fetched_bytes'))}")
            return 0 if all(ok for _, ok in results.values()) else 1
        finally:
            for process in reversed(processes):
                stop_process(process)


if __name__ == "__main__":
    sys.exit(main())
