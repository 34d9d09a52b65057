"""Robot accounts: named, scoped, expiring credentials for CI, managed with ``seed robot``.

Rules/invariants:
- A robot logs in as ``robot$NAME`` (Harbor's convention) with a random secret
  (``secrets.token_urlsafe(32)``, 256 bits) that is shown once at creation and stored only as
  its SHA-256 (a fast hash is enough for a secret that cannot be guessed; bcrypt protects
  human passwords). Secrets are compared with ``hmac.compare_digest``, and an unknown robot
  costs the same comparison as a known one.
- A robot's rights are its own grants (``team/*:pull,push``) plus ``[[access]]`` rules that
  name it; ``seed.access`` decides, this module only keeps the record.
- Revoked robots stay in the store, so a name is never reused: a token or refresh token of
  an old robot must not come back to life with a new robot's grants.
- ``FileRobotStore`` keeps ``DATA/auth/robots.json`` (mode 0600), written whole with
  ``write_atomic``. Changes (CLI or server) are read-modify-write under an exclusive
  ``flock`` on ``robots.json.lock``; readers need no lock because a replace is atomic, and
  they re-read when the file's identity (inode, mtime, ctime, size) changes, so a
  ``seed robot revoke`` takes effect in a running server on its next request.
- A store that cannot be read (corrupt, unreadable) raises ``RobotStoreError``: the robot
  provider turns that into ``ProviderUnavailable`` and logins fail closed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TextIO, runtime_checkable

from p2pd.fsutil import write_atomic

from ..access import ACTIONS, validate_glob
from ..errors import ConfigError, ProviderUnavailable, SeedError
from .identity import Grant, Principal

__all__ = [
    "MAX_GRANTS",
    "MAX_ROBOTS",
    "ROBOT_PREFIX",
    "FileRobotStore",
    "MemoryRobotStore",
    "RobotError",
    "RobotEvent",
    "RobotExists",
    "RobotProvider",
    "RobotRecord",
    "RobotStore",
    "RobotStoreError",
    "add_robot_parser",
    "format_access",
    "parse_access_spec",
    "parse_duration",
    "robot_table",
    "run_robot_cli",
    "validate_robot_name",
]

ROBOT_PREFIX = "robot$"
MAX_ROBOTS = 10_000
MAX_GRANTS = 64
MAX_DESCRIPTION = 256
MAX_STORE_SIZE = 16 * 1024 * 1024
_LOCK_WAIT = 10.0  # seconds a change waits for another writer before giving up
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_PATTERN_CHARS = re.compile(r"[A-Za-z0-9._/*-]+")
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MAX_DURATION = 100 * 365 * 86400.0
_FORMAT_VERSION = 1

# (action, fields) → the audit log, as ``seed.auth.authenticator.AuthEvent``. Actions are
# ``robot.create`` {robot, access, expires_at, description} and ``robot.revoke`` {robot};
# fields never contain the secret or its hash.
RobotEvent = Callable[[str, Mapping[str, Any]], None]


class RobotError(SeedError):
    """A robot account cannot be created or changed as asked."""


class RobotExists(RobotError):
    """A robot of that name exists (or existed: names of revoked robots are not reused)."""


class RobotStoreError(RobotError):
    """The robot store cannot be read or written (corrupt file, permissions, lock held)."""


# ---------------------------------------------------------------------------------------------
# Parsing what people type: names, access specs, durations.


def validate_robot_name(name: str) -> str:
    """Returns ``name`` (without ``robot$``) if valid: ``[a-z0-9][a-z0-9._-]{0,63}``.

    Raises:
        ConfigError: it is not.
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(f"invalid robot name {name!r}: use 1-64 of a-z 0-9 . _ - (starting with a letter or digit)")
    return name


def _validate_grant(grant: Grant) -> Grant:
    if not _PATTERN_CHARS.fullmatch(grant.pattern):
        raise ConfigError(f"invalid repository pattern {grant.pattern!r}: allowed are A-Z a-z 0-9 . _ / * -")
    validate_glob(grant.pattern)
    unknown = sorted(set(grant.actions) - set(ACTIONS))
    if unknown or not grant.actions:
        raise ConfigError(f"access for {grant.pattern!r}: actions must be some of {', '.join(ACTIONS)}"
                          + (f", not {', '.join(unknown)}" if unknown else ""))
    return grant


