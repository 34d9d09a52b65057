"""An image's filesystem as a container runtime would unpack it, read without unpacking anything.

``ImageFilesystem.apply_layer`` streams one layer blob (gzip, zstd or plain tar, detected
from its first bytes as Docker does), verifies its digest and size while reading, and applies
its entries to an in-memory view that holds only what the scanner needs: the content of the
files a ``FileSelector`` asks for (package databases, each bounded in size), the results of
content probes on other files (Go build info in ELF binaries), and symlinks (to resolve paths
as the runtime does). Nothing is written to disk, and no path from a layer is ever opened.

Rules/invariants:
- Layers apply in manifest order with overlay semantics: a whiteout ``.wh.NAME`` and an
  opaque directory marker ``.wh..wh..opq`` hide what *lower* layers put there (OCI image
  spec: never entries of their own layer); an entry replaces whatever was at its path (a
  non-directory replaces a whole tree, a directory replaces a non-directory).
- Entry paths are resolved through the symlinks of the view, clamped at the root like the
  runtime's secure join; a path that needs more than ``max_symlink_hops`` links is a loop.
- Work per layer is bounded: compressed and uncompressed bytes, the ratio between them
  (decompression bombs), the number of entries, path and header lengths, and the size of
  each file kept in memory. A decompressor never returns more than ``_MAX_OUTPUT`` bytes
  (zstd: ``_ZSTD_INPUT`` input bytes at a time) before the limits are checked.
- A layer is all or nothing: when it is rejected (digest or size mismatch, corrupt or
  truncated stream, a limit), every change it made to the view is rolled back from a journal
  and the rejection is one fatal ``ScanProblem``. Entry-level problems (``../`` or absolute
  paths, symlink loops, oversized package files) skip the entry and are non-fatal problems.
- Pure but for reading the given file objects; no trio, no threads, no clock.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import zstandard

from p2pd.oci.digest import Digest, DigestVerifier
from p2pd.oci.errors import OCIError

from .config import LayerLimits
from .errors import LayerRejected

__all__ = [
    "LAYER_MEDIA_TYPES",
    "ContentProbe",
    "FileSelector",
    "ImageFile",
    "ImageFilesystem",
    "ScanProblem",
    "is_layer_media_type",
]

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_RAW_PIECE = 64 * 1024  # compressed bytes read at a time
_MAX_OUTPUT = 1024 * 1024  # decompressed bytes produced per step
# The highest zstd ratio is an RLE block: 4 bytes → 128 KiB. 1 KiB of input therefore never
# yields more than 32 MiB, which bounds memory before the bomb check; measured no slower.
_ZSTD_INPUT = 1024
_HEAD_BYTES = 64 * 1024  # first bytes of an uncaptured file, handed to the probe decision
_MAX_RESOLVE_STEPS = 4096  # path components visited while resolving one path

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

LAYER_MEDIA_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})


def is_layer_media_type(media_type: str) -> bool:
    return media_type in LAYER_MEDIA_TYPES


@dataclass(frozen=True, slots=True)
class ScanProblem:
    """Something the scan could not read or refused to follow.

    Attributes:
        kind: ``digest-mismatch``, ``size-mismatch``, ``truncated``, ``corrupt``,
            ``too-large``, ``decompression-bomb``, ``too-many-entries``, ``header-too-large``,
            ``path-traversal``, ``absolute-path``, ``path-too-long``, ``symlink-loop``,
            ``file-too-large``, ``capture-limit``, ``hardlink-unresolved``,
            ``unsupported-media-type``, ``blob-unknown``, ``parse-error``, ``unknown-distro``.
        fatal: the whole layer was rejected (nothing of it is in the inventory).
    """

    kind: str
    message: str
    layer: str | None = None
    path: str | None = None
    fatal: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "message": self.message, "fatal": self.fatal}
        if self.layer is not None:
            out["layer"] = self.layer
        if self.path is not None:
            out["path"] = self.path
        return out

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> ScanProblem:
        return cls(str(document["kind"]), str(document["message"]), document.get("layer"),
                   document.get("path"), bool(document.get("fatal", False)))


class ContentProbe(Protocol):
    """Looks at a file's bytes as they stream past, without keeping them."""

    def feed(self, chunk: bytes) -> bool:
        """Takes the next bytes; returns False once it needs no more."""
        ...

    def result(self) -> Any | None:
        """What it found, or None (then the file is forgotten)."""
        ...


