"""The offline vulnerability database: OSV advisories imported into sqlite, and matching.

Layout under the seed's data directory::

    scan/vulndb.sqlite      the database in use (replaced whole by each import)
    scan/vulndb.lock        serialises imports
    scan/tmp/               databases being built

Rules/invariants:
- An import builds a complete new database in ``scan/tmp/``, fsyncs it, renames it over
  ``scan/vulndb.sqlite`` and fsyncs the directory. A failed or interrupted import leaves the
  previous database in use; readers that opened the old file keep reading it until they
  close it (the rename never changes a file in place, so readers open it ``immutable``).
- Each record is validated against the parts of the OSV schema that matching relies on;
  withdrawn records are dropped. Invalid records fail a ``strict`` import, and are counted
  and skipped otherwise.
- Each import records which (ecosystem, package) pairs changed since the import before it,
  so the scanner only re-matches the images that contain them.
- Matching uses each ecosystem's own version order (``versions.py``). OS advisories
  (``Debian:12``, ``Ubuntu:22.04``, ``Alpine:v3.19``) name source packages and apply to the
  binary packages built from them, at the source version; the image's os-release picks the
  release.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import sqlite3
import time
import uuid
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cvss import CVSS2, CVSS3, CVSS4
from cvss.exceptions import CVSSError

from p2pd.fsutil import fsync_dir
from p2pd.progress import NO_PROGRESS, ProgressSink

from .config import severity_rank
from .errors import DatabaseMissing, InvalidAdvisory, InvalidVersion, VulnDBError
from .packages import APK, DEB, GOLANG, NPM, PYPI, Distro, Package
from .versions import comparator_for

__all__ = [
    "DatabaseStatus",
    "Finding",
    "ImportResult",
    "MatchResult",
    "VulnDatabase",
    "advisory_severity",
    "cvss_severity",
    "database_path",
    "ecosystem_key",
    "import_database",
    "osv_coordinates",
    "validate_record",
]

log = logging.getLogger("seed.scan.vulndb")

MAX_RECORD_SIZE = 16 * 1024 * 1024  # bytes of one OSV JSON file
_SCHEMA_VERSION = "1"
_RANGE_TYPES = ("ECOSYSTEM", "SEMVER", "GIT")
_EVENT_KINDS = ("introduced", "fixed", "last_affected", "limit")
_TEXT_SEVERITY = {
    "critical": "critical",
    "high": "high",
    "important": "high",
    "moderate": "medium",
    "medium": "medium",
    "low": "low",
    "negligible": "low",
    "unimportant": "low",
    "none": "none",
}


def database_path(data_dir: Path) -> Path:
    """Where the database in use lives under the seed's data directory."""
    return Path(data_dir) / "scan" / "vulndb.sqlite"


# ---- records ----------------------------------------------------------------------------


def ecosystem_key(ecosystem: str) -> str:
    """The form advisories are indexed by: ``Ubuntu:Pro:22.04:LTS`` → ``Ubuntu:22.04``; others unchanged."""
    parts = ecosystem.split(":")
    if parts[0] == "Ubuntu":
        release = next((p for p in parts[1:] if re.fullmatch(r"\d+\.\d+", p)), None)
        return f"Ubuntu:{release}" if release else "Ubuntu"
    return ecosystem


