"""Chunk bitmaps and the order in which a downloader asks peers for chunks.

Policy: rarest first (chunks held by the fewest known sources spread fastest through the
swarm), random among equally rare chunks (so concurrent downloaders do not all ask for
the same chunk from the same peer), and sources chosen at random among those holding a
chunk, same-site sources first.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["LESSEE_LOOKAHEAD", "MIN_CHUNK_RELAYS", "MIN_REQUEST_SLOTS", "SLOT_CHUNK_BYTES", "Bitmap", "ChunkRequest",
           "chunk_relays", "chunks_within",
           "lessee_view", "plan_requests", "request_slots"]


# The set bits of each byte value, most significant first (bit 0 of a bitmap is 0x80 of byte 0):
# the scheduler lists a bitmap's chunks several times per chunk it receives, and a lookup per
# byte is ~10x faster than testing each chunk.
_BYTE_BITS: tuple[tuple[int, ...], ...] = tuple(
    tuple(bit for bit in range(8) if value & (0x80 >> bit)) for value in range(256))


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
            self._bits[-1] &= _tail_mask(count)  # unused bits stay clear

    @classmethod
    def of(cls, count: int, indexes: Iterable[int]) -> Bitmap:
        """The bitmap of ``count`` chunks with ``indexes`` set (those outside ``0..count-1``
        left out); bits set in place, not by ``set`` per chunk (the planner builds one per plan)."""
        bitmap = cls(count)
        bits = bitmap._bits
        for index in indexes:
            if 0 <= index < count:
                bits[index >> 3] |= 0x80 >> (index & 7)
        return bitmap

    @classmethod
    def full(cls, count: int) -> Bitmap:
        return cls(count, b"\xff" * ((count + 7) // 8))

    def set(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise IndexError(index)
        self._bits[index >> 3] |= 0x80 >> (index & 7)

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int) or not 0 <= index < self.count:
            return False
        return bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def indexes(self) -> list[int]:
        return _set_bits(self._bits)

    def missing(self) -> list[int]:
        """The chunks not set, in order."""
        inverted = bytearray(byte ^ 0xFF for byte in self._bits)
        if self.count % 8 and inverted:
            inverted[-1] &= _tail_mask(self.count)
        return _set_bits(inverted)

    def cardinality(self) -> int:
        return self.mask().bit_count()

    def is_full(self) -> bool:
        return self.cardinality() == self.count

    def prefix(self) -> int:
        """How many chunks from the start are present without a gap."""
        for position, byte in enumerate(self._bits):
            if byte != 0xFF:
                # The first clear bit of this byte (the unused tail bits are clear).
                return min(self.count, position * 8 + 8 - (byte ^ 0xFF).bit_length())
        return self.count

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def mask(self) -> int:
        """The bitmap as one integer (chunk 0 the most significant bit of the first byte): sets
        of chunks of many peers combine with ``|``, ``&`` and ``~`` in C, not a test per chunk."""
        return int.from_bytes(self._bits, "big")

    @classmethod
    def from_mask(cls, count: int, mask: int) -> Bitmap:
        """The bitmap of ``count`` chunks whose ``mask()`` is ``mask`` (bits beyond ``count``
        and negative masks' sign bits dropped)."""
        size = (count + 7) // 8
        return cls(count, (mask & ((1 << (size * 8)) - 1)).to_bytes(size, "big"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bitmap) and self.count == other.count and self._bits == other._bits

    def __repr__(self) -> str:
        return f"Bitmap({self.cardinality()}/{self.count})"


def _tail_mask(count: int) -> int:
    """The used bits of a bitmap's last byte when ``count`` is not a multiple of 8."""
    return (0xFF << (8 - count % 8)) & 0xFF


def _set_bits(bits: bytes | bytearray) -> list[int]:
    return [position * 8 + bit for position, byte in enumerate(bits) if byte for bit in _BYTE_BITS[byte]]


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


def chunks_within(budget: int, chunk_size: int, *, at_least: int, at_most: int) -> int:
    """How many chunks of ``chunk_size`` bytes fit in ``budget`` bytes, kept within
    ``at_least``..``at_most`` (``at_most`` wins). The swarm bounds what it has in flight in
    bytes, not chunks: a chunk shares a link with the others in flight, so it takes as long as
    their bytes together (range leases at once, request slots, the front flows)."""
    return min(at_most, max(at_least, budget // max(chunk_size, 1)))


MIN_CHUNK_RELAYS = 2


def chunk_relays(holders: int) -> int:
    """How many nodes may take one chunk from a node while it arrives there: one per range
    holder of its blob fetching at once (``holders``), at least ``MIN_CHUNK_RELAYS``. K holders
    share the upstream's link, so a chunk arrives at ~1/K of it, and K relays of it send about
    what the upstream does, no more than a node's uplink as fast as the upstream's. More than
    that share the uplink below the chunk's arrival rate, so every one of them ends later than
    the chunk itself (the peer service's rule, p2pd.swarm.service); fewer leave a site's nodes
    waiting for chunks that are arriving next door (the relay tree, p2pd.swarm.engine)."""
    return max(MIN_CHUNK_RELAYS, holders)


SLOT_CHUNK_BYTES = 128 * 1024  # the chunk size up to which each chunk in flight takes one request slot
MIN_REQUEST_SLOTS = 4


def request_slots(chunk_size: int, max_parallel_chunks: int) -> int:
    """How many chunk requests a transfer keeps in flight for a blob cut in ``chunk_size``
    chunks: ``max_parallel_chunks`` of chunks up to ``SLOT_CHUNK_BYTES``, fewer of bigger ones
    (the same bytes in flight), never fewer than ``MIN_REQUEST_SLOTS``.

    A node's downlink is shared by its requests in flight, so each chunk takes about as long
    as all of them together: 16 chunks of 512 KiB (a 64 MiB layer as cut until 12-07) at a 3 Mbit/s link are 22 s
    a chunk, the first chunk included, while a reader waits for its first byte (N = 32, equal
    links: bench clients gave up on their agents after 30 s; docs/benchmarks.md, 27th session).
    The floor keeps several peers sending at once: one peer's upload is a share of its uplink."""
    return chunks_within(max_parallel_chunks * SLOT_CHUNK_BYTES, chunk_size, at_least=MIN_REQUEST_SLOTS,
                         at_most=max_parallel_chunks)


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
    open_sources = {node for node in sources if load.get(node, 0) < max_per_source}
    if limit <= 0 or not open_sources:
        return []
    # Every source's bitmap is of the blob's chunk count (a bitmap of another count, which
    # would be a bug, is left out: its bits would not line up with the others').
    count = next(iter(sources.values())).count
    wanted = Bitmap.of(count, needed).mask()
    # Who holds which needed chunk, as one integer per source (Bitmap.mask): planned after every
    # chunk that arrives, with N sources and hundreds of chunks, so the sets are combined in C
    # and the chunks' holder counts added up bit-sliced (a few operations per source), not a
    # list of holders built per chunk and source: 0.11-0.14 ms a plan in 1x/32 pulls (128
    # chunks, 31 sources) -> 0.05, and 1.9 -> 0.12 ms for 1,024 chunks (docs/benchmarks.md).
    fallback_set = set(fallback)
    regular: list[tuple[str, int]] = []
    spare: list[tuple[str, int]] = []
    for node, bitmap in sources.items():
        held = bitmap.mask() & wanted if bitmap.count == count else 0
        if held:
            (spare if node in fallback_set else regular).append((node, held))
    regular_counts = _bit_sliced_counts(held for _, held in regular)
    spare_counts = _bit_sliced_counts(held for _, held in spare)
    held_regular = _union(held for _, held in regular)
    spare_only = _union(held for _, held in spare) & ~held_regular  # the fallback's chunks: nobody else has them
    width = (count + 7) // 8 * 8  # chunk i is bit width - 1 - i of a mask (chunk 0 the most significant)

    def rarest_first() -> Iterator[list[int]]:
        """The needed chunks some source holds, by rarity (how many sources hold a chunk; the
        fallback's chunks, how many fallback sources do), least first, each group in order."""
        remaining = held_regular | spare_only
        for rarity in range(1, max(len(regular), len(spare)) + 1):
            if not remaining:
                return
            group = _exactly(regular_counts, rarity, held_regular) | _exactly(spare_counts, rarity, spare_only)
            if group:
                remaining &= ~group
                yield _set_bits(group.to_bytes(width // 8, "big"))

    def holders_of(index: int) -> list[str]:
        bit = 1 << (width - 1 - index)
        return [node for node, held in (regular if held_regular & bit else spare) if held & bit]

    return _draw(rarest_first(), holders_of, load=load, open_sources=open_sources, preferred=set(preferred),
                 max_per_source=max_per_source, limit=limit, rng=rng)


def _draw(groups: Iterable[list[int]], holders_of: Callable[[int], list[str]], *, load: dict[str, int],
          open_sources: set[str], preferred: set[str], max_per_source: int, limit: int,
          rng: random.Random) -> list[ChunkRequest]:
    """Up to ``limit`` requests from ``groups`` of equally rare chunks (rarest group first), in
    random order within a group: each drawn lazily (a Fisher-Yates shuffle cut short) and only
    until the plan is full or every source is at its cap. A chunk goes to the least loaded of
    its open holders, same-site (``preferred``) ones first, at random among equals."""
    plan: list[ChunkRequest] = []
    for group in groups:
        for position in range(len(group)):
            if len(plan) >= limit or not open_sources:
                return plan
            pick = rng.randrange(position, len(group))
            group[position], group[pick] = group[pick], group[position]
            index = group[position]
            candidates = [node for node in holders_of(index) if node in open_sources]
            if not candidates:
                continue
            pool = [node for node in candidates if node in preferred] or candidates
            least = min(load.get(node, 0) for node in pool)
            choice = rng.choice([node for node in pool if load.get(node, 0) == least])
            load[choice] = load.get(choice, 0) + 1
            if load[choice] >= max_per_source:
                open_sources.discard(choice)
            plan.append(ChunkRequest(index, choice))
    return plan


def _union(masks: Iterable[int]) -> int:
    union = 0
    for mask in masks:
        union |= mask
    return union


def _bit_sliced_counts(masks: Iterable[int]) -> list[int]:
    """How many of ``masks`` have each bit set, bit-sliced: plane k holds, at every bit position,
    bit k of that position's count (so a count is read across the planes). Adding a mask is a
    ripple-carry addition of it to the planes, a few whole-integer operations."""
    planes: list[int] = []
    for mask in masks:
        carry = mask
        for level, plane in enumerate(planes):
            if not carry:
                break
            planes[level], carry = plane ^ carry, plane & carry
        if carry:
            planes.append(carry)
    return planes


def _exactly(planes: list[int], count: int, within: int) -> int:
    """The positions of ``within`` whose count (``_bit_sliced_counts``) is exactly ``count``."""
    if count >> len(planes):
        return 0
    chosen = within
    for level, plane in enumerate(planes):
        chosen &= plane if count >> level & 1 else ~plane
        if not chosen:
            break
    return chosen
