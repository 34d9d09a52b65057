"""Five agents pull one image at the same moment: the swarm end to end on loopback.

The seed and five ``p2pd serve`` subprocesses run on 127.0.0.40-44 with static peers and a
cluster key. An image with a 64 MiB layer is pushed to the seed with skopeo; then one agent
serves a real ``ctr images pull`` (hosts.toml: the agent as mirror, the seed as server) while
the other four are pulled by clients doing what containerd does. The seed must send the
image about once, and every node must get its chunks from several peers.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

import p2pd.cli
from tests.harness import skopeo
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import MT_OCI_INDEX, MT_OCI_MANIFEST, OciLayout, add_random_layer
from tests.swarm_cluster import NS, Agent, Cluster, MiB, sha256

pytestmark = [pytest.mark.slow]

BIG_LAYER_MIB = 64
_ACCEPT = ", ".join(
    [
        MT_OCI_MANIFEST,
        MT_OCI_INDEX,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


@pytest.fixture(scope="module")
def layout64(tmp_path_factory: pytest.TempPathFactory, busybox_layout: OciLayout) -> OciLayout:
    """busybox plus one layer holding /data/big64.bin (64 MiB of random bytes)."""
    layout = OciLayout(tmp_path_factory.mktemp("swarm-image") / "oci")
    shutil.copytree(busybox_layout.path, layout.path)
    add_random_layer(layout, "busybox", "big64", BIG_LAYER_MIB)
    return layout


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    assert p2pd.cli.main(["keygen", "--out", str(path)]) == 0
    return path


async def pull_like_containerd(agent: Agent, repository: str, tag: str) -> tuple[str, dict[str, str]]:
    """HEAD the tag, GET the manifest by digest, GET config and layers in parallel (as containerd does).

    Returns the manifest digest and ``{blob digest: sha256 of the bytes received}``.
    """
    received: dict[str, str] = {}
    async with httpx.AsyncClient(
        base_url=agent.url, trust_env=False, timeout=60, headers={"Accept": _ACCEPT}
    ) as client:
        head = await client.head(f"/v2/{repository}/manifests/{tag}", params={"ns": NS})
        assert head.status_code == 200, head.text
        digest = head.headers["docker-content-digest"]
        response = await client.get(f"/v2/{repository}/manifests/{digest}", params={"ns": NS})
        assert response.status_code == 200 and sha256(response.content) == digest
        manifest = json.loads(response.content)

        async def blob(descriptor: dict[str, object]) -> None:
            hasher_input = bytearray()
            async with client.stream(
                "GET", f"/v2/{repository}/blobs/{descriptor['digest']}", params={"ns": NS}
            ) as blob_response:
                assert blob_response.status_code == 200, f"{agent.node_id}: {blob_response.status_code}"
                async for piece in blob_response.aiter_raw():
                    hasher_input += piece
            assert len(hasher_input) == descriptor["size"]
            received[str(descriptor["digest"])] = sha256(bytes(hasher_input))

        async with trio.open_nursery() as nursery:
            for descriptor in [manifest["config"], *manifest["layers"]]:
                nursery.start_soon(blob, descriptor)
    return digest, received


@pytest.mark.root
async def test_five_agents_pull_an_image_at_once_and_the_seed_sends_it_once(
    tmp_path: Path, layout64: OciLayout, key_file: Path, containerd: PrivateContainerd
) -> None:
    manifest = layout64.manifest("big64")
    sizes = {d["digest"]: d["size"] for d in [manifest["config"], *manifest["layers"]]}
    big_digest = max(sizes, key=lambda d: sizes[d])
    image_bytes = sum(sizes.values())
    assert sizes[big_digest] >= BIG_LAYER_MIB * MiB

    cluster = Cluster(tmp_path / "swarm", key_file=key_file, base=40)
    await trio.to_thread.run_sync(cluster.start)
    try:
        pushed = await trio.to_thread.run_sync(
            skopeo.copy, layout64.ref("big64"), f"docker://{cluster.seed.host}/lab/big:latest"
        )
        await trio.to_thread.run_sync(cluster.wait_members)
        ctr_agent, others = cluster.agents[2], [a for i, a in enumerate(cluster.agents) if i != 2]
        hosts = tmp_path / "hosts"
        assert (
            p2pd.cli.main(
                [
                    "containerd-config",
                    "--hosts-dir",
                    str(hosts),
                    "--endpoint",
                    ctr_agent.url,
                    "--registry",
                    f"{NS}={cluster.seed.url}",
                ]
            )
            == 0
        )
        seed_before = await trio.to_thread.run_sync(cluster.seed_blob_bytes)
        ref = f"{NS}/lab/big:latest"

        results: dict[str, tuple[str, dict[str, str]]] = {}
        started = trio.current_time()
        durations: dict[str, float] = {}

        async def by_client(agent: Agent) -> None:
            results[agent.node_id] = await pull_like_containerd(agent, "lab/big", "latest")
            durations[agent.node_id] = trio.current_time() - started

        async def by_ctr() -> None:
            await trio.to_thread.run_sync(partial(containerd.pull, ref, hosts_dir=hosts, timeout=120))
            durations[ctr_agent.node_id] = trio.current_time() - started

        with trio.fail_after(150):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(by_ctr)
                for agent in others:
                    nursery.start_soon(by_client, agent)

        # Every digest is right, wherever the bytes came from.
        for node_id, (digest, received) in results.items():
            assert digest == pushed, node_id
            assert received == {d: d for d in sizes}, node_id
        assert containerd.image_digest(ref) == pushed
        assert await trio.to_thread.run_sync(containerd.unpack_check, ref) in ("run", "mount")
        out = await trio.to_thread.run_sync(
            partial(containerd.run_container, ref, "/bin/sh", "-c", "wc -c < /data/big64.bin")
        )
        assert int(out.stdout) == BIG_LAYER_MIB * MiB

        # The seed sent the image about once, for five nodes.
        seed_sent = await trio.to_thread.run_sync(cluster.seed_blob_bytes) - seed_before
        ratio = seed_sent / image_bytes
        # Where every node's bytes came from.
        report = {}
        for agent in cluster.agents:
            metrics = await trio.to_thread.run_sync(agent.metrics)
            upstream = metrics.get(("p2pd_fetched_bytes_total", frozenset({("source", "upstream")})), 0.0)
            peer = metrics.get(("p2pd_fetched_bytes_total", frozenset({("source", "peer")})), 0.0)
            peers = {
                dict(labels)["peer"]: value
                for (name, labels), value in metrics.items()
                if name == "p2pd_peer_fetched_bytes_total"
            }
            report[agent.node_id] = (upstream, peer, peers)
        lines = [
            f"{node}: upstream {up / MiB:.1f} MiB, peers {p / MiB:.1f} MiB from "
            + ", ".join(f"{k} {v / MiB:.0f}" for k, v in sorted(peers.items()))
            + f"; pull {durations[node]:.1f} s"
            for node, (up, p, peers) in report.items()
        ]
        print(
            f"\nimage {image_bytes / MiB:.1f} MiB ({len(sizes)} blobs); seed sent {seed_sent / MiB:.1f} MiB "
            f"= {ratio:.3f} x the image for 5 nodes\n" + "\n".join(lines)
        )
        assert image_bytes <= seed_sent <= 1.05 * image_bytes, cluster.logs()

        for node_id, (upstream, peer, _peers) in report.items():
            assert upstream + peer == image_bytes, f"{node_id} fetched some chunks twice or missed some"
        # The site's upstream fetch was split into range leases: several nodes carried first
        # copies from the seed (none of them the whole big layer), and every node assembled the
        # rest from at least two peers.
        fetchers = [node for node, (upstream, _p, _peers) in report.items() if upstream >= MiB]
        assert len(fetchers) >= 2, report
        assert all(upstream < sizes[big_digest] for upstream, _p, _peers in report.values()), report
        for node_id, (_upstream, _peer, peers) in report.items():
            real_sources = [peer for peer, value in peers.items() if value >= MiB]
            assert len(real_sources) >= 2, f"{node_id} got chunks from {peers}"
        # And each one uploaded to the others. What the peer endpoints answered is counted by
        # route and status, and the connections the nodes opened by handshake: messages share
        # the chunk connections, all mutual TLS (peer TLS is on by default).
        announcements = connections = 0.0
        for agent in cluster.agents:
            assert await trio.to_thread.run_sync(agent.metric, "p2pd_peer_served_bytes_total") > 0
            assert await trio.to_thread.run_sync(agent.metric, "p2pd_chunks_failed_total") == 0
            metrics = await trio.to_thread.run_sync(agent.metrics)
            assert metrics.get(("p2pd_peer_requests_served_total",
                                frozenset({("route", "chunk"), ("status", "206")})), 0.0) > 0, agent.node_id
            announcements += metrics.get(("p2pd_peer_requests_served_total",
                                          frozenset({("route", "announce"), ("status", "200")})), 0.0)
            opened = {dict(labels)["handshake"]: value for (name, labels), value in metrics.items()
                      if name == "p2pd_peer_connections_total"}
            assert opened.get("plain", 0.0) == 0, opened
            connections += sum(opened.values())
        assert announcements > 0 and connections > 0
    finally:
        await trio.to_thread.run_sync(cluster.stop)
