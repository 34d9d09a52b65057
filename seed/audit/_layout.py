"""Where the audit files live, and reading them consistently while the seed appends and rotates.

Layout of ``DATA/audit/``::

    audit.log                   the live file; the seed appends here
    audit-000000000001.log      rotated files, named by the seq of their first record, read-only
    torn/audit.log.<time>.at<offset>.partial   incomplete last lines moved aside on open
    inbox/<time ns>-<id>.json   events of command-line tools, queued while the seed holds the log
                                (not part of the chain until the seed moves them in: _inbox.py)
    inbox/rejected/             inbox files that were malformed, each recorded by audit.inbox_rejected
    .lock                       flock of the process that appends (one writer at a time)

Rules/invariants:
- A rotated file never changes again; only ``prune`` removes rotated files, oldest first.
- The live file is renamed to its rotated name in one ``rename``, so a reader that holds it
  open keeps reading the same file; ``open_snapshot`` uses that to see each record exactly
  once, even while the seed rotates.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import AuditError

__all__ = [
    "INBOX_DIR",
    "LIVE_NAME",
    "LOCK_NAME",
    "REJECTED_DIR",
    "TORN_DIR",
    "Snapshot",
    "audit_directory",
    "complete_end",
    "first_line",
    "last_line",
    "list_inbox",
    "list_rotated",
    "open_snapshot",
    "rotated_name",
    "unexpected_entries",
]

LIVE_NAME = "audit.log"
LOCK_NAME = ".lock"
TORN_DIR = "torn"
INBOX_DIR = "inbox"
REJECTED_DIR = "rejected"  # inside INBOX_DIR
_ROTATED_RE = re.compile(r"audit-(\d{12,})\.log")
_BLOCK = 64 * 1024
_SNAPSHOT_ATTEMPTS = 100  # only while the live file is missing mid-rotation


def audit_directory(data: Path) -> Path:
    """``DATA/audit``: where the seed with data directory ``data`` keeps its audit log."""
    return Path(data) / "audit"


def rotated_name(first_seq: int) -> str:
    return f"audit-{first_seq:012d}.log"


def list_rotated(directory: Path) -> list[tuple[int, Path]]:
    """Rotated files as (first seq, path), oldest first."""
    found = []
    for entry in os.scandir(directory):
        match = _ROTATED_RE.fullmatch(entry.name)
        if match and entry.is_file(follow_symlinks=False):
            found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def unexpected_entries(directory: Path) -> list[str]:
    """Names in the audit directory that are not part of the log (worth a look by an auditor)."""
    expected = {LIVE_NAME, LOCK_NAME, TORN_DIR, INBOX_DIR}
    return sorted(entry.name for entry in os.scandir(directory)
                  if entry.name not in expected and not _ROTATED_RE.fullmatch(entry.name))


def list_inbox(directory: Path) -> list[Path]:
    """Queued events in ``directory/inbox`` (``*.json``, not the hidden temporary files of a
    write in progress), oldest first: their names start with the time they were written."""
    inbox = Path(directory) / INBOX_DIR
    try:
        entries = list(os.scandir(inbox))
    except FileNotFoundError:
        return []
    return sorted(Path(entry.path) for entry in entries
                  if entry.name.endswith(".json") and not entry.name.startswith(".")
                  and not entry.is_dir(follow_symlinks=False))


@dataclass(slots=True)
class Snapshot:
    """The files of the log at one moment: rotated paths (immutable) and the open live file.

    Attributes:
        rotated: (first seq, path) of the rotated files before the live one, oldest first.
        live: the open live file, or ``None`` if there is none.
        live_name: its name: ``audit.log``, or its rotated name if it was rotated while the
            snapshot was taken (it is still the newest file of this snapshot).
        live_seq: the seq in that rotated name, else ``None``.
    """

    rotated: list[tuple[int, Path]]
    live: BinaryIO | None
    live_name: str = LIVE_NAME
    live_seq: int | None = None

    def files(self, *, skip_missing: bool = False) -> Generator[tuple[str, int | None, BinaryIO], None, None]:
        """(name, seq in the name, open file) in log order, the live file last; rotated files
        are opened on demand.

        Raises:
            FileNotFoundError: a rotated file was removed (pruned) after the snapshot, unless
                ``skip_missing``.
        """
        for first_seq, path in self.rotated:
            try:
                handle = path.open("rb")
            except FileNotFoundError:
                if skip_missing:
                    continue
                raise
            with handle:
                yield path.name, first_seq, handle
        if self.live is not None:
            yield self.live_name, self.live_seq, self.live

    def close(self) -> None:
        if self.live is not None:
            self.live.close()


def open_snapshot(directory: Path) -> Snapshot:
    """A consistent view of the log's files, even while the writer rotates.

    Rotated files are listed before and after opening the live file. If the lists differ, a
    rotation (or a prune) happened meanwhile: if the file we opened is among the newly rotated
    ones, it is the newest file of our view and what was rotated after it is left out;
    otherwise we opened the new live file and every rotated file belongs before it.

    Raises:
        AuditError: the directory cannot be read.
    """
    try:
        for attempt in range(_SNAPSHOT_ATTEMPTS):
            before = list_rotated(directory)
            try:
                live: BinaryIO | None = (directory / LIVE_NAME).open("rb")
            except FileNotFoundError:
                live = None
            after = list_rotated(directory)
            if live is None:
                # Between a rotation's rename and the new file's create, or after a crash there.
                if after == before or attempt == _SNAPSHOT_ATTEMPTS - 1:
                    return Snapshot(after, None)
                continue
            if after == before:
                return Snapshot(after, live)
            opened = os.fstat(live.fileno())
            for index, (first_seq, path) in enumerate(after):
                try:
                    status = path.stat()
                except FileNotFoundError:
                    continue
                if (status.st_dev, status.st_ino) == (opened.st_dev, opened.st_ino):
                    return Snapshot(after[:index], live, path.name, first_seq)
            return Snapshot(after, live)
    except OSError as exc:
        raise AuditError(f"cannot read the audit log in {directory}: {exc}") from exc
    raise AssertionError("unreachable")


def complete_end(fd: int, size: int) -> int:
    """Offset just past the last newline within the first ``size`` bytes (0 if there is none)."""
    position = size
    while position > 0:
        start = max(0, position - _BLOCK)
        block = os.pread(fd, position - start, start)
        index = block.rfind(b"\n")
        if index >= 0:
            return start + index + 1
        position = start
    return 0


def last_line(fd: int, end: int) -> bytes | None:
    """The complete line that ends at ``end`` (an offset just past a newline), without its newline."""
    if end <= 0:
        return None
    start = complete_end(fd, end - 1)
    return os.pread(fd, end - 1 - start, start)


def first_line(fd: int) -> bytes | None:
    """The first complete line of the file, without its newline (``None`` if there is none)."""
    collected = b""
    while True:
        block = os.pread(fd, _BLOCK, len(collected))
        if not block:
            return None
        index = block.find(b"\n")
        if index >= 0:
            return collected + block[:index]
        collected += block
