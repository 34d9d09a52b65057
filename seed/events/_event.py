"""Webhook events: the values, their JSON body (the documented payload), and the mapping from
the audit hook's ``(action, fields)`` to them. Pure: no I/O (``make_event`` reads the clock
when no time is given).

Rules/invariants:
- The body of an event is canonical JSON (sorted keys, compact, ASCII): the same event gives
  the same bytes on every attempt and after a restart, so the ``X-Seed-Signature`` HMAC and
  a receiver's dedupe by ``id`` both hold across retries.
- Every body validates against ``docs/webhook-event.schema.json`` (the tests check it); a
  new field is a new schema version.
- Nothing secret goes in: the audit fields are already redacted, and only the fields a
  receiver needs are copied (never tokens, passwords or scopes).
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..audit import format_time
from ..errors import SeedError

__all__ = [
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "AuditMapper",
    "WebhookError",
    "WebhookEvent",
    "make_event",
    "new_event_id",
]

SCHEMA_VERSION = 1

# The event types, as `[[webhooks]] events` names them, with what they carry. Other parts of
# the seed add events through ``Dispatcher.emit``; a new type is added here and to the schema.
EVENT_TYPES: Mapping[str, str] = {
    "push": "a manifest was stored (repository, tag if pushed by tag, digest, media_type, size, actor)",
    "tag.moved": "a tag now points to another manifest (tag, digest = the new one, detail.old_digest, null "
                 "for a new tag)",
    "delete": "a manifest, tag or blob was deleted (detail.target = manifest | tag | blob; digest; tag)",
    "signature.verdict": "a signature policy verdict for a manifest (repository, tag, digest, detail: verdict, "
                         "keys, mode, reason)",
    "scan.completed": "a scan result is new or changed (repository, digest, detail: status, summary, advisories)",
    "login.failure": "credentials were refused or throttled (actor.name as typed, actor.source, detail.reason)",
}

# Audit actions that become webhook events (the rest, e.g. token.issued, are not announced).
_AUDIT_TYPES = {
    "manifest.push": "push",
    "tag.move": "tag.moved",
    "manifest.delete": "delete",
    "tag.delete": "delete",
    "blob.delete": "delete",
    "signature.verdict": "signature.verdict",
    "scan.completed": "scan.completed",
    "login.failure": "login.failure",
}
_DELETE_TARGETS = {"manifest.delete": "manifest", "tag.delete": "tag", "blob.delete": "blob"}
_MAX_TEXT = 1024
_KNOWN_MANIFESTS = 256  # (repository, digest) → (media type, size), for the tag.moved after a push


class WebhookError(SeedError):
    """The webhook queue cannot be used (in use by another process, unreadable, unwritable)."""


def new_event_id() -> str:
    """A fresh event id: 32 hex digits (a random UUID), what receivers dedupe on."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """One event, as delivered (``body()``) and as stored in the queue (``to_dict()``).

    Attributes:
        id: unique per event (``new_event_id``); the same on every delivery attempt.
        type: one of ``EVENT_TYPES``.
        time: when it happened, RFC 3339 UTC (``seed.audit.format_time``).
        repository: the repository concerned; ``None`` for events without one (login failures).
        tag: the tag concerned, if any.
        digest: the manifest (or blob) digest concerned, if any.
        media_type: of the manifest, when known.
        size: of the manifest in bytes, when known.
        actor: who did it: ``{"name", "kind", "source"}`` (kind ``system`` for the seed itself).
        detail: type-specific values (see ``EVENT_TYPES``).
    """

    id: str
    type: str
    time: str
    repository: str | None = None
    tag: str | None = None
    digest: str | None = None
    media_type: str | None = None
    size: int | None = None
    actor: Mapping[str, str] = field(default_factory=lambda: {"name": "", "kind": "system", "source": ""})
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise WebhookError(f"unknown webhook event type {self.type!r} (known: {', '.join(EVENT_TYPES)})")
        if not (isinstance(self.id, str) and 8 <= len(self.id) <= 64 and self.id.isascii() and self.id.isalnum()):
            raise WebhookError(f"a webhook event id is 8 to 64 letters and digits, got {self.id!r}")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int)):
            raise WebhookError("webhook event size must be an integer")
        actor = {key: _text(self.actor.get(key, "")) or "" for key in ("name", "kind", "source")}
        object.__setattr__(self, "actor", actor)
        for name in ("repository", "tag", "digest", "media_type"):
            object.__setattr__(self, name, _text(getattr(self, name)))
        # A JSON round trip: the detail must be plain JSON, and a stored event must equal the
        # one that was emitted.
        object.__setattr__(self, "detail", json.loads(json.dumps(dict(self.detail))))

    def to_dict(self) -> dict[str, Any]:
        """The payload: the JSON object ``docs/webhook-event.schema.json`` describes."""
        return {"version": SCHEMA_VERSION, "id": self.id, "type": self.type, "time": self.time,
                "repository": self.repository, "tag": self.tag, "digest": self.digest,
                "media_type": self.media_type, "size": self.size, "actor": dict(self.actor),
                "detail": self.detail}

    def body(self) -> bytes:
        """The bytes POSTed to receivers (and signed): canonical JSON of ``to_dict()``."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> WebhookEvent:
        """The event of a stored payload.

        Raises:
            WebhookError: not an event this seed writes.
        """
        try:
            if document.get("version") != SCHEMA_VERSION:
                raise WebhookError(f"unsupported webhook event version {document.get('version')!r}")
            return cls(id=document["id"], type=document["type"], time=document["time"],
                       repository=document.get("repository"), tag=document.get("tag"),
                       digest=document.get("digest"), media_type=document.get("media_type"),
                       size=document.get("size"), actor=dict(document.get("actor") or {}),
                       detail=dict(document.get("detail") or {}))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise WebhookError(f"malformed webhook event: {exc}") from None


