"""``make bench-seed``: blob GET throughput of the seed vs Debian's ``docker-registry``.

One run, same machine, same random blobs, same load generator (``curl`` processes), loopback only:

1. Start the seed (``os.sendfile``), the seed with ``[server] use_sendfile = false`` (pread + send,
   to measure what sendfile buys) and the reference CNCF distribution registry, each on its own
   free 127.0.0.1 port with its own temporary data directory.
2. Push the same random blobs to each (POST + monolithic PUT ``?digest=``, streamed from a file)
   plus a small OCI manifest referencing them, under the same repository name.
3. Warm the page cache with one verified GET of every blob (size and sha256 checked), so the
   disk is not measured.
4. Single client: one ``curl`` fetching the big blob, repeated, servers in alternating order;
   throughput = bytes / curl's ``time_total``, median over repetitions.
5. Concurrent: ``--clients`` ``curl`` processes, each fetching the whole concurrent blob. They
   are all spawned first, blocked reading their URL from stdin (``--config -``), then released
   together, so process start-up is not measured; aggregate = total bytes / wall time from the
   release to the last exit, plus each client's ``time_total`` (p50, max). Repeated in
   alternating order.

For every measurement the server's CPU time (``/proc/PID/stat`` utime+stime), its peak RSS
(``VmHWM``, reset through ``/proc/PID/clear_refs`` before each measurement), the CPU used by the
curl clients, and the CPU used by everything else on the machine (other work competing for the
cores) are recorded.

Writes the section between ``<!-- bench-seed:start -->`` and ``<!-- bench-seed:end -->`` of the
Markdown file given by ``--out`` (other sections are kept) and the raw numbers as JSON
(default ``docs/bench/seed_throughput.json`` next to it); prints the table to stdout.

    python -m tests.bench.seed_throughput --out docs/benchmarks.md [--blob-mib 256] ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from tests.bench import common
from tests.bench.common import (
    DASH,
    MIB,
    BenchError,
    Meter,
    X,
    busy_cores,
    find_tool,
    load_report,
    loadavg,
    machine_basics,
    ratio,
    report_header,
    tool_version,
)
from tests.harness.net import assert_loopback, free_port, wait_http_ok
from tests.harness.reference_registry import ReferenceRegistry
from tests.harness.tools import clean_env, start_process, stop_process, tail

REPO = "bench/throughput"
TAG = "bench"
MARK_START = "<!-- bench-seed:start -->"
MARK_END = "<!-- bench-seed:end -->"
SECTION_TITLE = "## Seed blob throughput (make bench-seed)"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
CURL_FORMAT = "%{http_code} %{size_download} %{time_total} %{time_starttransfer}\\n"
_START_ATTEMPTS = 3
_BARRIER_SETTLE_S = 0.3  # lets every spawned curl reach its read of stdin


# ---- servers ----------------------------------------------------------------------------


@dataclass
class Target:
    key: str
    label: str
    url: str
    pid: int
    version: str
    # Request headers of every load-generator request (e.g. a bearer token), and the
    # credentials of the push and warm-up client.
    headers: tuple[str, ...] = ()
    auth: tuple[str, str] | None = None
    ca_file: Path | None = None  # HTTPS: the CA curl and the push client trust
    single: list[dict[str, Any]] = field(default_factory=list)
    concurrent: list[dict[str, Any]] = field(default_factory=list)


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


AUTH_USER = ("bench", "bench-password-1")


def auth_config(workdir: Path) -> str:
    """``[auth]`` with one htpasswd user (made by Debian's ``htpasswd -B``, its default bcrypt
    cost) allowed to push the bench repository; tokens live an hour so none expires mid-run."""
    htpasswd = workdir / "htpasswd"
    subprocess.run([find_tool("htpasswd"), "-bBc", str(htpasswd), *AUTH_USER], check=True, capture_output=True,
                   timeout=30)
    return (f'\n[auth]\nhtpasswd = "{htpasswd}"\nservice = "bench"\n\n[auth.token]\nexpiry = 3600\n\n'
            f'[auth.throttle]\nmax_failures_per_user = 1000\n\n'
            f'[[access]]\nrepositories = ["{REPO}"]\nusers = ["{AUTH_USER[0]}"]\nrole = "push"\n')


def tls_config(workdir: Path) -> tuple[str, Path]:
    """``[tls]`` with a certificate for 127.0.0.1 from a fresh test CA; returns (TOML, CA file)."""
    from tests.harness.certs import make_ca

    ca = make_ca(workdir / "pki", "bench")
    issued = ca.issue("seed")
    return f'\n[tls]\ncert_file = "{issued.cert_file}"\nkey_file = "{issued.key_file}"\n', ca.cert_file


def start_seed(workdir: Path, *, use_sendfile: bool, auth: bool = False, tls: bool = False,
               startup_timeout: float = 20.0) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m seed serve`` on a free loopback port with ``workdir/data``; returns (proc, url).

    ``auth``: with access control (see ``auth_config``); ``tls``: HTTPS (see ``tls_config``;
    the CA is ``workdir/pki/bench-ca.crt``).
    """
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = workdir / "seed.toml"
    tls_toml, ca_file = tls_config(workdir) if tls else ("", None)
    config.write_text(f"[server]\nuse_sendfile = {'true' if use_sendfile else 'false'}\n"
                      + (auth_config(workdir) if auth else "") + tls_toml)
    log_path = workdir / "seed.log"
    last = ""
    for _ in range(_START_ATTEMPTS):  # free_port() can race with other processes
        url = f"{'https' if tls else 'http'}://127.0.0.1:{free_port()}"
        proc = start_process([sys.executable, "-m", "seed", "--log-level", "WARNING", "serve",
                              "--listen", url.split("://", 1)[1], "--data", data, "--config", config],
                             log_path=log_path)
        try:
            wait_http_ok(f"{url}/healthz", startup_timeout, alive=partial(_alive, proc),
                         verify=ssl.create_default_context(cafile=str(ca_file)) if ca_file else True)
            return proc, url
        except (TimeoutError, RuntimeError) as exc:
            last = str(exc)
            stop_process(proc)
            if "address already in use" not in tail(log_path).lower():
                break
    raise BenchError(f"seed did not start: {last}\n--- {log_path}:\n{tail(log_path)}")


