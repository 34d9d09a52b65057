"""``FileEventQueue``: the webhook queues as append-only files under ``DATA/webhooks/``.

Layout::

    DATA/webhooks/.lock                       flock of the one writer (the running seed)
    DATA/webhooks/requests/                   `seed webhooks retry` asking a running seed
    DATA/webhooks/queues/<endpoint>/cursor    the seq of the last delivered event, 20 digits
    DATA/webhooks/queues/<endpoint>/<first seq, 20 digits>.log   segments: one JSON line per event
    DATA/webhooks/queues/<endpoint>/dead/<buried ns>-<event id>.json   dead letters

Rules/invariants:
- One writer: opening takes an exclusive ``flock`` on ``.lock`` (released by the kernel when
  the process dies, so kill -9 never leaves it stuck). ``read_only=True`` opens without the
  lock and changes nothing, for ``seed webhooks ls`` beside a running seed: lines are only
  ever appended whole, the cursor is one small in-place write, dead letters are whole files.
- ``append`` writes each endpoint's new lines with one ``write`` on an ``O_APPEND``
  descriptor and ``fdatasync``s before it returns. If any write fails, every file of the
  call is cut back to its previous size: a call is stored whole or not at all.
- Lines carry their ``seq``; the cursor says which are delivered. ``ack`` rewrites the
  cursor in place (21 bytes, one sector) and ``fdatasync``s it before it returns. A cursor
  that is lost or unreadable counts as 0: everything still on disk is delivered again, which
  at-least-once allows; an event is never skipped.
- On open, an incomplete last line (a write cut by a crash; its ``append`` never returned,
  so no request was answered for it) is cut off. Segments whose every line is delivered are
  deleted once the next segment is being read.
- A segment is closed once it reaches ``segment_bytes``; the next line starts a new file.
- Memory per endpoint is bounded: the head event, a few integers, and the segment list.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from p2pd.fsutil import fsync_dir, write_atomic

from ._event import WebhookError, WebhookEvent
from ._queue import DEFAULT_LIMITS, DeadLetter, QueuedEvent, QueueLimits, QueueStats

__all__ = ["DEFAULT_SEGMENT_BYTES", "FileEventQueue", "WebhookQueueInUse", "webhooks_directory"]

log = logging.getLogger("seed.webhooks")

DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024
LOCK_NAME = ".lock"
QUEUES_DIR = "queues"
DEAD_DIR = "dead"
CURSOR_NAME = "cursor"
_CURSOR_WIDTH = 20
_DIR_MODE = 0o750
_FILE_MODE = 0o640  # events name users and addresses: not for everyone to read
_READ_CHUNK = 64 * 1024
_MAX_LINE = 4 * 1024 * 1024


class WebhookQueueInUse(WebhookError):
    """Another process (the running seed) holds the webhook queue's lock."""


def webhooks_directory(data: Path) -> Path:
    """Where the webhook queues of data directory ``data`` live."""
    return Path(data) / "webhooks"


@dataclass
class _Endpoint:
    directory: Path
    acked: int = 0
    last_seq: int = 0
    segments: list[int] = field(default_factory=list)  # first seq of each segment file, ascending
    write_fd: int = -1
    write_size: int = 0
    cursor_fd: int = -1
    read_segment: int | None = None  # the segment the next undelivered line is in
    read_offset: int = 0
    head: QueuedEvent | None = None
    head_end: int = 0
    oldest_queued: float | None = None
    dead_count: int = 0

    def segment_path(self, first_seq: int) -> Path:
        return self.directory / f"{first_seq:0{_CURSOR_WIDTH}d}.log"


