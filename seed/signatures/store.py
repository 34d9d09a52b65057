"""Signatures stored through the registry signature API extension (wire format and bounds:
``p2pd.signing.extension``); ``GET`` returns every stored one, in the order they came.

Rules/invariants:
- Bounded: at most ``MAX_SIGNATURES`` per manifest.
- The file store keeps each signature in its own file under the repository
  (``Storage.signatures_dir``), written crash-safely (``write_atomic``); the directory goes
  with the manifest (``Storage.delete_manifest``), and GC removes one whose manifest is gone.
- A signature is stored as given, never verified on the way in: clients verify with their
  own policy, and the seed's policy is evaluated at pull time against its current keys.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import shutil
import threading
from collections.abc import Hashable
from pathlib import Path
from typing import Protocol

from p2pd.fsutil import fsync_dir, write_atomic
from p2pd.oci.digest import Digest
from p2pd.signing.errors import SignatureInvalid
from p2pd.signing.extension import (
    MAX_SIGNATURES,
    SIGNATURE_NAME_RE,
    ExtensionSignature,
)

__all__ = ["FileSignatureStore", "MemorySignatureStore", "SignatureStore", "TooManySignatures"]

_FILE_RE = re.compile(r"[0-9a-f]{32}\.json")


class TooManySignatures(SignatureInvalid):
    """The manifest already has ``MAX_SIGNATURES`` signatures."""


class SignatureStore(Protocol):
    """Where extension signatures live. Methods may block (the registry calls them in worker
    threads); ``version`` is cheap and changes whenever a manifest's set of signatures does."""

    def list_signatures(self, name: str, digest: Digest) -> list[ExtensionSignature]: ...

    def add_signature(self, name: str, digest: Digest, signature: ExtensionSignature) -> bool:
        """Stores a signature (replacing one of the same name); returns whether it is new.

        Raises:
            TooManySignatures: ``MAX_SIGNATURES`` are stored already.
        """
        ...

    def remove_signatures(self, name: str, digest: Digest, signature_name: str | None = None) -> int:
        """Removes one signature by name, or all of the manifest's; returns how many."""
        ...

    def version(self, name: str, digest: Digest) -> Hashable: ...


class MemorySignatureStore:
    """``SignatureStore`` in memory, for tests."""

    def __init__(self) -> None:
        self._signatures: dict[tuple[str, Digest], dict[str, ExtensionSignature]] = {}
        self._versions: dict[tuple[str, Digest], int] = {}
        self._lock = threading.Lock()

    def list_signatures(self, name: str, digest: Digest) -> list[ExtensionSignature]:
        with self._lock:
            return list(self._signatures.get((name, digest), {}).values())

    def add_signature(self, name: str, digest: Digest, signature: ExtensionSignature) -> bool:
        with self._lock:
            entries = self._signatures.setdefault((name, digest), {})
            new = signature.name not in entries
            if new and len(entries) >= MAX_SIGNATURES:
                raise TooManySignatures(f"this manifest already has {MAX_SIGNATURES} signatures (the limit)")
            entries[signature.name] = signature
            self._bump(name, digest)
            return new

    def remove_signatures(self, name: str, digest: Digest, signature_name: str | None = None) -> int:
        with self._lock:
            entries = self._signatures.get((name, digest), {})
            names = [signature_name] if signature_name is not None else list(entries)
            removed = sum(1 for key in names if entries.pop(key, None) is not None)
            if removed:
                self._bump(name, digest)
            return removed

    def version(self, name: str, digest: Digest) -> Hashable:
        with self._lock:
            return self._versions.get((name, digest), 0)

    def _bump(self, name: str, digest: Digest) -> None:
        self._versions[(name, digest)] = self._versions.get((name, digest), 0) + 1


class _DirectoryLayout(Protocol):
    # What the file store needs of seed.storage.Storage: its layout and its tmp directory.
    root: Path

    def signatures_dir(self, name: str, digest: Digest) -> Path: ...


class FileSignatureStore:
    """``SignatureStore`` in the seed's data directory, one file per signature.

    Args:
        layout: the registry's ``Storage`` (it owns the directory layout, and removes a
            manifest's signatures with the manifest).
    """

    def __init__(self, layout: _DirectoryLayout) -> None:
        self._layout = layout
        # Count-then-write must not interleave between two PUTs (worker threads).
        self._lock = threading.Lock()

    def _entries(self, directory: Path) -> list[tuple[int, str, int]]:
        """(mtime_ns, file name, size) of the signature files, oldest first."""
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        entries = []
        for entry in names:
            if not _FILE_RE.fullmatch(entry):
                continue
            with contextlib.suppress(FileNotFoundError):
                stat = os.stat(directory / entry)
                entries.append((stat.st_mtime_ns, entry, stat.st_size))
        return sorted(entries)

    def list_signatures(self, name: str, digest: Digest) -> list[ExtensionSignature]:
        directory = self._layout.signatures_dir(name, digest)
        found = []
        for _mtime, entry, _size in self._entries(directory):
            try:
                document = json.loads((directory / entry).read_bytes())
                found.append(ExtensionSignature(str(document["name"]), base64.b64decode(document["content"])))
            except (OSError, ValueError, KeyError, TypeError, binascii.Error):
                continue  # removed meanwhile, or damaged by hand: a client would reject it anyway
        return found

    def add_signature(self, name: str, digest: Digest, signature: ExtensionSignature) -> bool:
        directory = self._layout.signatures_dir(name, digest)
        path = directory / f"{signature.suffix}.json"
        with self._lock:
            new = not path.exists()
            if new and len(self._entries(directory)) >= MAX_SIGNATURES:
                raise TooManySignatures(f"this manifest already has {MAX_SIGNATURES} signatures (the limit)")
            write_atomic(path, json.dumps(signature.to_json(), separators=(",", ":")).encode(),
                         tmp_dir=self._layout.root / "tmp")
        return new

    def remove_signatures(self, name: str, digest: Digest, signature_name: str | None = None) -> int:
        directory = self._layout.signatures_dir(name, digest)
        with self._lock:
            if signature_name is None:
                count = len(self._entries(directory))
                if directory.exists():
                    shutil.rmtree(directory, ignore_errors=True)
                    fsync_dir(directory.parent)
                return count
            match = SIGNATURE_NAME_RE.fullmatch(signature_name)
            if match is None or match.group("digest") != str(digest):
                return 0
            try:
                (directory / f"{match.group('suffix')}.json").unlink()
            except FileNotFoundError:
                return 0
            fsync_dir(directory)
            return 1

    def version(self, name: str, digest: Digest) -> Hashable:
        return tuple(self._entries(self._layout.signatures_dir(name, digest)))