# ---- push and verify --------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    path: Path
    digest: str
    size: int


def make_blob(path: Path, mib: int) -> Blob:
    """``mib`` MiB of random (incompressible) bytes, written in 1 MiB pieces."""
    sha = hashlib.sha256()
    with path.open("wb") as out:
        for _ in range(mib):
            piece = os.urandom(MIB)
            out.write(piece)
            sha.update(piece)
    return Blob(path, f"sha256:{sha.hexdigest()}", mib * MIB)


def _file_pieces(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        while piece := source.read(MIB):
            yield piece


def push_blob(client: httpx.Client, base: str, digest: str, size: int, content: bytes | Iterator[bytes]) -> None:
    """POST an upload session, then finish it with one PUT ?digest= carrying the whole body."""
    started = client.post(f"{base}/v2/{REPO}/blobs/uploads/")
    if started.status_code != 202 or "location" not in started.headers:
        raise BenchError(f"{base}: POST upload -> {started.status_code} {started.text[:300]}")
    location = httpx.URL(base).join(started.headers["location"]).copy_merge_params({"digest": digest})
    assert_loopback(str(location))
    done = client.put(location, content=content,
                      headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    if done.status_code != 201:
        raise BenchError(f"{base}: PUT upload -> {done.status_code} {done.text[:300]}")
    head = client.head(f"{base}/v2/{REPO}/blobs/{digest}")
    if head.status_code != 200 or head.headers.get("content-length") != str(size):
        raise BenchError(f"{base}: HEAD blob after push -> {head.status_code} {dict(head.headers)}")


def push_image(client: httpx.Client, base: str, blobs: list[Blob]) -> str:
    """Pushes ``blobs`` as layers of a small OCI image tagged ``TAG``; returns the manifest digest."""
    for blob in blobs:
        push_blob(client, base, blob.digest, blob.size, _file_pieces(blob.path))
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [b.digest for b in blobs]}}).encode()
    config_digest = f"sha256:{hashlib.sha256(config).hexdigest()}"
    push_blob(client, base, config_digest, len(config), config)
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER, "digest": b.digest, "size": b.size} for b in blobs],
    }).encode()
    put = client.put(f"{base}/v2/{REPO}/manifests/{TAG}", content=manifest, headers={"Content-Type": OCI_MANIFEST})
    if put.status_code != 201:
        raise BenchError(f"{base}: PUT manifest -> {put.status_code} {put.text[:300]}")
    return f"sha256:{hashlib.sha256(manifest).hexdigest()}"


