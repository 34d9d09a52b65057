"""Chunk maps: the per-chunk sha256 list that lets a peer verify every chunk it receives.

The seed computes a map while a blob is pushed (or later, on demand) and serves it
msgpack-encoded; p2pd checks each chunk from another node against it before the chunk is
written, served, or advertised.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import msgpack

from .digest import Digest
from .errors import OCIError

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MIN_CHUNKS",
    "MIN_CHUNK_SIZE",
    "SMALLEST_AUTO_CHUNK",
    "SPREAD_CHUNK",
    "TARGET_CHUNKS",
    "ChunkHasher",
    "ChunkMap",
    "chunk_count",
    "chunk_size_for",
    "validate_chunk_size",
]

MIN_CHUNK_SIZE = 64 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
_FORMAT_VERSION = 1


def validate_chunk_size(size: int) -> int:
    """Chunk sizes are powers of two between 64 KiB and 64 MiB."""
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE or size & (size - 1):
        raise OCIError("BAD_REQUEST", "chunk size must be a power of two between 64 KiB and 64 MiB",
                       detail={"size": size})
    return size


def chunk_count(blob_size: int, chunk_size: int) -> int:
    return max(1, -(-blob_size // chunk_size)) if blob_size else 0


# How a blob is cut (chunk_size_for). Past its range holder (which relays a chunk while it
# arrives) a chunk moves store-and-forward: a node passes it on once it has all of it, verified,
# so every further hop costs a chunk's transfer time. A 12 MiB layer in 1 MiB chunks gave 8-32
# nodes 12 pieces to pass around and the last node waited 2.1x the bound with node links as fast
# as the seed's (7.3x at N = 32, where clients gave up on the first chunk); in 128 KiB chunks 1.5x
# and 1.9x, before the relays (docs/benchmarks.md). So a blob gets at least MIN_CHUNKS: 128
# instead of 64 took the equal-links cells from 1.26x, 1.26x and 1.59x the bound (N = 8, 16, 32)
# to 1.16x, 1.22x and 1.48-1.51x (nineteenth session).
# Bigger blobs need small chunks too where links are slow: a site runs a byte budget of range
# leases at once (p2pd.swarm.coordinator RANGE_FLIGHT_BYTES: 8 holders of 128 KiB chunks, 4 of
# 256 KiB, 2 of 512 KiB), and the fewer holders, the fewer uplinks carry the first copies into the
# site and relay them. A 64 MiB layer at equal 3 Mbit/s links, N = 32: 2.03-2.49x in 512 KiB
# chunks (128 of them, the rule before), 1.34-1.36x in 256 KiB, 1.23x in 128 KiB, 1.34x in 64 KiB;
# a 128 MiB one 1.82x in 512 KiB, 1.33x in 256 KiB (docs/benchmarks.md, twenty-eighth session).
# So chunks stay at SPREAD_CHUNK until a blob has TARGET_CHUNKS of them, and only then grow. Not
# 64 KiB for those blobs: no faster at N = 32, and on fast links the per-chunk CPU shows (the edge
# site's 24 MiB layer in 64 KiB chunks: 1.25x at 33.6 ms/MiB, against 1.22x at 22.2 in 128 KiB).
# The price against the rule before is CPU per MiB (1.3-1.5x at 128 KiB against 512 KiB for the
# 64 MiB layer): very large blobs keep the configured size, where a node's per-blob bookkeeping
# grows with the number of chunks.
MIN_CHUNKS = 128
SPREAD_CHUNK = 128 * 1024
TARGET_CHUNKS = 512
SMALLEST_AUTO_CHUNK = 64 * 1024


def _power_of_two_at_most(value: int) -> int:
    return 1 << (value.bit_length() - 1) if value > 0 else 1


def chunk_size_for(blob_size: int, largest: int) -> int:
    """The chunk size every node uses for a blob of ``blob_size`` bytes, given the configured
    (largest) chunk size: a power of two that cuts the blob into at least ``MIN_CHUNKS`` chunks,
    no larger than ``SPREAD_CHUNK`` until that cuts it into ``TARGET_CHUNKS`` or more (under
    16 MiB in 64 KiB, from 16 MiB in 128 KiB, from 128 MiB in 256 KiB, from 256 MiB in 512 KiB,
    from 512 MiB in 1 MiB), between ``SMALLEST_AUTO_CHUNK`` and ``largest``. Nodes and the seed compute
    it from the size alone, so they agree without talking."""
    validate_chunk_size(largest)
    size = max(blob_size, 0)
    few = _power_of_two_at_most(size // MIN_CHUNKS)
    many = _power_of_two_at_most(size // TARGET_CHUNKS)
    return min(largest, max(SMALLEST_AUTO_CHUNK, many, min(SPREAD_CHUNK, few)))


@dataclass(frozen=True, slots=True)
class ChunkMap:
    digest: Digest
    size: int
    chunk_size: int
    hashes: tuple[bytes, ...]  # raw 32-byte sha256 digests, one per chunk

    def chunk_bounds(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def verify_chunk(self, index: int, data: bytes | memoryview) -> bool:
        if not 0 <= index < len(self.hashes) or len(data) != self.chunk_bounds(index)[1]:
            return False
        return hmac.compare_digest(hashlib.sha256(data).digest(), self.hashes[index])

    def encode(self) -> bytes:
        return msgpack.packb({
            "v": _FORMAT_VERSION,
            "digest": str(self.digest),
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunks": list(self.hashes),
        })

    @classmethod
    def decode(cls, data: bytes, *, expected_digest: Digest | None = None,
               expected_size: int | None = None) -> ChunkMap:
        """Parses an encoded map and checks that its shape is self-consistent.

        Raises:
            OCIError: BAD_REQUEST when the map is malformed or describes another blob.
        """
        def bad(message: str) -> OCIError:
            return OCIError("BAD_REQUEST", f"invalid chunk map: {message}")

        try:
            obj = msgpack.unpackb(data, max_bin_len=32, max_str_len=300, max_array_len=1 << 24,
                                  max_map_len=16)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise bad("not msgpack") from exc
        if not isinstance(obj, dict) or obj.get("v") != _FORMAT_VERSION:
            raise bad("unknown format")
        digest_text, size, chunk_size, chunks = (obj.get(k) for k in ("digest", "size", "chunk_size", "chunks"))
        if not isinstance(digest_text, str) or not isinstance(size, int) or not isinstance(chunk_size, int):
            raise bad("missing fields")
        digest = Digest.parse(digest_text)
        validate_chunk_size(chunk_size)
        if size < 0 or not isinstance(chunks, list) or len(chunks) != chunk_count(size, chunk_size):
            raise bad("chunk count does not match size")
        if not all(isinstance(h, bytes) and len(h) == 32 for h in chunks):
            raise bad("chunk hashes must be 32-byte sha256 digests")
        if expected_digest is not None and digest != expected_digest:
            raise bad("digest mismatch")
        if expected_size is not None and size != expected_size:
            raise bad("size mismatch")
        return cls(digest, size, chunk_size, tuple(chunks))


class ChunkHasher:
    """Builds a chunk map from bytes fed in order, in any piece sizes."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.chunk_size = validate_chunk_size(chunk_size)
        self._hashes: list[bytes] = []
        self._current = hashlib.sha256()
        self._filled = 0
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self.size += len(view)
        while view:
            take = min(len(view), self.chunk_size - self._filled)
            self._current.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self.chunk_size:
                self._hashes.append(self._current.digest())
                self._current = hashlib.sha256()
                self._filled = 0

    def finish(self, digest: Digest) -> ChunkMap:
        hashes = list(self._hashes)
        if self._filled:
            hashes.append(self._current.digest())
        return ChunkMap(digest, self.size, self.chunk_size, tuple(hashes))
