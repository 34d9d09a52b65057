"""Audit events and records: the values, their JSON form, and the guard that keeps secrets out.

Rules/invariants:
- Every ``AuditEvent`` is cleaned in ``__post_init__``, whoever builds it: detail keys that
  name a secret (password, token, secret, authorization, ...) and string values that look
  like a credential (``Bearer ...``, ``Basic ...``, a JWT, a PEM private key) are replaced
  by ``[redacted]``; strings and lists are capped so one line stays small. Cleaning is
  idempotent, so a record read back from disk is equal to the one that was written.
- Fields a caller may set are exactly the dataclass fields; anything else is refused with
  ``AuditError`` (there is no ``password`` field to put a password in).
- ``action`` is an open set of dotted names (``login.success``); ``ACTIONS`` documents the
  ones the seed writes today. Signature verdicts and scans will add more.
- Times are RFC 3339 UTC with microseconds, fixed width, so comparing the strings compares
  the times.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from datetime import UTC, datetime, timedelta
from typing import Any

from ..errors import AuditError

__all__ = [
    "ACTIONS",
    "REDACTED",
    "AuditEvent",
    "AuditRecord",
    "format_time",
    "make_event",
    "parse_time",
]

# The actions the seed writes, with what they mean. The set is open: a new kind of event
# (signature verdicts, scans) just uses a new well-formed name and documents it here.
ACTIONS: Mapping[str, str] = {
    "login.success": "credentials accepted (actor, actor_kind, provider, source)",
    "login.failure": "credentials refused or throttled (actor as typed, source, detail.reason)",
    "token.issued": "a bearer token was issued (actor, source, scopes granted)",
    "manifest.push": "a manifest was stored (repository, reference, new_digest, old_digest if a tag moved)",
    "tag.move": "a tag now points elsewhere (repository, reference = tag, old_digest -> new_digest)",
    "manifest.delete": "a manifest was deleted (repository, digest)",
    "tag.delete": "a tag was deleted (repository, reference, old_digest)",
    "blob.delete": "a blob was deleted from a repository (repository, digest)",
    "access.denied": "a request was refused (actor, source, repository, detail.needs)",
    "robot.create": "a robot account was created (actor = the OS user, actor_kind operator; detail.robot, "
                    "access, expires_at, description, inbox_id)",
    "robot.revoke": "a robot account was revoked (actor = the OS user, actor_kind operator; detail.robot, "
                    "inbox_id)",
    "config.reload": "the configuration was reloaded (detail.source, status)",
    "audit.tail_truncated": "an incomplete last line (interrupted write) was moved aside on open",
    "audit.inbox_rejected": "a queued event from a command-line tool was malformed (detail.file, reason)",
    "audit.pruned": "old rotated files were removed on purpose; detail.first_seq/prev is where history starts",
    "scan.completed": "a scan's result is new or changed (repository, digest, detail.status/summary/advisories)",
    "policy.denied": "a pull by tag was refused by a policy (actor, source, repository, reference, digest, "
                     "detail.policy, detail.reason, detail.advisories)",
    "signature.push": "a signature was stored through the signature API (repository, digest, detail.name, size)",
    "signature.delete": "signatures were removed through the signature API (repository, digest, detail.removed)",
    "signature.verdict": "a signature policy verdict is new or changed (repository, reference, digest, "
                         "detail.verdict = allowed|warned|denied, detail.reason, detail.verified_by)",
}

REDACTED = "[redacted]"

_ACTION_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")
_MAX_ACTION = 64
_MAX_TEXT = 1024  # characters of one string value
_MAX_ITEMS = 256  # items of one list, keys of one mapping
_MAX_DEPTH = 4  # nesting of detail
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_TIME_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
# Substrings of a detail key (lower case, '-' read as '_') whose value is never written.
_SECRET_KEY_PARTS = ("password", "passwd", "passphrase", "secret", "token", "authoriz", "authoris",
                     "credential", "api_key", "apikey", "private_key", "cookie")
# String values that are credentials whatever key they are under.
_SECRET_VALUE_RE = re.compile(
    r"^\s*(bearer|basic)\s+\S"  # an Authorization header value
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\."  # a JWT (header.payload.signature)
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----",
    re.IGNORECASE)
# Keys of the record that the chain owns; an event cannot set them.
_RECORD_KEYS = ("seq", "prev", "hash")


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC, fixed width (``2025-12-03T05:44:00.123456Z``); naive times are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(_TIME_FORMAT)


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """ISO-8601 (``2025-12-01``, ``2025-12-01T10:00:00+01:00``; naive means UTC) or an age
    before ``now`` (``90s``, ``30m``, ``1h``, ``7d``, ``2w``) → an aware UTC datetime.

    Raises:
        ValueError: neither form.
    """
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=int(match.group(1)) * unit)
    moment = datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _now() -> str:
    return format_time(datetime.now(UTC))


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One security-relevant thing that happened, before the log gives it a place in the chain.

    Attributes:
        action: what happened, a dotted name (see ``ACTIONS``).
        time: when, RFC 3339 UTC (default: now).
        actor: who did it (login name, ``robot$ci``; as typed for a failed login).
        actor_kind: ``user``, ``robot``, ``anonymous``, ``system``, or ``operator`` (the OS
            user running a ``seed`` command).
        provider: which identity provider vouched for the actor.
        source: the client's address.
        repository: the repository concerned.
        reference: the tag or digest as the client named it.
        digest: the content concerned (a blob or manifest digest).
        old_digest: what a tag pointed to before.
        new_digest: what it points to now.
        scopes: access granted (``repository:team/app:pull,push``).
        status: the HTTP status answered, when there is one.
        detail: a small JSON mapping with anything else; secrets are redacted.
    """

    action: str
    time: str = field(default_factory=_now)
    actor: str = ""
    actor_kind: str = ""
    provider: str = ""
    source: str = ""
    repository: str = ""
    reference: str = ""
    digest: str = ""
    old_digest: str = ""
    new_digest: str = ""
    scopes: tuple[str, ...] = ()
    status: int | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.action, str) or len(self.action) > _MAX_ACTION or not _ACTION_RE.fullmatch(self.action):
            raise AuditError(f"audit action must be a dotted lower-case name like 'login.success', "
                             f"got {self.action!r}")
        if not isinstance(self.time, str) or not _TIME_RE.fullmatch(self.time):
            raise AuditError(f"audit time must be RFC 3339 UTC as format_time() writes it, got {self.time!r}")
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if value is None:  # "not known" (a tag that pointed nowhere before) is written as absent
                value = ""
            if not isinstance(value, str):
                raise AuditError(f"audit field {name} must be a string, got {type(value).__name__}")
            object.__setattr__(self, name, _clean_text(value))
        scopes = self.scopes
        if isinstance(scopes, str) or not isinstance(scopes, list | tuple | set | frozenset):
            raise AuditError("audit field scopes must be a list of strings")
        if not all(isinstance(scope, str) for scope in scopes):
            raise AuditError("audit field scopes must be a list of strings")
        object.__setattr__(self, "scopes", tuple(_clean_text(s) for s in list(scopes)[:_MAX_ITEMS]))
        if self.status is not None and (isinstance(self.status, bool) or not isinstance(self.status, int)):
            raise AuditError("audit field status must be an integer")
        if not isinstance(self.detail, Mapping):
            raise AuditError("audit field detail must be a mapping")
        object.__setattr__(self, "detail", _clean_mapping(self.detail, depth=1))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the event; empty fields are left out."""
        document: dict[str, Any] = {"action": self.action, "time": self.time}
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if value:
                document[name] = value
        if self.scopes:
            document["scopes"] = list(self.scopes)
        if self.status is not None:
            document["status"] = self.status
        if self.detail:
            document["detail"] = self.detail
        return document

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> AuditEvent:
        """The event of a stored record (record keys ``seq``/``prev``/``hash`` are ignored).

        Raises:
            AuditError: a missing action or a field of the wrong type.
        """
        values = {k: v for k, v in document.items() if k in _FIELD_NAMES}
        if "action" not in values or "time" not in values:
            raise AuditError("audit record without action or time")
        return cls(**values)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """An event with its place in the hash chain.

    Attributes:
        seq: position in the log, 1 for the first record ever written.
        event: the event.
        prev: ``hash`` of the record before (64 zeros for seq 1).
        hash: hex SHA-256 of the canonical JSON of this record without ``hash``.
    """

    seq: int
    event: AuditEvent
    prev: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.event.to_dict(), "seq": self.seq, "prev": self.prev, "hash": self.hash}

    @property
    def action(self) -> str:
        return self.event.action

    @property
    def time(self) -> str:
        return self.event.time


_TEXT_FIELDS = ("actor", "actor_kind", "provider", "source", "repository", "reference", "digest", "old_digest",
                "new_digest")
_FIELD_NAMES = frozenset(f.name for f in dataclass_fields(AuditEvent))


def make_event(action: str, fields: Mapping[str, Any] | None = None, *, time: str | None = None) -> AuditEvent:
    """``AuditEvent`` from a hook's ``(action, fields)``, refusing unknown field names.

    Raises:
        AuditError: an unknown field (a typo, or something like ``password`` that the log
            never takes) or a value of the wrong type.
    """
    values = dict(fields or {})
    unknown = set(values) - _FIELD_NAMES
    if "action" in values or "time" in values or unknown:
        bad = sorted(unknown | ({"action", "time"} & set(values)))
        raise AuditError(f"audit event {action!r}: unknown or reserved fields {bad} "
                         f"(allowed: {', '.join(sorted(_FIELD_NAMES - {'action', 'time'}))})")
    if time is not None:
        values["time"] = time
    return AuditEvent(action=action, **values)


def _is_secret_key(key: str) -> bool:
    normalized = key.lower().replace("-", "_")
    return any(part in normalized for part in _SECRET_KEY_PARTS)


def _clean_text(value: str) -> str:
    if _SECRET_VALUE_RE.search(value):
        return REDACTED
    if len(value) > _MAX_TEXT:
        # Cut so that the result is exactly _MAX_TEXT long: cleaning it again changes nothing.
        return value[: _MAX_TEXT - 3] + "..."
    return value


def _clean_mapping(mapping: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    if depth > _MAX_DEPTH:
        raise AuditError(f"audit detail nested deeper than {_MAX_DEPTH} levels")
    if len(mapping) > _MAX_ITEMS:
        raise AuditError(f"audit detail mapping with more than {_MAX_ITEMS} keys")
    cleaned: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str):
            raise AuditError(f"audit detail keys must be strings, got {key!r}")
        key = _clean_text(key)
        cleaned[key] = REDACTED if _is_secret_key(key) else _clean_value(value, depth)
    return cleaned


def _clean_value(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AuditError("audit detail numbers must be finite")
        return value
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, Mapping):
        return _clean_mapping(value, depth + 1)
    if isinstance(value, set | frozenset):
        value = sorted(value, key=repr)
    if isinstance(value, list | tuple):
        if depth + 1 > _MAX_DEPTH:
            raise AuditError(f"audit detail nested deeper than {_MAX_DEPTH} levels")
        return [_clean_value(item, depth + 1) for item in list(value)[:_MAX_ITEMS]]
    raise AuditError(f"audit detail values must be JSON (str, number, bool, None, list, mapping), "
                     f"got {type(value).__name__}")