def _package_key(ecosystem: str, name: str) -> str:
    if ecosystem == "PyPI":
        return re.sub(r"[-_.]+", "-", name).lower()
    return name


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidAdvisory(message)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def validate_record(record: Any) -> dict[str, Any]:
    """Checks the OSV fields that import and matching rely on; returns the record.

    Raises:
        InvalidAdvisory: naming the first field that does not fit the schema.
    """
    _require(isinstance(record, dict), "an OSV record must be a JSON object")
    advisory_id = record.get("id")
    _require(isinstance(advisory_id, str) and 0 < len(advisory_id) <= 256, "id must be a non-empty string")
    _require(isinstance(record.get("modified"), str), f"{advisory_id}: modified must be a timestamp string")
    for key in ("aliases", "related"):
        _require(key not in record or _is_str_list(record[key]), f"{advisory_id}: {key} must be a list of strings")
    for key in ("summary", "details", "withdrawn", "published", "schema_version"):
        _require(key not in record or isinstance(record[key], str), f"{advisory_id}: {key} must be a string")
    severity = record.get("severity", [])
    _require(isinstance(severity, list), f"{advisory_id}: severity must be a list")
    for entry in severity:
        _require(isinstance(entry, dict) and isinstance(entry.get("type"), str)
                 and isinstance(entry.get("score"), str), f"{advisory_id}: severity entries need type and score")
    for key in ("database_specific",):
        _require(key not in record or isinstance(record[key], dict), f"{advisory_id}: {key} must be an object")
    affected = record.get("affected", [])
    _require(isinstance(affected, list), f"{advisory_id}: affected must be a list")
    for index, entry in enumerate(affected):
        where = f"{advisory_id}: affected[{index}]"
        _require(isinstance(entry, dict), f"{where} must be an object")
        package = entry.get("package")
        if entry.get("ranges") or entry.get("versions"):
            _require(isinstance(package, dict), f"{where}.package is required with ranges or versions")
        if package is not None:
            _require(isinstance(package, dict) and isinstance(package.get("ecosystem"), str)
                     and isinstance(package.get("name"), str) and package["name"],
                     f"{where}.package needs ecosystem and name strings")
        _require("versions" not in entry or _is_str_list(entry["versions"]), f"{where}.versions must be strings")
        for key in ("ecosystem_specific", "database_specific"):
            _require(key not in entry or isinstance(entry[key], dict), f"{where}.{key} must be an object")
        ranges = entry.get("ranges", [])
        _require(isinstance(ranges, list), f"{where}.ranges must be a list")
        for range_index, version_range in enumerate(ranges):
            range_where = f"{where}.ranges[{range_index}]"
            _require(isinstance(version_range, dict) and version_range.get("type") in _RANGE_TYPES,
                     f"{range_where}.type must be one of {', '.join(_RANGE_TYPES)}")
            events = version_range.get("events")
            _require(isinstance(events, list) and len(events) > 0, f"{range_where}.events must be a non-empty list")
            for event in events:
                _require(isinstance(event, dict) and len(event) == 1, f"{range_where}: each event has exactly one key")
                ((kind, value),) = event.items()
                _require(kind in _EVENT_KINDS and isinstance(value, str) and bool(value),
                         f"{range_where}: unknown event {kind!r} or empty version")
            _require(any("introduced" in event for event in events), f"{range_where} has no introduced event")
    return record


def cvss_severity(kind: str, vector: str) -> tuple[str, float] | None:
    """Severity and base score of a CVSS vector (``CVSS_V2``, ``CVSS_V3``, ``CVSS_V4``), or None."""
    try:
        if kind == "CVSS_V3":
            score = float(CVSS3(vector).base_score)
        elif kind == "CVSS_V4":
            score = float(CVSS4(vector).base_score)
        elif kind == "CVSS_V2":
            score = float(CVSS2(vector).base_score)
            # CVSS v2 has no "critical" and no "none" band.
            return ("low" if score < 4.0 else "medium" if score < 7.0 else "high"), score
        else:
            return None
    except (CVSSError, ValueError, KeyError, IndexError):
        return None
    if score == 0.0:
        return "none", score
    if score < 4.0:
        return "low", score
    if score < 7.0:
        return "medium", score
    if score < 9.0:
        return "high", score
    return "critical", score


def _text_severity(value: Any) -> str | None:
    return _TEXT_SEVERITY.get(value.strip().lower()) if isinstance(value, str) else None


