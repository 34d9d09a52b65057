"""Signed images pulled *through p2pd* with the clients people use.

- skopeo and podman with a ``signedBy`` ``policy.json`` pull through the agent as their
  ``registries.conf`` mirror: they read the signatures from the agent (the extension passed
  through, read-only) and accept signed images, refuse unsigned, foreign-signed and tampered
  ones.
- containerd does not verify signatures itself; the agent's own ``[[signatures]]`` rule does:
  ``prod/**`` tags are answered only for signed digests, while the seed here has no policy.

The seed and the agent are real processes on 127.0.0.1; images are pushed (and signed with
``--sign-by``) by skopeo from an OCI layout built offline.
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
from tests.harness.images import OciLayout, make_tar_layer, write_layout_image
from tests.harness.p2pd_process import P2pdProcess
from tests.harness.podman import Podman
from tests.harness.seed_process import SeedProcess
from tests.harness.tools import ToolError
from tests.test_seed_signatures_clients import push, signed_by


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayout:
    path = tmp_path_factory.mktemp("node-signed-images") / "oci"
    for tag in ("one", "two"):
        write_layout_image(path, [make_tar_layer({"etc/motd": f"node image {tag}\n".encode()}, compress=True)],
                           tag=tag)
    return OciLayout(path)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, release: GpgHome) -> Iterator[tuple[SeedProcess, P2pdProcess]]:
    """A seed without any signature policy, and an agent (default upstream: the seed) that
    enforces ``prod/**`` with the release key."""
    base = tmp_path_factory.mktemp("node-signatures")
    (base / "seed.toml").write_text("[scan]\nenabled = false\n")
    release.export_public(base / "release.asc")
    with SeedProcess(base / "seed-data", config_path=base / "seed.toml") as seed:
        (base / "p2pd.toml").write_text(f'default_upstream = "{seed.url}"\n[cache]\ntag_ttl = 0\n\n'
                                        '[[signatures]]\nrepositories = ["prod/**"]\nkeys = ["release.asc"]\n')
        with P2pdProcess(base / "agent-data", [], config_path=base / "p2pd.toml") as agent:
            yield seed, agent


def mirror_conf(path: Path, seed: SeedProcess, agent: P2pdProcess) -> Path:
    """registries.conf: the seed's host pulled through the agent first (tags and digests)."""
    agent_host = agent.url.removeprefix("http://")
    path.write_text(f'[[registry]]\nlocation = "{seed.host}"\ninsecure = true\n'
                    f'[[registry.mirror]]\nlocation = "{agent_host}"\ninsecure = true\n')
    return path


def test_skopeo_verifies_pulls_through_the_agent(site: tuple[SeedProcess, P2pdProcess], layout: OciLayout,
                                                 release: GpgHome, intruder: GpgHome, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seed, agent = site
    conf = mirror_conf(tmp_path / "registries.conf", seed, agent)
    policy = signed_by(tmp_path / "policy.json", release.export_public(tmp_path / "client.asc"))
    signed = push(layout, "one", f"{seed.repo_url('team/signed')}:v1", release, monkeypatch)
    push(layout, "one", f"{seed.repo_url('team/unsigned')}:v1", None, monkeypatch)
    push(layout, "two", f"{seed.repo_url('team/foreign')}:v1", intruder, monkeypatch)
    served = agent.metric("p2pd_http_requests_total", method="GET", route="signatures", status="200")

    def through_agent(repo: str, dest: str) -> str:
        return skopeo.copy(f"{seed.repo_url(repo)}:v1", f"dir:{tmp_path / dest}",
                           extra_args=["--policy", str(policy), "--registries-conf", str(conf)])

    assert through_agent("team/signed", "signed") == signed
    for repo, reason in (("team/unsigned", "A signature was required, but no signature exists"),
                         ("team/foreign", "Invalid GPG signature")):
        with pytest.raises(ToolError) as info:
            through_agent(repo, repo.replace("/", "-"))
        error = (info.value.stderr or b"").decode("utf-8", "replace")
        assert "Source image rejected" in error and reason in error, error
    # The signatures were read from the agent (the mirror), not from the seed behind it.
    assert agent.metric("p2pd_http_requests_total", method="GET", route="signatures", status="200") >= served + 3
    # A tampered signature: its signed bytes edited after signing.
    digest = push(layout, "two", f"{seed.repo_url('team/tampered')}:v1", None, monkeypatch)
    document = json.dumps({"critical": {"identity": {"docker-reference": f"{seed.host}/team/tampered:v1"},
                                        "image": {"docker-manifest-digest": digest},
                                        "type": "atomic container signature"}, "optional": {}}).encode()
    tampered = release.sign(document, compress=False).replace(b"atomic container", b"atomic Container")

    r = httpx.put(f"{seed.url}/extensions/v2/team/tampered/signatures/{digest}", trust_env=False,
                  json={"schemaVersion": 2, "name": f"{digest}@{'0' * 32}", "type": "atomic",
                        "content": base64.b64encode(tampered).decode()})
    assert r.status_code == 201
    with pytest.raises(ToolError) as info:
        through_agent("team/tampered", "tampered")
    assert "Invalid GPG signature" in (info.value.stderr or b"").decode("utf-8", "replace")


@pytest.mark.root
def test_podman_verifies_pulls_through_the_agent(site: tuple[SeedProcess, P2pdProcess], layout: OciLayout,
                                                 release: GpgHome, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seed, agent = site
    key = release.export_public(tmp_path / "podman-release.asc")
    policy = {"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(key)}]}
    push(layout, "one", f"{seed.repo_url('pod/signed')}:v1", release, monkeypatch)
    push(layout, "two", f"{seed.repo_url('pod/unsigned')}:v1", None, monkeypatch)
    served = agent.metric("p2pd_http_requests_total", method="GET", route="signatures", status="200")
    mirrors = {seed.host: agent.url.removeprefix("http://")}
    with Podman(tmp_path / "podman", insecure_registries=(seed.host,), policy=policy, mirrors=mirrors) as podman:
        podman.run_ok("pull", f"{seed.host}/pod/signed:v1")
        refused = podman.run("pull", f"{seed.host}/pod/unsigned:v1")
        assert refused.returncode != 0
        assert b"A signature was required, but no signature exists" in refused.stderr, refused.stderr
    assert agent.metric("p2pd_http_requests_total", method="GET", route="signatures", status="200") >= served + 2


@pytest.mark.root
def test_containerd_gets_only_signed_prod_tags_from_the_node(site: tuple[SeedProcess, P2pdProcess],
                                                              layout: OciLayout, release: GpgHome,
                                                              containerd: PrivateContainerd, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    seed, agent = site
    signed = push(layout, "one", f"{seed.repo_url('prod/app')}:v1", release, monkeypatch)
    push(layout, "two", f"{seed.repo_url('prod/unsigned')}:v1", None, monkeypatch)
    # The node is containerd's only host for this registry: hosts.toml's server is the agent too.
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "seed.local:5000", agent.url, [agent.url])
    containerd.pull("seed.local:5000/prod/app:v1", hosts_dir=hosts, timeout=60)
    assert containerd.image_digest("seed.local:5000/prod/app:v1") == signed
    refused = containerd.pull("seed.local:5000/prod/unsigned:v1", hosts_dir=hosts, timeout=60, check=False)
    assert refused.returncode != 0 and b"403" in refused.stderr, refused.stderr
    assert "seed.local:5000/prod/unsigned:v1" not in containerd.images()
    assert agent.metric("p2pd_signature_verdicts_total", verdict="denied") >= 1
    # What docs/security.md warns about: containerd takes a refusal (403) from a mirror as "try
    # the next host", so with a registry that does not enforce as the fallback it goes around the node.
    around = tmp_path / "around"
    write_hosts_toml(around, "seed.local:5000", seed.url, [agent.url])
    containerd.pull("seed.local:5000/prod/unsigned:v1", hosts_dir=around, timeout=60)
    assert "seed.local:5000/prod/unsigned:v1" in containerd.images()
