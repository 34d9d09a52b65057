"""The background scanner: a bounded queue, workers under a CPU budget, crash-safe results.

Layout under the seed's data directory::

    scan/results/sha256/<hex>.json   the latest report of each scanned manifest (ScanReport JSON)
    scan/tmp/                        temporary files, renamed into place

Rules/invariants:
- Scanning never runs on the request path: ``enqueue`` is sync-colored and never blocks (a
  full queue drops the request and counts it; the image stays "unscanned" until a later
  ``enqueue`` or ``scan_now``). Scans run in worker threads, at most ``workers`` at once,
  each paced to ``cpu_share`` of a core by sleeping in proportion to the CPU time it used
  (the sleep releases the GIL, which is what keeps serving responsive).
- One scan per manifest digest at a time; a second request for the same digest waits for
  the first and gets its report.
- Reports are written with ``write_atomic``: a crash leaves the previous report or the new one.
- On shutdown (cancellation of ``serve``) running scans stop at their next pacing point.
- A new database (imported by this process or by ``seed vulndb import`` beside it, noticed
  every ``database_poll_interval`` seconds) re-matches the stored reports whose packages
  the import changed, from their stored inventories, without reading layers again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from p2pd.fsutil import write_atomic
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from seed.storage import Storage

from .config import SEVERITIES, ScanConfig
from .errors import DatabaseMissing, ScanCancelled, ScanError, VulnDBError
from .scanner import ScanReport, rematch, scan_image
from .vulndb import VulnDatabase, osv_coordinates

__all__ = ["ScanMetrics", "ScanResultStore", "ScanService"]

log = logging.getLogger("seed.scan")

_PACE_SLICE = 0.05  # seconds of CPU between pauses
_CACHED_REPORTS = 256


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
    """Called from a scan thread as layer bytes stream: keeps it to ``share`` of a core, and
    stops it (``ScanCancelled``) once ``cancelled`` is set."""

    def __init__(self, share: float, cancelled: threading.Event, metrics: ScanMetrics) -> None:
        self._share = share
        self._cancelled = cancelled
        self._metrics = metrics
        self._slice_start = time.thread_time()

    def __call__(self, nbytes: int) -> None:
        self._metrics.layer_bytes.inc(nbytes)
        if self._cancelled.is_set():
            raise ScanCancelled("the scanner is shutting down")
        if self._share >= 1.0:
            return
        used = time.thread_time() - self._slice_start
        if used >= _PACE_SLICE:
            if self._cancelled.wait(used * (1.0 - self._share) / self._share):
                raise ScanCancelled("the scanner is shutting down")
            self._slice_start = time.thread_time()


def _touches(report: ScanReport, changed: frozenset[tuple[str, str]]) -> bool:
    for platform in report.platforms:
        for package in platform.packages:
            coordinates = osv_coordinates(package, platform.distro)
            if coordinates is not None and (coordinates[0], coordinates[1]) in changed:
                return True
    return False


class ScanService:
    """Scans pushed images in the background and keeps their reports.

    Args:
        storage: the seed's storage (layers are read through it).
        data_dir: the seed's data directory (reports go to ``scan/results/``).
        config: queue size, workers, CPU share, layer limits.
        database: the vulnerability database (default: the one under ``data_dir``).
        registry: where the metrics are registered (the seed's registry), or None.
        on_complete: awaited with each new or re-matched report (attach referrers, send
            webhooks); its exceptions are logged, never stop the service.

    Start with ``await nursery.start(service.serve)``.
    """

    def __init__(self, storage: Storage, data_dir: Path, config: ScanConfig, *,
                 database: VulnDatabase | None = None, registry: CollectorRegistry | None = None,
                 on_complete: Callable[[ScanReport], Awaitable[None]] | None = None) -> None:
        self._storage = storage
        self._config = config
        self._database = database or VulnDatabase.for_data_dir(data_dir)
        self.results = ScanResultStore(data_dir)
        self.metrics = ScanMetrics(registry)
        self._on_complete = on_complete
        self._send, self._receive = trio.open_memory_channel[tuple[str, Digest]](config.queue_size)
        self._queued: set[Digest] = set()
        self._inflight: dict[Digest, trio.Event] = {}
        self._limiter = trio.CapacityLimiter(config.workers)
        self._cancelled = threading.Event()
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

    def _remember(self, report: ScanReport) -> None:
        digest = Digest.parse(report.digest)
        self._cache[digest] = report
        self._cache.move_to_end(digest)
        while len(self._cache) > _CACHED_REPORTS:
            self._cache.popitem(last=False)

    async def scan_now(self, repository: str, digest: Digest | str) -> ScanReport:
        """Scans a manifest now (within the worker limit) and returns its report.

        Raises:
            ScanError: the manifest cannot be read.
            ScanCancelled: the service is shutting down.
        """
        parsed = digest if isinstance(digest, Digest) else Digest.parse(digest)
        self._queued.discard(parsed)  # a queued request for it is satisfied by this scan
        return await self._scan(repository, parsed)

    # ---- running ----------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[ScanService] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs the workers and the database watch until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._stop_threads_on_cancel)
            for _ in range(self._config.workers):
                nursery.start_soon(self._worker)
            nursery.start_soon(self._watch_database)
            task_status.started(self)

    async def _stop_threads_on_cancel(self) -> None:
        # Worker threads cannot be cancelled from trio; this flag makes them stop at their
        # next pacing point, so shutdown does not wait for a long scan to finish.
        try:
            await trio.sleep_forever()
        finally:
            self._cancelled.set()

    async def _worker(self) -> None:
        async for repository, digest in self._receive:
            if digest not in self._queued:
                continue  # scanned on demand meanwhile
            self._queued.discard(digest)
            try:
                await self._scan(repository, digest)
            except ScanCancelled:
                return
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
        self.metrics.running.inc()
        started = time.monotonic()
        try:
            report = await trio.to_thread.run_sync(self._scan_blocking, repository, digest, limiter=self._limiter)
        except ScanCancelled:
            self.metrics.scans.labels("cancelled").inc()
            raise
        except ScanError:
            self.metrics.scans.labels("error").inc()
            raise
        finally:
            self.metrics.running.dec()
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

    def _scan_blocking(self, repository: str, digest: Digest) -> ScanReport:
        pacer = _Pacer(self._config.cpu_share, self._cancelled, self.metrics)
        database = self._database if self._database.exists() else None
        report = scan_image(self._storage, repository, digest, database=database, limits=self._config.limits,
                            progress=pacer)
        self.results.save(report)
        return report

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
            except VulnDBError as exc:
                log.warning("cannot read the vulnerability database: %s", exc)
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
        first_check = self._seen_import_id is None
        if first_check:
            # At start-up: reports matched against an older import than this one (the
            # database was replaced while the seed was down) are re-matched.
            changed = None
            count = await self._rematch(changed, stale_only=status.import_id)
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
        updated = await trio.to_thread.run_sync(self._rematch_blocking, changed, stale_only,
                                                limiter=self._limiter)
        for report in updated:
            self._remember(report)
            await self._notify(report)
        return len(updated)

    def _rematch_blocking(self, changed: frozenset[tuple[str, str]] | None,
                          stale_only: str | None) -> list[ScanReport]:
        updated: list[ScanReport] = []
        if not self._database.exists():
            return updated
        for digest in self.results.digests():
            if self._cancelled.is_set():
                break
            report = self.results.load(digest)
            if report is None:
                continue
            current: dict[str, Any] | None = report.database
            if stale_only is not None and current is not None and current.get("import_id") == stale_only:
                continue
            if changed is not None and not _touches(report, changed):
                continue
            fresh = rematch(report, self._database)
            self.results.save(fresh)
            self.metrics.rematched.inc()
            updated.append(fresh)
        return updated
