"""HTTP Range parsing (p2pd.oci.ranges): pure, no I/O."""

from __future__ import annotations

import pytest

from p2pd.oci.errors import OCIError
from p2pd.oci.ranges import ByteRange, parse_range

SIZE = 2048


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=500-1499", 500, 1499),
        ("bytes=500-", 500, 2047),
        ("bytes=-500", 1548, 2047),
        ("bytes=2000-5000", 2000, 2047),  # clipped to the end
        ("bytes=0-0", 0, 0),
        ("bytes=0-", 0, 2047),
        ("bytes=2047-2047", 2047, 2047),
        ("bytes=2047-", 2047, 2047),
        ("bytes=-1", 2047, 2047),
        ("bytes=-2048", 0, 2047),
        ("bytes=-99999", 0, 2047),  # a suffix longer than the blob is the whole blob
        ("bytes=0-9999999999999999999", 0, 2047),
        (" bytes=500-1499 ", 500, 1499),
        ("bytes = 500 - 1499", 500, 1499),
    ],
)
def test_satisfiable(header: str, start: int, end: int) -> None:
    byte_range = parse_range(header, SIZE)
    assert byte_range == ByteRange(start, end)
    assert byte_range.length == end - start + 1
    assert byte_range.content_range(SIZE) == f"bytes {start}-{end}/{SIZE}"


@pytest.mark.parametrize("header", ["bytes=500-0", "bytes=5000-10000", "bytes=2048-", "bytes=2048-2048", "bytes=-0"])
def test_unsatisfiable(header: str) -> None:
    with pytest.raises(OCIError) as info:
        parse_range(header, SIZE)
    assert info.value.status == 416
    assert info.value.code == "RANGE_INVALID"
    assert ("Content-Range", f"bytes */{SIZE}") in info.value.headers


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes=",
        "bytes=-",
        "bytes=abc-def",
        "bytes=1-2-3",
        "bits=0-10",
        "0-10",
        "bytes 0-10",
        "bytes=0x10-20",
        "bytes=+1-5",
        "bytes=1.5-3",
        "bytes=00000000000000000000001-2",  # more digits than any sane offset
        # Multi-range requests are answered with the whole representation.
        "bytes=0-1,5-6",
        "bytes=0-1, 5-6",
        "bytes=-1,0-",
    ],
)
def test_ignored_headers_mean_whole_body(header: str | None) -> None:
    assert parse_range(header, SIZE) is None


def test_zero_size_blob() -> None:
    assert parse_range(None, 0) is None
    assert parse_range("bytes=0-1,2-3", 0) is None
    for header in ("bytes=0-", "bytes=0-0", "bytes=-1", "bytes=-500", "bytes=5-10"):
        with pytest.raises(OCIError) as info:
            parse_range(header, 0)
        assert info.value.status == 416
        assert ("Content-Range", "bytes */0") in info.value.headers
