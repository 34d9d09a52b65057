"""Version order per ecosystem; Debian's checked against ``dpkg --compare-versions`` as the oracle."""

from __future__ import annotations

import functools
import itertools
import random
import shlex

import pytest

from seed.scan.errors import InvalidVersion
from seed.scan.versions import (
    apk_version_is_valid,
    compare,
    compare_apk,
    compare_debian,
    compare_pep440,
    compare_semver,
    ecosystem_family,
    sort_key,
)
from tests.harness.tools import require_tool, run

# ---- Debian: dpkg as the oracle ---------------------------------------------------------

_UPSTREAM_CHARS = "0123456789" * 3 + "abcxyzAZ" + ".+~"
_REVISION_CHARS = "0123456789" * 2 + "abuntdeb" + ".+~"


def _debian_version(rng: random.Random) -> str:
    epoch = rng.choice(["", "", "", "", "0:", "1:", "2:", "10:"])
    revision = ""
    if rng.random() < 0.6:
        revision = "-" + rng.choice("0123456789") + "".join(rng.choice(_REVISION_CHARS)
                                                          for _ in range(rng.randint(0, 5)))
    extra = "-" if revision and rng.random() < 0.1 else ""  # hyphens in upstream need a revision
    colon = ":" if epoch and rng.random() < 0.1 else ""  # colons in upstream need an epoch
    upstream = rng.choice("0123456789") + "".join(rng.choice(_UPSTREAM_CHARS) for _ in range(rng.randint(0, 7)))
    middle = rng.randint(1, len(upstream))
    return epoch + upstream[:middle] + extra + colon + upstream[middle:] + revision


def _mutations(version: str, rng: random.Random) -> list[str]:
    """Versions close to ``version``, where the rules differ: ~, +, trailing zeros, letters."""
    base, hyphen, revision = version.rpartition("-") if "-" in version else (version, "", "")
    out = [version + "~", version + "~rc1", version + "+b1", version + ".0", version + "a", version + "0",
           base + "~1" + hyphen + revision, base + ".0" + hyphen + revision, version.replace(".", "~", 1),
           "0" + version if ":" not in version else version.replace(":", ":0", 1), version + "-0" if not hyphen else
           version + "~"]
    if version[-1].isdigit():
        out.append(version[:-1] + str((int(version[-1]) + 1) % 10))
    if ":" not in version:
        out.append(f"{rng.choice('0123')}:{version}")
    return out


def _dpkg_oracle(pairs: list[tuple[str, str, str]]) -> list[bool]:
    """One shell running ``dpkg --compare-versions A OP B`` for every (A, OP, B): one fork per
    pair instead of one Python subprocess each."""
    dpkg = require_tool("dpkg")
    script = "\n".join(f"{shlex.quote(dpkg)} --compare-versions {shlex.quote(a)} {op} {shlex.quote(b)} "
                       "2>/dev/null && echo 1 || echo 0" for a, op, b in pairs)
    output = run(["sh"], input=script.encode(), timeout=120).stdout.decode().split()
    assert len(output) == len(pairs)
    return [line == "1" for line in output]


def test_debian_order_agrees_with_dpkg() -> None:
    rng = random.Random(20240610)
    versions: set[str] = set()
    while len(versions) < 1800:
        version = _debian_version(rng)
        versions.add(version)
        if rng.random() < 0.3:
            versions.update(_mutations(version, rng)[: rng.randint(1, 4)])
    ordered = sorted(versions, key=sort_key("Debian:12"))
    # Checking each adjacent pair of the sorted list checks the order of every pair (dpkg's
    # order is total), and mutations put near-equal versions next to each other.
    pairs: list[tuple[str, str, str]] = []
    for left, right in itertools.pairwise(ordered):
        pairs.append((left, "eq" if compare_debian(left, right) == 0 else "lt", right))
    listed = sorted(versions)
    for _ in range(700):
        left, right = rng.choice(listed), rng.choice(listed)
        result = compare_debian(left, right)
        pairs.append((left, "lt" if result < 0 else "gt" if result > 0 else "eq", right))
    verdicts = _dpkg_oracle(pairs)
    disagreements = [f"{a} {op} {b}" for (a, op, b), ok in zip(pairs, verdicts, strict=True) if not ok]
    assert len(pairs) > 2400
    assert not disagreements, f"dpkg disagrees on {len(disagreements)} of {len(pairs)}: {disagreements[:10]}"


@pytest.mark.parametrize(("smaller", "larger"), [
    ("1.0~rc1", "1.0"),
    ("1.0", "1.0+b1"),
    ("1.0", "1:0.1"),
    ("1.0-1", "1.0-1+deb12u1"),
    ("1.0-1~bpo12+1", "1.0-1"),
    ("2.36-9+deb12u3", "2.36-9+deb12u10"),
    ("1.2a", "1.2b"),
    ("1.2", "1.2a"),
    ("1.2~", "1.2"),
    ("1.2~~", "1.2~"),
])
def test_debian_known_orders(smaller: str, larger: str) -> None:
    assert compare_debian(smaller, larger) < 0
    assert compare_debian(larger, smaller) > 0


