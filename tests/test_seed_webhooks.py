"""Webhook delivery (seed.events.Dispatcher) to real receivers: loopback HTTP servers (the
project's own p2pd.httpd) that check every body's HMAC and schema themselves.

Ordering, retries on 500s and timeouts, dead letters replayed by the real ``seed webhooks``
command beside a running dispatcher, a flood against a dead endpoint that stays within its
bounds, and a whole in-process seed whose pushes, tag moves, deletes and login failures are
announced, durable before the answer, while a hanging endpoint does not slow them down.
"""

from __future__ import annotations

import hmac
import json
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pd.httpd import Request, Response, ServerInfo, serve_http
from seed.config import load_config
from seed.events import (
    Dispatcher,
    FileEventQueue,
    QueueLimits,
    WebhookConfig,
    make_event,
    sign,
    webhooks_directory,
)
from seed.registry import SeedRegistry, serve_seed
from tests.test_seed_api import push_image
from tests.test_seed_webhooks_queue import push_event, schema_validator

SECRET = "receiver-shared-secret"
TOML_SECRET = f'secret = "{SECRET}"'


@dataclass
class Delivery:
    """One request the receiver got."""

    event_id: str
    attempt: int
    status: int
    body: dict[str, Any]


@dataclass
class Receiver:
    """A webhook receiver as an automation would write one: it verifies ``X-Seed-Signature``
    against its own copy of the secret (answering 401 on a mismatch) and validates the body
    against the published schema. ``statuses`` and ``delays`` script its next answers."""

    secret: str | None = SECRET
    default_status: int = 200
    statuses: deque[int] = field(default_factory=deque)
    delays: deque[float] = field(default_factory=deque)
    deliveries: list[Delivery] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    schema_errors: list[str] = field(default_factory=list)
    info: ServerInfo | None = None
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        assert self.info is not None
        return f"{self.info.url}/hooks/seed"

    async def handle(self, request: Request) -> Response:
        body = await request.body.read(1 << 20)
        try:
            if self.secret is not None:
                header = request.headers.get("x-seed-signature") or ""
                expected = "sha256=" + hmac.new(self.secret.encode(), body, "sha256").hexdigest()
                if not hmac.compare_digest(header.encode(), expected.encode()):
                    self.bad_signatures += 1
                    return Response(401, [("Content-Type", "text/plain")], b"bad signature\n")
            if self.delays:
                await trio.sleep(self.delays.popleft())
            document = json.loads(body)
            for error in schema_validator().iter_errors(document):
                self.schema_errors.append(error.message)
            status = self.statuses.popleft() if self.statuses else self.default_status
            self.deliveries.append(Delivery(request.headers.get("x-seed-event-id") or "",
                                            int(request.headers.get("x-seed-delivery-attempt") or 0), status,
                                            document))
            if 200 <= status < 300:
                assert request.headers.get("x-seed-event-id") == document["id"]
                assert request.headers.get("x-seed-event") == document["type"]
                self.accepted.append(document)
            return Response(status, [("Content-Type", "text/plain")], b"thanks\n")
        finally:
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, count: int, limit: float = 10.0) -> list[dict[str, Any]]:
        """Waits until ``count`` deliveries were accepted (2xx); returns them."""
        with trio.fail_after(limit):
            while len(self.accepted) < count:
                await self._changed.wait()
        return self.accepted

    async def wait_until(self, condition: Any, limit: float = 10.0) -> None:
        with trio.fail_after(limit):
            while not condition():
                await self._changed.wait()


async def start_receiver(nursery: trio.Nursery, receiver: Receiver | None = None) -> Receiver:
    receiver = receiver or Receiver()
    receiver.info = await nursery.start(partial(serve_http, receiver.handle, "127.0.0.1", 0))
    return receiver


def endpoint(receiver: Receiver, name: str = "r", **settings: Any) -> WebhookConfig:
    values: dict[str, Any] = {"url": receiver.url, "name": name, "secret": SECRET, "timeout": 2.0,
                              "backoff_initial": 0.02, "backoff_max": 0.1, **settings}
    return WebhookConfig(**values)


