"""A loopback swarm for integration tests: the seed plus p2pd agents as real subprocesses,
each on its own 127.0.0.x address (all of 127.0.0.0/8 routes to ``lo`` on Linux), joined
by static peers and a cluster key.

Agents are started with ``python -m p2pd serve`` exactly as an operator would; nothing in
the product knows it is being tested. Blocking helpers (start, stop, polling) are meant to
be called from trio tests through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from p2pd.swarm import auth
from p2pd.swarm.peers import NODE_HEADER, SIGNATURE_HEADER, TIME_HEADER
from tests.harness.net import assert_loopback, free_port, wait_http_ok
from tests.harness.p2pd_process import Samples, parse_metrics
from tests.harness.seed_process import SeedProcess
from tests.harness.tools import start_process, stop_process, tail

# The registry name containerd (and our clients) put in ``ns=``; agents map it to the seed.
NS = "seed.local:5000"
MiB = 1024 * 1024


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_swarm_config(path: Path, **swarm: object) -> Path:
    """A TOML file with a ``[swarm]`` table of numbers (lease_ttl, peer_timeout, ...)."""
    path.write_text("[swarm]\n" + "".join(f"{key} = {value!r}\n" for key, value in swarm.items()))
    return path


def push_blob(registry_url: str, repository: str, data: bytes) -> str:
    """Monolithic blob upload (POST ?digest=); returns the digest."""
    assert_loopback(registry_url)
    digest = sha256(data)
    with httpx.Client(base_url=registry_url, trust_env=False, timeout=60) as client:
        response = client.post(f"/v2/{repository}/blobs/uploads/", params={"digest": digest}, content=data)
        assert response.status_code == 201, response.text
    return digest


def signed_headers(key: bytes, node_id: str, method: str, target: str, body: bytes = b"") -> dict[str, str]:
    """What a member with the cluster key sends to another member's peer endpoint."""
    now = time.time()
    return {
        NODE_HEADER: node_id,
        TIME_HEADER: str(int(now)),
        SIGNATURE_HEADER: auth.sign_request(key, method, target, node_id, now, body),
    }


