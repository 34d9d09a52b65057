"""HTTP Range requests (RFC 9110 section 14) for a single byte range.

Multi-range requests are answered with the whole representation (200), which the RFC allows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import OCIError

__all__ = ["ByteRange", "parse_range", "unsatisfiable"]

_RANGE_RE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def unsatisfiable(size: int) -> OCIError:
    return OCIError("RANGE_INVALID", "requested range not satisfiable", status=416,
                    headers=[("Content-Range", f"bytes */{size}")], detail={"size": size})


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Returns the byte range to send, or None for the whole representation.

    Raises OCIError(416) with ``Content-Range: bytes */size`` when the range cannot be
    satisfied (first byte past the end, or last before first). A syntactically invalid
    header is ignored, as RFC 9110 requires.
    """
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise unsatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if end < start or start >= size:
        raise unsatisfiable(size)
    return ByteRange(start, min(end, size - 1))
