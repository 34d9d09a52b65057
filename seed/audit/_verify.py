"""``seed audit verify``: walk the whole kept history and name the first line that does not fit.

What an auditor can rely on (and what not):
- Any edit, deletion, insertion or reordering of records inside the kept history breaks the
  chain and is reported with the file and line number of the first bad line.
- Removing the oldest rotated files is allowed only through ``prune`` (``seed audit prune``),
  which first writes an ``audit.pruned`` record into the chain saying where the kept history
  now starts. Files removed any other way leave a start that nothing declares: reported.
- An incomplete last line of the live file is an interrupted write (kill -9, power loss), not
  tampering: it is reported as a truncated tail and verification passes up to the line before.
- Not detectable from the files alone: cutting records off the end, or rewriting the whole
  chain with recomputed hashes, by someone who can write the directory. Against that, keep the
  head (``seq`` and ``hash`` printed by verify, the ``seed_audit_head_seq`` gauge) somewhere
  else: a head seq that goes down, or a hash at a seq that changes, shows it.
- Events queued in ``inbox/`` by command-line tools while the seed held the log are not part
  of the chain yet: verify counts them (``inbox_pending``) and says so, and does not fail.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from p2pd.progress import NO_PROGRESS, ProgressSink

from ..errors import AuditError
from ._chain import GENESIS_HASH, ChainChecker
from ._layout import INBOX_DIR, REJECTED_DIR, TORN_DIR, Snapshot, list_inbox, open_snapshot, unexpected_entries

__all__ = ["VerifyProblem", "VerifyReport", "verify_audit_log"]

_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class VerifyProblem:
    """A line that does not verify, or the truncated tail."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file} line {self.line}: {self.message}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``verify_audit_log`` found.

    Attributes:
        ok: the kept history verifies (a truncated tail alone does not make it fail).
        records: complete records checked before the first problem.
        first_seq: seq of the oldest kept record (``None`` for an empty log).
        head_seq: seq of the newest record that verified (0 for an empty log).
        head_hash: its hash: keep it elsewhere to detect a cut or rewritten tail later.
        files: the files read, oldest first.
        problem: the first bad line, when not ``ok``.
        truncated_tail: the incomplete last line of the live file, if any.
        notes: other things worth an auditor's eye (moved-aside tails, queued or rejected
            inbox events, stray files).
        inbox_pending: events of command-line tools queued in ``inbox/``, not in the chain yet.
    """

    ok: bool
    records: int
    first_seq: int | None
    head_seq: int
    head_hash: str
    files: tuple[str, ...]
    problem: VerifyProblem | None = None
    truncated_tail: VerifyProblem | None = None
    notes: tuple[str, ...] = ()
    inbox_pending: int = 0


class _Vanished(Exception):
    """A rotated file was pruned while we read: start over."""


def verify_audit_log(directory: Path, progress: ProgressSink = NO_PROGRESS) -> VerifyReport:
    """Checks the audit log in ``directory`` (``DATA/audit``); read-only, safe while the seed runs.

    ``progress`` is told the bytes of the files to check, then the bytes of each line checked.

    Raises:
        AuditError: the directory does not exist or cannot be read.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AuditError(f"no audit log at {directory}")
    for _ in range(_ATTEMPTS):
        try:
            return _verify_once(directory, progress)
        except _Vanished:
            continue
        except OSError as exc:
            raise AuditError(f"cannot read the audit log in {directory}: {exc}") from exc
    raise AuditError(f"files of the audit log in {directory} kept disappearing while being verified")


def _snapshot_bytes(snapshot: Snapshot) -> int:
    total = os.fstat(snapshot.live.fileno()).st_size if snapshot.live is not None else 0
    for _seq, path in snapshot.rotated:
        with contextlib.suppress(FileNotFoundError):  # pruned meanwhile: noticed when it is read
            total += path.stat().st_size
    return total


