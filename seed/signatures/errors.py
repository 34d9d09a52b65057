"""Errors of signature storage and verification (part of the seed's error tree)."""

from __future__ import annotations

from ..errors import SeedError

__all__ = ["SignatureError", "SignatureInvalid", "VerifierUnavailable"]


class SignatureError(SeedError):
    """Base class of the signature errors."""


class SignatureInvalid(SignatureError):
    """A signature is malformed, does not verify, or claims something else (the message says what)."""


class VerifierUnavailable(SignatureError):
    """The verifier could not run (``gpgv`` missing or killed): fail closed, never as a valid signature."""
