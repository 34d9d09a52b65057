"""Audit events from commands that run beside the seed (``seed robot create|revoke``).

Rules/invariants:
- The running seed owns the log (a file lock). A command that finds the log free appends
  directly; otherwise it drops the event, already checked and timestamped, as one crash-safe
  file into ``DATA/audit/inbox/`` and the seed's writer task moves it into the chain.
- An inbox file is deleted only after its event is durably in the chain. Each carries an id
  (``detail.inbox_id``); ids already among the newest records are not appended twice, so a
  crash between append and delete costs no duplicate.
- A malformed inbox file is moved to ``inbox/rejected/`` and an ``audit.inbox_rejected`` event
  says so: nothing that arrives is silently lost.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from p2pd.fsutil import fsync_dir, write_atomic

from ..errors import AuditError
from ._event import AuditEvent, format_time, make_event
from ._file import FileAuditLog
from ._layout import audit_directory
from ._sink import AuditSink

__all__ = ["INBOX_DIR", "MAX_INBOX_FILE", "ingest_inbox", "pending_inbox", "record_offline"]

log = logging.getLogger("seed.audit")

INBOX_DIR = "inbox"
MAX_INBOX_FILE = 64 * 1024
_INGEST_BATCH = 256
_RECENT_IDS = 1024  # newest records searched for ids already appended


def record_offline(data: Path, action: str, fields: Mapping[str, Any], *, rotate_bytes: int) -> str:
    """Records an event from a command-line tool; returns ``"appended"`` or ``"queued"``."""
    detail = dict(fields.get("detail") or {})
    detail["inbox_id"] = secrets.token_hex(16)
    event = make_event(action, {**fields, "detail": detail}, time=format_time(datetime.now(UTC)))
    directory = audit_directory(data)
    try:
        sink = FileAuditLog(directory, rotate_bytes=rotate_bytes)
    except AuditError as exc:
        if "already open" not in str(exc):
            raise
        inbox = directory / INBOX_DIR
        inbox.mkdir(mode=0o700, exist_ok=True)
        name = f"{time.time_ns():020d}-{detail['inbox_id'][:8]}.json"
        write_atomic(inbox / name, json.dumps(event.to_dict(), sort_keys=True).encode(), mode=0o600)
        return "queued"
    try:
        sink.extend([event])
    finally:
        sink.close()
    return "appended"


def pending_inbox(directory: Path) -> list[Path]:
    """Inbox files waiting for the seed, oldest first."""
    inbox = directory / INBOX_DIR
    if not inbox.is_dir():
        return []
    return sorted(p for p in inbox.iterdir() if p.is_file() and p.suffix == ".json")


def _recent_ids(sink: AuditSink) -> set[str]:
    ids: list[str] = []
    for record in sink.iter_records():
        inbox_id = record.event.detail.get("inbox_id")
        if isinstance(inbox_id, str):
            ids.append(inbox_id)
    return set(ids[-_RECENT_IDS:])


def ingest_inbox(sink: AuditSink, directory: Path) -> int:
    """Moves queued events into the chain (blocking: run it in a worker thread); returns how many."""
    files = pending_inbox(directory)[:_INGEST_BATCH]
    if not files:
        return 0
    seen = _recent_ids(sink)
    events: list[AuditEvent] = []
    done: list[Path] = []
    rejected: list[tuple[Path, str]] = []
    for path in files:
        try:
            if path.stat().st_size > MAX_INBOX_FILE:
                raise ValueError("too large")
            event = AuditEvent.from_dict(json.loads(path.read_bytes()))
        except (OSError, ValueError, TypeError, KeyError, AuditError) as exc:
            rejected.append((path, str(exc)[:200]))
            continue
        inbox_id = (event.detail or {}).get("inbox_id")
        if not (isinstance(inbox_id, str) and inbox_id in seen):
            events.append(event)
        done.append(path)
    for path, reason in rejected:
        events.append(make_event("audit.inbox_rejected", {"detail": {"file": path.name, "reason": reason}},
                                 time=format_time(datetime.now(UTC))))
    if events:
        sink.extend(events)  # durable before any file goes away
    for path in done:
        path.unlink(missing_ok=True)
    if rejected:
        quarantine = directory / INBOX_DIR / "rejected"
        quarantine.mkdir(mode=0o700, exist_ok=True)
        for path, reason in rejected:
            log.error("audit inbox file %s rejected: %s", path.name, reason)
            os.replace(path, quarantine / path.name)
        fsync_dir(quarantine)
    fsync_dir(directory / INBOX_DIR)
    return len(events)
