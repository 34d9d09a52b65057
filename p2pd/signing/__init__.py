"""Image signatures, shared by the seed and the agent: GPG simple signing (the registry signature
API extension, as skopeo/podman/CRI-O use it) and cosign, checked against trusted keys by the
``[[signatures]]`` rules.

- ``payload``: the simple-signing document and identity matching (pure).
- ``keys``: trusted public keys (OpenPGP through GnuPG, PEM through ``cryptography``).
- ``openpgp``: ``gpgv`` verification; ``cosign``: cosign's stored signature format (pure).
- ``extension``: the signature API extension's wire format and bounds (pure).
- ``policy``: checks → verdict (pure); ``rules``: ``[[signatures]]``.
- ``verifier``: one signature + keys → a check (fail closed).
"""

from __future__ import annotations

from .errors import SignatureError, SignatureInvalid, VerifierUnavailable
from .extension import ExtensionSignature, parse_extension_signature, parse_signature_list
from .keys import OpenPGPKey, PemKey, TrustedKeys, load_trusted_keys
from .payload import DockerReference, SignedClaim, identity_matches, parse_claim, parse_docker_reference
from .policy import SignatureCheck, SignatureVerdict, decide
from .rules import SignaturePolicy, SignatureRule, from_toml
from .verifier import SignatureVerifier

__all__ = [
    "DockerReference",
    "ExtensionSignature",
    "OpenPGPKey",
    "PemKey",
    "SignatureCheck",
    "SignatureError",
    "SignatureInvalid",
    "SignaturePolicy",
    "SignatureRule",
    "SignatureVerdict",
    "SignatureVerifier",
    "SignedClaim",
    "TrustedKeys",
    "VerifierUnavailable",
    "decide",
    "from_toml",
    "identity_matches",
    "load_trusted_keys",
    "parse_claim",
    "parse_docker_reference",
    "parse_extension_signature",
    "parse_signature_list",
]
