"""Scanning stored images end to end: real package databases in real layers, OSV advisories,
whiteouts, hostile layers, SBOM and report referrers, the pull policy, ``seed scan`` and ``seed vulndb``."""

from __future__ import annotations

import datetime
import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from p2pd.errors import ConfigError
from p2pd.oci import mediatypes
from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE
from p2pd.oci.digest import Digest, digest_of
from p2pd.oci.manifest import parse_manifest
from seed.cli import main as seed_main
from seed.scan.config import AcceptedRisk, LayerLimits, ScanningRule, from_toml
from seed.scan.errors import ScanError
from seed.scan.policy import decide_pull
from seed.scan.referrers import (
    KIND_ANNOTATION,
    REPORT_ARTIFACT_TYPE,
    build_attachments,
    build_referrer,
    replace_attachments,
)
from seed.scan.sbom import LAYER_PROPERTY, SBOM_MEDIA_TYPE, validate_sbom
from seed.scan.scanner import ScanReport, scan_image
from seed.scan.vulndb import VulnDatabase, import_database
from seed.storage import Storage
from tests.fixtures.scan.builders import (
    ALPINE_OS_RELEASE,
    APK_INSTALLED,
    Entry,
    StoredImage,
    dist_info_entries,
    file,
    gzip_layer,
    installed_dpkg_packages,
    machine_dpkg_status,
    machine_os_release,
    osv,
    store_image,
    store_index,
    synthetic_go_elf,
    tar_layer,
    write_osv_dir,
    zstd_layer,
)
from tests.harness.tools import require_tool

SITE = "usr/local/lib/python3.11/site-packages"
GO_MODINFO = ("path\texample.com/app\nmod\texample.com/app\tv1.0.0\th1:x=\n"
              "dep\tgolang.org/x/text\tv0.3.7\th1:y=\nbuild\tGOOS=linux\n")


def _go_version_of(binary: bytes) -> str:
    offset = binary.find(b"\xff Go buildinf:")
    while offset % 16:
        offset = binary.find(b"\xff Go buildinf:", offset + 1)
    length = binary[offset + 32]
    return binary[offset + 33:offset + 33 + length].decode().removeprefix("go")


@dataclass
class DebianImage:
    storage: Storage
    data: Path
    image: StoredImage
    expected: set[str]  # advisory ids that must be reported
    not_expected: set[str]
    layer_of: dict[str, Digest]  # advisory id → the layer that added its package
    osv_dir: Path


