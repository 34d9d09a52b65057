"""The agent's error tree. Third-party exceptions (httpx, OSError from the store) are
translated into these at the module that talks to the third party.

Remote errors mean another party misbehaved or is unreachable (an upstream registry, later
a peer); local errors are our own (configuration, storage).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "P2PDError",
    "RemoteError",
    "StoreError",
    "UpstreamAuthError",
    "UpstreamError",
    "UpstreamNotFound",
    "UpstreamUnavailable",
    "VerificationError",
]


class P2PDError(Exception):
    """Base class of every error the agent raises on purpose."""


class ConfigError(P2PDError):
    """The configuration file or flags are invalid."""


class StoreError(P2PDError):
    """The local store cannot do what was asked (disk full, corrupt state)."""


class RemoteError(P2PDError):
    """Another party (upstream registry or peer) failed or misbehaved."""


class UpstreamError(RemoteError):
    """An upstream registry request failed.

    Attributes:
        status: the HTTP status, when there was a response.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UpstreamNotFound(UpstreamError):
    """The upstream says the manifest, tag or blob does not exist (404)."""


class UpstreamAuthError(UpstreamError):
    """The upstream refused our credentials or token (401/403 after authenticating)."""


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached, timed out, or answered 5xx/429: try later."""


class VerificationError(RemoteError):
    """Bytes from a remote source do not match their digest, size or chunk map."""
