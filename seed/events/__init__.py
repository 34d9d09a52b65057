"""The seed's webhooks: events about pushes, tag moves, deletes, signature verdicts, scans and
login failures, queued durably on disk and delivered at least once, in order, to every
``[[webhooks]]`` endpoint that subscribes to them.

Wiring (composition root, ``seed.registry.serve_seed``)::

    dispatcher = await trio.to_thread.run_sync(open_webhooks, config, metrics)  # FileEventQueue in DATA/webhooks
    hook = dispatcher.tee(audit)               # the audit hook, also feeding webhooks (push, tag.moved, ...)
    await nursery.start(dispatcher.serve)      # the writer, one delivery task per endpoint, CLI requests
    serve_http(dispatcher.durable(registry.handle), ...)   # answers wait until their events are on disk
    ...
    dispatcher.close()                         # after the nursery is done

Other parts of the seed announce events the audit hook does not carry with
``dispatcher.emit(make_event("signature.verdict", repository=..., digest=..., detail=...))``;
``EVENT_TYPES`` lists the types, ``docs/webhook-event.schema.json`` the payload.

Where things are: ``_event`` (the event, its JSON body, the audit mapping: pure), ``_config``
(``[[webhooks]]``), ``_queue`` (the ``EventQueue`` seam and the in-memory fake), ``_file``
(the file queue: locking, crash repair, segments, dead letters), ``_requests`` (the CLI asking
a running seed), ``_dispatch`` (the dispatcher: emit, writer, delivery, metrics), ``_cli``
(``seed webhooks ls | retry``).
"""

from ._cli import add_webhooks_parser as add_webhooks_parser
from ._cli import run_webhooks_command as run_webhooks_command
from ._config import WebhookConfig as WebhookConfig
from ._config import webhooks_from_toml as webhooks_from_toml
from ._dispatch import USER_AGENT as USER_AGENT
from ._dispatch import Dispatcher as Dispatcher
from ._dispatch import WebhookMetrics as WebhookMetrics
from ._dispatch import open_webhooks as open_webhooks
from ._dispatch import sign as sign
from ._event import EVENT_TYPES as EVENT_TYPES
from ._event import SCHEMA_VERSION as SCHEMA_VERSION
from ._event import AuditMapper as AuditMapper
from ._event import WebhookError as WebhookError
from ._event import WebhookEvent as WebhookEvent
from ._event import make_event as make_event
from ._event import new_event_id as new_event_id
from ._file import FileEventQueue as FileEventQueue
from ._file import WebhookQueueInUse as WebhookQueueInUse
from ._file import webhooks_directory as webhooks_directory
from ._queue import DeadLetter as DeadLetter
from ._queue import EventQueue as EventQueue
from ._queue import MemoryEventQueue as MemoryEventQueue
from ._queue import QueuedEvent as QueuedEvent
from ._queue import QueueLimits as QueueLimits
from ._queue import QueueStats as QueueStats

__all__ = [
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "USER_AGENT",
    "AuditMapper",
    "DeadLetter",
    "Dispatcher",
    "EventQueue",
    "FileEventQueue",
    "MemoryEventQueue",
    "QueueLimits",
    "QueueStats",
    "QueuedEvent",
    "WebhookConfig",
    "WebhookError",
    "WebhookEvent",
    "WebhookMetrics",
    "WebhookQueueInUse",
    "add_webhooks_parser",
    "make_event",
    "new_event_id",
    "open_webhooks",
    "run_webhooks_command",
    "sign",
    "webhooks_directory",
    "webhooks_from_toml",
]
