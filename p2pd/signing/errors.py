"""Errors of signature verification (part of p2pd's error tree; the seed uses them too)."""

from __future__ import annotations

from ..errors import P2PDError

__all__ = ["SignatureError", "SignatureInvalid", "VerifierUnavailable"]


class SignatureError(P2PDError):
    """Base class of the signature errors."""


class SignatureInvalid(SignatureError):
    """A signature is malformed, does not verify, or claims something else (the message says what)."""


class VerifierUnavailable(SignatureError):
    """The verifier could not run (``gpgv`` missing or killed): fail closed, never as a valid signature."""
