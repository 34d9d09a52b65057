"""The seed's error tree. Third-party exceptions (ldap3, pyjwt, OSError of the state files)
are translated into these where the seed talks to the third party.

Errors that reach a client become OCI error JSON in the registry (``p2pd.oci.errors.OCIError``);
these are the seed's own, raised below the HTTP layer.
"""

from __future__ import annotations

from p2pd.errors import ConfigError

__all__ = [
    "AuditError",
    "AuthError",
    "ConfigError",
    "CredentialsRejected",
    "ProviderUnavailable",
    "SeedError",
    "TokenInvalid",
]


class SeedError(Exception):
    """Base class of every error the seed raises on purpose (``ConfigError`` is shared with p2pd)."""


class AuthError(SeedError):
    """Authentication could not be completed."""


class CredentialsRejected(AuthError):
    """The credentials are wrong, unknown, expired or revoked (answered 401, never more detail)."""


class ProviderUnavailable(AuthError):
    """An identity provider could not be asked (LDAP down, timeout, TLS failure): fail closed."""


class TokenInvalid(AuthError):
    """A bearer token is malformed, forged, expired, or for another service."""


class AuditError(SeedError):
    """The audit log cannot be written or does not verify."""
