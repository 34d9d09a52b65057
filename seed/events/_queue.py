"""The seam between the dispatcher and where queued events are kept: ``EventQueue``, its
values, and ``MemoryEventQueue``, the in-memory fake.

Rules/invariants:
- One queue per endpoint, first in first out. Each endpoint gives its events consecutive
  ``seq`` numbers; the head is the oldest undelivered one, and only the head is ever acked
  or buried, so delivery is in order.
- ``append`` returns once the events are stored (durably, for a real queue). An endpoint whose
  queue already holds ``max_queue_events`` refuses new events (``append`` says which): the cap
  keeps disk use bounded, and the dispatcher counts what was dropped.
- ``ack`` and ``bury`` are durable before they return. A crash between a delivery and its
  ack delivers that event again (at least once; receivers dedupe on the event id).
- Dead letters (``bury``) keep the event, its attempts and last error until ``replay``
  queues them again (with new ``seq`` numbers and a fresh ``queued`` time, so a replayed
  event gets a full ``max_age`` again). Past ``max_dead_letters`` the oldest are removed.
- ``stats`` never blocks (the dispatcher reads it when /metrics is scraped, on the trio
  thread); every other method may block and is called through ``trio.to_thread.run_sync``.
  Queues are thread-safe.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ._event import WebhookError, WebhookEvent

__all__ = ["DEFAULT_LIMITS", "DeadLetter", "EventQueue", "MemoryEventQueue", "QueueLimits", "QueueStats", "QueuedEvent"]


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """How much one endpoint's queue may hold (``[[webhooks]]`` ``max_queue_events``, ``max_dead_letters``)."""

    max_queue_events: int = 100_000
    max_dead_letters: int = 10_000


DEFAULT_LIMITS = QueueLimits()


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    """An undelivered event: ``seq`` orders it within its endpoint; ``queued`` (Unix seconds)
    is when it entered the queue, which ``max_age`` counts from."""

    endpoint: str
    seq: int
    queued: float
    event: WebhookEvent


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event given up on: when it was queued and buried, how often it was tried, the last error."""

    endpoint: str
    event: WebhookEvent
    queued: float
    buried: float
    attempts: int
    error: str

    def to_dict(self) -> dict[str, object]:
        return {"endpoint": self.endpoint, "event": self.event.to_dict(), "queued": self.queued,
                "buried": self.buried, "attempts": self.attempts, "error": self.error}


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One endpoint's queue: undelivered events, the oldest one's ``queued`` time, dead letters."""

    depth: int = 0
    oldest_queued: float | None = None
    dead_letters: int = 0


@runtime_checkable
class EventQueue(Protocol):
    """Per-endpoint FIFO queues of webhook events with a dead-letter list (module rules above)."""

    def append(self, items: Sequence[tuple[str, WebhookEvent]], *, now: float) -> list[bool]:
        """Stores ``(endpoint, event)`` pairs in order; returns, per pair, whether it was kept
        (False: that endpoint's queue is full).

        Raises:
            WebhookError: nothing could be stored.
        """
        ...

    def head(self, endpoint: str) -> QueuedEvent | None:
        """The oldest undelivered event of ``endpoint``, or None."""
        ...

    def ack(self, endpoint: str, seq: int) -> None:
        """The head (``seq``) was delivered: removes it.

        Raises:
            WebhookError: ``seq`` is not the head.
        """
        ...

    def bury(self, endpoint: str, seq: int, *, attempts: int, error: str, now: float) -> int:
        """Moves the head (``seq``) to the dead letters; returns how many old dead letters were
        removed to stay within ``max_dead_letters``."""
        ...

    def dead_letters(self, endpoint: str | None = None) -> list[DeadLetter]:
        """Dead letters, oldest buried first (of one endpoint, or all)."""
        ...

    def replay(self, event_id: str | None, *, endpoint: str | None = None, now: float) -> int:
        """Queues dead letters again, in the order they were buried: the one with ``event_id``
        (None: all), of ``endpoint`` (None: any). Returns how many."""
        ...

    def stats(self, endpoint: str) -> QueueStats:
        """Depth, oldest queued time and dead letters of ``endpoint``; never blocks."""
        ...

    def endpoints(self) -> list[str]:
        """Every endpoint that has queued events or dead letters, sorted."""
        ...

    def close(self) -> None:
        """Releases the queue; further calls raise ``WebhookError``."""
        ...


