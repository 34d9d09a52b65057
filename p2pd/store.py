"""The agent's content-addressed cache on local disk.

Layout under the data directory::

    blobs/sha256/<ab>/<hex>          complete, verified content (layers, configs, manifests)
    media/sha256/<ab>/<hex>          a manifest's media type (text), next to its blob
    downloads/<hex>.partial          bytes of a download in progress (resumable after restart)
    tags/<key>.json                  last known digest of a tag (for TTL and stale-if-error)
    pins.json                        digests pinned with ``p2pd cache pin``
    tmp/                             temporary files, renamed into place

Rules/invariants:
- A file under ``blobs/`` is complete and its sha256 matched its name before the rename
  that created it (the fetcher verifies; ``commit_partial`` and ``put_bytes`` only rename
  verified content). Nothing else is ever written there.
- Every rename is preceded by an fsync of the file and followed by an fsync of the directory.
- Eviction removes least-recently-used blobs until the total is under ``max_bytes``; it
  never removes pinned blobs or blobs with an open reader (``reading`` context).
- Methods block on the filesystem; callers in trio use ``trio.to_thread`` for the ones that
  fsync or read whole files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from p2pd.oci.digest import Digest

from .errors import StoreError
from .fsutil import fsync_dir, write_atomic

__all__ = ["BlobEntry", "BlobStore", "TagRecord"]

log = logging.getLogger("p2pd.store")


@dataclass(frozen=True, slots=True)
class BlobEntry:
    digest: Digest
    size: int
    last_used: float
    pinned: bool
    in_use: bool


@dataclass(frozen=True, slots=True)
class TagRecord:
    namespace: str
    repository: str
    tag: str
    digest: Digest
    media_type: str
    size: int
    checked: float  # when the upstream last confirmed it (time.time())


class BlobStore:
    """Complete blobs, partial downloads, tag records and pins under one directory.

    Args:
        root: the data directory (created if missing).
        max_bytes: eviction keeps the complete blobs' total at or below this.
        pinned: digests from the configuration that are never evicted.
    """

    def __init__(self, root: Path, *, max_bytes: int, pinned: tuple[str, ...] = ()) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        for sub in ("blobs/sha256", "media/sha256", "downloads", "tags", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # guards the dicts below; commits run in threads
        self._readers: dict[Digest, int] = {}
        self._sizes: dict[Digest, int] = {}
        self._last_used: dict[Digest, float] = {}
        self._config_pins = {Digest.parse(d) for d in pinned}
        self._pins = self._config_pins | self._load_pins()
        self._pins_mtime = 0.0
        self._clean_tmp()
        self._scan()

    # ---- bookkeeping ------------------------------------------------------------------

    def _clean_tmp(self) -> None:
        for entry in (self.root / "tmp").iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()

    def _scan(self) -> None:
        base = self.root / "blobs" / "sha256"
        for prefix in os.listdir(base):
            for name in os.listdir(base / prefix):
                if not Digest.is_valid(f"sha256:{name}"):
                    continue
                digest = Digest("sha256", name)
                try:
                    stat = (base / prefix / name).stat()
                except OSError:
                    continue
                self._sizes[digest] = stat.st_size
                self._last_used[digest] = stat.st_mtime

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    @property
    def blob_count(self) -> int:
        """Complete blobs in the store."""
        return len(self._sizes)

    def _write_atomic(self, path: Path, data: bytes) -> None:
        write_atomic(path, data, tmp_dir=self.root / "tmp")

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.encoded[:2] / digest.encoded

    def _media_path(self, digest: Digest) -> Path:
        return self.root / "media" / digest.algorithm / digest.encoded[:2] / digest.encoded

    def partial_path(self, digest: Digest) -> Path:
        return self.root / "downloads" / f"{digest.algorithm}-{digest.encoded}.partial"

    # ---- complete blobs ---------------------------------------------------------------

    def size(self, digest: Digest) -> int | None:
        """Size of a complete blob, or None when it is not in the store."""
        return self._sizes.get(digest)

    def touch(self, digest: Digest) -> None:
        self._last_used[digest] = time.time()

    @contextlib.contextmanager
    def reading(self, digest: Digest) -> Iterator[None]:
        """Marks a blob in use so that eviction leaves it alone."""
        with self._lock:
            self._readers[digest] = self._readers.get(digest, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                remaining = self._readers[digest] - 1
                if remaining:
                    self._readers[digest] = remaining
                else:
                    del self._readers[digest]

    def open_blob(self, digest: Digest) -> tuple[int, int]:
        """Opens a complete blob; returns (fd, size). The caller closes fd.

        Raises:
            KeyError: the blob is not in the store.
        """
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            self._sizes.pop(digest, None)
            raise KeyError(str(digest)) from None
        self.touch(digest)
        return fd, os.fstat(fd).st_size

    def media_type(self, digest: Digest) -> str | None:
        try:
            return self._media_path(digest).read_text().strip() or None
        except FileNotFoundError:
            return None

    def put_bytes(self, digest: Digest, data: bytes, media_type: str | None = None) -> None:
        """Stores small verified content (a manifest) whole."""
        if hashlib.new(digest.algorithm, data).hexdigest() != digest.encoded:
            raise StoreError(f"content does not match {digest}")
        if media_type is not None:
            self._write_atomic(self._media_path(digest), media_type.encode())
        if digest not in self._sizes:
            self._write_atomic(self.blob_path(digest), data)
            with self._lock:
                self._sizes[digest] = len(data)
        self.touch(digest)
        self.evict()

    def read_small(self, digest: Digest, limit: int) -> bytes | None:
        """Whole content of a small blob (a manifest), or None."""
        try:
            with open(self.blob_path(digest), "rb") as handle:
                data = handle.read(limit + 1)
        except FileNotFoundError:
            self._sizes.pop(digest, None)
            return None
        if len(data) > limit:
            raise StoreError(f"{digest} is larger than {limit} bytes")
        self.touch(digest)
        return data

    # ---- partial downloads ------------------------------------------------------------

    def open_partial(self, digest: Digest) -> tuple[int, int]:
        """Opens (creating if needed) the partial file; returns (fd, bytes already there)."""
        fd = os.open(self.partial_path(digest), os.O_RDWR | os.O_CREAT, 0o644)
        return fd, os.fstat(fd).st_size

    def discard_partial(self, digest: Digest) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.partial_path(digest).unlink()

    def commit_partial(self, digest: Digest, fd: int, size: int) -> None:
        """Makes a verified partial file a complete blob (fsync, rename, fsync dir)."""
        os.fsync(fd)
        target = self.blob_path(digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.partial_path(digest), target)
        fsync_dir(target.parent)
        with self._lock:
            self._sizes[digest] = size
        self.touch(digest)
        self.evict()

    def discard_stale_partials(self, older_than: float) -> list[Digest]:
        """Removes partial downloads untouched for ``older_than`` seconds."""
        removed = []
        now = time.time()
        for digest, _size in self.list_partials():
            path = self.partial_path(digest)
            with contextlib.suppress(FileNotFoundError):
                if now - path.stat().st_mtime > older_than:
                    path.unlink()
                    removed.append(digest)
        return removed

    def list_partials(self) -> list[tuple[Digest, int]]:
        result = []
        for entry in (self.root / "downloads").iterdir():
            algorithm, _, rest = entry.name.partition("-")
            encoded = rest.removesuffix(".partial")
            if Digest.is_valid(f"{algorithm}:{encoded}"):
                result.append((Digest(algorithm, encoded), entry.stat().st_size))
        return result

    # ---- eviction and pins ------------------------------------------------------------

    def _load_pins(self) -> set[Digest]:
        try:
            return {Digest.parse(d) for d in json.loads((self.root / "pins.json").read_text())}
        except FileNotFoundError:
            return set()
        except (ValueError, TypeError) as exc:
            raise StoreError(f"unreadable pins.json: {exc}") from exc

    def pin(self, digest: Digest) -> None:
        # Another instance (``p2pd cache pin`` in another process) may have written pins.json
        # since this one read it: start from the file, or its pins would be lost.
        self._refresh_pins()
        self._pins.add(digest)
        self._save_pins()

    def unpin(self, digest: Digest) -> bool:
        """Removes a pin made with ``pin``; pins from the configuration stay."""
        self._refresh_pins()
        if digest not in self._pins or digest in self._config_pins:
            return False
        self._pins.discard(digest)
        self._save_pins()
        return True

    def _save_pins(self) -> None:
        runtime = sorted(str(d) for d in self._pins - self._config_pins)
        self._write_atomic(self.root / "pins.json", json.dumps(runtime).encode())

    def is_pinned(self, digest: Digest) -> bool:
        return digest in self._pins

    def entries(self) -> list[BlobEntry]:
        with self._lock:
            entries = [BlobEntry(d, size, self._last_used.get(d, 0.0), d in self._pins, d in self._readers)
                       for d, size in self._sizes.items()]
        return sorted(entries, key=lambda e: e.last_used, reverse=True)

    def _refresh_pins(self) -> None:
        # `p2pd cache pin` runs in another process and writes pins.json.
        try:
            mtime = (self.root / "pins.json").stat().st_mtime
        except FileNotFoundError:
            return
        if mtime != self._pins_mtime:
            self._pins_mtime = mtime
            self._pins = self._config_pins | self._load_pins()

    def evict(self, max_bytes: int | None = None) -> list[Digest]:
        """Removes least-recently-used blobs until the total fits; returns what went."""
        self._refresh_pins()
        limit = self.max_bytes if max_bytes is None else max_bytes
        removed: list[Digest] = []
        total = self.total_bytes
        if total <= limit:
            return removed
        with self._lock:
            candidates = sorted((d for d in self._sizes if d not in self._pins and d not in self._readers),
                                key=lambda d: self._last_used.get(d, 0.0))
            for digest in candidates:
                if total <= limit:
                    break
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(digest).unlink()
                with contextlib.suppress(FileNotFoundError):
                    self._media_path(digest).unlink()
                total -= self._sizes.pop(digest)
                self._last_used.pop(digest, None)
                removed.append(digest)
        for digest in removed:
            log.info("evicted %s", digest)
        return removed

    # ---- tags -------------------------------------------------------------------------

    def _tag_path(self, namespace: str, repository: str, tag: str) -> Path:
        key = hashlib.sha256(f"{namespace}\0{repository}\0{tag}".encode()).hexdigest()
        return self.root / "tags" / f"{key}.json"

    def save_tag(self, record: TagRecord) -> None:
        document = {"namespace": record.namespace, "repository": record.repository, "tag": record.tag,
                    "digest": str(record.digest), "mediaType": record.media_type, "size": record.size,
                    "checked": record.checked}
        self._write_atomic(self._tag_path(record.namespace, record.repository, record.tag),
                           json.dumps(document).encode())

    def load_tag(self, namespace: str, repository: str, tag: str) -> TagRecord | None:
        path = self._tag_path(namespace, repository, tag)
        try:
            document = json.loads(path.read_bytes())
            return TagRecord(document["namespace"], document["repository"], document["tag"],
                             Digest.parse(document["digest"]), str(document["mediaType"]),
                             int(document["size"]), float(document["checked"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable tag record %s: %s", path, exc)
            return None

    def forget_tag(self, namespace: str, repository: str, tag: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._tag_path(namespace, repository, tag).unlink()
