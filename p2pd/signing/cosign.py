"""cosign's signature format, read from what is stored in the registry. Pure.

cosign (``cosign sign --key``) stores the signatures of image ``sha256:<hex>`` as an image
manifest tagged ``sha256-<hex>.sig`` in the same repository, or, with OCI 1.1 referrers, as
a manifest whose ``subject`` is the image and whose ``artifactType`` is
``application/vnd.dev.cosign.artifact.sig.v1+json``. Each layer of that manifest is one
signature: the layer blob is the simple-signing payload
(``application/vnd.dev.cosign.simplesigning.v1+json``) and the layer's annotation
``dev.cosignproject.cosign/signature`` is the base64 signature of the payload bytes
(ECDSA P-256 with SHA-256 for cosign's own keys, DER-encoded).

Keyless signatures (a Fulcio certificate and a Rekor bundle in more annotations) are not
verified: the seed trusts configured public keys only.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from p2pd.oci import mediatypes
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from p2pd.oci.manifest import Descriptor, parse_manifest

from .errors import SignatureInvalid
from .payload import MAX_PAYLOAD_SIZE

__all__ = [
    "ARTIFACT_TYPE",
    "MAX_LAYERS",
    "SIGNATURE_ANNOTATION",
    "SIMPLESIGNING_MEDIA_TYPE",
    "CosignLayer",
    "parse_signature_manifest",
    "signature_tag",
]

SIMPLESIGNING_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
ARTIFACT_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"
MAX_LAYERS = 64  # signatures read from one signature manifest
_ATTACHMENT_TAG_RE = re.compile(r"sha(?:256|512)-[0-9a-f]{64,128}\.(?:sig|att|sbom)")
_MAX_SIGNATURE_TEXT = 16 * 1024  # base64 characters of one signature annotation


def is_attachment_tag(tag: str) -> bool:
    """A tag cosign uses for another manifest's attachments (``sha256-<hex>.sig|.att|.sbom``):
    what a client reads to verify, not an image the signature policy applies to."""
    return _ATTACHMENT_TAG_RE.fullmatch(tag) is not None


def signature_tag(digest: Digest) -> str:
    """The tag cosign stores an image's signatures under: ``sha256-<hex>.sig``."""
    return f"{digest.algorithm}-{digest.encoded}.sig"


@dataclass(frozen=True, slots=True)
class CosignLayer:
    """One signature of a signature manifest: its payload blob and the decoded signature,
    or why it cannot be a signature (``error``)."""

    index: int
    payload: Descriptor | None
    signature: bytes = b""
    error: str = ""


def parse_signature_manifest(body: bytes, media_type: str) -> list[CosignLayer]:
    """The signatures a cosign signature manifest carries.

    Raises:
        SignatureInvalid: not an image manifest, or more than ``MAX_LAYERS`` layers.
    """
    if media_type not in mediatypes.IMAGE_TYPES:
        raise SignatureInvalid(f"a cosign signature must be an image manifest, not {media_type[:100]}")
    try:
        parsed = parse_manifest(body, media_type)
    except OCIError as exc:
        raise SignatureInvalid(f"malformed signature manifest: {exc.message}") from None
    layers = parsed.references[1:]  # references are [config, *layers]
    if len(layers) > MAX_LAYERS:
        raise SignatureInvalid(f"the signature manifest has {len(layers)} layers (at most {MAX_LAYERS} are read)")
    if not layers:
        raise SignatureInvalid("the signature manifest has no layers, so no signatures")
    return [_layer(index, layer) for index, layer in enumerate(layers)]


def _layer(index: int, layer: Descriptor) -> CosignLayer:
    if layer.media_type != SIMPLESIGNING_MEDIA_TYPE:
        return CosignLayer(index, None,
                           error=f"layer {index} is {layer.media_type[:100]}, not a simple-signing payload")
    if layer.size > MAX_PAYLOAD_SIZE:
        return CosignLayer(index, layer, error=f"layer {index}'s payload is {layer.size} bytes "
                                               f"(at most {MAX_PAYLOAD_SIZE})")
    text = (layer.annotations or {}).get(SIGNATURE_ANNOTATION)
    if not text:
        return CosignLayer(index, layer, error=f"layer {index} has no {SIGNATURE_ANNOTATION} annotation")
    if len(text) > _MAX_SIGNATURE_TEXT:
        return CosignLayer(index, layer, error=f"layer {index}'s signature annotation is too long")
    try:
        signature = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return CosignLayer(index, layer, error=f"layer {index}'s signature annotation is not base64")
    if not signature:
        return CosignLayer(index, layer, error=f"layer {index}'s signature is empty")
    return CosignLayer(index, layer, signature)

