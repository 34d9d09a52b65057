"""Package sources: real dpkg status checked against dpkg-query, apk, Python, npm, Go build info."""

from __future__ import annotations

import io
import json
from importlib import metadata
from pathlib import Path

from p2pd.oci.digest import digest_of
from seed.scan.config import LayerLimits
from seed.scan.layers import ImageFilesystem
from seed.scan.packages import (
    GoBuildInfoProbe,
    Package,
    PackageFileSelector,
    inventory,
    parse_apk_installed,
    parse_dpkg_status,
    parse_go_modinfo,
    parse_npm_package_json,
    parse_os_release,
    parse_python_metadata,
)
from tests.fixtures.scan.builders import (
    ALPINE_OS_RELEASE,
    APK_INSTALLED,
    Entry,
    dist_info_entries,
    file,
    machine_dpkg_status,
    synthetic_go_elf,
    tar_layer,
)
from tests.harness.tools import require_tool, run

MODINFO = """path\texample.com/app/cmd/app
mod\texample.com/app\tv1.4.0\th1:aaaa=
dep\tgolang.org/x/text\tv0.3.7\th1:bbbb=
dep\tgithub.com/pkg/errors\tv0.9.1\th1:cccc=
=>\tgithub.com/pkg/errors\tv0.9.2-fork\th1:dddd=
dep\texample.com/local\tv1.0.0\th1:eeee=
=>\t../local\t
build\t-compiler=gc
build\tGOOS=linux
"""


def build(layers: list[bytes]) -> ImageFilesystem:
    filesystem = ImageFilesystem(PackageFileSelector(), LayerLimits())
    for layer in layers:
        assert filesystem.apply_layer(io.BytesIO(layer), digest_of(layer), len(layer)) == []
    return filesystem


def test_dpkg_status_matches_dpkg_query() -> None:
    dpkg_query = require_tool("dpkg-query")
    output = run([dpkg_query, "-W", "-f", "${db:Status-Status}\t${Package}\t${Version}\t${Architecture}\t"
                  "${source:Package}\t${source:Version}\n"], timeout=60).stdout.decode()
    expected = {tuple(line.split("\t")[1:]) for line in output.splitlines() if line.startswith("installed\t")}
    parsed = parse_dpkg_status(machine_dpkg_status().decode())
    assert len(parsed) > 50
    assert {(p.name, p.version, p.arch, p.source_name, p.source_version) for p in parsed} == expected
    # Binary packages built from a differently named source are common (libc6 from glibc).
    assert any(p.source_name != p.name for p in parsed)


def test_dpkg_status_d_of_distroless() -> None:
    stanza = ("Package: libssl3\nVersion: 3.0.11-1~deb12u2\nArchitecture: amd64\n"
              "Source: openssl (3.0.11-1~deb12u2)\nDescription: Secure Sockets Layer toolkit\n multi-line\n")
    (package,) = parse_dpkg_status(stanza, require_status=False)
    assert (package.name, package.source_name, package.source_version) == ("libssl3", "openssl", "3.0.11-1~deb12u2")
    removed = "Package: gone\nStatus: deinstall ok config-files\nVersion: 1.0\n"
    assert parse_dpkg_status(removed) == []


def test_apk_installed() -> None:
    packages = parse_apk_installed(APK_INSTALLED)
    assert [(p.name, p.version, p.source_name, p.arch) for p in packages] == [
        ("musl", "1.2.4_git20230717-r4", "musl", "x86_64"),
        ("libcrypto3", "3.1.4-r1", "openssl", "x86_64"),
        ("libssl3", "3.1.4-r1", "openssl", "x86_64"),
        ("busybox", "1.36.1-r15", "busybox", "x86_64"),
    ]


def test_python_metadata_of_a_real_wheel() -> None:
    for name in ("packaging", "h11", "trio"):
        dist = metadata.distribution(name)
        package = parse_python_metadata(dist.read_text("METADATA") or "")  # the installed wheel's own file
        assert package is not None and package.version == dist.version and package.name.lower() == name


def test_npm_package_json() -> None:
    assert parse_npm_package_json(json.dumps({"name": "@babel/core", "version": "7.23.2"}).encode()) == \
        Package("npm", "@babel/core", "7.23.2")
    assert parse_npm_package_json(b"{not json") is None
    assert parse_npm_package_json(b'{"name": "x"}') is None


def test_selector_paths() -> None:
    selector = PackageFileSelector()
    wanted = ["var/lib/dpkg/status", "var/lib/dpkg/status.d/base-files", "lib/apk/db/installed",
              "usr/lib/python3/dist-packages/six-1.16.0.dist-info/METADATA",
              "usr/lib/python3.11/site-packages/foo-1.0-py3.11.egg-info/PKG-INFO",
              "usr/lib/python3/dist-packages/old-1.0.egg-info",
              "app/node_modules/lodash/package.json", "app/node_modules/@babel/core/package.json",
              "app/node_modules/a/node_modules/b/package.json", "etc/os-release", "usr/lib/os-release"]
    unwanted = ["var/lib/dpkg/status.d/base-files.md5sums", "var/lib/dpkg/status-old",
                "app/node_modules/lodash/lib/package.json", "app/package.json", "usr/share/doc/METADATA",
                "var/lib/dpkg/status.d/sub/x"]
    assert all(selector.capture_limit(p) is not None for p in wanted)
    assert all(selector.capture_limit(p) is None for p in unwanted)


