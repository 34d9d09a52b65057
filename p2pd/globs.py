"""Repository name globs, shared by every policy that names repositories (the seed's
``[[access]]``, ``[[scanning]]``, ``[[signatures]]``, webhooks; the agent's signature rules)."""

from __future__ import annotations

import re
from functools import lru_cache

from .errors import ConfigError

__all__ = ["compile_glob", "validate_glob"]

_GLOB_CHARS = re.compile(r"[A-Za-z0-9._/*?-]+")


def validate_glob(pattern: str) -> str:
    """Checks a repository glob: name characters, ``/``, ``*`` (one path component), ``**`` (any depth)."""
    if not pattern or len(pattern) > 256 or not _GLOB_CHARS.fullmatch(pattern) or "***" in pattern:
        raise ConfigError(f"invalid repository pattern {pattern!r}: use name characters, '/', '*' and '**'")
    return pattern


@lru_cache(maxsize=1024)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Repository glob → regex. ``*`` and ``?`` stay within one path component; ``**`` spans any.

    ``team-a/**`` matches ``team-a/app`` and ``team-a/x/y`` but not ``team-a`` itself (as in
    gitignore); ``**`` alone matches every repository.
    """
    validate_glob(pattern)
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))
