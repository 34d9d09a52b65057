"""Filesystem storage for the seed registry.

Layout under the data directory::

    blobs/sha256/<ab>/<hex>                 content, including manifests (content-addressed)
    chunkmaps/sha256/<ab>/<hex>.<size>      msgpack chunk maps, one per chunk size
    repositories/<name>/_blobs/sha256/<hex>           a blob belongs to the repository
    repositories/<name>/_manifests/sha256/<hex>       manifest revision (JSON: media type, size, subject)
    repositories/<name>/_tags/<tag>                   the digest a tag points to
    repositories/<name>/_referrers/<subject hex>/<hex>  a referrer's descriptor (JSON)
    repositories/<name>/_signatures/<alg>-<hex>/<32 hex>.json  signature API extension (seed.signatures)
    uploads/<uuid>/{state.json,data}        upload sessions (survive restarts)
    tmp/                                    temporary files, renamed into place

Rules/invariants:
- Nothing is visible until complete: every file is written to a temporary name, fsynced,
  renamed into place, and its directory fsynced. A kill -9 at any point leaves either the
  old state or the new one, plus garbage in ``tmp/`` or ``uploads/`` that is purged later.
- Blobs are verified (size and digest) before the rename that makes them visible.
- Paths are built only from values checked by ``p2pd.oci.grammar`` / ``Digest.parse`` or
  from upload ids we generated ourselves (checked against ``_UPLOAD_ID_RE``).
- Methods block (file I/O, fsync); the registry calls them through ``trio.to_thread``.
- Repository components never start with ``_`` (grammar), so ``_blobs`` etc. cannot clash
  with nested repository names.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from p2pd.fsutil import fsync_dir, write_atomic
from p2pd.oci.chunkmap import ChunkHasher, ChunkMap, chunk_size_for, validate_chunk_size
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from p2pd.oci.grammar import is_valid_name, is_valid_tag
from p2pd.oci.manifest import Descriptor, ParsedManifest
from p2pd.progress import NO_PROGRESS, ProgressSink

__all__ = ["GCReport", "Storage", "StoredManifest", "UploadSession", "UploadSessions"]

log = logging.getLogger("seed.storage")

_UPLOAD_ID_RE = re.compile(r"[a-f0-9]{32}")
_READ_PIECE = 1024 * 1024
_MAP_LOCKS = 64  # striped locks: one computation per chunk map at a time (bounded memory)


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    size: int


@dataclass(slots=True)
class UploadSession:
    id: str
    name: str
    directory: Path
    created: float

    @property
    def data_path(self) -> Path:
        return self.directory / "data"

    def size(self) -> int:
        try:
            return self.data_path.stat().st_size
        except FileNotFoundError:
            return 0


class UploadSessions(Protocol):
    """Upload sessions of blob pushes: the seam where a shared store (for several seed replicas
    behind one name) replaces the local files. ``Storage`` is the file implementation; every
    method may block (the registry calls them in worker threads, except the cheap lookups).

    Sessions survive restarts; ``commit_upload`` verifies the digest before the bytes become
    a blob, and ``truncate_upload`` gives space back after a failed append.
    """

    def create_upload(self, name: str) -> UploadSession: ...
    def get_upload(self, name: str, upload_id: str) -> UploadSession: ...
    def append_upload(self, session: UploadSession, data: bytes, *, max_size: int) -> int: ...
    def truncate_upload(self, session: UploadSession, size: int) -> None: ...
    def cancel_upload(self, session: UploadSession) -> None: ...
    def commit_upload(self, session: UploadSession, expected: Digest) -> int: ...
    def list_uploads(self) -> Iterator[UploadSession]: ...
    def purge_uploads(self, max_age: float, now: float | None = None) -> int: ...


@dataclass(slots=True)
class _HashState:
    """Hashes of an upload's bytes so far, kept in memory to avoid re-reading on close."""

    offset: int
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)
    chunks: ChunkHasher | None = None


@dataclass(slots=True)
class GCReport:
    removed_blobs: list[str] = field(default_factory=list)
    removed_bytes: int = 0
    kept_blobs: int = 0
    removed_signatures: int = 0  # signature directories of manifests that are gone
    dry_run: bool = False


