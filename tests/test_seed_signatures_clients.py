"""Signed images with the clients people use: skopeo signs with ``--sign-by`` (GPG simple
signing) and stores the signatures through the seed's signature API extension; skopeo and
podman verify pulls with a ``signedBy`` ``policy.json``; the seed's own ``[[signatures]]``
policy refuses unsigned tags for skopeo and containerd.

skopeo's temp ``registries.d`` is empty (tests/harness/skopeo.py), so it has no lookaside
store: the signatures it writes and reads can only go through the extension, which the test
checks in the seed's data directory.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import skopeo
from tests.harness.containerd import PrivateContainerd, write_hosts_toml
from tests.harness.gpg import GpgHome
from tests.harness.images import MT_OCI_MANIFEST, OciLayout, make_tar_layer, write_layout_image
from tests.harness.podman import Podman
from tests.harness.seed_process import SeedProcess
from tests.harness.tools import ToolError

POLICY = '[scan]\nenabled = false\n\n[[signatures]]\nrepositories = ["prod/**"]\nkeys = ["release.asc"]\n'


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    """Two small runnable-enough images (real tar layers): tags ``one`` and ``two``."""
    path = tmp_path_factory.mktemp("signed-images") / "oci"
    for tag in ("one", "two"):
        write_layout_image(path, [make_tar_layer({"etc/motd": f"image {tag}\n".encode()}, compress=True)], tag=tag)
    return OciLayout(path)


@pytest.fixture
def seed(tmp_path: Path, release: GpgHome) -> Iterator[SeedProcess]:
    release.export_public(tmp_path / "release.asc")
    (tmp_path / "seed.toml").write_text(POLICY)
    with SeedProcess(tmp_path / "seed-data", config_path=tmp_path / "seed.toml") as process:
        yield process


def signed_by(path: Path, key: Path) -> Path:
    """A client policy.json: every image must carry a signature by ``key`` (default identity)."""
    path.write_text(json.dumps({"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(key)}]}))
    return path


def push(layout: OciLayout, tag: str, dst: str, signer: GpgHome | None, monkeypatch: pytest.MonkeyPatch) -> str:
    """skopeo copy to the seed, signed by ``signer`` (``--sign-by``, its key in GNUPGHOME) or not."""
    if signer is None:
        return skopeo.copy(layout.ref(tag), dst)
    monkeypatch.setenv("GNUPGHOME", str(signer.home))
    try:
        return skopeo.copy(layout.ref(tag), dst, extra_args=["--sign-by", signer.fingerprint])
    finally:
        monkeypatch.delenv("GNUPGHOME")


def pull_fails(ref: str, policy: Path, dest: Path, reason: str) -> None:
    """skopeo copy REF dir:DEST under ``policy`` must be rejected for ``reason`` (its words)."""
    with pytest.raises(ToolError) as info:
        skopeo.copy(ref, f"dir:{dest}", extra_args=["--policy", str(policy)])
    error = (info.value.stderr or b"").decode("utf-8", "replace")
    assert "Source image rejected" in error and reason in error, error


def test_skopeo_signs_through_the_extension_and_verifies_with_signed_by(
        seed: SeedProcess, layout: OciLayout, release: GpgHome, intruder: GpgHome, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    http = httpx.Client(base_url=seed.url, trust_env=False, timeout=30)
    policy = signed_by(tmp_path / "policy.json", release.export_public(tmp_path / "client-release.asc"))
    signed = push(layout, "one", f"{seed.repo_url('team/signed')}:v1", release, monkeypatch)
    # The signature went through the extension, into the seed's data (no lookaside store).
    stored = list((seed.data_dir / "repositories/team/signed/_signatures").glob("*/*.json"))
    assert [path.parent.name for path in stored] == [signed.replace(":", "-")]
    listed = http.get(f"/extensions/v2/team/signed/signatures/{signed}").json()["signatures"]
    assert len(listed) == 1 and listed[0]["type"] == "atomic" and listed[0]["name"].startswith(f"{signed}@")
    skopeo.copy(f"{seed.repo_url('team/signed')}:v1", f"dir:{tmp_path / 'ok'}", extra_args=["--policy", str(policy)])
    assert (tmp_path / "ok" / "manifest.json").exists()

    # Unsigned, signed by a key the client does not trust, and a signature of another image.
    push(layout, "one", f"{seed.repo_url('team/unsigned')}:v1", None, monkeypatch)
    pull_fails(f"{seed.repo_url('team/unsigned')}:v1", policy, tmp_path / "unsigned",
               "A signature was required, but no signature exists")
    push(layout, "one", f"{seed.repo_url('team/foreign')}:v1", intruder, monkeypatch)
    pull_fails(f"{seed.repo_url('team/foreign')}:v1", policy, tmp_path / "foreign", "Invalid GPG signature")
    other = push(layout, "two", f"{seed.repo_url('team/other')}:v1", None, monkeypatch)
    content = listed[0]["content"]
    r = http.put(f"/extensions/v2/team/other/signatures/{other}",
                 json={"schemaVersion": 2, "name": f"{other}@{'0' * 32}", "type": "atomic", "content": content})
    assert r.status_code == 201
    pull_fails(f"{seed.repo_url('team/other')}:v1", policy, tmp_path / "other", f"Signature for digest {signed}")

    # The image edited by one byte (same blobs, one more space in the manifest) keeping its signature.
    manifest = http.get(f"/v2/team/signed/manifests/{signed}").content
    edited = manifest.replace(b'"schemaVersion":2', b'"schemaVersion": 2', 1)
    assert len(edited) == len(manifest) + 1
    push(layout, "one", f"{seed.repo_url('team/edited')}:v1", None, monkeypatch)
    r = http.put("/v2/team/edited/manifests/v1", content=edited, headers={"Content-Type": MT_OCI_MANIFEST})
    assert r.status_code == 201
    edited_digest = r.headers["docker-content-digest"]
    http.put(f"/extensions/v2/team/edited/signatures/{edited_digest}",
             json={"schemaVersion": 2, "name": f"{edited_digest}@{'0' * 32}", "type": "atomic", "content": content})
    pull_fails(f"{seed.repo_url('team/edited')}:v1", policy, tmp_path / "edited", f"Signature for digest {signed}")
    # The signature edited by one byte of its signed content.
    push(layout, "two", f"{seed.repo_url('team/tampered')}:v1", None, monkeypatch)
    digest = skopeo.inspect_digest(f"{seed.repo_url('team/tampered')}:v1")
    document = json.dumps({"critical": {"identity": {"docker-reference": f"{seed.host}/team/tampered:v1"},
                                        "image": {"docker-manifest-digest": digest},
                                        "type": "atomic container signature"}, "optional": {}}).encode()
    tampered = release.sign(document, compress=False).replace(b"atomic container", b"atomic Container")
    http.put(f"/extensions/v2/team/tampered/signatures/{digest}",
             json={"schemaVersion": 2, "name": f"{digest}@{'0' * 32}", "type": "atomic",
                   "content": base64.b64encode(tampered).decode()})
    pull_fails(f"{seed.repo_url('team/tampered')}:v1", policy, tmp_path / "tampered", "Invalid GPG signature")
    # With the untampered message the same image verifies: the refusals above are about the edits.
    http.put(f"/extensions/v2/team/tampered/signatures/{digest}",
             json={"schemaVersion": 2, "name": f"{digest}@{'0' * 32}", "type": "atomic",
                   "content": base64.b64encode(release.sign(document)).decode()})
    skopeo.copy(f"{seed.repo_url('team/tampered')}:v1", f"dir:{tmp_path / 'fixed'}",
                extra_args=["--policy", str(policy)])
    http.close()


def test_the_seed_refuses_unsigned_tags_under_enforcement(seed: SeedProcess, layout: OciLayout, release: GpgHome,
                                                          intruder: GpgHome, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    signed = push(layout, "one", f"{seed.repo_url('prod/app')}:v1", release, monkeypatch)
    push(layout, "two", f"{seed.repo_url('prod/unsigned')}:v1", None, monkeypatch)
    push(layout, "two", f"{seed.repo_url('prod/foreign')}:v1", intruder, monkeypatch)
    # skopeo with a permissive client policy: the seed decides.
    assert skopeo.copy(f"{seed.repo_url('prod/app')}:v1", f"dir:{tmp_path / 'app'}") == signed
    for repo in ("prod/unsigned", "prod/foreign"):
        with pytest.raises(ToolError) as info:
            skopeo.copy(f"{seed.repo_url(repo)}:v1", f"dir:{tmp_path / repo.replace('/', '-')}")
        assert "refused by the signature policy" in (info.value.stderr or b"").decode(), info.value
    verdict = httpx.get(f"{seed.url}/extensions/v2/prod/foreign/verdict/v1", trust_env=False).json()
    assert verdict["verdict"] == "denied" and "not trusted" in verdict["signatures"][0]["error"]
    verdict = httpx.get(f"{seed.url}/extensions/v2/prod/app/verdict/v1", trust_env=False).json()
    assert verdict["verdict"] == "allowed" and verdict["verified_by"] == [str(tmp_path / "release.asc")]
    assert verdict["signatures"][0]["docker_reference"] == f"{seed.host}/prod/app:v1"


@pytest.mark.root
def test_podman_pulls_only_signed_images_with_signed_by(seed: SeedProcess, layout: OciLayout, release: GpgHome,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = release.export_public(tmp_path / "podman-release.asc")
    policy = {"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(key)}]}
    push(layout, "one", f"{seed.repo_url('team/signed')}:v1", release, monkeypatch)
    push(layout, "one", f"{seed.repo_url('team/unsigned')}:v1", None, monkeypatch)
    with Podman(tmp_path / "podman", insecure_registries=(seed.host,), policy=policy) as podman:
        podman.run_ok("pull", f"{seed.host}/team/signed:v1")
        refused = podman.run("pull", f"{seed.host}/team/unsigned:v1")
        assert refused.returncode != 0
        assert b"A signature was required, but no signature exists" in refused.stderr, refused.stderr
        # The seed's enforcement reaches podman too, whatever its own policy.
        push(layout, "two", f"{seed.repo_url('prod/unsigned')}:v1", None, monkeypatch)
        podman.policy = {"default": [{"type": "insecureAcceptAnything"}]}
        (podman.workdir / "policy.json").write_text(json.dumps(podman.policy))
        refused = podman.run("pull", f"{seed.host}/prod/unsigned:v1")
        assert refused.returncode != 0 and b"signature policy" in refused.stderr, refused.stderr


@pytest.mark.root
def test_containerd_pulls_signed_tags_and_is_refused_unsigned(seed: SeedProcess, layout: OciLayout,
                                                               release: GpgHome, containerd: PrivateContainerd,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signed = push(layout, "one", f"{seed.repo_url('prod/app')}:v1", release, monkeypatch)
    push(layout, "two", f"{seed.repo_url('prod/unsigned')}:v1", None, monkeypatch)
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "seed.local:5000", seed.url, [seed.url])
    containerd.pull("seed.local:5000/prod/app:v1", hosts_dir=hosts, timeout=60)
    assert containerd.image_digest("seed.local:5000/prod/app:v1") == signed
    refused = containerd.pull("seed.local:5000/prod/unsigned:v1", hosts_dir=hosts, timeout=60, check=False)
    assert refused.returncode != 0 and b"403" in refused.stderr, refused.stderr
    assert "seed.local:5000/prod/unsigned:v1" not in containerd.images()
