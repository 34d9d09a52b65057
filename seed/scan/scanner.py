"""Scanning one stored image: walk its layers, list its packages, match them. Blocking.

``scan_image`` reads a manifest (an image, or each platform of an index) from the seed's
``Storage``, applies its layers with ``ImageFilesystem``, reads the inventory and matches it
against the ``VulnDatabase``. It never raises for what is wrong with an image's content:
unreadable or hostile layers become problems of the report. It raises for what makes the
scan itself impossible (the manifest is unknown) and for cancellation.

``rematch`` recomputes the findings of a stored report against a new database without
reading any layer again; that is how a database import is followed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from p2pd.oci import mediatypes
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from seed.storage import Storage

from .config import SEVERITIES, LayerLimits
from .errors import DatabaseMissing, ScanError
from .layers import ImageFilesystem, ScanProblem, is_layer_media_type
from .packages import Distro, Package, PackageFileSelector, inventory
from .vulndb import DatabaseStatus, Finding, VulnDatabase

__all__ = ["IMAGE_CONFIG_TYPES", "REPORT_FORMAT", "PlatformReport", "ScanReport", "is_container_image", "rematch",
           "scan_image"]

REPORT_FORMAT = "p2pd.scan.v1"
_MAX_CONFIG_SIZE = 4 * 1024 * 1024
_MAX_INDEX_DEPTH = 2
_ATTESTATION_ANNOTATION = "vnd.docker.reference.type"
IMAGE_CONFIG_TYPES = frozenset({"application/vnd.oci.image.config.v1+json",
                                "application/vnd.docker.container.image.v1+json"})


def is_container_image(document: Any) -> bool:
    """Whether a parsed image manifest is a container image (not an artifact such as an SBOM,
    a signature or a Helm chart): no ``artifactType`` and an image config."""
    if not isinstance(document, dict) or document.get("artifactType"):
        return False
    config = document.get("config")
    return isinstance(config, dict) and config.get("mediaType") in IMAGE_CONFIG_TYPES


@dataclass
class PlatformReport:
    """The scan of one image manifest (one platform of an index, or the image itself)."""

    manifest_digest: str
    manifest_media_type: str
    manifest_size: int
    platform: str | None
    distro: Distro | None
    layers: list[str]
    packages: list[Package] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": {"digest": self.manifest_digest, "mediaType": self.manifest_media_type,
                         "size": self.manifest_size},
            "platform": self.platform,
            "distro": self.distro.to_json() if self.distro is not None else None,
            "layers": self.layers,
            "packages": [p.to_json() for p in self.packages],
            "findings": [f.to_json() for f in self.findings],
            "problems": [p.to_json() for p in self.problems],
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> PlatformReport:
        manifest = document["manifest"]
        return cls(str(manifest["digest"]), str(manifest["mediaType"]), int(manifest["size"]),
                   document.get("platform"),
                   Distro.from_json(document["distro"]) if document.get("distro") else None,
                   [str(layer) for layer in document.get("layers", [])],
                   [Package.from_json(p) for p in document.get("packages", [])],
                   [Finding.from_json(f) for f in document.get("findings", [])],
                   [ScanProblem.from_json(p) for p in document.get("problems", [])])


@dataclass
class ScanReport:
    """The scan of a manifest as pushed: an image, or an index and each of its platforms.

    Attributes:
        status: ``complete``; ``incomplete`` when a layer or manifest could not be read (its
            packages are missing); ``unmatched`` when no vulnerability database was loaded.
        database: the import the findings come from (id and time), or None.
    """

    repository: str
    digest: str
    media_type: str
    size: int
    scanned_at: float
    duration: float
    database: dict[str, Any] | None
    platforms: list[PlatformReport]
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if any(problem.fatal for platform in self.platforms for problem in platform.problems):
            return "incomplete"
        if self.database is None:
            return "unmatched"
        return "complete"

    @property
    def findings(self) -> list[tuple[PlatformReport, Finding]]:
        return [(platform, finding) for platform in self.platforms for finding in platform.findings]

    @property
    def problems(self) -> list[ScanProblem]:
        return [problem for platform in self.platforms for problem in platform.problems]

    def severity_counts(self) -> dict[str, int]:
        """Distinct (advisory, package) findings per severity, over all platforms."""
        counts = dict.fromkeys(SEVERITIES, 0)
        seen: set[tuple[str, str, str]] = set()
        for _platform, finding in self.findings:
            key = (finding.id, finding.package, finding.installed_version)
            if key not in seen:
                seen.add(key)
                counts[finding.severity if finding.severity in counts else "unknown"] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        """The report as the API and ``seed scan --format json`` return it."""
        findings = []
        for platform, finding in self.findings:
            entry = finding.to_json()
            entry["platform"] = platform.platform
            entry["manifest"] = platform.manifest_digest
            findings.append(entry)
        return {
            "format": REPORT_FORMAT,
            "repository": self.repository,
            "digest": self.digest,
            "mediaType": self.media_type,
            "size": self.size,
            "status": self.status,
            "scanned_at": self.scanned_at,
            "duration": round(self.duration, 6),
            "database": self.database,
            "summary": self.severity_counts(),
            "findings": findings,
            "problems": [p.to_json() for p in self.problems],
            "notes": self.notes,
            "platforms": [p.to_json() for p in self.platforms],
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=1, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ScanReport:
        if document.get("format") != REPORT_FORMAT:
            raise ValueError(f"not a {REPORT_FORMAT} report")
        return cls(str(document["repository"]), str(document["digest"]), str(document["mediaType"]),
                   int(document["size"]), float(document["scanned_at"]), float(document["duration"]),
                   document.get("database"), [PlatformReport.from_json(p) for p in document["platforms"]],
                   [str(n) for n in document.get("notes", [])])


def _database_summary(status: DatabaseStatus) -> dict[str, Any]:
    return {"import_id": status.import_id, "imported_at": status.imported_at, "advisories": status.advisories}


def _match(platform: PlatformReport, database: VulnDatabase | None, notes: list[str]) -> dict[str, Any] | None:
    """Fills ``platform.findings``; returns the database summary, or None without a database."""
    if database is None:
        return None
    try:
        status = database.status()
        result = database.match(platform.packages, platform.distro)
    except DatabaseMissing:
        return None
    platform.findings = result.findings
    for reason in result.unmatched_reasons:
        if reason not in notes:
            notes.append(reason)
    return _database_summary(status)


def rematch(report: ScanReport, database: VulnDatabase) -> ScanReport:
    """The report with its findings recomputed from its stored packages against ``database``."""
    notes: list[str] = []
    platforms = [replace(p, findings=[]) for p in report.platforms]
    summary = None
    for platform in platforms:
        summary = _match(platform, database, notes) or summary
    return replace(report, platforms=platforms, database=summary, notes=notes)


def _platform_string(platform: Any) -> str | None:
    if not isinstance(platform, dict) or not isinstance(platform.get("os"), str):
        return None
    text = f"{platform['os']}/{platform.get('architecture', '')}"
    if platform.get("variant"):
        text += f"/{platform['variant']}"
    return text


def _read_blob(storage: Storage, repository: str, digest: Digest, limit: int) -> bytes:
    fd, size = storage.open_blob(repository, digest)
    with os.fdopen(fd, "rb") as handle:
        if size > limit:
            raise ScanError(f"blob {digest} is larger than {limit} bytes")
        return handle.read(limit)


def scan_image(storage: Storage, repository: str, manifest_digest: Digest | str, *,
               database: VulnDatabase | None, limits: LayerLimits | None = None,
               progress: Callable[[int], None] | None = None, now: float | None = None) -> ScanReport:
    """Scans a stored manifest (image or index) of ``repository``.

    Args:
        storage: the seed's storage.
        repository: the repository the manifest belongs to (blobs are read through it).
        manifest_digest: the manifest to scan (a tag must be resolved by the caller).
        database: the vulnerability database, or None for an inventory without findings.
        limits: bounds on the work per layer.
        progress: called with compressed bytes read as layers stream (the service paces
            itself there and raises ``ScanCancelled`` to stop).
        now: the scan time to record.

    Raises:
        ScanError: the manifest is unknown or not a manifest.
        ScanCancelled: from ``progress``.
    """
    started = time.monotonic()
    digest = manifest_digest if isinstance(manifest_digest, Digest) else Digest.parse(manifest_digest)
    limits = limits or LayerLimits()
    try:
        stored, body = storage.get_manifest(repository, str(digest))
    except OCIError as exc:
        raise ScanError(f"{repository}@{digest}: {exc.message}") from exc
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ScanError(f"{repository}@{digest}: the manifest is not JSON") from exc
    if not isinstance(document, dict):
        raise ScanError(f"{repository}@{digest}: the manifest is not a JSON object")
    report = ScanReport(repository, str(digest), stored.media_type, stored.size,
                        time.time() if now is None else now, 0.0, None, [])
    if stored.media_type in mediatypes.INDEX_TYPES:
        _scan_index(storage, repository, document, report, limits, progress, depth=1)
    elif is_container_image(document):
        report.platforms.append(_scan_manifest(storage, repository, str(digest), stored.media_type, stored.size,
                                               document, None, limits, progress))
    else:
        report.notes.append("not a container image (an artifact): nothing to scan")
    for platform in report.platforms:
        report.database = _match(platform, database, report.notes) or report.database
    if database is None or report.database is None:
        report.notes.append("no vulnerability database is loaded: packages are listed, not matched")
    report.duration = time.monotonic() - started
    return report


def _scan_index(storage: Storage, repository: str, document: dict[str, Any], report: ScanReport,
                limits: LayerLimits, progress: Callable[[int], None] | None, depth: int) -> None:
    for entry in document.get("manifests", []) or []:
        if not isinstance(entry, dict):
            continue
        annotations = entry.get("annotations") or {}
        platform = _platform_string(entry.get("platform"))
        # BuildKit's attestation manifests (platform unknown/unknown) are not images.
        if annotations.get(_ATTESTATION_ANNOTATION) == "attestation-manifest" or platform == "unknown/unknown":
            continue
        try:
            child_digest = Digest.parse(str(entry.get("digest")))
            stored, body = storage.get_manifest(repository, str(child_digest))
            child = json.loads(body)
        except (OCIError, ValueError) as exc:
            report.platforms.append(PlatformReport(
                str(entry.get("digest")), str(entry.get("mediaType")), int(entry.get("size") or 0), platform, None, [],
                problems=[ScanProblem("manifest-unknown", f"cannot read the platform manifest: {exc}",
                                      fatal=True)]))
            continue
        if stored.media_type in mediatypes.INDEX_TYPES:
            if depth < _MAX_INDEX_DEPTH and isinstance(child, dict):
                _scan_index(storage, repository, child, report, limits, progress, depth + 1)
            continue
        if is_container_image(child):
            report.platforms.append(_scan_manifest(storage, repository, str(child_digest), stored.media_type,
                                                   stored.size, child, platform, limits, progress))


def _scan_manifest(storage: Storage, repository: str, digest: str, media_type: str, size: int,
                   document: dict[str, Any], platform: str | None, limits: LayerLimits,
                   progress: Callable[[int], None] | None) -> PlatformReport:
    layers = [layer for layer in document.get("layers", []) or [] if isinstance(layer, dict)]
    report = PlatformReport(digest, media_type, size, platform, None, [str(layer.get("digest")) for layer in layers])
    config = document.get("config") if isinstance(document.get("config"), dict) else None
    if platform is None and config is not None:
        try:
            config_blob = json.loads(_read_blob(storage, repository, Digest.parse(str(config.get("digest"))),
                                                _MAX_CONFIG_SIZE))
            report.platform = _platform_string(config_blob)
        except (OCIError, ScanError, ValueError):
            pass  # an artifact's config, or missing: the platform is just not known
    filesystem = ImageFilesystem(PackageFileSelector(), limits, progress)
    for layer in layers:
        media_type_of_layer = str(layer.get("mediaType", ""))
        layer_digest = str(layer.get("digest"))
        if not is_layer_media_type(media_type_of_layer):
            report.problems.append(ScanProblem("unsupported-media-type", f"not a layer: {media_type_of_layer[:200]}",
                                               layer_digest, fatal=True))
            continue
        try:
            parsed_digest = Digest.parse(layer_digest)
            fd, _stored_size = storage.open_blob(repository, parsed_digest)
        except OCIError as exc:
            report.problems.append(ScanProblem("blob-unknown", f"cannot read the layer: {exc.message}",
                                               layer_digest, fatal=True))
            continue
        declared = layer.get("size")
        with os.fdopen(fd, "rb") as handle:
            report.problems.extend(filesystem.apply_layer(
                handle, parsed_digest, declared if isinstance(declared, int) and declared >= 0 else None))
    found = inventory(filesystem)
    report.distro = found.distro
    report.packages = found.packages
    report.problems.extend(found.problems)
    return report
