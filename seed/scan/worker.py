"""The scanner's heavy work in a child process of the seed: ``python -m seed.scan.worker scan|rematch``.

Why a process and not a thread: a scan is CPU-bound Python for most of its time (tar headers,
package databases, version matching, and, for the referrers, CycloneDX building and schema
validation: seconds per image of a thousand packages). In a thread of the seed it would hold
the GIL against the one trio thread that serves every pull, and each request would wait for
it. In its own process, at a lower CPU priority (``[scan] priority``) and paced to ``cpu_share``
of a core, it never stands between a client and the bytes it asked for.

Protocol (``ScanService`` is the only caller): one JSON request on stdin; JSON lines on
stdout, in order:

- ``{"progress": N}``: N more compressed layer bytes were read (for ``seed_scan_layer_bytes``);
- ``{"rematched": "sha256:...", "changed": true}``: one re-matched report was stored (rematch);
- last, ``{"done": "sha256:..."}`` (scan) or ``{"done": N}`` (rematch), or ``{"error": "..."}``
  for a scan that cannot be done (the manifest is unknown, the disk is full).

Reports are stored under ``DATA/scan/results/`` before ``done`` is written, so the parent reads
them from there. With ``attach`` the SBOM and report referrers are stored too (``Storage``
writes are atomic files: safe beside the serving process, like ``seed gc``); nothing is
attached for an incomplete scan (see ``SeedRegistry.scan_completed``). A crash or a kill
(the service cancels a scan by killing its process) leaves the previous report or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

__all__ = ["main"]

_PROGRESS_INTERVAL = 0.2  # seconds between progress lines


class _Reporter:
    """Writes the protocol's lines to stdout, progress at most every ``_PROGRESS_INTERVAL``."""

    def __init__(self) -> None:
        self._pending = 0
        self._last = 0.0

    def line(self, document: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(document) + "\n")
        sys.stdout.flush()

    def progress(self, nbytes: int) -> None:
        self._pending += nbytes
        now = time.monotonic()
        if now - self._last >= _PROGRESS_INTERVAL:
            self.flush()
            self._last = now

    def flush(self) -> None:
        if self._pending:
            self.line({"progress": self._pending})
            self._pending = 0


def _paced(share: float, work: Callable[[], Any]) -> Any:
    """Runs ``work`` (not streaming, so not paced as it goes), then rests in proportion to the
    CPU time it took, as the layer pacer does."""
    started = time.thread_time()
    result = work()
    if share < 1.0:
        time.sleep((time.thread_time() - started) * (1.0 - share) / share)
    return result


def _run(command: str, request: dict[str, Any], reporter: _Reporter) -> None:
    from p2pd.oci.errors import OCIError
    from seed.storage import Storage

    from .config import LayerLimits
    from .errors import ScanError
    from .referrers import build_attachments, replace_attachments
    from .scanner import ScanReport, rematch, scan_image
    from .service import ScanResultStore, _Pacer, rematch_needed, result_key
    from .vulndb import VulnDatabase

    data = Path(request["data"])
    share = float(request["cpu_share"])
    storage = Storage(data, chunk_size=int(request["chunk_size"]), clean_tmp=False)
    database = VulnDatabase(Path(request["database"]))
    results = ScanResultStore(data)

    def attach(report: ScanReport) -> None:
        if not request["attach"] or report.status == "incomplete":
            return
        try:
            _paced(share, lambda: replace_attachments(storage, report.repository, build_attachments(report)))
        except (ScanError, OSError, OCIError) as exc:
            # The report stands (and is served by the API); only its referrers are missing.
            sys.stderr.write(f"seed.scan.worker: cannot attach the results of {report.digest}: {exc}\n")

    if command == "scan":
        pacer = _Pacer(share, reporter.progress, pace_slice=float(request["pace_slice"]))
        try:
            report = scan_image(storage, request["repository"], request["digest"],
                                database=database if database.exists() else None,
                                limits=LayerLimits(**request["limits"]), progress=pacer)
            results.save(report)
        except (ScanError, OSError) as exc:
            reporter.line({"error": str(exc)})
            return
        reporter.flush()
        attach(report)
        reporter.line({"done": report.digest})
        return

    changed = frozenset((str(e), str(p)) for e, p in request["changed"]) if request["changed"] is not None else None
    count = 0
    if database.exists():
        for digest in results.digests():
            stored = results.load(digest)
            if stored is None or not rematch_needed(stored, changed, request["stale_only"]):
                continue
            fresh: ScanReport = _paced(share, partial(rematch, stored, database))
            try:
                results.save(fresh)
            except OSError as exc:
                # The previous report stays; it is re-matched again at the next start-up.
                sys.stderr.write(f"seed.scan.worker: cannot store the re-matched report of {digest}: {exc}\n")
                continue
            is_changed = result_key(fresh) != result_key(stored)
            if is_changed:
                attach(fresh)
            count += 1
            reporter.line({"rematched": str(digest), "changed": is_changed})
    reporter.line({"done": count})


def _lower_priority(priority: str) -> None:
    """``idle``: SCHED_IDLE, CPU time nothing else wants (nice 19 where that does not exist);
    ``low``: nice 10. If neither is allowed, the CPU share alone bounds the scan."""
    if priority == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except (AttributeError, OSError):
            priority, steps = "low", 19
    else:
        steps = 10
    if priority == "low":
        with contextlib.suppress(OSError):
            os.nice(steps)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ("scan", "rematch"):
        sys.stderr.write("usage: python -m seed.scan.worker scan|rematch < request.json\n")
        return 2
    request = json.loads(sys.stdin.buffer.read())
    _lower_priority(str(request.get("priority", "normal")))
    _run(args[0], request, _Reporter())
    return 0


if __name__ == "__main__":
    sys.exit(main())
