"""The background ScanService: bounded queue, workers, metrics, crash-safe results, re-matching
after a database import, and shutdown in the middle of a scan."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE
from seed.scan import service as service_module
from seed.scan.config import ScanConfig
from seed.scan.referrers import build_attachments, replace_attachments
from seed.scan.scanner import ScanReport
from seed.scan.service import ScanService, _Pacer
from seed.scan.vulndb import VulnDatabase, import_database
from seed.storage import Storage
from tests.fixtures.scan.builders import (
    ALPINE_OS_RELEASE,
    StoredImage,
    file,
    gzip_layer,
    osv,
    store_image,
    tar_layer,
    write_osv_dir,
)

LODASH = '{"name": "lodash", "version": "4.17.20"}'


@dataclass
class Setup:
    data: Path
    storage: Storage
    app: StoredImage
    other: StoredImage
    registry: CollectorRegistry
    reports: list[ScanReport]

    def service(self, config: ScanConfig | None = None,
                hook: Callable[[ScanReport], object] | None = None) -> ScanService:
        async def on_complete(report: ScanReport) -> None:
            self.reports.append(report)
            if hook is not None:
                hook(report)

        # Normal priority: the default ("idle") lets other work on a busy test machine starve scans.
        return ScanService(self.storage, self.data, config or ScanConfig(cpu_share=1.0, priority="normal"),
                           registry=self.registry,
                           on_complete=on_complete)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    data = tmp_path / "data"
    storage = Storage(data, chunk_size=DEFAULT_CHUNK_SIZE)
    base = gzip_layer([file("etc/os-release", ALPINE_OS_RELEASE)])
    app = store_image(storage, "team/app", "v1", [base, gzip_layer([file("srv/node_modules/lodash/package.json",
                                                                         LODASH)])])
    other = store_image(storage, "team/other", "v1", [base, gzip_layer([file(
        "srv/node_modules/left-pad/package.json", '{"name": "left-pad", "version": "1.3.0"}')])])
    import_database(data, write_osv_dir(tmp_path / "osv-v1", [
        osv("GHSA-35jh-r3h4-6jhm", "npm", "lodash", fixed="4.17.21",
            cvss="CVSS:3.1/AV:N/AC:L/PR:H/UI:N/S:U/C:H/I:H/A:H"),
        osv("GHSA-left-pad-0001", "npm", "left-pad", fixed="1.0.0"),
    ]))
    return Setup(data, storage, app, other, CollectorRegistry(), [])


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Waits for a worker thread's progress, which no trio event announces."""
    with trio.fail_after(20):
        while not predicate():  # noqa: ASYNC110 - the state changes in a worker thread
            await trio.sleep(0.01)


async def test_background_scans_results_and_metrics(setup: Setup, nursery: trio.Nursery) -> None:
    calls = []
    both_done = trio.Event()

    def hook(report: ScanReport) -> None:
        calls.append(report.digest)
        if len(calls) == 2:
            both_done.set()
        if len(calls) == 1:
            raise RuntimeError("the webhook is down")  # must not stop the service

    service = setup.service(hook=hook)
    await nursery.start(service.serve)
    assert service.enqueue("team/app", setup.app.digest)
    assert service.enqueue("team/other", str(setup.other.digest))
    with trio.fail_after(20):
        await both_done.wait()
    assert service.state(setup.app.digest) == service.state(setup.other.digest) == "scanned"
    stored = await service.report(setup.app.digest)
    assert stored is not None and stored.status == "complete"
    assert [f.id for _p, f in stored.findings] == ["GHSA-35jh-r3h4-6jhm"]
    result_file = setup.data / "scan" / "results" / "sha256" / f"{setup.app.digest.encoded}.json"
    assert result_file.is_file()
    assert setup.metric("seed_scans_total", {"result": "complete"}) == 2
    assert setup.metric("seed_scan_findings_total", {"severity": "high"}) == 1
    assert setup.metric("seed_scan_duration_seconds_count") == 2
    assert setup.metric("seed_scan_queue_depth") == 0
    assert setup.metric("seed_scan_layer_bytes_total") > 0
    # The lead's hook will attach the results as referrers; they store cleanly.
    await trio.to_thread.run_sync(replace_attachments, setup.storage, "team/app", build_attachments(stored))
    assert len(setup.storage.referrers("team/app", setup.app.digest)) == 2


async def test_the_queue_is_bounded_and_never_blocks(setup: Setup) -> None:
    service = setup.service(ScanConfig(queue_size=1, priority="normal"))
    assert service.enqueue("team/app", setup.app.digest)
    assert service.enqueue("team/app", setup.app.digest)  # already queued: nothing to add
    assert not service.enqueue("team/other", setup.other.digest)
    assert setup.metric("seed_scan_dropped_total") == 1
    assert setup.metric("seed_scan_queue_depth") == 1
    assert service.state(setup.app.digest) == "pending"
    assert service.state(setup.other.digest) == "unscanned"


