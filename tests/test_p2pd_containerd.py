"""containerd pulls through p2pd: a private containerd whose hosts.toml (written by
``p2pd containerd-config``) names the agent as its mirror and the upstream as ``server``.

The upstream is (a) our seed (a real subprocess) and (b) the CNCF reference registry
(Debian's docker-registry). Images are built offline and pushed with skopeo. A pull must be
served by p2pd (its metrics account for every blob byte), unpack and run; a second pull after
emptying containerd must be answered from p2pd's cache without asking the upstream again.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio

from p2pd.oci.digest import Digest
from tests.harness import skopeo
from tests.harness.containerd import PrivateContainerd
from tests.harness.faulty_proxy import serve_faulty_proxy
from tests.harness.images import MiB, OciLayout
from tests.harness.reference_registry import ReferenceRegistry
from tests.harness.seed_process import SeedProcess
from tests.harness.verify import misnamed_blobs
from tests.p2pd_support import (
    NS,
    agent_config,
    agent_metric,
    blob_sizes,
    downloads_ended,
    pull,
    start_agent,
    write_hosts,
)

pytestmark = [pytest.mark.root]


@pytest.mark.slow
async def test_pull_big_image_from_seed_through_p2pd(
    tmp_path: Path,
    big_layout: OciLayout,
    seed_process: SeedProcess,
    containerd: PrivateContainerd,
    nursery: trio.Nursery,
) -> None:
    pushed = await trio.to_thread.run_sync(
        skopeo.copy, big_layout.ref("big"), f"docker://{seed_process.host}/lab/big:latest"
    )
    sizes = blob_sizes(big_layout, "big")
    image_bytes = sum(sizes.values())
    assert max(sizes.values()) > 50 * MiB
    agent = await start_agent(nursery, agent_config(tmp_path, seed_process.url))
    hosts = write_hosts(tmp_path / "hosts", agent.info.url, seed_process.url)
    ref = f"{NS}/lab/big:latest"
    seed_sent_before = await trio.to_thread.run_sync(seed_process.metric, "seed_blob_bytes_sent_total")

    await pull(containerd, ref, hosts)
    assert containerd.image_digest(ref) == pushed
    with trio.fail_after(10):
        await downloads_ended(agent)
    assert agent_metric(agent, "p2pd_served_bytes_total") >= image_bytes
    assert agent_metric(agent, "p2pd_fetched_bytes_total", source="upstream") == image_bytes
    assert agent_metric(agent, "p2pd_upstream_fetches_total") == len(sizes)
    for digest, size in sizes.items():
        assert agent.store.size(Digest.parse(digest)) == size
    assert misnamed_blobs(agent.store.root / "blobs" / "sha256") == []
    # Every blob crossed from the seed once, to p2pd; containerd never fell back to the seed.
    seed_sent = await trio.to_thread.run_sync(seed_process.metric, "seed_blob_bytes_sent_total")
    assert seed_sent - seed_sent_before == image_bytes
    assert await trio.to_thread.run_sync(containerd.unpack_check, ref) in ("run", "mount")
    out = await trio.to_thread.run_sync(
        partial(containerd.run_container, ref, "/bin/sh", "-c", "wc -c < /data/big.bin")
    )
    assert int(out.stdout) == 50 * MiB

    # Second, cold (for containerd) pull: p2pd answers from its cache; the seed sends nothing.
    await trio.to_thread.run_sync(containerd.remove_all)
    served_before = agent_metric(agent, "p2pd_served_bytes_total")
    hits_before = agent_metric(agent, "p2pd_cache_hits_total", kind="blob")
    await pull(containerd, ref, hosts)
    assert containerd.image_digest(ref) == pushed
    assert await trio.to_thread.run_sync(seed_process.metric, "seed_blob_bytes_sent_total") == seed_sent
    assert agent_metric(agent, "p2pd_served_bytes_total") - served_before >= image_bytes
    assert agent_metric(agent, "p2pd_cache_hits_total", kind="blob") - hits_before >= len(sizes)
    assert agent_metric(agent, "p2pd_fetched_bytes_total", source="upstream") == image_bytes
    assert await trio.to_thread.run_sync(containerd.unpack_check, ref) in ("run", "mount")


@pytest.mark.slow
async def test_pull_from_docker_registry_through_p2pd(
    tmp_path: Path,
    busybox_layout: OciLayout,
    reference_registry: ReferenceRegistry,
    containerd: PrivateContainerd,
    nursery: trio.Nursery,
) -> None:
    pushed = await trio.to_thread.run_sync(
        skopeo.copy, busybox_layout.ref("busybox"), f"docker://{reference_registry.host}/lab/busybox:latest"
    )
    sizes = blob_sizes(busybox_layout, "busybox")
    image_bytes = sum(sizes.values())
    # A pass-through proxy in front of docker-registry counts every request, whoever sends it:
    # it is both p2pd's upstream and containerd's ``server``.
    counter = await nursery.start(serve_faulty_proxy, reference_registry.url)
    agent = await start_agent(nursery, agent_config(tmp_path, counter.url))
    hosts = write_hosts(tmp_path / "hosts", agent.info.url, counter.url)
    ref = f"{NS}/lab/busybox:latest"

    await pull(containerd, ref, hosts)
    assert containerd.image_digest(ref) == pushed
    assert agent_metric(agent, "p2pd_served_bytes_total") >= image_bytes
    assert agent_metric(agent, "p2pd_fetched_bytes_total", source="upstream") == image_bytes
    assert sorted(r.path.rsplit("/", 1)[1] for r in counter.blob_gets()) == sorted(sizes)
    assert counter.blob_bytes() == image_bytes
    assert await trio.to_thread.run_sync(containerd.unpack_check, ref) in ("run", "mount")

    await trio.to_thread.run_sync(containerd.remove_all)
    seen = len(counter.requests)
    await pull(containerd, ref, hosts)
    assert containerd.image_digest(ref) == pushed
    # Tags are trusted for cache.tag_ttl (60 s): nothing at all reached the registry.
    assert counter.requests[seen:] == []
    assert await trio.to_thread.run_sync(containerd.unpack_check, ref) in ("run", "mount")