def _verify_once(directory: Path, progress: ProgressSink) -> VerifyReport:
    snapshot = open_snapshot(directory)
    progress.start(_snapshot_bytes(snapshot))
    checker = ChainChecker()
    names: list[str] = []
    problem: VerifyProblem | None = None
    truncated: VerifyProblem | None = None
    first_location: tuple[str, int] | None = None
    files = snapshot.files()
    try:
        while problem is None:
            try:
                name, named_seq, handle = next(files)
            except StopIteration:
                break
            except FileNotFoundError:
                raise _Vanished() from None
            names.append(name)
            number = 0
            for number, raw in enumerate(handle, start=1):
                progress.advance(len(raw))
                if not raw.endswith(b"\n"):
                    if handle is snapshot.live:
                        truncated = VerifyProblem(name, number, f"incomplete last line ({len(raw)} bytes): an "
                                                  "interrupted write, not tampering; the seed moves it aside "
                                                  "when it next opens the log")
                    else:
                        problem = VerifyProblem(name, number, "is incomplete, but only the live file may end "
                                                "with an interrupted write: the file was truncated or edited")
                    break
                if first_location is None:
                    first_location = (name, number)
                message = checker.feed(raw[:-1])
                if message is not None:
                    problem = VerifyProblem(name, number, f"record {message}")
                    break
                if number == 1 and named_seq is not None and checker.head_seq != named_seq:
                    problem = VerifyProblem(name, number, f"the file name says seq {named_seq} but its first "
                                            f"record has seq {checker.head_seq}: the file was renamed")
                    break
            if number == 0 and named_seq is not None and problem is None:
                problem = VerifyProblem(name, 1, "rotated file is empty: its records were deleted")
    finally:
        files.close()
        snapshot.close()
    notes = _notes(directory)
    inbox_pending = len(list_inbox(directory))
    if inbox_pending:
        notes.append(f"{inbox_pending} event(s) of command-line tools wait in {INBOX_DIR}/: not in the chain "
                     "yet; the running seed moves them in within seconds (or when it next starts)")
    records, head_seq, head_hash = checker.count, checker.head_seq, checker.head_hash
    if problem is None and first_location is not None:
        start = checker.start_problem()
        if start is not None:
            # The very first line is the bad one: nothing before it verified.
            problem = VerifyProblem(*first_location, f"record {start}")
            records, head_seq, head_hash = 0, 0, GENESIS_HASH
    elif problem is not None and checker.first_seq not in (None, 1):
        notes.append("where the kept history starts was not checked: the chain breaks before its end")
    return VerifyReport(ok=problem is None, records=records, first_seq=checker.first_seq, head_seq=head_seq,
                        head_hash=head_hash, files=tuple(names), problem=problem, truncated_tail=truncated,
                        notes=tuple(notes), inbox_pending=inbox_pending)


def _notes(directory: Path) -> list[str]:
    notes = []
    torn = directory / TORN_DIR
    if torn.is_dir():
        saved = sorted(path.name for path in torn.iterdir())
        if saved:
            notes.append(f"{len(saved)} interrupted write(s) moved aside in {TORN_DIR}/ (each is recorded by an "
                         f"audit.tail_truncated record): {', '.join(saved[:5])}{' ...' if len(saved) > 5 else ''}")
    rejected = directory / INBOX_DIR / REJECTED_DIR
    if rejected.is_dir():
        names = sorted(path.name for path in rejected.iterdir())
        if names:
            notes.append(f"{len(names)} malformed inbox file(s) kept in {INBOX_DIR}/{REJECTED_DIR}/ (each is "
                         f"recorded by an audit.inbox_rejected record): {', '.join(names[:5])}"
                         f"{' ...' if len(names) > 5 else ''}")
    stray = unexpected_entries(directory)
    if stray:
        notes.append(f"files that are not part of the log: {', '.join(stray)}")
    return notes