def advisory_severity(record: dict[str, Any], affected: dict[str, Any] | None = None) -> tuple[str, float | None]:
    """The severity of an advisory (for one of its ``affected`` entries).

    CVSS v3 base score first, then v4, then the database's own word (``database_specific``
    or an ecosystem's ``severity`` entry), then CVSS v2; otherwise ``unknown``.
    """
    scored = {entry["type"]: cvss_severity(entry["type"], entry["score"]) for entry in record.get("severity", [])}
    for kind in ("CVSS_V3", "CVSS_V4"):
        if scored.get(kind):
            return scored[kind]  # type: ignore[return-value]
    words = [record.get("database_specific", {}).get("severity")]
    words += [entry["score"] for entry in record.get("severity", []) if not entry["type"].startswith("CVSS")]
    if affected is not None:
        words += [affected.get(key, {}).get("severity") for key in ("database_specific", "ecosystem_specific")]
    for word in words:
        text = _text_severity(word)
        if text is not None:
            return text, None
    if scored.get("CVSS_V2"):
        return scored["CVSS_V2"]  # type: ignore[return-value]
    return "unknown", None


# ---- import -----------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE advisories (
    id TEXT PRIMARY KEY, modified TEXT NOT NULL, aliases TEXT NOT NULL, summary TEXT NOT NULL,
    digest TEXT NOT NULL);
CREATE TABLE affected (
    advisory TEXT NOT NULL, ecosystem TEXT NOT NULL, package TEXT NOT NULL, severity TEXT NOT NULL,
    score REAL, ranges TEXT NOT NULL, versions TEXT NOT NULL);
"""
_INDEXES = """
CREATE INDEX affected_by_package ON affected (ecosystem, package);
CREATE INDEX affected_by_advisory ON affected (advisory);
"""


@dataclass
class ImportResult:
    """What an import loaded.

    Attributes:
        changed_packages: (ecosystem key, package key) pairs whose advisories were added,
            changed or removed since the previous database; None when there was none before
            (everything is new).
    """

    import_id: str
    advisories: int = 0
    withdrawn: int = 0
    invalid: int = 0
    invalid_examples: list[str] = field(default_factory=list)
    per_ecosystem: dict[str, int] = field(default_factory=dict)
    changed_packages: frozenset[tuple[str, str]] | None = None


def _records_from(source: Path, progress: ProgressSink) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each OSV JSON file in a directory tree or a zip archive."""
    if source.is_dir():
        paths = [path for path in sorted(source.rglob("*.json")) if path.is_file()]
        progress.start(len(paths))
        for path in paths:
            progress.advance()
            size = path.stat().st_size
            if size > MAX_RECORD_SIZE:
                yield str(path), b""  # reported as invalid below
                continue
            yield str(path), path.read_bytes()
        return
    try:
        archive = zipfile.ZipFile(source)
    except (OSError, zipfile.BadZipFile) as exc:
        raise VulnDBError(f"{source}: neither a directory nor a zip archive: {exc}") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir() and m.filename.endswith(".json")]
        progress.start(len(members))
        for member in members:
            progress.advance()
            if member.file_size > MAX_RECORD_SIZE:
                yield member.filename, b""
                continue
            try:
                with archive.open(member) as handle:
                    # Read at most one byte past the limit: the declared size may lie.
                    data = handle.read(MAX_RECORD_SIZE + 1)
            except (OSError, zipfile.BadZipFile, zlib.error) as exc:
                raise VulnDBError(f"{source}: cannot read {member.filename}: {exc}") from exc
            yield member.filename, data if len(data) <= MAX_RECORD_SIZE else b""


