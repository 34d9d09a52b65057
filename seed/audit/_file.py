"""``FileAuditLog``: the audit log as append-only JSON-lines files under ``DATA/audit/``.

Rules/invariants:
- One writer: opening takes an exclusive ``flock`` on ``.lock`` (released by the kernel when
  the process dies, so kill -9 never leaves it stuck). Readers (``verify``, ``query``) take no
  lock and may run while the seed appends.
- ``extend`` writes all its lines with ``write`` on an ``O_APPEND`` descriptor, then
  ``fdatasync``, before it returns: a record handed back is on disk. If the write or the sync
  fails, the file is cut back to its previous size and nothing of the call is kept. If even
  that fails the log refuses further appends until it is reopened (which repairs the tail).
- On open, an incomplete last line (a write interrupted by kill -9 or power loss) is moved
  aside to ``torn/`` and cut off, and an ``audit.tail_truncated`` record saying so is the next
  record, chained to the last complete one.
- Rotation: before a write, if the live file has reached ``rotate_bytes``, it is renamed to
  ``audit-<first seq>.log`` (made read-only) and a new live file is created. The chain just
  continues: the new file's first record has the previous file's last hash as ``prev``.
  A crash between the rename and the create leaves no live file; the next open creates it.
- Methods block (write, fsync) and are thread-safe; trio code calls them in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from p2pd.fsutil import fsync_dir, write_atomic

from ..errors import AuditError
from ._chain import GENESIS_HASH, record_from_line, seal
from ._event import AuditEvent, AuditRecord, format_time
from ._layout import (
    LIVE_NAME,
    LOCK_NAME,
    TORN_DIR,
    complete_end,
    first_line,
    last_line,
    list_rotated,
    open_snapshot,
    rotated_name,
)
from ._sink import AuditQuery
from ._verify import verify_audit_log

__all__ = ["DEFAULT_ROTATE_BYTES", "AuditLogInUse", "FileAuditLog", "PruneReport", "iter_directory_records"]

log = logging.getLogger("seed.audit")

DEFAULT_ROTATE_BYTES = 64 * 1024 * 1024
_DIR_MODE = 0o750
_FILE_MODE = 0o640  # audit records name users and addresses: not for everyone to read
_ROTATED_MODE = 0o440


class AuditLogInUse(AuditError):
    """Another writer holds the audit log's lock: the running seed, or a command appending."""


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What ``FileAuditLog.prune`` removed (or would remove, with ``dry_run``).

    Attributes:
        removed: names of the rotated files.
        records: how many records they held.
        first_seq: where the kept history starts now (``None`` if nothing was removed).
        dry_run: nothing was changed.
    """

    removed: tuple[str, ...]
    records: int
    first_seq: int | None
    dry_run: bool = False


class FileAuditLog:
    """``AuditSink`` on files, hash-chained, rotated by size, crash-safe (see the module rules).

    Args:
        directory: the audit directory, ``DATA/audit`` (``audit_directory(data)``); created if missing.
        rotate_bytes: the live file is rotated once it holds this many bytes.

    Raises:
        AuditLogInUse: another process (or an unclosed ``FileAuditLog``) has the log open.
        AuditError: the directory cannot be used, or the newest record does not verify (then
            run ``seed audit verify`` and investigate before moving the damaged file aside: the
            seed will not chain onto a forged head).
    """

    def __init__(self, directory: Path, *, rotate_bytes: int = DEFAULT_ROTATE_BYTES) -> None:
        if rotate_bytes < 1:
            raise AuditError("audit rotate_bytes must be positive")
        self.directory = Path(directory)
        self.rotate_bytes = rotate_bytes
        self._lock = threading.RLock()
        self._lock_fd = -1
        self._fd = -1
        self._size = 0
        self._head_seq = 0
        self._head_hash = GENESIS_HASH
        self._live_first_seq = 1
        self._unusable: str | None = None
        try:
            torn_note = self._open()
            if torn_note is not None:
                self.extend([AuditEvent("audit.tail_truncated", actor="seed", actor_kind="system", detail=torn_note)])
        except OSError as exc:
            self.close()
            raise AuditError(f"cannot open the audit log in {self.directory}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    # -- opening ---------------------------------------------------------------------------

    def _open(self) -> dict[str, object] | None:
        self.directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AuditLogInUse(f"the audit log in {self.directory} is already open: by another process "
                                    "(is the seed running?), or by an earlier FileAuditLog of this one that was "
                                    "not closed") from None
            raise
        self._fd = self._open_live(create_new=False)
        size = os.fstat(self._fd).st_size
        end = complete_end(self._fd, size)
        torn_note = self._move_torn_tail_aside(end, size) if end < size else None
        self._size = end
        head_line = last_line(self._fd, end)
        if head_line is None:
            head_line = self._newest_rotated_line()
        if head_line is not None:
            head = self._trusted(head_line, "newest")
            self._head_seq, self._head_hash = head.seq, head.hash
        live_first = first_line(self._fd) if end else None
        self._live_first_seq = _seq_of(live_first) if live_first else self._head_seq + 1
        return torn_note

    def _open_live(self, *, create_new: bool) -> int:
        path = self.directory / LIVE_NAME
        existed = path.exists() and not create_new
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if create_new else 0)
        fd = os.open(path, flags, _FILE_MODE)
        if not existed:
            fsync_dir(self.directory)
        return fd

    def _move_torn_tail_aside(self, end: int, size: int) -> dict[str, object]:
        torn = os.pread(self._fd, size - end, end)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        saved_as = f"{TORN_DIR}/{LIVE_NAME}.{stamp}.at{end}.partial"
        write_atomic(self.directory / saved_as, torn, mode=_FILE_MODE)
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        log.warning("audit log: moved an incomplete last line (%d bytes, an interrupted write) to %s",
                    len(torn), saved_as)
        return {"file": LIVE_NAME, "offset": end, "bytes": len(torn), "sha256": hashlib.sha256(torn).hexdigest(),
                "saved_as": saved_as}

    def _newest_rotated_line(self) -> bytes | None:
        rotated = list_rotated(self.directory)
        if not rotated:
            return None
        fd = os.open(rotated[-1][1], os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            line = last_line(fd, complete_end(fd, size))
        finally:
            os.close(fd)
        if line is None:
            raise AuditError(f"the newest rotated audit file {rotated[-1][1].name} is empty: run `seed audit verify`")
        return line

    def _trusted(self, line: bytes, which: str) -> AuditRecord:
        try:
            return record_from_line(line)
        except AuditError as exc:
            raise AuditError(f"the {which} audit record in {self.directory} does not verify ({exc}); "
                             "run `seed audit verify` before moving the damaged file aside") from None

    # -- the sink ----------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> AuditRecord:
        return self.extend([event])[0]

    def extend(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        events = list(events)
        if not events:
            return []
        with self._lock:
            if self._unusable is not None:
                raise AuditError(self._unusable)
            if self._size >= self.rotate_bytes:
                self._rotate()
            seq, prev = self._head_seq, self._head_hash
            records, lines = [], []
            for event in events:
                seq += 1
                record, line = seal(event, seq, prev)
                prev = record.hash
                records.append(record)
                lines.append(line)
            data = b"".join(lines)
            try:
                _write_all(self._fd, data)
                os.fdatasync(self._fd)
            except OSError as exc:
                self._cut_back()
                raise AuditError(f"cannot write the audit log in {self.directory}: {exc}") from exc
            self._size += len(data)
            self._head_seq, self._head_hash = seq, prev
            return records

    def _cut_back(self) -> None:
        """After a failed write: drop whatever part of it reached the file, so the next line
        starts on a line boundary and chains to the last record that was kept."""
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError as exc:
            self._unusable = (f"the audit log in {self.directory} could not be repaired after a failed write "
                              f"({exc}); reopen it (restart the seed)")
            log.error("%s", self._unusable)

    def _rotate(self) -> None:
        live = self.directory / LIVE_NAME
        target = self.directory / rotated_name(self._live_first_seq)
        if target.exists():
            raise AuditError(f"cannot rotate the audit log: {target} already exists")
        try:
            os.fchmod(self._fd, _ROTATED_MODE)
            os.rename(live, target)
            fsync_dir(self.directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.fchmod(self._fd, _FILE_MODE)
            raise AuditError(f"cannot rotate the audit log in {self.directory}: {exc}") from exc
        os.close(self._fd)
        self._fd = -1
        try:
            self._fd = self._open_live(create_new=True)
        except OSError as exc:
            # The old file is rotated and closed; appending anywhere else would fork the chain.
            self._unusable = f"cannot create a new audit.log in {self.directory} ({exc}); reopen it"
            raise AuditError(self._unusable) from exc
        self._size = 0
        self._live_first_seq = self._head_seq + 1
        log.info("audit log rotated to %s", target.name)

    def iter_records(self) -> Iterator[AuditRecord]:
        return iter_directory_records(self.directory)

    def query(self, query: AuditQuery) -> Iterator[AuditRecord]:
        return (record for record in self.iter_records() if query.matches(record))

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest record; (0, 64 zeros) for an empty log."""
        with self._lock:
            return self._head_seq, self._head_hash

    # -- retention ---------------------------------------------------------------------------

    def prune(self, before: datetime, *, actor: str = "", dry_run: bool = False) -> PruneReport:
        """Removes the oldest rotated files whose every record is older than ``before``.

        The log must verify first. An ``audit.pruned`` record declaring where the kept
        history now starts (``detail.first_seq``, ``detail.prev``) is written before any
        file is removed, so ``verify`` accepts the new start and nothing else. The live file
        is never removed.

        Args:
            before: files whose newest record is older than this go.
            actor: who asked (for the ``audit.pruned`` record).
            dry_run: report what would be removed, change nothing.

        Raises:
            AuditError: the log does not verify, or a file cannot be read or removed.
        """
        with self._lock:
            if self._unusable is not None:
                raise AuditError(self._unusable)
            report = verify_audit_log(self.directory)
            if not report.ok:
                raise AuditError(f"prune refused: the audit log does not verify: {report.problem}")
            cutoff = format_time(before)
            removable: list[Path] = []
            newest_removed: AuditRecord | None = None
            for _first_seq, path in list_rotated(self.directory):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    line = last_line(fd, complete_end(fd, os.fstat(fd).st_size))
                finally:
                    os.close(fd)
                if line is None:
                    break
                newest = record_from_line(line)
                if newest.time >= cutoff:
                    break
                removable.append(path)
                newest_removed = newest
            if newest_removed is None or report.first_seq is None:
                return PruneReport((), 0, None, dry_run=dry_run)
            names = tuple(path.name for path in removable)
            first_seq = newest_removed.seq + 1
            count = first_seq - report.first_seq
            if dry_run:
                return PruneReport(names, count, first_seq, dry_run=True)
            self.extend([AuditEvent("audit.pruned", actor=actor or "seed", actor_kind="system", detail={
                "first_seq": first_seq, "prev": newest_removed.hash, "files": list(names), "records": count,
                "before": cutoff})])
            try:
                # Oldest first: an interruption leaves a start older than the declared one,
                # which verify accepts (more history kept, never less).
                for path in removable:
                    path.unlink(missing_ok=True)
                fsync_dir(self.directory)
            except OSError as exc:
                raise AuditError(f"audit prune: cannot remove rotated files: {exc}") from exc
            log.info("audit log pruned: removed %s (%d records); history now starts at seq %d",
                     ", ".join(names), count, first_seq)
            return PruneReport(names, count, first_seq)

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._unusable = "the audit log is closed"
            for name in ("_fd", "_lock_fd"):
                fd = getattr(self, name)
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    setattr(self, name, -1)

    def __enter__(self) -> FileAuditLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def iter_directory_records(directory: Path) -> Iterator[AuditRecord]:
    """Every complete, readable record in ``directory``, oldest first, without verifying the
    chain (that is ``verify``'s job). Lines that cannot be read as a record are skipped with a
    warning; an incomplete last line is skipped silently. Safe while the seed appends.

    Raises:
        AuditError: the directory cannot be read.
    """
    snapshot = open_snapshot(Path(directory))
    # A rotated file pruned meanwhile held only records older than the new start: skip it.
    files = snapshot.files(skip_missing=True)
    try:
        while True:
            try:
                name, _named_seq, handle = next(files)
            except StopIteration:
                return
            for number, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    break
                try:
                    yield _record_unchecked(raw)
                except (ValueError, TypeError, AuditError) as exc:
                    log.warning("audit %s line %d skipped: %s", name, number, exc)
    finally:
        files.close()
        snapshot.close()


def _seq_of(line: bytes) -> int:
    """The seq of the live file's first record, which only names the file when it is rotated:
    a damaged first line is verify's business, not a reason to stop appending."""
    try:
        seq = json.loads(line).get("seq")
    except (ValueError, AttributeError):
        seq = None
    if type(seq) is not int or seq < 1:
        raise AuditError("the first record of audit.log has no seq: run `seed audit verify` and move the "
                         "damaged file aside")
    return seq


def _record_unchecked(raw: bytes) -> AuditRecord:
    document = json.loads(raw)
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    return AuditRecord(seq=int(document.get("seq", 0)), event=AuditEvent.from_dict(document),
                       prev=str(document.get("prev", "")), hash=str(document.get("hash", "")))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
