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

        statuses = [agent.status() for agent in cluster.agents]
        upstream_total = sum(_upstream_bytes(s) for s in statuses)
        # One site: the seed sends the layer about once (chunks from peers for the rest), never per node.
        assert len(LAYER) <= upstream_total < 1.5 * len(LAYER), upstream_total
        for agent, status in zip(cluster.agents, statuses, strict=True):
            assert int(status["cache_bytes"]) >= len(LAYER), agent.node_id
            assert int(status["cache_bytes"]) < len(LAYER) + len(OTHER_PLATFORM_LAYER), agent.node_id

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