def import_database(data_dir: Path, source: Path, *, strict: bool = False,
                    now: float | None = None, progress: ProgressSink = NO_PROGRESS) -> ImportResult:
    """Imports OSV advisories from a directory of JSON files or a zip archive, atomically.

    Args:
        data_dir: the seed's data directory.
        source: a directory (searched recursively for ``*.json``) or a zip such as the
            per-ecosystem ``all.zip`` OSV publishes.
        strict: fail on the first invalid record instead of skipping it.
        now: the import time to record (default: the clock).
        progress: told the number of files, then each one read.

    Raises:
        VulnDBError: the source cannot be read, holds no valid advisory, a record is
            invalid under ``strict``, or the database cannot be written. The previous
            database stays in use.
    """
    source = Path(source)
    if not source.exists():
        raise VulnDBError(f"{source} does not exist")
    scan_dir = Path(data_dir) / "scan"
    tmp_dir = scan_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    target = database_path(data_dir)
    result = ImportResult(uuid.uuid4().hex)
    tmp_path = tmp_dir / f"vulndb-{result.import_id}.sqlite"
    with open(scan_dir / "vulndb.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            _build(tmp_path, source, target, result, strict, time.time() if now is None else now, progress)
            with open(tmp_path, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp_path, target)
            fsync_dir(scan_dir)
        except sqlite3.Error as exc:
            raise VulnDBError(f"cannot write the vulnerability database: {exc}") from exc
        except OSError as exc:
            raise VulnDBError(f"cannot import {source}: {exc}") from exc
        finally:
            for leftover in (tmp_path, tmp_path.with_name(tmp_path.name + "-journal")):
                leftover.unlink(missing_ok=True)
    log.info("imported %d advisories from %s (%d withdrawn, %d invalid)", result.advisories, source,
             result.withdrawn, result.invalid)
    return result


def _build(tmp_path: Path, source: Path, previous: Path, result: ImportResult, strict: bool, now: float,
           progress: ProgressSink) -> None:
    connection = sqlite3.connect(tmp_path)
    try:
        connection.execute("PRAGMA journal_mode = OFF")  # a failed build is deleted, never recovered
        connection.execute("PRAGMA synchronous = OFF")  # the whole file is fsynced before the rename
        connection.executescript(_SCHEMA)
        seen: set[str] = set()
        with connection:
            for name, data in _records_from(source, progress):
                try:
                    if not data:
                        raise InvalidAdvisory(f"larger than {MAX_RECORD_SIZE} bytes")
                    try:
                        document = json.loads(data)
                    except (ValueError, RecursionError) as exc:
                        raise InvalidAdvisory(f"not JSON: {exc}") from exc
                    # OSV exports are one record per file; a list of records is accepted too.
                    for record in document if isinstance(document, list) else [document]:
                        _insert(connection, validate_record(record), result, seen)
                except InvalidAdvisory as exc:
                    if strict:
                        raise VulnDBError(f"{name}: invalid OSV record: {exc}") from exc
                    result.invalid += 1
                    if len(result.invalid_examples) < 5:
                        result.invalid_examples.append(f"{name}: {exc}")
        if result.advisories == 0:
            raise VulnDBError(f"{source}: no valid OSV advisory found")
        connection.executescript(_INDEXES)
        result.changed_packages = _changes_since(connection, previous)
        for row in connection.execute("SELECT ecosystem, COUNT(DISTINCT advisory) FROM affected GROUP BY ecosystem"):
            result.per_ecosystem[row[0]] = row[1]
        previous_id = _previous_import_id(previous)
        meta = {
            "schema_version": _SCHEMA_VERSION,
            "import_id": result.import_id,
            "previous_import_id": previous_id or "",
            "imported_at": repr(now),
            "source": str(source),
            "advisories": str(result.advisories),
            "withdrawn": str(result.withdrawn),
            "invalid": str(result.invalid),
            "changed_packages": json.dumps(sorted(result.changed_packages)
                                           if result.changed_packages is not None else None),
        }
        with connection:
            connection.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
    finally:
        connection.close()


def _insert(connection: sqlite3.Connection, record: dict[str, Any], result: ImportResult, seen: set[str]) -> None:
    if record.get("withdrawn"):
        result.withdrawn += 1
        return
    advisory_id = record["id"]
    if advisory_id in seen:
        # Two files with one id: the later modification wins, as OSV's own tooling does.
        row = connection.execute("SELECT modified FROM advisories WHERE id = ?", (advisory_id,)).fetchone()
        if row is not None and row[0] >= record["modified"]:
            return
        connection.execute("DELETE FROM advisories WHERE id = ?", (advisory_id,))
        connection.execute("DELETE FROM affected WHERE advisory = ?", (advisory_id,))
        result.advisories -= 1
    seen.add(advisory_id)
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    connection.execute("INSERT INTO advisories VALUES (?, ?, ?, ?, ?)", (
        advisory_id, record["modified"], json.dumps(record.get("aliases", [])),
        (record.get("summary") or record.get("details") or "")[:500], hashlib.sha256(canonical).hexdigest()))
    for entry in record.get("affected", []):
        package = entry.get("package")
        if not package:
            continue
        ecosystem = ecosystem_key(package["ecosystem"])
        severity, score = advisory_severity(record, entry)
        ranges = [r for r in entry.get("ranges", []) if r["type"] in ("ECOSYSTEM", "SEMVER")]
        connection.execute("INSERT INTO affected VALUES (?, ?, ?, ?, ?, ?, ?)", (
            advisory_id, ecosystem, _package_key(ecosystem, package["name"]), severity, score,
            json.dumps(ranges, separators=(",", ":")), json.dumps(entry.get("versions", []), separators=(",", ":"))))
    result.advisories += 1


def _changes_since(connection: sqlite3.Connection, previous: Path) -> frozenset[tuple[str, str]] | None:
    if not previous.exists():
        return None
    connection.execute("ATTACH DATABASE ? AS old", (f"file:{previous}?mode=ro&immutable=1",))
    try:
        rows = connection.execute("""
            WITH changed(id) AS (
                SELECT id FROM main.advisories WHERE id NOT IN (SELECT id FROM old.advisories)
                UNION SELECT id FROM old.advisories WHERE id NOT IN (SELECT id FROM main.advisories)
                UNION SELECT n.id FROM main.advisories n JOIN old.advisories o ON n.id = o.id
                      WHERE n.digest != o.digest)
            SELECT ecosystem, package FROM main.affected WHERE advisory IN (SELECT id FROM changed)
            UNION SELECT ecosystem, package FROM old.affected WHERE advisory IN (SELECT id FROM changed)
        """).fetchall()
    finally:
        connection.execute("DETACH DATABASE old")
    return frozenset((str(e), str(p)) for e, p in rows)


def _previous_import_id(previous: Path) -> str | None:
    if not previous.exists():
        return None
    try:
        with contextlib.closing(_connect_ro(previous)) as connection:
            row = connection.execute("SELECT value FROM meta WHERE key = 'import_id'").fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def _connect_ro(path: Path) -> sqlite3.Connection:
    # immutable: the file is never changed in place (imports rename a new file over it).
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)


