"""Chunk maps (p2pd.oci.chunkmap): hashing in any piece sizes, encoding, verification. Pure, no I/O."""

from __future__ import annotations

import hashlib
import random

import msgpack
import pytest

from p2pd.oci.chunkmap import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    MIN_CHUNKS,
    SMALLEST_AUTO_CHUNK,
    SPREAD_CHUNK,
    TARGET_CHUNKS,
    ChunkHasher,
    ChunkMap,
    chunk_count,
    chunk_size_for,
    validate_chunk_size,
)
from p2pd.oci.digest import digest_of
from p2pd.oci.errors import OCIError

CHUNK = MIN_CHUNK_SIZE  # 64 KiB keeps the data small


def _direct_hashes(data: bytes, chunk_size: int) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(data[i : i + chunk_size]).digest() for i in range(0, len(data), chunk_size))


def _build(data: bytes, chunk_size: int = CHUNK) -> ChunkMap:
    hasher = ChunkHasher(chunk_size)
    hasher.update(data)
    return hasher.finish(digest_of(data))


def test_validate_chunk_size() -> None:
    assert DEFAULT_CHUNK_SIZE == 1024 * 1024
    for size in (MIN_CHUNK_SIZE, 128 * 1024, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE):
        assert validate_chunk_size(size) == size
    for size in (
        0,
        -1,
        1,
        MIN_CHUNK_SIZE - 1,
        MIN_CHUNK_SIZE // 2,
        MIN_CHUNK_SIZE + 1,
        3 * MIN_CHUNK_SIZE,
        MAX_CHUNK_SIZE * 2,
    ):
        with pytest.raises(OCIError) as info:
            validate_chunk_size(size)
        assert info.value.status == 400


def test_chunk_size_for_a_blob() -> None:
    mib = 1024 * 1024
    # Small blobs are cut into at least MIN_CHUNKS chunks, down to SMALLEST_AUTO_CHUNK; chunks stay
    # at SPREAD_CHUNK until a blob has TARGET_CHUNKS of them; large ones keep the configured size.
    assert [chunk_size_for(size, DEFAULT_CHUNK_SIZE) // 1024 for size in (0, 1, mib, 12 * mib, 16 * mib, 24 * mib,
                                                                           32 * mib, 64 * mib, 128 * mib, 256 * mib,
                                                                           512 * mib, 1024 * mib)] == [
        64, 64, 64, 64, 128, 128, 128, 128, 256, 512, 1024, 1024]
    assert chunk_size_for(4096 * mib, 4 * mib) == 4 * mib
    assert chunk_size_for(12 * mib, MIN_CHUNK_SIZE) == MIN_CHUNK_SIZE  # never above the configured size
    rng = random.Random(3)
    sizes = sorted(rng.randrange(0, 2 * 1024 * mib) for _ in range(300))
    for largest in (MIN_CHUNK_SIZE, SMALLEST_AUTO_CHUNK, DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE):
        chosen = [chunk_size_for(size, largest) for size in sizes]
        assert all(validate_chunk_size(c) == c and c <= largest for c in chosen)
        assert chosen == sorted(chosen)  # a larger blob never gets smaller chunks
        for size, chunk in zip(sizes, chosen, strict=True):
            if SMALLEST_AUTO_CHUNK < chunk < largest:
                least = MIN_CHUNKS if chunk <= SPREAD_CHUNK else TARGET_CHUNKS
                assert least <= chunk_count(size, chunk) <= 2 * TARGET_CHUNKS
    with pytest.raises(OCIError):
        chunk_size_for(mib, 1000)


def test_chunk_count() -> None:
    assert chunk_count(0, CHUNK) == 0
    assert chunk_count(1, CHUNK) == 1
    assert chunk_count(CHUNK, CHUNK) == 1
    assert chunk_count(CHUNK + 1, CHUNK) == 2
    assert chunk_count(10 * CHUNK, CHUNK) == 10


@pytest.mark.parametrize("seed", range(12))
def test_random_piece_sizes_match_direct_hashing(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, rng.randrange(0, 6 * CHUNK)])
    data = rng.randbytes(size)
    hasher = ChunkHasher(CHUNK)
    offset = 0
    while offset < size:
        piece = rng.choice([1, 7, 4096, CHUNK - 3, CHUNK, CHUNK + 5, 2 * CHUNK + 1, rng.randrange(1, 3 * CHUNK)])
        chunk = data[offset : offset + piece]
        hasher.update(memoryview(chunk) if rng.random() < 0.5 else chunk)
        offset += piece
    hasher.update(b"")  # empty updates are harmless
    chunk_map = hasher.finish(digest_of(data))
    assert chunk_map.size == size
    assert chunk_map.chunk_size == CHUNK
    assert chunk_map.hashes == _direct_hashes(data, CHUNK)
    assert len(chunk_map.hashes) == chunk_count(size, CHUNK)
    for index in range(len(chunk_map.hashes)):
        offset, length = chunk_map.chunk_bounds(index)
        assert chunk_map.verify_chunk(index, data[offset : offset + length])