@pytest.fixture
def debian_image(tmp_path: Path) -> DebianImage:
    """An image built from this machine's own dpkg status and os-release, real wheels' dist-info,
    npm manifests, a real Go binary (umoci) and a Go binary with modules; advisories written
    against the installed versions."""
    data = tmp_path / "data"
    storage = Storage(data, chunk_size=DEFAULT_CHUNK_SIZE)
    status = machine_dpkg_status()
    os_release = machine_os_release()
    umoci = Path(require_tool("umoci")).read_bytes()
    h11_entries, _h11_dir, h11_version = dist_info_entries("h11", SITE)
    packaging_entries, packaging_dir, packaging_version = dist_info_entries("packaging", SITE)
    layer1 = gzip_layer([file("usr/lib/os-release", os_release),
                         Entry("etc/os-release", "symlink", target="../usr/lib/os-release"),
                         file("var/lib/dpkg/status", status)])
    layer2 = zstd_layer([*h11_entries, *packaging_entries,
                         file("srv/app/node_modules/lodash/package.json", '{"name":"lodash","version":"4.17.20"}'),
                         file("srv/app/node_modules/@babel/core/package.json",
                              '{"name":"@babel/core","version":"7.23.2"}'),
                         file("usr/local/bin/app", synthetic_go_elf("go1.21.3", GO_MODINFO))])
    layer3 = tar_layer([Entry(f"{SITE}/{packaging_dir}", "whiteout"), file("usr/bin/umoci", umoci)])
    image = store_image(storage, "team/app", "v1", [layer1, layer2, layer3])

    release = next(line.split("=", 1)[1].strip('"') for line in os_release.decode().splitlines()
                   if line.startswith("VERSION_ID="))
    distro_id = next(line.split("=", 1)[1].strip('"') for line in os_release.decode().splitlines()
                     if line.startswith("ID="))
    ecosystem = {"debian": f"Debian:{release.split('.')[0]}", "ubuntu": f"Ubuntu:{release}"}[distro_id]
    installed = installed_dpkg_packages(status)
    # A binary package built from a differently named source (libc6 from glibc): the
    # advisory names the source, the finding names the binary package.
    built = next(p for p in installed if p.get("Source", p["Package"]).split()[0] != p["Package"])
    source = built["Source"].split()[0]
    source_version = built["Source"].split("(")[1].rstrip(")") if "(" in built["Source"] else built["Version"]
    dpkg_itself = next(p for p in installed if p["Package"] == "dpkg")
    go_stdlib = _go_version_of(umoci)
    major, minor, patch = go_stdlib.split(".")
    records = [
        osv("DEBIAN-CVE-2099-0001", ecosystem, source, fixed=source_version + "+p2pd1", aliases=["CVE-2099-0001"],
            cvss="CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"),
        osv("DEBIAN-CVE-2099-0002", ecosystem, "dpkg", fixed=dpkg_itself["Version"]),  # installed = fixed
        osv("PYSEC-2099-1", "PyPI", "h11", fixed=h11_version + ".post1", severity_word="MODERATE"),
        osv("PYSEC-2099-2", "PyPI", "h11", fixed=h11_version),  # fixed in the installed version
        osv("PYSEC-2099-3", "PyPI", "packaging", fixed=packaging_version + ".post1"),  # whited out
        osv("GHSA-35jh-r3h4-6jhm", "npm", "lodash", fixed="4.17.21", aliases=["CVE-2021-23337"],
            cvss="CVSS:3.1/AV:N/AC:L/PR:H/UI:N/S:U/C:H/I:H/A:H"),
        osv("GHSA-67hx-6x53-jw92", "npm", "@babel/core", fixed="7.23.2", aliases=["CVE-2023-45133"]),
        osv("GO-2022-1059", "Go", "golang.org/x/text", fixed="0.3.8", range_type="SEMVER",
            aliases=["CVE-2022-32149"]),
        osv("GO-2099-0001", "Go", "stdlib", fixed=f"{major}.{minor}.{int(patch) + 1}", range_type="SEMVER"),
    ]
    osv_dir = write_osv_dir(tmp_path / "osv", records)
    import_database(data, osv_dir)
    digests = image.layers
    return DebianImage(
        storage, data, image,
        expected={"DEBIAN-CVE-2099-0001", "PYSEC-2099-1", "GHSA-35jh-r3h4-6jhm", "GO-2022-1059", "GO-2099-0001"},
        not_expected={"DEBIAN-CVE-2099-0002", "PYSEC-2099-2", "PYSEC-2099-3", "GHSA-67hx-6x53-jw92"},
        layer_of={"DEBIAN-CVE-2099-0001": digests[0], "PYSEC-2099-1": digests[1], "GHSA-35jh-r3h4-6jhm": digests[1],
                  "GO-2022-1059": digests[1], "GO-2099-0001": digests[2]},
        osv_dir=osv_dir)


def scan(fixture: DebianImage, **kwargs: Any) -> ScanReport:
    return scan_image(fixture.storage, fixture.image.repository, fixture.image.digest,
                      database=VulnDatabase.for_data_dir(fixture.data), **kwargs)


def test_vulnerable_versions_are_reported_fixed_ones_are_not(debian_image: DebianImage) -> None:
    report = scan(debian_image)
    assert report.status == "complete", report.problems
    (platform,) = report.platforms
    assert platform.distro is not None and platform.platform is not None
    found = {finding.id for _platform, finding in report.findings}
    assert found >= debian_image.expected
    assert not found & debian_image.not_expected
    for _platform, finding in report.findings:
        if finding.id in debian_image.layer_of:
            assert finding.layer == str(debian_image.layer_of[finding.id]), finding
    debian = next(f for _p, f in report.findings if f.id == "DEBIAN-CVE-2099-0001")
    assert debian.source_package is not None and debian.package != debian.source_package
    assert debian.severity == "critical" and debian.fixed_version and debian.fixed_version.endswith("+p2pd1")
    # Every installed dpkg package is in the inventory, attributed to the first layer.
    names = {p.name for p in platform.packages if p.type == "deb"}
    assert names == {p["Package"] for p in installed_dpkg_packages(machine_dpkg_status())}
    assert not any(p.name == "packaging" for p in platform.packages)  # removed by a whiteout
    document = report.to_json()
    for entry in document["findings"]:
        assert {"id", "aliases", "package", "installed_version", "fixed_version", "severity", "layer"} <= set(entry)
    assert ScanReport.from_json(json.loads(report.to_bytes())).to_json() == document


