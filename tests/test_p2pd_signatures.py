"""Signatures at the node: the agent passes the registry signature API extension through
(read-only) and can enforce ``[[signatures]]`` itself, so a node never answers a tag of
``prod/**`` with an unsigned image, even when its upstream has no policy at all.

The upstream is an in-process seed *without* a signature policy; the agent holds the rules and
keys (a GnuPG key made offline, a cosign P-256 key). Every request is real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from p2pd.config import load_config
from p2pd.daemon import Agent
from p2pd.errors import ConfigError
from p2pd.oci.digest import Digest, digest_of
from p2pd.signing.cosign import signature_tag
from p2pd.signing.payload import COSIGN_TYPE
from seed.registry import SeedRegistry
from tests.harness.gpg import GpgHome
from tests.p2pd_support import NS, agent_metric, start_agent, start_seed
from tests.test_seed_api import push_image
from tests.test_seed_signatures import cosign_layer, extension_body, payload, push_cosign, write_pem_public

RULES = """
[cache]
tag_ttl = 0  # every tag pull asks the upstream (and answers the last digest while it is down)

[[signatures]]
repositories = ["prod/**"]
keys = ["release.asc"]

[[signatures]]
repositories = ["staging/**"]
keys = ["release.asc"]
mode = "warn"

[[signatures]]
repositories = ["cosign/**"]
keys = ["cosign.pub"]
signed_identity = "matchRepository"
"""


@dataclass
class Node:
    agent: Agent
    seed: httpx.AsyncClient  # pushes go to the seed itself
    registry: SeedRegistry
    client: httpx.AsyncClient  # what containerd, skopeo and podman talk to
    stop_seed: Callable[[], None]

    async def sign(self, home: GpgHome, repo: str, tag: str, digest: str, suffix: str = "0" * 32) -> None:
        content = home.sign(payload(f"{NS}/{repo}:{tag}", digest))
        r = await self.seed.put(f"/extensions/v2/{repo}/signatures/{digest}",
                                content=extension_body(digest, content, suffix))
        assert r.status_code == 201, r.text

    def manifest(self, repo: str, reference: str) -> str:
        return f"/v2/{repo}/manifests/{reference}?ns={NS}"


@pytest.fixture
async def node(nursery: trio.Nursery, tmp_path: Path, release: GpgHome,
               cosign_key: ec.EllipticCurvePrivateKey) -> AsyncIterator[Node]:
    seed_scope = trio.CancelScope()
    seed_nursery_ready = trio.Event()
    started: list[tuple[str, SeedRegistry]] = []

    async def run_seed() -> None:
        with seed_scope:
            async with trio.open_nursery() as seed_nursery:
                started.append(await start_seed(seed_nursery, tmp_path / "seed"))
                seed_nursery_ready.set()

    nursery.start_soon(run_seed)
    await seed_nursery_ready.wait()
    url, registry = started[0]
    release.export_public(tmp_path / "release.asc")
    write_pem_public(cosign_key, tmp_path / "cosign.pub")
    (tmp_path / "p2pd.toml").write_text(RULES)
    config = load_config(tmp_path / "p2pd.toml", listen="127.0.0.1:0", data=tmp_path / "agent",
                         upstreams=[f"{NS}={url}"])
    agent = await start_agent(nursery, config)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as seed, \
            httpx.AsyncClient(base_url=agent.info.url, trust_env=False, timeout=30) as client:
        yield Node(agent, seed, registry, client, seed_scope.cancel)


async def test_the_agent_announces_and_passes_the_extension_through(node: Node, release: GpgHome) -> None:
    ping = await node.client.get("/v2/")
    assert ping.status_code == 200 and ping.headers["x-registry-supports-signatures"] == "1"
    _, digest, _ = await push_image(node.seed, "team/app", "v1")
    await node.sign(release, "team/app", "v1", digest)
    through = await node.client.get(f"/extensions/v2/team/app/signatures/{digest}?ns={NS}")
    direct = await node.seed.get(f"/extensions/v2/team/app/signatures/{digest}")
    assert through.status_code == 200 and through.json() == direct.json() and len(through.json()["signatures"]) == 1
    # Read-only: signatures are stored in the registry itself.
    put = await node.client.put(f"/extensions/v2/team/app/signatures/{digest}?ns={NS}",
                                content=extension_body(digest, b"x"))
    assert put.status_code == 405 and put.json()["errors"][0]["code"] == "UNSUPPORTED"
    # A manifest without signatures, an unknown one, a namespace the agent does not serve.
    _, bare, _ = await push_image(node.seed, "team/bare", "v1")
    assert (await node.client.get(f"/extensions/v2/team/bare/signatures/{bare}?ns={NS}")).json() == \
        {"signatures": []}
    unknown = "sha256:" + "1" * 64
    assert (await node.client.get(f"/extensions/v2/team/app/signatures/{unknown}?ns={NS}")).json() == \
        {"signatures": []}
    refused = await node.client.get(f"/extensions/v2/team/app/signatures/{digest}?ns=10.0.0.7:6000")
    assert refused.status_code == 404
    for bad in ("/extensions/v2/team/app/signatures/sha256:zz", "/extensions/v2/UPPER/signatures/" + digest):
        r = await node.client.get(bad)
        assert r.status_code in (400, 404) and r.json()["errors"], bad


async def test_tags_under_an_enforcing_rule_need_a_trusted_signature(node: Node, release: GpgHome,
                                                                     intruder: GpgHome) -> None:
    manifest, signed, layers = await push_image(node.seed, "prod/app", "v1")
    await node.sign(release, "prod/app", "v1", signed)
    r = await node.client.get(node.manifest("prod/app", "v1"))
    assert r.status_code == 200 and r.content == manifest
    # The blobs of an allowed manifest keep working, and pulls by digest are not the policy's.
    for layer in layers:
        blob = await node.client.get(f"/v2/prod/app/blobs/{digest_of(layer)}?ns={NS}")
        assert blob.status_code == 200 and blob.content == layer
    assert (await node.client.get(node.manifest("prod/app", signed))).status_code == 200

    # Unsigned, signed by a key the node does not trust, a signature of another image, another name.
    await push_image(node.seed, "prod/unsigned", "v1")
    _, foreign, _ = await push_image(node.seed, "prod/foreign", "v1")
    await node.sign(intruder, "prod/foreign", "v1", foreign)
    _, other, _ = await push_image(node.seed, "prod/other", "v1")
    content = release.sign(payload(f"{NS}/prod/app:v1", signed))
    await node.seed.put(f"/extensions/v2/prod/other/signatures/{other}", content=extension_body(other, content)
                        .replace(signed.encode(), other.encode()))
    _, renamed, _ = await push_image(node.seed, "prod/renamed", "v1")
    await node.sign(release, "prod/renamed", "v2", renamed)  # signed as :v2, pulled as :v1
    expected = {"prod/unsigned": "the image has no signature", "prod/foreign": "not trusted",
                "prod/other": f"for manifest {signed}, not this one", "prod/renamed": "not prod/renamed:v1"}
    for repo, reason in expected.items():
        r = await node.client.get(node.manifest(repo, "v1"))
        assert r.status_code == 403, (repo, r.text)
        error = r.json()["errors"][0]
        assert error["code"] == "DENIED" and "this node's signature policy" in error["message"], error
        assert reason in error["message"], (repo, error["message"])
        assert (await node.client.head(node.manifest(repo, "v1"))).status_code == 403
    assert agent_metric(node.agent, "p2pd_signature_verdicts_total", verdict="denied") >= 4
    assert agent_metric(node.agent, "p2pd_signature_verdicts_total", verdict="allowed") >= 1

    # Repositories without a rule are not the policy's; warn mode serves and counts.
    await push_image(node.seed, "team/unsigned", "v1")
    assert (await node.client.get(node.manifest("team/unsigned", "v1"))).status_code == 200
    await push_image(node.seed, "staging/app", "v1")
    assert (await node.client.get(node.manifest("staging/app", "v1"))).status_code == 200
    assert agent_metric(node.agent, "p2pd_signature_verdicts_total", verdict="warned") == 1


async def test_cosign_signatures_by_tag_and_by_referrer(node: Node, cosign_key: ec.EllipticCurvePrivateKey) -> None:
    _, digest, _ = await push_image(node.seed, "cosign/app", "v1")
    assert (await node.client.get(node.manifest("cosign/app", "v1"))).status_code == 403
    blob = payload(f"{NS}/cosign/app", digest, COSIGN_TYPE)
    await push_cosign(node.seed, "cosign/app", digest, cosign_layer(cosign_key, blob))
    # A verdict is reused for signature_ttl: a new agent-side read happens after it.
    node.agent.front.signatures._checks.clear()
    assert (await node.client.get(node.manifest("cosign/app", "v1"))).status_code == 200
    # The .sig tag itself is an attachment clients read: never refused.
    assert (await node.client.get(node.manifest("cosign/app", signature_tag(Digest.parse(digest))))).is_success
    _, referred, _ = await push_image(node.seed, "cosign/ref", "v1")
    blob = payload(f"{NS}/cosign/ref", referred, COSIGN_TYPE)
    await push_cosign(node.seed, "cosign/ref", referred, cosign_layer(cosign_key, blob), referrer=True)
    assert (await node.client.get(node.manifest("cosign/ref", "v1"))).status_code == 200
    # A payload signed by another key, and one whose signed bytes were edited after signing.
    other_key = ec.generate_private_key(ec.SECP256R1())
    _, forged, _ = await push_image(node.seed, "cosign/forged", "v1")
    await push_cosign(node.seed, "cosign/forged", forged,
                      cosign_layer(other_key, payload(f"{NS}/cosign/forged", forged, COSIGN_TYPE)))
    _, edited, _ = await push_image(node.seed, "cosign/edited", "v1")
    good = payload(f"{NS}/cosign/edited", edited, COSIGN_TYPE)
    [(_, annotations)] = cosign_layer(cosign_key, good)
    await push_cosign(node.seed, "cosign/edited", edited, [(good.replace(b'"critical"', b'"critical" '),
                                                             annotations)])
    for repo in ("cosign/forged", "cosign/edited"):
        r = await node.client.get(node.manifest(repo, "v1"))
        assert r.status_code == 403 and "no valid signature from a trusted key" in r.text, (repo, r.text)


async def test_verdicts_are_cached_and_fail_closed_without_the_upstream(node: Node, release: GpgHome) -> None:
    _, digest, _ = await push_image(node.seed, "prod/app", "v1")
    await node.sign(release, "prod/app", "v1", digest)
    _, never, _ = await push_image(node.seed, "prod/never", "v1")
    await node.sign(release, "prod/never", "v1", never)
    assert (await node.client.get(node.manifest("prod/app", "v1"))).status_code == 200
    verifier = node.agent.front.signatures.verifier
    checked = verifier.verifications
    assert (await node.client.get(node.manifest("prod/app", "v1"))).status_code == 200
    assert verifier.verifications == checked  # reused within signature_ttl
    listed = await node.client.get(f"/extensions/v2/prod/app/signatures/{digest}?ns={NS}")
    # prod/never's tag is cached, but its verdict is not (as after new keys were configured).
    assert (await node.client.get(node.manifest("prod/never", "v1"))).status_code == 200
    checks = node.agent.front.signatures._checks
    for key in [key for key in checks if key[3] == never]:
        del checks[key]
    # The upstream goes away (verdicts older than signature_ttl): the tag is answered from cache
    # (stale-if-error) and its earlier allowed verdict still holds; an image never verified is
    # refused, never served unchecked.
    for key, value in checks.items():
        checks[key] = type(value)(value.checks, value.at - 3600)
    node.stop_seed()
    await trio.sleep(0.1)
    r = await node.client.get(node.manifest("prod/app", "v1"))
    assert r.status_code == 200, r.text
    assert agent_metric(node.agent, "p2pd_stale_tag_answers_total") >= 1
    r = await node.client.get(node.manifest("prod/never", "v1"))
    assert r.status_code == 403 and "could not be read from the upstream" in r.text, r.text
    # The extension's list: the last one read is answered; none read before is a 404.
    again = await node.client.get(f"/extensions/v2/prod/app/signatures/{digest}?ns={NS}")
    assert again.status_code == 200 and again.json() == listed.json()
    assert (await node.client.get(f"/extensions/v2/prod/never/signatures/{never}?ns={NS}")).status_code == 404


def test_signature_rules_in_the_agent_configuration(tmp_path: Path, release: GpgHome) -> None:
    release.export_public(tmp_path / "release.asc")
    (tmp_path / "ok.toml").write_text('signature_ttl = 5\n[[signatures]]\nrepositories = ["prod/**"]\n'
                                      'keys = ["release.asc"]\n')
    config = load_config(tmp_path / "ok.toml")
    rule = config.signatures.rule_for("prod/app")
    assert config.signature_ttl == 5.0 and rule is not None and rule.trusted.openpgp
    assert config.signatures.rule_for("team/app") is None
    for text, message in (('[[signatures]]\nrepositories = ["prod/**"]\nkeys = ["missing.asc"]\n', "missing.asc"),
                          ('[[signatures]]\nrepositories = ["prod/**"]\nkeys = ["release.asc"]\nmode = "x"\n',
                           "mode"),
                          ('signature_ttl = -1\n', "signature_ttl"),
                          ('[[signatures]]\nrepositories = ["Bad Pattern"]\nkeys = ["release.asc"]\n', "pattern")):
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / "bad.toml")
    assert json.loads(json.dumps(rule.trusted.describe()))[0]["type"] == "openpgp"
