"""The background scanner: a bounded queue, scans in child processes under a CPU budget,
crash-safe results.

Layout under the seed's data directory::

    scan/results/sha256/<hex>.json   the latest report of each scanned manifest (ScanReport JSON)
    scan/tmp/                        temporary files, renamed into place

Rules/invariants:
- Scanning never runs on the request path, nor in the seed's process: ``enqueue`` is
  sync-colored and never blocks (a full queue drops the request and counts it; the image
  stays "unscanned" until a later ``enqueue`` or ``scan_now``). Each scan runs in a child
  process (``seed.scan.worker``), at most ``workers`` at once, at CPU ``priority`` and
  paced to ``cpu_share`` of a core, so it never holds the GIL the serving thread needs.
- One scan per manifest digest at a time; a second request for the same digest waits for
  the first and gets its report.
- Reports are written with ``write_atomic`` (by the child): a crash leaves the previous report
  or the new one. The parent only reads them.
- On shutdown (cancellation of ``serve``) running scans are killed with their processes.
- A new database (imported by this process or by ``seed vulndb import`` beside it, noticed
  every ``database_poll_interval`` seconds) re-matches the stored reports whose packages
  the import changed, from their stored inventories, without reading layers again (in a
  child process too). Only those whose result changed are announced (``on_complete``).
- A scan that cannot be done (unknown manifest, a full disk) fails alone (``ScanError``),
  never the service.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from p2pd.fsutil import write_atomic
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from seed.storage import Storage

from .config import SEVERITIES, ScanConfig
from .errors import DatabaseMissing, ScanError, VulnDBError
from .scanner import ScanReport
from .vulndb import VulnDatabase, osv_coordinates

__all__ = ["ScanMetrics", "ScanResultStore", "ScanService", "rematch_needed", "result_key"]

log = logging.getLogger("seed.scan")

_PACE_SLICE = 0.05  # seconds of CPU between pauses
_CACHED_REPORTS = 256
_WORKER = (sys.executable, "-m", "seed.scan.worker")
_MAX_LINE = 64 * 1024  # bytes of one protocol line from a worker


def _worker_request(*, data: Path, chunk_size: int, database: Path, cpu_share: float, priority: str, attach: bool,
                   limits: Any, pace_slice: float, **extra: Any) -> bytes:
    """The JSON request of one worker run (``extra``: repository and digest, or changed and stale_only)."""
    document = {"data": str(data), "chunk_size": chunk_size, "database": str(database), "cpu_share": cpu_share,
                "priority": priority, "attach": attach, "pace_slice": pace_slice,
                "limits": {field.name: getattr(limits, field.name) for field in fields(limits)}, **extra}
    return json.dumps(document).encode()


class ScanMetrics:
    """Prometheus metrics of the scanner, registered in the seed's registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.queue_depth = Gauge("seed_scan_queue_depth", "Images waiting for a scan", registry=registry)
        self.running = Gauge("seed_scan_running", "Scans in progress", registry=registry)
        self.duration = Histogram("seed_scan_duration_seconds", "Time to scan one pushed manifest",
                                  registry=registry, buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 1200))
        self.scans = Counter("seed_scans", "Scans finished, by result", ["result"], registry=registry)
        self.dropped = Counter("seed_scan_dropped", "Scan requests dropped because the queue was full",
                               registry=registry)
        self.findings = Counter("seed_scan_findings", "Findings reported by scans, by severity", ["severity"],
                                registry=registry)
        self.layer_bytes = Counter("seed_scan_layer_bytes", "Compressed layer bytes read by scans",
                                   registry=registry)
        self.rematched = Counter("seed_scan_rematched", "Reports re-matched after a database import",
                                 registry=registry)
        for severity in SEVERITIES:
            self.findings.labels(severity)