@dataclass
class Agent:
    """One ``p2pd serve`` subprocess with its own loopback address."""

    node_id: str
    ip: str
    data: Path
    argv_tail: list[str]
    log_level: str = "INFO"
    port: int = 0
    peer_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        assert_loopback(self.ip)
        self.port = self.port or free_port(self.ip)
        self.peer_port = self.peer_port or free_port(self.ip)

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    @property
    def peer_address(self) -> str:
        return f"{self.ip}:{self.peer_port}"

    @property
    def log_path(self) -> Path:
        return self.data.with_name(self.data.name + ".log")

    def argv(self, seed_url: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "p2pd",
            "--log-level",
            self.log_level,
            "serve",
            "--listen",
            f"{self.ip}:{self.port}",
            "--data",
            str(self.data),
            "--upstream",
            f"{NS}={seed_url}",
            "--peer-listen",
            self.peer_address,
            "--no-mdns",
            "--node-id",
            self.node_id,
            *self.argv_tail,
        ]

    def start(self, seed_url: str) -> None:
        self.data.parent.mkdir(parents=True, exist_ok=True)
        self.proc = start_process(self.argv(seed_url), log_path=self.log_path)

    def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            wait_http_ok(f"{self.url}/readyz", timeout, alive=self.is_running)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"agent {self.node_id} did not start: {exc}\n{tail(self.log_path)}") from exc

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=15)

    def metrics(self) -> Samples:
        return parse_metrics(httpx.get(f"{self.url}/metrics", trust_env=False, timeout=5).text)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def peer_bytes(self) -> dict[str, float]:
        """Chunk bytes received from each peer (``p2pd_peer_fetched_bytes_total{peer=...}``)."""
        return {
            dict(labels)["peer"]: value
            for (name, labels), value in self.metrics().items()
            if name == "p2pd_peer_fetched_bytes_total"
        }

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/debug/status", trust_env=False, timeout=5).json()

    def live_peers(self) -> set[str]:
        return {p["id"] for p in self.status().get("peers", []) if not p["suspended"] and not p["banned"]}

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Cluster:
    """The seed and ``count`` agents ``a0``... on 127.0.0.{base+i}, every agent a static peer of the others.

    Args:
        workdir: where data and logs go.
        count: number of agents.
        key_file: the cluster key all agents share.
        base: last octet of the first agent's address.
        config: optional ``--config`` file for every agent.
        node_ids: ids instead of ``a0``, ``a1``...
        extra_args: per-agent extra ``p2pd serve`` arguments, by index.
        extra_peers: more static peers for every agent (e.g. a malicious one).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        count: int = 5,
        key_file: Path,
        base: int = 40,
        config: Path | None = None,
        node_ids: Sequence[str] | None = None,
        extra_args: dict[int, list[str]] | None = None,
        extra_peers: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.key_file = key_file
        self.key = auth.parse_key(key_file.read_text())
        self.seed = SeedProcess(workdir / "seed", log_level="INFO")
        ids = list(node_ids or [f"a{i}" for i in range(count)])
        self.agents = [Agent(ids[i], f"127.0.0.{base + i}", workdir / ids[i], []) for i in range(count)]
        for i, agent in enumerate(self.agents):
            peers = [other.peer_address for other in self.agents if other is not agent] + list(extra_peers)
            agent.argv_tail = [
                *(arg for peer in peers for arg in ("--peer", peer)),
                "--cluster-key-file",
                str(key_file),
                *(["--config", str(config)] if config else []),
                *(extra_args or {}).get(i, []),
            ]

    def by_id(self, node_id: str) -> Agent:
        return next(agent for agent in self.agents if agent.node_id == node_id)

    def start(self) -> Cluster:
        self.seed.start()
        self.start_agents(self.seed.url)
        return self

    def start_agents(self, upstream_url: str) -> None:
        """Starts every agent with ``upstream_url`` as its upstream (the seed, or a proxy before it)."""
        for agent in self.agents:
            agent.start(upstream_url)
        for agent in self.agents:
            agent.wait_ready()

    def stop(self) -> None:
        running = [agent.proc for agent in self.agents if agent.is_running()]
        for proc in running:  # all at once: graceful shutdowns overlap
            assert proc is not None
            proc.terminate()
        for agent in self.agents:
            agent.stop()
        self.seed.stop()

    def wait_members(self, agents: Sequence[Agent] | None = None, timeout: float = 30.0) -> None:
        """Until every agent sees every other one as a live member."""
        agents = list(agents or [a for a in self.agents if a.is_running()])
        ids = {agent.node_id for agent in agents}
        deadline = time.monotonic() + timeout
        while True:
            missing = {agent.node_id: sorted(ids - {agent.node_id} - agent.live_peers()) for agent in agents}
            if not any(missing.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"membership incomplete after {timeout}s: {missing}")
            time.sleep(0.2)

    def seed_blob_bytes(self) -> float:
        return self.seed.metric("seed_blob_bytes_sent_total")

    def logs(self) -> str:
        """Every agent's log tail, for assertion messages."""
        return "\n".join(f"--- {agent.node_id}\n{tail(agent.log_path, 3000)}" for agent in self.agents)

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def pull_blob(agent: Agent, repository: str, digest: str) -> str:
    """GET a blob through an agent's containerd-facing endpoint; returns the sha256 of what came back.

    Raises on any HTTP error or a body cut short (callers bound the time with ``trio.fail_after``).
    """
    hasher = hashlib.sha256()
    async with httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(30.0)) as client:
        url = f"{agent.url}/v2/{repository}/blobs/{digest}"
        async with client.stream("GET", url, params={"ns": NS}) as response:
            assert response.status_code == 200, f"{agent.node_id}: {response.status_code}"
            async for piece in response.aiter_raw():
                hasher.update(piece)
    return "sha256:" + hasher.hexdigest()


async def wait_until(predicate: Callable[[], object], *, interval: float = 0.1) -> None:
    """Polls a blocking ``predicate`` (in a thread) until it is true; callers bound it with ``fail_after``."""
    while True:
        if await trio.to_thread.run_sync(predicate):
            return
        await trio.sleep(interval)  # an external process: nothing to wait on but time


def transfer_of(agent: Agent, digest: str) -> dict[str, Any] | None:
    """The agent's swarm transfer of ``digest`` in /debug/status, if in flight."""
    try:
        status = agent.status()
    except (httpx.HTTPError, json.JSONDecodeError):
        return None
    return next((t for t in status.get("transfers", []) if t["digest"] == digest), None)