class FileSelector(Protocol):
    """Which files of an image the scan needs, decided by path (and, for probes, by head)."""

    def capture_limit(self, path: str) -> int | None:
        """Keep the whole file if it is at most this many bytes; None: not needed."""
        ...

    def keeps_history(self, path: str) -> bool:
        """Keep the earlier versions of this file (multi-package databases such as dpkg's status)."""
        ...

    def probe(self, path: str, size: int, head: bytes) -> ContentProbe | None:
        """A probe for a file not captured, given its size and first bytes; None: skip it."""
        ...


@dataclass(frozen=True, slots=True)
class ImageFile:
    """A file of the final filesystem the scan kept.

    Attributes:
        path: normalised path without a leading ``/``.
        layer: digest of the layer that wrote this version.
        content: the file's bytes, for captured files.
        probe_result: what the probe found, for probed files.
        history: earlier versions of the file at this path, oldest first, as (layer digest,
            content), since the path last came into existence (for selectors that keep it).
    """

    path: str
    layer: str
    content: bytes | None = None
    probe_result: Any | None = None
    history: tuple[tuple[str, bytes], ...] = ()


# ---- the view ---------------------------------------------------------------------------

_FILE, _SYMLINK = "file", "symlink"
# Regular ("0", NUL, contiguous "7", GNU sparse "S"), links, devices and fifos.
_NON_DIRECTORY_TYPES = frozenset({b"0", b"\0", b"7", b"S", b"1", b"2", b"3", b"4", b"6"})


@dataclass(slots=True)
class _Node:
    kind: str
    layer_index: int
    layer: str
    content: bytes | None = None
    probe_result: Any | None = None
    target: str | None = None
    history: tuple[tuple[str, bytes], ...] = ()


class _SymlinkLoop(Exception):
    pass


@dataclass(slots=True)
class _Header:
    name: bytes
    linkname: bytes
    size: int
    typeflag: bytes


@dataclass
class _LayerState:
    index: int
    digest: str
    problems: list[ScanProblem] = field(default_factory=list)
    journal: list[tuple[str, _Node | None]] = field(default_factory=list)