def verified_get(client: httpx.Client, url: str, blob: Blob) -> float:
    """GETs the blob, checking status, length and sha256 (also warms the page cache); returns seconds."""
    sha = hashlib.sha256()
    size = 0
    started = time.perf_counter()
    with client.stream("GET", url) as response:
        if response.status_code != 200:
            raise BenchError(f"GET {url} -> {response.status_code}")
        for piece in response.iter_raw(MIB):
            sha.update(piece)
            size += len(piece)
    if size != blob.size or f"sha256:{sha.hexdigest()}" != blob.digest:
        raise BenchError(f"GET {url}: got {size} bytes sha256:{sha.hexdigest()}, expected {blob.size} {blob.digest}")
    return time.perf_counter() - started


# ---- load generation ----------------------------------------------------------------------


def curl_argv(curl: str, url: str | None, max_time: float, headers: tuple[str, ...] = (),
              ca_file: Path | None = None) -> list[str]:
    """One blob download to /dev/null; ``url=None``: curl reads the URL from stdin (a start barrier)."""
    return [curl, "--silent", "--show-error", "--noproxy", "*", "--output", "/dev/null",
            "--max-time", f"{max_time:g}", "--write-out", CURL_FORMAT,
            *[arg for header in headers for arg in ("--header", header)],
            *(["--cacert", str(ca_file)] if ca_file is not None else []),
            *([url] if url is not None else ["--config", "-"])]


def parse_curl(out: bytes, err: bytes, returncode: int, expected_size: int, url: str) -> dict[str, float]:
    try:
        code, size, total, first_byte = out.decode().split()
    except ValueError:
        raise BenchError(f"curl {url}: exit {returncode}, output {out[:200]!r} {err[:300]!r}") from None
    if returncode != 0 or code != "200" or int(size) != expected_size:
        raise BenchError(f"curl {url}: exit {returncode}, HTTP {code}, {size} of {expected_size} bytes; {err[:300]!r}")
    return {"bytes": int(size), "time_total_s": float(total), "ttfb_s": float(first_byte)}


def single_client(curl: str, target: Target, blob: Blob, max_time: float) -> dict[str, Any]:
    url = f"{target.url}/v2/{REPO}/blobs/{blob.digest}"
    meter = Meter(target.pid)
    proc = subprocess.run(curl_argv(curl, url, max_time, target.headers, target.ca_file), capture_output=True,
                          timeout=max_time + 10, env=clean_env(), stdin=subprocess.DEVNULL, check=False)
    usage = meter.finish()
    result = parse_curl(proc.stdout, proc.stderr, proc.returncode, blob.size, url)
    result["mib_s"] = round(blob.size / MIB / result["time_total_s"], 1)
    return {**result, **usage}


def concurrent_clients(curl: str, target: Target, blob: Blob, clients: int, max_time: float) -> dict[str, Any]:
    url = f"{target.url}/v2/{REPO}/blobs/{blob.digest}"
    argv = curl_argv(curl, None, max_time, target.headers, target.ca_file)
    config = f'url = "{url}"\n'.encode()
    env = clean_env()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Spawning 64 processes takes longer than the transfers: start them all first, each
        # blocked reading its URL from stdin, then release them together.
        spawn_started = time.perf_counter()
        for _ in range(clients):
            procs.append(subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, env=env))
        spawned = time.perf_counter() - spawn_started
        time.sleep(_BARRIER_SETTLE_S)
        meter = Meter(target.pid)
        started = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(config)
            proc.stdin.close()
            proc.stdin = None  # communicate() must not flush it again
        released = time.perf_counter() - started
        outputs = [proc.communicate(timeout=max_time + 10) for proc in procs]
        wall = time.perf_counter() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    usage = meter.finish()
    per_client = [parse_curl(out, err, proc.returncode, blob.size, url)
                  for proc, (out, err) in zip(procs, outputs, strict=True)]
    times = sorted(c["time_total_s"] for c in per_client)
    total_bytes = sum(c["bytes"] for c in per_client)
    return {
        "clients": clients,
        "bytes": total_bytes,
        "wall_s": round(wall, 4),
        "spawn_s": round(spawned, 4),  # not part of wall_s (start barrier)
        "release_s": round(released, 4),
        "aggregate_mib_s": round(total_bytes / MIB / wall, 1),
        "client_p50_s": round(statistics.median(times), 4),
        "client_max_s": round(times[-1], 4),
        "client_min_s": round(times[0], 4),
        "client_ttfb_max_s": round(max(c["ttfb_s"] for c in per_client), 4),
        **{k: v for k, v in usage.items() if k != "wall_s"},
    }