class ScanResultStore:
    """The latest report of each scanned manifest, under ``DATA/scan/results/``. Blocking."""

    def __init__(self, data_dir: Path) -> None:
        self._root = Path(data_dir) / "scan" / "results"
        self._tmp = Path(data_dir) / "scan" / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, digest: Digest) -> Path:
        return self._root / digest.algorithm / f"{digest.encoded}.json"

    def exists(self, digest: Digest) -> bool:
        return self._path(digest).exists()

    def save(self, report: ScanReport) -> None:
        write_atomic(self._path(Digest.parse(report.digest)), report.to_bytes(), tmp_dir=self._tmp)

    def load_bytes(self, digest: Digest) -> bytes | None:
        try:
            return self._path(digest).read_bytes()
        except FileNotFoundError:
            return None

    def load(self, digest: Digest | str) -> ScanReport | None:
        parsed = digest if isinstance(digest, Digest) else Digest.parse(digest)
        try:
            return ScanReport.from_json(json.loads(self._path(parsed).read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable scan report for %s: %s", parsed, exc)
            return None

    def digests(self) -> Iterator[Digest]:
        for algorithm_dir in sorted(self._root.glob("*")):
            for path in sorted(algorithm_dir.glob("*.json")):
                try:
                    parsed = Digest.parse(f"{algorithm_dir.name}:{path.stem}")
                except OCIError:
                    continue  # a stray file is not a report
                yield parsed


class _Pacer:
    """Called as layer bytes stream: counts them (``on_bytes``) and keeps the calling thread to
    ``share`` of a core by sleeping in proportion to the CPU time it used."""

    def __init__(self, share: float, on_bytes: Callable[[int], None], *, pace_slice: float = _PACE_SLICE) -> None:
        self._share = share
        self._on_bytes = on_bytes
        self._pace_slice = pace_slice
        self._slice_start = time.thread_time()

    def __call__(self, nbytes: int) -> None:
        self._on_bytes(nbytes)
        if self._share >= 1.0:
            return
        used = time.thread_time() - self._slice_start
        if used >= self._pace_slice:
            time.sleep(used * (1.0 - self._share) / self._share)
            self._slice_start = time.thread_time()


def result_key(report: ScanReport) -> tuple[str, frozenset[tuple[str, ...]]]:
    """What a pull policy or a reader of the report acts on: its status and each finding's
    advisory, package, versions and severity (not summaries or times)."""
    return report.status, frozenset(
        (platform.manifest_digest, finding.id, ",".join(finding.aliases), finding.package,
         finding.installed_version, finding.fixed_version or "", finding.severity)
        for platform, finding in report.findings)


def _touches(report: ScanReport, changed: frozenset[tuple[str, str]]) -> bool:
    for platform in report.platforms:
        for package in platform.packages:
            coordinates = osv_coordinates(package, platform.distro)
            if coordinates is not None and (coordinates[0], coordinates[1]) in changed:
                return True
    return False


def rematch_needed(report: ScanReport, changed: frozenset[tuple[str, str]] | None, stale_only: str | None) -> bool:
    """Whether a stored report must be re-matched after an import: with ``stale_only``, when
    it was matched against another import; with ``changed``, when one of its packages is among
    the (ecosystem, package) pairs the import changed; with neither, always."""
    current: dict[str, Any] | None = report.database
    if stale_only is not None and current is not None and current.get("import_id") == stale_only:
        return False
    return changed is None or _touches(report, changed)


class ScanService:
    """Scans pushed images in the background and keeps their reports.

    Args:
        storage: the seed's storage (layers are read through it, by the scan processes).
        data_dir: the seed's data directory (reports go to ``scan/results/``).
        config: queue size, workers, CPU share and priority, layer limits.
        database: the vulnerability database (default: the one under ``data_dir``).
        registry: where the metrics are registered (the seed's registry), or None.
        on_complete: awaited with each new report, and with each re-matched report whose
            result changed (``result_key``): audit, webhooks. Its exceptions are logged,
            never stop the service.
        attach: store the SBOM and report of each complete scan as OCI 1.1 referrers of the
            scanned manifest (in the scan process, before ``on_complete``).

    Start with ``await nursery.start(service.serve)``.
    """

    def __init__(self, storage: Storage, data_dir: Path, config: ScanConfig, *,
                 database: VulnDatabase | None = None, registry: CollectorRegistry | None = None,
                 on_complete: Callable[[ScanReport], Awaitable[None]] | None = None, attach: bool = False) -> None:
        self._storage = storage
        self._data_dir = Path(data_dir)
        self._config = config
        self._database = database or VulnDatabase.for_data_dir(data_dir)
        self._attach = attach
        self.results = ScanResultStore(data_dir)
        self.metrics = ScanMetrics(registry)
        self._on_complete = on_complete
        self._send, self._receive = trio.open_memory_channel[tuple[str, Digest]](config.queue_size)
        self._queued: set[Digest] = set()
        self._inflight: dict[Digest, trio.Event] = {}
        self._limiter = trio.CapacityLimiter(config.workers)
        self._seen_import_id: str | None = None
        self._cache: OrderedDict[Digest, ScanReport] = OrderedDict()
        self._database_lock = trio.Lock()
        self.metrics.queue_depth.set_function(lambda: len(self._queued))

    # ---- requests ---------------------------------------------------------------------

    def enqueue(self, repository: str, digest: Digest | str) -> bool:
        """Queues a manifest for a background scan; False if the queue is full. Never blocks."""
        parsed = digest if isinstance(digest, Digest) else Digest.parse(digest)
        if parsed in self._queued or parsed in self._inflight:
            return True
        try:
            self._send.send_nowait((repository, parsed))
        except trio.WouldBlock:
            self.metrics.dropped.inc()
            log.warning("scan queue full: %s@%s not queued", repository, parsed)
            return False
        self._queued.add(parsed)
        return True

    def state(self, digest: Digest | str) -> str:
        """``scanning``, ``pending`` (queued), ``scanned`` or ``unscanned``. Reads one file."""
        parsed = digest if isinstance(digest, Digest) else Digest.parse(digest)
        if parsed in self._inflight:
            return "scanning"
        if parsed in self._queued:
            return "pending"
        return "scanned" if parsed in self._cache or self.results.exists(parsed) else "unscanned"

    async def report(self, digest: Digest | str) -> ScanReport | None:
        """The stored report of a manifest, or None. Recent reports come from memory (the pull
        policy asks for one on every pull by tag)."""
        parsed = digest if isinstance(digest, Digest) else Digest.parse(digest)
        cached = self._cache.get(parsed)
        if cached is not None:
            self._cache.move_to_end(parsed)
            return cached
        report = await trio.to_thread.run_sync(self.results.load, parsed)
        if report is not None:
            self._remember(report)
        return report

    async def report_bytes(self, digest: Digest | str) -> bytes | None:
        """The stored report's JSON as written (what the API serves, without encoding it again)."""
        parsed = digest if isinstance(digest, Digest) else Digest.parse(digest)
        return await trio.to_thread.run_sync(self.results.load_bytes, parsed)

    def _remember(self, report: ScanReport) -> None:
        digest = Digest.parse(report.digest)
        self._cache[digest] = report
        self._cache.move_to_end(digest)
        while len(self._cache) > _CACHED_REPORTS:
            self._cache.popitem(last=False)

    async def scan_now(self, repository: str, digest: Digest | str) -> ScanReport:
        """Scans a manifest now (within the worker limit) and returns its report.

        Raises:
            ScanError: the manifest cannot be read, or the report cannot be stored.
        """
        parsed = digest if isinstance(digest, Digest) else Digest.parse(digest)
        self._queued.discard(parsed)  # a queued request for it is satisfied by this scan
        return await self._scan(repository, parsed)

    # ---- running ----------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[ScanService] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs the workers and the database watch until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(self._config.workers):
                nursery.start_soon(self._worker)
            nursery.start_soon(self._watch_database)
            task_status.started(self)

    async def _worker(self) -> None:
        async for repository, digest in self._receive:
            if digest not in self._queued:
                continue  # scanned on demand meanwhile
            self._queued.discard(digest)
            try:
                await self._scan(repository, digest)
            except ScanError as exc:
                log.warning("scan of %s@%s failed: %s", repository, digest, exc)

    async def _scan(self, repository: str, digest: Digest) -> ScanReport:
        running = self._inflight.get(digest)
        if running is not None:
            await running.wait()
            report = await self.report(digest)
            if report is None:
                raise ScanError(f"the scan of {repository}@{digest} failed")
            return report
        done = self._inflight[digest] = trio.Event()
        started = time.monotonic()
        # Cancellation reaches here wrapped in the nursery's exception group, so it is told
        # apart by elimination: not finished and not a ScanError.
        outcome = "cancelled"
        try:
            async with self._limiter:
                self.metrics.running.inc()
                try:
                    await self._run_worker("scan", repository=repository, digest=str(digest))
                finally:
                    self.metrics.running.dec()
            report = await trio.to_thread.run_sync(self.results.load, digest)
            if report is None:
                raise ScanError(f"the scan of {repository}@{digest} left no readable report")
            outcome = "finished"
        except ScanError:
            outcome = "error"
            raise
        finally:
            if outcome != "finished":
                self.metrics.scans.labels(outcome).inc()
            del self._inflight[digest]
            done.set()
        self._remember(report)
        self.metrics.duration.observe(time.monotonic() - started)
        self.metrics.scans.labels(report.status).inc()
        for severity, count in report.severity_counts().items():
            if count:
                self.metrics.findings.labels(severity).inc(count)
        await self._notify(report)
        return report

    async def _run_worker(self, command: str, **extra: Any) -> list[dict[str, Any]]:
        """Runs ``seed.scan.worker COMMAND`` and returns its protocol lines (progress is counted
        as it comes). Cancellation kills the process.

        Raises:
            ScanError: the worker reported an error, or ended without ``done``.
        """
        request = _worker_request(data=self._storage.root, chunk_size=self._storage.chunk_size,
                                 database=self._database.path, cpu_share=self._config.cpu_share,
                                 priority=self._config.priority, attach=self._attach, limits=self._config.limits,
                                 pace_slice=_PACE_SLICE, **extra)
        lines: list[dict[str, Any]] = []
        overlong = False
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(partial(
                trio.run_process, [*_WORKER, command], stdin=request, stdout=subprocess.PIPE, check=False))
            assert process.stdout is not None
            buffer = b""
            async for piece in process.stdout:
                buffer += piece
                while b"\n" in buffer:
                    line, _, buffer = buffer.partition(b"\n")
                    lines.append(self._worker_line(line))
                if len(buffer) > _MAX_LINE:
                    overlong = True
                    process.kill()
                    break
        # Raised out here: inside the nursery it would leave wrapped in an exception group.
        if overlong:
            raise ScanError("the scan process wrote an overlong line")
        errors = [line["error"] for line in lines if "error" in line]
        if errors:
            raise ScanError(str(errors[0]))
        if not any("done" in line for line in lines):
            raise ScanError(f"the scan process ended (exit status {process.returncode}) without a result")
        return lines

    def _worker_line(self, line: bytes) -> dict[str, Any]:
        try:
            document = json.loads(line)
        except ValueError:
            return {}
        if not isinstance(document, dict):
            return {}
        progress = document.get("progress")
        if isinstance(progress, int) and progress > 0:
            self.metrics.layer_bytes.inc(progress)
        return document

    async def _notify(self, report: ScanReport) -> None:
        if self._on_complete is None:
            return
        try:
            await self._on_complete(report)
        except Exception:  # a failing hook (webhook down) must not stop scanning
            log.exception("scan completion hook failed for %s@%s", report.repository, report.digest)

    # ---- database changes -------------------------------------------------------------

    async def _watch_database(self) -> None:
        while True:
            try:
                await self.check_database()
            except (VulnDBError, OSError) as exc:
                log.warning("cannot read the vulnerability database: %s", exc)
            except ScanError as exc:
                log.warning("re-matching after a database import failed: %s", exc)
            await trio.sleep(self._config.database_poll_interval)

    async def check_database(self) -> int:
        """Re-matches stored reports if a new database was imported since the last check.

        Returns the number of reports re-matched (0 when nothing changed).
        """
        async with self._database_lock:  # the watch loop and a caller may ask at once
            return await self._check_database_locked()

    async def _check_database_locked(self) -> int:
        try:
            status = await trio.to_thread.run_sync(self._database.status)
        except DatabaseMissing:
            return 0
        if status.import_id == self._seen_import_id:
            return 0
        if self._seen_import_id is None:
            # At start-up: reports matched against an older import than this one (the
            # database was replaced while the seed was down) are re-matched.
            count = await self._rematch(None, stale_only=status.import_id)
        else:
            follows = status.previous_import_id == self._seen_import_id
            count = await self._rematch(status.changed_packages if follows else None, stale_only=None)
        self._seen_import_id = status.import_id
        return count

    async def rescan_for(self, changed: Iterable[tuple[str, str]] | None) -> int:
        """Re-matches the stored reports with a package among ``changed`` ((ecosystem, package)
        pairs as in ``ImportResult.changed_packages``; None: all). Returns how many."""
        return await self._rematch(frozenset(changed) if changed is not None else None, stale_only=None)

    async def _rematch(self, changed: frozenset[tuple[str, str]] | None, *, stale_only: str | None) -> int:
        if not await trio.to_thread.run_sync(self._database.exists):
            return 0
        async with self._limiter:
            lines = await self._run_worker("rematch", changed=sorted(changed) if changed is not None else None,
                                           stale_only=stale_only)
        count = 0
        for line in lines:
            if "rematched" not in line:
                continue
            count += 1
            self.metrics.rematched.inc()
            report = await trio.to_thread.run_sync(self.results.load, str(line["rematched"]))
            if report is None:
                continue
            self._remember(report)
            # Only a different result is news (for the audit log and webhooks): a daily import
            # that leaves an image's findings as they were is stored quietly.
            if line.get("changed"):
                await self._notify(report)
        return count
