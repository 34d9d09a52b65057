"""``python -m tests.bench.p2pd_auth``: what checking each client's right to pull costs a pull.

A private seed (subprocess, htpasswd users, ES256 tokens) holds one image: a config and
``--layers`` random layers of ``--layer-mib`` MiB. An in-process agent with the operator's
pull-only account serves it to an in-process client doing what containerd does (HEAD the tag,
GET the manifest by digest, GET every blob in parallel), in three variants:

- **open**: the operator opened the namespace (``anonymous_pull = true``): no client checks,
  the path of an agent without access control;
- **offline**: the client presents a seed token; the agent verifies it against the seed's JWKS
  (fetched once per agent);
- **upstream check**: the same token, the agent told the keys are elsewhere (``jwks_url``
  answers 404): one ``tags/list`` request to the seed per (token, repository).

Every variant is pulled *cold* (a fresh agent and data directory: the agent fetches from the
seed while it streams) and *warm* (the same agent again: from its cache), ``--repeat`` times,
the variants' order rotating between repetitions. The report gives medians and each checked
variant's ratio to *open* (the issue's goal: at most 1.05x), plus the cost of one decision of
the gate alone (cached grant).

The swarm part: ``--swarm-nodes`` in-process agents with the peer port on (static peers,
cluster key) pull the image at once, cold, in three variants — **plain** (peer traffic in clear,
the namespace opened), **tls** (mutual TLS with key-derived certificates, opened) and
**tls+checks** (TLS, and every client's token checked at its node). Every variant asks the seed
for a peer grant per blob and node and checks the grants of its peers (the seed has access
control): that cost is in all three, and its per-check cost is timed alone. Reported: wall time
until every node has the image, its ratio to *plain* (goal 1.05x), and the process CPU per MiB
received by the nodes (all agents share this one process).

Writes the section between ``<!-- bench-p2pd-auth:start -->`` and ``<!-- bench-p2pd-auth:end -->``
of ``--out`` (other sections are kept) and the raw numbers as JSON (``docs/bench/p2pd_auth.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from p2pd.access import KeySet
from p2pd.config import load_config
from p2pd.daemon import Agent, serve_agent
from p2pd.httpd import Headers, Request
from p2pd.oci.digest import Digest
from p2pd.swarm.auth import generate_key
from p2pd.swarm.grants import PEER_GRANT_AUDIENCE, PEER_GRANT_USE, verify_grant
from seed.auth.tokens import jwk_of
from tests.bench.common import X, busy_cores, loadavg, machine_basics, ratio, report_header, run_and_publish
from tests.harness.net import free_port
from tests.harness.seed_process import SeedProcess
from tests.swarm_cluster import wait_until
from tests.test_seed_auth_api import make_htpasswd

MARK_START = "<!-- bench-p2pd-auth:start -->"
MARK_END = "<!-- bench-p2pd-auth:end -->"
SECTION_TITLE = "## Cost of client authorization at the node (python -m tests.bench.p2pd_auth)"
VARIANTS = ("open", "offline", "upstream-check")
GOAL = 1.05  # checked pull / open pull
NS = "seed.bench:5000"
REPO = "team/bench"
USER, PASSWORD = "tenant", "tenant-Secret-1"
NODE_USER, NODE_PASSWORD = "node", "node-Secret-1"
ADMIN, ADMIN_PASSWORD = "admin", "admin-Secret-1"
MIB = 1024 * 1024


def _seed_config(root: Path) -> Path:
    make_htpasswd(root / "htpasswd", {USER: PASSWORD, NODE_USER: NODE_PASSWORD, ADMIN: ADMIN_PASSWORD})
    config = root / "seed.toml"
    config.write_text(f'[auth]\nhtpasswd = "{root / "htpasswd"}"\nservice = "seed.bench"\n\n'
                      f'[[access]]\nrepositories = ["team/**"]\nusers = ["{USER}", "{NODE_USER}"]\nrole = "pull"\n\n'
                      f'[[access]]\nrepositories = ["team/**"]\nusers = ["{ADMIN}"]\nrole = "admin"\n')
    return config


def _push(seed_url: str, layers: int, layer_mib: float) -> list[tuple[str, int]]:
    """Pushes the image (tag v1); returns (digest, size) of the config and the layers."""
    blobs = [json.dumps({"os": "linux", "bench": "p2pd_auth"}).encode()]
    blobs += [os.urandom(int(layer_mib * MIB)) for _ in range(layers)]
    descriptors = []
    with httpx.Client(base_url=seed_url, trust_env=False, timeout=120, auth=(ADMIN, ADMIN_PASSWORD)) as client:
        for data in blobs:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            started = client.post(f"/v2/{REPO}/blobs/uploads/")
            started.raise_for_status()
            client.put(started.headers["location"], params={"digest": digest}, content=data).raise_for_status()
            descriptors.append((digest, len(data)))
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": descriptors[0][0], "size": descriptors[0][1]},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}
                               for d, s in descriptors[1:]]}
        client.put(f"/v2/{REPO}/manifests/v1", content=json.dumps(manifest).encode(),
                   headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()
    return descriptors


def _token(seed_url: str) -> str:
    response = httpx.get(f"{seed_url}/token", params={"service": "seed.bench", "scope": f"repository:{REPO}:pull"},
                         auth=(USER, PASSWORD), trust_env=False, timeout=30)
    response.raise_for_status()
    return str(response.json()["token"])


def _agent_toml(root: Path, seed_url: str, variant: str, run: int) -> Path:
    lines = ["[[upstream]]", f'namespace = "{NS}"', f'url = "{seed_url}"', f'username = "{NODE_USER}"',
             f'password = "{NODE_PASSWORD}"']
    if variant == "open":
        lines.append("anonymous_pull = true")
    elif variant == "upstream-check":
        lines.append(f'jwks_url = "{seed_url}/token/no-keys-here"')
    path = root / f"agent-{variant}-{run}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _pull(agent: Agent, authorization: str | None, blobs: list[tuple[str, int]]) -> float:
    """One containerd-like pull; returns its wall time in seconds."""
    headers = {"Authorization": authorization} if authorization else {}
    async with httpx.AsyncClient(base_url=agent.info.url, trust_env=False, timeout=120, headers=headers) as client:
        started = time.perf_counter()
        head = await client.head(f"/v2/{REPO}/manifests/v1", params={"ns": NS})
        head.raise_for_status()
        (await client.get(f"/v2/{REPO}/manifests/{head.headers['docker-content-digest']}",
                          params={"ns": NS})).raise_for_status()

        async def blob(digest: str, size: int) -> None:
            received = 0
            async with client.stream("GET", f"/v2/{REPO}/blobs/{digest}", params={"ns": NS}) as response:
                response.raise_for_status()
                async for piece in response.aiter_raw():
                    received += len(piece)
            if received != size:
                raise RuntimeError(f"{digest}: {received} of {size} bytes")

        async with trio.open_nursery() as nursery:
            for digest, size in blobs:
                nursery.start_soon(blob, digest, size)
        return time.perf_counter() - started


async def _measure(root: Path, seed_url: str, token: str, blobs: list[tuple[str, int]], repeat: int,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for run in range(repeat):
        order = VARIANTS[run % len(VARIANTS):] + VARIANTS[:run % len(VARIANTS)]
        for variant in order:
            config = load_config(_agent_toml(root, seed_url, variant, run), listen="127.0.0.1:0",
                                 data=root / f"agent-{variant}-{run}")
            authorization = None if variant == "open" else f"Bearer {token}"
            async with trio.open_nursery() as nursery:
                agent: Agent = await nursery.start(partial(serve_agent, config))
                cold = await _pull(agent, authorization, blobs)
                warm = await _pull(agent, authorization, blobs)
                checks = {labels["kind"]: value for metric in agent.metrics.auth_checks.collect()
                          for sample in metric.samples if sample.name.endswith("_total")
                          for labels, value in [(sample.labels, sample.value)]}
                nursery.cancel_scope.cancel()
            runs.append({"variant": variant, "run": run, "cold_s": round(cold, 4), "warm_s": round(warm, 4),
                         "checks": checks})
            log(f"  run {run} {variant:15} cold {cold:.3f} s  warm {warm:.3f} s  checks {checks}")
    return runs


SWARM_VARIANTS = ("plain", "tls", "tls+checks")


async def _measure_swarm(root: Path, seed_url: str, token: str, blobs: list[tuple[str, int]], repeat: int,
                         nodes: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    key_file = root / "cluster.key"
    key_file.write_text(generate_key() + "\n")
    image_bytes = sum(size for _digest, size in blobs)
    runs: list[dict[str, Any]] = []
    for run in range(repeat):
        order = SWARM_VARIANTS[run % 3:] + SWARM_VARIANTS[:run % 3]
        for variant in order:
            ports = [free_port() for _ in range(nodes)]
            async with trio.open_nursery() as nursery:
                agents: list[Agent] = []
                for index, port in enumerate(ports):
                    name = f"swarm-{variant.replace('+', '-')}-{run}-{index}"
                    toml = _agent_toml(root, seed_url, "offline" if variant == "tls+checks" else "open", run)
                    (root / f"{name}.toml").write_text(toml.read_text())
                    swarm = {"peer_listen": f"127.0.0.1:{port}", "mdns": False, "node_id": f"n{index}",
                             "peers": tuple(f"127.0.0.1:{p}" for p in ports if p != port),
                             "cluster_key_file": str(key_file)}
                    config = load_config(root / f"{name}.toml", listen="127.0.0.1:0", data=root / name, swarm=swarm)
                    if variant == "plain":
                        config = replace(config, swarm=replace(config.swarm, peer_tls=False))
                    agents.append(await nursery.start(partial(serve_agent, config)))
                with trio.fail_after(30):
                    await wait_until(partial(_all_members, agents, nodes), interval=0.05)
                authorization = f"Bearer {token}" if variant == "tls+checks" else None
                cpu_before = time.process_time()
                started = time.perf_counter()
                async with trio.open_nursery() as pulls:
                    for agent in agents:
                        pulls.start_soon(_pull, agent, authorization, blobs)
                wall = time.perf_counter() - started
                cpu = time.process_time() - cpu_before
                grants = sum(a.metrics.registry.get_sample_value("p2pd_peer_grants_total") or 0 for a in agents)
                peer_bytes = sum(a.metrics.registry.get_sample_value("p2pd_fetched_bytes_total", {"source": "peer"})
                                 or 0 for a in agents)
                nursery.cancel_scope.cancel()
            cpu_ms_per_mib = cpu * 1000 / (nodes * image_bytes / MIB)
            runs.append({"variant": variant, "run": run, "wall_s": round(wall, 4),
                         "cpu_ms_per_mib": round(cpu_ms_per_mib, 2), "grants": int(grants),
                         "peer_mib": round(peer_bytes / MIB, 2)})
            log(f"  swarm run {run} {variant:11} {wall:.3f} s  cpu {cpu_ms_per_mib:.1f} ms/MiB  "
                f"grants {int(grants)}  from peers {peer_bytes / MIB:.1f} MiB")
    return runs


def _all_members(agents: list[Agent], nodes: int) -> bool:
    return all(a.swarm is not None and len(a.swarm.membership.live()) >= nodes for a in agents)


def _grant_check_cost(count: int) -> float:
    """Microseconds per ``verify_grant`` (an ES256 signature check and the claims)."""
    signing = ec.generate_private_key(ec.SECP256R1())
    jwks = json.dumps({"keys": [{**jwk_of(signing.public_key()), "kid": "k", "use": "sig", "alg": "ES256"}]}).encode()
    keys = KeySet.from_jwks(jwks)
    digest = Digest.parse("sha256:" + "a" * 64)
    grant = pyjwt.encode({"aud": PEER_GRANT_AUDIENCE, "use": PEER_GRANT_USE, "digest": str(digest), "node": "n1",
                          "exp": int(time.time()) + 600}, signing, algorithm="ES256", headers={"kid": "k"})
    started = time.perf_counter()
    for _ in range(count):
        verify_grant(grant, keys, digest=digest, node="n1", now=time.time())
    return round((time.perf_counter() - started) / count * 1e6, 1)


async def _decision_cost(root: Path, seed_url: str, token: str, count: int) -> dict[str, float]:
    """Microseconds per ``AccessGate.authorize`` for a cached grant and for an open namespace."""
    result: dict[str, float] = {}
    for variant in ("open", "offline"):
        config = load_config(_agent_toml(root, seed_url, variant, 999), listen="127.0.0.1:0",
                             data=root / f"gate-{variant}")
        authorization = [] if variant == "open" else [("Authorization", f"Bearer {token}")]
        async with trio.open_nursery() as nursery:
            agent: Agent = await nursery.start(partial(serve_agent, config))
            gate = agent.front.access
            request = Request("GET", "/", "/", {}, Headers(authorization), None, ("127.0.0.1", 1),  # type: ignore[arg-type]
                              "1.1")
            await gate.authorize(request, NS, REPO, manifest=False)  # learn: probe, keys, first verification
            started = time.perf_counter()
            for _ in range(count):
                await gate.authorize(request, NS, REPO, manifest=False)
            result[variant] = round((time.perf_counter() - started) / count * 1e6, 1)
            nursery.cancel_scope.cancel()
    return result


def _median(runs: list[dict[str, Any]], variant: str, key: str) -> float:
    return round(statistics.median(r[key] for r in runs if r["variant"] == variant), 4)


def _best(runs: list[dict[str, Any]], variant: str, key: str) -> float:
    return round(min(r[key] for r in runs if r["variant"] == variant), 4)


def render_section(report: dict[str, Any]) -> str:
    summary, params = report["summary"], report["parameters"]
    lines = [SECTION_TITLE, "",
             f"{report['date']}, `{report['command']}`. {report['machine']['nproc']} CPUs "
             f"({report['machine']['cpu_model']}), load before {report['load_before']}, busy cores before "
             f"{report['busy_cores_before']}. One image: a config and {params['layers']} random layers of "
             f"{params['layer_mib']} MiB, pulled the way containerd does by an in-process client through an "
             f"in-process agent; the seed (with access control) is a subprocess. Medians of {params['repeat']} "
             "runs (best run in brackets); cold = fresh agent and data directory, warm = the same agent "
             "again. On a machine that other work keeps busy, differences of some 10 % are noise: the best "
             "runs and the decision cost below are the steadier measures.", "",
             "| variant | cold pull | vs open | warm pull | vs open | checks per cold+warm pull |",
             "|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        row = summary[variant]
        lines.append(f"| {variant} | {row['cold_s']:.3f} s ({row['cold_best_s']:.3f}) | {row['cold_ratio']}{X} "
                     f"({row['cold_best_ratio']}{X}) | {row['warm_s']:.3f} s ({row['warm_best_s']:.3f}) | "
                     f"{row['warm_ratio']}{X} ({row['warm_best_ratio']}{X}) | {row['checks']} |")
    cost = report["decision_us"]
    lines += ["", f"One decision of the gate (`AccessGate.authorize`, answers cached): {cost['offline']} µs with a "
              f"verified token, {cost['open']} µs for an opened namespace. Goal: a checked pull within "
              f"{GOAL}{X} of an open one.", ""]
    swarm = report.get("swarm_summary")
    if swarm:
        lines += [f"**Swarm** ({params['swarm_nodes']} in-process nodes pulling at once over loopback, cold, "
                  f"medians of {params['repeat']}; best in brackets): peer TLS and client checks against plain "
                  "peers. Every variant fetches and checks peer grants (the seed has access control); one grant "
                  f"check costs {report['grant_check_us']} µs.", "",
                  "| variant | all nodes done | vs plain | process CPU per MiB received | grants fetched | "
                  "from peers |", "|---|---|---|---|---|---|"]
        for variant in SWARM_VARIANTS:
            row = swarm[variant]
            lines.append(f"| {variant} | {row['wall_s']:.3f} s ({row['wall_best_s']:.3f}) | {row['ratio']}{X} "
                         f"({row['best_ratio']}{X}) | {row['cpu_ms_per_mib']} ms | {row['grants']} | "
                         f"{row['peer_mib']} MiB |")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    report = report_header("p2pd_auth", args.argv)
    report["machine"] = machine_basics()
    report["load_before"] = loadavg()
    report["busy_cores_before"] = busy_cores(1.0)
    report["parameters"] = {"layers": args.layers, "layer_mib": args.layer_mib, "repeat": args.repeat,
                            "swarm_nodes": args.swarm_nodes}
    with tempfile.TemporaryDirectory(prefix="bench-p2pd-auth-") as tmp:
        root = Path(tmp)
        with SeedProcess(root / "seed-data", config_path=_seed_config(root)) as seed:
            blobs = _push(seed.url, args.layers, args.layer_mib)
            token = _token(seed.url)
            runs = trio.run(_measure, root, seed.url, token, blobs, args.repeat, log)
            report["decision_us"] = trio.run(_decision_cost, root, seed.url, token, args.decisions)
            swarm_runs = trio.run(_measure_swarm, root, seed.url, token, blobs, args.repeat, args.swarm_nodes, log)
    report["grant_check_us"] = _grant_check_cost(max(200, args.decisions // 10))
    swarm_summary: dict[str, Any] = {}
    for variant in SWARM_VARIANTS:
        mine = [r for r in swarm_runs if r["variant"] == variant]
        swarm_summary[variant] = {"wall_s": round(statistics.median(r["wall_s"] for r in mine), 4),
                                  "wall_best_s": round(min(r["wall_s"] for r in mine), 4),
                                  "cpu_ms_per_mib": round(statistics.median(r["cpu_ms_per_mib"] for r in mine), 1),
                                  "grants": mine[-1]["grants"], "peer_mib": mine[-1]["peer_mib"]}
    for variant in SWARM_VARIANTS:
        row = swarm_summary[variant]
        row["ratio"] = ratio(row["wall_s"], swarm_summary["plain"]["wall_s"])
        row["best_ratio"] = ratio(row["wall_best_s"], swarm_summary["plain"]["wall_best_s"])
    report["swarm_summary"], report["swarm_runs"] = swarm_summary, swarm_runs
    summary: dict[str, Any] = {}
    for variant in VARIANTS:
        last = [r for r in runs if r["variant"] == variant][-1]
        summary[variant] = {"cold_s": _median(runs, variant, "cold_s"), "warm_s": _median(runs, variant, "warm_s"),
                            "cold_best_s": _best(runs, variant, "cold_s"),
                            "warm_best_s": _best(runs, variant, "warm_s"),
                            "checks": ", ".join(f"{k} {int(v)}" for k, v in sorted(last["checks"].items())) or "none"}
    for variant in VARIANTS:
        summary[variant]["cold_ratio"] = ratio(summary[variant]["cold_s"], summary["open"]["cold_s"])
        summary[variant]["warm_ratio"] = ratio(summary[variant]["warm_s"], summary["open"]["warm_s"])
        summary[variant]["cold_best_ratio"] = ratio(summary[variant]["cold_best_s"], summary["open"]["cold_best_s"])
        summary[variant]["warm_best_ratio"] = ratio(summary[variant]["warm_best_s"], summary["open"]["warm_best_s"])
    report["summary"], report["runs"] = summary, runs
    return report


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--layer-mib", type=float, default=16.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--decisions", type=int, default=20000, help="gate decisions timed for the per-call cost")
    parser.add_argument("--swarm-nodes", type=int, default=3, help="agents in the swarm part")
    return run_and_publish(parser, argv, run, render_section, log, name="p2pd_auth", mark_start=MARK_START,
                           mark_end=MARK_END)


if __name__ == "__main__":
    raise SystemExit(main())