class FileEventQueue:
    """``EventQueue`` on files, crash-safe (see the module rules).

    Args:
        directory: ``DATA/webhooks`` (``webhooks_directory(data)``); created if missing.
        limits: per endpoint; others get ``default_limits``.
        default_limits: limits of endpoints not named in ``limits``.
        segment_bytes: a segment file is closed at this size.
        read_only: open without the lock and never write (for ``seed webhooks ls``).

    Raises:
        WebhookQueueInUse: another process has the queue open for writing.
        WebhookError: the directory cannot be used.
    """

    def __init__(self, directory: Path, *, limits: Mapping[str, QueueLimits] | None = None,
                 default_limits: QueueLimits = DEFAULT_LIMITS, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 read_only: bool = False) -> None:
        if segment_bytes < 1:
            raise WebhookError("segment_bytes must be positive")
        self.directory = Path(directory)
        self.read_only = read_only
        self._limits = dict(limits or {})
        self._default_limits = default_limits
        self._segment_bytes = segment_bytes
        self._lock = threading.RLock()
        self._lock_fd = -1
        self._endpoints: dict[str, _Endpoint] = {}
        self._closed = False
        try:
            self._open()
        except OSError as exc:
            self.close()
            raise WebhookError(f"cannot open the webhook queue in {self.directory}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    # -- opening -------------------------------------------------------------------------------

    def _open(self) -> None:
        queues = self.directory / QUEUES_DIR
        if self.read_only:
            if not queues.is_dir():
                return
        else:
            queues.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise WebhookQueueInUse(f"the webhook queue in {self.directory} is in use (is the seed "
                                            "running?)") from None
                raise
        for path in sorted(queues.iterdir()):
            if path.is_dir() and not path.name.startswith("."):
                self._endpoints[path.name] = self._open_endpoint(path)

    def _open_endpoint(self, directory: Path) -> _Endpoint:
        state = _Endpoint(directory)
        state.acked = _read_cursor(directory / CURSOR_NAME)
        state.segments = sorted(int(p.stem) for p in directory.glob("*.log") if p.stem.isdigit())
        dead = directory / DEAD_DIR
        if dead.is_dir():
            if not self.read_only:
                for leftover in dead.glob(".*.tmp"):  # write_atomic's temporary files, cut by a crash
                    leftover.unlink(missing_ok=True)
            state.dead_count = sum(1 for _ in dead.glob("*.json"))
        last_line_seq = 0
        if state.segments:
            last_path = state.segment_path(state.segments[-1])
            end = self._repair_tail(last_path)
            for seq, _queued, _event, _end in _iter_lines(last_path, 0, end, strict=False):
                last_line_seq = max(last_line_seq, seq)
        state.last_seq = max(state.acked, last_line_seq)
        if not self.read_only:
            if not (directory / CURSOR_NAME).exists():
                write_atomic(directory / CURSOR_NAME, _cursor_bytes(state.acked), mode=_FILE_MODE)
            state.cursor_fd = os.open(directory / CURSOR_NAME, os.O_RDWR | os.O_CLOEXEC)
        if state.segments:
            state.read_segment, state.read_offset = state.segments[0], 0
        self._load_head(state)
        self._delete_delivered_segments(state)
        return state

    def _repair_tail(self, path: Path) -> int:
        """Cuts an incomplete last line off ``path``; returns the end of its last complete line."""
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            position = size
            while position > 0:
                step = min(_READ_CHUNK, position)
                handle.seek(position - step)
                chunk = handle.read(step)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    end = position - step + newline + 1
                    break
                position -= step
            else:
                end = 0
        if end < size and not self.read_only:
            log.warning("webhook queue %s: cutting off an incomplete last line (%d bytes, a write cut by a crash)",
                        path, size - end)
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, end)
                os.fsync(fd)
            finally:
                os.close(fd)
        return end

    # -- reading the head ------------------------------------------------------------------------

    def _load_head(self, state: _Endpoint) -> None:
        """Finds the oldest undelivered line from the read position on (skipping delivered ones)."""
        state.head = None
        while state.read_segment is not None:
            path = state.segment_path(state.read_segment)
            found = None
            try:
                for seq, queued, event, end in _iter_lines(path, state.read_offset, None, strict=False):
                    if seq <= state.acked or event is None:
                        state.read_offset = end  # delivered, or unreadable (logged): never sent
                        continue
                    found = (seq, queued, event, end)
                    break
            except FileNotFoundError:
                found = None
            if found is not None:
                seq, queued, event, end = found
                state.head = QueuedEvent(state.directory.name, seq, queued, event)
                state.head_end = end
                state.oldest_queued = queued
                return
            later = [first for first in state.segments if first > state.read_segment]
            if not later:
                break
            state.read_segment, state.read_offset = later[0], 0
        state.oldest_queued = None
        if not self.read_only and state.last_seq > state.acked:
            # Only unreadable lines were left (logged one by one): nothing more can be sent.
            state.acked = state.last_seq

    def _delete_delivered_segments(self, state: _Endpoint) -> None:
        """Deletes the segments before the one being read: every line in them is delivered."""
        if self.read_only or state.read_segment is None:
            return
        current = state.read_segment
        done = [first for first in state.segments if first < current]
        state.segments = [first for first in state.segments if first >= current]
        for first in done:
            state.segment_path(first).unlink(missing_ok=True)

    # -- the queue ---------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self._closed:
            raise WebhookError("the webhook queue is closed")
        if self.read_only:
            raise WebhookError("the webhook queue was opened read-only")

    def _endpoint(self, name: str, *, create: bool) -> _Endpoint | None:
        state = self._endpoints.get(name)
        if state is None and create:
            directory = self.directory / QUEUES_DIR / name
            directory.mkdir(mode=_DIR_MODE, exist_ok=True)
            fsync_dir(directory.parent)
            state = self._endpoints[name] = self._open_endpoint(directory)
        return state

    def append(self, items: Sequence[tuple[str, WebhookEvent]], *, now: float) -> list[bool]:
        with self._lock:
            self._check_writable()
            return self._append(items, now=now, capped=True)

    def _append(self, items: Sequence[tuple[str, WebhookEvent]], *, now: float, capped: bool) -> list[bool]:
        kept: list[bool] = []
        lines: dict[str, list[bytes]] = {}
        next_seq: dict[str, int] = {}
        try:
            for name, event in items:
                state = self._endpoint(name, create=True)
                assert state is not None
                seq = next_seq.get(name, state.last_seq)
                limit = self._limits.get(name, self._default_limits).max_queue_events
                if capped and seq - state.acked >= limit:
                    kept.append(False)
                    continue
                next_seq[name] = seq + 1
                lines.setdefault(name, []).append(_line(seq + 1, now, event))
                kept.append(True)
        except OSError as exc:
            raise WebhookError(f"cannot create a webhook queue in {self.directory}: {exc}") from exc
        written: list[tuple[_Endpoint, int]] = []
        try:
            for name, new_lines in lines.items():
                state = self._endpoints[name]
                self._writer_for(state)
                written.append((state, state.write_size))
                data = b"".join(new_lines)
                _write_all(state.write_fd, data)
                os.fdatasync(state.write_fd)
                state.write_size += len(data)
        except OSError as exc:
            for state, size in written:
                self._cut_back(state, size)
            raise WebhookError(f"cannot write the webhook queue in {self.directory}: {exc}") from exc
        for name in lines:
            state = self._endpoints[name]
            was_empty = state.last_seq <= state.acked
            state.last_seq = next_seq[name]
            if state.read_segment is None:
                state.read_segment, state.read_offset = state.segments[0], 0
            if was_empty or state.head is None:
                self._load_head(state)
                self._delete_delivered_segments(state)
        return kept

    def _writer_for(self, state: _Endpoint) -> None:
        """Makes ``state.write_fd`` the segment to append to, starting a new one when needed."""
        if state.write_fd >= 0 and state.write_size < self._segment_bytes:
            return
        if state.write_fd < 0 and state.segments:
            path = state.segment_path(state.segments[-1])
            size = path.stat().st_size
            if size < self._segment_bytes:
                state.write_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                state.write_size = size
                return
        self._close_writer(state)
        first = state.last_seq + 1
        fd = os.open(state.segment_path(first), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     _FILE_MODE)
        try:
            fsync_dir(state.directory)
        except BaseException:
            os.close(fd)
            raise
        state.write_fd, state.write_size = fd, 0
        state.segments.append(first)

    def _cut_back(self, state: _Endpoint, size: int) -> None:
        try:
            os.ftruncate(state.write_fd, size)
            os.fsync(state.write_fd)
            state.write_size = size
        except OSError as exc:
            # The next append starts a new segment; the torn bytes are cut off on the next open.
            log.error("webhook queue %s: cannot cut back a failed write: %s", state.directory.name, exc)
            self._close_writer(state)

    @staticmethod
    def _close_writer(state: _Endpoint) -> None:
        if state.write_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(state.write_fd)
            state.write_fd = -1
            state.write_size = 0

    def head(self, endpoint: str) -> QueuedEvent | None:
        with self._lock:
            if self._closed:
                raise WebhookError("the webhook queue is closed")
            state = self._endpoints.get(endpoint)
            if state is None:
                return None
            if state.head is None and state.last_seq > state.acked:
                self._load_head(state)
            return state.head

    def _take_head(self, endpoint: str, seq: int) -> tuple[_Endpoint, QueuedEvent]:
        self._check_writable()
        state = self._endpoints.get(endpoint)
        head = self.head(endpoint)
        if state is None or head is None or head.seq != seq:
            raise WebhookError(f"webhook queue {endpoint}: event {seq} is not the head")
        return state, head

    def ack(self, endpoint: str, seq: int) -> None:
        with self._lock:
            state, _head = self._take_head(endpoint, seq)
            self._advance(state, seq)

    def _advance(self, state: _Endpoint, seq: int) -> None:
        try:
            os.pwrite(state.cursor_fd, _cursor_bytes(seq), 0)
            os.fdatasync(state.cursor_fd)
        except OSError as exc:
            raise WebhookError(f"cannot write the webhook cursor of {state.directory.name}: {exc}") from exc
        state.acked = seq
        state.read_offset = state.head_end
        self._load_head(state)
        self._delete_delivered_segments(state)

    def bury(self, endpoint: str, seq: int, *, attempts: int, error: str, now: float) -> int:
        with self._lock:
            state, head = self._take_head(endpoint, seq)
            letter = DeadLetter(endpoint, head.event, head.queued, now, attempts, error[:500])
            dead = state.directory / DEAD_DIR
            try:
                dead.mkdir(mode=_DIR_MODE, exist_ok=True)
                write_atomic(dead / f"{time.time_ns():020d}-{head.event.id}.json",
                             json.dumps(letter.to_dict(), sort_keys=True).encode(), mode=_FILE_MODE)
            except OSError as exc:
                raise WebhookError(f"cannot write a dead letter of {endpoint}: {exc}") from exc
            state.dead_count += 1
            # Durable in dead/ before it leaves the queue: a crash in between keeps it twice,
            # never zero times.
            self._advance(state, seq)
            return self._trim_dead(state, self._limits.get(endpoint, self._default_limits).max_dead_letters)

    def _trim_dead(self, state: _Endpoint, limit: int) -> int:
        if state.dead_count <= limit:
            return 0
        files = _dead_files(state.directory / DEAD_DIR)
        excess = files[: max(0, len(files) - limit)]
        for path in excess:
            path.unlink(missing_ok=True)
        state.dead_count = len(files) - len(excess)
        if excess:
            log.warning("webhook %s: removed the %d oldest dead letter(s) (max_dead_letters = %d)",
                        state.directory.name, len(excess), limit)
        return len(excess)

    def dead_letters(self, endpoint: str | None = None) -> list[DeadLetter]:
        with self._lock:
            if self._closed:
                raise WebhookError("the webhook queue is closed")
            letters = [letter for _path, letter in self._dead(endpoint)]
        return sorted(letters, key=lambda letter: letter.buried)

    def _dead(self, endpoint: str | None) -> Iterator[tuple[Path, DeadLetter]]:
        for name, state in sorted(self._endpoints.items()):
            if endpoint not in (None, name):
                continue
            for path in _dead_files(state.directory / DEAD_DIR):
                try:
                    document = json.loads(path.read_bytes())
                    yield path, DeadLetter(name, WebhookEvent.from_dict(document["event"]),
                                           float(document["queued"]), float(document["buried"]),
                                           int(document["attempts"]), str(document["error"]))
                except FileNotFoundError:
                    continue  # replayed or trimmed meanwhile (a reader beside the seed)
                except (OSError, ValueError, KeyError, TypeError, WebhookError) as exc:
                    log.warning("webhook dead letter %s skipped: %s", path, exc)

    def replay(self, event_id: str | None, *, endpoint: str | None = None, now: float) -> int:
        with self._lock:
            self._check_writable()
            chosen = [(path, letter) for path, letter in self._dead(endpoint)
                      if event_id is None or letter.event.id == event_id]
            if not chosen:
                return 0
            chosen.sort(key=lambda item: item[1].buried)
            # Durable in the queue before the dead letter goes: a crash in between queues it
            # again on the next replay (one more delivery), never loses it.
            self._append([(letter.endpoint, letter.event) for _path, letter in chosen], now=now, capped=False)
            for path, letter in chosen:
                path.unlink(missing_ok=True)
                self._endpoints[letter.endpoint].dead_count -= 1
            for name in {letter.endpoint for _path, letter in chosen}:
                with contextlib.suppress(OSError):
                    fsync_dir(self._endpoints[name].directory / DEAD_DIR)
            return len(chosen)

    def stats(self, endpoint: str) -> QueueStats:
        state = self._endpoints.get(endpoint)
        if state is None:
            return QueueStats()
        depth = max(0, state.last_seq - state.acked)
        return QueueStats(depth, state.oldest_queued if depth else None, state.dead_count)

    def endpoints(self) -> list[str]:
        with self._lock:
            return sorted(name for name, state in self._endpoints.items()
                          if state.last_seq > state.acked or state.dead_count)

    # -- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for state in self._endpoints.values():
                self._close_writer(state)
                if state.cursor_fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(state.cursor_fd)
                    state.cursor_fd = -1
            if self._lock_fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> FileEventQueue:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _cursor_bytes(seq: int) -> bytes:
    return f"{seq:0{_CURSOR_WIDTH}d}\n".encode()