class Storage:
    """The registry's content and metadata on a local filesystem.

    Args:
        root: the data directory (created if missing).
        chunk_size: chunk size of the chunk map computed at push time.
        clean_tmp: remove leftovers of a crash from ``tmp/`` (the server does at start).
    """

    def __init__(self, root: Path, *, chunk_size: int, clean_tmp: bool = True) -> None:
        self.root = Path(root)
        self.chunk_size = validate_chunk_size(chunk_size)
        for sub in ("blobs/sha256", "chunkmaps/sha256", "repositories", "uploads", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._hash_states: dict[str, _HashState] = {}
        self._hash_lock = threading.Lock()
        # Every node of a site asks for a new blob's map at the same moment: one of them
        # computes a map that is not stored yet, the others wait for it and read it.
        self._map_locks = [threading.Lock() for _ in range(_MAP_LOCKS)]
        if clean_tmp:
            # Only the serving process may clean: `seed gc` runs beside a live server whose
            # temporary files are in use.
            self._clean_tmp()

    # ---- low-level helpers -------------------------------------------------------------

    def _clean_tmp(self) -> None:
        # Temporary files left by a crash are never referenced by anything.
        for entry in (self.root / "tmp").iterdir():
            with contextlib.suppress(OSError):
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def _write_atomic(self, path: Path, data: bytes) -> None:
        write_atomic(path, data, tmp_dir=self.root / "tmp")

    def _remove(self, path: Path) -> bool:
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.encoded[:2] / digest.encoded

    def _repo(self, name: str) -> Path:
        if not is_valid_name(name):
            raise OCIError("NAME_INVALID", "invalid repository name")
        return self.root / "repositories" / name

    def _blob_link(self, name: str, digest: Digest) -> Path:
        return self._repo(name) / "_blobs" / digest.algorithm / digest.encoded

    def _manifest_link(self, name: str, digest: Digest) -> Path:
        return self._repo(name) / "_manifests" / digest.algorithm / digest.encoded

    def _tag_path(self, name: str, tag: str) -> Path:
        if not is_valid_tag(tag):
            raise OCIError("TAG_INVALID", "invalid tag")
        return self._repo(name) / "_tags" / tag

    def signatures_dir(self, name: str, digest: Digest) -> Path:
        """Where the signature extension keeps manifest ``digest``'s signatures (``seed.signatures``)."""
        return self._repo(name) / "_signatures" / f"{digest.algorithm}-{digest.encoded}"

    def _referrer_dir(self, name: str, subject: Digest) -> Path:
        return self._repo(name) / "_referrers" / f"{subject.algorithm}-{subject.encoded}"

    def repository_exists(self, name: str) -> bool:
        return self._repo(name).is_dir()

    # ---- blobs ------------------------------------------------------------------------

    def blob_size(self, digest: Digest) -> int | None:
        """Size of a stored blob anywhere in the registry, or None."""
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def repository_blob_size(self, name: str, digest: Digest) -> int | None:
        """Size of a blob that belongs to repository ``name`` (pushed, mounted, or a manifest)."""
        if not (self._blob_link(name, digest).exists() or self._manifest_link(name, digest).exists()):
            return None
        return self.blob_size(digest)

    def open_blob(self, name: str, digest: Digest) -> tuple[int, int]:
        """Opens a repository's blob for reading; returns (fd, size). The caller closes fd."""
        if self.repository_blob_size(name, digest) is None:
            raise OCIError("BLOB_UNKNOWN", "blob unknown to registry", detail={"digest": str(digest)})
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY)
        except FileNotFoundError as exc:
            raise OCIError("BLOB_UNKNOWN", "blob unknown to registry", detail={"digest": str(digest)}) from exc
        return fd, os.fstat(fd).st_size

    def link_blob(self, name: str, digest: Digest) -> None:
        self._touch(digest)
        link = self._blob_link(name, digest)
        if not link.exists():
            self._write_atomic(link, b"")

    def _touch(self, digest: Digest) -> None:
        # A blob that is used again is young again: GC's grace period then protects it
        # from a collection that started before the manifest using it was pushed.
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.blob_path(digest))

    def mount_blob(self, name: str, digest: Digest, source: str) -> bool:
        """Cross-repository mount: links ``digest`` into ``name`` if ``source`` has it."""
        if not is_valid_name(source) or self.repository_blob_size(source, digest) is None:
            return False
        self.link_blob(name, digest)
        return True

    def delete_blob(self, name: str, digest: Digest) -> None:
        """Removes the blob from the repository; the content goes at the next GC."""
        if not self._remove(self._blob_link(name, digest)):
            raise OCIError("BLOB_UNKNOWN", "blob unknown to repository", detail={"digest": str(digest)})

    # ---- uploads ----------------------------------------------------------------------

    def create_upload(self, name: str) -> UploadSession:
        self._repo(name)  # validates the name
        upload_id = uuid.uuid4().hex
        directory = self.root / "uploads" / upload_id
        directory.mkdir()
        created = time.time()
        self._write_atomic(directory / "state.json", json.dumps({"name": name, "created": created}).encode())
        (directory / "data").touch()
        with self._hash_lock:
            self._hash_states[upload_id] = _HashState(0, chunks=ChunkHasher(self.chunk_size))
        return UploadSession(upload_id, name, directory, created)

    def get_upload(self, name: str, upload_id: str) -> UploadSession:
        unknown = OCIError("BLOB_UPLOAD_UNKNOWN", "upload unknown", detail={"uuid": upload_id[:64]})
        if not _UPLOAD_ID_RE.fullmatch(upload_id):
            raise unknown
        directory = self.root / "uploads" / upload_id
        try:
            state = json.loads((directory / "state.json").read_bytes())
        except (FileNotFoundError, ValueError) as exc:
            raise unknown from exc
        # Without its data file the session is gone: committed (the file became the blob) or
        # left half-made by a crash; either way only the purge still has business with it.
        if state.get("name") != name or not (directory / "data").is_file():
            raise unknown
        return UploadSession(upload_id, name, directory, float(state.get("created", 0)))

    def append_upload(self, session: UploadSession, data: bytes, *, max_size: int) -> int:
        """Appends bytes at the end of the upload; returns the new size."""
        with self._hash_lock:
            state = self._hash_states.get(session.id)
        fd = os.open(session.data_path, os.O_WRONLY | os.O_APPEND)
        try:
            offset = os.fstat(fd).st_size
            if offset + len(data) > max_size:
                raise OCIError("SIZE_INVALID", "blob exceeds the maximum size", status=413,
                               detail={"limit": max_size})
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
        finally:
            os.close(fd)
        if state is not None and state.offset == offset:
            state.sha256.update(data)
            if state.chunks is not None:
                state.chunks.update(data)
            state.offset += len(data)
        elif state is not None:
            with self._hash_lock:  # out of step (e.g. after a restart): rehash on close
                self._hash_states.pop(session.id, None)
        return offset + len(data)

    def truncate_upload(self, session: UploadSession, size: int) -> None:
        """Cuts an upload back to ``size`` bytes (after a failed append: disk full)."""
        with self._hash_lock:  # the running hash covered bytes that are gone: rehash on close
            self._hash_states.pop(session.id, None)
        with contextlib.suppress(FileNotFoundError):
            os.truncate(session.data_path, size)

    def cancel_upload(self, session: UploadSession) -> None:
        with self._hash_lock:
            self._hash_states.pop(session.id, None)
        shutil.rmtree(session.directory, ignore_errors=True)

    def _hash_file(self, path: Path) -> tuple[Digest, ChunkMap | None, int]:
        sha = hashlib.sha256()
        chunks = ChunkHasher(self.chunk_size)
        size = 0
        with open(path, "rb") as handle:
            while piece := handle.read(_READ_PIECE):
                sha.update(piece)
                chunks.update(piece)
                size += len(piece)
        digest = Digest("sha256", sha.hexdigest())
        return digest, chunks.finish(digest), size

    def commit_upload(self, session: UploadSession, expected: Digest) -> int:
        """Verifies the upload against ``expected`` and makes it a blob of the repository.

        Returns the blob size. Raises DIGEST_INVALID (and deletes the upload) on mismatch.
        """
        with self._hash_lock:
            state = self._hash_states.pop(session.id, None)
        size = session.size()
        if expected.algorithm != "sha256":
            computed_hex = self._hash_any(session.data_path, expected.algorithm)
            actual, chunk_map = Digest(expected.algorithm, computed_hex), None
        elif state is not None and state.offset == size:
            actual = Digest("sha256", state.sha256.hexdigest())
            chunk_map = state.chunks.finish(actual) if state.chunks is not None else None
        else:
            actual, chunk_map, size = self._hash_file(session.data_path)
        if actual != expected:
            self.cancel_upload(session)
            raise OCIError("DIGEST_INVALID", "uploaded content does not match digest",
                           detail={"expected": str(expected), "actual": str(actual)})
        target = self.blob_path(expected)
        if target.exists():
            shutil.rmtree(session.directory, ignore_errors=True)
        else:
            with open(session.data_path, "rb") as handle:
                os.fsync(handle.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(session.data_path, target)
            fsync_dir(target.parent)
            shutil.rmtree(session.directory, ignore_errors=True)
        if chunk_map is not None and chunk_map.size == size:
            self._store_chunk_map(chunk_map)
            # The map p2pd nodes ask for (``?largest=`` their chunk size, by default the same as
            # ours): smaller chunks for a blob under TARGET_CHUNKS of ours (chunk_size_for). Computed
            # here, one more read of a blob under 512 MiB, so that the nodes' first pull does not wait.
            adaptive = chunk_size_for(size, self.chunk_size)
            if adaptive != self.chunk_size:
                self._store_chunk_map(self._compute_chunk_map(expected, adaptive))
        self.link_blob(session.name, expected)
        return size

    @staticmethod
    def _hash_any(path: Path, algorithm: str) -> str:
        hasher = hashlib.new(algorithm)
        with open(path, "rb") as handle:
            while piece := handle.read(_READ_PIECE):
                hasher.update(piece)
        return hasher.hexdigest()

    def store_blob_bytes(self, name: str, data: bytes, expected: Digest) -> None:
        """Stores a small blob given whole (single-request upload already in memory)."""
        actual = Digest(expected.algorithm, hashlib.new(expected.algorithm, data).hexdigest())
        if actual != expected:
            raise OCIError("DIGEST_INVALID", "content does not match digest",
                           detail={"expected": str(expected), "actual": str(actual)})
        if not self.blob_path(expected).exists():
            self._write_atomic(self.blob_path(expected), data)
        self.link_blob(name, expected)

    def list_uploads(self) -> Iterator[UploadSession]:
        for directory in (self.root / "uploads").iterdir():
            if not _UPLOAD_ID_RE.fullmatch(directory.name):
                continue
            try:
                state = json.loads((directory / "state.json").read_bytes())
                created = float(state["created"])
                name = str(state["name"])
            except (OSError, ValueError, KeyError):
                # A crash between mkdir and the state write: age it by the directory.
                try:
                    created, name = directory.stat().st_mtime, ""
                except FileNotFoundError:
                    continue  # committed or cancelled by a concurrent request meanwhile
            yield UploadSession(directory.name, name, directory, created)

    def purge_uploads(self, max_age: float, now: float | None = None) -> int:
        """Deletes upload sessions untouched for ``max_age`` seconds; returns how many."""
        now = time.time() if now is None else now
        purged = 0
        for session in self.list_uploads():
            try:
                touched = max(session.created, session.data_path.stat().st_mtime)
            except FileNotFoundError:
                touched = session.created
            if now - touched > max_age:
                self.cancel_upload(session)
                purged += 1
        return purged

    # ---- chunk maps -------------------------------------------------------------------

    def _chunk_map_path(self, digest: Digest, chunk_size: int) -> Path:
        return (self.root / "chunkmaps" / digest.algorithm / digest.encoded[:2]
                / f"{digest.encoded}.{chunk_size}")

    def _store_chunk_map(self, chunk_map: ChunkMap) -> None:
        self._write_atomic(self._chunk_map_path(chunk_map.digest, chunk_map.chunk_size), chunk_map.encode())

    def chunk_map(self, name: str, digest: Digest, chunk_size: int) -> bytes:
        """The encoded chunk map of a repository's blob, computed and cached on demand."""
        validate_chunk_size(chunk_size)
        size = self.repository_blob_size(name, digest)
        if size is None:
            raise OCIError("BLOB_UNKNOWN", "blob unknown to registry", detail={"digest": str(digest)})
        path = self._chunk_map_path(digest, chunk_size)
        with contextlib.suppress(FileNotFoundError):
            return path.read_bytes()
        if digest.algorithm != "sha256":
            raise OCIError("UNSUPPORTED", "chunk maps exist for sha256 blobs only", status=400)
        with self._map_locks[hash(path) % _MAP_LOCKS]:
            with contextlib.suppress(FileNotFoundError):
                return path.read_bytes()  # computed meanwhile by the request we waited for
            chunk_map = self._compute_chunk_map(digest, chunk_size)
            self._store_chunk_map(chunk_map)
        return chunk_map.encode()

    def _compute_chunk_map(self, digest: Digest, chunk_size: int) -> ChunkMap:
        hasher = ChunkHasher(chunk_size)
        with open(self.blob_path(digest), "rb") as handle:
            while piece := handle.read(_READ_PIECE):
                hasher.update(piece)
        return hasher.finish(digest)

    # ---- manifests and tags -----------------------------------------------------------

    def put_manifest(self, name: str, body: bytes, parsed: ParsedManifest, tag: str | None) -> None:
        """Stores a validated manifest, its revision link, referrer entry and tag."""
        for ref in parsed.references:
            if parsed.is_index:
                present = self._manifest_link(name, ref.digest).exists()
            else:
                present = self.repository_blob_size(name, ref.digest) is not None
            if not present:
                raise OCIError("MANIFEST_BLOB_UNKNOWN", "manifest references unknown content",
                               detail={"digest": str(ref.digest)})
            self._touch(ref.digest)
        if not self.blob_path(parsed.digest).exists():
            self._write_atomic(self.blob_path(parsed.digest), body)
        meta = {"mediaType": parsed.media_type, "size": parsed.size}
        if parsed.subject is not None:
            meta["subject"] = str(parsed.subject.digest)
        self._write_atomic(self._manifest_link(name, parsed.digest), json.dumps(meta).encode())
        if parsed.subject is not None:
            entry = parsed.as_referrer().to_json()
            self._write_atomic(self._referrer_dir(name, parsed.subject.digest) / parsed.digest.encoded,
                               json.dumps(entry).encode())
        if tag is not None:
            self._write_atomic(self._tag_path(name, tag), str(parsed.digest).encode())

    def resolve(self, name: str, reference: str) -> Digest:
        """The digest a tag or digest reference names in repository ``name``."""
        if ":" in reference:
            return Digest.parse(reference)
        try:
            text = self._tag_path(name, reference).read_text()
        except FileNotFoundError as exc:
            raise OCIError("MANIFEST_UNKNOWN", "manifest unknown", detail={"tag": reference}) from exc
        return Digest.parse(text.strip())

    def stat_manifest(self, name: str, reference: str) -> StoredManifest:
        digest = self.resolve(name, reference)
        try:
            meta = json.loads(self._manifest_link(name, digest).read_bytes())
        except FileNotFoundError as exc:
            raise OCIError("MANIFEST_UNKNOWN", "manifest unknown", detail={"digest": str(digest)}) from exc
        return StoredManifest(digest, str(meta["mediaType"]), int(meta["size"]))

    def get_manifest(self, name: str, reference: str) -> tuple[StoredManifest, bytes]:
        stored = self.stat_manifest(name, reference)
        try:
            body = self.blob_path(stored.digest).read_bytes()
        except FileNotFoundError as exc:
            raise OCIError("MANIFEST_UNKNOWN", "manifest unknown", detail={"digest": str(stored.digest)}) from exc
        return stored, body

    def delete_manifest(self, name: str, digest: Digest) -> None:
        """Deletes a manifest revision, the tags that point to it and its referrer entry."""
        link = self._manifest_link(name, digest)
        try:
            meta = json.loads(link.read_bytes())
        except FileNotFoundError as exc:
            raise OCIError("MANIFEST_UNKNOWN", "manifest unknown", detail={"digest": str(digest)}) from exc
        for tag in self.list_tags(name):
            with contextlib.suppress(OCIError, FileNotFoundError):
                if self.resolve(name, tag) == digest:
                    self._remove(self._tag_path(name, tag))
        if "subject" in meta:
            subject = Digest.parse(meta["subject"])
            self._remove(self._referrer_dir(name, subject) / digest.encoded)
        self._remove(link)
        # Its signatures go with it (after the link: a crash in between leaves signatures of
        # a manifest that is gone, which GC removes, never a manifest that lost them).
        self._remove_signatures(name, digest)

    def _remove_signatures(self, name: str, digest: Digest) -> None:
        directory = self.signatures_dir(name, digest)
        if directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)
            fsync_dir(directory.parent)

    def delete_tag(self, name: str, tag: str) -> None:
        if not self._remove(self._tag_path(name, tag)):
            raise OCIError("MANIFEST_UNKNOWN", "tag unknown", detail={"tag": tag})

    def list_tags(self, name: str) -> list[str]:
        directory = self._repo(name) / "_tags"
        if not self._repo(name).is_dir():
            raise OCIError("NAME_UNKNOWN", "repository name not known to registry", detail={"name": name})
        try:
            return sorted(entry for entry in os.listdir(directory) if is_valid_tag(entry))
        except FileNotFoundError:
            return []

    def list_repositories(self) -> list[str]:
        base = self.root / "repositories"
        found: list[str] = []
        for directory, subdirs, _files in os.walk(base):
            markers = {"_blobs", "_manifests", "_tags"}
            if markers.intersection(subdirs):
                found.append(os.path.relpath(directory, base).replace(os.sep, "/"))
            subdirs[:] = [d for d in subdirs if not d.startswith("_")]
        return sorted(name for name in found if is_valid_name(name))

    def referrers(self, name: str, subject: Digest) -> list[Descriptor]:
        directory = self._referrer_dir(name, subject)
        result: list[Descriptor] = []
        try:
            entries = sorted(os.listdir(directory))
        except FileNotFoundError:
            return result
        for entry in entries:
            try:
                doc = json.loads((directory / entry).read_bytes())
                result.append(Descriptor(doc["mediaType"], Digest.parse(doc["digest"]), int(doc["size"]),
                                         doc.get("artifactType"), doc.get("annotations")))
            except (OSError, ValueError, KeyError, OCIError):
                log.warning("skipping unreadable referrer entry %s", directory / entry)
        return result

    # ---- garbage collection -----------------------------------------------------------

    def _referenced_blobs(self) -> set[str]:
        """Hex digests of every manifest and of every blob a manifest references."""
        from p2pd.oci.manifest import parse_manifest

        keep: set[str] = set()
        for name in self.list_repositories():
            directory = self._repo(name) / "_manifests" / "sha256"
            with contextlib.suppress(FileNotFoundError):
                for entry in os.listdir(directory):
                    keep.add(entry)
                    try:
                        meta = json.loads((directory / entry).read_bytes())
                        body = self.blob_path(Digest("sha256", entry)).read_bytes()
                        parsed = parse_manifest(body, meta.get("mediaType"))
                    except (OSError, ValueError, OCIError):
                        continue
                    keep.update(ref.digest.encoded for ref in parsed.references)
        return keep

    def collect_garbage(self, *, dry_run: bool, grace: float, now: float | None = None,
                        progress: ProgressSink = NO_PROGRESS) -> GCReport:
        """Removes blobs that no manifest references and that are older than ``grace`` seconds.

        The grace period keeps blobs of pushes in progress (layers arrive before the
        manifest), which makes GC safe while the registry serves. ``progress`` counts the blob
        directories (one per first two hex digits) as they are swept.
        """
        now = time.time() if now is None else now
        keep = self._referenced_blobs()
        report = GCReport(dry_run=dry_run)
        blob_root = self.root / "blobs" / "sha256"
        prefixes = sorted(os.listdir(blob_root))
        progress.start(len(prefixes))
        for prefix in prefixes:
            progress.advance()
            for entry in sorted(os.listdir(blob_root / prefix)):
                path = blob_root / prefix / entry
                if entry in keep:
                    report.kept_blobs += 1
                    continue
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                if now - stat.st_mtime < grace:
                    report.kept_blobs += 1
                    continue
                report.removed_blobs.append(f"sha256:{entry}")
                report.removed_bytes += stat.st_size
                if not dry_run:
                    self._remove(path)
                    for chunk_map in (self.root / "chunkmaps" / "sha256" / prefix).glob(f"{entry}.*"):
                        self._remove(chunk_map)
        if not dry_run:
            self._remove_dangling_links({d.split(":", 1)[1] for d in report.removed_blobs})
        report.removed_signatures = self._remove_orphan_signatures(dry_run=dry_run)
        return report

    def _remove_orphan_signatures(self, *, dry_run: bool) -> int:
        """Signature directories whose manifest is not in the repository (a crash during a
        delete, or a signature PUT racing one); returns how many (would be) removed."""
        orphans = 0
        for name in self.list_repositories():
            directory = self._repo(name) / "_signatures"
            with contextlib.suppress(FileNotFoundError):
                for entry in os.listdir(directory):
                    algorithm, _, encoded = entry.partition("-")
                    try:
                        digest = Digest.parse(f"{algorithm}:{encoded}")
                    except OCIError:
                        continue
                    if self._manifest_link(name, digest).exists():
                        continue
                    orphans += 1
                    if not dry_run:
                        self._remove_signatures(name, digest)
        return orphans

    def _remove_dangling_links(self, removed: set[str]) -> None:
        if not removed:
            return
        for name in self.list_repositories():
            directory = self._repo(name) / "_blobs" / "sha256"
            with contextlib.suppress(FileNotFoundError):
                for entry in os.listdir(directory):
                    if entry in removed:
                        self._remove(directory / entry)


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
