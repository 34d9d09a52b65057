"""``[[webhooks]]``: where events go, which ones, and how hard to try.

Example ``seed.toml``::

    [[webhooks]]
    name = "deploy-bot"                  # the queue's name on disk and in metrics; default from the URL
    url = "https://deploy.example/hooks/seed"
    events = ["push", "tag.moved"]       # default: every type (seed.events.EVENT_TYPES)
    repositories = ["prod/**"]           # default: every repository
    secret_file = "/etc/seed/deploy-bot.secret"   # or secret = "..."; signs X-Seed-Signature
    timeout = 10.0                       # seconds for one delivery attempt
    max_age = 86400.0                    # seconds before an undeliverable event is dead-lettered
    backoff_initial = 1.0                # seconds before the first retry; doubles, with jitter
    backoff_max = 300.0
    max_queue_events = 100000            # the on-disk queue's cap; newer events are dropped past it
    max_dead_letters = 10000             # the oldest dead letters are removed past it
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from p2pd.errors import ConfigError
from p2pd.tomlconfig import build_section

from ..access import compile_glob, validate_glob
from ._event import EVENT_TYPES, WebhookEvent

__all__ = ["WebhookConfig", "webhooks_from_toml"]

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_MAX_SECRET = 4096


@dataclass(frozen=True)
class WebhookConfig:
    """One ``[[webhooks]]`` endpoint (see the module docstring for the settings).

    The secret is kept out of ``repr`` so that a logged configuration never shows it.
    """

    url: str = ""
    name: str = ""
    events: tuple[str, ...] = ()
    repositories: tuple[str, ...] = ("**",)
    secret: str | None = field(default=None, repr=False)
    secret_file: Path | None = None
    timeout: float = 10.0
    max_age: float = 86400.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    max_queue_events: int = 100_000
    max_dead_letters: int = 10_000

    def wants(self, event: WebhookEvent) -> bool:
        """Whether this endpoint subscribes to ``event``: its type, and its repository (an event
        without a repository, such as a login failure, passes every repository filter)."""
        if self.events and event.type not in self.events:
            return False
        if event.repository is None:
            return True
        return any(compile_glob(pattern).fullmatch(event.repository) for pattern in self.repositories)

    @property
    def display_url(self) -> str:
        """The URL without path and query, which may hold a token (Slack-style hooks): for
        logs and ``seed webhooks ls``."""
        parts = urllib.parse.urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}/..." if parts.path not in ("", "/") or parts.query else self.url


def webhooks_from_toml(tables: Any, base: Path | None = None) -> tuple[WebhookConfig, ...]:
    """Reads the ``[[webhooks]]`` array of a parsed TOML document (secret files are read here).

    Args:
        tables: ``document.get("webhooks", [])``.
        base: the configuration file's directory: a relative ``secret_file`` is taken from there.

    Raises:
        ConfigError: a malformed entry, an unknown event type, a duplicate name, an unreadable
            secret file.
    """
    if not isinstance(tables, list):
        raise ConfigError("webhooks is an array of tables: [[webhooks]]")
    hooks: list[WebhookConfig] = []
    for index, table in enumerate(tables):
        where = f"webhooks[{index}]"
        if not isinstance(table, Mapping):
            raise ConfigError(f"[[webhooks]] entries must be tables ({where})")
        table = dict(table)
        for key in ("events", "repositories"):
            if isinstance(table.get(key), str):
                table[key] = [table[key]]
        hook = build_section(WebhookConfig, table, where)
        if hook.secret_file is not None and base is not None and not hook.secret_file.is_absolute():
            hook = replace(hook, secret_file=base / hook.secret_file)
        hooks.append(_checked(hook, where))
    names = [hook.name for hook in hooks]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"[[webhooks]] names must be unique: {name!r} is used twice (set name = ...)")
    return tuple(hooks)


def _checked(hook: WebhookConfig, where: str) -> WebhookConfig:
    parts = urllib.parse.urlsplit(hook.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}.url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{where}.url must not hold credentials; use secret_file to sign deliveries")
    for event_type in hook.events:
        if event_type not in EVENT_TYPES:
            raise ConfigError(f"{where}.events: unknown event type {event_type!r} "
                              f"(known: {', '.join(EVENT_TYPES)})")
    if not hook.repositories:
        raise ConfigError(f"{where}.repositories must name at least one pattern (\"**\" for all)")
    for pattern in hook.repositories:
        validate_glob(pattern)
    for name in ("timeout", "max_age", "backoff_initial", "backoff_max"):
        if not getattr(hook, name) > 0:
            raise ConfigError(f"{where}.{name} must be a positive number of seconds")
    if hook.backoff_max < hook.backoff_initial:
        raise ConfigError(f"{where}.backoff_max must be at least backoff_initial")
    if hook.max_queue_events < 1 or hook.max_dead_letters < 1:
        raise ConfigError(f"{where}.max_queue_events and max_dead_letters must be positive")
    if hook.secret is not None and hook.secret_file is not None:
        raise ConfigError(f"{where}: give secret or secret_file, not both")
    secret = hook.secret
    if hook.secret_file is not None:
        try:
            secret = Path(hook.secret_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}.secret_file: cannot read {hook.secret_file}: {exc}") from None
    if secret is not None and not 0 < len(secret) <= _MAX_SECRET:
        raise ConfigError(f"{where}: the webhook secret must be 1 to {_MAX_SECRET} characters")
    name = hook.name or _default_name(hook.url, parts.hostname)
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}.name must be 1-64 lower-case letters, digits, '.', '_' or '-', got {name!r}")
    return replace(hook, name=name, secret=secret)


def _default_name(url: str, host: str) -> str:
    """``<host>-<8 hex of the URL>``: stable for a URL, distinct for two paths on one host."""
    cleaned = re.sub(r"[^a-z0-9.-]+", "-", host.lower()).strip("-.")[:40] or "hook"
    return f"{cleaned}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"