# ---- reading and matching ---------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseStatus:
    path: Path
    import_id: str
    previous_import_id: str
    imported_at: float
    source: str
    advisories: int
    withdrawn: int
    invalid: int
    per_ecosystem: dict[str, int]
    changed_packages: frozenset[tuple[str, str]] | None

    def age(self, now: float | None = None) -> float:
        """Seconds since the import."""
        return (time.time() if now is None else now) - self.imported_at

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        return {"path": str(self.path), "import_id": self.import_id, "imported_at": self.imported_at,
                "age_seconds": round(self.age(now), 3), "source": self.source, "advisories": self.advisories,
                "withdrawn": self.withdrawn, "invalid": self.invalid, "per_ecosystem": self.per_ecosystem}


@dataclass(frozen=True)
class Finding:
    """One advisory that applies to one installed package."""

    id: str
    aliases: tuple[str, ...]
    summary: str
    severity: str
    score: float | None
    package: str
    package_type: str
    installed_version: str
    fixed_version: str | None
    layer: str
    path: str
    ecosystem: str
    source_package: str | None = None
    matched_version: str | None = None  # the source version, when that is what the advisory names

    @property
    def ids(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "aliases": list(self.aliases), "summary": self.summary, "severity": self.severity,
            "score": self.score, "package": self.package, "package_type": self.package_type,
            "installed_version": self.installed_version, "fixed_version": self.fixed_version,
            "layer": self.layer, "path": self.path, "ecosystem": self.ecosystem,
        }
        if self.source_package:
            out["source_package"] = self.source_package
        if self.matched_version and self.matched_version != self.installed_version:
            out["matched_version"] = self.matched_version
        return out

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Finding:
        return cls(str(document["id"]), tuple(document.get("aliases", ())), str(document.get("summary", "")),
                   str(document["severity"]), document.get("score"), str(document["package"]),
                   str(document.get("package_type", "")), str(document["installed_version"]),
                   document.get("fixed_version"), str(document.get("layer", "")), str(document.get("path", "")),
                   str(document.get("ecosystem", "")), document.get("source_package"),
                   document.get("matched_version"))