def parse_access_spec(specs: str | Iterable[str]) -> tuple[Grant, ...]:
    """``'team/*:pull,push;base/**:pull'`` (or several such strings) → grants.

    Each entry is ``PATTERN:ACTIONS``: a repository glob (``*`` one path component, ``**`` any
    depth) and a comma-separated list of pull, push, delete, admin. Entries for the same
    pattern are merged.

    Raises:
        ConfigError: an entry is malformed, a pattern has other characters than
            ``A-Za-z0-9._/*-``, an action is unknown, or there are no (or too many) entries.
    """
    merged: dict[str, set[str]] = {}
    for spec in [specs] if isinstance(specs, str) else specs:
        for entry in spec.split(";"):
            entry = entry.strip()
            if not entry:
                continue
            pattern, sep, actions_text = entry.partition(":")
            actions = {a.strip() for a in actions_text.split(",") if a.strip()}
            if not sep or not pattern.strip() or not actions:
                raise ConfigError(f"invalid access {entry!r}: expected PATTERN:ACTIONS, e.g. 'team/*:pull,push'")
            grant = _validate_grant(Grant(pattern.strip(), frozenset(actions)))
            merged.setdefault(grant.pattern, set()).update(grant.actions)
    if not merged:
        raise ConfigError("a robot needs at least one access entry, e.g. --access 'team/*:pull'")
    if len(merged) > MAX_GRANTS:
        raise ConfigError(f"a robot may have at most {MAX_GRANTS} access entries")
    return tuple(Grant(pattern, frozenset(actions)) for pattern, actions in merged.items())


def format_access(grants: Iterable[Grant]) -> str:
    """The inverse of ``parse_access_spec``: ``team/*:pull,push;base/**:pull``."""
    return ";".join(f"{g.pattern}:{','.join(a for a in ACTIONS if a in g.actions)}" for g in grants)


def parse_duration(text: str) -> float | None:
    """``90d``, ``12h``, ``30m``, ``45s``, ``2w`` (or combined, ``1d12h``) → seconds; ``never`` → ``None``.

    Raises:
        ConfigError: anything else, zero, or more than 100 years.
    """
    text = text.strip().lower()
    if text == "never":
        return None
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ConfigError(f"invalid duration {text!r}: use e.g. 90d, 12h, 30m, 1w2d or never")
    seconds = float(sum(int(n) * _UNIT_SECONDS[u] for n, u in parts))
    if not 0 < seconds <= _MAX_DURATION:
        raise ConfigError(f"duration {text!r} must be more than zero and at most 100 years")
    return seconds


# ---------------------------------------------------------------------------------------------
# Records and the store seam.


@dataclass(frozen=True, slots=True)
class RobotRecord:
    """A robot account as listed (never with its secret or the secret's hash).

    Attributes:
        name: without the ``robot$`` prefix (see ``login_name``).
        grants: what it may do, beyond ``[[access]]`` rules that name it.
        created_at: Unix time.
        expires_at: Unix time after which it cannot log in, or ``None`` (never).
        revoked_at: Unix time it was revoked, or ``None``.
        description: free text from ``--description``.
    """

    name: str
    grants: tuple[Grant, ...]
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    description: str = ""

    @property
    def login_name(self) -> str:
        return ROBOT_PREFIX + self.name

    def status(self, now: float | None = None) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (time.time() if now is None else now):
            return "expired"
        return "active"

    def usable(self, now: float | None = None) -> bool:
        """Whether it may log in (and its tokens still count) at ``now`` (default: the wall clock)."""
        return self.status(now) == "active"


@runtime_checkable
class RobotStore(Protocol):
    """Where robot accounts live. Implementations are safe to call from several threads.

    ``verify`` answers ``None`` alike for unknown, revoked, expired robots and wrong secrets.
    ``revoke`` answers whether it revoked something (``False``: unknown or already revoked).
    """

    def create(self, name: str, grants: Sequence[Grant], expires_at: float | None,
               description: str = "") -> tuple[RobotRecord, str]: ...

    def list(self) -> list[RobotRecord]: ...

    def get(self, name: str) -> RobotRecord | None: ...

    def revoke(self, name: str) -> bool: ...

    def verify(self, name: str, secret: str) -> RobotRecord | None: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    record: RobotRecord
    secret_sha256: str  # hex


