"""Manifest and index validation, referrers index (p2pd.oci.manifest): pure, no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from p2pd.oci import mediatypes
from p2pd.oci.digest import Digest, digest_of
from p2pd.oci.errors import OCIError
from p2pd.oci.manifest import MAX_MANIFEST_SIZE, Descriptor, parse_manifest, referrers_index

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def _desc(data: bytes, media_type: str = LAYER_TYPE, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(digest_of(data)), "size": len(data), **extra}


CONFIG = _desc(b"{}", CONFIG_TYPE)
LAYER1 = _desc(b"layer-1")
LAYER2 = _desc(b"layer-2")


def _image(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": CONFIG,
        "layers": [LAYER1, LAYER2],
    }
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not None}


def _encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _invalid(body: bytes, content_type: str | None) -> OCIError:
    with pytest.raises(OCIError) as info:
        parse_manifest(body, content_type)
    return info.value


def test_oci_image_manifest() -> None:
    body = _encode(_image(annotations={"org.example": "yes"}))
    parsed = parse_manifest(body, mediatypes.OCI_MANIFEST)
    assert parsed.media_type == mediatypes.OCI_MANIFEST
    assert parsed.digest == digest_of(body)
    assert parsed.size == len(body)
    assert not parsed.is_index
    assert [str(r.digest) for r in parsed.references] == [CONFIG["digest"], LAYER1["digest"], LAYER2["digest"]]
    assert parsed.references[1] == Descriptor(LAYER_TYPE, Digest.parse(LAYER1["digest"]), LAYER1["size"])
    assert parsed.subject is None
    assert parsed.annotations == {"org.example": "yes"}


def test_content_type_parameters_and_case_are_ignored() -> None:
    body = _encode(_image())
    parsed = parse_manifest(body, "Application/VND.oci.image.manifest.v1+json; charset=utf-8")
    assert parsed.media_type == mediatypes.OCI_MANIFEST


def test_media_type_from_header_or_inferred() -> None:
    body = _encode(_image(mediaType=None))
    assert parse_manifest(body, mediatypes.DOCKER_MANIFEST).media_type == mediatypes.DOCKER_MANIFEST
    assert parse_manifest(body, None).media_type == mediatypes.OCI_MANIFEST
    index = _encode({"schemaVersion": 2, "manifests": []})
    parsed = parse_manifest(index, None)
    assert parsed.media_type == mediatypes.OCI_INDEX
    assert parsed.is_index


def test_oci_index_and_docker_types() -> None:
    child = _desc(b"child-manifest", mediatypes.OCI_MANIFEST, platform={"os": "linux", "architecture": "amd64"})
    body = _encode({"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": [child]})
    parsed = parse_manifest(body, mediatypes.OCI_INDEX)
    assert parsed.is_index
    assert [str(r.digest) for r in parsed.references] == [child["digest"]]

    docker = _encode(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.DOCKER_MANIFEST,
            "config": _desc(b"cfg", "application/vnd.docker.container.image.v1+json"),
            "layers": [_desc(b"l", "application/vnd.docker.image.rootfs.diff.tar.gzip")],
        }
    )
    parsed = parse_manifest(docker, mediatypes.DOCKER_MANIFEST)
    assert parsed.media_type == mediatypes.DOCKER_MANIFEST
    assert not parsed.is_index
    assert len(parsed.references) == 2

    docker_list = _encode(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.DOCKER_MANIFEST_LIST,
            "manifests": [_desc(b"m", mediatypes.DOCKER_MANIFEST)],
        }
    )
    parsed = parse_manifest(docker_list, mediatypes.DOCKER_MANIFEST_LIST)
    assert parsed.is_index
    assert parsed.media_type == mediatypes.DOCKER_MANIFEST_LIST


def test_size_cap_is_413() -> None:
    doc = _image(annotations={"pad": ""})
    base = len(_encode(doc))
    doc["annotations"]["pad"] = "x" * (MAX_MANIFEST_SIZE - base)
    exactly = _encode(doc)
    assert len(exactly) == MAX_MANIFEST_SIZE
    assert parse_manifest(exactly, mediatypes.OCI_MANIFEST).size == MAX_MANIFEST_SIZE
    doc["annotations"]["pad"] += "x"
    error = _invalid(_encode(doc), mediatypes.OCI_MANIFEST)
    assert error.status == 413


def test_media_type_mismatch_is_manifest_invalid() -> None:
    # CVE-2021-41190: the body says image manifest, the header says index (or the reverse).
    error = _invalid(_encode(_image()), mediatypes.OCI_INDEX)
    assert error.code == "MANIFEST_INVALID"
    assert error.status == 400
    error = _invalid(_encode(_image()), mediatypes.DOCKER_MANIFEST)
    assert error.code == "MANIFEST_INVALID"


def test_index_with_layers_or_config_rejected() -> None:
    for extra in ({"layers": [LAYER1]}, {"config": CONFIG}):
        body = _encode({"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": [], **extra})
        assert _invalid(body, mediatypes.OCI_INDEX).code == "MANIFEST_INVALID"


def test_image_with_manifests_rejected() -> None:
    body = _encode(_image(manifests=[]))
    assert _invalid(body, mediatypes.OCI_MANIFEST).code == "MANIFEST_INVALID"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"{",
        b"[]",
        b"null",
        b'"string"',
        b"[" * 100_000,  # deep nesting must not crash the parser
        _encode({"schemaVersion": 1, "mediaType": mediatypes.OCI_MANIFEST}),
        _encode({"mediaType": mediatypes.OCI_MANIFEST, "config": CONFIG, "layers": []}),
        _encode({"schemaVersion": "2", "config": CONFIG, "layers": []}),
        _encode(_image(mediaType="application/json")),
        _encode(_image(mediaType=7)),
        _encode(_image(artifactType=["x"])),
        _encode(_image(annotations={"a": 1})),
        _encode(_image(annotations=["a"])),
        _encode(_image(config=None)),
        _encode(_image(layers={"not": "a list"})),
        _encode(_image(subject="sha256:abc")),
        b"\xff\xfe{}",
    ],
)
def test_malformed_manifests(body: bytes) -> None:
    assert _invalid(body, None).code == "MANIFEST_INVALID"


@pytest.mark.parametrize(
    "descriptor",
    [
        "not an object",
        {},
        {"digest": LAYER1["digest"], "size": 1},
        {"mediaType": "", "digest": LAYER1["digest"], "size": 1},
        {"mediaType": LAYER_TYPE, "size": 1},
        {"mediaType": LAYER_TYPE, "digest": 5, "size": 1},
        {"mediaType": LAYER_TYPE, "digest": "sha256:xyz", "size": 1},
        {"mediaType": LAYER_TYPE, "digest": LAYER1["digest"].upper(), "size": 1},
        {"mediaType": LAYER_TYPE, "digest": LAYER1["digest"]},
        {"mediaType": LAYER_TYPE, "digest": LAYER1["digest"], "size": -1},
        {"mediaType": LAYER_TYPE, "digest": LAYER1["digest"], "size": 1.5},
        {"mediaType": LAYER_TYPE, "digest": LAYER1["digest"], "size": True},
        {"mediaType": LAYER_TYPE, "digest": LAYER1["digest"], "size": "1"},
        {"mediaType": LAYER_TYPE, "digest": LAYER1["digest"], "size": 1, "artifactType": 3},
        {"mediaType": LAYER_TYPE, "digest": LAYER1["digest"], "size": 1, "annotations": {"k": None}},
    ],
)
def test_bad_descriptors(descriptor: Any) -> None:
    for body in (
        _encode(_image(layers=[LAYER1, descriptor])),
        _encode(_image(config=descriptor)),
        _encode({"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": [descriptor]}),
        _encode(_image(subject=descriptor)),
    ):
        assert _invalid(body, None).code == "MANIFEST_INVALID"


def test_subject_and_artifact_type() -> None:
    subject = _desc(b"subject-manifest", mediatypes.OCI_MANIFEST)
    body = _encode(
        _image(
            subject=subject,
            artifactType="application/vnd.example.sbom",
            annotations={"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
        )
    )
    parsed = parse_manifest(body, mediatypes.OCI_MANIFEST)
    assert parsed.subject is not None
    assert str(parsed.subject.digest) == subject["digest"]
    # The subject is not a reference that must exist: it may be pushed later, or never.
    assert subject["digest"] not in [str(r.digest) for r in parsed.references]
    assert parsed.artifact_type == "application/vnd.example.sbom"
    referrer = parsed.as_referrer()
    assert referrer.to_json() == {
        "mediaType": mediatypes.OCI_MANIFEST,
        "digest": str(parsed.digest),
        "size": len(body),
        "artifactType": "application/vnd.example.sbom",
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    }


def test_artifact_type_defaults_to_config_media_type() -> None:
    # distribution-spec 1.1 (listing referrers): when an image manifest has no artifactType,
    # the referrer descriptor's artifactType is the config descriptor's mediaType.
    signature_config = _desc(b"sig-config", "application/vnd.example.signature.config+json")
    parsed = parse_manifest(_encode(_image(config=signature_config)), mediatypes.OCI_MANIFEST)
    assert parsed.artifact_type == "application/vnd.example.signature.config+json"
    parsed = parse_manifest(_encode(_image()), mediatypes.OCI_MANIFEST)
    assert parsed.artifact_type == CONFIG_TYPE
    # An index has no config: no artifactType unless it declares one.
    index = {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": []}
    assert parse_manifest(_encode(index), None).artifact_type is None
    index["artifactType"] = "application/vnd.example.bundle"
    assert parse_manifest(_encode(index), None).artifact_type == "application/vnd.example.bundle"


def test_referrers_index_and_filter() -> None:
    a = Descriptor(mediatypes.OCI_MANIFEST, digest_of(b"a"), 10, "application/vnd.example.sbom")
    b = Descriptor(mediatypes.OCI_MANIFEST, digest_of(b"b"), 20, "application/vnd.example.sig", {"k": "v"})
    c = Descriptor(mediatypes.OCI_MANIFEST, digest_of(b"c"), 30)

    everything = json.loads(referrers_index([a, b, c]))
    assert everything["schemaVersion"] == 2
    assert everything["mediaType"] == mediatypes.OCI_INDEX
    assert everything["manifests"] == [a.to_json(), b.to_json(), c.to_json()]
    assert everything["manifests"][1]["annotations"] == {"k": "v"}
    assert "artifactType" not in everything["manifests"][2]

    filtered = json.loads(referrers_index([a, b, c], "application/vnd.example.sig"))
    assert filtered["manifests"] == [b.to_json()]
    assert json.loads(referrers_index([a, b, c], "application/vnd.example.none"))["manifests"] == []
    assert json.loads(referrers_index([]))["manifests"] == []
