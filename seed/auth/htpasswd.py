"""Users from an Apache htpasswd file, bcrypt hashes only.

Rules/invariants:
- Only bcrypt (``$2y$``, ``$2a$``, ``$2b$``, as made by ``htpasswd -B``) is accepted. Any other
  entry (``$apr1$``, ``{SHA}``, crypt, plain text) makes loading fail with the line numbers
  and user names, never the hash: a file that silently lost some users would be worse.
- A user the file does not know costs the same bcrypt time as a known one (checked against a
  dummy hash of the file's usual cost), so response times do not reveal who exists.
- Passwords are truncated to bcrypt's 72 bytes, as Apache's own bcrypt does when it hashes.
- ``reload`` swaps in the new table whole, or keeps the old one and raises; ``authenticate``
  (called from worker threads) reads one immutable snapshot, so it needs no lock.
- Reading is bounded: file size, line count and line length are capped.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import bcrypt

from ..errors import ConfigError
from .identity import Principal

__all__ = ["MAX_FILE_SIZE", "MAX_LINES", "MAX_LINE_LENGTH", "HtpasswdProvider"]

log = logging.getLogger("seed.auth.htpasswd")

MAX_FILE_SIZE = 8 * 1024 * 1024
MAX_LINES = 100_000
MAX_LINE_LENGTH = 4096
# htpasswd -C accepts 4..17; a higher cost would let one login occupy a worker for minutes.
_MAX_COST = 17
_BCRYPT_MAX_PASSWORD = 72  # bytes bcrypt uses; the rest is ignored by every implementation
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")


@dataclass(frozen=True)
class _Table:
    users: dict[str, bytes]  # user -> bcrypt hash; never mutated once built
    dummy: bytes  # a hash of the most common cost, checked when the user is unknown


def _hash_kind(value: str) -> str:
    """Names the scheme of a non-bcrypt entry for the error message (without showing it)."""
    if value.startswith("$apr1$"):
        return "apr1-MD5 (htpasswd -m)"
    if value.startswith("{SHA}"):
        return "SHA-1 (htpasswd -s)"
    if value.startswith(("$1$", "$5$", "$6$", "$y$", "$md5")):
        return "crypt(3)"
    if value.startswith("$2"):
        return "malformed bcrypt"
    if len(value) == 13 and re.fullmatch(r"[./A-Za-z0-9]{13}", value):
        return "DES crypt (htpasswd -d)"
    return "plain text or unknown (htpasswd -p)"


def _read_bounded(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_FILE_SIZE:
                raise ConfigError(f"htpasswd file {path} is {size} bytes, more than the {MAX_FILE_SIZE} allowed")
            data = handle.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read htpasswd file {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_SIZE:  # it grew while we read it
        raise ConfigError(f"htpasswd file {path} is more than {MAX_FILE_SIZE} bytes")
    return data


def _parse(path: Path, data: bytes) -> dict[str, bytes]:
    lines = data.split(b"\n")
    if len(lines) > MAX_LINES:
        raise ConfigError(f"htpasswd file {path} has more than {MAX_LINES} lines")
    users: dict[str, bytes] = {}
    problems: list[str] = []
    for number, raw in enumerate(lines, start=1):
        if len(raw) > MAX_LINE_LENGTH:
            problems.append(f"line {number}: longer than {MAX_LINE_LENGTH} bytes")
            continue
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            problems.append(f"line {number}: not UTF-8")
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, value = line.partition(":")
        if not sep or not user:
            problems.append(f"line {number}: not of the form user:hash")
            continue
        match = _BCRYPT.fullmatch(value)
        if match is None:
            problems.append(f"line {number} (user {user!r}): {_hash_kind(value)}")
            continue
        cost = int(match.group(1))
        if not 4 <= cost <= _MAX_COST:
            problems.append(f"line {number} (user {user!r}): bcrypt cost {cost} outside 4..{_MAX_COST}")
            continue
        if user in users:
            problems.append(f"line {number} (user {user!r}): user listed twice")
            continue
        users[user] = value.encode("ascii")
    if problems:
        raise ConfigError(
            f"htpasswd file {path}: only bcrypt entries are accepted (re-create them with `htpasswd -B`); "
            "refused " + "; ".join(problems)
        )
    return users


def _dummy_hash(users: dict[str, bytes], previous: bytes | None) -> bytes:
    """A hash of the cost most entries use, so an unknown user takes as long as a typical known one.

    The previous dummy is kept when its cost still fits: making one costs a whole bcrypt round.
    """
    costs = collections.Counter(int(h[4:6]) for h in users.values())
    cost = costs.most_common(1)[0][0] if costs else 5  # 5: htpasswd -B's default
    if previous is not None and int(previous[4:6]) == cost:
        return previous
    return bcrypt.hashpw(os.urandom(16), bcrypt.gensalt(rounds=cost))


def _prepare(password: str) -> bytes:
    return password.encode("utf-8")[:_BCRYPT_MAX_PASSWORD]


class HtpasswdProvider:
    """An identity provider backed by an htpasswd file (``[auth] htpasswd``).

    Args:
        path: the htpasswd file; read at construction and by ``reload``.

    Raises:
        ConfigError: the file cannot be read, is too large, or has a line that is not a bcrypt
            entry (the message lists every such line number and user).
    """

    name = "htpasswd"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._table = self._load(None)

    def _load(self, previous: _Table | None) -> _Table:
        users = _parse(self.path, _read_bounded(self.path))
        return _Table(users, _dummy_hash(users, previous.dummy if previous is not None else None))

    def reload(self) -> int:
        """Re-reads the file (on SIGHUP). On error the previous users stay in force.

        It may take one bcrypt round (when the usual cost changed): call it from a worker
        thread (``trio.to_thread.run_sync``), like ``authenticate``.

        Returns:
            How many users the file now has.

        Raises:
            ConfigError: as for the constructor; nothing changed.
        """
        table = self._load(self._table)
        self._table = table
        log.info("htpasswd: loaded %d users from %s", len(table.users), self.path)
        return len(table.users)

    def __len__(self) -> int:
        return len(self._table.users)

    def authenticate(self, username: str, password: str) -> Principal | None:
        """The user when the password matches its bcrypt hash, else ``None`` (same cost either way)."""
        table = self._table
        stored = table.users.get(username)
        try:
            matches = bcrypt.checkpw(_prepare(password), stored if stored is not None else table.dummy)
        except ValueError:  # a NUL byte or the like in the password: bcrypt cannot take it
            return None
        if stored is None or not matches:
            return None
        return Principal(kind="user", name=username, provider=self.name)