@dataclass
class MatchResult:
    findings: list[Finding] = field(default_factory=list)
    unmatched_reasons: list[str] = field(default_factory=list)


def osv_coordinates(package: Package, distro: Distro | None) -> tuple[str, str, str] | None:
    """(ecosystem key, package key, version) under which advisories name ``package``, or None
    when they cannot (an OS package of an unknown or unsupported release)."""
    if package.type == DEB:
        ecosystem = distro.osv_ecosystem() if distro is not None else None
        if ecosystem is None or not ecosystem.startswith(("Debian:", "Ubuntu:")):
            return None
        return ecosystem, package.source_name or package.name, package.source_version or package.version
    if package.type == APK:
        ecosystem = distro.osv_ecosystem() if distro is not None else None
        if ecosystem is None or not ecosystem.startswith("Alpine:"):
            return None
        return ecosystem, package.source_name or package.name, package.version
    if package.type == PYPI:
        return "PyPI", _package_key("PyPI", package.name), package.version
    if package.type == NPM:
        return "npm", package.name, package.version
    if package.type == GOLANG:
        return "Go", package.name, package.version
    return None


def _evaluate(ecosystem: str, version: str, ranges: list[dict[str, Any]],
              versions: list[str]) -> tuple[bool, str | None]:
    """Whether ``version`` is affected, and the lowest fix above it (OSV's evaluation)."""
    compare = comparator_for(ecosystem)

    def equal(a: str, b: str) -> bool:
        try:
            return compare(a, b) == 0
        except InvalidVersion:
            return a == b

    affected_by_list = any(equal(version, listed) for listed in versions)
    fixes: list[str] = []
    affected_by_range = False
    for version_range in ranges:
        try:
            hit, fixed = _in_range(compare, version, version_range["events"])
        except InvalidVersion:
            continue  # an event or the installed version is not valid here: this range cannot decide
        if hit:
            affected_by_range = True
            if fixed is not None:
                fixes.append(fixed)
    if not (affected_by_list or affected_by_range):
        return False, None
    fixed_version = None
    for candidate in fixes:
        try:
            if fixed_version is None or compare(candidate, fixed_version) < 0:
                fixed_version = candidate
        except InvalidVersion:
            continue
    return True, fixed_version


def _in_range(compare: Any, version: str, events: list[dict[str, str]]) -> tuple[bool, str | None]:
    parsed = [next(iter(event.items())) for event in events]
    limits = [value for kind, value in parsed if kind == "limit"]
    points = [(kind, value) for kind, value in parsed if kind != "limit"]

    def sort_cmp(left: tuple[str, str], right: tuple[str, str]) -> int:
        # "introduced: 0" is below every version; otherwise the ecosystem's order.
        if left[1] == "0" and left[0] == "introduced":
            return 0 if right[1] == "0" and right[0] == "introduced" else -1
        if right[1] == "0" and right[0] == "introduced":
            return 1
        return int(compare(left[1], right[1]))

    points.sort(key=functools.cmp_to_key(sort_cmp))
    affected = False
    fixed: str | None = None
    for kind, value in points:
        if kind == "introduced":
            if value == "0" or compare(version, value) >= 0:
                affected, fixed = True, None
        elif kind == "fixed":
            if compare(version, value) >= 0:
                affected = False
            elif affected and fixed is None:
                fixed = value
        elif kind == "last_affected" and compare(version, value) > 0:
            affected = False
    if affected and any(compare(version, limit) >= 0 for limit in limits):
        affected = False
    return affected, fixed if affected else None