def test_go_build_info_of_a_real_binary() -> None:
    umoci = Path(require_tool("umoci")).read_bytes()
    filesystem = build([tar_layer([file("usr/bin/umoci", umoci)])])
    found = inventory(filesystem)
    stdlib = [p for p in found.packages if p.type == "golang" and p.name == "stdlib"]
    assert len(stdlib) == 1 and stdlib[0].version.count(".") == 2
    # The same build info `go version` would print: compare with the binary's own header.
    offset = umoci.find(b"\xff Go buildinf:")
    while offset % 16:
        offset = umoci.find(b"\xff Go buildinf:", offset + 1)
    version_length = umoci[offset + 32]
    go_version = umoci[offset + 33:offset + 33 + version_length].decode()
    assert stdlib[0].version == go_version.removeprefix("go")


def test_go_build_info_with_modules_and_a_decoy() -> None:
    binary = synthetic_go_elf("go1.21.3", MODINFO)
    filesystem = build([tar_layer([file("app/server", binary), file("app/not-elf", b"\xff Go buildinf:" + bytes(64))])])
    found = inventory(filesystem)
    assert [(p.name, p.version, p.path) for p in found.packages] == [
        ("example.com/app", "v1.4.0", "app/server"),
        ("github.com/pkg/errors", "v0.9.2-fork", "app/server"),
        ("golang.org/x/text", "v0.3.7", "app/server"),
        ("stdlib", "1.21.3", "app/server"),
    ]
    # Fed in small, unaligned pieces, the probe finds the same header.
    probe = GoBuildInfoProbe()
    for start in range(0, len(binary), 333):
        if not probe.feed(binary[start:start + 333]):
            break
    result = probe.result()
    assert result is not None and result.go_version == "go1.21.3" and len(result.deps) == 2


def test_go_modinfo_replacements() -> None:
    info = parse_go_modinfo("go1.22.1 X:boringcrypto", MODINFO)
    assert info.go_version == "go1.22.1"
    assert info.main == ("example.com/app", "v1.4.0")
    assert info.deps == (("golang.org/x/text", "v0.3.7"), ("github.com/pkg/errors", "v0.9.2-fork"))


def test_os_release() -> None:
    distro = parse_os_release(ALPINE_OS_RELEASE)
    assert distro is not None and distro.osv_ecosystem() == "Alpine:v3.19"
    debian = parse_os_release('ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n')
    assert debian is not None and debian.osv_ecosystem() == "Debian:12"
    ubuntu = parse_os_release("ID=ubuntu\nVERSION_ID=\"22.04\"\n")
    assert ubuntu is not None and ubuntu.osv_ecosystem() == "Ubuntu:22.04"
    assert parse_os_release("ID=debian\n") is not None and parse_os_release("NAME=x\n") is None


def test_layer_attribution_and_sources_together() -> None:
    status_v1 = ("Package: a\nStatus: install ok installed\nVersion: 1.0\nArchitecture: amd64\n\n"
                 "Package: b\nStatus: install ok installed\nVersion: 1.0\nArchitecture: amd64\n")
    status_v2 = status_v1.replace("Package: b\nStatus: install ok installed\nVersion: 1.0",
                                  "Package: b\nStatus: install ok installed\nVersion: 2.0") + \
        "\nPackage: c\nStatus: install ok installed\nVersion: 1.0\nArchitecture: amd64\nSource: csrc (0.9)\n"
    dist_entries, directory, version = dist_info_entries("h11", "usr/local/lib/python3.11/site-packages")
    layers = [
        tar_layer([file("usr/lib/os-release", 'ID=debian\nVERSION_ID="12"\n'),
                   Entry("etc/os-release", "symlink", target="../usr/lib/os-release"),
                   file("var/lib/dpkg/status", status_v1)]),
        tar_layer([file("var/lib/dpkg/status", status_v2), *dist_entries,
                   file("srv/node_modules/left-pad/package.json", '{"name": "left-pad", "version": "1.3.0"}')]),
    ]
    found = inventory(build(layers))
    assert found.distro is not None and found.distro.osv_ecosystem() == "Debian:12"
    by_name = {p.name: p for p in found.packages}
    first, second = str(digest_of(layers[0])), str(digest_of(layers[1]))
    assert by_name["a"].layer == first
    assert (by_name["b"].version, by_name["b"].layer) == ("2.0", second)
    assert (by_name["c"].source_name, by_name["c"].source_version, by_name["c"].layer) == ("csrc", "0.9", second)
    assert (by_name["h11"].version, by_name["h11"].layer) == (version, second)
    assert by_name["h11"].path.endswith(f"{directory}/METADATA")
    assert by_name["left-pad"].purl() == "pkg:npm/left-pad@1.3.0"
    assert by_name["c"].purl(found.distro) == "pkg:deb/debian/c@1.0?arch=amd64&distro=debian-12&upstream=csrc"
