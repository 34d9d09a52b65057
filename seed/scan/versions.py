"""Version order of each package ecosystem the scanner matches advisories in. Pure.

Each ``compare_*`` function returns a negative number, zero or a positive number, like C's
``strcmp``; ``compare(ecosystem, a, b)`` picks the right one from an OSV ecosystem name.

- Debian and Ubuntu: dpkg's ``verrevcmp`` (epoch, upstream version, revision; ``~`` sorts
  before everything, even the end of the string). It must agree with ``dpkg --compare-versions``,
  which the tests use as the oracle.
- Alpine: apk-tools' Gentoo-style tokenizer (``1.2.3a_rc1_p2-r4``), including its handling of
  leading zeros and of pre-release (``_alpha _beta _pre _rc``) and post-release
  (``_cvs _svn _git _hg _p``) suffixes.
- PyPI: PEP 440 through ``packaging.version``.
- npm, Go, crates.io and the rest: SemVer 2.0 precedence (build metadata ignored), lenient
  about a leading ``v`` and missing minor/patch numbers, as Go and OSV write them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from packaging.version import InvalidVersion as _PackagingInvalidVersion
from packaging.version import Version as _PEP440Version

from .errors import InvalidVersion

__all__ = [
    "apk_version_is_valid",
    "comparator_for",
    "compare",
    "compare_apk",
    "compare_debian",
    "compare_pep440",
    "compare_semver",
    "ecosystem_family",
    "sort_key",
]

_MAX_VERSION_LENGTH = 256

# ---- Debian (dpkg lib/dpkg/version.c) ---------------------------------------------------

_DIGITS = frozenset("0123456789")
_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_DEBIAN_UPSTREAM_RE = re.compile(r"[0-9][A-Za-z0-9.+~:-]*")


def _dpkg_order(char: str) -> int:
    # dpkg: digits weigh 0 (they are compared as numbers elsewhere), letters their ASCII code,
    # '~' less than anything (also the end of the string), other characters after letters.
    if char in _DIGITS:
        return 0
    if char in _LETTERS:
        return ord(char)
    if char == "~":
        return -1
    return ord(char) + 256


def _verrevcmp(a: str, b: str) -> int:
    i = j = 0
    len_a, len_b = len(a), len(b)
    while i < len_a or j < len_b:
        first_diff = 0
        while (i < len_a and a[i] not in _DIGITS) or (j < len_b and b[j] not in _DIGITS):
            ac = _dpkg_order(a[i]) if i < len_a else 0
            bc = _dpkg_order(b[j]) if j < len_b else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len_a and a[i] == "0":
            i += 1
        while j < len_b and b[j] == "0":
            j += 1
        while i < len_a and a[i] in _DIGITS and j < len_b and b[j] in _DIGITS:
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len_a and a[i] in _DIGITS:
            return 1
        if j < len_b and b[j] in _DIGITS:
            return -1
        if first_diff:
            return first_diff
    return 0


@functools.lru_cache(maxsize=65536)
def _parse_debian(version: str) -> tuple[int, str, str]:
    text = version.strip()
    if not text or len(text) > _MAX_VERSION_LENGTH or any(c.isspace() for c in text):
        raise InvalidVersion(f"invalid Debian version {version[:80]!r}")
    epoch = 0
    if ":" in text:
        epoch_text, _, text = text.partition(":")
        if not epoch_text.isdigit() or not epoch_text.isascii():
            raise InvalidVersion(f"invalid epoch in Debian version {version[:80]!r}")
        epoch = int(epoch_text)
    upstream, hyphen, revision = text.rpartition("-")
    if not hyphen:
        upstream, revision = text, ""
    # dpkg only warns about an upstream version that does not start with a digit and still
    # orders it; an empty one is an error.
    if not upstream:
        raise InvalidVersion(f"empty upstream version in {version[:80]!r}")
    return epoch, upstream, revision


def compare_debian(a: str, b: str) -> int:
    """dpkg's order of two Debian versions ``[epoch:]upstream[-revision]``.

    Raises:
        InvalidVersion: a version is empty, has spaces or a non-numeric epoch.
    """
    epoch_a, upstream_a, revision_a = _parse_debian(a)
    epoch_b, upstream_b, revision_b = _parse_debian(b)
    if epoch_a != epoch_b:
        return -1 if epoch_a < epoch_b else 1
    return _verrevcmp(upstream_a, upstream_b) or _verrevcmp(revision_a, revision_b)


# ---- Alpine (apk-tools src/version.c) ---------------------------------------------------

# apk's version grammar: digit{.digit}...{letter}{_suffix{number}}...{~hash}{-r#}. Token types
# in apk's order; once the types of two versions differ, the lower type is the greater version
# (a version that goes on with more numbers is newer), except before a pre-release suffix.
(_T_INITIAL_DIGIT, _T_DIGIT, _T_LETTER, _T_SUFFIX, _T_SUFFIX_NO, _T_COMMIT_HASH, _T_REVISION_NO, _T_END,
 _T_INVALID) = range(9)
_SUFFIX_RANK = {"alpha": 1, "beta": 2, "pre": 3, "rc": 4, "cvs": 6, "svn": 7, "git": 8, "hg": 9, "p": 10}
_SUFFIX_NONE = 5  # ranks below are pre-release suffixes, ranks above post-release ones
_HEX = frozenset("0123456789abcdef")
_LOWER = frozenset("abcdefghijklmnopqrstuvwxyz")


def _span(text: str, start: int, allowed: frozenset[str]) -> int:
    end = start
    while end < len(text) and text[end] in allowed:
        end += 1
    return end


@functools.lru_cache(maxsize=65536)
def _apk_tokens(version: str) -> tuple[tuple[int, str], ...]:
    """(type, text) of each token, the last one END or INVALID (apk's ``token_next``)."""
    end = _span(version, 0, _DIGITS)
    kind = _T_INITIAL_DIGIT if end else _T_INVALID
    tokens = [(kind, version[:end])]
    pos = end
    while kind < _T_END:
        text = ""
        if pos >= len(version):
            kind = _T_END
        elif (char := version[pos]) in _LOWER:
            kind, text, pos = (_T_LETTER, char, pos + 1) if kind <= _T_DIGIT else (_T_INVALID, "", pos)
        elif char == "." or char in _DIGITS:
            if char == "." and kind > _T_DIGIT:
                kind = _T_INVALID
            elif kind in (_T_INITIAL_DIGIT, _T_DIGIT):
                kind = _T_DIGIT
            elif kind == _T_SUFFIX:
                kind = _T_SUFFIX_NO
            else:
                kind = _T_INVALID
            if kind != _T_INVALID:
                start = pos + 1 if char == "." else pos
                pos = _span(version, start, _DIGITS)
                text = version[start:pos]
                kind = kind if text else _T_INVALID
        elif char == "_":
            pos = _span(version, pos + 1, _LOWER)
            text = version[version.rindex("_", 0, pos) + 1:pos]
            kind = _T_SUFFIX if kind <= _T_SUFFIX_NO and text in _SUFFIX_RANK else _T_INVALID
        elif char == "~":
            start = pos + 1
            pos = _span(version, start, _HEX)
            text = version[start:pos]
            kind = _T_COMMIT_HASH if kind < _T_COMMIT_HASH and text else _T_INVALID
        elif char == "-" and kind < _T_REVISION_NO and version.startswith("-r", pos):
            start = pos + 2
            pos = _span(version, start, _DIGITS)
            text = version[start:pos]
            kind = _T_REVISION_NO if text else _T_INVALID
        else:
            kind = _T_INVALID
        tokens.append((kind, text))
    return tuple(tokens)


def _apk_token_cmp(kind: int, left: str, right: str) -> int:
    if kind in (_T_INITIAL_DIGIT, _T_DIGIT, _T_SUFFIX_NO, _T_REVISION_NO) and not (
        kind == _T_DIGIT and (left.startswith("0") or right.startswith("0"))
    ):
        a, b = int(left), int(right)
    elif kind == _T_SUFFIX:
        a, b = _SUFFIX_RANK[left], _SUFFIX_RANK[right]
    else:
        # Letters compare as characters; a digit group with a leading zero ("1.02"), and a
        # commit hash, as strings, as apk (and Gentoo) do.
        return (left > right) - (left < right)
    return (a > b) - (a < b)


def apk_version_is_valid(version: str) -> bool:
    """Whether apk accepts ``version`` (``apk version -c``)."""
    return _apk_tokens(version)[-1][0] == _T_END


def compare_apk(a: str, b: str) -> int:
    """apk-tools' order of two Alpine versions (``apk version -t a b``).

    Invalid versions are ordered the way apk orders them (their valid prefix counts, the
    invalid rest sorts low) rather than refused, as apk itself does.
    """
    if len(a) > _MAX_VERSION_LENGTH or len(b) > _MAX_VERSION_LENGTH:
        raise InvalidVersion("Alpine version too long")
    tokens_a, tokens_b = _apk_tokens(a), _apk_tokens(b)
    index = 0
    while True:
        kind_a, text_a = tokens_a[index]
        kind_b, text_b = tokens_b[index]
        if kind_a != kind_b or kind_a >= _T_END:
            break
        result = _apk_token_cmp(kind_a, text_a, text_b)
        if result:
            return result
        index += 1
    if kind_a == kind_b:
        return 0
    if kind_a == _T_SUFFIX and _SUFFIX_RANK[text_a] < _SUFFIX_NONE:
        return -1
    if kind_b == _T_SUFFIX and _SUFFIX_RANK[text_b] < _SUFFIX_NONE:
        return 1
    return -1 if kind_a > kind_b else 1


# ---- PyPI (PEP 440) ---------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def _pep440(version: str) -> _PEP440Version:
    if len(version) > _MAX_VERSION_LENGTH:
        raise InvalidVersion("PEP 440 version too long")
    try:
        return _PEP440Version(version)
    except _PackagingInvalidVersion as exc:
        raise InvalidVersion(f"invalid PEP 440 version {version[:80]!r}") from exc


def compare_pep440(a: str, b: str) -> int:
    """PEP 440 order (``1.0rc1 < 1.0 < 1.0.post1``, epochs, local versions)."""
    left, right = _pep440(a), _pep440(b)
    return (left > right) - (left < right)


# ---- SemVer 2.0 -------------------------------------------------------------------------

_SEMVER_RE = re.compile(
    r"v?(?P<major>0|[1-9][0-9]*)(?:\.(?P<minor>0|[1-9][0-9]*))?(?:\.(?P<patch>0|[1-9][0-9]*))?"
    r"(?:-(?P<pre>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+(?P<build>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)


@functools.lru_cache(maxsize=65536)
def _semver(version: str) -> tuple[tuple[int, int, int], tuple[tuple[int, int | str], ...] | None]:
    match = _SEMVER_RE.fullmatch(version.strip()) if len(version) <= _MAX_VERSION_LENGTH else None
    if match is None:
        raise InvalidVersion(f"invalid semantic version {version[:80]!r}")
    core = (int(match["major"]), int(match["minor"] or 0), int(match["patch"] or 0))
    if match["pre"] is None:
        return core, None
    identifiers: list[tuple[int, int | str]] = []
    for part in match["pre"].split("."):
        # SemVer 11.4: numeric identifiers compare numerically and sort before alphanumeric ones.
        identifiers.append((0, int(part)) if part.isdigit() else (1, part))
    return core, tuple(identifiers)


def compare_semver(a: str, b: str) -> int:
    """SemVer 2.0 precedence: ``1.0.0-alpha < 1.0.0-alpha.1 < 1.0.0-beta < 1.0.0``; build ignored."""
    core_a, pre_a = _semver(a)
    core_b, pre_b = _semver(b)
    if core_a != core_b:
        return -1 if core_a < core_b else 1
    if pre_a == pre_b:
        return 0
    if pre_a is None:
        return 1
    if pre_b is None:
        return -1
    for left, right in zip(pre_a, pre_b, strict=False):
        if left != right:
            if left[0] != right[0]:
                return -1 if left[0] < right[0] else 1
            return -1 if left[1] < right[1] else 1  # type: ignore[operator]
    return (len(pre_a) > len(pre_b)) - (len(pre_a) < len(pre_b))


# ---- choosing by ecosystem --------------------------------------------------------------

_FAMILIES: dict[str, Callable[[str, str], int]] = {
    "debian": compare_debian,
    "apk": compare_apk,
    "pep440": compare_pep440,
    "semver": compare_semver,
}
_ECOSYSTEM_FAMILY = {
    "debian": "debian",
    "ubuntu": "debian",
    "alpine": "apk",
    "pypi": "pep440",
    "npm": "semver",
    "go": "semver",
    "crates.io": "semver",
    "packagist": "semver",
    "nuget": "semver",
    "hex": "semver",
    "pub": "semver",
}


def ecosystem_family(ecosystem: str) -> str:
    """``Debian:12`` → ``debian``; ``PyPI`` → ``pep440``; unknown ecosystems → ``semver``."""
    base = ecosystem.split(":", 1)[0].strip().lower()
    return _ECOSYSTEM_FAMILY.get(base, "semver")


def comparator_for(ecosystem: str) -> Callable[[str, str], int]:
    """The compare function of an OSV ecosystem name."""
    return _FAMILIES[ecosystem_family(ecosystem)]


def compare(ecosystem: str, a: str, b: str) -> int:
    """Orders two versions of ``ecosystem`` (OSV name). Raises InvalidVersion."""
    return comparator_for(ecosystem)(a, b)


def sort_key(ecosystem: str) -> Callable[[str], Any]:
    """A ``key=`` for ``sorted`` in the ecosystem's order."""
    return functools.cmp_to_key(comparator_for(ecosystem))
