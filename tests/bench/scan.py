"""``make bench-scan``: how fast the seed's scanner reads images, and what a scan costs serving.

One run, loopback only, the seed as a real process (``python -m seed serve``):

1. Build an image of ``--image-mib`` MiB of gzip tar layers (``--layer-mib`` each, gzip level 6 as
   ``docker build`` writes them) from this machine's real files, package databases first: its
   os-release and dpkg status, the Python dist-info directories of this venv, npm ``package.json``
   files, then ``/usr/bin`` (Go binaries with build info among them), ``/usr/lib`` and
   ``/usr/share`` in sorted order until the size is reached. Import an OSV database (real schema)
   with advisories for some of those packages and a few thousand for packages that are not there.
2. Throughput: a seed with ``[scan] cpu_share = 1.0`` (no pacing), ``priority = "normal"`` and
   ``scan_on_push = false``;
   push the image, then ``--scan-reps`` times ``POST /v2/<repo>/scan/<digest>`` and wait for the
   scan to finish (``seed_scans_total`` in ``/metrics``). Throughput = compressed layer MiB / the
   scan's duration (its report: layers read, unpacked and matched); per core = compressed layer
   MiB / CPU seconds of the whole scan job in its process (the seed's reaped-children CPU in
   ``/proc/PID/stat``: start-up, layers, matching, SBOM and referrers). Median over the repetitions.
3. Serving while a scan runs: the same data under a seed with the default ``[scan]``
   (``cpu_share = 0.5``, ``priority = "idle"``; ``--serving-scan`` adds settings). ``--clients``
   ``curl`` processes pull a ``--pull-mib`` MiB blob over and
   over (``--batch`` GETs per process on one connection) for ``--phase-s`` seconds; each GET's
   ``time_total`` is one latency. Phases alternate idle / scanning ``--rounds`` times; in a scanning
   phase a new scan is asked for as soon as one finishes, so one is running the whole phase. Both
   phases poll ``/metrics`` at the same rate. Goal: p99 while scanning at most 1.10 times idle.

Writes the section between ``<!-- bench-scan:start -->`` and ``<!-- bench-scan:end -->`` of
``--out`` and the raw numbers as JSON (default ``docs/bench/scan.json`` next to it).

    python -m tests.bench.scan --out docs/benchmarks.md [--image-mib 256] ...
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from seed.scan.vulndb import import_database
from tests.bench import common
from tests.bench.common import (
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
from tests.bench.seed_throughput import CURL_FORMAT, make_blob
from tests.harness.net import assert_loopback, free_port, wait_http_ok
from tests.harness.tools import clean_env, start_process, stop_process, tail

REPO = "bench/scan"
TAG = "big"
MARK_START = "<!-- bench-scan:start -->"
MARK_END = "<!-- bench-scan:end -->"
SECTION_TITLE = "## Scanner throughput and serving while scanning (make bench-scan)"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_START_ATTEMPTS = 3
_POLL_S = 0.25  # /metrics polling interval in both phases
_MAX_FILE = 64 * MIB  # larger files are skipped when building layers
_NOISE_ADVISORIES = 3000
GOAL = 1.10  # p99 while scanning / p99 idle


# ---- the image ------------------------------------------------------------------------------


@dataclass
class BuiltImage:
    layers: list[Path]
    layer_sizes: list[int]
    diff_ids: list[str]
    uncompressed: int
    files: int
    dpkg_status: bytes
    os_release: bytes
    python: list[tuple[str, str]]  # (distribution, version) whose dist-info is in the image
    npm: list[tuple[str, str]]

    @property
    def compressed(self) -> int:
        return sum(self.layer_sizes)


class _LayerWriter:
    """Writes tar entries into gzip layers of about ``layer_bytes`` compressed bytes each."""

    def __init__(self, directory: Path, layer_bytes: int, total_bytes: int) -> None:
        self.directory = directory
        self.layer_bytes = layer_bytes
        self.total_bytes = total_bytes
        self.paths: list[Path] = []
        self.sizes: list[int] = []
        self.diff_ids: list[str] = []
        self.uncompressed = 0
        self.files = 0
        self._raw: Any = None
        self._tar: tarfile.TarFile | None = None
        self._gz: _HashingGzip | None = None
        self._hash: Any = None

    def _open(self) -> tarfile.TarFile:
        if self._tar is None:
            path = self.directory / f"layer-{len(self.paths)}.tar.gz"
            self.paths.append(path)
            self._raw = path.open("wb")
            self._hash = hashlib.sha256()
            gz = _HashingGzip(self._raw, self._hash)
            self._tar = tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed in close_layer
            self._gz = gz
        return self._tar

    @property
    def done(self) -> bool:
        return sum(self.sizes) + (self._raw.tell() if self._raw is not None else 0) >= self.total_bytes

    def add(self, name: str, data: bytes | None = None, source: Path | None = None) -> None:
        tar = self._open()
        if source is not None:
            info = tar.gettarinfo(str(source), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            if info.isreg():
                with source.open("rb") as handle:
                    tar.addfile(info, handle)
                self.uncompressed += info.size
            else:
                tar.addfile(info)
        else:
            assert data is not None
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
            self.uncompressed += len(data)
        self.files += 1
        if self._raw.tell() >= self.layer_bytes:
            self.close_layer()

    def close_layer(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._gz is not None
        self._gz.close()
        self.sizes.append(self._raw.tell())
        self._raw.close()
        self.diff_ids.append(f"sha256:{self._hash.hexdigest()}")
        self._tar = None
        self._raw = None


class _HashingGzip:
    """A gzip stream (level 6) that also hashes the uncompressed tar: the layer's diff_id."""

    def __init__(self, raw: Any, sha: Any) -> None:
        import gzip

        self._gzip = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0)
        self._sha = sha

    def write(self, data: bytes) -> int:
        self._sha.update(data)
        return self._gzip.write(data)

    def close(self) -> None:
        self._gzip.close()


