"""skopeo wrappers that never read the machine's containers config and only talk to loopback.

Every call gets a fresh temp dir holding a permissive ``policy.json`` (``--policy``), an
empty ``registries.conf`` (CONTAINERS_REGISTRIES_CONF / REGISTRIES_CONFIG_PATH), an empty
``auth.json`` (REGISTRY_AUTH_FILE), an empty ``registries.d`` and the ``--tmpdir``.
``docker://127.0.0.1:PORT/...`` with tls_verify=False means plain HTTP.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .net import assert_loopback
from .tools import require_tool, run

_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}


def check_ref(ref: str) -> None:
    """Refuse ``docker://`` references whose registry is not on loopback."""
    if ref.startswith("docker://"):
        host = ref[len("docker://") :].split("/", 1)[0]
        assert_loopback(host)
    elif ref.split(":", 1)[0] in ("docker-daemon", "containers-storage", "atomic"):
        raise ValueError(f"transport of {ref!r} is not allowed in tests")


@contextmanager
def _skopeo_env() -> Iterator[tuple[list[str], dict[str, str]]]:
    """Yield (global skopeo args, env) backed by a temp dir removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="skopeo-") as d:
        base = Path(d)
        (base / "policy.json").write_text(json.dumps(_POLICY))
        (base / "registries.conf").write_text("")
        (base / "auth.json").write_text("{}")
        (base / "registries.d").mkdir()
        (base / "tmp").mkdir()
        args = [
            "--policy",
            str(base / "policy.json"),
            "--registries.d",
            str(base / "registries.d"),
            "--tmpdir",
            str(base / "tmp"),
        ]
        env = {
            "CONTAINERS_REGISTRIES_CONF": str(base / "registries.conf"),
            "REGISTRIES_CONFIG_PATH": str(base / "registries.conf"),
            "REGISTRY_AUTH_FILE": str(base / "auth.json"),
            "DOCKER_CONFIG": str(base),  # no ~/.docker/config.json credentials
        }
        yield args, env


def _tls(flag: str, ref: str, tls_verify: bool) -> list[str]:
    return [f"--{flag}={'true' if tls_verify else 'false'}"] if ref.startswith("docker://") else []


def copy(
    src: str,
    dst: str,
    *,
    tls_verify: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float = 300,
    preserve_digests: bool = False,
) -> str:
    """``skopeo copy SRC DST``; returns the digest of the manifest written to DST.

    E.g. ``copy(layout.ref("busybox"), f"docker://{registry.host}/lab/busybox:latest")``.
    ``extra_args`` go after ``copy`` (e.g. ``["--format", "v2s2"]``).
    Beware: pushing to ``docker://`` gzip-compresses *uncompressed* layers, which rewrites the
    manifest (new digest). ``preserve_digests=True`` (``--preserve-digests``) keeps the bytes
    as they are. umoci layouts are already gzip, so their digests survive either way.
    """
    skopeo = require_tool("skopeo")
    check_ref(src)
    check_ref(dst)
    with _skopeo_env() as (gargs, env), tempfile.TemporaryDirectory(prefix="skopeo-digest-") as dd:
        digestfile = Path(dd) / "digest"
        run(
            [
                skopeo,
                *gargs,
                "copy",
                "--quiet",
                *_tls("src-tls-verify", src, tls_verify),
                *_tls("dest-tls-verify", dst, tls_verify),
                "--digestfile",
                str(digestfile),
                *(["--preserve-digests"] if preserve_digests else []),
                *extra_args,
                src,
                dst,
            ],
            timeout=timeout,
            env=env,
        )
        return digestfile.read_text().strip()


def inspect_raw(ref: str, *, tls_verify: bool = False, timeout: float = 60) -> bytes:
    """``skopeo inspect --raw REF``: the manifest (or index) bytes exactly as stored."""
    skopeo = require_tool("skopeo")
    check_ref(ref)
    with _skopeo_env() as (gargs, env):
        proc = run(
            [skopeo, *gargs, "inspect", "--raw", *_tls("tls-verify", ref, tls_verify), ref],
            timeout=timeout,
            env=env,
        )
    return proc.stdout


def inspect_digest(ref: str, *, tls_verify: bool = False, timeout: float = 60) -> str:
    """The manifest digest of REF: sha256 of the raw manifest bytes (``sha256:<hex>``)."""
    return "sha256:" + hashlib.sha256(inspect_raw(ref, tls_verify=tls_verify, timeout=timeout)).hexdigest()


def inspect_json(ref: str, *, tls_verify: bool = False, timeout: float = 60) -> dict[str, Any]:
    """The parsed raw manifest of REF."""
    return json.loads(inspect_raw(ref, tls_verify=tls_verify, timeout=timeout))