async def start_dispatcher(nursery: trio.Nursery, tmp_path: Path, *endpoints: WebhookConfig,
                           **options: Any) -> Dispatcher:
    directory = webhooks_directory(tmp_path / "data")
    limits = {e.name: QueueLimits(e.max_queue_events, e.max_dead_letters) for e in endpoints}
    queue = FileEventQueue(directory, limits=limits)
    dispatcher = Dispatcher(endpoints, queue, requests_directory=directory, **options)
    await nursery.start(dispatcher.serve)
    return dispatcher


def sample(dispatcher: Dispatcher, name: str, **labels: str) -> float:
    value = dispatcher.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def wait_sample(dispatcher: Dispatcher, name: str, at_least: float, limit: float = 10.0, **labels: str) -> None:
    """Waits until a metric reaches ``at_least`` (the receiver answers before the ack is counted)."""
    with trio.fail_after(limit):
        while sample(dispatcher, name, **labels) < at_least:  # noqa: ASYNC110 - counted after a worker thread's ack
            await trio.sleep(0.01)


# -- delivery ---------------------------------------------------------------------------------


async def test_in_order_signed_and_schema_valid(nursery: trio.Nursery, tmp_path: Path) -> None:
    receiver = await start_receiver(nursery)
    dispatcher = await start_dispatcher(nursery, tmp_path, endpoint(receiver))
    # The first event is refused twice (500, 503): the others wait behind it, in order.
    receiver.statuses.extend([500, 503])
    events = [push_event(n) for n in range(40)]
    for event in events:
        assert dispatcher.emit(event) == 1
    await dispatcher.wait_durable()
    accepted = await receiver.wait_for(40)
    assert [document["id"] for document in accepted] == [event.id for event in events]
    assert [document["tag"] for document in accepted] == [f"v{n}" for n in range(40)]
    assert receiver.bad_signatures == 0 and receiver.schema_errors == []
    # Attempts never overtake: the ids the receiver saw are in emission order, retries included.
    position = {event.id: n for n, event in enumerate(events)}
    seen = [position[delivery.event_id] for delivery in receiver.deliveries]
    assert seen == sorted(seen) and seen[:3] == [0, 0, 0]
    assert [d.attempt for d in receiver.deliveries[:3]] == [1, 2, 3]
    await wait_sample(dispatcher, "seed_webhook_delivered_total", 40, endpoint="r")
    assert sample(dispatcher, "seed_webhook_failed_attempts_total", endpoint="r") == 2
    assert sample(dispatcher, "seed_webhook_queue_depth", endpoint="r") == 0
    assert sample(dispatcher, "seed_webhook_oldest_event_age_seconds", endpoint="r") == 0


