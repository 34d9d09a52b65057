"""Audit events of commands that run beside the seed (``seed robot create|revoke``).

The running seed owns the log (``FileAuditLog`` holds its lock), so a command-line tool
cannot append to it. ``record_offline`` appends directly when the log is free, and otherwise
queues the event in ``DATA/audit/inbox/``; the seed's writer task (``AuditTrail.serve``) and
``open_audit`` move queued events into the chain with ``AuditInbox.ingest``.

Rules/invariants:
- A queued event is checked and timestamped by the command (``make_event``), then written as
  one file with ``write_atomic`` (complete or absent, mode 0600), named
  ``<time ns, 20 digits>-<inbox id>.json`` so that name order is the order of the events.
- Every event from a command carries ``detail.inbox_id`` (a random UUID). An inbox file is
  deleted only after its event is durably in the chain, and ids already in the chain (the
  newest records on disk, and everything this process appended) are not appended again: a
  crash between the append and the delete costs no duplicate.
- One ingest round reads at most ``batch`` files of at most ``max_file_bytes`` each, oldest
  first, and appends them with one ``extend`` (all or nothing, in name order).
- A malformed file (not JSON, unknown fields, no inbox id, an ``audit.*`` action, too big,
  not a regular file) is recorded by an ``audit.inbox_rejected`` record and then moved to
  ``inbox/rejected/``: whatever arrives is accounted for, nothing is silently dropped.
- Actions ``audit.*`` belong to the log itself (``audit.pruned`` declares where history
  starts): they are never taken from the inbox.
- Blocking (file I/O, fsync); trio code runs it in a worker thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from p2pd.fsutil import fsync_dir, write_atomic

from ..errors import AuditError
from ._chain import canonical
from ._event import AuditEvent, AuditRecord, format_time, make_event
from ._file import AuditLogInUse, FileAuditLog
from ._layout import INBOX_DIR, LIVE_NAME, REJECTED_DIR, audit_directory, complete_end, list_inbox, list_rotated
from ._sink import AuditSink

__all__ = ["AuditInbox", "record_offline"]

log = logging.getLogger("seed.audit")

_BATCH = 256  # inbox files per ingest round
_MAX_FILE_BYTES = 64 * 1024  # an inbox file larger than this is rejected unread
_RECENT = 1024  # newest records on disk searched for inbox ids already appended
_REMEMBERED = 65_536  # ids this process appended, kept to skip files it could not delete
_TAIL_BLOCK = 256 * 1024
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_REASON_CHARS = 200
_ID_RE = re.compile(r"[0-9a-f]{32}")
_ID_MARK = b'"inbox_id"'
_REJECTED_MARK = b'"audit.inbox_rejected"'


class _Malformed(Exception):
    """An inbox file that cannot be taken into the chain; the message says why."""


class AuditInbox:
    """``DATA/audit/inbox/``: events queued by command-line tools (module rules above).

    Args:
        directory: the audit directory, ``DATA/audit``.
        batch: files taken per ``ingest`` round.
        max_file_bytes: larger files are rejected unread.
    """

    def __init__(self, directory: Path, *, batch: int = _BATCH, max_file_bytes: int = _MAX_FILE_BYTES) -> None:
        if batch < 1 or max_file_bytes < 1:
            raise ValueError("batch and max_file_bytes must be positive")
        self.directory = Path(directory)
        self.batch = batch
        self.max_file_bytes = max_file_bytes
        # Keys of what is already in the chain: "id:<inbox id>" and "rejected:<file name>".
        # Loaded from the newest records on the first round that has files, then kept up to
        # date by this process (the only writer while it holds the log).
        self._seen: dict[str, None] | None = None

    @property
    def path(self) -> Path:
        return self.directory / INBOX_DIR

    def queue(self, event: AuditEvent) -> Path:
        """Writes ``event`` (which must carry ``detail.inbox_id``) as one inbox file.

        Raises:
            OSError: the file cannot be written.
        """
        inbox_id = event.detail.get("inbox_id")
        if not isinstance(inbox_id, str) or not _ID_RE.fullmatch(inbox_id):
            raise ValueError("a queued audit event needs detail.inbox_id (32 hex digits)")
        if not self.path.is_dir():
            self.path.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            fsync_dir(self.directory)
        target = self.path / f"{time.time_ns():020d}-{inbox_id}.json"
        write_atomic(target, canonical(event.to_dict()), mode=_FILE_MODE)
        return target

    def pending(self) -> list[Path]:
        """Queued files not yet in the chain, oldest first."""
        return list_inbox(self.directory)

    def ingest(self, sink: AuditSink) -> list[AuditRecord]:
        """One bounded round: appends up to ``batch`` queued events to ``sink``, in order, then
        removes their files. Returns the records written (rejection notes included).

        Raises:
            AuditError: the sink could not store them (nothing was removed then).
        """
        return self._round(sink)[0]

    def ingest_all(self, sink: AuditSink) -> list[AuditRecord]:
        """Rounds of ``ingest`` until the inbox is empty (or a round removes nothing, e.g.
        files that cannot be deleted: they are skipped, not appended again, next time).

        Raises:
            AuditError: the sink could not store them.
        """
        written: list[AuditRecord] = []
        while True:
            records, taken, removed = self._round(sink)
            written += records
            if taken < self.batch or removed == 0:
                return written

    # -- one round ---------------------------------------------------------------------------

    def _round(self, sink: AuditSink) -> tuple[list[AuditRecord], int, int]:
        try:
            paths = self.pending()[: self.batch]
        except OSError as exc:
            raise AuditError(f"cannot read the audit inbox {self.path}: {exc}") from exc
        if not paths:
            return [], 0, 0
        seen = self._seen_in(sink)
        events: list[AuditEvent] = []
        keys: list[str] = []
        to_delete: list[Path] = []
        to_reject: list[tuple[Path, str]] = []
        for path in paths:
            try:
                event = self._read(path)
            except _Malformed as exc:
                reason = str(exc)[:_REASON_CHARS]
                key = f"rejected:{path.name}"
                if key not in seen and key not in keys:
                    events.append(make_event("audit.inbox_rejected", {
                        "actor": "seed", "actor_kind": "system", "detail": {"file": path.name, "reason": reason}},
                        time=format_time(datetime.now(UTC))))
                    keys.append(key)
                to_reject.append((path, reason))
                continue
            key = f"id:{event.detail['inbox_id']}"
            if key in seen or key in keys:
                # Appended before, and the process stopped before it deleted the file.
                log.info("audit inbox file %s is already in the log: removing it", path.name)
            else:
                events.append(event)
                keys.append(key)
            to_delete.append(path)
        records = sink.extend(events) if events else []  # durable before any file goes away
        for key in keys:
            self._remember(key)
        removed = 0
        for path in to_delete:
            removed += _remove(path)
        for path, reason in to_reject:
            log.error("audit inbox file %s rejected (moved to %s/%s/): %s", path.name, INBOX_DIR, REJECTED_DIR,
                      reason)
            removed += self._quarantine(path)
        if removed:
            try:
                fsync_dir(self.path)
            except OSError as exc:
                log.warning("cannot sync the audit inbox directory: %s", exc)
        return records, len(paths), removed

    def _read(self, path: Path) -> AuditEvent:
        try:
            # O_NOFOLLOW and O_NONBLOCK: a symlink or a FIFO dropped in the inbox is
            # rejected, not followed or waited on.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _Malformed(f"cannot be opened: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as handle:
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise _Malformed("is not a regular file")
                data = handle.read(self.max_file_bytes + 1)
            except OSError as exc:
                raise _Malformed(f"cannot be read: {exc.strerror or exc}") from None
        if len(data) > self.max_file_bytes:
            raise _Malformed(f"is larger than {self.max_file_bytes} bytes")
        try:
            document = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise _Malformed("is not JSON") from None
        if not isinstance(document, dict):
            raise _Malformed("is not a JSON object")
        action, when = document.pop("action", None), document.pop("time", None)
        if not isinstance(action, str) or not isinstance(when, str):
            raise _Malformed("has no action or time")
        if action.startswith("audit."):
            raise _Malformed(f"action {action!r} belongs to the audit log itself")
        try:
            event = make_event(action, document, time=when)
        except (AuditError, TypeError) as exc:
            raise _Malformed(str(exc)) from None
        inbox_id = event.detail.get("inbox_id")
        if not isinstance(inbox_id, str) or not _ID_RE.fullmatch(inbox_id):
            raise _Malformed("has no detail.inbox_id (32 hex digits)")
        return event

    def _quarantine(self, path: Path) -> int:
        quarantine = self.path / REJECTED_DIR
        try:
            quarantine.mkdir(mode=_DIR_MODE, exist_ok=True)
            os.replace(path, quarantine / path.name)
            fsync_dir(quarantine)
        except OSError as exc:
            log.error("cannot move the rejected audit inbox file %s aside: %s", path.name, exc)
            return 0
        return 1

    # -- what is already in the chain -----------------------------------------------------------

    def _seen_in(self, sink: AuditSink) -> dict[str, None]:
        if self._seen is None:
            if isinstance(sink, FileAuditLog):
                keys = _keys_of_lines(_tail_lines(sink.directory, _RECENT))
            else:
                keys = _keys_of_events(record.event for record in deque(sink.iter_records(), maxlen=_RECENT))
            self._seen = dict.fromkeys(keys)
        return self._seen

    def _remember(self, key: str) -> None:
        assert self._seen is not None
        self._seen[key] = None
        while len(self._seen) > _REMEMBERED:
            del self._seen[next(iter(self._seen))]


def record_offline(data: Path, action: str, fields: Mapping[str, Any], *,
                   rotate_bytes: int) -> Literal["appended", "queued"]:
    """Records an event of a command-line tool in the audit log of data directory ``data``.

    If the log is free, appends it directly (after any events still queued in the inbox, so
    the chain keeps their order). If the seed holds the log, or it cannot be appended to
    right now, queues it in ``DATA/audit/inbox/`` for the seed to move in.

    Args:
        data: the seed's data directory.
        action: e.g. ``robot.create``.
        fields: ``AuditEvent`` fields (``actor``, ``actor_kind``, ``detail``...); a
            ``detail.inbox_id`` is added.
        rotate_bytes: ``[audit] rotate_bytes``, for a direct append.

    Returns:
        ``"appended"`` (in the chain now) or ``"queued"`` (in the inbox).

    Raises:
        AuditError: a bad field, an ``audit.*`` action, or the event could be neither
            appended nor queued.
    """
    values = dict(fields)
    detail = {**dict(values.pop("detail", None) or {}), "inbox_id": uuid.uuid4().hex}
    event = make_event(action, {**values, "detail": detail}, time=format_time(datetime.now(UTC)))
    if event.action.startswith("audit."):
        raise AuditError(f"action {action!r} belongs to the audit log itself")
    directory = audit_directory(data)
    inbox = AuditInbox(directory)
    try:
        sink = FileAuditLog(directory, rotate_bytes=rotate_bytes)
    except AuditLogInUse:
        return _queue(inbox, event)
    except AuditError as exc:
        log.warning("cannot append to the audit log (%s): the event waits in %s", exc, inbox.path)
        return _queue(inbox, event)
    try:
        inbox.ingest_all(sink)
        sink.extend([event])
    except AuditError as exc:
        log.warning("cannot append to the audit log (%s): the event waits in %s", exc, inbox.path)
        return _queue(inbox, event)
    finally:
        sink.close()
    return "appended"


def _queue(inbox: AuditInbox, event: AuditEvent) -> Literal["queued"]:
    try:
        inbox.queue(event)
    except OSError as exc:
        raise AuditError(f"cannot queue the audit event {event.action} in {inbox.path}: {exc}") from exc
    return "queued"


def _remove(path: Path) -> int:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        # Its event is in the chain and remembered: the file is skipped until it can go.
        log.warning("cannot remove the audit inbox file %s: %s", path.name, exc)
        return 0
    return 1


def _keys_of_events(events: Iterable[AuditEvent]) -> list[str]:
    keys = []
    for event in events:
        if event.action == "audit.inbox_rejected":
            name = event.detail.get("file")
            if isinstance(name, str):
                keys.append(f"rejected:{name}")
        else:
            inbox_id = event.detail.get("inbox_id")
            if isinstance(inbox_id, str):
                keys.append(f"id:{inbox_id}")
    return keys


def _keys_of_lines(lines: Iterable[bytes]) -> list[str]:
    events = []
    for line in lines:
        if _ID_MARK not in line and _REJECTED_MARK not in line:
            continue  # most records: no need to parse them
        try:
            document = json.loads(line)
            events.append(AuditEvent.from_dict(document))
        except (ValueError, TypeError, AttributeError, AuditError):
            continue  # a damaged line is verify's business; it holds no id we could trust
    return _keys_of_events(events)


def _tail_lines(directory: Path, count: int) -> list[bytes]:
    """The newest ``count`` complete lines of the log (live file, then rotated files), oldest first."""
    paths = [directory / LIVE_NAME] + [path for _seq, path in reversed(list_rotated(directory))]
    lines: list[bytes] = []
    for path in paths:
        if len(lines) >= count:
            break
        lines = _file_tail(path, count - len(lines)) + lines
    return lines


def _file_tail(path: Path, count: int) -> list[bytes]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        position = complete_end(fd, os.fstat(fd).st_size)  # an incomplete last line is no record
        blocks: list[bytes] = []
        newlines = 0
        while position > 0 and newlines <= count:
            start = max(0, position - _TAIL_BLOCK)
            block = os.pread(fd, position - start, start)
            blocks.append(block)
            newlines += block.count(b"\n")
            position = start
    finally:
        os.close(fd)
    lines = b"".join(reversed(blocks)).split(b"\n")[:-1]
    if position > 0:
        lines = lines[1:]  # cut in the middle: not a whole line
    return lines[-count:]