def test_debian_equal_spellings() -> None:
    assert compare_debian("0:1.0", "1.0") == 0
    assert compare_debian("1.0-0", "1.0") == 0
    assert compare_debian("1.01", "1.1") == 0


def test_debian_invalid_versions_raise() -> None:
    for bad in ("", "a b", "x:1.0", "1:"):
        with pytest.raises(InvalidVersion):
            compare_debian(bad, "1.0")


# ---- Alpine -----------------------------------------------------------------------------


# Pairs written from apk-tools' version rules: numbers compare as numbers except after a
# leading zero (string order), letters follow numbers, pre-release suffixes (_alpha, _beta,
# _pre, _rc) sort before the release and post-release ones (_cvs, _svn, _git, _hg, _p) after
# it, a commit hash (~hex) before the revision, -rN last.
_APK_ORDERED = [
    "0.9", "1.0_alpha", "1.0_alpha1", "1.0_alpha2", "1.0_beta", "1.0_beta3", "1.0_pre1", "1.0_rc1", "1.0_rc2",
    "1.0", "1.0-r1", "1.0-r10", "1.0_cvs", "1.0_svn", "1.0_git20230101", "1.0_hg", "1.0_p1", "1.0_p2-r0",
    "1.0a", "1.0b", "1.0.1_rc1", "1.0.1", "1.0.1_p1", "1.01", "1.1", "1.2", "1.10", "2.0_alpha", "2.0",
    "10", "20230101",
]


def test_apk_order() -> None:
    for index, smaller in enumerate(_APK_ORDERED):
        assert compare_apk(smaller, smaller) == 0
        for larger in _APK_ORDERED[index + 1:]:
            assert compare_apk(smaller, larger) < 0, (smaller, larger)
            assert compare_apk(larger, smaller) > 0, (larger, smaller)


@pytest.mark.parametrize(("left", "relation", "right"), [
    ("3.1.4-r1", "<", "3.1.4-r5"),
    ("3.1.4-r5", "<", "3.1.5-r0"),
    ("1.2.4_git20230717-r4", ">", "1.2.4-r4"),
    ("1.2.4_git20230717-r4", "<", "1.2.5-r0"),
    ("1.36.1-r15", ">", "1.36.1-r2"),
    ("1.0~abc-r1", "<", "1.0~abd-r0"),
    ("1.0~abc-r1", ">", "1.0~abc-r0"),
    ("0.1.0_alpha_pre2", "<", "0.1.0_alpha"),
    ("6.0_pre1", "<", "6.0"),
    ("1.001", "<", "1.01"),
    ("1.0", "<", "1.0-r0"),  # apk: a revision, even -r0, makes a version greater
    ("1.0-r0", "=", "1.0-r00"),
])
def test_apk_pairs(left: str, relation: str, right: str) -> None:
    result = compare_apk(left, right)
    assert {"<": result < 0, ">": result > 0, "=": result == 0}[relation], (left, relation, right, result)


def test_apk_validity() -> None:
    for good in ("1.0", "1.0_rc1-r2", "1.0a_p3", "0.1_pre2~1234abcd", "20230101-r0"):
        assert apk_version_is_valid(good), good
    for bad in ("", "a1", "1.0bc", "1.0a1", "1.0_foo", "1.0-r", "1.0-x1", "1.0~", "1..0"):
        assert not apk_version_is_valid(bad), bad


# ---- PEP 440 and SemVer -----------------------------------------------------------------


def test_pep440_order() -> None:
    ordered = ["1.0.dev1", "1.0a1", "1.0b2", "1.0rc1", "1.0", "1.0.post1", "1.1", "1!0.1"]
    for smaller, larger in itertools.pairwise(ordered):
        assert compare_pep440(smaller, larger) < 0
    assert compare_pep440("1.0", "1.0.0") == 0
    with pytest.raises(InvalidVersion):
        compare_pep440("not a version", "1.0")


def test_semver_precedence_from_the_spec() -> None:
    # SemVer 2.0.0, section 11.
    ordered = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
               "1.0.0-rc.1", "1.0.0", "2.0.0", "2.1.0", "2.1.1", "10.0.0"]
    shuffled = ordered[:]
    random.Random(7).shuffle(shuffled)
    assert sorted(shuffled, key=functools.cmp_to_key(compare_semver)) == ordered
    assert compare_semver("1.0.0+build.1", "1.0.0+build.2") == 0
    assert compare_semver("v1.2.3", "1.2.3") == 0
    assert compare_semver("1.2", "1.2.0") == 0
    assert compare_semver("0.0.0-20210101000000-abcdef123456", "0.0.1") < 0
    with pytest.raises(InvalidVersion):
        compare_semver("1.x", "1.0.0")


def test_ecosystem_selection() -> None:
    assert ecosystem_family("Debian:12") == "debian"
    assert ecosystem_family("Ubuntu:22.04") == "debian"
    assert ecosystem_family("Alpine:v3.19") == "apk"
    assert ecosystem_family("PyPI") == "pep440"
    assert ecosystem_family("npm") == ecosystem_family("Go") == "semver"
    assert compare("PyPI", "1.0rc1", "1.0") < 0
    assert compare("Alpine:v3.19", "1.0_rc1", "1.0") < 0
    assert compare("Debian:12", "1.0~rc1", "1.0") < 0
