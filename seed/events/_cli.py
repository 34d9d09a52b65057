"""``seed webhooks ls [--dead] | retry EVENT_ID|--all``: the webhook queues from the command line.

Beside a running seed: ``ls`` reads the files without the lock (they are only appended
whole, see ``_file``); ``retry`` asks the seed through a request file and waits for its
answer (``_requests``). With the seed stopped, ``retry`` takes the lock and replays itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._config import WebhookConfig
from ._event import WebhookError
from ._file import QUEUES_DIR, FileEventQueue, WebhookQueueInUse, webhooks_directory
from ._queue import DeadLetter
from ._requests import submit_request, wait_for_answer

__all__ = ["add_webhooks_parser", "run_webhooks_command"]

_ANSWER_WAIT = 10.0  # seconds `retry` waits for a running seed's answer


def add_webhooks_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``webhooks`` with its subcommands to the ``seed`` parser's subcommands."""
    webhooks = commands.add_parser("webhooks", help="show webhook queues and dead letters, replay dead letters")
    actions = webhooks.add_subparsers(dest="webhooks_command", required=True)
    ls = actions.add_parser("ls", help="queue depth, oldest event and dead letters per endpoint")
    ls.add_argument("--dead", action="store_true", help="list the dead letters (events given up), oldest first")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    retry = actions.add_parser("retry", help="queue dead letters again (works beside a running seed)")
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("event_id", nargs="?", help="the id of the dead letter to replay")
    which.add_argument("--all", action="store_true", help="replay every dead letter")
    for parser in (ls, retry):
        parser.add_argument("--endpoint", help="only this endpoint (its name in [[webhooks]])")
        parser.add_argument("--data", type=Path, help="data directory (queues are in DATA/webhooks)")
        parser.add_argument("--config", type=Path, help="TOML configuration file")


def run_webhooks_command(args: argparse.Namespace, data: Path, endpoints: Sequence[WebhookConfig]) -> int:
    """Runs ``seed webhooks <command>``; returns the exit code (0 fine, 1 nothing matched,
    2 the queue cannot be read or used)."""
    directory = webhooks_directory(data)
    try:
        if args.webhooks_command == "ls":
            return _ls(directory, endpoints, args)
        return _retry(directory, args)
    except WebhookError as exc:
        print(f"seed webhooks: {exc}", file=sys.stderr)
        return 2


def _ls(directory: Path, endpoints: Sequence[WebhookConfig], args: argparse.Namespace) -> int:
    with FileEventQueue(directory, read_only=True) as queue:
        if args.dead:
            _print_dead(queue.dead_letters(args.endpoint), as_json=args.json)
            return 0
        configured = {endpoint.name: endpoint for endpoint in endpoints}
        names = sorted(set(configured) | set(queue.endpoints()))
        if args.endpoint is not None:
            names = [name for name in names if name == args.endpoint]
        now = time.time()
        rows: list[dict[str, Any]] = []
        for name in names:
            stats = queue.stats(name)
            endpoint = configured.get(name)
            rows.append({"endpoint": name, "url": endpoint.display_url if endpoint else "(not configured)",
                         "queued": stats.depth,
                         "oldest_age": round(now - stats.oldest_queued, 1) if stats.oldest_queued else None,
                         "dead_letters": stats.dead_letters})
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
        return 0
    if not rows:
        print("no webhooks configured and no queues on disk")
        return 0
    print(f"{'ENDPOINT':<28} {'QUEUED':>8} {'OLDEST':>10} {'DEAD':>6}  URL")
    for row in rows:
        age = _age(row["oldest_age"]) if row["oldest_age"] is not None else "-"
        print(f"{row['endpoint']:<28} {row['queued']:>8} {age:>10} {row['dead_letters']:>6}  {row['url']}")
    return 0


def _print_dead(letters: list[DeadLetter], *, as_json: bool) -> None:
    if as_json:
        for letter in letters:
            print(json.dumps(letter.to_dict(), sort_keys=True))
        return
    if not letters:
        print("no dead letters")
        return
    print(f"{'EVENT ID':<32}  {'ENDPOINT':<20} {'TYPE':<17} {'BURIED (UTC)':<19} {'TRIES':>5}  REPOSITORY / ERROR")
    for letter in letters:
        event = letter.event
        buried = datetime.fromtimestamp(letter.buried, UTC).strftime("%Y-%m-%d %H:%M:%S")
        what = event.repository or event.actor.get("name", "")
        if event.tag:
            what += f":{event.tag}"
        print(f"{event.id:<32}  {letter.endpoint:<20} {event.type:<17} {buried:<19} {letter.attempts:>5}  "
              f"{what} / {letter.error}")


def _retry(directory: Path, args: argparse.Namespace) -> int:
    event_id = None if args.all else args.event_id
    if not (directory / QUEUES_DIR).is_dir():
        return _report(0, event_id)  # no webhook ever queued anything here
    try:
        queue = FileEventQueue(directory)
    except WebhookQueueInUse:
        # The running seed owns the queue: ask it.
        path = submit_request(directory, {"command": "retry", "event_id": event_id, "endpoint": args.endpoint})
        answer = wait_for_answer(path, _ANSWER_WAIT)
        if answer is None:
            print(f"the seed has not answered yet; it will replay when it reads {path.name}")
            return 0
        if "error" in answer:
            raise WebhookError(str(answer["error"])) from None
        count = int(answer.get("replayed", 0))
    else:
        with queue:
            count = queue.replay(event_id, endpoint=args.endpoint, now=time.time())
    return _report(count, event_id)


def _report(count: int, event_id: str | None) -> int:
    if count == 0:
        print(f"no dead letter with id {event_id}" if event_id else "no dead letters")
        return 1 if event_id else 0
    print(f"{count} event(s) queued again")
    return 0


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
