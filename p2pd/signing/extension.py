"""The registry signature API extension's wire format (what skopeo, podman and CRI-O use when
``/v2/`` answers ``X-Registry-Supports-Signatures: 1``), shared by the seed that stores
signatures and the agent that reads them through.

One signature is the JSON object clients PUT::

    {"schemaVersion": 2, "name": "sha256:<manifest hex>@<32 hex>", "type": "atomic",
     "content": "<base64 of the binary OpenPGP message>"}

and ``GET /extensions/v2/<name>/signatures/<digest>`` returns ``{"signatures": [...]}``.
Bounded: ``MAX_SIGNATURE_BYTES`` of content each, ``MAX_SIGNATURES`` per manifest, which keeps
a whole list under containers/image's 4 MiB read limit (``MAX_LIST_BYTES``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from p2pd.oci.digest import Digest

from .errors import SignatureInvalid

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_LIST_BYTES",
    "MAX_SIGNATURES",
    "MAX_SIGNATURE_BYTES",
    "SIGNATURE_NAME_RE",
    "SUPPORTS_SIGNATURES_HEADER",
    "ExtensionSignature",
    "parse_extension_signature",
    "parse_signature_list",
]

# What containers/image looks for in the /v2/ answer before it uses the extension.
SUPPORTS_SIGNATURES_HEADER = ("X-Registry-Supports-Signatures", "1")
MAX_SIGNATURE_BYTES = 64 * 1024  # decoded content of one signature
MAX_SIGNATURES = 40  # per manifest: 40 x ~88 KiB of base64 stays under clients' 4 MiB list limit
MAX_BODY_BYTES = 96 * 1024  # one PUT body: base64 of MAX_SIGNATURE_BYTES plus the JSON around it
SIGNATURE_TYPE = "atomic"
SIGNATURE_NAME_RE = re.compile(r"(?P<digest>sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})@(?P<suffix>[0-9a-f]{32})")


@dataclass(frozen=True, slots=True)
class ExtensionSignature:
    """One signature of the extension: ``name`` is ``<manifest digest>@<32 hex>``."""

    name: str
    content: bytes

    @property
    def suffix(self) -> str:
        return self.name.rsplit("@", 1)[1]

    def to_json(self) -> dict[str, object]:
        return {"schemaVersion": 2, "name": self.name, "type": SIGNATURE_TYPE,
                "content": base64.b64encode(self.content).decode("ascii")}


def parse_extension_signature(body: bytes, digest: Digest) -> ExtensionSignature:
    """Checks a PUT body for the signatures of manifest ``digest``.

    Raises:
        SignatureInvalid: not the extension's JSON object, a name for another manifest, a
            type other than ``atomic``, content that is not base64, empty or too large.
    """
    if len(body) > MAX_BODY_BYTES:
        raise SignatureInvalid(f"a signature body is at most {MAX_BODY_BYTES} bytes")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise SignatureInvalid("the signature is not JSON") from None
    if not isinstance(document, dict):
        raise SignatureInvalid("the signature must be a JSON object")
    unknown = sorted(set(document) - {"schemaVersion", "name", "type", "content"})
    if unknown:
        raise SignatureInvalid(f"unknown members in the signature: {', '.join(unknown)[:200]}")
    if document.get("schemaVersion") != 2:
        raise SignatureInvalid("schemaVersion must be 2")
    if document.get("type") != SIGNATURE_TYPE:
        raise SignatureInvalid(f"type must be {SIGNATURE_TYPE!r} (simple signing)")
    name = document.get("name")
    match = SIGNATURE_NAME_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise SignatureInvalid("name must be '<manifest digest>@<32 hex characters>'")
    if match.group("digest") != str(digest):
        raise SignatureInvalid("the signature's name is for another manifest than the URL's digest")
    content = document.get("content")
    if not isinstance(content, str) or not content:
        raise SignatureInvalid("content must be the base64 of the signature")
    try:
        raw = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureInvalid("content is not valid base64") from None
    if len(raw) > MAX_SIGNATURE_BYTES:
        raise SignatureInvalid(f"a signature is at most {MAX_SIGNATURE_BYTES} bytes")
    if not raw:
        raise SignatureInvalid("the signature is empty")
    return ExtensionSignature(str(name), raw)


MAX_LIST_BYTES = 4 * 1024 * 1024  # a GET answer: what containers/image itself accepts


def parse_signature_list(body: bytes, digest: Digest) -> list[ExtensionSignature]:
    """Checks a ``GET`` answer (``{"signatures": [...]}``) for manifest ``digest``: every entry
    as strictly as a PUT, at most ``MAX_SIGNATURES``.

    Raises:
        SignatureInvalid: the answer is not the extension's list, or one entry is invalid.
    """
    if len(body) > MAX_LIST_BYTES:
        raise SignatureInvalid(f"a signature list is at most {MAX_LIST_BYTES} bytes")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise SignatureInvalid("the signature list is not JSON") from None
    entries = document.get("signatures") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise SignatureInvalid('the signature list must be {"signatures": [...]}')
    if len(entries) > MAX_SIGNATURES:
        raise SignatureInvalid(f"more than {MAX_SIGNATURES} signatures for one manifest")
    return [parse_extension_signature(json.dumps(entry).encode(), digest) for entry in entries]
