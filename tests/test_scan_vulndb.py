"""The OSV database: validated, atomic imports, status, OSV range semantics, severities."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from seed.scan.errors import DatabaseMissing, InvalidAdvisory, VulnDBError
from seed.scan.packages import Distro, Package
from seed.scan.vulndb import (
    VulnDatabase,
    advisory_severity,
    cvss_severity,
    database_path,
    ecosystem_key,
    import_database,
    validate_record,
)
from tests.fixtures.scan.builders import osv, write_osv_dir

DEBIAN_12 = Distro("debian", "12")
ALPINE_319 = Distro("alpine", "3.19.0")


def load(tmp_path: Path, records: list[dict[str, Any]], name: str = "osv") -> VulnDatabase:
    import_database(tmp_path / "data", write_osv_dir(tmp_path / name, records))
    return VulnDatabase.for_data_dir(tmp_path / "data")


def ids(database: VulnDatabase, packages: list[Package], distro: Distro | None = None) -> list[tuple[str, str]]:
    return sorted((f.id, f.package) for f in database.match(packages, distro).findings)


def test_import_a_directory_and_status(tmp_path: Path) -> None:
    records = [osv("GHSA-aaaa-bbbb-cccc", "PyPI", "Requests", fixed="2.31.0", aliases=["CVE-2023-32681"]),
               osv("DEBIAN-CVE-2024-0001", "Debian:12", "openssl", fixed="3.0.13-1~deb12u1"),
               osv("ALPINE-CVE-2024-0002", "Alpine:v3.19", "openssl", fixed="3.1.4-r5"),
               {**osv("GHSA-dead-dead-dead", "npm", "x", fixed="1.0.0"), "withdrawn": "2024-02-01T00:00:00Z"}]
    import_database(tmp_path / "data", write_osv_dir(tmp_path / "osv", records), now=1_700_000_000.0)
    status = VulnDatabase.for_data_dir(tmp_path / "data").status()
    assert (status.advisories, status.withdrawn, status.invalid) == (3, 1, 0)
    assert status.per_ecosystem == {"PyPI": 1, "Debian:12": 1, "Alpine:v3.19": 1}
    assert status.imported_at == 1_700_000_000.0 and status.age(1_700_000_060.0) == 60.0
    assert status.changed_packages is None  # nothing before it
    assert database_path(tmp_path / "data").is_file()
    assert list((tmp_path / "data" / "scan" / "tmp").iterdir()) == []


def test_import_a_zip_as_osv_publishes(tmp_path: Path) -> None:
    archive = tmp_path / "all.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for index in range(30):
            record = osv(f"PYSEC-2024-{index}", "PyPI", f"package-{index}", fixed="1.0")
            handle.writestr(f"PYSEC-2024-{index}.json", json.dumps(record))
        handle.writestr("README.txt", "not a record")
    result = import_database(tmp_path / "data", archive)
    assert result.advisories == 30 and result.per_ecosystem == {"PyPI": 30}


def test_invalid_records_are_skipped_or_fail_a_strict_import(tmp_path: Path) -> None:
    good = osv("GHSA-good-good-good", "PyPI", "good", fixed="1.0")
    bad = [
        {"id": "NO-MODIFIED", "affected": []},
        {**good, "id": "BAD-EVENT", "affected": [{"package": {"ecosystem": "PyPI", "name": "x"},
                                                  "ranges": [{"type": "ECOSYSTEM", "events": [{"fixed": "1"}]}]}]},
        {**good, "id": "BAD-RANGE", "affected": [{"package": {"ecosystem": "PyPI", "name": "x"},
                                                  "ranges": [{"type": "DATE", "events": [{"introduced": "0"}]}]}]},
        {**good, "id": "BAD-PACKAGE", "affected": [{"versions": ["1.0"]}]},
    ]
    source = write_osv_dir(tmp_path / "osv", [good, *bad])
    (source / "broken.json").write_text("{ not json")
    result = import_database(tmp_path / "data", source)
    assert (result.advisories, result.invalid) == (1, 5)
    assert len(result.invalid_examples) == 5
    with pytest.raises(VulnDBError, match="invalid OSV record"):
        import_database(tmp_path / "data2", source, strict=True)
    for record in bad:
        with pytest.raises(InvalidAdvisory):
            validate_record(record)


def test_a_failed_import_leaves_the_previous_database_in_use(tmp_path: Path) -> None:
    database = load(tmp_path, [osv("GHSA-one", "PyPI", "one", fixed="2.0")])
    first = database.status().import_id
    broken = write_osv_dir(tmp_path / "broken", [osv("GHSA-two", "PyPI", "two", fixed="2.0"), {"id": "x"}])
    with pytest.raises(VulnDBError):
        import_database(tmp_path / "data", broken, strict=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(VulnDBError, match="no valid OSV advisory"):
        import_database(tmp_path / "data", tmp_path / "empty")
    (tmp_path / "corrupt.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(VulnDBError):
        import_database(tmp_path / "data", tmp_path / "corrupt.zip")
    assert database.status().import_id == first
    assert ids(database, [Package("pypi", "one", "1.0")]) == [("GHSA-one", "one")]
    assert list((tmp_path / "data" / "scan" / "tmp").iterdir()) == []


def test_changed_packages_between_imports(tmp_path: Path) -> None:
    base = [osv("GHSA-same", "PyPI", "same", fixed="1.0"), osv("GHSA-edit", "npm", "edited", fixed="1.0"),
            osv("GHSA-gone", "Go", "example.com/gone", fixed="1.0")]
    database = load(tmp_path, base, "v1")
    first = database.status()
    changed = [base[0], osv("GHSA-edit", "npm", "edited", fixed="1.1", modified="2024-02-01T00:00:00Z"),
               osv("DEBIAN-CVE-1", "Debian:12", "glibc", fixed="2.36-9+deb12u4")]
    result = import_database(tmp_path / "data", write_osv_dir(tmp_path / "v2", changed))
    assert result.changed_packages == {("npm", "edited"), ("Go", "example.com/gone"), ("Debian:12", "glibc")}
    second = database.status()
    assert second.previous_import_id == first.import_id and second.changed_packages == result.changed_packages


def test_match_needs_a_database(tmp_path: Path) -> None:
    with pytest.raises(DatabaseMissing):
        VulnDatabase.for_data_dir(tmp_path).match([Package("pypi", "x", "1.0")], None)


# ---- matching ---------------------------------------------------------------------------


def test_osv_range_semantics(tmp_path: Path) -> None:
    database = load(tmp_path, [
        osv("FIXED", "PyPI", "pkg", introduced="1.0", fixed="1.5"),
        osv("LAST", "PyPI", "pkg", introduced="0", last_affected="1.2"),
        osv("LISTED", "PyPI", "pkg", introduced="9.0", fixed="9.0", versions=["2.0", "2.1"]),
        {**osv("TWO-RANGES", "PyPI", "pkg"), "affected": [{
            "package": {"ecosystem": "PyPI", "name": "pkg"},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "0.5"},
                                                         {"introduced": "3.0"}, {"fixed": "3.2"}]}]}]},
        {**osv("LIMITED", "PyPI", "pkg"), "affected": [{
            "package": {"ecosystem": "PyPI", "name": "pkg"},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "4.0"}, {"limit": "4.2"}]}]}]},
    ])
    cases = {
        "0.1": ["LAST", "TWO-RANGES"], "0.5": ["LAST"], "1.0": ["FIXED", "LAST"], "1.2": ["FIXED", "LAST"],
        "1.3": ["FIXED"], "1.5": [], "2.0": ["LISTED"], "2.1": ["LISTED"], "2.2": [], "3.1": ["TWO-RANGES"],
        "3.2": [], "4.1": ["LIMITED"], "4.2": [], "1.0rc1": ["LAST"],  # a pre-release of 1.0 is below introduced=1.0
    }
    for version, expected in cases.items():
        found = database.match([Package("pypi", "PKG", version)], None).findings
        assert sorted(f.id for f in found) == expected, version
    (fixed,) = [f for f in database.match([Package("pypi", "pkg", "1.3")], None).findings]
    assert fixed.fixed_version == "1.5"
    (two,) = [f for f in database.match([Package("pypi", "pkg", "3.1")], None).findings]
    assert two.fixed_version == "3.2"


def test_semver_ecosystems_with_v_prefixes(tmp_path: Path) -> None:
    database = load(tmp_path, [
        osv("GO-2022-1059", "Go", "golang.org/x/text", fixed="0.3.8", range_type="SEMVER",
            aliases=["CVE-2022-32149", "GHSA-69ch-w2m2-3vjp"]),
        osv("GO-2023-1751", "Go", "stdlib", fixed="1.19.9", range_type="SEMVER"),
        osv("GHSA-35jh-r3h4-6jhm", "npm", "lodash", fixed="4.17.21",
            cvss="CVSS:3.1/AV:N/AC:L/PR:H/UI:N/S:U/C:H/I:H/A:H"),
    ])
    packages = [Package("golang", "golang.org/x/text", "v0.3.7"), Package("golang", "golang.org/x/text", "v0.3.8"),
                Package("golang", "stdlib", "1.19.8"), Package("golang", "stdlib", "1.20.0-rc.2"),
                Package("npm", "lodash", "4.17.20"), Package("npm", "lodash", "4.17.21")]
    found = database.match(packages, None).findings
    assert sorted((f.id, f.installed_version) for f in found) == [
        ("GHSA-35jh-r3h4-6jhm", "4.17.20"), ("GO-2022-1059", "v0.3.7"), ("GO-2023-1751", "1.19.8")]
    lodash = next(f for f in found if f.package == "lodash")
    assert (lodash.severity, lodash.score, lodash.fixed_version) == ("high", 7.2, "4.17.21")
    text = next(f for f in found if f.package == "golang.org/x/text")
    assert text.aliases == ("CVE-2022-32149", "GHSA-69ch-w2m2-3vjp") and text.severity == "unknown"


def test_debian_advisories_name_source_packages(tmp_path: Path) -> None:
    database = load(tmp_path, [
        osv("DEBIAN-CVE-2023-4911", "Debian:12", "glibc", fixed="2.36-9+deb12u3", aliases=["CVE-2023-4911"],
            cvss="CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:H/A:H"),
        osv("DEBIAN-CVE-2011-0001", "Debian:11", "glibc", fixed="9.9"),
        osv("DEBIAN-CVE-2024-0002", "Debian:12", "openssl"),  # no fix yet: every version
    ])
    libc6 = Package("deb", "libc6", "2.36-9+deb12u1", "glibc", "2.36-9+deb12u1", "amd64", "sha256:aa",
                    "var/lib/dpkg/status")
    libc_bin = Package("deb", "libc-bin", "2.36-9+deb12u3", "glibc", "2.36-9+deb12u3", "amd64")
    # A binNMU: the binary version has +b1, the advisory is about the source version.
    libssl = Package("deb", "libssl3", "3.0.11-1~deb12u2+b1", "openssl", "3.0.11-1~deb12u2", "amd64")
    found = database.match([libc6, libc_bin, libssl], DEBIAN_12).findings
    assert sorted((f.id, f.package) for f in found) == [("DEBIAN-CVE-2023-4911", "libc6"),
                                                        ("DEBIAN-CVE-2024-0002", "libssl3")]
    glibc = next(f for f in found if f.package == "libc6")
    assert (glibc.source_package, glibc.fixed_version, glibc.severity, glibc.layer) == \
        ("glibc", "2.36-9+deb12u3", "high", "sha256:aa")
    openssl = next(f for f in found if f.package == "libssl3")
    assert openssl.matched_version == "3.0.11-1~deb12u2" and openssl.installed_version == "3.0.11-1~deb12u2+b1"
    # Without the release, OS packages cannot be matched (and the result says why).
    unknown = database.match([libc6], None)
    assert unknown.findings == [] and unknown.unmatched_reasons


def test_alpine_advisories_name_origins(tmp_path: Path) -> None:
    database = load(tmp_path, [osv("ALPINE-CVE-2023-5678", "Alpine:v3.19", "openssl", fixed="3.1.4-r3")])
    packages = [Package("apk", "libcrypto3", "3.1.4-r1", "openssl"), Package("apk", "libssl3", "3.1.4-r3", "openssl")]
    assert ids(database, packages, ALPINE_319) == [("ALPINE-CVE-2023-5678", "libcrypto3")]
    assert ids(database, packages, Distro("alpine", "3.18.4")) == []


def test_severity_sources() -> None:
    assert cvss_severity("CVSS_V3", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H") == ("critical", 9.8)
    assert cvss_severity("CVSS_V3", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H") == ("critical", 10.0)
    assert cvss_severity("CVSS_V3", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N") == ("high", 7.5)
    assert cvss_severity("CVSS_V3", "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N") == ("medium", 6.1)
    assert cvss_severity("CVSS_V3", "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:N") == ("none", 0.0)
    assert cvss_severity("CVSS_V4", "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N") == \
        ("critical", 9.3)
    assert cvss_severity("CVSS_V2", "AV:N/AC:L/Au:N/C:P/I:P/A:P") == ("high", 7.5)
    assert cvss_severity("CVSS_V3", "not a vector") is None
    record = osv("GHSA-x", "npm", "x", severity_word="MODERATE")
    assert advisory_severity(record) == ("medium", None)
    record["severity"] = [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:N/A:N"}]
    assert advisory_severity(record) == ("high", 7.5)  # the score wins over the word
    ubuntu = osv("UBUNTU-CVE-1", "Ubuntu:22.04:LTS", "x")
    ubuntu["severity"] = [{"type": "Ubuntu", "score": "negligible"}]
    assert advisory_severity(ubuntu) == ("low", None)
    assert advisory_severity(osv("X", "npm", "x")) == ("unknown", None)
    assert ecosystem_key("Ubuntu:Pro:18.04:LTS") == ecosystem_key("Ubuntu:18.04:LTS") == "Ubuntu:18.04"
