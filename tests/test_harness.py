"""Self-test of tests/harness: real registry, skopeo, umoci images and a private containerd."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from tests.harness import skopeo
from tests.harness.containerd import PrivateContainerd, write_hosts_toml
from tests.harness.images import MiB, OciLayout, make_tar_layer, write_layout_image
from tests.harness.net import assert_loopback, free_port, wait_http_ok
from tests.harness.reference_registry import ReferenceRegistry
from tests.harness.tools import ToolError, require_tool, run


def test_free_port_and_loopback_guard() -> None:
    port = free_port()
    assert 0 < port < 65536
    assert_loopback("127.0.0.1:5000")
    assert_loopback("http://localhost:1/v2/")
    with pytest.raises(ValueError):
        assert_loopback("http://10.0.0.1:5000/v2/")
    with pytest.raises(ValueError):
        skopeo.check_ref("docker://docker.io/library/busybox:latest")
    with pytest.raises(TimeoutError):  # nothing listens there: bounded failure, not a hang
        wait_http_ok(f"http://127.0.0.1:{port}/", 0.3)


def test_require_tool_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_tool("sh").endswith("/sh")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-tool-xyz"):
        require_tool("no-such-tool-xyz")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-tool-xyz"):
        require_tool("no-such-tool-xyz")


def test_run_reports_output_on_failure() -> None:
    with pytest.raises(ToolError, match="boom"):
        run(["sh", "-c", "echo boom >&2; exit 3"], timeout=10)
    assert run(["sh", "-c", "exit 3"], timeout=10, check=False).returncode == 3


def test_registry_stops_and_takes_extra_config(tmp_path: Path) -> None:
    with ReferenceRegistry(tmp_path / "reg", extra_config={"log": {"level": "debug"}}) as reg:
        proc = reg.proc
        assert reg.url == f"http://{reg.host}"
        assert json.loads(reg.config_path.read_text())["log"]["level"] == "debug"
        assert httpx.get(f"{reg.url}/v2/_catalog", trust_env=False).json() == {"repositories": []}
    assert proc is not None and proc.poll() is not None
    assert reg.log_path.exists()


def test_python_written_layout_roundtrip(tmp_path: Path, reference_registry: ReferenceRegistry) -> None:
    layer = make_tar_layer({"hello.txt": b"hello\n"}, compress=True)
    digest, manifest = write_layout_image(tmp_path / "tiny", [layer, b"not-a-tar"], tag="v1")
    layout = OciLayout(tmp_path / "tiny")
    assert layout.tags() == ["v1"] and layout.manifest_digest("v1") == digest
    assert json.loads(manifest)["layers"][0]["size"] == len(layer)

    dst = f"docker://{reference_registry.host}/tiny:v1"
    # without --preserve-digests skopeo would gzip the plain "tar" layer and rewrite the manifest
    assert skopeo.copy(layout.ref("v1"), dst, preserve_digests=True) == digest
    assert skopeo.inspect_raw(dst) == manifest
    assert skopeo.inspect_digest(dst) == digest


async def test_harness_from_trio(reference_registry: ReferenceRegistry) -> None:
    """Sync helpers run in a worker thread; the registry is reachable with an async client."""
    await trio.to_thread.run_sync(wait_http_ok, f"{reference_registry.url}/v2/", 5.0)
    async with httpx.AsyncClient(trust_env=False) as client:
        resp = await client.get(f"{reference_registry.url}/v2/")
    assert resp.status_code == 200


@pytest.mark.slow
@pytest.mark.root
def test_busybox_push_pull_run(
    tmp_path: Path,
    busybox_layout: OciLayout,
    reference_registry: ReferenceRegistry,
    containerd: PrivateContainerd,
) -> None:
    dst = f"docker://{reference_registry.host}/lab/busybox:latest"
    pushed = skopeo.copy(busybox_layout.ref("busybox"), dst)
    assert skopeo.inspect_digest(dst) == pushed == busybox_layout.manifest_digest("busybox")

    # 1. direct plain-HTTP pull by IP
    ref = f"{reference_registry.host}/lab/busybox:latest"
    containerd.pull(ref, plain_http=True, timeout=60)
    assert containerd.images() == [ref]
    assert containerd.image_digest(ref) == pushed
    layer = busybox_layout.manifest("busybox")["layers"][0]["digest"]
    assert layer in containerd.content_digests()
    assert containerd.unpack_check(ref) in ("run", "mount")

    # 2. cold pull of a registry *name* through hosts.toml, with a dead mirror tried first
    containerd.remove_all()
    assert containerd.images() == [] and containerd.content_digests() == []
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "seed.local:5000", reference_registry.url, [f"http://127.0.0.1:{free_port()}"])
    named = "seed.local:5000/lab/busybox:latest"
    containerd.pull(named, hosts_dir=hosts, timeout=60)
    assert containerd.image_digest(named) == pushed
    assert containerd.unpack_check(named) == "run"  # ctr run works on this machine


@pytest.mark.slow
@pytest.mark.root
def test_big_image_pull(
    big_layout: OciLayout, reference_registry: ReferenceRegistry, containerd: PrivateContainerd
) -> None:
    layers = big_layout.manifest("big")["layers"]
    assert len(layers) == 2 and layers[1]["size"] > 50 * MiB  # random data does not compress
    dst = f"docker://{reference_registry.host}/lab/big:latest"
    pushed = skopeo.copy(big_layout.ref("big"), dst)
    ref = f"{reference_registry.host}/lab/big:latest"
    containerd.pull(ref, plain_http=True, timeout=120)
    assert containerd.image_digest(ref) == pushed
    out = containerd.run_container(ref, "/bin/sh", "-c", "wc -c < /data/big.bin").stdout
    assert int(out) == 50 * MiB
