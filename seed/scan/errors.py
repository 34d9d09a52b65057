"""Errors of the vulnerability scanner, below ``seed.errors.SeedError``.

A hostile or broken layer is not an exception that escapes a scan: the scanner turns it into
a ``ScanProblem`` of the report (see ``layers.py``). These exceptions are for what stops a
whole operation: an image that cannot be read at all, a database that cannot be imported.
"""

from __future__ import annotations

from seed.errors import SeedError

__all__ = [
    "DatabaseMissing",
    "InvalidAdvisory",
    "InvalidVersion",
    "LayerRejected",
    "ScanCancelled",
    "ScanError",
    "VulnDBError",
]


class ScanError(SeedError):
    """Base class of the scanner's errors."""


class LayerRejected(ScanError):
    """A layer is refused as a whole (digest mismatch, bomb, corrupt or truncated stream, limits).

    Attributes:
        kind: a short machine-readable name (``digest-mismatch``, ``decompression-bomb``, ...).
        path: the tar entry the problem was found at, when there is one.
    """

    def __init__(self, kind: str, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.path = path


class ScanCancelled(ScanError):
    """The scan was asked to stop (service shutdown) before it finished."""


class InvalidVersion(ScanError, ValueError):
    """A version string is not valid in its ecosystem's syntax, so it cannot be ordered."""


class VulnDBError(ScanError):
    """The vulnerability database cannot be imported or read."""


class DatabaseMissing(VulnDBError):
    """No vulnerability database has been imported yet."""


class InvalidAdvisory(VulnDBError):
    """An OSV record does not have the shape the scanner relies on."""