def _walk(root: Path) -> Iterator[Path]:
    """Files and symlinks under ``root``, sorted, depth first; unreadable ones skipped."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.is_symlink():
            yield entry
        elif entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            try:
                if entry.stat().st_size <= _MAX_FILE and os.access(entry, os.R_OK):
                    yield entry
            except OSError:
                continue


def _dist_infos() -> Iterator[tuple[str, str, Path]]:
    """(distribution, version, dist-info directory) of this venv's installed wheels."""
    from importlib import metadata

    seen = set()
    for dist in sorted(metadata.distributions(), key=lambda d: str(d.metadata["Name"]).lower()):
        name = str(dist.metadata["Name"])
        path = getattr(dist, "_path", None)
        if not name or name.lower() in seen or path is None or not Path(path).is_dir():
            continue
        seen.add(name.lower())
        yield name, dist.version, Path(path)


def build_image(directory: Path, image_bytes: int, layer_bytes: int) -> BuiltImage:
    """The benchmark image (see the module docstring); deterministic for one machine."""
    directory.mkdir(parents=True, exist_ok=True)
    writer = _LayerWriter(directory, layer_bytes, image_bytes)
    os_release = Path("/etc/os-release").read_bytes()
    dpkg_status = Path("/var/lib/dpkg/status").read_bytes()
    writer.add("etc/os-release", os_release)
    writer.add("var/lib/dpkg/status", dpkg_status)
    rng = random.Random(10)
    npm = [(f"bench-npm-{index:03d}", f"{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 30)}")
           for index in range(200)]
    for name, version in npm:
        writer.add(f"srv/app/node_modules/{name}/package.json",
                   json.dumps({"name": name, "version": version, "license": "MIT"}).encode())
    python = []
    site = "usr/local/lib/python3.11/site-packages"
    for name, version, path in _dist_infos():
        python.append((name, version))
        for item in sorted(path.iterdir()):
            if item.is_file():
                writer.add(f"{site}/{path.name}/{item.name}", item.read_bytes())
    for root in (Path("/usr/bin"), Path("/usr/lib"), Path("/usr/share")):
        for source in _walk(root):
            if writer.done:
                break
            try:
                writer.add(str(source).lstrip("/"), source=source)
            except OSError:
                continue  # vanished or unreadable meanwhile
        if writer.done:
            break
    writer.close_layer()
    if writer.done is False and sum(writer.sizes) < image_bytes:
        raise BenchError(f"only {sum(writer.sizes) // MIB} MiB of files found for a {image_bytes // MIB} MiB image")
    return BuiltImage(writer.paths, writer.sizes, writer.diff_ids, writer.uncompressed, writer.files, dpkg_status,
                      os_release, python, npm)