def test_sbom_and_report_referrers(debian_image: DebianImage) -> None:
    report = scan(debian_image)
    artifacts = build_attachments(report)
    assert [a.kind for a in artifacts] == ["sbom", "report"]
    sbom_blob = artifacts[0].blobs[1][1]
    validate_sbom(sbom_blob)
    sbom = json.loads(sbom_blob)
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    purls = {c["purl"] for c in sbom["components"]}
    assert "pkg:npm/lodash@4.17.20" in purls and "pkg:golang/golang.org/x/text@v0.3.7" in purls
    assert any(p.startswith("pkg:deb/debian/") and "distro=debian-" in p for p in purls) or \
        any(p.startswith("pkg:deb/ubuntu/") for p in purls)
    assert any(p.startswith("pkg:pypi/h11@") for p in purls)
    layers = {prop["value"] for c in sbom["components"] for prop in c["properties"] if prop["name"] == LAYER_PROPERTY}
    assert layers == {str(d) for d in debian_image.image.layers}

    storage, repository = debian_image.storage, debian_image.image.repository
    assert replace_attachments(storage, repository, artifacts) == []
    referrers = storage.referrers(repository, debian_image.image.digest)
    assert sorted(r.artifact_type or "" for r in referrers) == sorted([SBOM_MEDIA_TYPE, REPORT_ARTIFACT_TYPE])
    for referrer in referrers:
        _stored, body = storage.get_manifest(repository, str(referrer.digest))
        parsed = parse_manifest(body, mediatypes.OCI_MANIFEST)
        assert parsed.subject is not None and parsed.subject.digest == debian_image.image.digest
        assert all(storage.repository_blob_size(repository, ref.digest) for ref in parsed.references)
    # An artifact is not scanned as an image.
    artifact_report = scan_image(storage, repository, artifacts[0].digest, database=None)
    assert artifact_report.platforms == [] and "not a container image" in artifact_report.notes[0]
    # Later attachments replace the earlier ones of their kind instead of piling up.
    again = [build_referrer(a.subject, a.artifact_type, a.blobs[1][1] + b"\n", kind=a.kind,
                            created=report.scanned_at + 60) for a in artifacts]
    removed = replace_attachments(storage, repository, again)
    assert sorted(removed, key=str) == sorted((a.digest for a in artifacts), key=str)
    kinds = sorted((r.annotations or {}).get(KIND_ANNOTATION, "") for r in storage.referrers(
        repository, debian_image.image.digest))
    assert kinds == ["report", "sbom"]


def test_sbom_validation_rejects_invalid_documents(debian_image: DebianImage) -> None:
    report = scan(debian_image)
    sbom = json.loads(build_attachments(report)[0].blobs[1][1])
    duplicated = {**sbom, "components": [*sbom["components"], sbom["components"][0]]}
    with pytest.raises(ScanError, match="non-unique"):
        validate_sbom(json.dumps(duplicated))
    wrong_type = {**sbom, "components": [{**sbom["components"][0], "type": "spaceship"}]}
    with pytest.raises(ScanError, match="spaceship"):
        validate_sbom(json.dumps(wrong_type))
    with pytest.raises(ScanError):
        validate_sbom(json.dumps({**sbom, "specVersion": 1.6}))


