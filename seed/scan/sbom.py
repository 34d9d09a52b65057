"""CycloneDX SBOMs of scanned images, built with ``cyclonedx-python-lib`` and validated
against the CycloneDX 1.6 JSON schema the library ships.

One SBOM describes one image manifest (one platform): the image is the BOM's subject
component, every package a component with its package URL and properties naming the layer
that added it and the file it was read from, so tools reading the SBOM (Trivy, Grype,
Dependency-Track) can tell where each package comes from.
"""

from __future__ import annotations

import datetime
import functools
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from packageurl import PackageURL

from .errors import ScanError
from .packages import GOLANG
from .scanner import PlatformReport, ScanReport

__all__ = ["LAYER_PROPERTY", "PATH_PROPERTY", "SBOM_MEDIA_TYPE", "SOURCE_PROPERTY", "build_sbom", "validate_sbom"]

SBOM_MEDIA_TYPE = "application/vnd.cyclonedx+json"
LAYER_PROPERTY = "p2pd:layer:digest"
PATH_PROPERTY = "p2pd:package:path"
SOURCE_PROPERTY = "p2pd:package:source"
_PLATFORM_PROPERTY = "p2pd:image:platform"
_DISTRO_PROPERTY = "p2pd:image:distro"
# Fixed namespace so an SBOM's serial number is a function of what it describes.
_SERIAL_NAMESPACE = uuid.UUID("6f1c2d0e-8a55-4c1e-9a43-0c2b3d4e5f60")


def _image_purl(repository: str, digest: str) -> PackageURL:
    name = repository.rsplit("/", 1)[-1]
    return PackageURL(type="oci", name=name, version=digest, qualifiers={"repository_url": repository})


def build_sbom(report: ScanReport, platform: PlatformReport) -> bytes:
    """The CycloneDX 1.6 JSON document of one platform of a scan report.

    Raises:
        ScanError: the document does not validate against the schema (a bug, never the
            image's fault: every string from the image is data to the library).
    """
    # The library takes about a second to import: only scans that attach SBOMs pay for it.
    from cyclonedx.model import Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.dependency import Dependency
    from cyclonedx.output.json import JsonV1Dot6

    bom = Bom(serial_number=uuid.uuid5(_SERIAL_NAMESPACE, f"{platform.manifest_digest}@{report.scanned_at!r}"))
    bom.metadata.timestamp = datetime.datetime.fromtimestamp(report.scanned_at, datetime.UTC)
    root_properties = []
    if platform.platform:
        root_properties.append(Property(name=_PLATFORM_PROPERTY, value=platform.platform))
    if platform.distro is not None:
        root_properties.append(Property(name=_DISTRO_PROPERTY,
                                        value=f"{platform.distro.id} {platform.distro.version_id}".strip()))
    root = Component(type=ComponentType.CONTAINER, name=report.repository, version=platform.manifest_digest,
                     bom_ref="image", purl=_image_purl(report.repository, platform.manifest_digest),
                     properties=root_properties)
    bom.metadata.component = root
    components = []
    for index, package in enumerate(platform.packages):
        properties = [Property(name=LAYER_PROPERTY, value=package.layer),
                      Property(name=PATH_PROPERTY, value=package.path)]
        if package.source_name and package.source_name != package.name:
            source = package.source_name
            if package.source_version and package.source_version != package.version:
                source += f" ({package.source_version})"
            properties.append(Property(name=SOURCE_PROPERTY, value=source))
        component_type = ComponentType.LIBRARY
        if package.type == GOLANG and package.name == "stdlib":
            component_type = ComponentType.FRAMEWORK
        components.append(Component(
            type=component_type, name=package.name, version=package.version, bom_ref=f"package-{index}",
            purl=PackageURL.from_string(package.purl(platform.distro)), properties=properties))
    for component in components:
        bom.components.add(component)
    # The image depends on every package (added directly: Bom.register_dependency is O(n²)).
    bom.dependencies.add(Dependency(ref=root.bom_ref, dependencies=[Dependency(ref=c.bom_ref) for c in components]))
    text = JsonV1Dot6(bom).output_as_string()
    validate_sbom(text)
    return text.encode()


_VALIDATOR_LOCK = threading.Lock()


def _canonical(value: Any) -> Any:
    # JSON equality as jsonschema defines it: 1 == 1.0, but true != 1, key order irrelevant.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    return value


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[Any]:
    """``uniqueItems`` in O(n log n): jsonschema compares objects pairwise, O(n²), which for
    an image with thousands of packages costs more than the whole scan."""
    from jsonschema.exceptions import ValidationError

    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[str] = set()
    for item in instance:
        key = json.dumps(_canonical(item), sort_keys=True)
        if key in seen:
            yield ValidationError(f"{instance!r} has non-unique elements")
            return
        seen.add(key)


@functools.cache
def _validator() -> Any:
    """The library's CycloneDX 1.6 validator (its bundled schema, registry of referenced
    schemas and format checker), with the fast ``uniqueItems`` above. Built once: loading the
    schema costs more than a validation."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    library = JsonStrictValidator(SchemaVersion.V1_6)
    try:
        from jsonschema.validators import extend

        base = library._validator
        fast = extend(type(base), {"uniqueItems": _unique_items})
        return fast(base.schema, registry=base._registry, format_checker=base.format_checker)
    except (AttributeError, TypeError, ImportError):
        # Another version of the library or of jsonschema: its own (slower) validation.
        return library._validator


def validate_sbom(text: str | bytes) -> None:
    """Validates a CycloneDX 1.6 JSON document against the schema bundled with the library.

    Raises:
        ScanError: with the first error the validator reports.
    """
    document = json.loads(text)
    with _VALIDATOR_LOCK:
        error = next(iter(_validator().iter_errors(document)), None)
    if error is not None:
        raise ScanError(f"the SBOM does not validate against CycloneDX 1.6: {error.message} at "
                        f"{'/'.join(str(p) for p in error.absolute_path)}")
