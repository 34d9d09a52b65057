"""Names, tags and references from the OCI Distribution grammar.

Everything that comes from a request is checked here before it is used to build a path or a
key, so a name such as ``../../etc`` never reaches the filesystem.
"""

from __future__ import annotations

import re

from .errors import OCIError

__all__ = [
    "MAX_NAME_LENGTH",
    "NAME_RE",
    "TAG_RE",
    "is_valid_name",
    "is_valid_tag",
    "validate_name",
    "validate_reference",
    "validate_tag",
]

MAX_NAME_LENGTH = 255

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")


def is_valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) is not None


def is_valid_tag(tag: str) -> bool:
    return TAG_RE.fullmatch(tag) is not None


def validate_name(name: str) -> str:
    """Returns ``name`` or raises NAME_INVALID."""
    if not is_valid_name(name):
        raise OCIError("NAME_INVALID", "invalid repository name", detail={"name": name[:300]})
    return name


def validate_tag(tag: str) -> str:
    """Returns ``tag`` or raises TAG_INVALID."""
    if not is_valid_tag(tag):
        raise OCIError("TAG_INVALID", "invalid tag", detail={"tag": tag[:300]})
    return tag


def validate_reference(reference: str) -> str:
    """A manifest reference is a tag or a digest; returns it unchanged or raises."""
    from .digest import Digest

    if ":" in reference:
        Digest.parse(reference)
        return reference
    return validate_tag(reference)