@dataclass
class _MemoryEndpoint:
    queue: deque[QueuedEvent] = field(default_factory=deque)
    dead: deque[DeadLetter] = field(default_factory=deque)
    last_seq: int = 0


class MemoryEventQueue:
    """``EventQueue`` in memory: the fake for tests (same semantics as the file queue, nothing durable).

    Args:
        limits: per endpoint; endpoints not named get ``default_limits``.
        default_limits: the limits of the others.
    """

    def __init__(self, limits: Mapping[str, QueueLimits] | None = None, *,
                 default_limits: QueueLimits = DEFAULT_LIMITS) -> None:
        self._limits = dict(limits or {})
        self._default_limits = default_limits
        self._lock = threading.Lock()
        self._endpoints: dict[str, _MemoryEndpoint] = {}
        self._closed = False

    def _state(self, endpoint: str) -> _MemoryEndpoint:
        if self._closed:
            raise WebhookError("the webhook queue is closed")
        return self._endpoints.setdefault(endpoint, _MemoryEndpoint())

    def append(self, items: Sequence[tuple[str, WebhookEvent]], *, now: float) -> list[bool]:
        with self._lock:
            kept = []
            for endpoint, event in items:
                state = self._state(endpoint)
                if len(state.queue) >= self._limits.get(endpoint, self._default_limits).max_queue_events:
                    kept.append(False)
                    continue
                state.last_seq += 1
                state.queue.append(QueuedEvent(endpoint, state.last_seq, now, event))
                kept.append(True)
            return kept

    def head(self, endpoint: str) -> QueuedEvent | None:
        with self._lock:
            state = self._state(endpoint)
            return state.queue[0] if state.queue else None

    def _pop_head(self, state: _MemoryEndpoint, endpoint: str, seq: int) -> QueuedEvent:
        if not state.queue or state.queue[0].seq != seq:
            raise WebhookError(f"webhook queue {endpoint}: event {seq} is not the head")
        return state.queue.popleft()

    def ack(self, endpoint: str, seq: int) -> None:
        with self._lock:
            state = self._state(endpoint)
            self._pop_head(state, endpoint, seq)

    def bury(self, endpoint: str, seq: int, *, attempts: int, error: str, now: float) -> int:
        with self._lock:
            state = self._state(endpoint)
            queued = self._pop_head(state, endpoint, seq)
            state.dead.append(DeadLetter(endpoint, queued.event, queued.queued, now, attempts, error[:500]))
            removed = 0
            while len(state.dead) > self._limits.get(endpoint, self._default_limits).max_dead_letters:
                state.dead.popleft()
                removed += 1
            return removed

    def dead_letters(self, endpoint: str | None = None) -> list[DeadLetter]:
        with self._lock:
            if self._closed:
                raise WebhookError("the webhook queue is closed")
            letters = [letter for name, state in self._endpoints.items() if endpoint in (None, name)
                       for letter in state.dead]
            return sorted(letters, key=lambda letter: letter.buried)

    def replay(self, event_id: str | None, *, endpoint: str | None = None, now: float) -> int:
        with self._lock:
            if self._closed:
                raise WebhookError("the webhook queue is closed")
            replayed = 0
            for name, state in self._endpoints.items():
                if endpoint not in (None, name):
                    continue
                keep: deque[DeadLetter] = deque()
                for letter in state.dead:
                    if event_id is None or letter.event.id == event_id:
                        state.last_seq += 1
                        state.queue.append(QueuedEvent(name, state.last_seq, now, letter.event))
                        replayed += 1
                    else:
                        keep.append(letter)
                state.dead = keep
            return replayed

    def stats(self, endpoint: str) -> QueueStats:
        state = self._endpoints.get(endpoint)
        if state is None:
            return QueueStats()
        try:
            oldest = state.queue[0].queued if state.queue else None
        except IndexError:  # taken by another thread meanwhile: stats are a snapshot anyway
            oldest = None
        return QueueStats(len(state.queue), oldest, len(state.dead))

    def endpoints(self) -> list[str]:
        with self._lock:
            return sorted(name for name, state in self._endpoints.items() if state.queue or state.dead)

    def close(self) -> None:
        with self._lock:
            self._closed = True
