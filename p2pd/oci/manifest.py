"""Validation of pushed manifests and indexes, and the referrers index.

A registry stores the exact bytes it was given, so this module only checks them and
extracts what storage needs (referenced descriptors, subject, artifact type); it never
re-serialises a manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from . import mediatypes
from .digest import Digest, digest_of
from .errors import OCIError

__all__ = [
    "MAX_DESCRIPTORS",
    "MAX_MANIFEST_SIZE",
    "Descriptor",
    "ParsedManifest",
    "parse_manifest",
    "referrers_index",
]

MAX_MANIFEST_SIZE = 4 * 1024 * 1024
MAX_DESCRIPTORS = 10_000


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    media_type: str
    digest: Digest
    size: int
    is_index: bool
    # Blobs (image manifest) or manifests (index) that must exist before this is accepted.
    references: tuple[Descriptor, ...]
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    def as_referrer(self) -> Descriptor:
        """The descriptor that the subject's referrers list shows for this manifest."""
        return Descriptor(self.media_type, self.digest, self.size, self.artifact_type,
                          self.annotations or None)


def _invalid(message: str, **detail: Any) -> OCIError:
    return OCIError("MANIFEST_INVALID", message, detail=detail or None)


def _bare_media_type(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def _annotations(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        raise _invalid(f"{where}: annotations must map strings to strings")
    return value


def _descriptor(value: Any, where: str) -> Descriptor:
    if not isinstance(value, dict):
        raise _invalid(f"{where}: descriptor must be an object")
    media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{where}: mediaType missing")
    if not isinstance(digest, str):
        raise _invalid(f"{where}: digest missing")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}: size must be a non-negative integer")
    try:
        parsed = Digest.parse(digest)
    except OCIError as exc:
        raise _invalid(f"{where}: invalid digest", digest=digest[:200]) from exc
    artifact_type = value.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid(f"{where}: artifactType must be a string")
    return Descriptor(media_type, parsed, size, artifact_type, _annotations(value.get("annotations"), where)
                      or None)


def _descriptor_list(value: Any, where: str) -> list[Descriptor]:
    if not isinstance(value, list):
        raise _invalid(f"{where} must be a list")
    if len(value) > MAX_DESCRIPTORS:
        raise _invalid(f"{where} has too many entries", limit=MAX_DESCRIPTORS)
    return [_descriptor(item, f"{where}[{i}]") for i, item in enumerate(value)]


def parse_manifest(body: bytes, content_type: str | None) -> ParsedManifest:
    """Checks a pushed manifest and returns what storage needs to know about it.

    Args:
        body: the exact bytes of the request body.
        content_type: the request's Content-Type header.

    Raises:
        OCIError: 413 SIZE_INVALID when over 4 MiB; MANIFEST_INVALID for bad JSON, a
            mediaType that disagrees with Content-Type (CVE-2021-41190), an index with
            ``config``/``layers``, an image manifest with ``manifests``, or bad descriptors.
    """
    if len(body) > MAX_MANIFEST_SIZE:
        raise OCIError("SIZE_INVALID", "manifest too large", status=413,
                       detail={"limit": MAX_MANIFEST_SIZE, "size": len(body)})
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise _invalid("manifest is not valid JSON") from exc
    if not isinstance(document, dict):
        raise _invalid("manifest must be a JSON object")
    if document.get("schemaVersion") != 2:
        raise _invalid("schemaVersion must be 2")

    declared = document.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise _invalid("mediaType must be a string")
    header_type = _bare_media_type(content_type)
    if declared and header_type and header_type != declared:
        raise _invalid("mediaType does not match Content-Type", mediaType=declared, contentType=header_type)
    media_type = declared or header_type
    if media_type is None:
        # Neither said what this is: infer the way the OCI image spec allows.
        media_type = mediatypes.OCI_INDEX if "manifests" in document else mediatypes.OCI_MANIFEST
    if media_type not in mediatypes.MANIFEST_TYPES:
        raise _invalid("unsupported manifest media type", mediaType=media_type)

    is_index = media_type in mediatypes.INDEX_TYPES
    artifact_type = document.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType must be a string")

    if is_index:
        if "config" in document or "layers" in document:
            raise _invalid("an index must not contain config or layers")
        references = _descriptor_list(document.get("manifests", []), "manifests")
    else:
        if "manifests" in document:
            raise _invalid("an image manifest must not contain manifests")
        config = _descriptor(document.get("config"), "config")
        layers = _descriptor_list(document.get("layers", []), "layers")
        references = [config, *layers]
        if artifact_type is None:
            # distribution-spec 1.1, listing referrers: without an artifactType, a referrer's
            # artifactType is its config's mediaType (whatever that type is).
            artifact_type = config.media_type

    subject = None
    if document.get("subject") is not None:
        subject = _descriptor(document["subject"], "subject")

    return ParsedManifest(
        media_type=media_type,
        digest=digest_of(body),
        size=len(body),
        is_index=is_index,
        references=tuple(references),
        subject=subject,
        artifact_type=artifact_type,
        annotations=_annotations(document.get("annotations"), "manifest"),
    )


def referrers_index(referrers: list[Descriptor], artifact_type: str | None = None) -> bytes:
    """The image index that ``GET /v2/<name>/referrers/<digest>`` returns."""
    selected = [d for d in referrers if artifact_type is None or d.artifact_type == artifact_type]
    document = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_INDEX,
        "manifests": [d.to_json() for d in selected],
    }
    return json.dumps(document, separators=(",", ":")).encode()
