"""Progress of long CLI actions: a bar on a terminal, a plain line per interval elsewhere, and the
actions that report it (vulnerability database import, audit log check, seed gc)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from p2pd.oci.digest import digest_of
from p2pd.progress import show_progress
from seed.audit import FileAuditLog, make_event, verify_audit_log
from seed.scan.vulndb import import_database
from seed.storage import Storage
from tests.fixtures.scan.builders import osv, write_osv_dir
from tests.harness.tools import clean_env


class RecordingSink:
    def __init__(self) -> None:
        self.totals: list[float | None] = []
        self.done = 0.0

    def start(self, total: float | None) -> None:
        self.totals.append(total)
        self.done = 0.0

    def advance(self, amount: float = 1) -> None:
        self.done += amount


def test_plain_lines_at_most_once_per_interval() -> None:
    console = Console(file=io.StringIO(), width=200)
    now = [100.0]
    with show_progress("importing all.zip", label="files", console=console, clock=lambda: now[0],
                       interval=100) as progress:
        progress.start(400)
        for _ in range(400):
            now[0] += 1  # one file a second: a line after 100, 200, 300 and 400 s
            progress.advance()
    assert isinstance(console.file, io.StringIO)
    assert console.file.getvalue().splitlines() == [
        "importing all.zip: 100/400 files (25%)", "importing all.zip: 200/400 files (50%)",
        "importing all.zip: 300/400 files (75%)", "importing all.zip: 400/400 files (100%)",
    ]


def test_plain_lines_in_bytes_and_without_a_total() -> None:
    console = Console(file=io.StringIO(), width=200)
    now = [0.0]
    with show_progress("verifying", unit="bytes", console=console, clock=lambda: now[0], interval=1) as progress:
        progress.start(None)
        now[0] = 1.0
        progress.advance(3 * 2**20)
    assert isinstance(console.file, io.StringIO)
    assert console.file.getvalue() == "verifying: 3.0 MiB\n"


def test_terminal_shows_a_bar() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with show_progress("scanning lab/app", unit="bytes", console=console) as progress:
        progress.start(2**20)
        progress.advance(2**19)
    assert isinstance(console.file, io.StringIO)
    drawn = console.file.getvalue()
    assert "scanning lab/app" in drawn and "━" in drawn  # rich's bar


def test_vulndb_import_reports_each_file(tmp_path: Path) -> None:
    source = write_osv_dir(tmp_path / "osv", [osv(f"GHSA-{n:04d}", "PyPI", f"pkg{n}", fixed="1.0")
                                               for n in range(5)])
    sink = RecordingSink()
    import_database(tmp_path / "data", source, progress=sink)
    assert sink.totals == [5] and sink.done == 5


def test_audit_verify_reports_the_bytes_it_checked(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with FileAuditLog(directory, rotate_bytes=2048) as audit_log:  # small files: several rotations
        for index in range(40):
            audit_log.append(make_event("manifest.push", {"actor": "ci", "actor_kind": "robot",
                                                          "repository": f"team/app{index}"}))
    on_disk = sum(path.stat().st_size for path in directory.iterdir() if path.is_file())
    sink = RecordingSink()
    report = verify_audit_log(directory, sink)
    assert report.ok and report.records == 40 and len(report.files) > 1
    assert sink.totals == [on_disk] and sink.done == on_disk


def test_seed_vulndb_import_draws_a_bar_on_a_terminal(tmp_path: Path) -> None:
    source = write_osv_dir(tmp_path / "osv", [osv("GHSA-0001", "PyPI", "pkg", fixed="1.0")])
    controller, terminal = os.openpty()
    with subprocess.Popen([sys.executable, "-m", "seed", "vulndb", "import", str(source), "--data",
                           str(tmp_path / "data")], stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                          env=clean_env({"TERM": "xterm-256color", "COLUMNS": "120"}),
                          cwd=Path(__file__).parents[1]) as process:
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer of the terminal has closed it
                break
            if not chunk:
                break
            shown += chunk
        assert process.wait(timeout=60) == 0, shown
    os.close(controller)
    text = shown.decode(errors="replace")
    assert "importing osv" in text  # the bar, drawn and then erased
    assert "imported 1 advisories" in text


def test_seed_gc_reports_each_blob_directory(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "seed", chunk_size=2**20)
    blobs = [f"blob {n}".encode() for n in range(6)]
    for data in blobs:  # unreferenced: all go
        storage.store_blob_bytes("team/app", data, digest_of(data))
    prefixes = {str(digest_of(data)).split(":")[1][:2] for data in blobs}
    sink = RecordingSink()
    report = storage.collect_garbage(dry_run=False, grace=0, progress=sink)
    assert len(report.removed_blobs) == len(blobs)
    assert sink.totals == [len(prefixes)] and sink.done == len(prefixes)
