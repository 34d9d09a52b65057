"""``p2pd preheat``: three ``p2pd serve`` processes on loopback with a cluster key; a two-platform
index on the seed; a preheat from one node makes every member fetch its platform's blobs, the
seed sending each blob about once; re-running fetches nothing; the peer message is signed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import trio

import p2pd.cli
from p2pd.oci import mediatypes
from p2pd.swarm.auth import generate_key
from p2pd.swarm.peers import PeerClient, PeerError
from p2pd.swarm.tls import PeerTls
from tests.harness import skopeo
from tests.harness.images import write_layout_index
from tests.swarm_cluster import NS, Cluster

LAYER = os.urandom(3 * 1024 * 1024)
OTHER_PLATFORM_LAYER = os.urandom(1024 * 1024)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    assert p2pd.cli.main(["keygen", "--out", str(path)]) == 0
    return path


def _upstream_bytes(status: dict[str, object]) -> float:
    fetched = status.get("fetched_bytes")
    return float(fetched.get("upstream", 0)) if isinstance(fetched, dict) else 0.0


async def _pull_amd64(url: str, repository: str, tag: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False,
                                 headers={"Accept": mediatypes.MANIFEST_ACCEPT}, params={"ns": NS}) as client:
        index = await client.get(f"/v2/{repository}/manifests/{tag}")
        assert index.status_code == 200, index.text
        entry = next(m for m in index.json()["manifests"] if m.get("platform", {}).get("architecture") == "amd64")
        manifest = await client.get(f"/v2/{repository}/manifests/{entry['digest']}")
        assert manifest.status_code == 200
        for blob in [manifest.json()["config"], *manifest.json()["layers"]]:
            response = await client.get(f"/v2/{repository}/blobs/{blob['digest']}")
            assert response.status_code == 200 and len(response.content) == blob["size"]


async def test_preheat_every_member_once_per_site_and_resume(tmp_path: Path, key_file: Path) -> None:
    cluster = Cluster(tmp_path / "swarm", count=3, key_file=key_file, base=110)
    await trio.to_thread.run_sync(cluster.start)
    try:
        await trio.to_thread.run_sync(cluster.wait_members)
        layout = tmp_path / "layout"
        write_layout_index(layout, {"linux/amd64": [LAYER], "linux/arm64": [OTHER_PLATFORM_LAYER]}, tag="v1")
        host = cluster.seed.url.removeprefix("http://")
        await trio.to_thread.run_sync(lambda: skopeo.copy(f"oci:{layout}:v1", f"docker://{host}/lab/app:v1",
                                                          extra_args=["--all"], preserve_digests=True))
        image = f"{NS}/lab/app:v1"
        first = cluster.agents[0]
        argv = ["preheat", image, "--endpoint", first.url, "--platform", "linux/amd64", "--pin-for", "1h"]
        assert await trio.to_thread.run_sync(p2pd.cli.main, argv) == 0

        seed_sent_by_preheat = cluster.seed.metric("seed_blob_bytes_sent_total")
        statuses = [agent.status() for agent in cluster.agents]
        upstream_total = sum(_upstream_bytes(s) for s in statuses)
        # One site: the seed sends the layer about once (chunks from peers for the rest), never per node.
        assert len(LAYER) <= upstream_total < 1.5 * len(LAYER), upstream_total
        for agent, status in zip(cluster.agents, statuses, strict=True):
            assert int(status["cache_bytes"]) >= len(LAYER), agent.node_id
            assert int(status["cache_bytes"]) < len(LAYER) + len(OTHER_PLATFORM_LAYER), agent.node_id

        # The rollout: every node pulls the image through its agent's HTTP path (as containerd
        # does: index, platform manifest, blobs) and the seed sends no blob byte.
        upstream_before = sum(_upstream_bytes(agent.status()) for agent in cluster.agents)
        async with trio.open_nursery() as pulls:
            for agent in cluster.agents:
                pulls.start_soon(_pull_amd64, agent.url, "lab/app", "v1")
        assert cluster.seed.metric("seed_blob_bytes_sent_total") == seed_sent_by_preheat
        assert sum(_upstream_bytes(agent.status()) for agent in cluster.agents) == upstream_before

        # Re-running (after an interruption) is cheap: every member reports nothing fetched.
        async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
            response = await client.post(first.url + "/p2pd/v1/preheat",
                                          json={"images": [image], "platform": "linux/amd64"})
        assert response.status_code == 200, response.text
        nodes = response.json()["nodes"]
        assert sorted(n["node"] for n in nodes) == ["a0", "a1", "a2"]
        assert all(n["status"] == "done" and n["bytes"] == 0 for n in nodes), nodes

        # The peer message is authenticated like every peer request: a holder of a cluster TLS
        # certificate whose HMAC key is wrong is refused, and nothing is fetched.
        tls = PeerTls.derived(cluster.key, "intruder", tmp_path / "intruder-tls").client()
        intruder = PeerClient("intruder", bytes.fromhex(generate_key()), tls=tls)
        try:
            with pytest.raises(PeerError, match="401"):
                await intruder.preheat(first.peer_address, json.dumps({"images": [image]}).encode())
        finally:
            await intruder.aclose()
    finally:
        await trio.to_thread.run_sync(cluster.stop)