def make_event(type: str, *, repository: str | None = None, tag: str | None = None, digest: str | None = None,
               media_type: str | None = None, size: int | None = None, actor: Mapping[str, str] | None = None,
               detail: Mapping[str, Any] | None = None, time: datetime | None = None) -> WebhookEvent:
    """A new event with a fresh id, for ``Dispatcher.emit``.

    Example (the signature policy)::

        dispatcher.emit(make_event("signature.verdict", repository="prod/app", tag="1.2", digest=digest,
                                   detail={"verdict": "denied", "mode": "enforce", "keys": [],
                                           "reason": "no signature from a trusted key"}))

    Args:
        type: one of ``EVENT_TYPES``.
        actor: ``{"name", "kind", "source"}``; default the seed itself (kind ``system``).
        time: when it happened; default now.

    Raises:
        WebhookError: an unknown type or a field of the wrong type.
    """
    return WebhookEvent(id=new_event_id(), type=type, time=format_time(time or datetime.now(UTC)),
                        repository=repository, tag=tag, digest=digest, media_type=media_type, size=size,
                        actor=dict(actor) if actor is not None else {"name": "", "kind": "system", "source": ""},
                        detail=dict(detail or {}))


def _text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise WebhookError(f"webhook event text fields must be strings, got {type(value).__name__}")
    return value[:_MAX_TEXT]


class AuditMapper:
    """Turns the audit hook's ``(action, fields)`` into webhook events (``None``: not announced).

    It remembers the media type and size of the last few pushed manifests, because the
    registry reports a tag move right after the push and without them.
    """

    def __init__(self) -> None:
        self._manifests: OrderedDict[tuple[str, str], tuple[str | None, int | None]] = OrderedDict()

    def map(self, action: str, fields: Mapping[str, Any], *, time: str, event_id: str | None = None
            ) -> WebhookEvent | None:
        """The webhook event of one audit call, or ``None``.

        Args:
            action: the audit action (``manifest.push``, ``tag.move``, ``login.failure``...).
            fields: the audit fields (``seed.audit.AuditEvent``'s names).
            time: when, RFC 3339 UTC.
            event_id: the id to use (default: a new one).

        Raises:
            WebhookError: the fields do not make a valid event (a bug at the call site).
        """
        kind = _AUDIT_TYPES.get(action)
        if kind is None:
            return None
        detail = dict(fields.get("detail") or {})
        repository = fields.get("repository") or None
        reference = fields.get("reference") or None
        digest = fields.get("digest") or fields.get("new_digest") or None
        media_type: str | None = None
        size: int | None = None
        actor = {"name": fields.get("actor") or "", "kind": fields.get("actor_kind") or "",
                 "source": fields.get("source") or ""}
        if kind == "push":
            media_type, size = detail.pop("media_type", None), detail.pop("size", None)
            if repository and digest:
                self._remember(repository, digest, media_type, size)
            tag = reference if reference and ":" not in reference else None
            detail = {}
        elif kind == "tag.moved":
            media_type, size = self._manifests.get((repository or "", digest or ""), (None, None))
            tag = reference
            detail = {"old_digest": fields.get("old_digest") or None}
        elif kind == "delete":
            target = _DELETE_TARGETS[action]
            tag = reference if target == "tag" else None
            if target == "tag":
                digest = fields.get("old_digest") or None
            detail = {"target": target}
        elif kind == "login.failure":
            repository = tag = None
            detail = {"reason": str(detail.get("reason", ""))[:200]}
        else:  # scan.completed, signature.verdict: their detail is the result
            tag = reference if reference and ":" not in reference else None
        return WebhookEvent(id=event_id or new_event_id(), type=kind, time=time, repository=repository, tag=tag,
                            digest=digest, media_type=media_type, size=size, actor=actor, detail=detail)

    def _remember(self, repository: str, digest: str, media_type: str | None, size: int | None) -> None:
        self._manifests[(repository, digest)] = (media_type, size)
        self._manifests.move_to_end((repository, digest))
        while len(self._manifests) > _KNOWN_MANIFESTS:
            self._manifests.popitem(last=False)
