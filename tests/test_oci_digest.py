"""Digest parsing and incremental verification (p2pd.oci.digest): pure, no I/O."""

from __future__ import annotations

import hashlib

import pytest

from p2pd.oci.digest import Digest, DigestVerifier, digest_of
from p2pd.oci.errors import OCIError

HEX64 = hashlib.sha256(b"hello").hexdigest()
HEX128 = hashlib.sha512(b"hello").hexdigest()


def test_parse_sha256_and_sha512() -> None:
    d = Digest.parse(f"sha256:{HEX64}")
    assert (d.algorithm, d.encoded) == ("sha256", HEX64)
    assert str(d) == f"sha256:{HEX64}"
    d512 = Digest.parse(f"sha512:{HEX128}")
    assert (d512.algorithm, d512.encoded) == ("sha512", HEX128)
    assert Digest.is_valid(f"sha512:{HEX128}")
    # Equality and hashing are by value.
    assert Digest.parse(f"sha256:{HEX64}") == d
    assert len({d, Digest.parse(f"sha256:{HEX64}")}) == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",
        "sha256:",
        ":" + HEX64,
        f"sha256:{HEX64.upper()}",  # upper-case hex MUST NOT be used
        f"sha256:{HEX64[:-1]}A",
        f"sha256:{HEX64[:-1]}",  # wrong length
        f"sha256:{HEX64}0",
        f"sha256:{HEX128}",  # a sha512-length value under sha256
        f"sha512:{HEX64}",  # and the reverse
        f"sha256:{'g' * 64}",  # not hex
        f"SHA256:{HEX64}",
        f"sha256 :{HEX64}",
        f"sha256:{HEX64} ",
        f" sha256:{HEX64}",
        f"sha256:{HEX64}\n",
        f"sha256::{HEX64}",
        "sha256:" + "a" * 10_000,
        "../../etc/passwd",
    ],
)
def test_parse_invalid(text: str) -> None:
    assert not Digest.is_valid(text)
    with pytest.raises(OCIError) as info:
        Digest.parse(text)
    assert info.value.code == "DIGEST_INVALID"
    assert info.value.status == 400


@pytest.mark.parametrize("text", [f"md5:{'a' * 32}", f"sha384:{'a' * 96}", f"blake3:{'a' * 64}", f"sha256+b64:{HEX64}"])
def test_parse_unknown_algorithm(text: str) -> None:
    # A well-formed digest with an algorithm we do not implement is a client error, not a crash.
    assert not Digest.is_valid(text)
    with pytest.raises(OCIError) as info:
        Digest.parse(text)
    assert info.value.code == "UNSUPPORTED"
    assert info.value.status == 400


def test_digest_of_and_hasher() -> None:
    assert digest_of(b"hello") == Digest("sha256", HEX64)
    assert digest_of(b"hello", "sha512") == Digest("sha512", HEX128)
    h = Digest.parse(f"sha512:{HEX128}").hasher()
    h.update(b"hello")
    assert h.hexdigest() == HEX128


def test_verifier_accepts_matching_content_in_pieces() -> None:
    data = bytes(range(256)) * 40
    verifier = DigestVerifier(digest_of(data), len(data))
    for i in range(0, len(data), 777):
        verifier.update(data[i : i + 777])
    assert verifier.size == len(data)
    assert verifier.verify() == digest_of(data)


def test_verifier_size_first_update_raises_when_exceeding() -> None:
    data = b"x" * 100
    verifier = DigestVerifier(digest_of(data), expected_size=100)
    verifier.update(data[:60])
    verifier.update(memoryview(data)[60:100])
    with pytest.raises(OCIError) as info:
        verifier.update(b"y")  # one byte too many: cut off immediately, before hashing
    assert info.value.code == "SIZE_INVALID"
    assert info.value.detail == {"expected": 100, "received": 101}


def test_verifier_short_content_is_size_invalid_before_digest() -> None:
    data = b"abcdef"
    verifier = DigestVerifier(digest_of(data), expected_size=len(data))
    verifier.update(b"abc")
    with pytest.raises(OCIError) as info:
        verifier.verify()
    assert info.value.code == "SIZE_INVALID"


def test_verifier_wrong_content_is_digest_invalid() -> None:
    verifier = DigestVerifier(digest_of(b"good!"), expected_size=5)
    verifier.update(b"evil!")
    with pytest.raises(OCIError) as info:
        verifier.verify()
    assert info.value.code == "DIGEST_INVALID"
    assert info.value.status == 400
    assert info.value.detail["actual"] == str(digest_of(b"evil!"))


def test_verifier_without_expectations_and_with_late_expected() -> None:
    verifier = DigestVerifier()
    verifier.update(b"hello")
    assert verifier.digest() == Digest("sha256", HEX64)
    assert verifier.verify() == Digest("sha256", HEX64)
    assert verifier.verify(Digest("sha256", HEX64)) == Digest("sha256", HEX64)
    with pytest.raises(OCIError) as info:
        verifier.verify(digest_of(b"other"))
    assert info.value.code == "DIGEST_INVALID"


def test_verifier_uses_expected_algorithm() -> None:
    verifier = DigestVerifier(Digest("sha512", HEX128), 5)
    verifier.update(b"hello")
    assert verifier.verify() == Digest("sha512", HEX128)