def token_latency(url: str, requests: int) -> dict[str, Any]:
    """``requests`` sequential ``GET /token`` with Basic credentials on one keep-alive
    connection, as docker/skopeo/podman log in: bcrypt check, policy, ES256 signature."""
    times: list[float] = []
    params = {"service": "bench", "scope": f"repository:{REPO}:pull"}
    with httpx.Client(trust_env=False, timeout=30, auth=AUTH_USER) as client:
        for _ in range(requests):
            started = time.perf_counter()
            response = client.get(f"{url}/token", params=params)
            times.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise BenchError(f"GET /token -> {response.status_code} {response.text[:200]}")
    times.sort()
    return {"requests": requests, "p50_ms": round(statistics.median(times) * 1000, 2),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 2),
            "max_ms": round(times[-1] * 1000, 2)}


def bearer_token(url: str) -> str:
    with httpx.Client(trust_env=False, timeout=30, auth=AUTH_USER) as client:
        response = client.get(f"{url}/token", params={"service": "bench", "scope": f"repository:{REPO}:pull,push"})
    if response.status_code != 200:
        raise BenchError(f"GET /token -> {response.status_code} {response.text[:200]}")
    return str(response.json()["token"])


# ---- summary and report -----------------------------------------------------------------


def summarize(target: Target) -> dict[str, Any]:
    single = [r["mib_s"] for r in target.single]
    conc = [r["aggregate_mib_s"] for r in target.concurrent]
    client_times = [r["client_p50_s"] for r in target.concurrent]
    peaks = [r["server_peak_rss_kib"] for r in target.single + target.concurrent if r["server_peak_rss_kib"]]
    single_bytes = sum(r["bytes"] for r in target.single)
    conc_bytes = sum(r["bytes"] for r in target.concurrent)
    single_cpu = sum(r["server_cpu_s"] for r in target.single)
    conc_cpu = sum(r["server_cpu_s"] for r in target.concurrent)
    return {
        "single_mib_s_median": round(statistics.median(single), 1),
        "single_mib_s_min": min(single),
        "single_mib_s_max": max(single),
        "single_runs": len(single),
        "concurrent_mib_s_median": round(statistics.median(conc), 1),
        "concurrent_mib_s_min": min(conc),
        "concurrent_mib_s_max": max(conc),
        "concurrent_runs": len(conc),
        # p50 of the runs' per-client medians; max over every client of every run.
        "client_p50_s": round(statistics.median(client_times), 3),
        "client_max_s": round(max(r["client_max_s"] for r in target.concurrent), 3),
        "single_server_cpu_s": round(single_cpu, 2),
        "concurrent_server_cpu_s": round(conc_cpu, 2),
        "server_cpu_s_per_gib": round((single_cpu + conc_cpu) / max((single_bytes + conc_bytes) / 1024**3, 1e-9), 3),
        "concurrent_client_cpu_s": round(sum(r["client_cpu_s"] for r in target.concurrent), 2),
        "server_peak_rss_mib": round(max(peaks) / 1024, 1) if peaks else None,
    }


