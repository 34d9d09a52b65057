"""``make bench-signatures``: what the ``[[signatures]]`` pull policy adds to a manifest pull.

One run, loopback only, the seed as a real process (``python -m seed serve``, log level INFO: no
line per request):

1. A signing key made offline with Debian's ``gpg`` (ed25519); the seed trusts its armored public
   key for ``prod/**`` in enforce mode and has no rule for ``plain/**``.
2. The same small image is pushed to ``prod/app:v1`` and ``plain/app:v1``, each with the same kind
   of GPG simple-signing signature through the signature API extension (what ``skopeo copy
   --sign-by`` stores). ``--cold`` more images are pushed and signed the same way under each prefix.
3. Warm: ``--rounds`` rounds of ``--pulls`` ``GET /v2/<repo>/manifests/v1`` on one keep-alive
   connection, policy on (``prod/app``) and off (``plain/app``) in alternating order; latency is
   the client's wall time per request. The first pull of ``prod/app`` (outside the measurement)
   verified the signature with ``gpgv``; the rest reuse the cached checks after re-reading the
   few files their version depends on.
4. Cold: after a ``SIGHUP`` (a reload drops every cached check; a signature push would otherwise
   have verified it ahead of the pull), the first pull by tag of each of the ``--cold`` images,
   policy on and off: on includes one ``gpgv`` run per signature.

Goal: at most 5 ms added per manifest pull on a warm cache (mean and p50 of on minus off).

Writes the section between ``<!-- bench-signatures:start -->`` and ``<!-- bench-signatures:end -->``
of ``--out`` and the raw numbers as JSON (default ``docs/bench/signatures.json`` next to it).

    python -m tests.bench.signatures --out docs/benchmarks.md [--pulls 500] [--rounds 6] [--cold 20]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.bench import common
from tests.bench.common import BenchError, loadavg, machine_basics, report_header, tool_version
from tests.harness.gpg import GpgHome
from tests.harness.images import make_tar_layer
from tests.harness.seed_process import SeedProcess

MARK_START = "<!-- bench-signatures:start -->"
MARK_END = "<!-- bench-signatures:end -->"
SECTION_TITLE = "## Signature policy: manifest pull latency, policy on vs off (make bench-signatures)"
GOAL_MS = 5.0
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def _print(message: str) -> None:
    print(message, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.signatures", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the Markdown file to update")
    parser.add_argument("--json", type=Path, help="raw results (default: bench/signatures.json next to --out)")
    parser.add_argument("--pulls", type=int, default=500, help="warm pulls per repository and round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of on/off in alternating order")
    parser.add_argument("--cold", type=int, default=20, help="images pulled once each, policy on and off")
    return parser


def _digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def _push_blob(client: httpx.Client, repo: str, data: bytes) -> None:
    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": _digest(data)}, content=data)
    if r.status_code != 201:
        raise BenchError(f"blob push to {repo} failed: {r.status_code} {r.text[:200]}")


def _push_signed(client: httpx.Client, key: GpgHome, host: str, repo: str, n: int) -> str:
    """Pushes a small image as ``repo:v1`` and a GPG signature of it; returns its digest."""
    layer = make_tar_layer({"etc/motd": f"image {n}\n".encode()}, compress=True)
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": n,
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    for blob in (layer, config):
        _push_blob(client, repo, blob)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": _digest(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                       "digest": _digest(layer), "size": len(layer)}]}).encode()
    r = client.put(f"/v2/{repo}/manifests/v1", content=manifest, headers={"Content-Type": MANIFEST_TYPE})
    if r.status_code != 201:
        raise BenchError(f"manifest push to {repo} failed: {r.status_code} {r.text[:200]}")
    digest = _digest(manifest)
    claims = {"critical": {"identity": {"docker-reference": f"{host}/{repo}:v1"},
                           "image": {"docker-manifest-digest": digest}, "type": "atomic container signature"},
              "optional": {"creator": "bench"}}
    body = {"schemaVersion": 2, "name": f"{digest}@{n:032x}", "type": "atomic",
            "content": base64.b64encode(key.sign(json.dumps(claims).encode())).decode()}
    r = client.put(f"/extensions/v2/{repo}/signatures/{digest}", json=body)
    if r.status_code != 201:
        raise BenchError(f"signature push to {repo} failed: {r.status_code} {r.text[:200]}")
    return digest


def _pull_ms(client: httpx.Client, repo: str) -> float:
    started = time.perf_counter()
    r = client.get(f"/v2/{repo}/manifests/v1", headers={"Accept": MANIFEST_TYPE})
    elapsed = (time.perf_counter() - started) * 1000
    if r.status_code != 200:
        raise BenchError(f"pull of {repo}:v1 answered {r.status_code}: {r.text[:300]}")
    return elapsed


def _reload(seed: SeedProcess) -> None:
    """SIGHUP, and wait (bounded) until the seed says it reloaded its configuration."""
    before = seed.log_text().count("configuration reloaded")
    assert seed.proc is not None
    seed.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while seed.log_text().count("configuration reloaded") == before:
        if time.monotonic() > deadline:
            raise BenchError("the seed did not reload its configuration within 20 s")
        time.sleep(0.05)


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"n": len(ordered), "mean_ms": round(statistics.fmean(ordered), 3),
            "p50_ms": round(ordered[len(ordered) // 2], 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
            "max_ms": round(ordered[-1], 3)}


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    report = report_header("signatures", sys.argv[1:] if args.argv is None else args.argv)
    report["machine"] = machine_basics()
    report["gpgv"] = tool_version(["gpgv", "--version"])
    report["params"] = {"pulls": args.pulls, "rounds": args.rounds, "cold": args.cold}
    report["loadavg_start"] = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench-signatures-") as tmp, GpgHome() as key:
        base = Path(tmp)
        key.export_public(base / "release.asc")
        (base / "seed.toml").write_text('[scan]\nenabled = false\n\n[[signatures]]\nrepositories = ["prod/**"]\n'
                                        'keys = ["release.asc"]\nmode = "enforce"\n')
        with SeedProcess(base / "data", config_path=base / "seed.toml", log_level="INFO") as seed, \
                httpx.Client(base_url=seed.url, trust_env=False, timeout=30) as client:
            log(f"seed on {seed.url}; pushing {2 + 2 * args.cold} signed images")
            for prefix in ("prod", "plain"):
                _push_signed(client, key, seed.host, f"{prefix}/app", 0)
                for n in range(args.cold):
                    _push_signed(client, key, seed.host, f"{prefix}/cold-{n}", n + 1)
            _reload(seed)
            cold: dict[str, list[float]] = {"on": [], "off": []}
            for n in range(args.cold):
                for side in (["on", "off"] if n % 2 == 0 else ["off", "on"]):
                    cold[side].append(_pull_ms(client, f"{'prod' if side == 'on' else 'plain'}/cold-{n}"))
            verdict = client.get("/extensions/v2/prod/app/verdict/v1").json()
            if verdict.get("verdict") != "allowed":
                raise BenchError(f"prod/app:v1 is not allowed: {verdict}")
            for repo in ("prod/app", "plain/app"):  # the first pull verifies (on) or finds no rule (off)
                _pull_ms(client, repo)
            warm: dict[str, list[float]] = {"on": [], "off": []}
            for round_index in range(args.rounds):
                order = ["on", "off"] if round_index % 2 == 0 else ["off", "on"]
                for side in order:
                    repo = "prod/app" if side == "on" else "plain/app"
                    warm[side] += [_pull_ms(client, repo) for _ in range(args.pulls)]
    report["loadavg_end"] = loadavg()
    report["warm"] = {side: _stats(samples) for side, samples in warm.items()}
    report["cold"] = {side: _stats(samples) for side, samples in cold.items()} if args.cold else {}
    added = {metric: round(report["warm"]["on"][metric] - report["warm"]["off"][metric], 3)
             for metric in ("mean_ms", "p50_ms", "p99_ms")}
    report["warm_added"] = added
    report["goal_met"] = added["mean_ms"] <= GOAL_MS and added["p50_ms"] <= GOAL_MS
    return report


def render_section(report: dict[str, Any]) -> str:
    machine = report["machine"]
    warm, added = report["warm"], report["warm_added"]
    lines = [
        SECTION_TITLE, "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}` (`make bench-signatures`)",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['mem_gib']} GiB RAM, "
        f"Linux {machine['kernel']}, Python {machine['python']}; {report['gpgv']}",
        f"- Machine load: loadavg {' '.join(map(str, report['loadavg_start']))} at start, "
        f"{' '.join(map(str, report['loadavg_end']))} at end",
        "",
        "`GET /v2/<repo>/manifests/v1` on one keep-alive connection, from Python (httpx), latency = the "
        "client's wall time. On: `prod/app` under an enforcing `[[signatures]]` rule with one GPG "
        "signature (verified by `gpgv` at its first pull, outside the measurement). Off: `plain/app`, the "
        "same kind of image and signature without a rule.",
        "",
        "| Pulls | n | mean ms | p50 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, key, stats in (("warm, policy on", "on", warm), ("warm, policy off", "off", warm)):
        s = stats[key]
        lines.append(f"| {label} | {s['n']} | {s['mean_ms']} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} |")
    for label, key in (("cold (first pull), policy on", "on"), ("cold (first pull), policy off", "off")):
        if report["cold"]:
            s = report["cold"][key]
            lines.append(f"| {label} | {s['n']} | {s['mean_ms']} | {s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} |")
    verdict = "met" if report["goal_met"] else "NOT met"
    lines += [
        "",
        f"Added by the policy on a warm cache: **{added['mean_ms']} ms** mean, {added['p50_ms']} ms p50, "
        f"{added['p99_ms']} ms p99. Goal (at most {GOAL_MS:g} ms per manifest): **{verdict}**.",
        "",
        "A warm pull re-reads what the cached checks depend on (the signature directory, the cosign "
        "`.sig` tag, the referrers) and compares the signed reference with the tag; a cold pull also runs "
        "`gpgv` once per signature.",
        "",
        f"Raw numbers: [`bench/signatures.json`]({report['json_link']}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = _print) -> int:
    args = _parser().parse_args(argv)
    args.argv = argv
    if args.pulls < 1 or args.rounds < 1 or args.cold < 0:
        log("--pulls and --rounds must be at least 1, --cold at least 0")
        return 2
    try:
        report = run(args, log)
    except BenchError as exc:
        log(f"bench-signatures failed: {exc}")
        return 1
    json_path = args.json or args.out.parent / "bench" / "signatures.json"
    report["json_link"] = os.path.relpath(json_path.resolve(), args.out.resolve().parent)
    section = render_section(report)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    common.update_doc(args.out, section, MARK_START, MARK_END)
    log(section)
    log(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
