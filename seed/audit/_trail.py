"""``AuditTrail``: what the seed's request path talks to. ``record(action, fields)`` is the audit
hook (``seed.gate.AuditHook``, the authenticator's ``on_event``): it checks and timestamps the
event at once and never blocks the trio loop; ``serve`` writes queued events in a worker thread.

Rules/invariants:
- ``record`` builds the event immediately (so a bad field or a secret-looking key fails or
  is redacted at the call site, and the time is when it happened) and then:
  - while ``serve`` runs: queues it; the writer task hands batches to ``sink.extend`` in a
    worker thread (``trio.to_thread.run_sync``), so one fsync covers every event that arrived
    meanwhile (group commit) and the loop never waits for a disk;
  - otherwise (before ``serve`` starts, after it stops, in a CLI or a test): writes it at once,
    blocking, and raises ``AuditError`` if it cannot.
- Events are written in the order ``record`` was called. ``await flush()`` returns once
  everything recorded before it is on disk (for a handler that wants its record durable
  before it answers: ``trail.record(...); await trail.flush()``).
- When the sink fails (disk full), the writer keeps the queue and retries with backoff
  (``seed_audit_write_failures_total`` counts failures). Past ``max_pending`` queued events,
  new ones are dropped and counted (``seed_audit_events_dropped_total``): memory stays bounded.
  On cancellation the writer makes one last shielded attempt to write what is queued.
- Call ``record`` on the trio thread, or from a worker thread of the same run (it is woken
  through the trio token then).
- Events of command-line tools queued in ``DATA/audit/inbox`` (``_inbox``) are moved into
  the chain when the log is opened (``open_audit``), when ``serve`` starts, and then every
  ``_INBOX_INTERVAL`` seconds, one bounded round at a time, by the same writer task: the
  chain has one writer, and the request path never waits for the inbox.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from ..errors import AuditError
from ._chain import GENESIS_HASH, seal
from ._event import AuditEvent, AuditRecord, format_time, make_event
from ._file import AuditLogInUse, FileAuditLog
from ._inbox import AuditInbox
from ._layout import audit_directory
from ._sink import AuditQuery, AuditSink

if TYPE_CHECKING:
    from ..config import SeedConfig
    from ..metrics import SeedMetrics

__all__ = ["AuditMetrics", "AuditTrail", "open_audit"]

log = logging.getLogger("seed.audit")

_BATCH = 1000  # events per write (one fsync)
_RETRY_FIRST = 0.5  # seconds before the first retry after a failed write
_RETRY_MAX = 30.0
_INBOX_INTERVAL = 1.0  # seconds between looks at DATA/audit/inbox
_OPEN_WAIT = 5.0  # seconds open_audit waits for a command that is appending to the log
_OPEN_RETRY = 0.05


class AuditMetrics:
    """The audit log's Prometheus metrics, in the registry given (e.g. ``SeedMetrics.registry``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter("seed_audit_events", "Audit records written, by action", ["action"],
                              registry=registry)
        self.write_failures = Counter("seed_audit_write_failures", "Attempts to write audit records that failed",
                                      registry=registry)
        self.dropped = Counter("seed_audit_events_dropped",
                               "Audit events lost: queue full while the sink failed, or not written at shutdown",
                               registry=registry)
        self.pending = Gauge("seed_audit_pending_events", "Audit events recorded but not yet written",
                             registry=registry)
        self.head_seq = Gauge("seed_audit_head_seq",
                              "seq of the newest audit record; it never goes down unless the log was cut",
                              registry=registry)