# Compared against when the robot is unknown, so every verify does the same work.
_DUMMY_DIGEST = hashlib.sha256(b"no such robot").hexdigest()


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _new_entry(entries: Mapping[str, _Entry], name: str, grants: Sequence[Grant], expires_at: float | None,
               description: str, now: float) -> tuple[_Entry, str]:
    """Validates a creation request against ``entries``; the new entry and its secret."""
    validate_robot_name(name)
    if name in entries:
        state = entries[name].record.status(now)
        raise RobotExists(f"robot {ROBOT_PREFIX}{name} already exists ({state}); names are not reused")
    if len(entries) >= MAX_ROBOTS:
        raise RobotError(f"the store already holds {MAX_ROBOTS} robots")
    if not grants or len(grants) > MAX_GRANTS:
        raise ConfigError(f"a robot needs between 1 and {MAX_GRANTS} access entries")
    checked = tuple(_validate_grant(g) for g in grants)
    if expires_at is not None and expires_at <= now:
        raise ConfigError("a robot's expiry must be in the future")
    if len(description) > MAX_DESCRIPTION or any(ord(c) < 32 or ord(c) == 127 for c in description):
        raise ConfigError(f"robot description: at most {MAX_DESCRIPTION} printable characters")
    secret = secrets.token_urlsafe(32)
    record = RobotRecord(name, checked, now, expires_at, None, description)
    return _Entry(record, _digest(secret)), secret


def _check_secret(entry: _Entry | None, secret: str, now: float) -> RobotRecord | None:
    matches = hmac.compare_digest(_digest(secret), entry.secret_sha256 if entry is not None else _DUMMY_DIGEST)
    if entry is None or not matches or not entry.record.usable(now):
        return None
    return entry.record


def _created_event(record: RobotRecord) -> dict[str, Any]:
    return {"robot": record.login_name, "access": format_access(record.grants),
            "expires_at": record.expires_at, "description": record.description}


