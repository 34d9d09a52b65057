"""Rendezvous (highest-random-weight) hashing: every node computes the same coordinators for
a digest from the same member list, with no tracker.

When a member joins or leaves, only the digests whose top-ranked member changed move,
about 1/N of them, and nothing else is reshuffled.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["coordinators", "rank", "score"]


def score(key: str, node_id: str) -> int:
    """The weight of ``node_id`` for ``key``: the first 8 bytes of sha256(key, node)."""
    digest = hashlib.sha256(f"{key}\0{node_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rank(key: str, node_ids: Iterable[str]) -> list[str]:
    """All members ordered by weight for ``key``, highest first (ties broken by id)."""
    return sorted(set(node_ids), key=lambda node: (score(key, node), node), reverse=True)


def coordinators(key: str, node_ids: Iterable[str], count: int) -> list[str]:
    """The ``count`` highest-ranked members: the coordinator and its backups."""
    return rank(key, node_ids)[:count]
