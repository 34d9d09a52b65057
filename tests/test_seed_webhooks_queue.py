"""The webhook queue (seed.events): one conformance test for every ``EventQueue``, the file
queue's crash safety (torn tails, lost cursors, segments, the lock), ``[[webhooks]]``
parsing, the audit → event mapping and the payload against docs/webhook-event.schema.json.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest

from p2pd.errors import ConfigError
from seed.config import load_config
from seed.events import (
    EVENT_TYPES,
    AuditMapper,
    EventQueue,
    FileEventQueue,
    MemoryEventQueue,
    QueueLimits,
    WebhookConfig,
    WebhookError,
    WebhookEvent,
    WebhookQueueInUse,
    make_event,
    webhooks_directory,
    webhooks_from_toml,
)

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "webhook-event.schema.json"
DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64
NOW = 1_700_000_000.0


@functools.cache
def schema_validator() -> jsonschema.Draft202012Validator:
    """The published schema, checked, as a validator (built once: building takes milliseconds)."""
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def push_event(n: int, repository: str = "team/app") -> WebhookEvent:
    return make_event("push", repository=repository, tag=f"v{n}", digest=DIGEST,
                      media_type="application/vnd.oci.image.manifest.v1+json", size=100 + n,
                      actor={"name": "alice", "kind": "user", "source": "127.0.0.1"})


# -- one conformance test for every queue ------------------------------------------------------


QueueFactory = Callable[[QueueLimits], EventQueue]


@pytest.fixture(params=["memory", "file"])
def make_queue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueFactory]:
    opened: list[EventQueue] = []

    def factory(limits: QueueLimits) -> EventQueue:
        queue: EventQueue
        if request.param == "memory":
            queue = MemoryEventQueue(default_limits=limits)
        else:
            # Small segments, so that a few events already span several files.
            queue = FileEventQueue(tmp_path / "webhooks", default_limits=limits, segment_bytes=700)
        opened.append(queue)
        return queue

    yield factory
    for queue in opened:
        queue.close()


def test_event_queue_conformance(make_queue: QueueFactory) -> None:
    queue = make_queue(QueueLimits(max_queue_events=5, max_dead_letters=2))
    assert isinstance(queue, EventQueue)
    assert queue.head("a") is None and queue.endpoints() == []
    assert queue.stats("a").depth == 0 and queue.stats("a").oldest_queued is None

    # Per-endpoint FIFO with consecutive seqs; endpoints are independent.
    events = [push_event(n) for n in range(7)]
    kept = queue.append([("a", events[0]), ("b", events[0]), ("a", events[1])], now=NOW)
    assert kept == [True, True, True]
    kept = queue.append([("a", e) for e in events[2:7]], now=NOW + 1)
    assert kept == [True, True, True, False, False]  # the cap: 5 queued, newer ones refused
    assert queue.endpoints() == ["a", "b"]
    stats = queue.stats("a")
    assert (stats.depth, stats.oldest_queued, stats.dead_letters) == (5, NOW, 0)
    head = queue.head("a")
    assert head is not None and head.event == events[0] and head.queued == NOW
    first_seq = head.seq

    # Only the head can be acked, and acking moves to the next one, in order.
    with pytest.raises(WebhookError):
        queue.ack("a", first_seq + 1)
    delivered = []
    for _ in range(2):
        head = queue.head("a")
        assert head is not None
        queue.ack("a", head.seq)
        delivered.append(head.event)
    assert delivered == events[:2]
    assert queue.stats("a").depth == 3 and queue.stats("a").oldest_queued == NOW + 1
    assert queue.stats("b").depth == 1

    # Room again below the cap.
    assert queue.append([("a", events[5])], now=NOW + 2) == [True]

    # Bury: out of the queue, into the dead letters (capped, oldest removed first).
    removed = []
    for n, expected in enumerate(events[2:5]):
        head = queue.head("a")
        assert head is not None and head.event == expected
        removed.append(queue.bury("a", head.seq, attempts=n + 1, error=f"HTTP 50{n}", now=NOW + 10 + n))
    assert removed == [0, 0, 1]
    letters = queue.dead_letters("a")
    assert [letter.event for letter in letters] == events[3:5]
    assert [(letter.attempts, letter.error, letter.buried, letter.queued) for letter in letters] == [
        (2, "HTTP 501", NOW + 11, NOW + 1), (3, "HTTP 502", NOW + 12, NOW + 1)]
    assert queue.stats("a").dead_letters == 2 and queue.dead_letters("b") == []
    assert queue.dead_letters() == letters

    # Replay one by id, then all: back at the end of the queue, in buried order, fresh queued time.
    assert queue.replay("0" * 32, now=NOW + 20) == 0
    assert queue.replay(events[4].id, now=NOW + 20) == 1
    assert queue.replay(None, endpoint="b", now=NOW + 20) == 0
    assert queue.replay(None, now=NOW + 21) == 1
    assert queue.dead_letters() == [] and queue.stats("a").dead_letters == 0
    order = []
    while (head := queue.head("a")) is not None:
        order.append((head.event, head.queued))
        queue.ack("a", head.seq)
    assert order == [(events[5], NOW + 2), (events[4], NOW + 20), (events[3], NOW + 21)]
    assert queue.stats("a").depth == 0 and queue.endpoints() == ["b"]
    head_b = queue.head("b")
    assert head_b is not None and head_b.event == events[0]

    # Closed queues refuse.
    queue.close()
    with pytest.raises(WebhookError):
        queue.append([("a", events[0])], now=NOW)


def test_event_queue_conformance_threads(make_queue: QueueFactory) -> None:
    """Appends from several threads while another delivers: every event exactly once, each
    thread's events in its order."""
    queue = make_queue(QueueLimits(max_queue_events=10_000))
    per_thread = 60
    writers = [threading.Thread(target=lambda t=t: [queue.append([("a", push_event(t * 1000 + n))], now=NOW)
                                                    for n in range(per_thread)]) for t in range(3)]
    seen: list[int] = []

    def deliver() -> None:
        while len(seen) < 3 * per_thread:
            head = queue.head("a")
            if head is None:
                continue
            queue.ack("a", head.seq)
            seen.append(int(str(head.event.tag)[1:]))

    reader = threading.Thread(target=deliver)
    for thread in (*writers, reader):
        thread.start()
    for thread in (*writers, reader):
        thread.join(timeout=30)
    assert not reader.is_alive()
    assert sorted(seen) == sorted(t * 1000 + n for t in range(3) for n in range(per_thread))
    for t in range(3):
        mine = [n for n in seen if n // 1000 == t]
        assert mine == sorted(mine)


# -- the file queue ---------------------------------------------------------------------------


def _segments(directory: Path, endpoint: str) -> list[Path]:
    return sorted((directory / "queues" / endpoint).glob("*.log"))


def test_file_queue_survives_reopen_and_deletes_delivered_segments(tmp_path: Path) -> None:
    directory = tmp_path / "webhooks"
    events = [push_event(n) for n in range(30)]
    with FileEventQueue(directory, segment_bytes=1500) as queue:
        # A call's lines go into one file; the next call starts a new file past segment_bytes.
        for start in range(0, 20, 5):
            queue.append([("a", e) for e in events[start:start + 5]], now=NOW)
        queue.append([("a", e) for e in events[20:]], now=NOW + 1)
        assert len(_segments(directory, "a")) >= 3
        for _ in range(12):
            head = queue.head("a")
            assert head is not None
            queue.ack("a", head.seq)
    # Only segments holding undelivered events (or the one being read) are kept.
    kept = _segments(directory, "a")
    assert int(kept[0].stem) <= 13
    with FileEventQueue(directory, segment_bytes=1500) as queue:
        assert queue.stats("a").depth == 18
        rest = []
        while (head := queue.head("a")) is not None:
            rest.append(head.event)
            queue.ack("a", head.seq)
        assert rest == events[12:]
        # Seqs keep growing after a restart (never reused below the cursor).
        queue.append([("a", events[0])], now=NOW)
        head = queue.head("a")
        assert head is not None and head.seq == 31
    assert (directory / "queues" / "a" / "cursor").read_text().strip() == f"{30:020d}"


def test_file_queue_cuts_a_torn_tail(tmp_path: Path) -> None:
    directory = tmp_path / "webhooks"
    with FileEventQueue(directory) as queue:
        queue.append([("a", push_event(0)), ("a", push_event(1))], now=NOW)
    segment = _segments(directory, "a")[-1]
    complete = segment.read_bytes()
    with segment.open("ab") as handle:
        handle.write(b'{"event":{"id":"abc')  # a write cut by a crash (or power loss)
    with FileEventQueue(directory) as queue:
        assert segment.read_bytes() == complete
        assert queue.stats("a").depth == 2
        queue.append([("a", push_event(2))], now=NOW)
        tags = []
        while (head := queue.head("a")) is not None:
            tags.append(head.event.tag)
            queue.ack("a", head.seq)
        assert tags == ["v0", "v1", "v2"]


def test_file_queue_lost_cursor_delivers_again_never_skips(tmp_path: Path) -> None:
    directory = tmp_path / "webhooks"
    with FileEventQueue(directory) as queue:
        queue.append([("a", push_event(n)) for n in range(3)], now=NOW)
        head = queue.head("a")
        assert head is not None
        queue.ack("a", head.seq)
    (directory / "queues" / "a" / "cursor").write_bytes(b"garbage")
    with FileEventQueue(directory) as queue:
        head = queue.head("a")
        assert head is not None and head.event.tag == "v0"  # at least once: delivered again
        assert queue.stats("a").depth == 3


def test_file_queue_unreadable_line_is_skipped_not_fatal(tmp_path: Path) -> None:
    directory = tmp_path / "webhooks"
    with FileEventQueue(directory) as queue:
        queue.append([("a", push_event(0))], now=NOW)
    segment = _segments(directory, "a")[-1]
    with segment.open("ab") as handle:
        handle.write(b'{"seq":2,"queued":1.0,"event":{"version":99}}\n')
    with FileEventQueue(directory) as queue:
        queue.append([("a", push_event(3))], now=NOW)
        tags = []
        while (head := queue.head("a")) is not None:
            tags.append(head.event.tag)
            queue.ack("a", head.seq)
        assert tags == ["v0", "v3"]
        assert queue.stats("a").depth == 0


def test_file_queue_lock_and_read_only_view(tmp_path: Path) -> None:
    directory = tmp_path / "webhooks"
    with FileEventQueue(directory) as queue:
        with pytest.raises(WebhookQueueInUse):
            FileEventQueue(directory)
        queue.append([("a", push_event(0)), ("a", push_event(1))], now=NOW)
        head = queue.head("a")
        assert head is not None
        queue.bury("a", head.seq, attempts=3, error="HTTP 500", now=NOW + 5)
        # A reader beside the writer: sees the same, changes nothing.
        with FileEventQueue(directory, read_only=True) as view:
            assert view.stats("a").depth == 1 and view.stats("a").dead_letters == 1
            assert [letter.event.tag for letter in view.dead_letters()] == ["v0"]
            with pytest.raises(WebhookError):
                view.replay(None, now=NOW)
            with pytest.raises(WebhookError):
                view.append([("a", push_event(2))], now=NOW)
    with FileEventQueue(directory) as queue:  # the lock went with the first queue
        assert queue.stats("a").dead_letters == 1


def test_file_queue_directory_is_private(tmp_path: Path) -> None:
    directory = webhooks_directory(tmp_path / "data")
    with FileEventQueue(directory) as queue:
        queue.append([("a", push_event(0))], now=NOW)
    for path in _segments(directory, "a"):
        assert os.stat(path).st_mode & 0o007 == 0


# -- configuration ------------------------------------------------------------------------------


def test_webhooks_config(tmp_path: Path) -> None:
    (tmp_path / "hook.secret").write_text("s3cret-value\n")
    config_path = tmp_path / "seed.toml"
    config_path.write_text(
        '[[webhooks]]\nurl = "https://hooks.example/seed/T0KEN?x=1"\nevents = ["push", "tag.moved"]\n'
        'repositories = "prod/**"\nsecret_file = "hook.secret"\ntimeout = 3\n\n'
        '[[webhooks]]\nname = "chat"\nurl = "http://127.0.0.1:9/x"\n')
    config = load_config(config_path, data=tmp_path / "data")
    first, chat = config.webhooks
    assert first.secret == "s3cret-value"  # relative to the configuration file
    assert first.name.startswith("hooks.example-") and first.repositories == ("prod/**",)
    assert "s3cret" not in repr(config) and "T0KEN" not in first.display_url
    assert chat.name == "chat" and chat.events == () and chat.secret is None
    prod = make_event("push", repository="prod/app", digest=DIGEST)
    assert first.wants(prod) and not first.wants(make_event("push", repository="dev/app"))
    assert not first.wants(make_event("delete", repository="prod/app"))
    # Events without a repository pass every repository filter.
    assert WebhookConfig(url="http://x", repositories=("prod/**",)).wants(make_event("login.failure"))


@pytest.mark.parametrize(("table", "message"), [
    ({"url": "ftp://x/"}, "http:// or https://"),
    ({"url": "https://user:pw@x/"}, "credentials"),
    ({"url": "https://x/", "events": ["pushed"]}, "unknown event type"),
    ({"url": "https://x/", "secret": "a", "secret_file": "/etc/hostname"}, "not both"),
    ({"url": "https://x/", "secret_file": "/nonexistent/secret"}, "cannot read"),
    ({"url": "https://x/", "timeout": 0}, "positive"),
    ({"url": "https://x/", "name": "Bad Name"}, "name"),
    ({"url": "https://x/", "repositories": ["bad pattern!"]}, "invalid repository pattern"),
    ({"url": "https://x/", "colour": "red"}, "unknown setting"),
])
def test_webhooks_config_errors(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        webhooks_from_toml([table])


def test_webhooks_config_names_are_unique() -> None:
    with pytest.raises(ConfigError, match="unique"):
        webhooks_from_toml([{"url": "https://x/a", "name": "n"}, {"url": "https://x/b", "name": "n"}])


# -- events and the schema -------------------------------------------------------------------------


def test_audit_mapping_and_schema() -> None:
    validator = schema_validator()
    schema_types = validator.schema["properties"]["type"]["enum"]
    assert set(schema_types) == set(EVENT_TYPES)
    mapper = AuditMapper()
    time = "2025-12-03T05:44:00.123456Z"
    actor = {"actor": "alice", "actor_kind": "user", "provider": "htpasswd", "source": "10.0.0.7"}
    calls = [
        ("manifest.push", {**actor, "repository": "team/app", "digest": DIGEST, "reference": "1.0",
                           "detail": {"media_type": "application/vnd.oci.image.manifest.v1+json", "size": 512}}),
        ("tag.move", {**actor, "repository": "team/app", "reference": "1.0", "old_digest": None,
                      "new_digest": DIGEST}),
        ("manifest.push", {**actor, "repository": "team/app", "digest": OTHER_DIGEST, "reference": None,
                           "detail": {"media_type": "application/vnd.oci.image.index.v1+json", "size": 90}}),
        ("tag.delete", {**actor, "repository": "team/app", "reference": "1.0", "old_digest": DIGEST}),
        ("manifest.delete", {**actor, "repository": "team/app", "digest": OTHER_DIGEST}),
        ("blob.delete", {**actor, "repository": "team/app", "digest": DIGEST}),
        ("scan.completed", {"actor": "", "actor_kind": "system", "repository": "team/app", "digest": DIGEST,
                            "detail": {"status": "complete", "summary": {"high": 2}, "advisories": ["CVE-1"],
                                       "database": "x", "problems": 0}}),
        ("signature.verdict", {**actor, "repository": "prod/app", "reference": "1.0", "digest": DIGEST,
                               "detail": {"verdict": "denied", "reason": "unsigned", "mode": "enforce",
                                          "rule": ["prod/**"], "verified_by": [], "signatures": 0}}),
        ("login.failure", {"actor": "mallory", "source": "10.0.0.9", "detail": {"reason": "bad credentials"}}),
        ("login.success", actor),
        ("token.issued", actor),
        ("access.denied", {**actor, "repository": "team/app"}),
    ]
    events = [mapper.map(action, fields, time=time) for action, fields in calls]
    assert events[-3:] == [None, None, None]  # not webhook events
    mapped = [event for event in events if event is not None]
    for event in mapped:
        document = json.loads(event.body())
        validator.validate(document)
        assert WebhookEvent.from_dict(document) == event
        assert event.body() == WebhookEvent.from_dict(document).body()  # byte-stable across a restart
    push, moved, digest_push, tag_delete, manifest_delete, blob_delete, scan, verdict, login = mapped
    assert (push.type, push.tag, push.media_type, push.size, push.actor) == (
        "push", "1.0", "application/vnd.oci.image.manifest.v1+json", 512,
        {"name": "alice", "kind": "user", "source": "10.0.0.7"})
    # The tag move right after the push knows the manifest's media type and size.
    assert (moved.type, moved.tag, moved.digest, moved.size, moved.detail) == (
        "tag.moved", "1.0", DIGEST, 512, {"old_digest": None})
    assert digest_push.tag is None
    assert (tag_delete.type, tag_delete.tag, tag_delete.digest, tag_delete.detail) == (
        "delete", "1.0", DIGEST, {"target": "tag"})
    assert manifest_delete.detail == {"target": "manifest"} and blob_delete.detail == {"target": "blob"}
    assert scan.detail["summary"] == {"high": 2} and scan.actor["kind"] == "system"
    assert verdict.type == "signature.verdict" and verdict.detail["verdict"] == "denied"
    assert (login.repository, login.actor["name"], login.detail) == (None, "mallory", {"reason": "bad credentials"})
    assert len({event.id for event in mapped}) == len(mapped)


def test_event_validation() -> None:
    with pytest.raises(WebhookError, match="unknown webhook event type"):
        make_event("pushed")
    with pytest.raises(WebhookError):
        WebhookEvent(id="x", type="push", time="2025-12-03T05:44:00.123456Z")
    with pytest.raises(WebhookError):
        make_event("push", size="12")  # type: ignore[arg-type]
    with pytest.raises(WebhookError, match="version"):
        WebhookEvent.from_dict({"version": 2, "id": "a" * 32, "type": "push", "time": "t"})
    # make_event's values validate against the schema as they are.
    schema_validator().validate(json.loads(push_event(1).body()))


# -- the command line with the seed stopped ------------------------------------------------------


def test_cli_with_the_seed_stopped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from seed.cli import main as seed_main

    data = tmp_path / "data"
    config_path = tmp_path / "seed.toml"
    config_path.write_text('[[webhooks]]\nname = "bot"\nurl = "https://bot.example/hook/T0KEN"\n')
    events = [push_event(n) for n in range(3)]
    with FileEventQueue(webhooks_directory(data)) as queue:
        queue.append([("bot", event) for event in events], now=NOW)
        for n in range(2):
            head = queue.head("bot")
            assert head is not None
            queue.bury("bot", head.seq, attempts=4, error="HTTP 502", now=NOW + n)
    args = ["--config", str(config_path), "--data", str(data)]
    assert seed_main(["webhooks", "ls", *args]) == 0
    output = capsys.readouterr().out
    assert "bot" in output and "https://bot.example/..." in output and "T0KEN" not in output
    assert seed_main(["webhooks", "ls", "--json", *args]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["queued"], row["dead_letters"]) == (1, 2) and row["oldest_age"] > 0
    assert seed_main(["webhooks", "ls", "--dead", *args]) == 0
    output = capsys.readouterr().out
    assert events[0].id in output and events[1].id in output and "HTTP 502" in output
    # No seed holds the lock: the command replays itself.
    assert seed_main(["webhooks", "retry", events[1].id, *args]) == 0
    assert "1 event(s) queued again" in capsys.readouterr().out
    assert seed_main(["webhooks", "retry", events[1].id, *args]) == 1
    assert seed_main(["webhooks", "retry", "--all", "--endpoint", "bot", *args]) == 0
    with FileEventQueue(webhooks_directory(data)) as queue:
        order = []
        while (head := queue.head("bot")) is not None:
            order.append(head.event.id)
            queue.ack("bot", head.seq)
    assert order == [events[2].id, events[1].id, events[0].id]
