"""Signed images in the seed: the registry signature API extension, and the ``[[signatures]]``
pull policy. Verification itself (formats, keys, gpgv, cosign, verdicts, rules) lives in
``p2pd.signing``, shared with the agent, which can enforce the same rules at the node.

- ``store``: the extension's signatures (a ``SignatureStore`` Protocol, files or memory).
- ``service``: ``SignatureService`` (cache, verdicts, audit, subscribers); ``api``: HTTP handlers.
"""

from __future__ import annotations

from .service import SignatureService, VerdictSubscriber
from .store import FileSignatureStore, MemorySignatureStore, SignatureStore, TooManySignatures

__all__ = [
    "FileSignatureStore",
    "MemorySignatureStore",
    "SignatureService",
    "SignatureStore",
    "TooManySignatures",
    "VerdictSubscriber",
]