def test_alpine_and_a_multi_platform_index(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "data", chunk_size=DEFAULT_CHUNK_SIZE)
    alpine = store_image(storage, "base/alpine", None, [gzip_layer([
        file("etc/os-release", ALPINE_OS_RELEASE), file("lib/apk/db/installed", APK_INSTALLED)])])
    arm = store_image(storage, "base/alpine", None, [gzip_layer([
        file("etc/os-release", ALPINE_OS_RELEASE),
        file("lib/apk/db/installed", APK_INSTALLED.replace("3.1.4-r1", "3.1.4-r5"))])], architecture="arm64")
    index = store_index(storage, "base/alpine", "3.19", [(alpine, "amd64"), (arm, "arm64")])
    import_database(tmp_path / "data", write_osv_dir(tmp_path / "osv", [
        osv("ALPINE-CVE-2023-5678", "Alpine:v3.19", "openssl", fixed="3.1.4-r3", aliases=["CVE-2023-5678"]),
        osv("ALPINE-CVE-2099-1", "Alpine:v3.19", "busybox", fixed="1.36.1-r15"),
    ]))
    report = scan_image(storage, "base/alpine", index, database=VulnDatabase.for_data_dir(tmp_path / "data"))
    assert report.media_type == mediatypes.OCI_INDEX and report.status == "complete"
    assert [p.platform for p in report.platforms] == ["linux/amd64", "linux/arm64"]
    amd64, arm64 = report.platforms
    assert sorted(f.package for f in amd64.findings) == ["libcrypto3", "libssl3"]
    assert {f.source_package for f in amd64.findings} == {"openssl"}
    assert arm64.findings == []
    artifacts = build_attachments(report)
    assert [a.subject.digest for a in artifacts] == [alpine.digest, arm.digest, index]


