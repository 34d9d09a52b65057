"""The seam between the seed and where audit records are kept: ``AuditSink``, the query
filter, and ``MemoryAuditLog``, the in-memory fake.

Rules/invariants:
- The sink, not the caller, gives each event its ``seq`` and ``prev``: a shared database
  serving several replicas does that in one transaction, the file sink under its lock.
- ``append``/``extend`` return only once the records are stored (durably, for a real sink),
  and either store every event of the call or raise ``AuditError`` and store none.
- Sinks are thread-safe. Their methods block; trio code calls them through
  ``trio.to_thread.run_sync`` (``AuditTrail`` does).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Protocol, runtime_checkable

from ..errors import AuditError
from ._chain import GENESIS_HASH, seal
from ._event import AuditEvent, AuditRecord, format_time

__all__ = ["AuditQuery", "AuditSink", "MemoryAuditLog"]


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which records ``query`` returns; ``None`` matches everything.

    Attributes:
        actor: exact actor name.
        repository: repository name or glob (``team-a/*``).
        action: action or glob (``login.*``).
        since: records at or after this time.
    """

    actor: str | None = None
    repository: str | None = None
    action: str | None = None
    since: datetime | None = None

    def matches(self, record: AuditRecord) -> bool:
        event = record.event
        if self.actor is not None and event.actor != self.actor:
            return False
        if self.repository is not None and not fnmatchcase(event.repository, self.repository):
            return False
        if self.action is not None and not fnmatchcase(event.action, self.action):
            return False
        # Stored times are fixed-width UTC, so string order is time order.
        return self.since is None or event.time >= format_time(self.since)


@runtime_checkable
class AuditSink(Protocol):
    """An append-only, hash-chained store of audit records."""

    def append(self, event: AuditEvent) -> AuditRecord:
        """Stores one event; returns its record.

        Raises:
            AuditError: it could not be stored (nothing was).
        """
        ...

    def extend(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """Stores events in order (all or none); returns their records."""
        ...

    def iter_records(self) -> Iterator[AuditRecord]:
        """Every kept record, oldest first."""
        ...

    def query(self, query: AuditQuery) -> Iterator[AuditRecord]:
        """The kept records that match, oldest first."""
        ...

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest record; (0, 64 zeros) for an empty log."""
        ...

    def close(self) -> None:
        """Releases the sink; further appends raise ``AuditError``."""
        ...


class MemoryAuditLog:
    """``AuditSink`` kept in a list: the fake for tests, chained exactly like the file sink."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[AuditRecord] = []
        self._lines: list[bytes] = []
        self._closed = False

    def append(self, event: AuditEvent) -> AuditRecord:
        return self.extend([event])[0]

    def extend(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        with self._lock:
            if self._closed:
                raise AuditError("the audit log is closed")
            sealed = []
            seq, prev = (self._records[-1].seq, self._records[-1].hash) if self._records else (0, GENESIS_HASH)
            for event in events:
                seq += 1
                record, line = seal(event, seq, prev)
                prev = record.hash
                sealed.append((record, line))
            self._records.extend(record for record, _ in sealed)
            self._lines.extend(line for _, line in sealed)
            return [record for record, _ in sealed]

    def iter_records(self) -> Iterator[AuditRecord]:
        with self._lock:
            snapshot = list(self._records)
        return iter(snapshot)

    def query(self, query: AuditQuery) -> Iterator[AuditRecord]:
        return (record for record in self.iter_records() if query.matches(record))

    @property
    def head(self) -> tuple[int, str]:
        with self._lock:
            return (self._records[-1].seq, self._records[-1].hash) if self._records else (0, GENESIS_HASH)

    def lines(self) -> list[bytes]:
        """The stored lines, as the file sink would write them."""
        with self._lock:
            return list(self._lines)

    def close(self) -> None:
        with self._lock:
            self._closed = True