def render_table(targets: list[Target], summary: dict[str, dict[str, Any]], ref_key: str,
                 params: dict[str, Any]) -> str:
    clients = params["clients"]
    head = ["Server",
            f"1 client MiB/s (median of {params['single_reps_done']}, min{DASH}max)",
            f"{clients} clients aggregate MiB/s (median of {params['concurrent_reps_done']}, min{DASH}max)",
            "client p50 s", "client max s",
            "server CPU s (1 client, all runs)", f"server CPU s ({clients} clients, all runs)",
            "server CPU s/GiB", "server peak RSS MiB"]
    rows = [head, ["---"] * len(head)]
    for t in targets:
        s = summary[t.key]
        rows.append([t.label,
                     f"{s['single_mib_s_median']:.0f} ({s['single_mib_s_min']:.0f}{DASH}{s['single_mib_s_max']:.0f})",
                     f"{s['concurrent_mib_s_median']:.0f} "
                     f"({s['concurrent_mib_s_min']:.0f}{DASH}{s['concurrent_mib_s_max']:.0f})",
                     f"{s['client_p50_s']:.2f}", f"{s['client_max_s']:.2f}",
                     f"{s['single_server_cpu_s']:.2f}", f"{s['concurrent_server_cpu_s']:.2f}",
                     f"{s['server_cpu_s_per_gib']:.3f}",
                     "?" if s["server_peak_rss_mib"] is None else f"{s['server_peak_rss_mib']:.0f}"])
    ref = summary[ref_key]
    for t in targets:
        if t.key == ref_key:
            continue
        s = summary[t.key]
        rows.append([f"**ratio {t.label} / {summary[ref_key]['label']}**",
                     f"**{ratio(s['single_mib_s_median'], ref['single_mib_s_median']):.2f}{X}**",
                     f"**{ratio(s['concurrent_mib_s_median'], ref['concurrent_mib_s_median']):.2f}{X}**",
                     f"{ratio(s['client_p50_s'], ref['client_p50_s']):.2f}{X}",
                     f"{ratio(s['client_max_s'], ref['client_max_s']):.2f}{X}",
                     f"{ratio(s['single_server_cpu_s'], ref['single_server_cpu_s']):.2f}{X}",
                     f"{ratio(s['concurrent_server_cpu_s'], ref['concurrent_server_cpu_s']):.2f}{X}",
                     f"{ratio(s['server_cpu_s_per_gib'], ref['server_cpu_s_per_gib']):.2f}{X}",
                     "" if s["server_peak_rss_mib"] is None or not ref["server_peak_rss_mib"]
                     else f"{ratio(s['server_peak_rss_mib'], ref['server_peak_rss_mib']):.2f}{X}"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def render_section(report: dict[str, Any], table: str) -> str:
    m, p, load = report["machine"], report["params"], report["load"]
    seed, ref = report["summary"]["seed"], report["summary"]["docker-registry"]
    single_ratio = report["ratios"]["seed_vs_reference_single"]
    conc_ratio = report["ratios"]["seed_vs_reference_concurrent"]
    verdict = "met" if min(single_ratio, conc_ratio) >= 1.0 else "NOT met"
    lines = [
        SECTION_TITLE,
        "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}` (`make bench-seed`)",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}",
        f"- Servers: seed {m['seed_version']} (this tree; trio + h11), {m['reference_version']}; "
        f"load generator {m['curl_version']}",
        f"- Blobs: {p['blob_mib']} MiB random blob for the single client; {p['concurrent_mib']} MiB random blob "
        f"fetched whole by each of {p['clients']} concurrent `curl` processes "
        f"({p['clients'] * p['concurrent_mib']} MiB per run). Same blobs, pushed to every server under "
        f"`{REPO}` with a small OCI manifest; page cache warmed with one verified GET each.",
        f"- Order alternates between repetitions; loopback only. Machine load: loadavg "
        f"{' '.join(map(str, load['loadavg_start']))} at start, {' '.join(map(str, load['loadavg_end']))} at end; "
        f"{load['busy_cores_before']} of {m['nproc']} cores busy with other work just before the run; "
        f"other work used {load['other_cpu_share']:.0%} of the machine's CPU during the measurements.",
        "",
        table,
        "",
        "Ratio rows: for throughput higher is better; for client times, CPU and RSS lower is better.",
        "",
        f"Goal (seed ≥ 1.0{X} docker-registry): **{verdict}** — single client {single_ratio:.2f}{X}, "
        f"{p['clients']} clients {conc_ratio:.2f}{X}. `os.sendfile` vs pread+send in the seed: "
        f"{report['ratios']['sendfile_vs_pread_single']:.2f}{X} single, "
        f"{report['ratios']['sendfile_vs_pread_concurrent']:.2f}{X} concurrent.",
        "",
        f"On {m['nproc']} cores the clients compete with the server for CPU: the {p['clients']} curl processes "
        f"used {seed['concurrent_client_cpu_s']:.1f} s (seed runs) and {ref['concurrent_client_cpu_s']:.1f} s "
        "(docker-registry runs) of CPU, so the concurrent numbers measure the whole loopback system, "
        "not the server alone. Client times are curl's `time_total`; aggregate = all bytes / wall time from "
        "the moment all (already spawned) curls are released to the last one finished. "
        "Peak RSS is `VmHWM`, reset before each measurement.",
        "",
        *_auth_lines(report),
        "",
        f"Raw numbers: [`{report['json_link']}`]({report['json_link']}).",
    ]
    if report["params"].get("truncated"):
        lines += ["", f"**Run cut short by the time budget**: {report['params']['truncated']}"]
    return "\n".join(lines) + "\n"


def _auth_lines(report: dict[str, Any]) -> list[str]:
    tokens, ratios = report["token_latency"], report["ratios"]
    single, conc = ratios["authorized_vs_anonymous_single"], ratios["authorized_vs_anonymous_concurrent"]
    slower = max(1 - single, 1 - conc)
    verdict = "met" if slower <= 0.05 else "NOT met"
    return [
        "",
        "**Access control.** `seed (access control, bearer token)` is the same seed with `[auth]`: every "
        "blob GET carries `Authorization: Bearer` (an ES256 token from `/token`), which the seed verifies "
        "(signature, expiry, audience) and intersects with the `[[access]]` rules before it sends a byte. "
        f"Authorized vs anonymous throughput: {single:.2f}{X} single client, {conc:.2f}{X} "
        f"{report['params']['clients']} clients — goal ≤ 5% slower: **{verdict}**.",
        f"Token issue latency (`GET /token` with Basic credentials, {tokens['requests']} sequential requests on "
        f"one connection; bcrypt at `htpasswd -B`'s default cost, policy, ES256 signature): "
        f"p50 **{tokens['p50_ms']} ms**, p99 **{tokens['p99_ms']} ms**, max {tokens['max_ms']} ms.",
        "",
        f"**HTTPS.** `seed (HTTPS)` serves the same blobs with `[tls]` (ECDSA P-256 certificate, TLS 1.3 "
        "with curl): file bodies are read and encrypted in the process instead of `os.sendfile`. "
        f"HTTPS vs HTTP: {ratios['https_vs_http_single']:.2f}{X} single client, "
        f"{ratios['https_vs_http_concurrent']:.2f}{X} {report['params']['clients']} clients; compare the "
        "`use_sendfile = false` row, which pays the same copy without the encryption.",
    ]


def update_doc(path: Path, section: str) -> None:
    """Replaces the marked section of ``path`` (appends it if absent; creates the file if missing)."""
    common.update_doc(path, section, MARK_START, MARK_END)


def machine_info(reference_binary: str, curl: str) -> dict[str, Any]:
    return {
        **machine_basics(),
        "reference_version": tool_version([reference_binary, "--version"]),
        "curl_version": " ".join(tool_version([curl, "--version"]).split()[:2]),
    }


# ---- main -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.seed_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="Markdown file to update")
    parser.add_argument("--json", type=Path, help="raw results (default: OUT's dir/bench/seed_throughput.json)")
    parser.add_argument("--blob-mib", type=int, default=256, help="blob size for the single-client runs")
    parser.add_argument("--concurrent-mib", type=int, default=64, help="blob size each concurrent client fetches")
    parser.add_argument("--clients", type=int, default=64, help="concurrent curl processes")
    parser.add_argument("--single-reps", type=int, default=11, help="single-client repetitions per server")
    parser.add_argument("--concurrent-reps", type=int, default=5, help="concurrent repetitions per server")
    parser.add_argument("--no-pread-variant", action="store_true",
                        help="skip the seed with use_sendfile = false")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="stop repeating (after at least one full round) once this much time has passed")
    parser.add_argument("--max-time", type=float, default=60.0, help="curl --max-time per transfer")
    parser.add_argument("--token-requests", type=int, default=500, help="sequential GET /token for the latency")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.monotonic()
    curl = find_tool("curl")
    reference_binary = find_tool("docker-registry")
    load_start = loadavg()
    busy_before = busy_cores(1.0)
    root = Path(tempfile.mkdtemp(prefix="bench-seed-"))
    procs: list[subprocess.Popen[bytes]] = []
    reference: ReferenceRegistry | None = None
    try:
        print(f"generating blobs ({args.blob_mib} MiB + {args.concurrent_mib} MiB) in {root}", flush=True)
        big = make_blob(root / "big.blob", args.blob_mib)
        small = big if args.concurrent_mib == args.blob_mib else make_blob(root / "small.blob", args.concurrent_mib)
        blobs = [big] if small is big else [big, small]

        targets: list[Target] = []
        seed_proc, seed_url = start_seed(root / "seed", use_sendfile=True)
        procs.append(seed_proc)
        targets.append(Target("seed", "seed (sendfile)", seed_url, seed_proc.pid, "this tree"))
        if not args.no_pread_variant:
            pread_proc, pread_url = start_seed(root / "seed-pread", use_sendfile=False)
            procs.append(pread_proc)
            targets.append(Target("seed-pread", "seed (use_sendfile = false)", pread_url, pread_proc.pid,
                                  "this tree"))
        auth_proc, auth_url = start_seed(root / "seed-auth", use_sendfile=True, auth=True)
        procs.append(auth_proc)
        targets.append(Target("seed-auth", "seed (access control, bearer token)", auth_url, auth_proc.pid,
                              "this tree", headers=(f"Authorization: Bearer {bearer_token(auth_url)}",),
                              auth=AUTH_USER))
        tls_proc, tls_url = start_seed(root / "seed-tls", use_sendfile=True, tls=True)
        procs.append(tls_proc)
        targets.append(Target("seed-https", "seed (HTTPS)", tls_url, tls_proc.pid, "this tree",
                              ca_file=root / "seed-tls" / "pki" / "bench-ca.crt"))
        reference = ReferenceRegistry(root / "reference").start()
        assert reference.proc is not None
        targets.append(Target("docker-registry", "docker-registry", reference.url, reference.proc.pid,
                              tool_version([reference_binary, "--version"])))

        for t in targets:
            assert_loopback(t.url)
            verify = ssl.create_default_context(cafile=str(t.ca_file)) if t.ca_file is not None else True
            with httpx.Client(trust_env=False, timeout=httpx.Timeout(120.0, connect=10.0), auth=t.auth,
                              verify=verify) as client:
                pushed = time.perf_counter()
                push_image(client, t.url, blobs)
                print(f"pushed to {t.label} at {t.url} in {time.perf_counter() - pushed:.1f} s", flush=True)
                for blob in blobs:
                    seconds = verified_get(client, f"{t.url}/v2/{REPO}/blobs/{blob.digest}", blob)
                    print(f"verified {blob.size // MIB} MiB from {t.label} in {seconds:.2f} s (warm-up)", flush=True)

        truncated: list[str] = []
        single_done = 0
        for rep in range(args.single_reps):
            if rep and time.monotonic() - began > args.budget_s * 0.5:
                truncated.append(f"single-client phase stopped after {rep} of {args.single_reps} rounds")
                break
            for t in (targets if rep % 2 == 0 else targets[::-1]):
                t.single.append(single_client(curl, t, big, args.max_time))
                print(f"single #{rep + 1} {t.label}: {t.single[-1]['mib_s']:.0f} MiB/s", flush=True)
            single_done += 1
        conc_done = 0
        for rep in range(args.concurrent_reps):
            if rep and time.monotonic() - began > args.budget_s:
                truncated.append(f"concurrent phase stopped after {rep} of {args.concurrent_reps} rounds")
                break
            for t in (targets if rep % 2 == 0 else targets[::-1]):
                t.concurrent.append(concurrent_clients(curl, t, small, args.clients, args.max_time))
                r = t.concurrent[-1]
                print(f"{args.clients} clients #{rep + 1} {t.label}: {r['aggregate_mib_s']:.0f} MiB/s aggregate, "
                      f"p50 {r['client_p50_s']:.2f} s, max {r['client_max_s']:.2f} s", flush=True)
            conc_done += 1
        tokens = token_latency(auth_url, args.token_requests)
        print(f"token issue: p50 {tokens['p50_ms']} ms, p99 {tokens['p99_ms']} ms", flush=True)
        info = machine_info(reference_binary, curl)
    finally:
        for proc in procs:
            stop_process(proc)
        if reference is not None:
            reference.stop()
        shutil.rmtree(root, ignore_errors=True)

    summary = {t.key: {"label": t.label, **summarize(t)} for t in targets}
    seed_s = summary["seed"]
    ref_s = summary["docker-registry"]
    pread_s = summary.get("seed-pread")
    measurements = [r for t in targets for r in t.single + t.concurrent]
    report: dict[str, Any] = {
        **report_header("seed_throughput", sys.argv[1:]),
        "machine": info,
        "load": load_report(measurements, load_start, busy_before),
        "params": {
            "blob_mib": args.blob_mib,
            "concurrent_mib": args.concurrent_mib,
            "clients": args.clients,
            "single_reps": args.single_reps,
            "concurrent_reps": args.concurrent_reps,
            "single_reps_done": single_done,
            "concurrent_reps_done": conc_done,
            "repository": REPO,
            "blobs": [{"digest": b.digest, "size": b.size} for b in blobs],
            "truncated": "; ".join(truncated),
            "duration_s": round(time.monotonic() - began, 1),
        },
        "summary": summary,
        "ratios": {
            "seed_vs_reference_single": ratio(seed_s["single_mib_s_median"], ref_s["single_mib_s_median"]),
            "seed_vs_reference_concurrent": ratio(seed_s["concurrent_mib_s_median"], ref_s["concurrent_mib_s_median"]),
            "sendfile_vs_pread_single": ratio(seed_s["single_mib_s_median"], pread_s["single_mib_s_median"])
            if pread_s else float("nan"),
            "sendfile_vs_pread_concurrent": ratio(seed_s["concurrent_mib_s_median"],
                                                  pread_s["concurrent_mib_s_median"]) if pread_s else float("nan"),
            "https_vs_http_single": ratio(summary["seed-https"]["single_mib_s_median"],
                                          seed_s["single_mib_s_median"]),
            "https_vs_http_concurrent": ratio(summary["seed-https"]["concurrent_mib_s_median"],
                                              seed_s["concurrent_mib_s_median"]),
            "authorized_vs_anonymous_single": ratio(summary["seed-auth"]["single_mib_s_median"],
                                                    seed_s["single_mib_s_median"]),
            "authorized_vs_anonymous_concurrent": ratio(summary["seed-auth"]["concurrent_mib_s_median"],
                                                        seed_s["concurrent_mib_s_median"]),
        },
        "token_latency": tokens,
        "runs": {t.key: {"label": t.label, "url": t.url, "single": t.single, "concurrent": t.concurrent}
                 for t in targets},
    }
    report["table"] = render_table(targets, summary, "docker-registry", report["params"])
    return report


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = print) -> int:
    args = _parser().parse_args(argv)
    for name in ("blob_mib", "concurrent_mib", "clients", "single_reps", "concurrent_reps"):
        if getattr(args, name) < 1:
            log(f"--{name.replace('_', '-')} must be at least 1")
            return 2
    try:
        report = run(args)
    except BenchError as exc:
        log(f"bench-seed failed: {exc}")
        return 1
    json_path = args.json or args.out.parent / "bench" / "seed_throughput.json"
    report["json_link"] = os.path.relpath(json_path.resolve(), args.out.resolve().parent)
    section = render_section(report, report["table"])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    update_doc(args.out, section)
    log("")
    log(section)
    log(f"wrote {args.out} and {json_path} ({report['params']['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