async def test_scan_now_shares_one_scan(setup: Setup) -> None:
    service = setup.service()
    results: list[ScanReport] = []

    async def ask() -> None:
        results.append(await service.scan_now("team/app", setup.app.digest))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        nursery.start_soon(ask)
    assert [r.digest for r in results] == [str(setup.app.digest)] * 2
    assert setup.metric("seed_scans_total", {"result": "complete"}) == 1


async def test_a_scan_that_cannot_be_done_fails_alone(setup: Setup, nursery: trio.Nursery) -> None:
    from p2pd.oci.digest import digest_of
    from seed.scan.errors import ScanError

    service = setup.service()
    await nursery.start(service.serve)
    unknown = digest_of(b"never pushed")
    # The scan process reports the error; the service counts it and goes on.
    with pytest.raises(ScanError, match="manifest unknown"):
        await service.scan_now("team/app", unknown)
    assert setup.metric("seed_scans_total", {"result": "error"}) == 1
    assert service.state(unknown) == "unscanned"
    report = await service.scan_now("team/app", setup.app.digest)
    assert report.status == "complete" and setup.reports == [report]


async def test_a_new_database_rematches_only_affected_reports(setup: Setup, tmp_path: Path) -> None:
    service = setup.service(ScanConfig(cpu_share=1.0, priority="normal", database_poll_interval=3600))
    await service.scan_now("team/app", setup.app.digest)
    await service.scan_now("team/other", setup.other.digest)
    assert await service.check_database() == 0  # first look: the reports already use this import
    first_import = VulnDatabase.for_data_dir(setup.data).status().import_id
    setup.reports.clear()
    import_database(setup.data, write_osv_dir(tmp_path / "osv-v2", [
        osv("GHSA-35jh-r3h4-6jhm", "npm", "lodash", fixed="4.17.21",
            cvss="CVSS:3.1/AV:N/AC:L/PR:H/UI:N/S:U/C:H/I:H/A:H"),
        osv("GHSA-left-pad-0001", "npm", "left-pad", fixed="1.0.0"),
        osv("GHSA-new-lodash-0002", "npm", "lodash", fixed="4.17.22", severity_word="CRITICAL"),
    ]))
    assert await service.check_database() == 1
    assert [r.repository for r in setup.reports] == ["team/app"]
    app = await service.report(setup.app.digest)
    other = await service.report(setup.other.digest)
    assert app is not None and other is not None
    assert sorted(f.id for _p, f in app.findings) == ["GHSA-35jh-r3h4-6jhm", "GHSA-new-lodash-0002"]
    assert other.database is not None and other.database["import_id"] == first_import
    assert setup.metric("seed_scan_rematched_total") == 1
    # Two imports between checks: the changes of the first are not known, everything is re-matched.
    for name in ("osv-v3", "osv-v4"):
        import_database(setup.data, write_osv_dir(tmp_path / name, [osv("GHSA-x", "npm", "x", fixed="1")]))
    assert await service.check_database() == 2
    app = await service.report(setup.app.digest)
    assert app is not None and app.findings == []


async def test_shutdown_stops_a_running_scan(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pause after every piece read, for 99 times the CPU it used: the scan crawls.
    monkeypatch.setattr(service_module, "_PACE_SLICE", 0.0)
    slow = store_image(setup.storage, "team/big", "v1", [tar_layer([file("blob", os.urandom(4 * 1024 * 1024))])])
    service = setup.service(ScanConfig(cpu_share=0.01, priority="normal"))
    with trio.move_on_after(30) as watchdog:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.serve)
            service.enqueue("team/big", slow.digest)
            await wait_for(lambda: service.state(slow.digest) == "scanning"
                           and setup.metric("seed_scan_layer_bytes_total") > 0)
            started = trio.current_time()
            nursery.cancel_scope.cancel()
    assert not watchdog.cancelled_caught
    assert trio.current_time() - started < 5
    assert setup.metric("seed_scans_total", {"result": "cancelled"}) == 1
    assert service.results.load(slow.digest) is None


def test_pacer_limits_cpu_and_counts_bytes() -> None:
    import time

    counted: list[int] = []
    pacer = _Pacer(0.5, counted.append)
    started_wall, started_cpu = time.monotonic(), time.thread_time()
    while time.thread_time() - started_cpu < 0.2:
        sum(range(10_000))
        pacer(1024)
    wall = time.monotonic() - started_wall
    assert wall >= 0.3  # at half a core, 0.2 s of CPU take about 0.4 s
    assert counted and set(counted) == {1024}
