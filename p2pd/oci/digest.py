"""Content digests: parsing, and incremental verification of untrusted bytes.

Rules: a digest is ``algorithm:encoded`` with lower-case hex only; untrusted content is
checked by size first (cheap, and it bounds the work) and then by hash.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .errors import OCIError

__all__ = ["Digest", "DigestVerifier", "digest_of"]

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_HEX_RE = re.compile(r"[a-f0-9]+")


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    encoded: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parses ``sha256:<64 hex>`` or ``sha512:<128 hex>``; raises DIGEST_INVALID."""
        match = _DIGEST_RE.fullmatch(text) if len(text) <= 200 else None
        if match is None:
            raise OCIError("DIGEST_INVALID", "invalid digest", detail={"digest": text[:200]})
        algorithm, encoded = match.groups()
        length = _ALGORITHMS.get(algorithm)
        if length is None:
            raise OCIError("UNSUPPORTED", "unsupported digest algorithm", status=400,
                           detail={"digest": text[:200]})
        if len(encoded) != length or _HEX_RE.fullmatch(encoded) is None:
            raise OCIError("DIGEST_INVALID", "invalid digest", detail={"digest": text[:200]})
        return cls(algorithm, encoded)

    @classmethod
    def is_valid(cls, text: str) -> bool:
        try:
            cls.parse(text)
        except OCIError:
            return False
        return True

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


class DigestVerifier:
    """Hashes bytes as they arrive and checks them against an expected digest and size.

    ``update`` raises SIZE_INVALID as soon as more bytes arrive than ``expected_size``
    allows, so a lying source is cut off early; ``verify`` checks the final size and hash.
    """

    def __init__(self, expected: Digest | None = None, expected_size: int | None = None,
                 algorithm: str = "sha256") -> None:
        self.expected = expected
        self.expected_size = expected_size
        self._hash = hashlib.new(expected.algorithm if expected else algorithm)
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        if self.expected_size is not None and self.size > self.expected_size:
            raise OCIError("SIZE_INVALID", "more bytes than the expected size",
                           detail={"expected": self.expected_size, "received": self.size})
        self._hash.update(data)

    def digest(self) -> Digest:
        return Digest(self._hash.name, self._hash.hexdigest())

    def verify(self, expected: Digest | None = None) -> Digest:
        """Returns the computed digest or raises SIZE_INVALID / DIGEST_INVALID."""
        expected = expected or self.expected
        if self.expected_size is not None and self.size != self.expected_size:
            raise OCIError("SIZE_INVALID", "size does not match",
                           detail={"expected": self.expected_size, "received": self.size})
        actual = self.digest()
        if expected is not None and actual != expected:
            raise OCIError("DIGEST_INVALID", "content does not match digest",
                           detail={"expected": str(expected), "actual": str(actual)})
        return actual
