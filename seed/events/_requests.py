"""Requests from ``seed webhooks retry`` to a running seed, which owns the queue (its lock).

Rules/invariants:
- The command writes one crash-safe file into ``DATA/webhooks/requests/`` and waits a little
  for the seed's answer (``<same name>.done``); the seed polls the directory, runs the
  request on its open queue and answers before it deletes the request. A request the seed
  has not answered when the command gives up is still run later (the command says so).
- A malformed request is answered with an error, never left to be retried forever.
- Answers nobody picked up are removed after an hour.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pd.fsutil import write_atomic

from ._event import WebhookError
from ._queue import EventQueue

__all__ = ["REQUESTS_DIR", "pending_requests", "process_requests", "submit_request", "wait_for_answer"]

log = logging.getLogger("seed.webhooks")

REQUESTS_DIR = "requests"
_MAX_REQUEST = 4096
_STALE_ANSWER = 3600.0  # seconds an unclaimed answer is kept


def submit_request(directory: Path, request: dict[str, Any]) -> Path:
    """Drops ``request`` (``{"command": "retry", "event_id": ..., "endpoint": ...}``) for the
    running seed; returns the request file's path (its answer is ``path.with_suffix(".done")``)."""
    folder = directory / REQUESTS_DIR
    folder.mkdir(mode=0o750, parents=True, exist_ok=True)
    path = folder / f"{time.time_ns():020d}-{secrets.token_hex(4)}.json"
    write_atomic(path, json.dumps(request, sort_keys=True).encode(), mode=0o640)
    return path


def wait_for_answer(path: Path, limit: float, *, poll: float = 0.1) -> dict[str, Any] | None:
    """Blocks until the seed answered the request at ``path`` (then removes the answer), or
    ``limit`` seconds passed (None)."""
    answer = path.with_suffix(".done")
    deadline = time.monotonic() + limit
    while True:
        try:
            document = json.loads(answer.read_bytes())
        except FileNotFoundError:
            document = None
        if document is not None:
            answer.unlink(missing_ok=True)
            return document if isinstance(document, dict) else {"error": "malformed answer"}
        if time.monotonic() >= deadline:
            return None
        time.sleep(poll)


def pending_requests(directory: Path) -> list[Path]:
    """Request files waiting for the seed, oldest first."""
    folder = directory / REQUESTS_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith("."))


def process_requests(queue: EventQueue, directory: Path, clock: Callable[[], float]) -> int:
    """Runs the waiting requests on ``queue`` (blocking: call it in a worker thread); returns
    how many events were queued again."""
    replayed = 0
    for path in pending_requests(directory):
        try:
            if path.stat().st_size > _MAX_REQUEST:
                raise ValueError("request too large")
            request = json.loads(path.read_bytes())
            if not isinstance(request, dict) or request.get("command") != "retry":
                raise ValueError("unknown command")
            event_id, endpoint = request.get("event_id"), request.get("endpoint")
            if not (event_id is None or isinstance(event_id, str)) or not (endpoint is None or isinstance(endpoint,
                                                                                                          str)):
                raise ValueError("event_id and endpoint must be strings")
            count = queue.replay(event_id, endpoint=endpoint, now=clock())
            answer: dict[str, Any] = {"replayed": count}
            replayed += count
        except FileNotFoundError:
            continue
        except (OSError, ValueError, WebhookError) as exc:
            log.error("webhook request %s: %s", path.name, exc)
            answer = {"error": str(exc)[:300]}
        write_atomic(path.with_suffix(".done"), json.dumps(answer).encode(), mode=0o640)
        path.unlink(missing_ok=True)
        if "replayed" in answer:
            log.info("webhooks: %d dead letter(s) queued again (requested by %s)", answer["replayed"], path.name)
    _remove_stale_answers(directory / REQUESTS_DIR)
    return replayed


def _remove_stale_answers(folder: Path) -> None:
    if not folder.is_dir():
        return
    cutoff = time.time() - _STALE_ANSWER
    for path in folder.glob("*.done"):
        try:
            if path.stat().st_mtime < cutoff:
                os.unlink(path)
        except FileNotFoundError:
            continue
