"""Repository names, tags and references (p2pd.oci.grammar): pure, no I/O."""

from __future__ import annotations

import pytest

from p2pd.oci.errors import OCIError
from p2pd.oci.grammar import (
    MAX_NAME_LENGTH,
    is_valid_name,
    is_valid_tag,
    validate_name,
    validate_reference,
    validate_tag,
)

SHA256 = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "busybox",
        "library/busybox",
        "team/app/sub",
        "a.b",
        "a_b",
        "a__b",
        "a-b",
        "a--b",
        "a---b",
        "0",
        "9lives/x1",
        "a.b-c_d__e/f",
    ],
)
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "../etc",
        "a/../b",
        "a/./b",
        ".",
        "A",
        "Library/busybox",
        "busyBox",
        "a//b",
        "/a",
        "a/",
        "a___b",  # three underscores is not a separator
        "a_.b",
        "a-",
        "-a",
        "_a",
        "a._b",
        "a b",
        "a\x00b",
        "a\nb",
        "é",
        "a:b",
        "a@b",
        "a%2fb",
        "a\\b",
    ],
)
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)
    with pytest.raises(OCIError) as info:
        validate_name(name)
    assert info.value.code == "NAME_INVALID"
    assert info.value.status == 400


def test_name_length_limit() -> None:
    assert MAX_NAME_LENGTH == 255
    exactly = "a" * 255
    assert is_valid_name(exactly)
    assert not is_valid_name("a" * 256)
    # The limit counts the whole name, separators included.
    nested = "/".join(["abc"] * 64)  # 64*3 + 63 = 255
    assert len(nested) == 255
    assert is_valid_name(nested)
    assert not is_valid_name(nested + "x")
    with pytest.raises(OCIError) as info:
        validate_name("a" * 10_000)
    assert info.value.code == "NAME_INVALID"
    # The detail is bounded, whatever the input size.
    assert len(info.value.detail["name"]) <= 300


@pytest.mark.parametrize("tag", ["latest", "v1.0.0", "_x", "A", "1", "a" * 128, "v1_2-3.4", "UPPER-lower"])
def test_valid_tags(tag: str) -> None:
    assert is_valid_tag(tag)
    assert validate_tag(tag) == tag


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a" * 129, "a/b", "a:b", "a b", "..", "é", "a\x00", "a+b"])
def test_invalid_tags(tag: str) -> None:
    assert not is_valid_tag(tag)
    with pytest.raises(OCIError) as info:
        validate_tag(tag)
    assert info.value.code == "TAG_INVALID"
    assert info.value.status == 400


def test_references() -> None:
    assert validate_reference("latest") == "latest"
    assert validate_reference(SHA256) == SHA256
    with pytest.raises(OCIError) as info:
        validate_reference("sha256:" + "A" * 64)
    assert info.value.code == "DIGEST_INVALID"
    with pytest.raises(OCIError) as info:
        validate_reference("sha256:abc")
    assert info.value.code == "DIGEST_INVALID"
    with pytest.raises(OCIError) as info:
        validate_reference("../x")
    assert info.value.code == "TAG_INVALID"
    with pytest.raises(OCIError) as info:
        validate_reference("")
    assert info.value.code == "TAG_INVALID"