async def test_signature_is_checked_by_the_receiver(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A receiver with another secret refuses every delivery; the secret is never sent."""
    receiver = await start_receiver(nursery, Receiver(secret="the-receiver-knows-another-one"))
    sent_headers: list[httpx.Headers] = []

    class Spy(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            sent_headers.append(request.headers)
            assert SECRET.encode() not in request.content
            return await super().handle_async_request(request)

    dispatcher = await start_dispatcher(nursery, tmp_path, endpoint(receiver), transport=Spy())
    event = push_event(1)
    dispatcher.emit(event)
    await receiver.wait_until(lambda: receiver.bad_signatures >= 2)
    assert receiver.accepted == []
    header = sent_headers[0]["x-seed-signature"]
    assert header == "sha256=" + sign(SECRET, event.body())
    assert all(SECRET not in value for headers in sent_headers for value in headers.values())
    # The right secret on the receiver's side: the same (retried) event now verifies.
    receiver.secret = SECRET
    accepted = await receiver.wait_for(1)
    assert accepted[0]["id"] == event.id


async def test_timeouts_are_retried(nursery: trio.Nursery, tmp_path: Path) -> None:
    receiver = await start_receiver(nursery)
    receiver.delays.extend([5.0, 5.0])  # the first two attempts hang past the endpoint's timeout
    dispatcher = await start_dispatcher(nursery, tmp_path, endpoint(receiver, timeout=0.3))
    event = push_event(7)
    started = trio.current_time()
    dispatcher.emit(event)
    accepted = await receiver.wait_for(1)
    assert accepted[0]["id"] == event.id
    assert trio.current_time() - started < 4.0  # never waited for the hanging answers
    assert receiver.deliveries[-1].attempt == 3
    assert sample(dispatcher, "seed_webhook_failed_attempts_total", endpoint="r") == 2


async def test_redirects_are_not_followed(nursery: trio.Nursery, tmp_path: Path) -> None:
    elsewhere = await start_receiver(nursery)
    hits: list[str] = []

    async def redirecting(request: Request) -> Response:
        hits.append(request.path)
        return Response(307, [("Location", elsewhere.url)])

    info = await nursery.start(partial(serve_http, redirecting, "127.0.0.1", 0))
    config = WebhookConfig(url=f"{info.url}/hook", name="r", timeout=2.0, backoff_initial=0.02, backoff_max=0.05)
    dispatcher = await start_dispatcher(nursery, tmp_path, config)
    dispatcher.emit(push_event(1))
    await wait_sample(dispatcher, "seed_webhook_failed_attempts_total", 3, endpoint="r")
    assert elsewhere.deliveries == [] and len(hits) >= 3


async def test_dead_letters_and_retry_from_the_command_line(nursery: trio.Nursery, tmp_path: Path) -> None:
    receiver = await start_receiver(nursery, Receiver(default_status=500))
    dispatcher = await start_dispatcher(nursery, tmp_path, endpoint(receiver, max_age=0.4),
                                        endpoint(receiver, name="healthy-but-filtered", events=("delete",)))
    events = [push_event(n) for n in range(3)]
    for event in events:
        dispatcher.emit(event)
    await wait_sample(dispatcher, "seed_webhook_dead_lettered_total", 3, endpoint="r")
    letters = await trio.to_thread.run_sync(dispatcher.queue.dead_letters)
    assert [letter.event.id for letter in letters] == [event.id for event in events]
    assert letters[0].attempts >= 2 and letters[0].error == "HTTP 500"
    data = tmp_path / "data"

    async def seed_cli(*args: str) -> tuple[int, str]:
        result = await trio.run_process([sys.executable, "-m", "seed", *args, "--data", str(data)],
                                        capture_stdout=True, capture_stderr=True, check=False)
        return result.returncode, result.stdout.decode() + result.stderr.decode()

    # `ls` reads beside the running dispatcher (no lock needed).
    status, output = await seed_cli("webhooks", "ls", "--dead", "--json")
    assert status == 0, output
    listed = [json.loads(line) for line in output.splitlines()]
    assert [item["event"]["id"] for item in listed] == [event.id for event in events]
    status, output = await seed_cli("webhooks", "ls")
    assert status == 0 and "r " in output and "(not configured)" in output, output

    # `retry` asks the running dispatcher (it holds the queue's lock) and waits for its answer.
    receiver.default_status = 200
    status, output = await seed_cli("webhooks", "retry", events[1].id)
    assert status == 0 and "1 event(s) queued again" in output, output
    accepted = await receiver.wait_for(1)
    assert accepted[0]["id"] == events[1].id
    status, output = await seed_cli("webhooks", "retry", "f" * 32)
    assert status == 1 and "no dead letter" in output, output
    status, output = await seed_cli("webhooks", "retry", "--all")
    assert status == 0 and "2 event(s) queued again" in output, output
    accepted = await receiver.wait_for(3)
    assert [document["id"] for document in accepted] == [events[1].id, events[0].id, events[2].id]
    assert await trio.to_thread.run_sync(dispatcher.queue.dead_letters) == []


async def test_flood_against_a_dead_endpoint_stays_bounded(nursery: trio.Nursery, tmp_path: Path) -> None:
    """A dead endpoint and a flood: memory holds at most max_pending pairs, the disk queue
    at most max_queue_events; the rest is dropped and counted, and a healthy endpoint gets
    everything."""
    dead = WebhookConfig(url="http://127.0.0.1:9/unreachable", name="dead", timeout=0.5, backoff_initial=5.0,
                         backoff_max=5.0, max_queue_events=300)
    healthy = await start_receiver(nursery, Receiver(secret=None))
    dispatcher = await start_dispatcher(nursery, tmp_path, dead,
                                        WebhookConfig(url=healthy.url, name="healthy", timeout=2.0),
                                        max_pending=400)
    total, highest_pending = 1500, 0
    for burst in range(15):
        for n in range(100):
            dispatcher.emit(push_event(burst * 100 + n))
            highest_pending = max(highest_pending, dispatcher.pending)
        await dispatcher.wait_durable()
    assert highest_pending <= 400
    stats = dispatcher.queue.stats("dead")
    assert stats.depth == 300
    dropped = sample(dispatcher, "seed_webhook_dropped_total", endpoint="dead", reason="queue_full")
    assert dropped == total - 300
    assert sample(dispatcher, "seed_webhook_queue_depth", endpoint="dead") == 300
    assert sample(dispatcher, "seed_webhook_oldest_event_age_seconds", endpoint="dead") >= 0
    disk = sum(path.stat().st_size for path in (tmp_path / "data" / "webhooks" / "queues" / "dead").iterdir())
    assert disk < 300 * 1024  # about 300 lines, not 1500
    accepted = await healthy.wait_for(total, limit=60)
    assert [document["tag"] for document in accepted] == [f"v{n}" for n in range(total)]


async def test_emit_before_serve_is_stored_at_once(tmp_path: Path) -> None:
    receiver = Receiver()
    receiver.info = ServerInfo("127.0.0.1", 9)
    directory = webhooks_directory(tmp_path / "data")
    with FileEventQueue(directory) as queue:
        dispatcher = Dispatcher([endpoint(receiver)], queue)
        assert dispatcher.emit(push_event(1)) == 1
        assert dispatcher.emit(make_event("delete", repository="x/y")) == 1
        assert queue.stats("r").depth == 2


# -- the whole seed ------------------------------------------------------------------------


@dataclass
class SeedWithHooks:
    info: ServerInfo
    registry: SeedRegistry
    client: httpx.AsyncClient
    data: Path


@pytest.fixture
async def hooked_seed(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[tuple[SeedWithHooks, Receiver,
                                                                                     Receiver]]:
    fast = await start_receiver(nursery)
    hanging = await start_receiver(nursery)
    hanging.delays.extend([60.0] * 5)  # never answers in time
    config_path = tmp_path / "seed.toml"
    # What the tests order: the scanner's scan.completed comes whenever it gets to an image.
    events = 'events = ["push", "tag.moved", "delete"]\n'
    config_path.write_text(
        f'[[webhooks]]\nname = "fast"\nurl = "{fast.url}"\n{TOML_SECRET}\nbackoff_initial = 0.02\n{events}\n'
        f'[[webhooks]]\nname = "hanging"\nurl = "{hanging.url}"\n{TOML_SECRET}\ntimeout = 30\n'
        f'repositories = ["team/**"]\n{events}')
    config = load_config(config_path, listen="127.0.0.1:0", data=tmp_path / "data")
    info, registry = await nursery.start(partial(serve_seed, config))
    async with httpx.AsyncClient(base_url=info.url, trust_env=False, timeout=30) as client:
        yield SeedWithHooks(info, registry, client, tmp_path / "data"), fast, hanging


async def test_seed_announces_pushes_moves_and_deletes(
        hooked_seed: tuple[SeedWithHooks, Receiver, Receiver]) -> None:
    seed, fast, hanging = hooked_seed
    started = time.monotonic()
    pushed = []
    for n in range(5):
        manifest, digest, _layers = await push_image(seed.client, "team/app", "latest", seed_bytes=n)
        pushed.append((digest, len(manifest)))
        # Durable before the answer: the queue on disk already holds this push's events,
        # for the hanging endpoint too.
        with FileEventQueue(webhooks_directory(seed.data), read_only=True) as view:
            assert view.stats("hanging").depth == 2 * (n + 1)
    # A hanging endpoint (30 s timeout) did not slow the pushes down.
    assert time.monotonic() - started < 10
    r = await seed.client.delete(f"/v2/team/app/manifests/{pushed[0][0]}")
    assert r.status_code == 202
    r = await seed.client.delete("/v2/team/app/manifests/latest")
    assert r.status_code == 202
    accepted = await fast.wait_for(12)
    types = [(d["type"], d["tag"], d["digest"]) for d in accepted]
    expected: list[tuple[str, str | None, str | None]] = []
    for digest, _size in pushed:
        expected += [("push", "latest", digest), ("tag.moved", "latest", digest)]
    expected += [("delete", None, pushed[0][0]), ("delete", "latest", pushed[-1][0])]
    assert types == expected
    first_push, first_move, _second_push, second_move = accepted[:4]
    assert first_push["media_type"] == "application/vnd.oci.image.manifest.v1+json"
    assert first_push["size"] == pushed[0][1] and first_push["actor"]["kind"] == "anonymous"
    assert first_move["detail"] == {"old_digest": None}
    assert second_move["detail"] == {"old_digest": pushed[0][0]} and second_move["size"] == pushed[1][1]
    assert accepted[-2]["detail"] == {"target": "manifest"} and accepted[-1]["detail"] == {"target": "tag"}
    assert fast.bad_signatures == 0 and fast.schema_errors == []
    assert len({d["id"] for d in accepted}) == 12
    assert len(hanging.accepted) == 0 and len(hanging.deliveries) <= 1
    # Metrics per endpoint on the seed's /metrics.
    with trio.fail_after(5):  # the receiver answers just before the seed counts the delivery
        while 'seed_webhook_delivered_total{endpoint="fast"} 12.0' not in (  # noqa: ASYNC110 - another server
                metrics := (await seed.client.get("/metrics")).text):
            await trio.sleep(0.02)
    assert 'seed_webhook_queue_depth{endpoint="hanging"} 12.0' in metrics
    assert 'seed_webhook_oldest_event_age_seconds{endpoint="hanging"}' in metrics


async def test_seed_announces_login_failures(nursery: trio.Nursery, tmp_path: Path) -> None:
    from tests.test_seed_auth_api import make_htpasswd

    receiver = await start_receiver(nursery)
    make_htpasswd(tmp_path / "htpasswd", {"alice": "alice-pw"})
    config_path = tmp_path / "seed.toml"
    config_path.write_text(
        f'[auth]\nhtpasswd = "{tmp_path / "htpasswd"}"\nservice = "seed.test"\n\n'
        '[[access]]\nrepositories = ["team/**"]\nusers = ["alice"]\nrole = "push"\n\n'
        f'[[webhooks]]\nname = "security"\nurl = "{receiver.url}"\nevents = ["login.failure"]\n'
        f'repositories = ["prod/**"]\n{TOML_SECRET}\n')
    config = load_config(config_path, listen="127.0.0.1:0", data=tmp_path / "data")
    info, _registry = await nursery.start(partial(serve_seed, config))
    async with httpx.AsyncClient(base_url=info.url, trust_env=False, timeout=30) as client:
        r = await client.get("/v2/", auth=("mallory", "guess"))
        assert r.status_code == 401
        with FileEventQueue(webhooks_directory(tmp_path / "data"), read_only=True) as view:
            assert view.stats("security").depth + len(receiver.accepted) == 1  # on disk before the 401
        r = await client.get("/token", params={"service": "seed.test"}, auth=("alice", "wrong"))
        assert r.status_code == 401
        r = await client.get("/v2/", auth=("alice", "alice-pw"))
        assert r.status_code == 200
    accepted = await receiver.wait_for(2)
    assert [(d["type"], d["actor"]["name"], d["repository"]) for d in accepted] == [
        ("login.failure", "mallory", None), ("login.failure", "alice", None)]
    assert accepted[0]["detail"] == {"reason": "bad credentials"}
    assert all(d["actor"]["source"] == "127.0.0.1" for d in accepted)
    assert "guess" not in json.dumps(accepted) and "wrong" not in json.dumps(accepted)


async def test_event_that_aged_while_the_seed_was_down_gets_one_more_try(nursery: trio.Nursery,
                                                                          tmp_path: Path) -> None:
    receiver = await start_receiver(nursery)
    config = endpoint(receiver, max_age=60.0)
    with FileEventQueue(webhooks_directory(tmp_path / "data")) as queue:
        queue.append([("r", push_event(1))], now=time.time() - 3600)  # queued an hour before the restart
    dispatcher = await start_dispatcher(nursery, tmp_path, config)
    accepted = await receiver.wait_for(1)
    assert accepted[0]["tag"] == "v1"
    assert sample(dispatcher, "seed_webhook_dead_lettered_total", endpoint="r") == 0
