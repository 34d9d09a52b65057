"""OCI 1.1 referrer artifacts for scan results: the SBOM of each platform and the report.

An artifact is an image manifest with an ``artifactType``, the empty config descriptor, one
layer holding the document and a ``subject`` naming the scanned manifest, so any client that
lists referrers (``oras discover``, cosign, the seed's referrers API) finds it. Building is
pure; ``store_artifact`` and ``replace_attachments`` write through ``seed.storage.Storage``.
"""

from __future__ import annotations

import base64
import datetime
import json
from dataclasses import dataclass

from p2pd.oci import mediatypes
from p2pd.oci.digest import Digest, digest_of
from p2pd.oci.errors import OCIError
from p2pd.oci.manifest import Descriptor, parse_manifest
from seed.storage import Storage

from .sbom import SBOM_MEDIA_TYPE, build_sbom
from .scanner import ScanReport

__all__ = [
    "EMPTY_CONFIG_MEDIA_TYPE",
    "KIND_ANNOTATION",
    "REPORT_ARTIFACT_TYPE",
    "ReferrerArtifact",
    "build_attachments",
    "build_referrer",
    "replace_attachments",
    "store_artifact",
]

EMPTY_CONFIG_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
_EMPTY_CONFIG = b"{}"
REPORT_ARTIFACT_TYPE = "application/vnd.p2pd.scan-report.v1+json"
KIND_ANNOTATION = "io.p2pd.scan.kind"  # "sbom" or "report": which earlier attachment a new one replaces
_CREATED_ANNOTATION = "org.opencontainers.image.created"


@dataclass(frozen=True)
class ReferrerArtifact:
    """A referrer manifest and the blobs it needs, ready to store."""

    kind: str
    subject: Descriptor
    artifact_type: str
    manifest: bytes
    digest: Digest
    blobs: tuple[tuple[Digest, bytes], ...]


def build_referrer(subject: Descriptor, artifact_type: str, document: bytes, *, kind: str,
                   created: float) -> ReferrerArtifact:
    """An OCI 1.1 artifact manifest carrying ``document`` and pointing at ``subject``."""
    empty = digest_of(_EMPTY_CONFIG)
    layer = digest_of(document)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_CONFIG_MEDIA_TYPE, "digest": str(empty), "size": len(_EMPTY_CONFIG),
                   "data": base64.b64encode(_EMPTY_CONFIG).decode()},
        "layers": [{"mediaType": artifact_type, "digest": str(layer), "size": len(document)}],
        "subject": subject.to_json(),
        "annotations": {
            KIND_ANNOTATION: kind,
            _CREATED_ANNOTATION: datetime.datetime.fromtimestamp(created, datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%SZ"),
        },
    }
    body = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    return ReferrerArtifact(kind, subject, artifact_type, body, digest_of(body),
                            ((empty, _EMPTY_CONFIG), (layer, document)))


def build_attachments(report: ScanReport) -> list[ReferrerArtifact]:
    """An SBOM referrer for each scanned platform manifest, and the report for the scanned manifest."""
    artifacts = []
    for platform in report.platforms:
        if platform.problems and any(p.kind == "manifest-unknown" for p in platform.problems):
            continue
        subject = Descriptor(platform.manifest_media_type, Digest.parse(platform.manifest_digest),
                             platform.manifest_size)
        artifacts.append(build_referrer(subject, SBOM_MEDIA_TYPE, build_sbom(report, platform), kind="sbom",
                                        created=report.scanned_at))
    subject = Descriptor(report.media_type, Digest.parse(report.digest), report.size)
    artifacts.append(build_referrer(subject, REPORT_ARTIFACT_TYPE, report.to_bytes(), kind="report",
                                    created=report.scanned_at))
    return artifacts


def store_artifact(storage: Storage, repository: str, artifact: ReferrerArtifact) -> None:
    """Stores the blobs and the manifest (untagged) of ``artifact`` in ``repository``. Blocking."""
    for digest, data in artifact.blobs:
        storage.store_blob_bytes(repository, data, digest)
    storage.put_manifest(repository, artifact.manifest, parse_manifest(artifact.manifest, mediatypes.OCI_MANIFEST),
                         None)


def replace_attachments(storage: Storage, repository: str, artifacts: list[ReferrerArtifact]) -> list[Digest]:
    """Stores ``artifacts`` and deletes the earlier ones of the same kind on the same subject.

    Returns the digests of the referrer manifests removed. Blocking.
    """
    removed: list[Digest] = []
    for artifact in artifacts:
        store_artifact(storage, repository, artifact)
        for existing in storage.referrers(repository, artifact.subject.digest):
            annotations = existing.annotations or {}
            if existing.digest != artifact.digest and annotations.get(KIND_ANNOTATION) == artifact.kind \
                    and existing.artifact_type == artifact.artifact_type:
                try:
                    storage.delete_manifest(repository, existing.digest)
                except OCIError:
                    continue  # deleted meanwhile
                removed.append(existing.digest)
    return removed