def _osv(advisory_id: str, ecosystem: str, package: str, fixed: str, severity: str) -> dict[str, Any]:
    vectors = {"critical": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",
               "high": "CVSS:3.1/AV:N/AC:L/PR:H/UI:N/S:U/C:H/I:H/A:H",
               "medium": "CVSS:3.1/AV:N/AC:H/PR:N/UI:R/S:U/C:L/I:L/A:N",
               "low": "CVSS:3.1/AV:N/AC:H/PR:H/UI:R/S:U/C:L/I:N/A:N"}
    return {
        "schema_version": "1.6.0", "id": advisory_id, "modified": "2024-01-01T00:00:00Z",
        "published": "2024-01-01T00:00:00Z", "aliases": [], "summary": f"bench advisory for {package}",
        "details": "Generated by tests/bench/scan.py.",
        "affected": [{"package": {"ecosystem": ecosystem, "name": package},
                      "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": fixed}]}]}],
        "severity": [{"type": "CVSS_V3", "score": vectors[severity]}],
    }


def write_advisories(directory: Path, image: BuiltImage) -> int:
    """OSV records: one for every 4th dpkg source package, 3rd Python and 5th npm package of the
    image (affected: fixed is later than installed), and ``_NOISE_ADVISORIES`` for absent ones."""
    directory.mkdir(parents=True, exist_ok=True)
    release = next((line.split("=", 1)[1].strip('"') for line in image.os_release.decode().splitlines()
                    if line.startswith("VERSION_ID=")), "12")
    distro = next((line.split("=", 1)[1].strip('"') for line in image.os_release.decode().splitlines()
                   if line.startswith("ID=")), "debian")
    ecosystem = f"Debian:{release.split('.')[0]}" if distro == "debian" else f"Ubuntu:{release}"
    severities = ("critical", "high", "medium", "low")
    records = []
    sources: dict[str, str] = {}
    for stanza in image.dpkg_status.decode(errors="replace").split("\n\n"):
        fields = dict(line.split(":", 1) for line in stanza.splitlines()
                      if line and line[0] not in " \t" and ":" in line)
        if "Package" not in fields or not fields.get("Status", "").strip().endswith(" installed"):
            continue
        source = fields.get("Source", fields["Package"]).strip()
        version = fields["Version"].strip()
        if "(" in source:
            source, _, version = source.partition(" (")
            version = version.rstrip(")")
        sources.setdefault(source.strip(), version.strip())
    for index, (source, version) in enumerate(sorted(sources.items())):
        if index % 4 == 0:
            records.append(_osv(f"DEBIAN-BENCH-{index:05d}", ecosystem, source, version + "+bench1",
                                severities[index % 4]))
    for index, (name, version) in enumerate(image.python):
        if index % 3 == 0:
            records.append(_osv(f"PYSEC-BENCH-{index:04d}", "PyPI", name, version + ".post1", severities[index % 4]))
    for index, (name, version) in enumerate(image.npm):
        if index % 5 == 0:
            records.append(_osv(f"GHSA-bench-{index:04d}", "npm", name, version + "-z", severities[index % 4]))
    for index in range(_NOISE_ADVISORIES):
        ecosystem_of_noise = (ecosystem, "PyPI", "npm", "Go")[index % 4]
        records.append(_osv(f"NOISE-{index:05d}", ecosystem_of_noise, f"absent-package-{index}", "1.0", "high"))
    for record in records:
        (directory / f"{record['id']}.json").write_text(json.dumps(record))
    return len(records)


# ---- the seed ---------------------------------------------------------------------------------