class MemoryRobotStore:
    """A ``RobotStore`` in memory (tests, and a seed without a data directory).

    Args:
        clock: wall-clock seconds (creation times, expiry).
        on_event: called with ``robot.create`` / ``robot.revoke`` after each change.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time, on_event: RobotEvent | None = None) -> None:
        self._clock = clock
        self._on_event = on_event
        self._entries: dict[str, _Entry] = {}
        self._mutex = threading.Lock()

    def create(self, name: str, grants: Sequence[Grant], expires_at: float | None,
               description: str = "") -> tuple[RobotRecord, str]:
        with self._mutex:
            entry, secret = _new_entry(self._entries, name, grants, expires_at, description, self._clock())
            self._entries[name] = entry
        if self._on_event is not None:
            self._on_event("robot.create", _created_event(entry.record))
        return entry.record, secret

    def list(self) -> list[RobotRecord]:
        with self._mutex:
            return [self._entries[name].record for name in sorted(self._entries)]

    def get(self, name: str) -> RobotRecord | None:
        with self._mutex:
            entry = self._entries.get(name)
        return entry.record if entry is not None else None

    def revoke(self, name: str) -> bool:
        with self._mutex:
            entry = self._entries.get(name)
            if entry is None or entry.record.revoked_at is not None:
                return False
            self._entries[name] = replace(entry, record=replace(entry.record, revoked_at=self._clock()))
        if self._on_event is not None:
            self._on_event("robot.revoke", {"robot": ROBOT_PREFIX + name})
        return True

    def verify(self, name: str, secret: str) -> RobotRecord | None:
        with self._mutex:
            entry = self._entries.get(name)
        return _check_secret(entry, secret, self._clock())


# ---------------------------------------------------------------------------------------------
# The file store.


def _encode(entries: Mapping[str, _Entry]) -> bytes:
    robots = []
    for name in sorted(entries):
        entry = entries[name]
        record = entry.record
        robots.append({
            "name": record.name,
            "grants": [{"pattern": g.pattern, "actions": [a for a in ACTIONS if a in g.actions]}
                       for g in record.grants],
            "created_at": record.created_at,
            "expires_at": record.expires_at,
            "revoked_at": record.revoked_at,
            "description": record.description,
            "secret_sha256": entry.secret_sha256,
        })
    return json.dumps({"version": _FORMAT_VERSION, "robots": robots}, indent=1).encode() + b"\n"


def _optional_time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("a time is not a number")
    return float(value)


def _decode(data: bytes) -> dict[str, _Entry]:
    """Parses robots.json; raises ValueError (or KeyError/TypeError) on anything unexpected."""
    document = json.loads(data)
    if not isinstance(document, dict) or document.get("version") != _FORMAT_VERSION:
        raise ValueError(f"not a version {_FORMAT_VERSION} robot store")
    robots = document.get("robots")
    if not isinstance(robots, list) or len(robots) > MAX_ROBOTS:
        raise ValueError(f"robots must be a list of at most {MAX_ROBOTS} entries")
    entries: dict[str, _Entry] = {}
    for item in robots:
        name = item["name"]
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in entries:
            raise ValueError(f"invalid or repeated robot name {name!r}")
        grants = tuple(_validate_grant(Grant(str(g["pattern"]), frozenset(str(a) for a in g["actions"])))
                       for g in item["grants"])
        digest = item["secret_sha256"]
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"robot {name}: invalid secret_sha256")
        created_at = _optional_time(item["created_at"])
        description = item.get("description", "")
        if created_at is None or not isinstance(description, str):
            raise ValueError(f"robot {name}: invalid created_at or description")
        record = RobotRecord(name, grants, created_at, _optional_time(item.get("expires_at")),
                             _optional_time(item.get("revoked_at")), description)
        entries[name] = _Entry(record, digest)
    return entries


_Signature = tuple[int, int, int, int, int]  # device, inode, mtime_ns, ctime_ns, size


def _signature_of(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``lock_path`` (waiting at most ``_LOCK_WAIT`` seconds)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + _LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RobotStoreError(f"{lock_path} is locked by another process; try again") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


class FileRobotStore:
    """A ``RobotStore`` in a JSON file, shared by the CLI and the server (see the module rules).

    Args:
        path: e.g. ``DATA/auth/robots.json`` (``seed.auth.setup.robot_store_path``); the file and
            its directory are created by the first change.
        clock: wall-clock seconds (creation times, expiry).
        on_event: called with ``robot.create`` / ``robot.revoke`` after each change is on disk.

    When root changes the store (``sudo seed robot ...``), the files it creates are given the
    owner of the nearest existing parent directory (the data directory), so a server running
    as its own user can still read them.

    Blocking: ``get``/``list``/``verify`` cost a ``stat`` (and a read of a small file after a
    change); ``create``/``revoke`` fsync and may wait up to 10 s for another writer's lock, so
    a trio caller runs those in ``trio.to_thread.run_sync``.

    Raises:
        RobotStoreError: the file exists but cannot be read or parsed.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 on_event: RobotEvent | None = None) -> None:
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._clock = clock
        self._on_event = on_event
        self._mutex = threading.Lock()  # guards the cache below between worker threads
        self._entries: dict[str, _Entry] = {}
        self._signature: _Signature | None = None
        self._current()

    def _current(self) -> dict[str, _Entry]:
        """The entries as on disk now: re-read only when the file was replaced or changed."""
        with self._mutex:
            try:
                signature: _Signature | None = _signature_of(self.path.stat())
            except FileNotFoundError:
                signature = None
            except OSError as exc:
                raise RobotStoreError(f"cannot read robot store {self.path}: {exc.strerror or exc}") from exc
            if signature == self._signature:
                return self._entries
            if signature is None:
                self._entries, self._signature = {}, None
                return self._entries
            entries, signature = self._read()
            self._entries, self._signature = entries, signature
            return entries

    def _read(self) -> tuple[dict[str, _Entry], _Signature | None]:
        try:
            with self.path.open("rb") as handle:
                # The signature of the descriptor we read, not of a path that may be replaced meanwhile.
                signature = _signature_of(os.fstat(handle.fileno()))
                data = handle.read(MAX_STORE_SIZE + 1)
        except FileNotFoundError:
            return {}, None
        except OSError as exc:
            raise RobotStoreError(f"cannot read robot store {self.path}: {exc.strerror or exc}") from exc
        if len(data) > MAX_STORE_SIZE:
            raise RobotStoreError(f"robot store {self.path} is larger than {MAX_STORE_SIZE} bytes")
        try:
            return _decode(data), signature
        except (ValueError, KeyError, TypeError, RecursionError, ConfigError) as exc:
            raise RobotStoreError(f"robot store {self.path} is corrupt: {exc}") from exc

    def _change(self, change: Callable[[dict[str, _Entry]], bool]) -> None:
        """Runs ``change`` on the entries read under the writers' lock; writes them if it says so."""
        owner = _owner_for(self.path.parent)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _give(self.path.parent, owner)
            with _exclusive(self._lock_path):
                _give(self._lock_path, owner)
                entries, _ = self._read()  # fresh, whatever our cache holds
                if not change(entries):
                    return
                write_atomic(self.path, _encode(entries), mode=0o600)
                _give(self.path, owner)
        except OSError as exc:
            raise RobotStoreError(f"cannot write robot store {self.path}: {exc.strerror or exc}") from exc
        self._current()

    def create(self, name: str, grants: Sequence[Grant], expires_at: float | None,
               description: str = "") -> tuple[RobotRecord, str]:
        created: list[tuple[_Entry, str]] = []

        def add(entries: dict[str, _Entry]) -> bool:
            entry, secret = _new_entry(entries, name, grants, expires_at, description, self._clock())
            entries[name] = entry
            created.append((entry, secret))
            return True

        self._change(add)
        entry, secret = created[0]
        if self._on_event is not None:
            self._on_event("robot.create", _created_event(entry.record))
        return entry.record, secret

    def list(self) -> list[RobotRecord]:
        entries = self._current()
        return [entries[name].record for name in sorted(entries)]

    def get(self, name: str) -> RobotRecord | None:
        entry = self._current().get(name)
        return entry.record if entry is not None else None

    def revoke(self, name: str) -> bool:
        revoked: list[bool] = []

        def mark(entries: dict[str, _Entry]) -> bool:
            entry = entries.get(name)
            if entry is None or entry.record.revoked_at is not None:
                return False
            entries[name] = replace(entry, record=replace(entry.record, revoked_at=self._clock()))
            revoked.append(True)
            return True

        self._change(mark)
        if revoked and self._on_event is not None:
            self._on_event("robot.revoke", {"robot": ROBOT_PREFIX + name})
        return bool(revoked)

    def verify(self, name: str, secret: str) -> RobotRecord | None:
        return _check_secret(self._current().get(name), secret, self._clock())


