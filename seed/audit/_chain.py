"""The hash chain: canonical JSON, sealing an event into a record, and checking a sequence of
lines. Pure: bytes and values in, bytes and values out; the file sink and ``verify`` share it.

Rules/invariants:
- A stored line is the canonical JSON of the record (sorted keys, no spaces, ASCII only,
  no NaN) followed by ``\\n``. ASCII only means a line cannot contain a raw line break or a
  Unicode line separator, whatever the actor typed, and a torn write cannot split a character.
- ``hash`` = hex SHA-256 of the canonical JSON of the record without ``hash`` (so it covers
  ``seq`` and ``prev``). ``prev`` is the previous record's ``hash``; 64 zeros for seq 1.
- ``seq`` grows by exactly one per record, across rotated files.
- The kept history starts at seq 1 (prev = 64 zeros), or where an ``audit.pruned`` record
  in the chain says it starts (``detail.first_seq`` with ``detail.prev``), or before that
  (a prune that was interrupted while removing files keeps more, never less).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import AuditError
from ._event import AuditEvent, AuditRecord

__all__ = ["GENESIS_HASH", "ChainChecker", "canonical", "check_lines", "record_from_line", "seal"]

GENESIS_HASH = "0" * 64

_HEX64_RE = re.compile(r"[0-9a-f]{64}")


def canonical(document: Mapping[str, Any]) -> bytes:
    """Sorted keys, compact separators, ASCII only: the bytes that are hashed and stored."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _digest(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def seal(event: AuditEvent, seq: int, prev: str) -> tuple[AuditRecord, bytes]:
    """The record of ``event`` at position ``seq`` after a record whose hash is ``prev``,
    and its stored line (with the trailing newline)."""
    body = {**event.to_dict(), "seq": seq, "prev": prev}
    record = AuditRecord(seq=seq, event=event, prev=prev, hash=_digest(body))
    return record, canonical({**body, "hash": record.hash}) + b"\n"


def _is_hex64(value: Any) -> bool:
    return isinstance(value, str) and _HEX64_RE.fullmatch(value) is not None


def _check_document(line: bytes) -> tuple[dict[str, Any], str | None]:
    """Parses one stored line (without newline); the problem, if any, says what is wrong."""
    try:
        document = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return {}, "is not a JSON record (edited or corrupted)"
    if not isinstance(document, dict):
        return {}, "is not a JSON object (edited or corrupted)"
    try:
        encoded = canonical(document)
    except ValueError:
        return {}, "holds a value that is not canonical JSON (edited)"
    if encoded != line:
        return {}, "is not in canonical form: the line was edited"
    body = dict(document)
    stored = body.pop("hash", None)
    if not _is_hex64(stored):
        return {}, "has no valid hash field (edited)"
    if _digest(body) != stored:
        return {}, "does not match its hash: the record was edited"
    seq = document.get("seq")
    if type(seq) is not int or seq < 1 or not _is_hex64(document.get("prev")):
        return {}, "has no valid seq or prev field (edited)"
    return document, None


def record_from_line(line: bytes) -> AuditRecord:
    """The record of one stored line (without newline), its own hash checked.

    Raises:
        AuditError: the line is not a well-formed record whose hash matches.
    """
    document, problem = _check_document(line)
    if problem is not None:
        raise AuditError(f"audit record {problem}")
    return AuditRecord(seq=document["seq"], event=AuditEvent.from_dict(document), prev=document["prev"],
                       hash=document["hash"])


@dataclass(slots=True)
class ChainChecker:
    """Feeds stored lines in order; says what is wrong with the first line that does not fit.

    Attributes:
        count: records accepted so far.
        first_seq: seq of the first record (``None`` before any).
        first_prev: its prev.
        head_seq: seq of the last accepted record (0 before any).
        head_hash: its hash (64 zeros before any).
        declared_starts: where the kept history may start: seq → prev (seq 1 → zeros, plus
            every ``audit.pruned`` record seen).
    """

    count: int = 0
    first_seq: int | None = None
    first_prev: str | None = None
    head_seq: int = 0
    head_hash: str = GENESIS_HASH
    declared_starts: dict[int, str] = field(default_factory=lambda: {1: GENESIS_HASH})

    def feed(self, line: bytes) -> str | None:
        """Checks the next line (without its newline); returns the problem, or ``None``."""
        document, problem = _check_document(line)
        if problem is not None:
            return problem
        seq, prev = document["seq"], document["prev"]
        if self.first_seq is None:
            self.first_seq, self.first_prev = seq, prev
        elif seq > self.head_seq + 1:
            return (f"has seq {seq} after seq {self.head_seq}: records {self.head_seq + 1}..{seq - 1} "
                    "were deleted or moved")
        elif seq <= self.head_seq:
            return f"has seq {seq} after seq {self.head_seq}: records were reordered, duplicated or inserted"
        elif prev != self.head_hash:
            return "does not chain to the record before it (prev differs): a record was inserted or replaced"
        if document.get("action") == "audit.pruned":
            detail = document.get("detail")
            if isinstance(detail, dict) and type(detail.get("first_seq")) is int and _is_hex64(detail.get("prev")):
                self.declared_starts[detail["first_seq"]] = detail["prev"]
        self.count += 1
        self.head_seq, self.head_hash = seq, document["hash"]
        return None

    def start_problem(self) -> str | None:
        """What is wrong with where the kept history starts (call after the last line), or ``None``."""
        if self.first_seq is None:
            return None
        declared_prev = self.declared_starts.get(self.first_seq)
        if declared_prev == self.first_prev:
            return None
        if declared_prev is not None:
            return (f"starts the kept history at seq {self.first_seq}, but its prev is not the one "
                    "declared for that start (the genesis hash or an audit.pruned record)")
        if self.first_seq < max(self.declared_starts):
            return None  # A prune was interrupted while removing files: more history, not less.
        return (f"starts the kept history at seq {self.first_seq}, but no audit.pruned record declares "
                f"that start: records 1..{self.first_seq - 1} were deleted without `seed audit prune`")


def check_lines(lines: Iterable[bytes]) -> tuple[int, str] | None:
    """The first bad line of a whole log given as lines (each with or without its newline):
    ``(line number, problem)``, or ``None`` when the chain verifies."""
    checker = ChainChecker()
    for number, line in enumerate(lines, start=1):
        problem = checker.feed(line.rstrip(b"\n"))
        if problem is not None:
            return number, problem
    problem = checker.start_problem()
    return (1, problem) if problem is not None else None