def start_seed(workdir: Path, data: Path, scan_toml: str, startup_timeout: float = 30.0
               ) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m seed serve`` on a free loopback port over ``data``; returns (proc, url)."""
    config = workdir / "seed.toml"
    config.write_text(scan_toml)
    log_path = workdir / "seed.log"
    last = ""
    for _ in range(_START_ATTEMPTS):  # free_port() can race with other processes
        url = f"http://127.0.0.1:{free_port()}"
        proc = start_process([sys.executable, "-m", "seed", "--log-level", "WARNING", "serve", "--listen",
                              url.split("://", 1)[1], "--data", data, "--config", config], log_path=log_path)
        try:
            wait_http_ok(f"{url}/healthz", startup_timeout, alive=partial(_alive, proc))
            return proc, url
        except (TimeoutError, RuntimeError) as exc:
            last = str(exc)
            stop_process(proc)
            if "address already in use" not in tail(log_path).lower():
                break
    raise BenchError(f"seed did not start: {last}\n--- {log_path}:\n{tail(log_path)}")


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _file_pieces(path: Path) -> Iterator[bytes]:
    with path.open("rb") as source:
        while piece := source.read(MIB):
            yield piece


def _push_blob(client: httpx.Client, base: str, digest: str, size: int, content: bytes | Iterator[bytes]) -> None:
    started = client.post(f"{base}/v2/{REPO}/blobs/uploads/")
    if started.status_code != 202:
        raise BenchError(f"POST upload -> {started.status_code} {started.text[:300]}")
    location = httpx.URL(base).join(started.headers["location"]).copy_merge_params({"digest": digest})
    assert_loopback(str(location))
    done = client.put(location, content=content,
                      headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    if done.status_code != 201:
        raise BenchError(f"PUT upload -> {done.status_code} {done.text[:300]}")


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    for piece in _file_pieces(path):
        sha.update(piece)
    return f"sha256:{sha.hexdigest()}"


def push_image(base: str, image: BuiltImage, pull_blob: Any) -> str:
    """Pushes the image's layers and config, the pull blob, and the manifest; returns its digest."""
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(300.0, connect=10.0)) as client:
        descriptors = []
        for path, size in zip(image.layers, image.layer_sizes, strict=True):
            digest = _sha256_file(path)
            _push_blob(client, base, digest, size, _file_pieces(path))
            descriptors.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": size})
        _push_blob(client, base, pull_blob.digest, pull_blob.size, _file_pieces(pull_blob.path))
        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": image.diff_ids}}).encode()
        config_digest = f"sha256:{hashlib.sha256(config).hexdigest()}"
        _push_blob(client, base, config_digest, len(config), config)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                               "layers": descriptors}).encode()
        put = client.put(f"{base}/v2/{REPO}/manifests/{TAG}", content=manifest, headers={"Content-Type": OCI_MANIFEST})
        if put.status_code != 201:
            raise BenchError(f"PUT manifest -> {put.status_code} {put.text[:300]}")
    return f"sha256:{hashlib.sha256(manifest).hexdigest()}"


