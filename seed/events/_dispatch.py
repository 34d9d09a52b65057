"""``Dispatcher``: takes events from the request path, makes them durable, and delivers them to
every ``[[webhooks]]`` endpoint that wants them.

Rules/invariants:
- ``emit`` (and ``observe_audit``, the audit-hook form) never blocks and never raises for a
  delivery problem: it routes the event to the endpoints whose filters match and queues it
  in memory. The writer task hands batches to ``EventQueue.append`` in a worker thread (one
  ``fdatasync`` per endpoint per batch). ``durable(handler)`` makes every HTTP response wait
  for that write (``wait_durable``), so an event is on disk before the request that caused
  it is answered; a push costs one group-committed fsync, never a delivery.
- Memory is bounded: at most ``max_pending`` (endpoint, event) pairs wait for the writer;
  beyond that, and beyond an endpoint's ``max_queue_events`` on disk, new events are dropped
  and counted (``seed_webhook_dropped_total{endpoint,reason}``), never the pushes refused.
- One delivery task per endpoint sends its queue's head, and only after a 2xx takes the
  next: delivery is in order per endpoint, and a slow or dead endpoint delays only itself.
  A failed attempt (timeout, connection error, non-2xx, a redirect: never followed) is
  retried after ``backoff_initial * 2**(n-1)`` seconds, capped at ``backoff_max``, of which
  a random half is waited ("equal jitter"). An attempt that fails once the event has been
  queued for ``max_age`` sends it to the dead letters (``seed webhooks ls --dead``,
  ``seed webhooks retry``); an event that aged while the seed was down still gets one try.
- Each body is signed with the endpoint's secret (``X-Seed-Signature: sha256=<hex HMAC>``);
  the secret itself is never sent or logged, and URLs are logged without path or query.
- On cancellation the writer makes one last shielded attempt to store what is pending; an
  event in flight at a crash is delivered again after the restart (at least once; receivers
  dedupe on ``id``, also sent as ``X-Seed-Event-Id``).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from p2pd.httpd import Request, Response
from p2pd.oci.errors import OCIError

from ..audit import format_time
from ._config import WebhookConfig
from ._event import AuditMapper, WebhookError, WebhookEvent
from ._file import FileEventQueue, webhooks_directory
from ._queue import EventQueue, MemoryEventQueue, QueuedEvent, QueueLimits
from ._requests import pending_requests, process_requests

if TYPE_CHECKING:
    from ..config import SeedConfig
    from ..metrics import SeedMetrics

__all__ = ["USER_AGENT", "Dispatcher", "WebhookMetrics", "open_webhooks", "sign"]

log = logging.getLogger("seed.webhooks")

AuditHook = Callable[[str, Mapping[str, Any]], None]
Handler = Callable[[Request], Awaitable[Response]]

USER_AGENT = "p2pd-seed-webhooks/1"
_BATCH = 1000  # (endpoint, event) pairs per append
_WRITE_RETRY_FIRST = 0.2  # seconds
_WRITE_RETRY_MAX = 5.0
_WRITE_ATTEMPTS = 5  # then the batch is dropped (counted): a broken disk must not hold requests forever
_DURABLE_WAIT = 10.0  # seconds a response waits for its events to be on disk
_REQUEST_INTERVAL = 0.5  # seconds between looks at DATA/webhooks/requests
_QUEUE_ERROR_RETRY = 1.0  # seconds after an ack or bury failed (disk trouble)
_MAX_RESPONSE_BYTES = 64 * 1024  # of a receiver's answer read before the connection is dropped


class WebhookMetrics:
    """Counters per endpoint, in the registry given; gauges come from ``Dispatcher``'s collector."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.delivered = Counter("seed_webhook_delivered", "Webhook events delivered (answered 2xx)", ["endpoint"],
                                 registry=registry)
        self.failed = Counter("seed_webhook_failed_attempts",
                              "Webhook delivery attempts that failed (timeout, connection, non-2xx)", ["endpoint"],
                              registry=registry)
        self.dead_lettered = Counter("seed_webhook_dead_lettered", "Webhook events given up after max_age",
                                     ["endpoint"], registry=registry)
        self.dropped = Counter("seed_webhook_dropped",
                               "Webhook events never queued: queue_full (max_queue_events), memory (the writer is "
                               "behind), write_failed (the disk refused them)", ["endpoint", "reason"],
                               registry=registry)
        self.write_failures = Counter("seed_webhook_queue_write_failures", "Failed writes to the webhook queue",
                                      registry=registry)