def _files_under(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def test_hostile_layers_are_errors_of_the_scan(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "data", chunk_size=DEFAULT_CHUNK_SIZE)
    good = gzip_layer([file("etc/os-release", 'ID=debian\nVERSION_ID="12"\n'),
                       file("var/lib/dpkg/status", "Package: zlib1g\nStatus: install ok installed\nVersion: "
                            "1:1.2.13.dfsg-1\nArchitecture: amd64\nSource: zlib\n")])
    traversal = tar_layer([file("../../../escape-relative", "x"), file("/tmp/escape-absolute", "x"),
                           Entry("loop", "symlink", target="loop"), file("loop/var/lib/dpkg/status", "x"),
                           Entry("evil", "symlink", target="../../../../"), file("evil/escape-through-link", "x")])
    bomb = gzip_layer([file("var/lib/dpkg/status", "Package: hidden\nStatus: install ok installed\nVersion: 1\n"),
                       file("zeros", bytes(24 * 1024 * 1024))])
    truncated = gzip_layer([file("var/lib/dpkg/status", "Package: cut\nVersion: 1\n"),
                            file("big", os.urandom(100_000))])[:-1000]
    tampered = gzip_layer([file("var/lib/dpkg/status", "Package: tampered\nStatus: install ok installed\n"
                                "Version: 1\n")])
    promised = digest_of(b"what the manifest promised")
    image = store_image(storage, "hostile/app", "latest", [good, traversal, bomb, truncated, tampered],
                        declared_digests=[None, None, None, None, promised])
    before = _files_under(tmp_path)
    limits = LayerLimits(ratio_floor=4 * 1024 * 1024, max_ratio=50)
    report = scan_image(storage, "hostile/app", image.digest, database=None, limits=limits)
    assert _files_under(tmp_path) == before  # the scan wrote nothing at all
    assert not list(tmp_path.parent.glob("escape*")) and not Path("/tmp/escape-absolute").exists()
    assert report.status == "incomplete"
    problems = [(p.kind, p.fatal, p.layer) for p in report.problems]
    digests = [str(d) for d in image.layers]
    assert ("path-traversal", False, digests[1]) in problems
    assert ("absolute-path", False, digests[1]) in problems
    assert ("symlink-loop", False, digests[1]) in problems
    assert ("decompression-bomb", True, digests[2]) in problems
    assert ("truncated", True, digests[3]) in problems
    assert ("digest-mismatch", True, digests[4]) in problems
    (platform,) = report.platforms
    # What the good layer holds is still inventoried; nothing of the rejected layers is.
    assert [(p.name, p.source_name) for p in platform.packages] == [("zlib1g", "zlib")]
    assert report.to_json()["problems"]


# ---- policy and configuration -----------------------------------------------------------


def test_pull_policy(debian_image: DebianImage) -> None:
    report = scan(debian_image)
    today = datetime.date(2030, 1, 1)
    critical = ScanningRule(("team/**",), block_severity="critical")
    decision = decide_pull([critical], "team/app", report, today=today)
    assert not decision.allowed and decision.advisories == ("DEBIAN-CVE-2099-0001",)
    # Accepted by its alias until an expiry date.
    accepted = ScanningRule(("team/**",), "critical", (AcceptedRisk("CVE-2099-0001", datetime.date(2030, 6, 30)),))
    assert decide_pull([accepted], "team/app", report, today=today).allowed
    assert not decide_pull([accepted], "team/app", report, today=datetime.date(2030, 7, 1)).allowed
    high = ScanningRule(("team/**",), block_severity="high", allow=(AcceptedRisk("DEBIAN-CVE-2099-0001"),))
    assert decide_pull([high], "team/app", report, today=today).advisories == ("GHSA-35jh-r3h4-6jhm",)
    assert decide_pull([critical], "other/app", report, today=today).allowed  # no rule matches
    first_wins = [ScanningRule(("team/app",)), critical]
    assert decide_pull(first_wins, "team/app", report, today=today).allowed
    deny_unscanned = ScanningRule(("team/**",), "critical", unscanned="deny")
    assert not decide_pull([deny_unscanned], "team/app", None, today=today).allowed
    assert decide_pull([critical], "team/app", None, today=today).allowed


def test_scanning_configuration_from_toml() -> None:
    document = tomllib.loads("""
[storage]
data = "/var/lib/seed"

[scan]
queue_size = 10
workers = 2
cpu_share = 0.25

[scan.limits]
max_ratio = 50
max_entries = 1000

[[scanning]]
repositories = ["prod/**", "base/*"]
block_severity = "high"
unscanned = "deny"
allow = [ { id = "CVE-2024-0001", expires = 2026-12-31, reason = "not reachable" }, "GHSA-aaaa-bbbb-cccc" ]
""")
    settings = from_toml(document)
    assert (settings.scan.queue_size, settings.scan.workers, settings.scan.cpu_share) == (10, 2, 0.25)
    assert (settings.scan.limits.max_ratio, settings.scan.limits.max_entries) == (50.0, 1000)
    (rule,) = settings.rules
    assert rule.allow == (AcceptedRisk("CVE-2024-0001", datetime.date(2026, 12, 31), "not reachable"),
                          AcceptedRisk("GHSA-aaaa-bbbb-cccc"))
    assert settings.rule_for("prod/x/y") is rule and settings.rule_for("base/a/b") is None
    for bad in ('[scan]\nworkers = 0', '[scan]\nunknown = 1', '[[scanning]]\nrepositories = ["x"]\n'
                'block_severity = "severe"', '[[scanning]]\nrepositories = []', '[scan.limits]\nmax_entries = "many"',
                '[[scanning]]\nrepositories = ["x"]\nallow = [{ id = "X", expires = "tomorrow" }]'):
        with pytest.raises(ConfigError):
            from_toml(tomllib.loads(bad))


# ---- command line -----------------------------------------------------------------------


def test_seed_vulndb_and_seed_scan_commands(debian_image: DebianImage, capsys: pytest.CaptureFixture[str]) -> None:
    data = str(debian_image.data)
    assert seed_main(["vulndb", "import", "--data", data, str(debian_image.osv_dir)]) == 0
    assert "imported 9 advisories" in capsys.readouterr().out
    assert seed_main(["vulndb", "status", "--data", data, "--format", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["advisories"] == 9 and status["per_ecosystem"]["npm"] == 2 and status["age_seconds"] >= 0
    assert seed_main(["vulndb", "status", "--data", data]) == 0
    assert "npm" in capsys.readouterr().out

    assert seed_main(["scan", "--data", data, "team/app:v1", "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert {f["id"] for f in document["findings"]} >= debian_image.expected
    assert document["status"] == "complete" and document["summary"]["critical"] >= 1
    assert seed_main(["scan", "--data", data, f"team/app@{debian_image.image.digest}"]) == 0
    table = capsys.readouterr().out
    assert "GHSA-35jh-r3h4-6jhm" in table and "lodash" in table
    assert seed_main(["scan", "--data", data, "team/app:v1", "--format", "json", "--fail-on", "critical"]) == 3
    capsys.readouterr()
    assert seed_main(["scan", "--data", data, "team/app:missing"]) == 1
    assert seed_main(["vulndb", "import", "--data", data, str(debian_image.data / "nowhere")]) == 1
    assert "stays in use" in capsys.readouterr().err
