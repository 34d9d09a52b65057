"""Which files hold an image's package inventory, and the parsers of those files. Pure.

Sources:
- Debian/Ubuntu dpkg: ``var/lib/dpkg/status`` and the one-file-per-package
  ``var/lib/dpkg/status.d/*`` that distroless images use.
- Alpine apk: ``lib/apk/db/installed``.
- Python: ``*.dist-info/METADATA``, ``*.egg-info/PKG-INFO`` and ``*.egg-info`` files.
- npm: ``node_modules/<name>/package.json`` and ``node_modules/@scope/<name>/package.json``.
- Go: the build info that the Go linker (1.18 and later) embeds in every binary, found in
  ELF files by streaming them through ``GoBuildInfoProbe`` (``debug/buildinfo``'s format:
  a 16-byte aligned header ``\\xff Go buildinf:``, pointer size, flags, then the Go version
  and the module info as varint-prefixed strings).
- The distribution: ``etc/os-release`` (or ``usr/lib/os-release``), which selects the
  advisories' release (``Debian:12``, ``Alpine:v3.19``).

Each package records the layer that added it. For a database holding many packages (dpkg's
status, apk's installed) that is the oldest layer of the unbroken run of versions of the
file that all list the package at the same version.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from packageurl import PackageURL

from .layers import ImageFile, ImageFilesystem, ScanProblem

__all__ = [
    "APK",
    "DEB",
    "GOLANG",
    "NPM",
    "PYPI",
    "Distro",
    "GoBuildInfo",
    "GoBuildInfoProbe",
    "Inventory",
    "Package",
    "PackageFileSelector",
    "inventory",
    "parse_apk_installed",
    "parse_dpkg_status",
    "parse_go_modinfo",
    "parse_npm_package_json",
    "parse_os_release",
    "parse_python_metadata",
]

# Package types, named as in package URLs.
DEB, APK, PYPI, NPM, GOLANG = "deb", "apk", "pypi", "npm", "golang"

KiB = 1024
MiB = 1024 * KiB

_OS_RELEASE_PATHS = ("etc/os-release", "usr/lib/os-release")
_DPKG_STATUS = "var/lib/dpkg/status"
_DPKG_STATUS_D = "var/lib/dpkg/status.d/"
_APK_INSTALLED = "lib/apk/db/installed"
_ELF_MAGIC = b"\x7fELF"


@dataclass(frozen=True, slots=True)
class Distro:
    """The distribution an image is built on, from os-release."""

    id: str
    version_id: str = ""
    pretty_name: str = ""
    id_like: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """``debian``, ``ubuntu``, ``alpine``, or the id of an unsupported distribution."""
        return self.id

    def osv_ecosystem(self) -> str | None:
        """The OSV ecosystem of this release's OS packages (``Debian:12``, ``Alpine:v3.19``,
        ``Ubuntu:22.04``), or None when the release cannot be told."""
        if self.id == "debian" and self.version_id:
            return f"Debian:{self.version_id.split('.', 1)[0]}"
        if self.id == "ubuntu" and self.version_id:
            return f"Ubuntu:{self.version_id}"
        if self.id == "alpine" and self.version_id:
            major_minor = ".".join(self.version_id.split(".")[:2])
            return f"Alpine:v{major_minor}"
        return None

    def purl_qualifier(self) -> str:
        return f"{self.id}-{self.version_id}" if self.version_id else self.id

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "version_id": self.version_id, "pretty_name": self.pretty_name}

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Distro:
        return cls(str(document["id"]), str(document.get("version_id", "")), str(document.get("pretty_name", "")))


@dataclass(frozen=True, slots=True)
class Package:
    """One installed package.

    Attributes:
        type: ``deb``, ``apk``, ``pypi``, ``npm`` or ``golang`` (package URL types).
        name: the name as the package database writes it.
        version: the installed version.
        source_name: the source package (dpkg ``Source:``, apk origin), if the format has one.
        source_version: the source package's version, when it differs (dpkg binNMUs).
        arch: the architecture, when recorded.
        layer: digest of the layer that added it.
        path: the file it was read from.
    """

    type: str
    name: str
    version: str
    source_name: str | None = None
    source_version: str | None = None
    arch: str | None = None
    layer: str = ""
    path: str = ""

    def purl(self, distro: Distro | None = None) -> str:
        """Its package URL (``pkg:deb/debian/openssl@3.0.11-1?arch=amd64&distro=debian-12``)."""
        qualifiers: dict[str, str] = {}
        namespace: str | None = None
        name = self.name
        version = self.version
        if self.type in (DEB, APK):
            namespace = distro.id if distro is not None else ("debian" if self.type == DEB else "alpine")
            if self.arch:
                qualifiers["arch"] = self.arch
            if distro is not None:
                qualifiers["distro"] = distro.purl_qualifier()
            if self.type == DEB and self.source_name and self.source_name != self.name:
                qualifiers["upstream"] = self.source_name
        elif self.type == PYPI:
            name = _normalize_pypi(self.name)
        elif self.type == NPM and self.name.startswith("@") and "/" in self.name:
            namespace, name = self.name.split("/", 1)
        elif self.type == GOLANG and "/" in self.name:
            namespace, name = self.name.rsplit("/", 1)
        return PackageURL(type=self.type, namespace=namespace, name=name, version=version or None,
                          qualifiers=qualifiers or None).to_string()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "name": self.name, "version": self.version,
                               "layer": self.layer, "path": self.path}
        for key in ("source_name", "source_version", "arch"):
            value = getattr(self, key)
            if value:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Package:
        return cls(str(document["type"]), str(document["name"]), str(document["version"]),
                   document.get("source_name"), document.get("source_version"), document.get("arch"),
                   str(document.get("layer", "")), str(document.get("path", "")))


def _normalize_pypi(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- which files ------------------------------------------------------------------------


class PackageFileSelector:
    """The ``FileSelector`` of the package sources above (see ``layers.FileSelector``).

    Args:
        max_metadata_size: the largest Python/npm metadata file kept.
    """

    def __init__(self, *, max_metadata_size: int = 4 * MiB) -> None:
        self._max_metadata = max_metadata_size

    def capture_limit(self, path: str) -> int | None:
        # Called for every regular file of every layer: cheap suffix tests first.
        if path.endswith("/METADATA"):
            return self._max_metadata if path[:-9].endswith(".dist-info") else None
        if path.endswith("/PKG-INFO"):
            return self._max_metadata if path[:-9].endswith(".egg-info") else None
        if path.endswith(".egg-info"):
            return self._max_metadata  # the single-file form distutils wrote
        if path.endswith("/package.json"):
            return 1 * MiB if _is_node_module_manifest(path) else None
        if path in (_DPKG_STATUS, _APK_INSTALLED):
            return 1 << 62  # bounded by LayerLimits.max_file_size
        if path.startswith(_DPKG_STATUS_D):
            rest = path[len(_DPKG_STATUS_D):]
            return 4 * MiB if rest and "/" not in rest and not rest.endswith((".md5sums", ".list")) else None
        if path in _OS_RELEASE_PATHS:
            return 64 * KiB
        return None

    def keeps_history(self, path: str) -> bool:
        return path in (_DPKG_STATUS, _APK_INSTALLED)

    def probe(self, path: str, size: int, head: bytes) -> GoBuildInfoProbe | None:
        return GoBuildInfoProbe() if head.startswith(_ELF_MAGIC) else None


def _is_node_module_manifest(path: str) -> bool:
    parts = path.split("/")
    if len(parts) >= 3 and parts[-3] == "node_modules" and not parts[-2].startswith("@"):
        return True
    return len(parts) >= 4 and parts[-4] == "node_modules" and parts[-3].startswith("@")


# ---- Go build info ----------------------------------------------------------------------

_GO_MAGIC = b"\xff Go buildinf:"
_GO_HEADER = 32
_GO_MAX_INFO = 1 * MiB  # version + module info strings; real ones are a few KiB
_GO_FLAG_INLINE = 0x2


@dataclass(frozen=True, slots=True)
class GoBuildInfo:
    """What ``go version -m`` prints of a binary.

    Attributes:
        go_version: ``go1.21.5``; empty for binaries of Go before 1.18 (see ``legacy``).
        path: the main package's import path.
        main: the main module (path, version), version ``(devel)`` for local builds.
        deps: the dependency modules (path, version), replacements applied.
        legacy: the pre-1.18 format, which points into the data segment instead of
            holding the strings; it is recognised but not read.
    """

    go_version: str
    path: str = ""
    main: tuple[str, str] | None = None
    deps: tuple[tuple[str, str], ...] = ()
    legacy: bool = False


def _uvarint(data: bytes | bytearray, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            return None
    return None


_MORE, _DONE, _REJECT = "more", "done", "reject"


class GoBuildInfoProbe:
    """Finds the Go build info header in a binary streaming past (``layers.ContentProbe``).

    The header is 16-byte aligned in the file (the linker aligns its section), so only
    aligned occurrences of the magic count, and a candidate must parse: a copy of the magic
    in read-only data (as in binaries that import debug/buildinfo) does not.
    """

    def __init__(self) -> None:
        self._offset = 0  # file offset of _window[0]
        self._window = b""  # the last bytes seen, in case the magic spans two chunks
        self._capture: bytearray | None = None
        self._capture_offset = 0
        self._result: GoBuildInfo | None = None
        self._legacy_seen = False

    def feed(self, chunk: bytes) -> bool:
        if self._capture is not None:
            self._capture += chunk
            state = self._try_parse()
            if state != _REJECT:
                return state == _MORE
            # Not a header after all: look for another one in what was captured.
            data, base = bytes(self._capture[1:]), self._capture_offset + 1
            self._capture = None
        else:
            data, base = self._window + chunk, self._offset
        return self._scan(data, base)

    def _scan(self, data: bytes, base: int) -> bool:
        start = 0
        while (found := data.find(_GO_MAGIC, start)) >= 0:
            if (base + found) % 16 == 0:
                self._capture, self._capture_offset = bytearray(data[found:]), base + found
                state = self._try_parse()
                if state == _DONE:
                    return False
                if state == _MORE:
                    return True
                self._capture = None
            start = found + 1
        keep = len(_GO_MAGIC) - 1
        if len(data) > keep:
            self._offset, self._window = base + len(data) - keep, data[-keep:]
        else:
            self._offset, self._window = base, data
        return True

    def _try_parse(self) -> str:
        capture = self._capture
        assert capture is not None
        if len(capture) < _GO_HEADER:
            return _MORE
        pointer_size, flags = capture[14], capture[15]
        if pointer_size not in (4, 8):
            return _REJECT
        if not flags & _GO_FLAG_INLINE:
            # Go before 1.18 (pointers into the data segment). Keep looking in case this was
            # a stray copy of the magic; report it as legacy only if nothing better turns up.
            self._legacy_seen = True
            return _REJECT
        strings: list[bytes] = []
        pos = _GO_HEADER
        for _ in range(2):
            parsed = _uvarint(capture, pos)
            if parsed is None:
                return _MORE if len(capture) - pos < 10 else _REJECT
            length, pos = parsed
            if length > _GO_MAX_INFO:
                return _REJECT
            if pos + length > len(capture):
                return _MORE
            strings.append(bytes(capture[pos:pos + length]))
            pos += length
        version, modinfo = strings
        if not version.startswith((b"go", b"devel")):
            return _REJECT
        if len(modinfo) >= 33 and modinfo[-17:-16] == b"\n":
            modinfo = modinfo[16:-16]
        self._result = parse_go_modinfo(version.decode("utf-8", "replace"), modinfo.decode("utf-8", "replace"))
        self._capture = None
        return _DONE

    def result(self) -> GoBuildInfo | None:
        if self._result is None and self._legacy_seen:
            return GoBuildInfo("", legacy=True)
        return self._result


def parse_go_modinfo(go_version: str, modinfo: str) -> GoBuildInfo:
    """Parses the module info text (``runtime/debug.BuildInfo.String``'s format)."""
    path = ""
    main: tuple[str, str] | None = None
    deps: list[tuple[str, str] | None] = []
    last_was_main = False
    for line in modinfo.splitlines():
        fields = line.split("\t")
        if fields[0] == "path" and len(fields) >= 2:
            path = fields[1]
        elif fields[0] == "mod" and len(fields) >= 3:
            main, last_was_main = (fields[1], fields[2]), True
        elif fields[0] == "dep" and len(fields) >= 3:
            deps.append((fields[1], fields[2]))
            last_was_main = False
        elif fields[0] == "=>" and len(fields) >= 2:
            # A replacement of the module on the line before; a directory replacement has no
            # version, and then the module's code is not the published one.
            replacement = (fields[1], fields[2]) if len(fields) >= 3 and fields[2] else None
            if last_was_main:
                main = replacement or main
            elif deps:
                deps[-1] = replacement
    return GoBuildInfo(go_version.split(" ", 1)[0], path, main, tuple(d for d in deps if d is not None))


def _go_stdlib_version(go_version: str) -> str | None:
    """``go1.21.5`` → ``1.21.5``; ``go1.21rc2`` → ``1.21.0-rc.2``, the way the Go vulnerability
    database writes the standard library's versions."""
    match = re.fullmatch(r"go(\d+)\.(\d+)(?:\.(\d+))?(?:(rc|beta)(\d+))?", go_version)
    if match is None:
        return None
    major, minor, patch, pre, number = match.groups()
    version = f"{major}.{minor}.{patch or 0}"
    return f"{version}-{pre}.{number}" if pre else version


# ---- parsers ----------------------------------------------------------------------------


def parse_os_release(text: str) -> Distro | None:
    """``ID``, ``VERSION_ID``, ``PRETTY_NAME`` of an os-release file (shell-quoted values)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, equals, value = line.strip().partition("=")
        if not equals or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value.replace('\\"', '"').replace("\\\\", "\\")
    if "ID" not in values:
        return None
    return Distro(values["ID"].lower(), values.get("VERSION_ID", ""), values.get("PRETTY_NAME", ""),
                  tuple(values.get("ID_LIKE", "").split()))


def _paragraphs(text: str) -> Iterator[dict[str, str]]:
    """RFC 822-style stanzas separated by blank lines; continuation lines are dropped."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                yield fields
                fields = {}
            continue
        if line[0] in " \t":
            continue
        key, colon, value = line.partition(":")
        if colon:
            fields[key.strip()] = value.strip()
    if fields:
        yield fields


_DPKG_SOURCE_RE = re.compile(r"(\S+)(?:\s+\((\S+)\))?")


def parse_dpkg_status(text: str, *, require_status: bool = True) -> list[Package]:
    """The installed packages of a dpkg status file.

    Args:
        text: the file's content.
        require_status: only packages whose ``Status`` says installed (``status.d`` files of
            distroless images have no Status field: pass False).
    """
    packages: list[Package] = []
    for fields in _paragraphs(text):
        name, version = fields.get("Package"), fields.get("Version")
        if not name or not version:
            continue
        status = fields.get("Status")
        if status is not None or require_status:
            words = (status or "").split()
            if len(words) < 3 or words[2] not in ("installed", "half-configured", "unpacked", "triggers-awaited",
                                                  "triggers-pending", "half-installed"):
                continue
        source_name = source_version = None
        source = fields.get("Source")
        if source:
            match = _DPKG_SOURCE_RE.fullmatch(source)
            if match:
                source_name, source_version = match.group(1), match.group(2)
        packages.append(Package(DEB, name, version, source_name or name, source_version or version,
                                fields.get("Architecture")))
    return packages


def parse_apk_installed(text: str) -> list[Package]:
    """The packages of apk's ``installed`` database (``P:`` name, ``V:`` version, ``o:`` origin)."""
    packages: list[Package] = []
    current: dict[str, str] = {}

    def flush() -> None:
        if current.get("P") and current.get("V"):
            packages.append(Package(APK, current["P"], current["V"], current.get("o") or current["P"], None,
                                    current.get("A")))
        current.clear()

    for line in text.splitlines():
        if not line.strip():
            flush()
            continue
        if len(line) >= 2 and line[1] == ":" and line[0] in "PVAo":
            current.setdefault(line[0], line[2:].strip())
    flush()
    return packages


def parse_python_metadata(text: str) -> Package | None:
    """Name and version from core metadata (``METADATA``, ``PKG-INFO``): headers up to the first blank line."""
    name = version = None
    for line in text.splitlines():
        if not line.strip():
            break
        key, colon, value = line.partition(":")
        if not colon:
            continue
        key = key.strip().lower()
        if key == "name" and name is None:
            name = value.strip()
        elif key == "version" and version is None:
            version = value.strip()
    if not name or not version:
        return None
    return Package(PYPI, name, version)


def parse_npm_package_json(data: bytes) -> Package | None:
    """Name and version of an installed npm package's ``package.json``."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    name, version = document.get("name"), document.get("version")
    if not isinstance(name, str) or not isinstance(version, str) or not name or not version:
        return None
    return Package(NPM, name, version)


def _go_packages(info: GoBuildInfo) -> list[Package]:
    packages: list[Package] = []
    stdlib = _go_stdlib_version(info.go_version)
    if stdlib is not None:
        packages.append(Package(GOLANG, "stdlib", stdlib))
    if info.main is not None and info.main[1] and info.main[1] != "(devel)":
        packages.append(Package(GOLANG, info.main[0], info.main[1]))
    packages.extend(Package(GOLANG, path, version) for path, version in info.deps if version)
    return packages


# ---- the inventory of an image ----------------------------------------------------------


@dataclass
class Inventory:
    """What ``inventory`` found in an image's filesystem."""

    distro: Distro | None
    packages: list[Package] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)


