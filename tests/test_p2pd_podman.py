"""podman pulls through p2pd: Debian's podman (containers/image 5.23, the library CRI-O uses) with
its storage in a temp dir and a registries.conf.d drop-in written by ``p2pd registries-config``.

The registry podman names is the seed's real address, so the primary location in registries.conf
is a working registry: podman asks p2pd first (the mirror, with the ``p2pd-ns/<registry>`` path
prefix instead of ``ns=``) and the seed only when p2pd cannot serve. The seed's metrics tell which
of the two sent the blob bytes.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio

import p2pd.cli
from p2pd.config import load_config
from p2pd.daemon import Agent
from tests.harness import skopeo
from tests.harness.images import OciLayout
from tests.harness.net import free_port
from tests.harness.podman import Podman
from tests.harness.seed_process import SeedProcess
from tests.p2pd_support import agent_metric, blob_sizes, start_agent

pytestmark = [pytest.mark.root]

SEED_BLOB_BYTES = "seed_blob_bytes_sent_total"


def write_drop_in(podman: Podman, endpoint: str, registry: str) -> Path:
    """``p2pd registries-config`` into podman's drop-in directory; the main file is podman's own."""
    status = p2pd.cli.main(["registries-config", "--dir", str(podman.drop_in_dir), "--endpoint", endpoint,
                            "--registry", registry, "--registries-conf", str(podman.registries_conf)])
    assert status == 0
    return podman.drop_in_dir / "50-p2pd.conf"


async def start_podman_agent(nursery: trio.Nursery, tmp_path: Path, seed: SeedProcess, **cache: float) -> Agent:
    """An agent whose upstream for the seed's own address is the seed (what ``[[upstream]]`` says)."""
    toml = tmp_path / "agent.toml"
    toml.write_text("[cache]\n" + "".join(f"{key} = {value}\n" for key, value in cache.items()))
    config = load_config(toml, listen="127.0.0.1:0", data=tmp_path / "agent", upstreams=[f"{seed.host}={seed.url}"])
    return await start_agent(nursery, config)


async def push_busybox(seed: SeedProcess, layout: OciLayout) -> str:
    return await trio.to_thread.run_sync(skopeo.copy, layout.ref("busybox"), f"docker://{seed.host}/lab/busybox:v1")


def seed_sent(seed: SeedProcess) -> float:
    return seed.metric(SEED_BLOB_BYTES)


async def test_tag_and_digest_pulls_go_through_the_agent(
    tmp_path: Path, busybox_layout: OciLayout, seed_process: SeedProcess, nursery: trio.Nursery,
) -> None:
    pushed = await push_busybox(seed_process, busybox_layout)
    image_bytes = sum(blob_sizes(busybox_layout, "busybox").values())
    agent = await start_podman_agent(nursery, tmp_path, seed_process)
    before = await trio.to_thread.run_sync(seed_sent, seed_process)
    with Podman(tmp_path / "podman", insecure_registries=(seed_process.host,)) as podman:
        drop_in = write_drop_in(podman, agent.info.url, seed_process.host)
        assert "insecure = true" in drop_in.read_text()  # carried over from the main file's entry

        await trio.to_thread.run_sync(partial(podman.run_ok, "pull", f"{seed_process.host}/lab/busybox:v1"))
        assert agent_metric(agent, "p2pd_served_bytes_total") >= image_bytes
        assert agent_metric(agent, "p2pd_fetched_bytes_total", source="upstream") == image_bytes
        # Every blob crossed from the seed once, to p2pd; podman never fell back to the seed.
        assert await trio.to_thread.run_sync(seed_sent, seed_process) - before == image_bytes
        assert agent.front.status()["served_bytes"] >= image_bytes  # what 'p2pd status' shows

        # By digest, with podman's storage emptied: answered from the agent's cache.
        await trio.to_thread.run_sync(partial(podman.run_ok, "rmi", "-a", "-f"))
        hits = agent_metric(agent, "p2pd_cache_hits_total", kind="blob")
        await trio.to_thread.run_sync(partial(podman.run_ok, "pull", f"{seed_process.host}/lab/busybox@{pushed}"))
        assert agent_metric(agent, "p2pd_cache_hits_total", kind="blob") - hits >= 2
        assert await trio.to_thread.run_sync(seed_sent, seed_process) - before == image_bytes
        listed = await trio.to_thread.run_sync(partial(podman.run_ok, "images", "--digests", "--format",
                                                       "{{.Digest}}"))
        assert pushed in listed.stdout.decode()


async def test_podman_falls_back_to_the_registry_when_the_agent_is_down(
    tmp_path: Path, busybox_layout: OciLayout, seed_process: SeedProcess,
) -> None:
    await push_busybox(seed_process, busybox_layout)
    image_bytes = sum(blob_sizes(busybox_layout, "busybox").values())
    before = await trio.to_thread.run_sync(seed_sent, seed_process)
    with Podman(tmp_path / "podman", insecure_registries=(seed_process.host,)) as podman:
        write_drop_in(podman, f"http://127.0.0.1:{free_port()}", seed_process.host)  # nothing listens there
        await trio.to_thread.run_sync(partial(podman.run_ok, "pull", f"{seed_process.host}/lab/busybox:v1"))
    assert await trio.to_thread.run_sync(seed_sent, seed_process) - before == image_bytes


async def test_stale_tag_when_the_registry_is_down(
    tmp_path: Path, busybox_layout: OciLayout, seed_process: SeedProcess, nursery: trio.Nursery,
) -> None:
    pushed = await push_busybox(seed_process, busybox_layout)
    # tag_ttl = 0: every pull asks the upstream what the tag points to.
    agent = await start_podman_agent(nursery, tmp_path, seed_process, tag_ttl=0)
    image = f"{seed_process.host}/lab/busybox:v1"
    with Podman(tmp_path / "podman", insecure_registries=(seed_process.host,)) as podman:
        write_drop_in(podman, agent.info.url, seed_process.host)
        await trio.to_thread.run_sync(partial(podman.run_ok, "pull", image))
        assert agent_metric(agent, "p2pd_stale_tag_answers_total") == 0

        # The seed is both the agent's upstream and podman's primary location: gone.
        await trio.to_thread.run_sync(seed_process.stop)
        await trio.to_thread.run_sync(partial(podman.run_ok, "rmi", "-a", "-f"))
        await trio.to_thread.run_sync(partial(podman.run_ok, "pull", image))
        assert agent_metric(agent, "p2pd_stale_tag_answers_total") >= 1
        listed = await trio.to_thread.run_sync(partial(podman.run_ok, "images", "--digests", "--format",
                                                       "{{.Digest}}"))
        assert pushed in listed.stdout.decode()
