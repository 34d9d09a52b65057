"""Chunk bitmaps and the order in which a downloader asks peers for chunks.

Policy: rarest first (chunks held by the fewest known sources spread fastest through the
swarm), random among equally rare chunks (so concurrent downloaders do not all ask for
the same chunk from the same peer), and sources chosen at random among those holding a
chunk, same-site sources first.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["LESSEE_LOOKAHEAD", "Bitmap", "ChunkRequest", "lessee_view", "plan_requests"]


class Bitmap:
    """Which chunks of a blob a node has, as a compact bit string (msgpack bytes)."""

    __slots__ = ("_bits", "count")

    def __init__(self, count: int, bits: bytes | bytearray | None = None) -> None:
        if count < 0:
            raise ValueError("negative chunk count")
        size = (count + 7) // 8
        if bits is not None and len(bits) != size:
            raise ValueError("bitmap length does not match chunk count")
        self.count = count
        self._bits = bytearray(bits) if bits is not None else bytearray(size)
        if count % 8 and self._bits:
            self._bits[-1] &= (0xFF << (8 - count % 8)) & 0xFF  # unused bits stay clear

    @classmethod
    def full(cls, count: int) -> Bitmap:
        bitmap = cls(count)
        for index in range(count):
            bitmap.set(index)
        return bitmap

    def set(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise IndexError(index)
        self._bits[index // 8] |= 0x80 >> (index % 8)

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self.count:
            return False
        return bool(self._bits[index // 8] & (0x80 >> (index % 8)))

    def indexes(self) -> list[int]:
        return [i for i in range(self.count) if i in self]

    def cardinality(self) -> int:
        return sum(bin(byte).count("1") for byte in self._bits)

    def is_full(self) -> bool:
        return self.cardinality() == self.count

    def prefix(self) -> int:
        """How many chunks from the start are present without a gap."""
        for index in range(self.count):
            if index not in self:
                return index
        return self.count

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitmap) and self.count == other.count and self._bits == other._bits

    def __repr__(self) -> str:
        return f"Bitmap({self.cardinality()}/{self.count})"


LESSEE_LOOKAHEAD = 8  # chunks past a sole range holder's verified prefix that may be asked of it


def lessee_view(known: Bitmap | None, count: int, first: int, last: int, lessees: int) -> Bitmap:
    """What a range holder is asked for: what it is known to have, plus the next chunks of its
    range (``first``..``last``), which it fetches in order; its endpoint waits briefly for a
    chunk on its way.

    How far ahead is shared out among the ``lessees`` (range holders of the blob fetching at
    once): each gets about 1/lessees of the upstream, so its next chunks come that many times
    slower. Asking 16 holders for 8 chunks ahead each kept a downloader's request slots waiting
    for chunks seconds away (answered 404 at the end of the wait) instead of fetching chunks
    that were there (N = 16 equal links: 1.68x the bound; one chunk ahead: 1.48x).
    """
    view = Bitmap(count, known.to_bytes()) if known is not None else Bitmap(count)
    frontier = next((i for i in range(first, last + 1) if i not in view), last + 1)
    ahead = max(1, LESSEE_LOOKAHEAD // max(1, lessees))
    for index in range(frontier, min(last + 1, frontier + ahead)):
        view.set(index)
    return view


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    index: int
    source: str  # node id


def plan_requests(
    needed: Iterable[int],
    sources: Mapping[str, Bitmap],
    *,
    busy: Mapping[str, int],
    max_per_source: int,
    limit: int,
    preferred: Sequence[str] = (),
    fallback: Sequence[str] = (),
    rng: random.Random | None = None,
) -> list[ChunkRequest]:
    """Chooses up to ``limit`` (chunk, source) pairs to request next.

    Args:
        needed: chunk indexes not yet present and not already requested.
        sources: each candidate peer's bitmap (peers known to hold chunks).
        busy: requests already in flight per source.
        max_per_source: in-flight cap per source.
        limit: how many new requests to return.
        preferred: sources to use first when they hold a chunk (same site).
        fallback: sources used for a chunk only when no other source holds it (the lease
            holder: its upload is best spent on chunks nobody else has yet).
        rng: randomness (tests pass a seeded one).
    """
    rng = rng or random.Random()
    load = dict(busy)
    preferred_set = set(preferred)
    fallback_set = set(fallback)
    holders: dict[int, list[str]] = {}
    for index in needed:
        having = [node for node, bitmap in sources.items() if index in bitmap]
        regular = [node for node in having if node not in fallback_set]
        if regular or having:
            holders[index] = regular or having
    # Rarest first; shuffle before the stable sort so equal rarity is in random order.
    order = list(holders)
    rng.shuffle(order)
    order.sort(key=lambda index: len(holders[index]))
    plan: list[ChunkRequest] = []
    for index in order:
        if len(plan) >= limit:
            break
        candidates = [node for node in holders[index] if load.get(node, 0) < max_per_source]
        if not candidates:
            continue
        near = [node for node in candidates if node in preferred_set]
        pool = near or candidates
        least = min(load.get(node, 0) for node in pool)
        choice = rng.choice([node for node in pool if load.get(node, 0) == least])
        load[choice] = load.get(choice, 0) + 1
        plan.append(ChunkRequest(index, choice))
    return plan