def _display(path: str) -> str:
    """A path safe for JSON and terminals (layers may hold any bytes in names)."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text)[:1024]


class ImageFilesystem:
    """The part of an image's filesystem the scan needs, built layer by layer.

    Args:
        selector: which files to keep or probe.
        limits: bounds on the work of each layer.
        progress: called with the number of compressed bytes read since its last call (the
            scanner paces itself and checks for cancellation there; it may raise).
    """

    def __init__(self, selector: FileSelector, limits: LayerLimits,
                 progress: Callable[[int], None] | None = None) -> None:
        self._selector = selector
        self._limits = limits
        self._progress = progress
        self._nodes: dict[str, _Node] = {}
        # Names ever seen under each directory. Never shrunk, so a rollback cannot lose a
        # link; lookups always go through _nodes, so stale names are harmless.
        self._children: dict[str, set[str]] = {}
        self._dir_cache: dict[str, str] = {}
        self._captured_bytes = 0
        self._layer_count = 0

    # ---- reading the result -----------------------------------------------------------

    def files(self) -> Iterator[ImageFile]:
        """Every kept file of the final filesystem, in path order."""
        for path in sorted(self._nodes):
            node = self._nodes[path]
            if node.kind == _FILE:
                yield ImageFile(path, node.layer, node.content, node.probe_result, node.history)

    def read(self, path: str) -> ImageFile | None:
        """The kept file at ``path``, following symlinks (``etc/os-release`` is usually one)."""
        try:
            resolved = self._resolve(path.strip("/"), follow_last=True)
        except _SymlinkLoop:
            return None
        node = self._nodes.get(resolved)
        if node is None or node.kind != _FILE:
            return None
        return ImageFile(resolved, node.layer, node.content, node.probe_result, node.history)

    # ---- applying a layer -------------------------------------------------------------

    def apply_layer(self, blob: BinaryIO, digest: Digest, size: int | None) -> list[ScanProblem]:
        """Streams one layer blob and applies it on top of the layers applied before.

        Args:
            blob: the blob's bytes (compressed as stored), read once from where it is.
            digest: the digest the manifest names; the bytes are verified against it.
            size: the size the manifest names, or None.

        Returns:
            The problems found. A fatal one means the layer was rolled back.

        Raises:
            Whatever ``progress`` raises (cancellation); the layer is rolled back first.
        """
        state = _LayerState(self._layer_count, str(digest))
        self._layer_count += 1
        verifier = DigestVerifier(digest, size)
        try:
            source = _Source(blob, verifier, self._limits, self._progress)
            self._walk(source, state)
            source.finish()
        except LayerRejected as exc:
            self._rollback(state)
            path = _display(exc.path) if exc.path is not None else None
            state.problems.append(ScanProblem(exc.kind, str(exc), state.digest, path, fatal=True))
        except BaseException:
            self._rollback(state)
            raise
        return state.problems

    def _walk(self, source: _Source, state: _LayerState) -> None:
        limits = self._limits
        entries = 0
        long_name: bytes | None = None
        long_link: bytes | None = None
        pax: dict[str, bytes] = {}
        while True:
            block = source.read_block()
            if block is None or block == _ZERO_BLOCK:
                # End of archive (Go's archive/tar, which containerd uses, also accepts an
                # archive that ends at a header boundary without the two zero blocks).
                return
            header = _parse_header(block)
            entries += 1
            if entries > limits.max_entries:
                raise LayerRejected("too-many-entries", f"more than {limits.max_entries} tar entries")
            if header.typeflag in (b"x", b"g", b"L", b"K"):
                if header.size > limits.max_header_size:
                    raise LayerRejected("header-too-large", f"a tar header record of {header.size} bytes")
                data = source.read_exact(header.size)
                source.skip(_padding(header.size))
                if header.typeflag == b"x":
                    pax = _parse_pax(data)
                elif header.typeflag == b"L":
                    long_name = data.split(b"\0", 1)[0]
                elif header.typeflag == b"K":
                    long_link = data.split(b"\0", 1)[0]
                continue  # global pax headers ("g") carry nothing the scan uses
            name = pax.get("path", long_name if long_name is not None else header.name)
            link = pax.get("linkpath", long_link if long_link is not None else header.linkname)
            size = header.size
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise LayerRejected("corrupt", "invalid size in a pax header") from None
                if size < 0:
                    raise LayerRejected("corrupt", "negative size in a pax header")
            sparse = any(key.startswith("GNU.sparse.") for key in pax) or header.typeflag == b"S"
            long_name = long_link = None
            pax = {}
            # Go's archive/tar: these types never have data, whatever their size field says.
            data_size = 0 if header.typeflag in (b"1", b"2", b"3", b"4", b"5", b"6") else size
            remaining = self._entry(source, state, header.typeflag, name, link, data_size, sparse)
            source.skip(remaining + _padding(data_size))

    # ---- entries ----------------------------------------------------------------------

    def _normalize(self, raw: bytes, state: _LayerState, what: str) -> str | None:
        """A tar path as a view key, or None (and a problem) if it must not be followed."""
        if len(raw) > self._limits.max_path_length:
            state.problems.append(ScanProblem("path-too-long", f"{what} longer than {self._limits.max_path_length}"
                                              " bytes", state.digest, _display(raw[:200].decode("utf-8", "replace"))))
            return None
        text = raw.decode("utf-8", "surrogateescape")
        if text.startswith("/"):
            state.problems.append(ScanProblem("absolute-path", f"{what} is absolute; not followed", state.digest,
                                              _display(text)))
            return None
        parts: list[str] = []
        for component in text.split("/"):
            if component in ("", "."):
                continue
            if component == "..":
                if not parts:
                    state.problems.append(ScanProblem("path-traversal", f"{what} leaves the image root; not"
                                                      " followed", state.digest, _display(text)))
                    return None
                parts.pop()
            else:
                parts.append(component)
        return "/".join(parts)

    def _entry(self, source: _Source, state: _LayerState, typeflag: bytes, raw_name: bytes, raw_link: bytes,
               size: int, sparse: bool) -> int:
        """Applies one entry; returns how many of its data bytes are still unread."""
        path = self._normalize(raw_name, state, "entry path")
        if not path:
            return size  # refused, or the root directory itself
        directory, _, base = path.rpartition("/")
        try:
            parent = self._resolve(directory, follow_last=True) if directory else ""
        except _SymlinkLoop:
            state.problems.append(ScanProblem("symlink-loop", "the entry's directory is a symlink loop; not"
                                              " followed", state.digest, _display(path)))
            return size
        if base.startswith(".wh."):
            hidden = base[4:]
            if base == ".wh..wh..opq":
                self._remove_tree(parent, state, lower_only=True, keep_root=True)
            elif not base.startswith(".wh..wh.") and hidden not in ("", ".", ".."):
                # Other .wh..wh. names are aufs metadata, not whiteouts.
                self._remove_tree(_join(parent, hidden), state, lower_only=True)
            return size
        full = _join(parent, base)
        if typeflag in (b"5", b"D"):
            if full in self._nodes:
                self._set(full, None, state)
            return size
        if typeflag not in _NON_DIRECTORY_TYPES:
            return size  # volume labels, multi-volume continuations: not part of the filesystem
        # Any other entry replaces whatever was at its path, a whole directory tree included.
        previous = self._nodes.get(full)
        self._remove_tree(full, state, lower_only=False)
        if typeflag == b"2":
            target = raw_link.decode("utf-8", "surrogateescape")
            if len(raw_link) > self._limits.max_path_length:
                state.problems.append(ScanProblem("path-too-long", "symlink target too long", state.digest,
                                                  _display(path)))
                return size
            self._set(full, _Node(_SYMLINK, state.index, state.digest, target=target), state)
            return size
        if typeflag == b"1":
            self._hardlink(full, raw_link, state)
            return size
        if typeflag in (b"3", b"4", b"6"):
            return size  # devices and fifos: nothing to read
        return self._regular(source, state, full, size, sparse, previous)

    def _hardlink(self, path: str, raw_target: bytes, state: _LayerState) -> None:
        target = self._normalize(raw_target, state, "hard link target")
        if target is None:
            return
        directory, _, base = target.rpartition("/")
        try:
            resolved = _join(self._resolve(directory, follow_last=True) if directory else "", base)
        except _SymlinkLoop:
            state.problems.append(ScanProblem("symlink-loop", "hard link target is behind a symlink loop",
                                              state.digest, _display(path)))
            return
        node = self._nodes.get(resolved)
        if node is not None:
            # A hard link shares the file (or the symlink itself: link(2) does not follow).
            self._set(path, _Node(node.kind, state.index, state.digest, node.content, node.probe_result,
                                  node.target), state)
        elif self._selector.capture_limit(path) is not None:
            state.problems.append(ScanProblem("hardlink-unresolved", f"hard link to {_display(target)}, whose "
                                              "content the scan did not keep", state.digest, _display(path)))

    def _regular(self, source: _Source, state: _LayerState, path: str, size: int, sparse: bool,
                 previous: _Node | None) -> int:
        limits = self._limits
        limit = self._selector.capture_limit(path)
        if limit is not None and not sparse:
            if size > min(limit, limits.max_file_size):
                state.problems.append(ScanProblem("file-too-large", f"{size} bytes; not read", state.digest,
                                                  _display(path)))
                return size
            if self._captured_bytes + size > limits.max_captured_bytes:
                state.problems.append(ScanProblem("capture-limit", "the image's package files exceed "
                                                  f"{limits.max_captured_bytes} bytes; not read", state.digest,
                                                  _display(path)))
                return size
            content = source.read_exact(size)
            self._captured_bytes += size
            history: tuple[tuple[str, bytes], ...] = ()
            if previous is not None and previous.kind == _FILE and previous.content is not None \
                    and self._selector.keeps_history(path):
                history = (*previous.history, (previous.layer, previous.content))
            self._set(path, _Node(_FILE, state.index, state.digest, content=content, history=history), state)
            return 0
        if sparse or size > limits.max_binary_size or size == 0:
            return size
        head = source.read_exact(min(size, _HEAD_BYTES))
        remaining = size - len(head)
        probe = self._selector.probe(path, size, head)
        if probe is None:
            return remaining
        wants_more = probe.feed(head)
        while wants_more and remaining:
            chunk = source.read_upto(min(remaining, _MAX_OUTPUT))
            remaining -= len(chunk)
            wants_more = probe.feed(chunk)
        found = probe.result()
        if found is not None:
            self._set(path, _Node(_FILE, state.index, state.digest, probe_result=found), state)
        return remaining

    # ---- view mutations (journaled) ---------------------------------------------------

    def _set(self, path: str, node: _Node | None, state: _LayerState) -> None:
        old = self._nodes.get(path)
        if old is None and node is None:
            return
        state.journal.append((path, old))
        if node is None:
            del self._nodes[path]
        else:
            self._nodes[path] = node
            self._register(path)
        if (old is not None and old.kind == _SYMLINK) or (node is not None and node.kind == _SYMLINK):
            self._dir_cache.clear()

    def _register(self, path: str) -> None:
        while path:
            parent, _, name = path.rpartition("/")
            names = self._children.setdefault(parent, set())
            if name in names:
                return
            names.add(name)
            path = parent

    def _remove_tree(self, root: str, state: _LayerState, *, lower_only: bool, keep_root: bool = False) -> None:
        stack = [root]
        while stack:
            path = stack.pop()
            node = self._nodes.get(path)
            if node is not None and not (keep_root and path == root) \
                    and (not lower_only or node.layer_index < state.index):
                self._set(path, None, state)
            for name in self._children.get(path, ()):
                stack.append(_join(path, name))

    def _rollback(self, state: _LayerState) -> None:
        for path, old in reversed(state.journal):
            if old is None:
                self._nodes.pop(path, None)
            else:
                self._nodes[path] = old
                self._register(path)
        state.journal.clear()
        self._dir_cache.clear()

    # ---- path resolution --------------------------------------------------------------

    def _resolve(self, path: str, *, follow_last: bool) -> str:
        """Resolves symlinks in ``path`` inside the view, as a chroot would (``..`` stops at /)."""
        if not path:
            return ""
        if follow_last:
            cached = self._dir_cache.get(path)
            if cached is not None:
                return cached
        pending = path.split("/")
        pending.reverse()
        resolved: list[str] = []
        hops = steps = 0
        while pending:
            component = pending.pop()
            steps += 1
            if steps > _MAX_RESOLVE_STEPS:
                raise _SymlinkLoop
            if component in ("", "."):
                continue
            if component == "..":
                if resolved:
                    resolved.pop()
                continue
            resolved.append(component)
            if not pending and not follow_last:
                break
            node = self._nodes.get("/".join(resolved))
            if node is not None and node.kind == _SYMLINK:
                hops += 1
                if hops > self._limits.max_symlink_hops:
                    raise _SymlinkLoop
                resolved.pop()
                target = node.target or ""
                if target.startswith("/"):
                    resolved.clear()
                parts = target.split("/")
                parts.reverse()
                pending.extend(parts)
        result = "/".join(resolved)
        if follow_last and len(self._dir_cache) < 65536:
            self._dir_cache[path] = result
        return result


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def _padding(size: int) -> int:
    return -size % _BLOCK


# ---- tar headers ------------------------------------------------------------------------


def _number(field_bytes: bytes) -> int:
    if field_bytes[:1] and field_bytes[0] & 0x80:
        # GNU base-256: big-endian two's complement with the marker bit.
        if field_bytes[0] == 0xFF:
            raise LayerRejected("corrupt", "negative number in a tar header")
        return int.from_bytes(bytes([field_bytes[0] & 0x7F]) + field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise LayerRejected("corrupt", "invalid number in a tar header") from None


def _parse_header(block: bytes) -> _Header:
    stored = _number(block[148:156])
    # The checksum field counts as eight spaces. Some old writers summed signed chars.
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored != unsigned:
        high = sum(1 for b in block[:148] + block[156:] if b > 127)
        if stored != unsigned - 256 * high:
            raise LayerRejected("corrupt", "tar header checksum mismatch (not a tar, or corrupt)")
    name = block[0:100].split(b"\0", 1)[0]
    magic = block[257:263]
    if magic == b"ustar\0":
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    size = _number(block[124:136])
    return _Header(name, block[157:257].split(b"\0", 1)[0], size, block[156:157])


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """Pax extended header records ``"%d %s=%s\\n"``; values stay bytes (paths may be any bytes)."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 24)
        if space < 0:
            if not data[pos:].strip(b"\0"):
                break
            raise LayerRejected("corrupt", "invalid pax header record")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise LayerRejected("corrupt", "invalid pax header record length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1:end] != b"\n":
            raise LayerRejected("corrupt", "invalid pax header record")
        key, equals, value = data[space + 1:end - 1].partition(b"=")
        if not equals:
            raise LayerRejected("corrupt", "pax header record without '='")
        records[key.decode("utf-8", "replace")] = value
        pos = end
    return records


# ---- decompression with limits ----------------------------------------------------------


class _Source:
    """The decompressed bytes of one layer, verified and bounded as they are read."""

    def __init__(self, raw: BinaryIO, verifier: DigestVerifier, limits: LayerLimits,
                 progress: Callable[[int], None] | None) -> None:
        self._raw = raw
        self._verifier = verifier
        self._limits = limits
        self._progress = progress
        self._buffer = bytearray()
        self._offset = 0
        self._uncompressed = 0
        self._raw_eof = False
        first = self._read_raw(_RAW_PIECE)
        if first.startswith(_GZIP_MAGIC):
            self._chunks: Iterator[bytes] = _gunzip(first, self._read_raw)
        elif first.startswith(_ZSTD_MAGIC):
            self._chunks = _unzstd(first, self._read_raw)
        else:
            self._chunks = _plain(first, self._read_raw)

    def _read_raw(self, size: int) -> bytes:
        if self._raw_eof:
            return b""
        data = self._raw.read(size)
        if not data:
            self._raw_eof = True
            return b""
        try:
            self._verifier.update(data)
        except OCIError:
            raise LayerRejected("size-mismatch", "the blob is larger than its descriptor says") from None
        if self._verifier.size > self._limits.max_layer_size:
            raise LayerRejected("too-large", f"layer larger than {self._limits.max_layer_size} bytes")
        if self._progress is not None:
            self._progress(len(data))
        return data

    def _fill(self) -> bool:
        """Appends the next decompressed chunk; False at the end of the stream."""
        try:
            chunk = next(self._chunks)
        except StopIteration:
            return False
        self._uncompressed += len(chunk)
        limits = self._limits
        if self._uncompressed > limits.max_uncompressed_size:
            raise LayerRejected("too-large", f"layer expands beyond {limits.max_uncompressed_size} bytes")
        if self._uncompressed > limits.ratio_floor \
                and self._uncompressed > limits.max_ratio * max(self._verifier.size, 1):
            raise LayerRejected("decompression-bomb", f"{self._verifier.size} compressed bytes expand to more than "
                                f"{self._uncompressed} (ratio limit {limits.max_ratio:g})")
        if self._offset > len(self._buffer) // 2:
            del self._buffer[:self._offset]
            self._offset = 0
        self._buffer += chunk
        return True

    def _available(self) -> int:
        return len(self._buffer) - self._offset

    def read_block(self) -> bytes | None:
        """The next 512-byte header block, or None at a clean end of stream."""
        while self._available() < _BLOCK:
            if not self._fill():
                if self._available() == 0:
                    return None
                raise LayerRejected("truncated", "the tar stream ends inside a header")
        return self.read_exact(_BLOCK)

    def read_exact(self, size: int) -> bytes:
        while self._available() < size:
            if not self._fill():
                raise LayerRejected("truncated", "the tar stream ends inside an entry")
        data = bytes(self._buffer[self._offset:self._offset + size])
        self._offset += size
        return data

    def read_upto(self, size: int) -> bytes:
        if self._available() == 0 and not self._fill():
            raise LayerRejected("truncated", "the tar stream ends inside an entry")
        take = min(size, self._available())
        data = bytes(self._buffer[self._offset:self._offset + take])
        self._offset += take
        return data

    def skip(self, size: int) -> None:
        while size:
            if self._available() == 0 and not self._fill():
                raise LayerRejected("truncated", "the tar stream ends inside an entry")
            take = min(size, self._available())
            self._offset += take
            size -= take

    def finish(self) -> None:
        """Reads the rest of the blob (it counts for the digest and limits) and verifies it."""
        while self._fill():
            self._offset = len(self._buffer)
        while self._read_raw(_RAW_PIECE):
            pass
        try:
            self._verifier.verify()
        except OCIError as exc:
            kind = "size-mismatch" if exc.code == "SIZE_INVALID" else "digest-mismatch"
            raise LayerRejected(kind, f"the blob does not match its descriptor: {exc.message}") from None


def _plain(first: bytes, read_raw: Callable[[int], bytes]) -> Iterator[bytes]:
    data = first
    while data:
        yield data
        data = read_raw(_RAW_PIECE)


def _gunzip(first: bytes, read_raw: Callable[[int], bytes]) -> Iterator[bytes]:
    decompressor: Any = None
    data = first
    while True:
        if not data:
            data = read_raw(_RAW_PIECE)
            if not data:
                if decompressor is not None and not decompressor.eof:
                    raise LayerRejected("truncated", "the gzip stream ends early")
                return
        if decompressor is None or decompressor.eof:
            if decompressor is not None and not data.strip(b"\0"):
                data = b""  # zero padding after the last member
                continue
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)  # a new gzip member
        try:
            out = decompressor.decompress(data, _MAX_OUTPUT)
        except zlib.error as exc:
            raise LayerRejected("corrupt", f"invalid gzip data: {exc}") from None
        data = decompressor.unused_data if decompressor.eof else decompressor.unconsumed_tail
        if out:
            yield out


def _unzstd(first: bytes, read_raw: Callable[[int], bytes]) -> Iterator[bytes]:
    context = zstandard.ZstdDecompressor(max_window_size=1 << 27)
    decompressor: Any = None
    data, pos = first, 0
    out = bytearray()
    while True:
        if pos >= len(data):
            data, pos = read_raw(_RAW_PIECE), 0
            if not data:
                if out:
                    yield bytes(out)
                if decompressor is not None and not decompressor.eof:
                    raise LayerRejected("truncated", "the zstd stream ends early")
                return
        if decompressor is None or decompressor.eof:
            if decompressor is not None and not data[pos:].strip(b"\0"):
                pos = len(data)
                continue
            decompressor = context.decompressobj()
        piece = data[pos:pos + _ZSTD_INPUT]
        pos += len(piece)
        try:
            out += decompressor.decompress(piece)
        except zstandard.ZstdError as exc:
            raise LayerRejected("corrupt", f"invalid zstd data: {exc}") from None
        if decompressor.eof and decompressor.unused_data:
            # The piece held the start of the next frame: give it back.
            pos -= len(decompressor.unused_data)
        if len(out) >= _MAX_OUTPUT:
            yield bytes(out)
            out.clear()