def _read_cursor(path: Path) -> int:
    try:
        text = path.read_bytes()[: _CURSOR_WIDTH + 1].decode("ascii").strip()
    except FileNotFoundError:
        return 0
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("webhook cursor %s unreadable (%s): delivering everything still queued again", path, exc)
        return 0
    if not text.isdigit():
        log.warning("webhook cursor %s unreadable: delivering everything still queued again", path)
        return 0
    return int(text)


def _line(seq: int, queued: float, event: WebhookEvent) -> bytes:
    document = {"seq": seq, "queued": round(queued, 6), "event": event.to_dict()}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def _iter_lines(path: Path, offset: int, end: int | None, *, strict: bool
                ) -> Iterator[tuple[int, float, WebhookEvent | None, int]]:
    """(seq, queued, event, end offset) of each complete line of ``path`` from ``offset``.

    An unreadable complete line gives ``event=None`` (and is logged) unless ``strict``.
    """
    with path.open("rb") as handle:
        handle.seek(offset)
        position = offset
        while end is None or position < end:
            raw = handle.readline(_MAX_LINE)
            if not raw.endswith(b"\n"):
                return  # the end, or a line still being written by the seed (read-only readers)
            position += len(raw)
            try:
                document = json.loads(raw)
                seq, queued = int(document["seq"]), float(document["queued"])
                event: WebhookEvent | None = WebhookEvent.from_dict(document["event"])
            except (ValueError, KeyError, TypeError, WebhookError) as exc:
                if strict:
                    raise WebhookError(f"{path}: unreadable line at {position - len(raw)}: {exc}") from None
                log.error("webhook queue %s: unreadable line at offset %d skipped: %s", path, position - len(raw),
                          exc)
                seq = _seq_guess(raw)
                queued, event = 0.0, None
            yield seq, queued, event, position


def _seq_guess(raw: bytes) -> int:
    try:
        return int(json.loads(raw).get("seq", 0))
    except (ValueError, AttributeError, TypeError):
        return 0


def _dead_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.glob("*.json") if not path.name.startswith("."))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
