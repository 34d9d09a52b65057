"""The seed's offline vulnerability scanner (issue 10).

- ``versions``: each ecosystem's version order (dpkg, apk, PEP 440, SemVer). Pure.
- ``layers``: an image's filesystem as the runtime would unpack it, streamed and bounded.
- ``packages``: which files list packages, and their parsers (dpkg, apk, Python, npm, Go).
- ``vulndb``: OSV advisories imported into sqlite, atomically; matching.
- ``scanner``: ``scan_image`` of a stored manifest → ``ScanReport``; ``rematch``.
- ``sbom`` / ``referrers``: CycloneDX documents and OCI 1.1 referrer artifacts.
- ``service``: the background ``ScanService`` (trio) with queue, CPU budget and metrics.
- ``policy``: the ``[[scanning]]`` pull policy; ``config``: ``from_toml``.
"""

from __future__ import annotations

from .config import AcceptedRisk, LayerLimits, ScanConfig, ScanningRule, ScanSettings, from_toml
from .errors import DatabaseMissing, InvalidAdvisory, ScanCancelled, ScanError, VulnDBError
from .policy import PullDecision, decide_pull
from .referrers import ReferrerArtifact, build_attachments, build_referrer, replace_attachments, store_artifact
from .scanner import PlatformReport, ScanReport, is_container_image, rematch, scan_image
from .service import ScanService
from .vulndb import Finding, ImportResult, VulnDatabase, import_database

__all__ = [
    "AcceptedRisk",
    "DatabaseMissing",
    "Finding",
    "ImportResult",
    "InvalidAdvisory",
    "LayerLimits",
    "PlatformReport",
    "PullDecision",
    "ReferrerArtifact",
    "ScanCancelled",
    "ScanConfig",
    "ScanError",
    "ScanReport",
    "ScanService",
    "ScanSettings",
    "ScanningRule",
    "VulnDBError",
    "VulnDatabase",
    "build_attachments",
    "build_referrer",
    "decide_pull",
    "from_toml",
    "import_database",
    "is_container_image",
    "rematch",
    "replace_attachments",
    "scan_image",
    "store_artifact",
]