def _owner_for(directory: Path) -> tuple[int, int] | None:
    """When running as root: the owner of ``directory`` or its nearest existing parent."""
    if os.geteuid() != 0:
        return None
    for candidate in (directory, *directory.parents):
        try:
            st = candidate.stat()
        except FileNotFoundError:
            continue
        return st.st_uid, st.st_gid
    return None


def _give(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is None:
        return
    st = path.stat()
    if (st.st_uid, st.st_gid) != owner:
        try:
            os.chown(path, *owner)
        except OSError as exc:  # e.g. a read-only bind mount of the parent: leave it to the operator
            if exc.errno not in (errno.EPERM, errno.EROFS):
                raise


# ---------------------------------------------------------------------------------------------
# The identity provider.


class RobotProvider:
    """Identity provider for ``robot$NAME`` logins against a ``RobotStore``.

    Args:
        store: where the robots live.
    """

    name = "robot"

    def __init__(self, store: RobotStore) -> None:
        self.store = store

    def authenticate(self, username: str, password: str) -> Principal | None:
        """The robot's principal (with its grants) if the secret is right and it is usable.

        Raises:
            ProviderUnavailable: the store cannot be read (logins fail closed).
        """
        if not username.startswith(ROBOT_PREFIX):
            return None
        name = username[len(ROBOT_PREFIX):]
        if not _NAME.fullmatch(name):
            return None
        try:
            record = self.store.verify(name, password)
        except RobotStoreError as exc:
            raise ProviderUnavailable(str(exc)) from exc
        if record is None:
            return None
        return Principal(kind="robot", name=record.login_name, provider=self.name, grants=record.grants)


# ---------------------------------------------------------------------------------------------
# ``seed robot create|list|revoke``: registered by seed.cli.


def _when(timestamp: float | None, never: str = "never") -> str:
    if timestamp is None:
        return never
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%MZ")


def robot_table(records: Iterable[RobotRecord], now: float) -> list[str]:
    """``seed robot list`` lines: name, status, expiry, creation, access, description."""
    header = ("NAME", "STATUS", "EXPIRES", "CREATED", "ACCESS", "DESCRIPTION")
    rows = [header] + [(r.login_name, r.status(now), _when(r.expires_at), _when(r.created_at),
                        format_access(r.grants), r.description) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
            for row in rows]


def add_robot_parser(commands: Any) -> None:
    """Adds ``robot create|list|revoke`` to the ``seed`` subcommands (an argparse subparsers object)."""
    robot = commands.add_parser("robot", help="manage robot accounts (CI credentials)")
    actions = robot.add_subparsers(dest="robot_command", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", type=Path, help="data directory")
        parser.add_argument("--config", type=Path, help="TOML configuration file")

    create = actions.add_parser("create", help="create a robot and print its secret (once)")
    create.add_argument("name", help="robot name (logs in as robot$NAME)")
    create.add_argument("--access", action="append", required=True, metavar="SPEC",
                        help="PATTERN:ACTIONS, e.g. 'team/*:pull,push' (repeatable, or ';'-separated)")
    create.add_argument("--expires", default="90d", help="lifetime: 90d, 12h, 2w, never (default 90d)")
    create.add_argument("--description", default="", help="free text, e.g. the pipeline that uses it")
    common(create)
    common(actions.add_parser("list", help="list robots"))
    revoke = actions.add_parser("revoke", help="revoke a robot (it stops working at once)")
    revoke.add_argument("name", help="robot name, with or without robot$")
    common(revoke)


def run_robot_cli(args: argparse.Namespace, store_path: Path, *, on_event: RobotEvent | None = None,
                  out: TextIO | None = None, clock: Callable[[], float] = time.time) -> int:
    """Runs a parsed ``seed robot ...`` command against the store at ``store_path``.

    Returns:
        The exit status: 0 done, 1 refused (exists, unknown, store error). Invalid input
        raises ``ConfigError`` (the CLI answers 2).
    """
    stdout = out if out is not None else sys.stdout
    try:
        store = FileRobotStore(store_path, clock=clock, on_event=on_event)
        if args.robot_command == "create":
            name = validate_robot_name(args.name.removeprefix(ROBOT_PREFIX))
            grants = parse_access_spec(args.access)
            lifetime = parse_duration(args.expires)
            expires_at = None if lifetime is None else clock() + lifetime
            record, secret = store.create(name, grants, expires_at, description=args.description)
            print(f"login:   {record.login_name}", file=stdout)
            print(f"secret:  {secret}", file=stdout)
            print(f"access:  {format_access(record.grants)}", file=stdout)
            print(f"expires: {_when(record.expires_at)}", file=stdout)
            print("The secret is shown only now. Log in with e.g. "
                  f"`docker login -u '{record.login_name}' --password-stdin HOST`.", file=stdout)
            return 0
        if args.robot_command == "list":
            for line in robot_table(store.list(), clock()):
                print(line, file=stdout)
            return 0
        name = args.name.removeprefix(ROBOT_PREFIX)
        if store.revoke(name):
            print(f"revoked {ROBOT_PREFIX}{name}", file=stdout)
            return 0
        existing = store.get(name)
        reason = "is already revoked" if existing is not None else "does not exist"
        print(f"seed: robot {ROBOT_PREFIX}{name} {reason}", file=sys.stderr)
        return 1
    except RobotError as exc:
        print(f"seed: {exc}", file=sys.stderr)
        return 1