def scans_finished(client: httpx.Client, base: str) -> float:
    """``seed_scans_total`` over all results, from ``/metrics``."""
    text = client.get(f"{base}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("seed_scans_total{"))


def request_scan(client: httpx.Client, base: str, digest: str) -> None:
    r = client.post(f"{base}/v2/{REPO}/scan/{digest}")
    if r.status_code != 202:
        raise BenchError(f"POST scan -> {r.status_code} {r.text[:300]}")


def wait_scan(client: httpx.Client, base: str, before: float, deadline: float) -> None:
    while scans_finished(client, base) <= before:
        if time.monotonic() > deadline:
            raise BenchError("a scan did not finish in time")
        time.sleep(_POLL_S)


def fetch_report(client: httpx.Client, base: str, digest: str) -> dict[str, Any]:
    r = client.get(f"{base}/v2/{REPO}/scan/{digest}")
    if r.status_code != 200:
        raise BenchError(f"GET scan -> {r.status_code} {r.text[:300]}")
    document: dict[str, Any] = r.json()
    return document


def reaped_children_cpu_seconds(pid: int) -> float:
    """cutime + cstime of process ``pid``: the CPU of its children it has waited for (the
    seed's scan processes, once each has exited)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def scan_cpu_seconds(pid: int) -> float:
    """CPU of the seed's scan processes so far: those it has reaped (``cutime + cstime``) plus
    those still running (its live children, found by their parent pid)."""
    total = reaped_children_cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[1]) == pid:  # field 4: ppid
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return total


def measure_throughput(pid: int, base: str, digest: str, compressed: int, reps: int, max_scan_s: float
                       ) -> list[dict[str, Any]]:
    runs = []
    with httpx.Client(trust_env=False, timeout=60) as client:
        for _ in range(reps):
            before = scans_finished(client, base)
            meter = Meter(pid)
            children_before = reaped_children_cpu_seconds(pid)
            request_scan(client, base, digest)
            wait_scan(client, base, before, time.monotonic() + max_scan_s)
            scan_process_cpu = reaped_children_cpu_seconds(pid) - children_before
            usage = meter.finish()
            report = fetch_report(client, base, digest)
            if report["status"] != "complete":
                raise BenchError(f"the scan is {report['status']}: {report['problems'][:3]}")
            duration = float(report["duration"])
            runs.append({
                "scan_s": round(duration, 3),
                "mib_s": round(compressed / MIB / duration, 1),
                "scan_process_cpu_s": round(scan_process_cpu, 3),
                "mib_s_per_core": round(compressed / MIB / max(scan_process_cpu, 1e-9), 1),
                "packages": sum(len(p["packages"]) for p in report["platforms"]),
                "findings": len(report["findings"]),
                **usage,
            })
            print(f"scan #{len(runs)}: layers and matching {runs[-1]['scan_s']:.2f} s ({runs[-1]['mib_s']:.0f} MiB/s); "
                  f"whole scan job {usage['wall_s']:.2f} s, {scan_process_cpu:.2f} s CPU in the scan process "
                  f"({runs[-1]['mib_s_per_core']:.0f} MiB/s per core); {runs[-1]['packages']} packages, "
                  f"{runs[-1]['findings']} findings", flush=True)
    return runs


# ---- pull load ----------------------------------------------------------------------------------


@dataclass
class Phase:
    kind: str  # idle | scanning
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    scans: int = 0  # scan jobs that finished within the phase
    requested: int = 0  # scan jobs asked for in the phase
    scan_seconds: float = 0.0
    scan_cpu_s: float = 0.0  # CPU of the scan processes during the phase
    scan_cpu_after_s: float = 0.0  # and after it, finishing the last scan job
    usage: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        times = sorted(self.latencies)
        if not times:
            raise BenchError(f"no requests completed in a {self.kind} phase: {self.errors[:3]}")
        return {"kind": self.kind, "requests": len(times), "errors": len(self.errors),
                "p50_ms": round(statistics.median(times) * 1000, 2), "p99_ms": round(_p99(times) * 1000, 2),
                "max_ms": round(times[-1] * 1000, 2), "scans": self.scans, "requested": self.requested,
                "scan_cpu_s": round(self.scan_cpu_s, 2), "scan_cpu_after_s": round(self.scan_cpu_after_s, 2),
                "scan_coverage": round(self.scan_seconds / self.usage["wall_s"], 2) if self.usage else None,
                **self.usage}


def _p99(sorted_times: list[float]) -> float:
    return sorted_times[min(len(sorted_times) - 1, int(len(sorted_times) * 0.99))]


def _pull_loop(curl: str, url: str, batch: int, deadline: float, phase: Phase, lock: threading.Lock) -> None:
    # One connection for the whole batch; each URL with its own output, one --write-out line each.
    argv = [curl, "--silent", "--show-error", "--noproxy", "*", "--max-time", "60", "--write-out", CURL_FORMAT,
            "--config", "-"]
    config = "".join(f'url = "{url}"\noutput = "/dev/null"\n' for _ in range(batch)).encode()
    env = clean_env()
    while time.monotonic() < deadline:
        proc = subprocess.run(argv, input=config, capture_output=True, timeout=120, env=env, check=False)
        for line in proc.stdout.decode().splitlines():
            parts = line.split()
            with lock:
                if len(parts) == 4 and parts[0] == "200":
                    phase.latencies.append(float(parts[2]))
                else:
                    phase.errors.append(line[:200])
        if proc.returncode != 0:
            with lock:
                phase.errors.append(proc.stderr.decode(errors="replace")[:200])


def run_phase(kind: str, curl: str, pid: int, base: str, blob_url: str, digest: str, args: argparse.Namespace
              ) -> Phase:
    phase = Phase(kind)
    lock = threading.Lock()
    with httpx.Client(trust_env=False, timeout=60) as client:
        finished = scans_finished(client, base)
        scan_cpu_before = scan_cpu_seconds(pid)
        if kind == "scanning":
            request_scan(client, base, digest)
            phase.requested += 1
        meter = Meter(pid)
        deadline = time.monotonic() + args.phase_s
        threads = [threading.Thread(target=_pull_loop, args=(curl, blob_url, args.batch, deadline, phase, lock))
                   for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        scan_started = time.monotonic()
        while any(thread.is_alive() for thread in threads):
            time.sleep(_POLL_S)
            now_finished = scans_finished(client, base)  # both phases poll alike
            if kind == "scanning" and now_finished > finished:
                phase.scans += int(now_finished - finished)
                phase.scan_seconds += time.monotonic() - scan_started
                finished = now_finished
                if time.monotonic() < deadline:
                    request_scan(client, base, digest)
                    phase.requested += 1
                    scan_started = time.monotonic()
        for thread in threads:
            thread.join()
        phase.usage = meter.finish()
        scan_cpu_end = scan_cpu_seconds(pid)
        phase.scan_cpu_s = scan_cpu_end - scan_cpu_before
        if kind == "scanning":
            # Let the last scan end (it ran to the end of the phase) so the next idle phase is idle.
            if scans_finished(client, base) <= finished:
                phase.scan_seconds += time.monotonic() - scan_started
                wait_scan(client, base, finished, time.monotonic() + args.max_scan_s)
            else:
                phase.scan_seconds += time.monotonic() - scan_started
            phase.scan_seconds = min(phase.scan_seconds, phase.usage["wall_s"])
        phase.scan_cpu_after_s = scan_cpu_seconds(pid) - scan_cpu_end
    summary = phase.summary()
    print(f"{kind}: {summary['requests']} GETs, p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms"
          + (f", {phase.scans} scans covering {summary['scan_coverage']:.0%} of the phase" if kind == "scanning"
             else ""), flush=True)
    return phase


# ---- report --------------------------------------------------------------------------------------


def render_section(report: dict[str, Any]) -> str:
    m, p, load, t, s = report["machine"], report["params"], report["load"], report["throughput"], report["serving"]
    verdict = "met" if s["p99_ratio"] <= GOAL else "NOT met"
    rows = [
        "| Phase | GETs | p50 ms | p99 ms | max ms | scan jobs (finished in the phase) | seed CPU s "
        "| scan processes CPU s in the phase | curl CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind in ("idle", "scanning"):
        phase = s[kind]
        rows.append(f"| {kind} | {phase['requests']} | {phase['p50_ms']} | {phase['p99_ms']} | {phase['max_ms']} | "
                    f"{phase['requested']} ({phase['scans']}) | {phase['server_cpu_s']:.1f} | "
                    f"{phase['scan_cpu_s']:.1f} | {phase['client_cpu_s']:.1f} |")
    rows.append(f"| **scanning / idle** | | {s['p50_ratio']:.2f}{X} | **{s['p99_ratio']:.2f}{X}** | | | | | |")
    lines = [
        SECTION_TITLE,
        "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}` (`make bench-scan`)",
        f"- Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}; load generator {m['curl_version']}",
        f"- Image: {p['image_mib_built']:.0f} MiB of gzip layers ({len(p['layer_sizes'])} layers, "
        f"{p['uncompressed_mib']:.0f} MiB uncompressed, {p['files']} files) from this machine's files: its dpkg "
        f"status, {p['python_packages']} Python dist-info directories, {p['npm_packages']} npm packages, then "
        f"`/usr/bin`, `/usr/lib`, `/usr/share`. Database: {p['advisories']} OSV advisories.",
        f"- Machine load: loadavg {' '.join(map(str, load['loadavg_start']))} at start, "
        f"{' '.join(map(str, load['loadavg_end']))} at end; {load['busy_cores_before']} of {m['nproc']} cores busy "
        f"with other work just before the run; other work used {load['other_cpu_share']:.0%} of the machine's "
        "CPU during the measurements.",
        "",
        f"**Throughput** (`[scan] cpu_share = 1.0`, `priority = \"normal\"`, {t['runs']} scans, median): "
        f"**{t['mib_s']:.0f} MiB/s** of "
        f"compressed layer read, unpacked and matched on one core ({t['scan_s']:.2f} s per scan as its report "
        f"times it, min{common.DASH}max {t['mib_s_min']:.0f}{common.DASH}{t['mib_s_max']:.0f} MiB/s). The whole "
        f"scan job (a scan process started, the layers, matching, the CycloneDX SBOM built and validated, the "
        f"referrers stored) took {t['job_s']:.2f} s and {t['scan_process_cpu_s']:.2f} s of CPU: "
        f"**{t['mib_s_per_core']:.0f} MiB/s per core**. {t['packages']} packages found, {t['findings']} findings.",
        "",
        f"**Serving while scanning** ({_serving_config(p['serving_scan'])}): {p['clients']} `curl` processes pull a "
        f"{p['pull_mib']} MiB blob in a loop ({p['batch']} GETs per connection), {p['phase_s']:.0f} s per phase, "
        f"{p['rounds']} rounds of idle then scanning; latency = curl's `time_total` per GET.",
        "",
        *rows,
        "",
        f"Goal (p99 while scanning ≤ {GOAL:.2f}{X} idle): **{verdict}** ({s['p99_ratio']:.2f}{X}).",
        "",
        *_notes(report),
        "",
        f"Raw numbers: [`{report['json_link']}`]({report['json_link']}).",
    ]
    return "\n".join(lines) + "\n"


def _notes(report: dict[str, Any]) -> list[str]:
    t, s = report["throughput"], report["serving"]
    startup = max(t["scan_process_cpu_s"] - t["scan_s"], 0.0)
    spread = {kind: [phase["p99_ms"] for phase in report["runs"]["phases"][kind]] for kind in ("idle", "scanning")}
    return [
        f"p99 of single phases: idle {min(spread['idle'])}{common.DASH}{max(spread['idle'])} ms, scanning "
        f"{min(spread['scanning'])}{common.DASH}{max(spread['scanning'])} ms. On this shared 2-CPU machine a "
        "ratio within that spread (below 1 included) means no measurable effect, not that scanning helps.",
        "",
        "Each scan runs in its own process (`python -m seed.scan.worker`), not in a thread of the seed: the "
        "scanner is CPU-bound Python, and in the seed's process it would hold the GIL against the one thread "
        "that serves every pull. The scan process runs at `SCHED_IDLE` and at most `cpu_share` of a core, so "
        "here, with the clients and the seed keeping both cores busy, it got only the CPU they left: "
        f"{s['scanning']['finished_in_phase_note']}",
        "",
        f"Of the whole job's {t['scan_process_cpu_s']:.1f} s of CPU, {t['scan_s']:.1f} s were reading and "
        f"matching the layers; the other {startup:.1f} s are the process start-up (about 2 s importing "
        "cyclonedx-python-lib and building its schema validator) and building and validating the SBOM "
        f"({t['packages']} components). A long-lived scan process would save the start-up on every scan after "
        "the first.",
    ]


def _serving_config(extra: str) -> str:
    if not extra:
        return "default `[scan]`: `cpu_share = 0.5`, `priority = \"idle\"`"
    return f"`[scan]` with `{extra}`"


def _merge(phases: list[Phase]) -> dict[str, Any]:
    merged = Phase(phases[0].kind)
    for phase in phases:
        merged.latencies += phase.latencies
        merged.errors += phase.errors
        merged.scans += phase.scans
        merged.requested += phase.requested
        merged.scan_seconds += phase.scan_seconds
        merged.scan_cpu_s += phase.scan_cpu_s
        merged.scan_cpu_after_s += phase.scan_cpu_after_s
    summary = merged.summary()
    for key in ("wall_s", "server_cpu_s", "other_cpu_s", "client_cpu_s", "machine_busy_cpu_s"):
        summary[key] = round(sum(phase.usage[key] for phase in phases), 2)
    summary["scan_coverage"] = round(merged.scan_seconds / summary["wall_s"], 2) if summary["wall_s"] else None
    return summary


# ---- main ---------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.scan", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="Markdown file to update")
    parser.add_argument("--json", type=Path, help="raw results (default: OUT's dir/bench/scan.json)")
    parser.add_argument("--image-mib", type=int, default=256, help="compressed size of the image to scan")
    parser.add_argument("--layer-mib", type=int, default=32, help="compressed size of each layer")
    parser.add_argument("--scan-reps", type=int, default=3, help="scans for the throughput")
    parser.add_argument("--pull-mib", type=int, default=1, help="size of the blob the clients pull")
    parser.add_argument("--clients", type=int, default=4, help="concurrent curl processes")
    parser.add_argument("--batch", type=int, default=20, help="GETs per curl process (one connection)")
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds per idle or scanning phase")
    parser.add_argument("--rounds", type=int, default=3, help="idle + scanning phase pairs")
    parser.add_argument("--max-scan-s", type=float, default=600.0, help="give up on a scan after this long")
    parser.add_argument("--serving-scan", default="",
                        help="more [scan] settings for the serving phases, e.g. 'priority = \"low\"' (default: none)")
    return parser


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    began = time.monotonic()
    curl = find_tool("curl")
    load_start = loadavg()
    busy_before = busy_cores(1.0)
    root = Path(tempfile.mkdtemp(prefix="bench-scan-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        log(f"building a {args.image_mib} MiB image in {root}")
        image = build_image(root / "image", args.image_mib * MIB, args.layer_mib * MIB)
        log(f"built {image.compressed / MIB:.1f} MiB in {len(image.layers)} layers ({image.uncompressed / MIB:.0f} "
            f"MiB uncompressed, {image.files} files) in {time.monotonic() - began:.0f} s")
        advisories = write_advisories(root / "osv", image)
        data = root / "data"
        imported = import_database(data, root / "osv")  # what `seed vulndb import` does
        log(f"imported {imported.advisories} advisories")
        pull_blob = make_blob(root / "pull.blob", args.pull_mib)

        (root / "fast").mkdir()
        # The scanner's own speed: unpaced and at normal priority (at "idle", other work on the
        # machine would decide the number).
        proc, base = start_seed(root / "fast", data,
                                '[scan]\ncpu_share = 1.0\npriority = "normal"\nscan_on_push = false\n')
        procs.append(proc)
        pushed = time.monotonic()
        digest = push_image(base, image, pull_blob)
        log(f"pushed to {base} in {time.monotonic() - pushed:.1f} s")
        throughput_runs = measure_throughput(proc.pid, base, digest, image.compressed, args.scan_reps,
                                             args.max_scan_s)
        stop_process(proc)
        procs.remove(proc)

        (root / "default").mkdir()
        proc, base = start_seed(root / "default", data,
                                f"[scan]\nscan_on_push = false\n{args.serving_scan.replace(';', chr(10))}\n")
        procs.append(proc)
        blob_url = f"{base}/v2/{REPO}/blobs/{pull_blob.digest}"
        with httpx.Client(trust_env=False, timeout=60) as client:
            client.get(blob_url).raise_for_status()  # page cache
        phases: dict[str, list[Phase]] = {"idle": [], "scanning": []}
        for round_index in range(args.rounds):
            for kind in ("idle", "scanning"):
                log(f"round {round_index + 1}/{args.rounds}:")
                phases[kind].append(run_phase(kind, curl, proc.pid, base, blob_url, digest, args))
        info = {**machine_basics(), "curl_version": " ".join(tool_version([curl, "--version"]).split()[:2])}
    finally:
        for proc in procs:
            stop_process(proc)
        shutil.rmtree(root, ignore_errors=True)

    mib_values = [r["mib_s"] for r in throughput_runs]
    throughput = {
        "runs": len(throughput_runs),
        "mib_s": round(statistics.median(mib_values), 1),
        "mib_s_min": min(mib_values),
        "mib_s_max": max(mib_values),
        "mib_s_per_core": round(statistics.median(r["mib_s_per_core"] for r in throughput_runs), 1),
        "scan_s": round(statistics.median(r["scan_s"] for r in throughput_runs), 3),
        "job_s": round(statistics.median(r["wall_s"] for r in throughput_runs), 3),
        "scan_process_cpu_s": round(statistics.median(r["scan_process_cpu_s"] for r in throughput_runs), 3),
        "packages": throughput_runs[-1]["packages"],
        "findings": throughput_runs[-1]["findings"],
    }
    idle, scanning = _merge(phases["idle"]), _merge(phases["scanning"])
    serving = {"idle": idle, "scanning": scanning, "p50_ratio": ratio(scanning["p50_ms"], idle["p50_ms"]),
               "p99_ratio": ratio(scanning["p99_ms"], idle["p99_ms"])}
    scanning["finished_in_phase_note"] = (
        f"the scan processes used {scanning['scan_cpu_s']:.1f} s of CPU during the {args.rounds} scanning phases "
        f"of {args.phase_s:.0f} s, and {scanning['scans']} of the {scanning['requested']} scan jobs finished "
        f"within their phase; the others finished after it ({scanning['scan_cpu_after_s']:.1f} s of CPU), "
        "once the clients had stopped.")
    measurements = [*throughput_runs, *(phase.usage for kind in phases.values() for phase in kind)]
    return {
        **report_header("scan", sys.argv[1:]),
        "machine": info,
        "load": load_report(measurements, load_start, busy_before),
        "params": {
            "image_mib": args.image_mib, "image_mib_built": round(image.compressed / MIB, 1),
            "layer_sizes": image.layer_sizes, "uncompressed_mib": round(image.uncompressed / MIB, 1),
            "files": image.files, "python_packages": len(image.python), "npm_packages": len(image.npm),
            "advisories": advisories, "scan_reps": args.scan_reps, "pull_mib": args.pull_mib,
            "clients": args.clients, "batch": args.batch, "phase_s": args.phase_s, "rounds": args.rounds,
            "serving_scan": args.serving_scan,
            "duration_s": round(time.monotonic() - began, 1),
        },
        "throughput": throughput,
        "serving": serving,
        "runs": {"throughput": throughput_runs,
                 "phases": {kind: [phase.summary() for phase in kind_phases] for kind, kind_phases in phases.items()}},
    }


def _print(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = _print) -> int:
    args = _parser().parse_args(argv)
    for name in ("image_mib", "layer_mib", "scan_reps", "pull_mib", "clients", "batch", "rounds"):
        if getattr(args, name) < 1:
            log(f"--{name.replace('_', '-')} must be at least 1")
            return 2
    try:
        report = run(args, log)
    except BenchError as exc:
        log(f"bench-scan failed: {exc}")
        return 1
    json_path = args.json or args.out.parent / "bench" / "scan.json"
    report["json_link"] = os.path.relpath(json_path.resolve(), args.out.resolve().parent)
    section = render_section(report)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    common.update_doc(args.out, section, MARK_START, MARK_END)
    log("")
    log(section)
    log(f"wrote {args.out} and {json_path} ({report['params']['duration_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