class VulnDatabase:
    """The imported database, read-only. Safe to use from any thread: each call opens its
    own connection to the file in use at that moment."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> VulnDatabase:
        return cls(database_path(data_dir))

    def exists(self) -> bool:
        return self.path.exists()

    def _connect(self) -> sqlite3.Connection:
        if not self.path.exists():
            raise DatabaseMissing("no vulnerability database imported (seed vulndb import)")
        try:
            return _connect_ro(self.path)
        except sqlite3.Error as exc:
            raise VulnDBError(f"cannot open {self.path}: {exc}") from exc

    def status(self) -> DatabaseStatus:
        with contextlib.closing(self._connect()) as connection:
            try:
                meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
                per_ecosystem = dict(connection.execute(
                    "SELECT ecosystem, COUNT(DISTINCT advisory) FROM affected GROUP BY ecosystem").fetchall())
            except sqlite3.Error as exc:
                raise VulnDBError(f"{self.path} is not a vulnerability database: {exc}") from exc
        changed = json.loads(meta.get("changed_packages", "null"))
        return DatabaseStatus(
            self.path, meta.get("import_id", ""), meta.get("previous_import_id", ""),
            float(meta.get("imported_at", "0")), meta.get("source", ""), int(meta.get("advisories", "0")),
            int(meta.get("withdrawn", "0")), int(meta.get("invalid", "0")), per_ecosystem,
            frozenset((str(e), str(p)) for e, p in changed) if changed is not None else None)

    def match(self, packages: Iterable[Package], distro: Distro | None) -> MatchResult:
        """The findings of ``packages`` installed on ``distro``."""
        result = MatchResult()
        grouped: dict[tuple[str, str], list[tuple[Package, str]]] = {}
        unmatched_os = 0
        for package in packages:
            coordinates = osv_coordinates(package, distro)
            if coordinates is None:
                unmatched_os += 1
                continue
            ecosystem, name, version = coordinates
            grouped.setdefault((ecosystem, name), []).append((package, version))
        if unmatched_os:
            what = f"{distro.id} {distro.version_id}".strip() if distro is not None else "an unknown distribution"
            result.unmatched_reasons.append(f"{unmatched_os} OS packages of {what} cannot be matched: advisories "
                                            "are published per release of Debian, Ubuntu and Alpine")
        with contextlib.closing(self._connect()) as connection:
            advisories: dict[str, tuple[tuple[str, ...], str]] = {}
            for (ecosystem, name), members in sorted(grouped.items()):
                rows = connection.execute(
                    "SELECT advisory, severity, score, ranges, versions FROM affected "
                    "WHERE ecosystem = ? AND package = ?", (ecosystem, name)).fetchall()
                for advisory, severity, score, ranges_json, versions_json in rows:
                    ranges, versions = json.loads(ranges_json), json.loads(versions_json)
                    for package, version in members:
                        hit, fixed = _evaluate(ecosystem, version, ranges, versions)
                        if not hit:
                            continue
                        if advisory not in advisories:
                            row = connection.execute("SELECT aliases, summary FROM advisories WHERE id = ?",
                                                     (advisory,)).fetchone()
                            advisories[advisory] = (tuple(json.loads(row[0])), str(row[1]))
                        aliases, summary = advisories[advisory]
                        result.findings.append(Finding(
                            advisory, aliases, summary, severity, score, package.name, package.type,
                            package.version, fixed, package.layer, package.path, ecosystem,
                            package.source_name if package.type in (DEB, APK) else None, version))
        # Several rows of one advisory can name one package (e.g. two ranges); report it once.
        unique: dict[tuple[str, str, str, str], Finding] = {}
        for finding in result.findings:
            unique.setdefault((finding.id, finding.package, finding.installed_version, finding.path), finding)
        result.findings = sorted(unique.values(), key=lambda f: (-severity_rank(f.severity), f.package, f.id))
        return result