class AuditTrail:
    """The seed's audit log front: the hook, the writer task and the metrics (module rules above).

    Args:
        sink: where records go (``FileAuditLog``; ``MemoryAuditLog`` in tests).
        registry: the Prometheus registry for ``AuditMetrics`` (default: a private one).
        max_pending: queued events kept while the sink fails; more are dropped.
        clock: the wall clock for event times (tests pass a fixed one).
        inbox: events queued by command-line tools, moved into ``sink`` by ``serve``
            (``open_audit`` passes ``DATA/audit/inbox``; ``None``: there is none).
    """

    def __init__(self, sink: AuditSink, *, registry: CollectorRegistry | None = None, max_pending: int = 100_000,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC), inbox: AuditInbox | None = None) -> None:
        self.sink = sink
        self.inbox = inbox
        self.metrics = AuditMetrics(registry if registry is not None else CollectorRegistry())
        self.metrics.head_seq.set(sink.head[0])
        self._max_pending = max_pending
        self._clock = clock
        self._pending: deque[AuditEvent] = deque()
        self._serving = False
        self._overflowing = False
        self._submitted = 0  # events queued while serving
        self._settled = 0  # of those, written
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._trio_thread: int | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def __call__(self, action: str, fields: Mapping[str, Any] | None = None) -> None:
        """The trail is itself an ``AuditHook``: the same as ``record``."""
        self.record(action, fields)

    def record(self, action: str, fields: Mapping[str, Any] | None = None) -> None:
        """Records one event; the ``AuditHook`` signature ``(action, fields)``.

        Args:
            action: e.g. ``login.success`` (see ``ACTIONS``).
            fields: ``AuditEvent`` fields other than action and time (``actor``, ``source``,
                ``repository``, ``detail``...).

        Raises:
            AuditError: an unknown field or a wrong type (a bug at the call site); or, when
                the writer is not running, the sink could not store it.
        """
        self.submit(make_event(action, fields, time=format_time(self._clock())))

    def submit(self, event: AuditEvent) -> None:
        """Like ``record``, for an event built by the caller."""
        if not self._serving:
            self._count(self.sink.extend([event]))
            return
        if len(self._pending) >= self._max_pending:
            self.metrics.dropped.inc()
            if not self._overflowing:
                self._overflowing = True
                log.error("audit queue full (%d events, the sink keeps failing): dropping new events",
                          len(self._pending))
            return
        self._pending.append(event)
        self._submitted += 1
        self.metrics.pending.set(len(self._pending))
        if threading.get_ident() == self._trio_thread:
            self._wakeup.set()
        elif self._token is not None:
            self._token.run_sync_soon(lambda: self._wakeup.set())

    async def flush(self) -> None:
        """Waits until every event recorded so far is written. Bound it with ``trio.fail_after``.

        Raises:
            AuditError: the writer stopped with events unwritten.
        """
        target = self._submitted
        while self._settled < target:
            if not self._serving:
                raise AuditError(f"{target - self._settled} audit event(s) not written: the audit writer stopped")
            await self._progress.wait()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Writes queued events until cancelled; start it with ``nursery.start(trail.serve)``."""
        if self._serving:
            raise RuntimeError("AuditTrail.serve is already running")
        self._trio_thread = threading.get_ident()
        self._token = trio.lowlevel.current_trio_token()
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._serving = True
        try:
            task_status.started()
            failures = 0
            inbox_due = trio.current_time()  # at once: what was queued while the seed was starting
            while True:
                # A new event before draining: a record() from now on wakes the next wait.
                self._wakeup = trio.Event()
                if self.inbox is not None and trio.current_time() >= inbox_due:
                    await self._ingest_inbox(self.inbox)
                    inbox_due = trio.current_time() + _INBOX_INTERVAL
                while self._pending:
                    try:
                        await self._write_batch()
                        failures = 0
                    except AuditError as exc:
                        failures += 1
                        delay = min(_RETRY_MAX, _RETRY_FIRST * 2 ** (failures - 1))
                        log.error("cannot write %d audit event(s), retrying in %.1fs: %s",
                                  len(self._pending), delay, exc)
                        await trio.sleep(delay)
                with trio.move_on_at(inbox_due if self.inbox is not None else math.inf):
                    await self._wakeup.wait()
        finally:
            self._serving = False
            self._trio_thread = self._token = None
            with trio.CancelScope(shield=True):
                await self._write_remaining()

    async def _ingest_inbox(self, inbox: AuditInbox) -> None:
        try:
            records = await trio.to_thread.run_sync(inbox.ingest, self.sink)
        except (AuditError, OSError) as exc:
            # The files stay where they are; the next look tries again.
            self.metrics.write_failures.inc()
            log.error("cannot move queued audit events from %s into the log: %s", inbox.path, exc)
            return
        self._count(records)
        if records:
            log.info("moved %d queued audit event(s) from %s into the log", len(records), inbox.path)

    async def _write_batch(self) -> None:
        batch = list(itertools.islice(self._pending, _BATCH))
        try:
            records = await trio.to_thread.run_sync(self.sink.extend, batch)
        except AuditError:
            self.metrics.write_failures.inc()
            raise
        for _ in batch:
            self._pending.popleft()
        self._settled += len(batch)
        self._overflowing = False
        self.metrics.pending.set(len(self._pending))
        self._count(records)
        self._progress.set()
        self._progress = trio.Event()

    async def _write_remaining(self) -> None:
        try:
            while self._pending:
                await self._write_batch()
        except AuditError as exc:
            lost = len(self._pending)
            self._pending.clear()
            self.metrics.dropped.inc(lost)
            self.metrics.pending.set(0)
            log.error("audit writer stopped: %d event(s) could not be written: %s", lost, exc)
        self._progress.set()

    def close(self) -> None:
        """Closes the sink; call it once ``serve`` has returned and nothing records any more."""
        self.sink.close()

    def _count(self, records: Sequence[AuditRecord]) -> None:
        for record in records:
            self.metrics.events.labels(record.action).inc()
        if records:
            self.metrics.head_seq.set(records[-1].seq)


def open_audit(config: SeedConfig, metrics: SeedMetrics | None = None) -> AuditTrail:
    """The seed's audit trail as ``[audit]`` configures it: a ``FileAuditLog`` in ``DATA/audit``,
    counted in ``metrics.registry``. Blocks (it opens the log, repairs a torn tail, waits up to
    ``_OPEN_WAIT`` seconds for a command that is appending, and moves events queued in
    ``DATA/audit/inbox`` into the chain): call it in a worker thread. Start ``trail.serve`` in
    the nursery, and ``trail.close()`` after it.

    With ``enabled = false`` events are still checked (a bad field is a bug either way) and
    counted, but not kept.

    Raises:
        AuditError: the log cannot be opened (in use, unwritable, or its newest record is forged).
    """
    registry = metrics.registry if metrics is not None else None
    if not config.audit.enabled:
        return AuditTrail(_DiscardingSink(), registry=registry)
    directory = audit_directory(config.storage.data)
    sink = _open_waiting(directory, config.audit.rotate_bytes)
    try:
        inbox = AuditInbox(directory)
        trail = AuditTrail(sink, registry=registry, inbox=inbox)
        try:
            # Before anything else is recorded: events of commands run while the seed was down
            # (or racing its start) are older than anything this run records.
            trail._count(inbox.ingest_all(sink))
        except (AuditError, OSError) as exc:
            log.error("cannot move queued audit events from %s into the log (the writer retries): %s",
                      inbox.path, exc)
        return trail
    except BaseException:
        sink.close()
        raise


def _open_waiting(directory: Path, rotate_bytes: int) -> FileAuditLog:
    """``FileAuditLog``, waiting a little while a command (``seed robot create``) appends to the
    log: it holds the lock for milliseconds. Another running seed holds it for good."""
    deadline = time.monotonic() + _OPEN_WAIT
    while True:
        try:
            return FileAuditLog(directory, rotate_bytes=rotate_bytes)
        except AuditLogInUse:
            if time.monotonic() >= deadline:
                raise
            time.sleep(_OPEN_RETRY)


class _DiscardingSink:
    """``[audit] enabled = false``: seals records so callers see the usual values, keeps none."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._head = (0, GENESIS_HASH)

    def append(self, event: AuditEvent) -> AuditRecord:
        return self.extend([event])[0]

    def extend(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        with self._lock:
            records = []
            seq, prev = self._head
            for event in events:
                record, _line = seal(event, seq + 1, prev)
                seq, prev = record.seq, record.hash
                records.append(record)
            self._head = (seq, prev)
            return records

    def iter_records(self) -> Iterator[AuditRecord]:
        return iter(())

    def query(self, query: AuditQuery) -> Iterator[AuditRecord]:
        return iter(())

    @property
    def head(self) -> tuple[int, str]:
        return self._head

    def close(self) -> None:
        pass