def test_encode_decode_round_trip() -> None:
    data = random.Random(1).randbytes(3 * CHUNK + 123)
    chunk_map = _build(data)
    encoded = chunk_map.encode()
    decoded = ChunkMap.decode(encoded, expected_digest=digest_of(data), expected_size=len(data))
    assert decoded == chunk_map
    assert ChunkMap.decode(encoded) == chunk_map
    empty = _build(b"")
    assert empty.hashes == ()
    assert ChunkMap.decode(empty.encode(), expected_size=0) == empty


def test_verify_chunk() -> None:
    data = random.Random(2).randbytes(2 * CHUNK + 10)
    chunk_map = _build(data)
    assert chunk_map.chunk_bounds(0) == (0, CHUNK)
    assert chunk_map.chunk_bounds(2) == (2 * CHUNK, 10)
    assert chunk_map.verify_chunk(0, data[:CHUNK])
    assert chunk_map.verify_chunk(1, memoryview(data)[CHUNK : 2 * CHUNK])
    assert chunk_map.verify_chunk(2, data[2 * CHUNK :])
    assert not chunk_map.verify_chunk(1, data[:CHUNK])  # the right length, the wrong chunk
    tampered = bytearray(data[:CHUNK])
    tampered[100] ^= 1
    assert not chunk_map.verify_chunk(0, bytes(tampered))
    assert not chunk_map.verify_chunk(0, data[: CHUNK - 1])  # short
    assert not chunk_map.verify_chunk(2, data[2 * CHUNK :] + b"x")  # long
    assert not chunk_map.verify_chunk(3, b"")  # past the end
    assert not chunk_map.verify_chunk(-1, data[2 * CHUNK :])


def _fields(chunk_map: ChunkMap) -> dict[str, object]:
    return msgpack.unpackb(chunk_map.encode())


def _decode_error(obj: object) -> OCIError:
    with pytest.raises(OCIError) as info:
        ChunkMap.decode(msgpack.packb(obj))
    return info.value


def test_decode_rejects_expected_mismatch() -> None:
    data = random.Random(3).randbytes(CHUNK + 1)
    encoded = _build(data).encode()
    with pytest.raises(OCIError, match="digest mismatch"):
        ChunkMap.decode(encoded, expected_digest=digest_of(b"another blob"))
    with pytest.raises(OCIError, match="size mismatch"):
        ChunkMap.decode(encoded, expected_size=len(data) + 1)


def test_decode_rejects_tampered_maps() -> None:
    data = random.Random(4).randbytes(2 * CHUNK + 5)
    good = _fields(_build(data))

    for changes in (
        {"v": 2},
        {"v": None},
        {"digest": None},
        {"digest": 5},
        {"size": "1"},
        {"size": -1},
        {"size": len(data) + CHUNK},  # one chunk more than listed
        {"size": CHUNK},  # fewer chunks than listed
        {"chunk_size": 1000},  # not a power of two
        {"chunk_size": None},
        {"chunks": None},
        {"chunks": good["chunks"][:-1]},  # type: ignore[index]
        {"chunks": [*good["chunks"], b"\0" * 32]},  # type: ignore[misc]
        {"chunks": [b"\0" * 31, *good["chunks"][1:]]},  # type: ignore[index]
        {"chunks": ["x" * 32, *good["chunks"][1:]]},  # type: ignore[index]
    ):
        error = _decode_error({**good, **changes})
        assert error.code == "BAD_REQUEST", changes
        assert error.status == 400

    bad_digest = {**good, "digest": "sha256:" + "Z" * 64}
    with pytest.raises(OCIError) as info:
        ChunkMap.decode(msgpack.packb(bad_digest))
    assert info.value.status == 400

    for blob in (
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgpack.packb([1, 2, 3]),
        msgpack.packb(good) + b"x",
        msgpack.packb("string"),
    ):
        with pytest.raises(OCIError) as info:
            ChunkMap.decode(blob)
        assert info.value.status == 400


def test_tampered_hash_fails_verification_not_decode() -> None:
    # A map whose shape is right but whose hashes lie still decodes; verify_chunk catches it.
    data = random.Random(5).randbytes(2 * CHUNK)
    fields = _fields(_build(data))
    chunks = list(fields["chunks"])  # type: ignore[call-overload]
    chunks[1] = hashlib.sha256(b"evil").digest()
    lying = ChunkMap.decode(msgpack.packb({**fields, "chunks": chunks}))
    assert lying.verify_chunk(0, data[:CHUNK])
    assert not lying.verify_chunk(1, data[CHUNK:])