class _QueueCollector:
    """Queue depth, age of the oldest event and dead letters per endpoint, read at scrape time."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        return self._families(with_samples=True)

    def _families(self, *, with_samples: bool = False) -> Iterator[Metric]:
        depth = GaugeMetricFamily("seed_webhook_queue_depth", "Webhook events queued, not yet delivered",
                                  labels=["endpoint"])
        age = GaugeMetricFamily("seed_webhook_oldest_event_age_seconds",
                                "Seconds the oldest undelivered webhook event has waited (0: none)",
                                labels=["endpoint"])
        dead = GaugeMetricFamily("seed_webhook_dead_letters", "Webhook events given up, kept for a retry",
                                 labels=["endpoint"])
        if with_samples:
            now = self._dispatcher.clock()
            for name in self._dispatcher.endpoints:
                stats = self._dispatcher.queue.stats(name)
                depth.add_metric([name], stats.depth)
                age.add_metric([name], max(0.0, now - stats.oldest_queued) if stats.oldest_queued else 0.0)
                dead.add_metric([name], stats.dead_letters)
        yield from (depth, age, dead)


class Dispatcher:
    """The seed's webhooks: the emit side, the writer and the delivery tasks (module rules above).

    Args:
        endpoints: the ``[[webhooks]]`` entries.
        queue: where events wait (``FileEventQueue``; ``MemoryEventQueue`` in tests).
        registry: the Prometheus registry for the metrics (default: a private one).
        requests_directory: where ``seed webhooks retry`` drops requests (``DATA/webhooks``);
            None: not watched.
        transport: the httpx transport (tests may pass one; default: real connections).
        clock: Unix seconds (queue times, ``max_age``).
        jitter: a random number in [0, 1) for the backoff jitter.
        max_pending: (endpoint, event) pairs waiting for the writer before new ones are dropped.
    """

    def __init__(self, endpoints: Sequence[WebhookConfig], queue: EventQueue, *,
                 registry: CollectorRegistry | None = None, requests_directory: Path | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, clock: Callable[[], float] = time.time,
                 jitter: Callable[[], float] = random.random, max_pending: int = 10_000) -> None:
        self.endpoints: dict[str, WebhookConfig] = {endpoint.name: endpoint for endpoint in endpoints}
        self.queue = queue
        self.clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = WebhookMetrics(self.registry)
        self.registry.register(_QueueCollector(self))
        self._requests_directory = requests_directory
        self._transport = transport
        self._jitter = jitter
        self._max_pending = max_pending
        self._mapper = AuditMapper()
        self._pending: deque[tuple[str, WebhookEvent]] = deque()
        self._submitted = 0  # (endpoint, event) pairs queued while serving
        self._settled = 0  # of those, written or dropped
        self._overflowing = False
        self._full: set[str] = set()  # endpoints whose disk queue refused the last event
        self._serving = False
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._ready: dict[str, trio.Event] = {name: trio.Event() for name in self.endpoints}
        self._trio_thread: int | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    @property
    def pending(self) -> int:
        """(endpoint, event) pairs emitted but not yet handed to the queue (at most ``max_pending``)."""
        return len(self._pending)

    # -- the emit side ---------------------------------------------------------------------------

    def emit(self, event: WebhookEvent) -> int:
        """Queues ``event`` for every endpoint that wants it; returns for how many.

        Call it on the trio thread, or from a worker thread of the same run. Never blocks
        while ``serve`` runs (before or after, it stores the event at once, blocking).
        """
        targets = [name for name, endpoint in self.endpoints.items() if endpoint.wants(event)]
        if not targets:
            return 0
        items = [(name, event) for name in targets]
        if not self._serving:
            kept = self.queue.append(items, now=self.clock())
            self._count_dropped(items, kept)
            return sum(kept)
        if len(self._pending) + len(items) > self._max_pending:
            for name in targets:
                self.metrics.dropped.labels(name, "memory").inc()
            if not self._overflowing:
                self._overflowing = True
                log.error("webhook events are arriving faster than the disk queue takes them (%d waiting): "
                          "dropping new ones", len(self._pending))
            return 0
        self._pending.extend(items)
        self._submitted += len(items)
        if threading.get_ident() == self._trio_thread:
            self._wakeup.set()
        elif self._token is not None:
            self._token.run_sync_soon(lambda: self._wakeup.set())
        return len(items)

    def observe_audit(self, action: str, fields: Mapping[str, Any]) -> None:
        """The audit hook's ``(action, fields)`` → ``emit`` for the actions that are webhook
        events (see ``seed.events.EVENT_TYPES``); other actions are ignored."""
        try:
            event = self._mapper.map(action, fields, time=format_time(datetime.fromtimestamp(self.clock(), UTC)))
        except WebhookError:
            log.exception("audit action %s could not be turned into a webhook event", action)
            return
        if event is not None:
            self.emit(event)

    def tee(self, audit: AuditHook) -> AuditHook:
        """An audit hook that calls ``audit`` and then ``observe_audit``; a webhook problem never
        reaches the caller (the audit hook's own errors do, as before)."""

        def hook(action: str, fields: Mapping[str, Any]) -> None:
            audit(action, fields)
            try:
                self.observe_audit(action, fields)
            except Exception:
                log.exception("webhook event for %s failed", action)

        return hook

    async def wait_durable(self) -> None:
        """Waits until every event emitted so far is on disk (or was dropped and counted).
        Bound it with ``trio.fail_after``; returns at once if nothing is pending."""
        target = self._submitted
        while self._settled < target and self._serving:
            await self._progress.wait()

    def durable(self, handler: Handler) -> Handler:
        """``handler`` whose responses (errors included) wait until the events the request
        emitted are on disk, at most ``_DURABLE_WAIT`` seconds (then it answers and logs)."""

        async def durable_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except OCIError:
                await self._settle_before_answer()
                raise
            await self._settle_before_answer()
            return response

        return durable_handler

    async def _settle_before_answer(self) -> None:
        if self._settled >= self._submitted:
            return
        with trio.move_on_after(_DURABLE_WAIT) as scope:
            await self.wait_durable()
        if scope.cancelled_caught:
            log.error("webhook events not on disk after %.0fs: answering anyway (is the disk failing?)",
                      _DURABLE_WAIT)

    def _count_dropped(self, items: Sequence[tuple[str, WebhookEvent]], kept: Sequence[bool]) -> None:
        for (name, event), ok in zip(items, kept, strict=True):
            if ok:
                self._full.discard(name)
                continue
            self.metrics.dropped.labels(name, "queue_full").inc()
            if name not in self._full:  # once per episode, not once per event of a flood
                self._full.add(name)
                log.error("webhook %s: queue full (max_queue_events = %d): dropping new events, starting with %s "
                          "(%s); seed_webhook_dropped_total counts them", name,
                          self.endpoints[name].max_queue_events if name in self.endpoints else 0, event.id,
                          event.type)

    # -- the service -------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Writes and delivers until cancelled; start it with ``nursery.start(dispatcher.serve)``."""
        if self._serving:
            raise RuntimeError("Dispatcher.serve is already running")
        self._trio_thread = threading.get_ident()
        self._token = trio.lowlevel.current_trio_token()
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._serving = True
        try:
            # Redirects are never followed: a receiver moving would otherwise send signed
            # events (and their repository names) to whatever host it names.
            async with httpx.AsyncClient(transport=self._transport, trust_env=False, follow_redirects=False,
                                         timeout=httpx.Timeout(None),
                                         headers={"User-Agent": USER_AGENT}) as client, trio.open_nursery() as nursery:
                nursery.start_soon(self._write_loop)
                for name in self.endpoints:
                    nursery.start_soon(self._deliver_loop, client, name)
                if self._requests_directory is not None:
                    nursery.start_soon(self._request_loop, self._requests_directory)
                task_status.started()
        finally:
            self._serving = False
            self._trio_thread = self._token = None
            with trio.CancelScope(shield=True):
                await self._write_remaining()

    async def replay(self, event_id: str | None, *, endpoint: str | None = None) -> int:
        """Queues dead letters again (``seed webhooks retry`` in-process); returns how many."""
        count = await trio.to_thread.run_sync(partial(self.queue.replay, event_id, endpoint=endpoint,
                                                      now=self.clock()))
        self._wake_all()
        return count

    def close(self) -> None:
        """Closes the queue; call it once ``serve`` has returned."""
        self.queue.close()

    # -- writing -----------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        failures = 0
        while True:
            if not self._pending:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            try:
                await self._write_batch()
                failures = 0
            except WebhookError as exc:
                failures += 1
                self.metrics.write_failures.inc()
                if failures >= _WRITE_ATTEMPTS:
                    self._drop_batch(f"{exc}")
                    failures = 0
                    continue
                delay = min(_WRITE_RETRY_MAX, _WRITE_RETRY_FIRST * 2 ** (failures - 1))
                log.error("cannot write %d webhook event(s), retrying in %.1fs: %s", len(self._pending), delay, exc)
                await trio.sleep(delay)

    async def _write_batch(self) -> None:
        batch = list(itertools.islice(self._pending, _BATCH))
        kept = await trio.to_thread.run_sync(partial(self.queue.append, batch, now=self.clock()))
        for _ in batch:
            self._pending.popleft()
        self._count_dropped(batch, kept)
        for (name, _event), ok in zip(batch, kept, strict=True):
            if ok and name in self._ready:
                self._ready[name].set()
        self._settle(len(batch))

    def _drop_batch(self, reason: str) -> None:
        batch = [self._pending.popleft() for _ in range(min(_BATCH, len(self._pending)))]
        for name, _event in batch:
            self.metrics.dropped.labels(name, "write_failed").inc()
        log.error("webhook queue: %d event(s) dropped after %d failed writes: %s", len(batch), _WRITE_ATTEMPTS,
                  reason)
        self._settle(len(batch))

    def _settle(self, count: int) -> None:
        self._settled += count
        if not self._pending:
            self._overflowing = False
        self._progress.set()
        self._progress = trio.Event()

    async def _write_remaining(self) -> None:
        try:
            while self._pending:
                await self._write_batch()
        except WebhookError as exc:
            lost = len(self._pending)
            for name, _event in self._pending:
                self.metrics.dropped.labels(name, "write_failed").inc()
            self._pending.clear()
            log.error("webhook writer stopped: %d event(s) could not be stored: %s", lost, exc)
        self._settled = self._submitted
        self._progress.set()

    # -- delivering -----------------------------------------------------------------------------------

    def _wake_all(self) -> None:
        for event in self._ready.values():
            event.set()

    async def _deliver_loop(self, client: httpx.AsyncClient, name: str) -> None:
        endpoint = self.endpoints[name]
        attempts = 0
        while True:
            ready = self._ready[name] = trio.Event()
            try:
                head = await trio.to_thread.run_sync(self.queue.head, name)
                if head is None:
                    await ready.wait()
                    continue
                # An event older than max_age (the seed was down) still gets one attempt.
                attempts += 1
                error = await self._post(client, endpoint, head.event, attempts)
                if error is None:
                    await trio.to_thread.run_sync(self.queue.ack, name, head.seq)
                    self.metrics.delivered.labels(name).inc()
                    attempts = 0
                    continue
                self.metrics.failed.labels(name).inc()
                remaining = head.queued + endpoint.max_age - self.clock()
                log.warning("webhook %s (%s): event %s, attempt %d failed: %s", name, endpoint.display_url,
                            head.event.id, attempts, error)
                if remaining <= 0:
                    await self._bury(name, head, attempts, error)
                    attempts = 0
                    continue
                delay = min(endpoint.backoff_max, endpoint.backoff_initial * 2.0 ** min(attempts - 1, 60))
                await trio.sleep(min(remaining, delay / 2 + delay / 2 * self._jitter()))
            except WebhookError as exc:
                log.error("webhook %s: queue error, retrying in %.0fs: %s", name, _QUEUE_ERROR_RETRY, exc)
                await trio.sleep(_QUEUE_ERROR_RETRY)

    async def _bury(self, name: str, head: QueuedEvent, attempts: int, error: str) -> None:
        removed = await trio.to_thread.run_sync(partial(self.queue.bury, name, head.seq, attempts=attempts,
                                                        error=error, now=self.clock()))
        self.metrics.dead_lettered.labels(name).inc()
        log.error("webhook %s: event %s (%s) given up after %d attempt(s) and %.0fs, kept as a dead letter "
                  "(seed webhooks retry %s): %s", name, head.event.id, head.event.type, attempts,
                  self.clock() - head.queued, head.event.id, error)
        if removed:
            log.warning("webhook %s: %d oldest dead letter(s) removed (max_dead_letters)", name, removed)

    async def _post(self, client: httpx.AsyncClient, endpoint: WebhookConfig, event: WebhookEvent,
                    attempt: int) -> str | None:
        """One delivery attempt; returns None on a 2xx answer, else what went wrong."""
        body = event.body()
        headers = {"Content-Type": "application/json", "X-Seed-Event": event.type, "X-Seed-Event-Id": event.id,
                   "X-Seed-Delivery-Attempt": str(attempt)}
        if endpoint.secret is not None:
            headers["X-Seed-Signature"] = "sha256=" + sign(endpoint.secret, body)
        status = 0
        with trio.move_on_after(endpoint.timeout) as scope:
            try:
                async with client.stream("POST", endpoint.url, content=body, headers=headers) as response:
                    status = response.status_code
                    # The answer's body is not needed; reading a little lets the connection be
                    # reused, and the cap keeps a misbehaving receiver from filling memory.
                    received = 0
                    async for chunk in response.aiter_raw():
                        received += len(chunk)
                        if received > _MAX_RESPONSE_BYTES:
                            break
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {str(exc)[:200] or 'connection failed'}"
        if scope.cancelled_caught:
            return f"no answer within {endpoint.timeout:g}s (timeout)"
        if 200 <= status < 300:
            return None
        if 300 <= status < 400:
            return f"HTTP {status}: redirects are not followed (configure the final URL)"
        return f"HTTP {status}"

    # -- requests from the command line ------------------------------------------------------------

    async def _request_loop(self, directory: Path) -> None:
        while True:
            await trio.sleep(_REQUEST_INTERVAL)
            if not pending_requests(directory):
                continue
            try:
                await trio.to_thread.run_sync(process_requests, self.queue, directory, self.clock)
            except OSError as exc:
                log.error("cannot answer webhook requests in %s: %s", directory, exc)
                continue
            self._wake_all()


def sign(secret: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``body`` with ``secret``: ``X-Seed-Signature`` is ``sha256=`` and this."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def open_webhooks(config: SeedConfig, metrics: SeedMetrics | None = None) -> Dispatcher:
    """The seed's dispatcher as ``[[webhooks]]`` configures it: a ``FileEventQueue`` in
    ``DATA/webhooks`` (only if an endpoint is configured), metrics in ``metrics.registry``.
    Blocks (it opens and repairs the queue): call it in a worker thread. Start
    ``dispatcher.serve`` in the nursery, and ``dispatcher.close()`` after it.

    Raises:
        WebhookError: the queue cannot be opened (in use by another process, unwritable).
    """
    registry = metrics.registry if metrics is not None else None
    endpoints = tuple(getattr(config, "webhooks", ()))
    if not endpoints:
        return Dispatcher((), MemoryEventQueue(), registry=registry)
    directory = webhooks_directory(config.storage.data)
    limits = {endpoint.name: QueueLimits(endpoint.max_queue_events, endpoint.max_dead_letters)
              for endpoint in endpoints}
    queue = FileEventQueue(directory, limits=limits)
    try:
        return Dispatcher(endpoints, queue, registry=registry, requests_directory=directory)
    except BaseException:
        queue.close()
        raise
