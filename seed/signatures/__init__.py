"""Signed images (issue 9): the registry signature API extension, GPG simple signing and
cosign verification, and the ``[[signatures]]`` pull policy.

- ``payload``: the simple-signing document and identity matching (pure).
- ``keys``: trusted public keys (OpenPGP through GnuPG, PEM through ``cryptography``).
- ``openpgp``: ``gpgv`` verification; ``cosign``: cosign's stored signature format (pure).
- ``store``: the extension's signatures (a ``SignatureStore`` Protocol, files or memory).
- ``policy``: checks → verdict (pure); ``config``: ``[[signatures]]``.
- ``service``: ``SignatureService`` (cache, verdicts, audit, subscribers); ``api``: HTTP handlers.
"""

from __future__ import annotations

from .config import SignaturePolicy, SignatureRule, from_toml
from .errors import SignatureError, SignatureInvalid, VerifierUnavailable
from .keys import OpenPGPKey, PemKey, TrustedKeys, load_trusted_keys
from .payload import DockerReference, SignedClaim, identity_matches, parse_claim, parse_docker_reference
from .policy import SignatureCheck, SignatureVerdict, decide
from .service import SignatureService, VerdictSubscriber
from .store import ExtensionSignature, FileSignatureStore, MemorySignatureStore, SignatureStore

__all__ = [
    "DockerReference",
    "ExtensionSignature",
    "FileSignatureStore",
    "MemorySignatureStore",
    "OpenPGPKey",
    "PemKey",
    "SignatureCheck",
    "SignatureError",
    "SignatureInvalid",
    "SignaturePolicy",
    "SignatureRule",
    "SignatureService",
    "SignatureStore",
    "SignatureVerdict",
    "SignedClaim",
    "TrustedKeys",
    "VerdictSubscriber",
    "VerifierUnavailable",
    "decide",
    "from_toml",
    "identity_matches",
    "load_trusted_keys",
    "parse_claim",
    "parse_docker_reference",
]
