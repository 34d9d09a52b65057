"""Index resolution to a platform (p2pd.oci.platform): pure, no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from p2pd.oci import mediatypes
from p2pd.oci.digest import digest_of
from p2pd.oci.errors import OCIError
from p2pd.oci.platform import ATTESTATION_ANNOTATION, Platform, host_platform, select_manifest


def _entry(name: str, platform: dict[str, str] | None, **extra: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"mediaType": mediatypes.OCI_MANIFEST, "digest": str(digest_of(name.encode())),
                             "size": len(name), **extra}
    if platform is not None:
        entry["platform"] = platform
    return entry


def _index(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": list(entries)}).encode()


AMD64 = _entry("amd64", {"os": "linux", "architecture": "amd64"})
ARM64 = _entry("arm64", {"os": "linux", "architecture": "arm64", "variant": "v8"})
ARMV6 = _entry("armv6", {"os": "linux", "architecture": "arm", "variant": "v6"})
ARMV7 = _entry("armv7", {"os": "linux", "architecture": "arm", "variant": "v7"})
# BuildKit's attestation entry: unknown/unknown platform, annotated with the manifest it describes.
ATTESTATION = _entry("att", {"os": "unknown", "architecture": "unknown"},
                     annotations={ATTESTATION_ANNOTATION: "attestation-manifest",
                                  "vnd.docker.reference.digest": AMD64["digest"]})


def _chosen(body: bytes, wanted: str) -> str:
    return str(select_manifest(body, mediatypes.OCI_INDEX, Platform.parse(wanted)).digest)


@pytest.mark.parametrize(("wanted", "expected"), [
    ("linux/amd64", AMD64), ("linux/x86_64", AMD64), ("linux/arm64", ARM64), ("linux/aarch64/v8", ARM64),
    ("linux/arm/v7", ARMV7), ("linux/arm", ARMV7), ("linux/arm/v6", ARMV6),
])
def test_picks_the_platform_entry(wanted: str, expected: dict[str, Any]) -> None:
    assert _chosen(_index(ATTESTATION, AMD64, ARM64, ARMV6, ARMV7), wanted) == expected["digest"]


def test_an_older_arm_variant_runs_on_a_newer_cpu_and_the_newest_is_preferred() -> None:
    assert _chosen(_index(ARMV6), "linux/arm/v7") == ARMV6["digest"]
    assert _chosen(_index(ARMV6, ARMV7), "linux/arm/v8") == ARMV7["digest"]
    with pytest.raises(OCIError):
        _chosen(_index(ARMV7), "linux/arm/v6")


def test_attestations_and_unknown_platforms_are_never_chosen() -> None:
    unknown_os = _entry("x", {"os": "unknown", "architecture": "amd64"})
    no_platform = _entry("y", None)
    attestation_for_amd64 = _entry("z", {"os": "linux", "architecture": "amd64"},
                                   annotations={ATTESTATION_ANNOTATION: "attestation-manifest"})
    with pytest.raises(OCIError) as caught:
        _chosen(_index(ATTESTATION, unknown_os, no_platform, attestation_for_amd64), "linux/amd64")
    assert caught.value.status == 404 and caught.value.code == "MANIFEST_UNKNOWN"


def test_other_os_does_not_match_and_first_equal_entry_wins() -> None:
    windows = _entry("win", {"os": "windows", "architecture": "amd64"})
    second_amd64 = _entry("amd64-again", {"os": "linux", "architecture": "amd64"})
    assert _chosen(_index(windows, AMD64, second_amd64), "linux/amd64") == AMD64["digest"]


def test_docker_manifest_list_is_accepted_and_an_image_manifest_is_refused() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.DOCKER_MANIFEST_LIST,
                       "manifests": [dict(AMD64, mediaType=mediatypes.DOCKER_MANIFEST)]}).encode()
    assert str(select_manifest(body, None, Platform.parse("linux/amd64")).digest) == AMD64["digest"]
    image = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
                        "config": _entry("c", None), "layers": []}).encode()
    with pytest.raises(OCIError):
        select_manifest(image, None, Platform.parse("linux/amd64"))


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d", "linux/" + "x" * 300])
def test_bad_platform_text_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Platform.parse(text)


def test_host_platform_normalises_kernel_names() -> None:
    assert host_platform("Linux", "x86_64") == Platform("linux", "amd64", "")
    assert host_platform("Linux", "aarch64") == Platform("linux", "arm64", "v8")
    assert host_platform("Linux", "armv7l") == Platform("linux", "arm", "v7")
    assert str(host_platform("Linux", "armv6l")) == "linux/arm/v6"
    assert host_platform().os == "linux"