def _decode(content: bytes) -> str:
    return content.decode("utf-8", "replace")


def _attribute_layers(image_file: ImageFile, parse: Any) -> list[Package]:
    """Parses a multi-package database and gives each package the layer that added it."""
    current = parse(_decode(image_file.content or b""))
    versions = [(layer, {(p.name, p.arch, p.version) for p in parse(_decode(content))})
                for layer, content in image_file.history]
    result: list[Package] = []
    for package in current:
        key = (package.name, package.arch, package.version)
        layer = image_file.layer
        for older_layer, keys in reversed(versions):
            if key not in keys:
                break
            layer = older_layer
        result.append(_with_origin(package, layer, image_file.path))
    return result


def _with_origin(package: Package, layer: str, path: str) -> Package:
    return Package(package.type, package.name, package.version, package.source_name, package.source_version,
                   package.arch, layer, path)


def inventory(filesystem: ImageFilesystem, files: Iterable[ImageFile] | None = None) -> Inventory:
    """Reads the packages and the distribution out of a built ``ImageFilesystem``."""
    distro = None
    for path in _OS_RELEASE_PATHS:
        found = filesystem.read(path)
        if found is not None and found.content is not None:
            distro = parse_os_release(_decode(found.content))
            if distro is not None:
                break
    result = Inventory(distro)
    for image_file in files if files is not None else filesystem.files():
        path = image_file.path
        try:
            if image_file.probe_result is not None:
                info: GoBuildInfo = image_file.probe_result
                if info.legacy:
                    result.problems.append(ScanProblem(
                        "unsupported", "Go binary built before Go 1.18: its modules are not listed",
                        image_file.layer, path))
                result.packages.extend(_with_origin(p, image_file.layer, path) for p in _go_packages(info))
                continue
            content = image_file.content
            if content is None:
                continue
            if path == _DPKG_STATUS:
                result.packages.extend(_attribute_layers(image_file, parse_dpkg_status))
            elif path.startswith(_DPKG_STATUS_D):
                result.packages.extend(_with_origin(p, image_file.layer, path)
                                       for p in parse_dpkg_status(_decode(content), require_status=False))
            elif path == _APK_INSTALLED:
                result.packages.extend(_attribute_layers(image_file, parse_apk_installed))
            elif path.endswith(("/METADATA", "/PKG-INFO", ".egg-info")):
                package = parse_python_metadata(_decode(content))
                if package is not None:
                    result.packages.append(_with_origin(package, image_file.layer, path))
            elif path.endswith("/package.json"):
                package = parse_npm_package_json(content)
                if package is not None:
                    result.packages.append(_with_origin(package, image_file.layer, path))
        except (ValueError, UnicodeError, RecursionError) as exc:
            result.problems.append(ScanProblem("parse-error", f"cannot parse: {exc}", image_file.layer, path))
    result.packages.sort(key=lambda p: (p.type, p.name, p.version, p.path))
    return result
