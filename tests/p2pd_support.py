"""Helpers shared by the agent's integration tests (in-process agent and seed, metrics, raw pushes)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

import p2pd.cli
import p2pd.daemon
from p2pd.config import AgentConfig, load_config
from p2pd.daemon import Agent
from seed.config import load_config as load_seed_config
from seed.registry import SeedRegistry, serve_seed
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import OciLayout

# The registry name containerd sees in image references; p2pd maps it to an upstream with --upstream.
NS = "seed.local:5000"
# containerd has no pull timeout of its own: ctr is killed after this many seconds.
CTR_TIMEOUT = 60.0


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A small TOML file of ``[section] key = value`` (numbers, booleans and plain strings)."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            # (A conversion inside the braces would apply to the whole conditional: true → 'true'.)
            rendered = str(value).lower() if isinstance(value, bool) else repr(value)
            lines.append(f"{key} = {rendered}")
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_config(tmp_path: Path, upstream_url: str, *, name: str = "agent", **sections: dict[str, Any]) -> AgentConfig:
    """Configuration of an in-process agent on a free port mapping ``NS`` to ``upstream_url``.

    ``sections`` become TOML tables, e.g. ``fetch={"stall_timeout": 1.0}``, read through the
    same loader as ``p2pd serve --config``.
    """
    config_file = write_toml(tmp_path / f"{name}.toml", sections) if sections else None
    return load_config(config_file, listen="127.0.0.1:0", data=tmp_path / name, upstreams=[f"{NS}={upstream_url}"])


async def start_agent(nursery: trio.Nursery, config: AgentConfig) -> Agent:
    return await nursery.start(partial(p2pd.daemon.serve_agent, config))


async def start_seed(nursery: trio.Nursery, data: Path) -> tuple[str, SeedRegistry]:
    """An in-process seed; returns its URL and registry (for its metrics)."""
    config = load_seed_config(None, listen="127.0.0.1:0", data=data)
    info, registry = await nursery.start(partial(serve_seed, config))
    return info.url, registry


async def downloads_ended(agent: Agent) -> None:
    """Until the in-process agent has no download in flight (callers bound the wait). A client
    has a blob's last bytes before the download task renames it into the store and tells the
    swarm of it: a test that looks at either after a pull waits for this first."""
    # The fetcher's in-flight table has no event to wait on, and is not worth one for tests.
    while agent.fetcher.in_flight:  # noqa: ASYNC110
        await trio.sleep(0.01)


def agent_metric(agent: Agent, name: str, **labels: str) -> float:
    """A sample of the agent's metrics (0.0 if absent)."""
    return agent.metrics.registry.get_sample_value(name, labels) or 0.0


def seed_metric(registry: SeedRegistry, name: str, **labels: str) -> float:
    return registry.metrics.registry.get_sample_value(name, labels) or 0.0


def push_blob(registry_url: str, repository: str, data: bytes) -> str:
    """Uploads ``data`` as a blob (POST, then a monolithic PUT); returns its digest.

    Works against the seed and docker-registry alike. Synchronous: call it through
    ``trio.to_thread.run_sync`` from trio tests.
    """
    digest = sha256(data)
    with httpx.Client(base_url=registry_url, trust_env=False, timeout=30) as client:
        started = client.post(f"/v2/{repository}/blobs/uploads/")
        assert started.status_code == 202, started.text
        location = httpx.URL(started.headers["location"]).copy_add_param("digest", digest)
        done = client.put(location, content=data, headers={"Content-Type": "application/octet-stream"})
        assert done.status_code == 201, done.text
    return digest


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


async def get_blob_raw(client: httpx.AsyncClient, url: str) -> tuple[int, int | None, bytes, bool]:
    """A GET that survives a body cut short: (status, Content-Length, bytes received, complete)."""
    received = bytearray()
    async with client.stream("GET", url) as response:
        length = response.headers.get("content-length")
        try:
            async for piece in response.aiter_raw():
                received += piece
            complete = True
        except httpx.HTTPError:  # RemoteProtocolError: the server closed before Content-Length
            complete = False
    return response.status_code, int(length) if length is not None else None, bytes(received), complete


def write_hosts(hosts_dir: Path, endpoint: str, server_url: str) -> Path:
    """``p2pd containerd-config`` for ``NS``: p2pd first, ``server_url`` last."""
    status = p2pd.cli.main(
        ["containerd-config", "--hosts-dir", str(hosts_dir), "--endpoint", endpoint, "--registry", f"{NS}={server_url}"]
    )
    assert status == 0
    written = (hosts_dir / NS / "hosts.toml").read_text()
    assert f'server = "{server_url}"' in written and endpoint in written
    return hosts_dir


def blob_sizes(layout: OciLayout, tag: str) -> dict[str, int]:
    """Config and layer digests of an image with their sizes."""
    manifest = layout.manifest(tag)
    return {d["digest"]: d["size"] for d in [manifest["config"], *manifest["layers"]]}


def pull(containerd: PrivateContainerd, ref: str, hosts: Path, *, check: bool = True) -> Awaitable[Any]:
    """``ctr images pull --hosts-dir`` in a worker thread; ctr is killed after ``CTR_TIMEOUT`` seconds."""
    return trio.to_thread.run_sync(partial(containerd.pull, ref, hosts_dir=hosts, timeout=CTR_TIMEOUT, check=check))
