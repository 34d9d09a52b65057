"""Signed images in the seed: the registry signature API extension, and the ``[[signatures]]``
pull policy. Verification itself (formats, keys, gpgv, cosign, verdicts, rules) lives in
``p2pd.signing``, shared with the agent, which can enforce the same rules at the node.

- ``store``: the extension's signatures (a ``SignatureStore`` Protocol, files or memory).
- ``service``: ``SignatureService`` (cache, verdicts, audit, subscribers); ``api``: HTTP handlers.
"""

from __future__ import annotations

from p2pd.signing import (
    DockerReference,
    ExtensionSignature,
    OpenPGPKey,
    PemKey,
    SignatureCheck,
    SignatureError,
    SignatureInvalid,
    SignaturePolicy,
    SignatureRule,
    SignatureVerdict,
    SignedClaim,
    TrustedKeys,
    VerifierUnavailable,
    decide,
    from_toml,
    identity_matches,
    load_trusted_keys,
    parse_claim,
    parse_docker_reference,
)

from .service import SignatureService, VerdictSubscriber
from .store import FileSignatureStore, MemorySignatureStore, SignatureStore

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
