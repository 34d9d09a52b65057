"""The layer walker: overlay semantics, compression, and hostile layers reported, never followed."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from typing import Any

import pytest
import zstandard

from p2pd.oci.digest import Digest, digest_of
from seed.scan.config import LayerLimits
from seed.scan.layers import ContentProbe, FileSelector, ImageFilesystem, ScanProblem
from seed.scan.packages import PackageFileSelector
from tests.fixtures.scan.builders import Entry, file, gzip_layer, tar_layer, zstd_layer

MiB = 1024 * 1024


class KeepSelector:
    """Captures every file under ``keep/`` or named ``*.db`` (history kept for ``*.db``), and
    probes files starting with ``PROBE`` for their length."""

    def capture_limit(self, path: str) -> int | None:
        return 1 * MiB if "keep/" in path or path.endswith(".db") else None

    def keeps_history(self, path: str) -> bool:
        return path.endswith(".db")

    def probe(self, path: str, size: int, head: bytes) -> ContentProbe | None:
        return LengthProbe() if head.startswith(b"PROBE") else None


class LengthProbe:
    def __init__(self) -> None:
        self.total = 0

    def feed(self, chunk: bytes) -> bool:
        self.total += len(chunk)
        return True

    def result(self) -> Any | None:
        return self.total


def apply(filesystem: ImageFilesystem, blob: bytes, *, digest: Digest | None = None,
          size: int | None = None) -> list[ScanProblem]:
    return filesystem.apply_layer(io.BytesIO(blob), digest or digest_of(blob), len(blob) if size is None else size)


def contents(filesystem: ImageFilesystem) -> dict[str, bytes | None]:
    return {f.path: f.content for f in filesystem.files()}


def new(limits: LayerLimits | None = None) -> ImageFilesystem:
    return ImageFilesystem(KeepSelector(), limits or LayerLimits())


ENTRIES = [
    Entry("keep", "dir"),
    file("keep/a", "alpha"),
    file("keep/sub/b", "beta"),
    file("other/ignored", "not captured"),
    Entry("keep/link-to-a", "symlink", target="a"),
    Entry("keep/hard-a", "hardlink", target="keep/a"),
]


@pytest.mark.parametrize("build", [tar_layer, gzip_layer, zstd_layer])
def test_compressions_read_alike(build: Any) -> None:
    filesystem = new()
    assert apply(filesystem, build(ENTRIES)) == []
    assert contents(filesystem) == {"keep/a": b"alpha", "keep/hard-a": b"alpha", "keep/sub/b": b"beta"}
    linked = filesystem.read("keep/link-to-a")
    assert linked is not None and linked.path == "keep/a" and linked.content == b"alpha"


def test_multi_member_gzip_and_multi_frame_zstd() -> None:
    raw = tar_layer(ENTRIES)
    half = len(raw) // 2
    for blob in (gzip.compress(raw[:half]) + gzip.compress(raw[half:]),
                 zstandard.ZstdCompressor().compress(raw[:half]) + zstandard.ZstdCompressor().compress(raw[half:])):
        filesystem = new()
        assert apply(filesystem, blob) == []
        assert "keep/sub/b" in contents(filesystem)


def test_whiteouts_and_opaque_directories_hide_lower_layers_only() -> None:
    filesystem = new()
    apply(filesystem, tar_layer([file("keep/x/1", "1"), file("keep/x/2", "2"), file("keep/y/3", "3"),
                                 file("keep/z", "z")]))
    problems = apply(filesystem, tar_layer([
        Entry("keep/z", "whiteout"),            # a file
        Entry("keep/y", "whiteout"),            # a whole directory
        file("keep/x/new", "new"),              # same layer as the opaque marker: stays
        Entry("keep/x", "opaque"),
    ]))
    assert problems == []
    assert contents(filesystem) == {"keep/x/new": b"new"}
    # A whiteout in the same layer as the file it names does not hide it (OCI image spec).
    apply(filesystem, tar_layer([file("keep/w", "w"), Entry("keep/w", "whiteout")]))
    assert "keep/w" in contents(filesystem)


def test_replacement_semantics() -> None:
    filesystem = new()
    apply(filesystem, tar_layer([file("keep/d/inner", "i"), file("keep/f", "f")]))
    # A file over a directory removes the tree; a directory over a file removes the file.
    apply(filesystem, tar_layer([file("keep/d", "now a file"), Entry("keep/f", "dir")]))
    assert contents(filesystem) == {"keep/d": b"now a file"}
    # A symlink over a file replaces it too.
    apply(filesystem, tar_layer([Entry("keep/d", "symlink", target="elsewhere")]))
    assert contents(filesystem) == {}


def test_entries_follow_directory_symlinks_like_the_runtime() -> None:
    filesystem = new()
    apply(filesystem, tar_layer([Entry("usr/lib/keep", "dir"), Entry("lib", "symlink", target="usr/lib"),
                                 Entry("abs", "symlink", target="/usr/../../../usr/lib")]))
    apply(filesystem, tar_layer([file("lib/keep/via-relative", "r"), file("abs/keep/via-absolute", "a")]))
    assert contents(filesystem) == {"usr/lib/keep/via-relative": b"r", "usr/lib/keep/via-absolute": b"a"}


def test_history_of_multi_package_files() -> None:
    filesystem = new()
    layers = [tar_layer([file("var/status.db", "v1")]), tar_layer([file("var/status.db", "v2")]),
              tar_layer([file("var/status.db", "v3")])]
    for layer in layers:
        apply(filesystem, layer)
    (status,) = list(filesystem.files())
    assert status.content == b"v3" and status.layer == str(digest_of(layers[2]))
    assert status.history == ((str(digest_of(layers[0])), b"v1"), (str(digest_of(layers[1])), b"v2"))
    # A whiteout ends the lineage.
    apply(filesystem, tar_layer([Entry("var/status.db", "whiteout")]))
    apply(filesystem, tar_layer([file("var/status.db", "v4")]))
    (status,) = list(filesystem.files())
    assert status.history == ()


def test_probe_sees_whole_uncaptured_files() -> None:
    filesystem = new()
    apply(filesystem, gzip_layer([file("bin/tool", b"PROBE" + os.urandom(3 * MiB)), file("bin/other", "x")]))
    (probed,) = list(filesystem.files())
    assert probed.path == "bin/tool" and probed.content is None and probed.probe_result == 3 * MiB + 5


def test_long_names_gnu_and_pax() -> None:
    long_path = "keep/" + "/".join(["directory-with-a-long-name"] * 8) + "/file"
    for pax in (True, False):
        filesystem = new()
        assert apply(filesystem, tar_layer([file(long_path, "deep")], pax=pax)) == []
        assert contents(filesystem) == {long_path: b"deep"}


# ---- hostile layers ---------------------------------------------------------------------


def kinds(problems: list[ScanProblem]) -> list[tuple[str, bool]]:
    return [(p.kind, p.fatal) for p in problems]


def test_traversal_and_absolute_paths_are_reported_not_followed() -> None:
    filesystem = new()
    problems = apply(filesystem, tar_layer([
        file("../keep/escaped", "x"), file("keep/../../keep/escaped2", "x"), file("/keep/absolute", "x"),
        Entry("keep/link", "hardlink", target="../../etc/shadow"), file("keep/fine", "ok"),
    ]))
    assert kinds(problems) == [("path-traversal", False), ("path-traversal", False), ("absolute-path", False),
                               ("path-traversal", False)]
    assert all(p.layer is not None and p.path for p in problems)
    assert contents(filesystem) == {"keep/fine": b"ok"}


def test_symlink_loops_are_reported_not_followed() -> None:
    filesystem = new()
    problems = apply(filesystem, tar_layer([
        Entry("keep/a", "symlink", target="b"), Entry("keep/b", "symlink", target="a"),
        Entry("self", "symlink", target="self/x"),
        file("keep/a/inside", "x"), file("self/file", "x"), file("keep/fine", "ok"),
    ]))
    assert kinds(problems) == [("symlink-loop", False), ("symlink-loop", False)]
    assert contents(filesystem) == {"keep/fine": b"ok"}
    assert filesystem.read("keep/a") is None


def test_decompression_bomb_is_rejected_and_rolled_back() -> None:
    limits = LayerLimits(ratio_floor=1 * MiB, max_ratio=20)
    filesystem = new(limits)
    apply(filesystem, tar_layer([file("keep/lower", "stays")]))
    bomb = gzip_layer([file("keep/first", "rolled back"), file("zeros", bytes(16 * MiB))])
    assert len(bomb) < 64 * 1024
    problems = apply(filesystem, bomb)
    assert kinds(problems) == [("decompression-bomb", True)]
    assert contents(filesystem) == {"keep/lower": b"stays"}
    zstd_bomb = zstandard.ZstdCompressor().compress(tar_layer([file("zeros", bytes(16 * MiB))]))
    assert kinds(apply(new(limits), zstd_bomb)) == [("decompression-bomb", True)]


def test_truncated_streams() -> None:
    raw = tar_layer([file("keep/a", os.urandom(200_000))])
    for blob in (gzip.compress(raw)[:-100], zstandard.ZstdCompressor().compress(raw)[:-100], raw[:-5000],
                 raw[:700]):
        filesystem = new()
        problems = apply(filesystem, blob)
        assert kinds(problems) == [("truncated", True)], blob[:4]
        assert contents(filesystem) == {}


def test_digest_and_size_mismatch() -> None:
    blob = gzip_layer([file("keep/a", "a")])
    filesystem = new()
    assert kinds(apply(filesystem, blob, digest=digest_of(b"something else"))) == [("digest-mismatch", True)]
    assert contents(filesystem) == {}
    assert kinds(apply(filesystem, blob, size=len(blob) - 1)) == [("size-mismatch", True)]
    assert kinds(apply(filesystem, blob, size=len(blob) + 1)) == [("size-mismatch", True)]
    assert contents(filesystem) == {}
    assert apply(filesystem, blob) == [] and contents(filesystem) == {"keep/a": b"a"}


def test_corrupt_and_oversized_layers() -> None:
    assert kinds(apply(new(), os.urandom(4096))) == [("corrupt", True)]
    corrupt_gzip = bytearray(gzip_layer([file("keep/a", os.urandom(10_000))]))
    corrupt_gzip[40:60] = bytes(20)
    assert kinds(apply(new(), bytes(corrupt_gzip)))[0][1] is True
    many = tar_layer([file(f"f{i}", "") for i in range(20)])
    assert kinds(apply(new(LayerLimits(max_entries=10)), many)) == [("too-many-entries", True)]
    big = gzip_layer([file("a", os.urandom(300_000))])
    assert kinds(apply(new(LayerLimits(max_layer_size=100_000)), big)) == [("too-large", True)]
    assert kinds(apply(new(LayerLimits(max_uncompressed_size=100_000)), big)) == [("too-large", True)]


def test_entry_limits() -> None:
    filesystem = new(LayerLimits(max_path_length=60, max_file_size=10))
    problems = apply(filesystem, tar_layer([file("keep/" + "x" * 80, "long"), file("keep/big", "more than ten"),
                                            file("keep/ok", "small")]))
    assert kinds(problems) == [("path-too-long", False), ("file-too-large", False)]
    assert contents(filesystem) == {"keep/ok": b"small"}


def test_pax_header_bomb() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("keep/a")
        info.pax_headers = {"comment": "x" * (2 * MiB)}
        tar.addfile(info, io.BytesIO(b""))
    assert kinds(apply(new(), buffer.getvalue())) == [("header-too-large", True)]


# ---- the FileSelector seam: one conformance test for every implementation ----------------


@pytest.mark.parametrize("selector", [KeepSelector(), PackageFileSelector()], ids=["fake", "packages"])
def test_file_selector_conformance(selector: FileSelector) -> None:
    """What ImageFilesystem relies on from any selector: limits are None or positive, history
    only for captured paths, probes only for uncaptured files, and a probe takes any split of
    the same bytes and gives the same result."""
    paths = ["var/lib/dpkg/status", "lib/apk/db/installed", "keep/a", "keep/x.db", "usr/bin/tool",
             "app/node_modules/x/package.json", "etc/os-release", "a/b/c.txt", ""]
    for path in paths:
        limit = selector.capture_limit(path)
        assert limit is None or (isinstance(limit, int) and limit > 0), path
        if selector.keeps_history(path):
            assert limit is not None, path
    content = b"\x7fELF" + bytes(60) if isinstance(selector, PackageFileSelector) else b"PROBE" + bytes(60)
    assert selector.probe("bin/nothing", 3, b"abc") is None
    results = []
    for piece in (1, 7, len(content)):
        probe = selector.probe("bin/tool", len(content), content)  # the head: the first 64 KiB
        assert probe is not None
        for start in range(0, len(content), piece):
            if not probe.feed(content[start:start + piece]):
                break
        results.append(probe.result())
    assert results[0] == results[1] == results[2]
