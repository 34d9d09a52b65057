"""Build real OCI images offline: busybox-static + umoci, or tiny layouts written directly in Python."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tools import require_tool, run

MiB = 1024 * 1024

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}


def host_arch() -> str:
    """The GOARCH name of this machine (what containerd picks for its default platform)."""
    machine = platform.machine().lower()
    return _GOARCH.get(machine, machine)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class OciLayout:
    """An OCI image layout directory; tags are ``org.opencontainers.image.ref.name`` entries."""

    path: Path

    def ref(self, tag: str) -> str:
        """skopeo reference ``oci:PATH:TAG``."""
        return f"oci:{self.path}:{tag}"

    def umoci_ref(self, tag: str) -> str:
        """umoci ``--image`` argument ``PATH:TAG`` (umoci has no transport prefix)."""
        return f"{self.path}:{tag}"

    def index(self) -> dict[str, Any]:
        return json.loads((self.path / "index.json").read_text())

    def tags(self) -> list[str]:
        return [
            m["annotations"][REF_NAME_ANNOTATION]
            for m in self.index().get("manifests", [])
            if REF_NAME_ANNOTATION in m.get("annotations", {})
        ]

    def blob_path(self, digest: str) -> Path:
        algo, _, hexpart = digest.partition(":")
        return self.path / "blobs" / algo / hexpart

    def manifest_digest(self, tag: str) -> str:
        for m in self.index().get("manifests", []):
            if m.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
                return str(m["digest"])
        raise KeyError(f"tag {tag!r} not in {self.path}/index.json (tags: {self.tags()})")

    def manifest(self, tag: str) -> dict[str, Any]:
        return json.loads(self.blob_path(self.manifest_digest(tag)).read_bytes())


# --------------------------------------------------------------------------- umoci based


def _umoci_flags() -> list[str]:
    # As root umoci keeps real uid/gid; otherwise it needs rootless mode.
    return [] if os.geteuid() == 0 else ["--rootless"]


def build_busybox_layout(workdir: str | Path, *, tag: str = "busybox", timeout: float = 120) -> OciLayout:
    """Build ``WORKDIR/oci`` with one runnable single-layer image tagged ``tag``.

    Rootfs: /bin/busybox (busybox-static from the host) + a symlink for every applet,
    /etc/passwd, /etc/group, /tmp (1777); config cmd ["/bin/sh"], env PATH, host os/arch.
    Completely offline. Takes a few seconds.
    """
    umoci = require_tool("umoci")
    busybox = require_tool("busybox")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    layout = OciLayout(workdir / "oci")
    if layout.path.exists():
        raise FileExistsError(f"{layout.path} already exists")
    applets = run([busybox, "--list"], timeout=30).stdout.decode().split()
    if not applets:
        raise RuntimeError(f"{busybox} --list printed no applets")

    run([umoci, "init", "--layout", layout.path], timeout=timeout)
    run([umoci, "new", "--image", layout.umoci_ref(tag)], timeout=timeout)
    bundle = Path(tempfile.mkdtemp(prefix="bundle-", dir=workdir))
    try:
        shutil.rmtree(bundle)  # umoci unpack wants to create the bundle dir itself
        run([umoci, "unpack", *_umoci_flags(), "--image", layout.umoci_ref(tag), bundle], timeout=timeout)
        rootfs = bundle / "rootfs"
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "proc", "sys", "dev", "root"):
            (rootfs / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(busybox, rootfs / "bin" / "busybox")
        os.chmod(rootfs / "bin" / "busybox", 0o755)
        for applet in applets:
            link = rootfs / "bin" / applet
            if not link.exists() and not link.is_symlink() and "/" not in applet:
                link.symlink_to("busybox")
        (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (rootfs / "etc" / "group").write_text("root:x:0:\n")
        os.chmod(rootfs / "tmp", 0o1777)
        run([umoci, "repack", "--image", layout.umoci_ref(tag), bundle], timeout=timeout)
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
    run(
        [
            umoci,
            "config",
            "--image",
            layout.umoci_ref(tag),
            "--config.cmd",
            "/bin/sh",
            "--config.workingdir",
            "/",
            "--config.env",
            "PATH=/bin:/sbin:/usr/bin:/usr/sbin",
            "--os",
            "linux",
            "--architecture",
            host_arch(),
        ],
        timeout=timeout,
    )
    run([umoci, "gc", "--layout", layout.path], timeout=timeout)
    return layout


def _write_random_file(path: Path, size_mib: int, seed: int | None) -> None:
    """Write ``size_mib`` MiB of random bytes in 1 MiB pieces (never all in memory)."""
    rng = random.Random(seed) if seed is not None else None
    with path.open("wb") as f:
        for _ in range(size_mib):
            f.write(rng.randbytes(MiB) if rng is not None else os.urandom(MiB))


def add_random_layer(
    layout: OciLayout,
    src_tag: str,
    dst_tag: str,
    size_mib: int,
    seed: int | None = None,
    *,
    timeout: float = 300,
) -> str:
    """Create tag ``dst_tag`` = image ``src_tag`` + one layer holding ``/data/<dst_tag>.bin``.

    The file has ``size_mib`` MiB of random bytes (``os.urandom``, or ``random.Random(seed)``
    when ``seed`` is given: the file content is then reproducible, though umoci timestamps
    still make the layer digest differ between builds). Returns ``layout.ref(dst_tag)``.
    """
    umoci = require_tool("umoci")
    if size_mib < 0:
        raise ValueError("size_mib must be >= 0")
    bundle = Path(tempfile.mkdtemp(prefix="bundle-", dir=layout.path.parent))
    try:
        shutil.rmtree(bundle)
        run([umoci, "unpack", *_umoci_flags(), "--image", layout.umoci_ref(src_tag), bundle], timeout=timeout)
        data = bundle / "rootfs" / "data"
        data.mkdir(parents=True, exist_ok=True)
        _write_random_file(data / f"{dst_tag.replace('/', '_')}.bin", size_mib, seed)
        # Repacking under a new tag leaves src_tag untouched; the new layer holds only the diff.
        run([umoci, "repack", "--image", layout.umoci_ref(dst_tag), bundle], timeout=timeout)
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
    return layout.ref(dst_tag)


# --------------------------------------------------------------------------- pure Python


def make_tar_layer(files: dict[str, bytes], *, compress: bool = False) -> bytes:
    """A deterministic tar (optionally gzip, mtime 0) with regular files ``{path: content}``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name.lstrip("/"))
            info.size = len(content)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(content))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def _write_blob(layout_dir: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    path = layout_dir / "blobs" / "sha256" / digest.split(":", 1)[1]
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    return digest


def write_layout_image(
    dir: str | Path,
    layers: list[bytes],
    config: dict[str, Any] | None = None,
    *,
    tag: str = "latest",
    layer_media_type: str | None = None,
) -> tuple[str, bytes]:
    """Write a minimal OCI image layout (oci-layout, index.json, blobs/sha256/...) in Python.

    ``layers`` are blob bytes, in order; their media type is ``layer_media_type`` or, by
    default, tar+gzip if the bytes start with the gzip magic else plain tar (the bytes do not
    have to be valid tars unless the image is going to be unpacked; see make_tar_layer).
    ``config`` defaults to ``{"architecture": host, "os": "linux", "rootfs": {diff_ids}}``
    (diff_ids are computed for gzip layers by decompressing). If the layout exists, the image
    is added to index.json, replacing an entry with the same ``tag``.
    Returns ``(manifest_digest, manifest_bytes)``.
    """
    layout_dir = Path(dir)
    (layout_dir / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    descriptors = []
    diff_ids = []
    for data in layers:
        is_gzip = data[:2] == b"\x1f\x8b"
        mt = layer_media_type or (MT_OCI_LAYER_GZIP if is_gzip else MT_OCI_LAYER_TAR)
        digest = _write_blob(layout_dir, data)
        descriptors.append({"mediaType": mt, "digest": digest, "size": len(data)})
        diff_ids.append(sha256_digest(gzip.decompress(data)) if is_gzip else digest)
    if config is None:
        config = {
            "architecture": host_arch(),
            "os": "linux",
            "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = _write_blob(layout_dir, config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": descriptors,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = _write_blob(layout_dir, manifest_bytes)

    index_path = layout_dir / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    index["manifests"] = [
        m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
    ]
    index["manifests"].append(
        {
            "mediaType": MT_OCI_MANIFEST,
            "digest": manifest_digest,
            "size": len(manifest_bytes),
            "annotations": {REF_NAME_ANNOTATION: tag},
        }
    )
    index_path.write_text(json.dumps(index, separators=(",", ":")))
    return manifest_digest, manifest_bytes


def write_layout_index(dir: str | Path, images: dict[str, list[bytes]], *, tag: str = "latest",
                       attestation: bool = True) -> tuple[str, dict[str, str]]:
    """A multi-arch image in an OCI layout: an index of one image per platform (``os/arch[/variant]``).

    With ``attestation``, a BuildKit-style attestation manifest (platform ``unknown/unknown``,
    ``vnd.docker.reference.type`` annotation) is listed too, as real multi-arch images have.
    The index gets ``tag`` in index.json. Returns ``(index_digest, {platform: manifest_digest})``.
    """
    layout_dir = Path(dir)
    entries: list[dict[str, Any]] = []
    chosen: dict[str, str] = {}
    for number, (platform_text, layers) in enumerate(images.items()):
        os_name, arch, *variant = platform_text.split("/")
        config = {"architecture": arch, "os": os_name, **({"variant": variant[0]} if variant else {}),
                  "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer) for layer in layers]}}
        digest, body = write_layout_image(layout_dir, layers, config, tag=f"{tag}-part{number}",
                                          layer_media_type=MT_OCI_LAYER_TAR)
        platform_json = {"os": os_name, "architecture": arch, **({"variant": variant[0]} if variant else {})}
        entries.append({"mediaType": MT_OCI_MANIFEST, "digest": digest, "size": len(body),
                        "platform": platform_json})
        chosen[platform_text] = digest
    if attestation:
        statement = b'{"_type":"https://in-toto.io/Statement/v0.1"}'
        digest, body = write_layout_image(layout_dir, [statement], {"architecture": "unknown", "os": "unknown"},
                                          tag=f"{tag}-attestation",
                                          layer_media_type="application/vnd.in-toto+json")
        entries.append({"mediaType": MT_OCI_MANIFEST, "digest": digest, "size": len(body),
                        "platform": {"os": "unknown", "architecture": "unknown"},
                        "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                        "vnd.docker.reference.digest": entries[0]["digest"]}})
    index_bytes = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries},
                             sort_keys=True, separators=(",", ":")).encode()
    index_digest = _write_blob(layout_dir, index_bytes)
    index_path = layout_dir / "index.json"
    top = json.loads(index_path.read_text())
    # Only the index is tagged: the per-platform tags were scaffolding.
    top["manifests"] = [{"mediaType": MT_OCI_INDEX, "digest": index_digest, "size": len(index_bytes),
                         "annotations": {REF_NAME_ANNOTATION: tag}}]
    index_path.write_text(json.dumps(top, separators=(",", ":")))
    return index_digest, chosen
