"""Content checks shared by registry tests: content-addressed files, and images pulled back with skopeo."""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import skopeo
from .images import OciLayout

_PIECE = 1024 * 1024


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in pieces."""
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while piece := f.read(_PIECE):
            sha.update(piece)
    return "sha256:" + sha.hexdigest()


def misnamed_blobs(sha256_dir: Path) -> list[str]:
    """Files anywhere under ``sha256_dir`` whose sha256 is not their file name.

    Works for an OCI layout's ``blobs/sha256`` and for the seed's ``blobs/sha256/<ab>/<hex>``.
    A partially written or corrupted blob shows up here.
    """
    bad = []
    for path in sorted(p for p in sha256_dir.rglob("*") if p.is_file()):
        if file_digest(path) != f"sha256:{path.name}":
            bad.append(str(path))
    return bad


def image_digests(layout: OciLayout, tag: str) -> list[str]:
    """Config and layer digests of ``layout:tag``, config first."""
    manifest = layout.manifest(tag)
    return [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]


def pull_and_verify(src_ref: str, expected: OciLayout, expected_tag: str, dest_dir: Path) -> OciLayout:
    """Pull ``src_ref`` with skopeo into a new OCI layout and compare it with ``expected:expected_tag``.

    Checks: the manifest digest (bytes unchanged), the config and every layer digest, and that
    every blob skopeo wrote hashes to its name (skopeo verifies digests too; this does not rely
    on it). Returns the pulled layout (tag ``pulled``).
    """
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    pulled = OciLayout(dest_dir)
    digest = skopeo.copy(src_ref, pulled.ref("pulled"))
    want = expected.manifest_digest(expected_tag)
    assert digest == want, f"{src_ref}: manifest digest {digest} != {want}"
    assert pulled.manifest_digest("pulled") == want
    assert image_digests(pulled, "pulled") == image_digests(expected, expected_tag)
    for blob in image_digests(pulled, "pulled"):
        assert file_digest(pulled.blob_path(blob)) == blob
    assert misnamed_blobs(dest_dir / "blobs" / "sha256") == []
    return pulled
