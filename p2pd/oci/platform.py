"""Choosing the manifest of an image index that fits a platform: pure, no I/O.

An index (OCI image index or Docker manifest list) lists one manifest per platform, plus,
for images built by BuildKit, attestation manifests whose platform is ``unknown/unknown``.
A node wants exactly one of them: the one its runtime would pick. The rules follow
containerd's default matcher: os and architecture must be equal after normalising the
aliases (``x86_64`` is ``amd64``), and on ARM a CPU runs code built for an older variant
of its architecture (``arm/v7`` runs ``arm/v6``), preferring the newest it can.
"""

from __future__ import annotations

import json
import platform as _host
from dataclasses import dataclass
from typing import Any

from .errors import OCIError
from .manifest import Descriptor, parse_manifest

__all__ = [
    "ATTESTATION_ANNOTATION",
    "Platform",
    "host_platform",
    "select_manifest",
]

ATTESTATION_ANNOTATION = "vnd.docker.reference.type"

_ARCH_ALIASES = {
    "x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm",
    "i386": "386", "i686": "386",
}
# The variant a platform has when none is written, as containerd assumes.
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}
# Older variants a CPU also runs, newest first.
_COMPATIBLE_VARIANTS = {
    ("arm", "v8"): ("v8", "v7", "v6", "v5"),
    ("arm", "v7"): ("v7", "v6", "v5"),
    ("arm", "v6"): ("v6", "v5"),
    ("arm64", "v9"): ("v9", "v8"),
}
_MAX_FIELD = 64


def _invalid(message: str) -> OCIError:
    return OCIError("MANIFEST_INVALID", message)


@dataclass(frozen=True, slots=True)
class Platform:
    """A normalised platform: os, architecture and (possibly empty) variant."""

    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def of(cls, os: str, architecture: str, variant: str = "") -> Platform:
        os, architecture, variant = os.strip().lower(), architecture.strip().lower(), variant.strip().lower()
        architecture = _ARCH_ALIASES.get(architecture, architecture)
        if architecture == "arm64" and variant == "8":
            variant = "v8"
        return cls(os, architecture, variant or _DEFAULT_VARIANT.get(architecture, ""))

    @classmethod
    def parse(cls, text: str) -> Platform:
        """Reads ``os/arch[/variant]`` (the ``--platform`` syntax).

        Raises:
            ValueError: when the text is not of that form.
        """
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts) or len(text) > 3 * _MAX_FIELD:
            raise ValueError(f"platform must be os/arch[/variant], got {text[:100]!r}")
        return cls.of(*parts)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def preference(self, candidate: Platform) -> int | None:
        """How well ``candidate`` suits this platform: 0 is best, None means it cannot run here."""
        if candidate.os != self.os or candidate.architecture != self.architecture:
            return None
        accepted = _COMPATIBLE_VARIANTS.get((self.architecture, self.variant), (self.variant,))
        if candidate.variant in accepted:
            return accepted.index(candidate.variant)
        return None


def host_platform(system: str | None = None, machine: str | None = None) -> Platform:
    """The platform of this machine (arguments only for tests)."""
    system = (system if system is not None else _host.system()) or "linux"
    machine = (machine if machine is not None else _host.machine()) or "amd64"
    variant = ""
    lowered = machine.lower()
    if lowered.startswith("armv") and len(lowered) >= 5 and lowered[4].isdigit():
        # armv7l, armv6l: the kernel names the variant in the machine string.
        variant, machine = f"v{lowered[4]}", "arm"
    return Platform.of(system, machine, variant)


def _entry_platform(entry: Any) -> Platform | None:
    value = entry.get("platform") if isinstance(entry, dict) else None
    if not isinstance(value, dict):
        return None
    os, arch, variant = value.get("os"), value.get("architecture"), value.get("variant", "")
    if not all(isinstance(v, str) and len(v) <= _MAX_FIELD for v in (os, arch, variant)):
        return None
    if not os or not arch or "unknown" in (os, arch):
        return None
    return Platform.of(os, arch, variant)


def select_manifest(index_body: bytes, content_type: str | None, wanted: Platform) -> Descriptor:
    """The descriptor of the index's manifest that ``wanted`` runs, verified as a descriptor.

    Attestation manifests and entries without a known platform are never chosen. Among
    entries equally suited, the first listed wins (the order the image's author chose).

    Raises:
        OCIError: MANIFEST_INVALID when the body is not an index; MANIFEST_UNKNOWN (404)
            when no entry fits the platform.
    """
    parsed = parse_manifest(index_body, content_type)
    if not parsed.is_index:
        raise _invalid("not an image index")
    entries = json.loads(index_body).get("manifests", [])
    best: tuple[int, Descriptor] | None = None
    for entry, descriptor in zip(entries, parsed.references, strict=True):
        annotations = descriptor.annotations or {}
        if ATTESTATION_ANNOTATION in annotations:
            continue
        candidate = _entry_platform(entry)
        rank = None if candidate is None else wanted.preference(candidate)
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, descriptor)
    if best is None:
        raise OCIError("MANIFEST_UNKNOWN", f"the index has no manifest for {wanted}",
                       detail={"platform": str(wanted)})
    return best[1]
