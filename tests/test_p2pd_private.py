"""The agent in front of a private seed: each client's right to an image is checked at the node.

An in-process seed with access control (htpasswd users made by Debian's ``htpasswd``, ES256
tokens, a JWKS) and in-process agents whose operator gave them a pull-only account. Tenant A
(``u-pull``) may pull ``team/**``, tenant B (``u-none``) only ``other/**``. After tenant A pulled
through a node, anonymous clients and tenant B are refused — from the node's cache and from its
peers — while containerd (``ctr --user``) and podman pull through the node with their own
credentials. Every request is real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import p2pd.cli
from p2pd.access import Challenge, KeySet, verify_token
from p2pd.config import AgentConfig, FetchConfig, UpstreamConfig, load_config
from p2pd.daemon import Agent
from p2pd.httpd import Request, Response, ServerInfo, serve_http
from p2pd.mirror_prefix import prefix_path
from p2pd.oci.digest import Digest, digest_of
from p2pd.swarm.node import load_cluster_key
from p2pd.swarm.peers import PeerClient, PeerRefused
from p2pd.swarm.tls import PeerTls
from p2pd.upstream import HttpUpstream
from seed.auth.identity import Principal
from seed.auth.tokens import KeyDirectory, TokenAuthority
from seed.config import load_config as load_seed_config
from seed.registry import serve_seed
from tests.harness import skopeo
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import OciLayout
from tests.harness.net import free_port
from tests.harness.podman import Podman
from tests.p2pd_support import NS, agent_metric, start_agent, write_hosts
from tests.test_p2pd_access import FakeRegistry
from tests.test_seed_api import image_manifest, push_blob
from tests.test_seed_auth_api import PASSWORD, USERS, AuthSeed, creds, make_htpasswd, token_for, write_config

SERVICE = "seed.test"
NODE_USER, NODE_PASSWORD = "p2pd-node", "node-Secret-1"  # the operator's account for the agent
TIMEOUT = 30.0  # seconds per test body (the root tests: per client run)
CHUNK = 64 * 1024

# ---- the private seed and its images ------------------------------------------------------


RULES = ('[[access]]\nrepositories = ["other/**"]\nusers = ["u-none"]\nrole = "pull"\n\n'
         '[[access]]\nrepositories = ["other/**"]\nusers = ["u-admin"]\nrole = "admin"\n\n'
         f'[[access]]\nrepositories = ["team/**", "other/**"]\nusers = ["{NODE_USER}"]\nrole = "pull"\n')


async def start_private_seed(nursery: trio.Nursery, tmp_path: Path, *, public: bool) -> AuthSeed:
    """u-pull: tenant A (pull team/**); u-none: tenant B (pull other/**); p2pd-node: the agent;
    with ``public``, anonymous pull on public/** too."""
    make_htpasswd(tmp_path / "htpasswd", {**{u: PASSWORD.format(u) for u in USERS}, NODE_USER: NODE_PASSWORD})
    data = tmp_path / "seed-data"
    config_file = write_config(tmp_path, RULES)
    if not public:
        # skopeo and podman only log in when the registry's /v2/ asks them to, which a seed
        # with public repositories does not: the clients' tests use one without.
        text = config_file.read_text().replace('repositories = ["public/**"]\nanonymous = true', 'repositories = '
                                               '["public/**"]\nusers = ["u-admin"]')
        assert "anonymous = true" not in text
        config_file.write_text(text)
    config = load_seed_config(config_file, listen="127.0.0.1:0", data=data)
    info, registry = await nursery.start(partial(serve_seed, config))
    return AuthSeed(info, registry, data, tmp_path)


@pytest.fixture
async def private_seed(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[AuthSeed]:
    yield await start_private_seed(nursery, tmp_path, public=True)


@pytest.fixture
async def closed_seed(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[AuthSeed]:
    yield await start_private_seed(nursery, tmp_path, public=False)


@dataclass
class Image:
    name: str
    manifest: bytes
    blobs: dict[str, bytes]  # digest → bytes (config and layers)

    @property
    def digest(self) -> str:
        return str(digest_of(self.manifest))


SHARED_LAYER = os.urandom(96 * 1024)


async def push(seed: AuthSeed, name: str, tag: str = "v1", layer_size: int = 200 * 1024) -> Image:
    """An image of a random layer plus ``SHARED_LAYER``, pushed by the repository's admin."""
    config, layer = json.dumps({"name": name, "os": "linux"}).encode(), os.urandom(layer_size)
    async with seed.client(creds("u-admin")) as client:
        for blob in (config, layer, SHARED_LAYER):
            await push_blob(client, name, blob)
        manifest = image_manifest(config, [layer, SHARED_LAYER])
        r = await client.put(f"/v2/{name}/manifests/{tag}", content=manifest,
                             headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        assert r.status_code == 201, r.text
    return Image(name, manifest, {str(digest_of(b)): b for b in (config, layer, SHARED_LAYER)})


def agent_toml(tmp_path: Path, seed_url: str, *lines: str, name: str = "agent",
               credentials: bool = True, swarm: dict[str, Any] | None = None) -> AgentConfig:
    """An in-process agent mapping ``NS`` to the seed with the operator's account (unless not
    ``credentials``); ``lines`` are more keys of that ``[[upstream]]`` entry."""
    entry = ["[[upstream]]", f'namespace = "{NS}"', f'url = "{seed_url}"']
    if credentials:
        entry += [f'username = "{NODE_USER}"', f'password = "{NODE_PASSWORD}"']
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join([*entry, *lines]) + "\n")
    return load_config(path, listen="127.0.0.1:0", data=tmp_path / name, swarm=swarm)


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{PASSWORD.format(user)}".encode()).decode()


async def ask(agent: Agent, method: str, path: str, authorization: str | None = None, *,
              prefixed: bool = False) -> httpx.Response:
    """A request as containerd sends it (``ns=``), or as podman does (``prefixed``: the registry in the path)."""
    headers = {"Authorization": authorization} if authorization else {}
    params = {} if prefixed else {"ns": NS}
    if prefixed:
        path = path.replace("/v2/", f"/v2/{prefix_path(NS)}/", 1)
    async with httpx.AsyncClient(base_url=agent.info.url, trust_env=False, timeout=20) as client:
        return await client.request(method, path, params=params, headers=headers)


def targets(image: Image) -> list[tuple[str, str]]:
    """What containerd asks for an image: the tag, the manifest by digest, every blob."""
    return [("HEAD", f"/v2/{image.name}/manifests/v1"), ("GET", f"/v2/{image.name}/manifests/{image.digest}"),
            *(("GET", f"/v2/{image.name}/blobs/{digest}") for digest in image.blobs)]


async def pull_through(agent: Agent, image: Image, authorization: str | None) -> None:
    """Pulls ``image`` through the agent as containerd does and checks every byte."""
    for method, path in targets(image):
        response = await ask(agent, method, path, authorization)
        assert response.status_code == 200, (path, response.status_code, response.text)
        if "/blobs/" in path:
            assert response.content == image.blobs[path.rsplit("/", 1)[1]]
        elif method == "GET":
            assert response.content == image.manifest


def denied(agent: Agent, reason: str) -> float:
    return agent_metric(agent, "p2pd_auth_denied_total", reason=reason)


def checks(agent: Agent, kind: str) -> float:
    return agent_metric(agent, "p2pd_auth_checks_total", kind=kind)


def served(agent: Agent) -> float:
    """Manifest and blob requests the agent answered with content (200 or 206)."""
    return sum(agent_metric(agent, "p2pd_http_requests_total", method=method, route=route, status=status)
               for method in ("GET", "HEAD") for route in ("manifest", "blob") for status in ("200", "206"))


# ---- the registry access contract: FakeRegistry and HttpUpstream against the seed ---------


@dataclass
class AccessContract:
    client: Any  # a p2pd.gate.RegistryAccessClient
    ping_status: int  # what this registry answers an anonymous /v2/
    private: str
    public: str
    allowed: str  # an Authorization header that may pull ``private``
    other: str  # a valid one that may not
    jwks_url: str
    missing_jwks_url: str
    now: Callable[[], float]
    close: Callable[[], Awaitable[None]]


async def _fake_contract(_seed: AuthSeed) -> AccessContract:
    registry = FakeRegistry(public={"public/base"})

    async def close() -> None:
        return None

    return AccessContract(registry, 401, "team/app", "public/base", "Bearer " + registry.mint({"team/app": ["pull"]}),
                          "Bearer " + registry.mint({"other/app": ["pull"]}), registry.jwks_url,
                          "https://auth.fake.test/nothing", registry.clock, close)


async def _seed_contract(seed: AuthSeed) -> AccessContract:
    await push(seed, "team/app")
    async with seed.client(creds("u-admin")) as client:
        await push_blob(client, "public/base", b"public")
        manifest = image_manifest(b"{}", [b"public"])
        await push_blob(client, "public/base", b"{}")
        await client.put("/v2/public/base/manifests/v1", content=manifest,
                         headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    upstream = HttpUpstream(UpstreamConfig(namespace=NS, url=seed.info.url), FetchConfig())
    # /v2/ without credentials asks to log in, public repositories or not (as distribution does).
    return AccessContract(upstream, 401, "team/app", "public/base",
                          "Bearer " + await token_for(seed, "repository:team/app:pull", "u-pull"),
                          "Bearer " + await token_for(seed, "repository:other/app:pull", "u-none"),
                          f"{seed.info.url}/token/keys", f"{seed.info.url}/token/nothing", time.time,
                          upstream.aclose)


@pytest.mark.parametrize("make", [_fake_contract, _seed_contract], ids=["fake", "http-seed"])
async def test_registry_access_client_contract(
    private_seed: AuthSeed, make: Callable[[AuthSeed], Awaitable[AccessContract]],
) -> None:
    contract = await make(private_seed)
    try:
        with trio.fail_after(TIMEOUT):
            client = contract.client
            ping = await client.probe_base()
            assert ping.status == contract.ping_status
            assert (ping.challenge is not None) == (ping.status == 401)
            probe = await client.probe_pull(contract.private)
            assert probe.status == 401
            assert isinstance(probe.challenge, Challenge) and probe.challenge.scheme == "bearer"
            assert probe.challenge.realm and probe.challenge.service
            assert (await client.probe_pull(contract.public)).status == 200
            assert await client.check_pull(contract.private, contract.allowed) == 200
            assert await client.check_pull(contract.private, contract.other) in (401, 403)
            assert await client.check_pull(contract.private, "Bearer not-a-token") in (401, 403)
            keys = KeySet.from_jwks(await client.fetch_jwks(contract.jwks_url))
            grant = verify_token(contract.allowed.split(" ", 1)[1], keys, audience=probe.challenge.service,
                                 issuer=None, now=contract.now())
            assert grant.allows_pull(contract.private)
            assert await client.fetch_jwks(contract.missing_jwks_url) is None
    finally:
        await contract.close()


# ---- one node, several tenants ------------------------------------------------------------


async def test_cached_private_content_is_served_only_to_its_tenant(
    private_seed: AuthSeed, nursery: trio.Nursery, tmp_path: Path,
) -> None:
    team, other = await push(private_seed, "team/app"), await push(private_seed, "other/app")
    agent = await start_agent(nursery, agent_toml(tmp_path, private_seed.info.url))
    token_a = "Bearer " + await token_for(private_seed, "repository:team/app:pull", "u-pull")
    token_b = "Bearer " + await token_for(private_seed, "repository:other/app:pull", "u-none")
    with trio.fail_after(TIMEOUT):
        await pull_through(agent, team, token_a)
        await pull_through(agent, other, token_b)
        # What the seed answers an anonymous client is what the node answers.
        async with private_seed.client() as direct:
            seed_challenge = (await direct.head("/v2/team/app/manifests/v1")).headers["www-authenticate"]
        fetches = agent_metric(agent, "p2pd_upstream_fetches_total")
        hits = agent_metric(agent, "p2pd_cache_hits_total", kind="blob")
        for method, path in targets(team):
            anonymous = await ask(agent, method, path)
            assert anonymous.status_code == 401, path
            assert anonymous.headers["www-authenticate"] == seed_challenge
            tenant_b = await ask(agent, method, path, token_b)
            assert tenant_b.status_code == 401, path
            assert 'error="insufficient_scope"' in tenant_b.headers["www-authenticate"]
            assert (await ask(agent, method, path, basic("u-none"))).status_code == 403
            assert (await ask(agent, method, path, basic("u-pull"))).status_code == 200  # checked upstream
        # The signature extension is read through the node under the same rule.
        signatures = f"/extensions/v2/team/app/signatures/{team.digest}"
        assert (await ask(agent, "GET", signatures)).status_code == 401
        assert (await ask(agent, "GET", signatures, token_b)).status_code == 401
        listed = await ask(agent, "GET", signatures, token_a)
        assert listed.status_code == 200 and listed.json() == {"signatures": []}
        # Nothing was read from the cache or fetched for the refused requests.
        assert agent_metric(agent, "p2pd_upstream_fetches_total") == fetches
        assert agent_metric(agent, "p2pd_cache_hits_total", kind="blob") == hits + len(team.blobs)
        # A token for team/app reads none of other/app, not even the layer both share...
        for digest in other.blobs:
            assert (await ask(agent, "GET", f"/v2/other/app/blobs/{digest}", token_a)).status_code == 401
        # ...and cannot read other/app's layer under its own repository by naming its digest.
        other_only = next(d for d in other.blobs if d not in team.blobs)
        unlinked = await ask(agent, "GET", f"/v2/team/app/blobs/{other_only}", token_a)
        assert (unlinked.status_code, unlinked.json()["errors"][0]["code"]) == (404, "BLOB_UNKNOWN")
    assert denied(agent, "anonymous") == len(targets(team)) + 1
    assert denied(agent, "insufficient_scope") >= len(targets(team)) + len(other.blobs) + 1
    assert denied(agent, "not_linked") == 1
    assert checks(agent, "offline") >= 2 and checks(agent, "jwks_fetch") == 1


async def test_a_path_prefix_is_gated_like_ns(
    private_seed: AuthSeed, nursery: trio.Nursery, tmp_path: Path,
) -> None:
    # podman names the registry in the path (p2pd-ns/<registry>/): the gate must see the same
    # namespace and the repository without the prefix, so tenants stay apart exactly as with ns=.
    team, other = await push(private_seed, "team/app"), await push(private_seed, "other/app")
    agent = await start_agent(nursery, agent_toml(tmp_path, private_seed.info.url))
    token_a = "Bearer " + await token_for(private_seed, "repository:team/app:pull", "u-pull")
    token_b = "Bearer " + await token_for(private_seed, "repository:other/app:pull", "u-none")
    with trio.fail_after(TIMEOUT):
        for method, path in targets(team):
            assert (await ask(agent, method, path, prefixed=True)).status_code == 401, path
            assert (await ask(agent, method, path, token_b, prefixed=True)).status_code == 401, path
        for method, path in targets(team):  # the tenant's pull, then its cached content...
            response = await ask(agent, method, path, token_a, prefixed=True)
            assert response.status_code == 200, (path, response.text)
            if "/blobs/" in path:
                assert response.content == team.blobs[path.rsplit("/", 1)[1]]
        for method, path in targets(team):  # ...is still refused to the other tenant, by ns= and by path
            assert (await ask(agent, method, path, token_b)).status_code == 401, path
            assert (await ask(agent, method, path, token_b, prefixed=True)).status_code == 401, path
        await pull_through(agent, other, token_b)
        other_only = next(d for d in other.blobs if d not in team.blobs)
        unlinked = await ask(agent, "GET", f"/v2/team/app/blobs/{other_only}", token_a, prefixed=True)
        assert (unlinked.status_code, unlinked.json()["errors"][0]["code"]) == (404, "BLOB_UNKNOWN")
    assert denied(agent, "not_linked") == 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_expired_forged_and_unsigned_tokens_are_refused(
    private_seed: AuthSeed, nursery: trio.Nursery, tmp_path: Path,
) -> None:
    team = await push(private_seed, "team/app")
    agent = await start_agent(nursery, agent_toml(tmp_path, private_seed.info.url))
    keys = KeyDirectory(private_seed.data / "auth" / "keys")
    kid, _key = keys.signer
    tenant_a = Principal(kind="user", name="u-pull", provider="htpasswd")
    access = [("repository", "team/app", ["pull"])]

    def authority(**kwargs: Any) -> TokenAuthority:
        return TokenAuthority(keys, issuer="seed", service=kwargs.pop("service", SERVICE), **kwargs)

    good = authority().issue(tenant_a, access).token
    header, claims, signature = good.split(".")
    verifier = keys.verifier(kid)
    assert verifier is not None
    public_pem = verifier.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs_header = _b64(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode())
    hs_signature = _b64(hmac.new(public_pem, f"{hs_header}.{claims}".encode(), hashlib.sha256).digest())
    payload = json.loads(base64.urlsafe_b64decode(claims + "=="))
    widened = {**payload, "access": [*payload["access"], {"type": "repository", "name": "other/app",
                                                           "actions": ["pull"]}]}
    async with private_seed.client() as client:
        r = await client.post("/token", data={"grant_type": "password", "username": "u-pull",
                                              "password": PASSWORD.format("u-pull"), "service": SERVICE,
                                              "scope": "repository:team/app:pull", "access_type": "offline"})
        refresh = r.json()["refresh_token"]
    bad = {
        "expired": authority(clock=lambda: time.time() - 3600).issue(tenant_a, access).token,
        "wrong-audience": authority(service="another.service").issue(tenant_a, access).token,
        "forged-with-the-seed-kid": jwt.encode(payload, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                                               headers={"kid": kid}),
        "alg-none": _b64(json.dumps({"alg": "none", "kid": kid}).encode()) + f".{claims}.",
        "hs256-with-the-public-key": f"{hs_header}.{claims}.{hs_signature}",
        "refresh-token": refresh,
        "widened-claims": f"{header}.{_b64(json.dumps(widened).encode())}.{signature}",
    }
    with trio.fail_after(TIMEOUT):
        await pull_through(agent, team, "Bearer " + good)
        for label, token in bad.items():
            for method, path in targets(team):
                response = await ask(agent, method, path, "Bearer " + token)
                assert response.status_code == 401, (label, path)
                assert 'error="invalid_token"' in response.headers["www-authenticate"], label
    reasons = {"expired", "wrong_audience", "bad_signature", "bad_algorithm"}
    assert all(denied(agent, reason) >= 1 for reason in reasons), reasons
    # A key the issuer does not publish is not trusted offline: the seed itself is asked, and refuses.
    stranger = jwt.encode(payload, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                          headers={"kid": "not-a-seed-key"})
    with trio.fail_after(TIMEOUT):
        assert (await ask(agent, "HEAD", "/v2/team/app/manifests/v1", "Bearer " + stranger)).status_code == 401
    assert checks(agent, "upstream") == 1


async def test_without_published_keys_the_upstream_checks_each_token_once(
    private_seed: AuthSeed, nursery: trio.Nursery, tmp_path: Path,
) -> None:
    team = await push(private_seed, "team/app")
    config = agent_toml(tmp_path, private_seed.info.url, f'jwks_url = "{private_seed.info.url}/token/none"')
    agent = await start_agent(nursery, config)
    token_a = "Bearer " + await token_for(private_seed, "repository:team/app:pull", "u-pull")
    token_b = "Bearer " + await token_for(private_seed, "repository:other/app:pull", "u-none")
    with trio.fail_after(TIMEOUT):
        await pull_through(agent, team, token_a)
        await pull_through(agent, team, token_a)
        for method, path in targets(team):
            assert (await ask(agent, method, path, token_b)).status_code == 401
    assert checks(agent, "offline") == 0
    assert checks(agent, "upstream") == 2  # one per (token, repository), then cached
    assert checks(agent, "anonymous_probe") == 1


async def test_operator_opens_a_namespace_explicitly(
    private_seed: AuthSeed, nursery: trio.Nursery, tmp_path: Path,
) -> None:
    team = await push(private_seed, "team/app")
    closed = await start_agent(nursery, agent_toml(tmp_path, private_seed.info.url, name="closed"))
    opened = await start_agent(nursery, agent_toml(tmp_path, private_seed.info.url, "anonymous_pull = true",
                                                   name="opened"))
    bare = await start_agent(nursery, agent_toml(tmp_path, private_seed.info.url, name="bare", credentials=False))
    with trio.fail_after(TIMEOUT):
        assert (await ask(closed, "HEAD", "/v2/team/app/manifests/v1")).status_code == 401
        await pull_through(opened, team, None)  # the operator said so: the node's account serves everyone
        # Without an account the node holds nothing private: the seed refuses it, and so does the node
        # (404: containerd asks the seed, which challenges the client itself).
        assert (await ask(bare, "HEAD", "/v2/team/app/manifests/v1")).status_code == 404
    assert checks(opened, "anonymous_probe") == 0 and checks(bare, "anonymous_probe") == 0


async def test_ping_is_answered_like_the_upstream(
    closed_seed: AuthSeed, nursery: trio.Nursery, tmp_path: Path,
) -> None:
    agent = await start_agent(nursery, agent_toml(tmp_path, closed_seed.info.url))
    async with closed_seed.client() as direct:
        seed_answer = await direct.get("/v2/")
    with trio.fail_after(TIMEOUT):
        anonymous = await ask(agent, "GET", "/v2/")
        logged_in = await ask(agent, "GET", "/v2/", basic("u-none"))
    assert (seed_answer.status_code, anonymous.status_code, logged_in.status_code) == (401, 401, 200)
    assert anonymous.headers["www-authenticate"] == seed_answer.headers["www-authenticate"]


# ---- a client's token goes to the registry that issued it, and nowhere else -----------------


async def start_server(nursery: trio.Nursery, handler: Callable[[Request], Awaitable[Response]]) -> ServerInfo:
    info: ServerInfo = await nursery.start(partial(serve_http, handler, "127.0.0.1", 0))
    return info


async def test_a_client_token_reaches_only_the_registry(
    private_seed: AuthSeed, nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """A registry that answers the node's check with a redirect to another host (a trusted,
    configured origin here, so only the node's own rule keeps the token from it)."""
    recorded: list[tuple[str, str, dict[str, str]]] = []

    async def record(request: Request) -> Response:
        recorded.append((request.method, request.target, dict(request.headers.items())))
        return Response(404)

    recorder = await start_server(nursery, record)
    received: list[str] = []
    realm = f"{private_seed.info.url}/token"

    async def redirecting_registry(request: Request) -> Response:
        authorization = request.headers.get("authorization")
        received.append(authorization or "")
        if authorization is None:
            return Response(401, [("WWW-Authenticate", f'Bearer realm="{realm}",service="{SERVICE}"')])
        return Response(307, [("Location", f"{recorder.url}{request.target}")])

    registry = await start_server(nursery, redirecting_registry)
    path = tmp_path / "agent.toml"
    path.write_text(f'[[upstream]]\nnamespace = "{NS}"\nurl = "{registry.url}"\nusername = "{NODE_USER}"\n'
                    f'password = "{NODE_PASSWORD}"\njwks_url = "{recorder.url}/keys"\n\n'
                    f'[[upstream]]\nnamespace = "recorder.test"\nurl = "{recorder.url}"\n')
    agent = await start_agent(nursery, load_config(path, listen="127.0.0.1:0", data=tmp_path / "agent"))
    token = await token_for(private_seed, "repository:team/app:pull", "u-pull")
    with trio.fail_after(TIMEOUT):
        response = await ask(agent, "HEAD", "/v2/team/app/manifests/v1", f"Bearer {token}")
    assert response.status_code == 404  # an answer the node cannot rely on: containerd asks the registry
    assert received.count(f"Bearer {token}") == 1  # the one check, to the registry
    assert [(method, target) for method, target, _ in recorded] == [("GET", "/keys")]
    assert all(token not in json.dumps(headers) for _, _, headers in recorded)
    assert all("authorization" not in headers for _, _, headers in recorded)


# ---- peers --------------------------------------------------------------------------------


async def _start_pair(nursery: trio.Nursery, tmp_path: Path, seed_url: str) -> tuple[Agent, Agent]:
    key = tmp_path / "cluster.key"
    assert p2pd.cli.main(["keygen", "--out", str(key)]) == 0
    ports = [free_port(), free_port()]
    agents = []
    for index, port in enumerate(ports):
        swarm = {"peer_listen": f"127.0.0.1:{port}", "peers": [f"127.0.0.1:{ports[1 - index]}"], "mdns": False,
                 "cluster_key_file": str(key), "node_id": f"node-{index}", "chunk_size": CHUNK}
        agents.append(await start_agent(nursery, agent_toml(tmp_path, seed_url, name=f"node{index}", swarm=swarm)))
    for _ in range(300):  # bounded: 15 s for the signed hellos
        if all(agent.swarm is not None and len(agent.swarm.membership.live()) >= 2 for agent in agents):
            break
        await trio.sleep(0.05)
    else:
        raise AssertionError("the two nodes did not become members of each other")
    return agents[0], agents[1]


async def test_peers_are_asked_only_for_authorized_requests(
    private_seed: AuthSeed, nursery: trio.Nursery, tmp_path: Path,
) -> None:
    team = await push(private_seed, "team/app", layer_size=1024 * 1024)
    node_a, node_b = await _start_pair(nursery, tmp_path, private_seed.info.url)
    token_a = "Bearer " + await token_for(private_seed, "repository:team/app:pull", "u-pull")
    token_b = "Bearer " + await token_for(private_seed, "repository:other/app:pull", "u-none")
    with trio.fail_after(TIMEOUT):
        await pull_through(node_b, team, token_a)  # node B now holds the image
        for method, path in targets(team):
            for node in (node_a, node_b):
                assert (await ask(node, method, path)).status_code == 401
                assert (await ask(node, method, path, token_b)).status_code == 401
    # Node A did nothing for the refused requests: no download, no peer asked, nothing stored.
    assert node_a.fetcher.in_flight == {}
    assert agent_metric(node_a, "p2pd_peer_messages_total", kind="chunk") == 0
    assert agent_metric(node_a, "p2pd_peer_messages_total", kind="chunkmap") == 0
    assert agent_metric(node_b, "p2pd_peer_served_bytes_total") == 0
    assert all(node_a.store.size(digest_of(data)) is None for data in team.blobs.values())
    with trio.fail_after(TIMEOUT):
        await pull_through(node_a, team, token_a)  # the tenant itself pulls through node A...
    assert agent_metric(node_b, "p2pd_peer_served_bytes_total") > 0  # ...which now asks its peer


async def test_members_get_a_protected_blob_only_with_the_registry_grant(
    private_seed: AuthSeed, nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """A member with the cluster key and a certificate still cannot read a private blob by
    digest from its peers: each node shows the seed's grant for that blob, naming itself."""
    team = await push(private_seed, "team/app", layer_size=1024 * 1024)
    node_a, node_b = await _start_pair(nursery, tmp_path, private_seed.info.url)
    token_a = "Bearer " + await token_for(private_seed, "repository:team/app:pull", "u-pull")
    with trio.fail_after(TIMEOUT):
        await pull_through(node_b, team, token_a)
        await pull_through(node_a, team, token_a)
    assert agent_metric(node_b, "p2pd_peer_served_bytes_total") > 0  # A's grant was accepted
    assert agent_metric(node_a, "p2pd_peer_grants_total") >= len(team.blobs)
    assert agent_metric(node_b, "p2pd_peer_grants_refused_total", reason="missing") == 0
    assert node_b.swarm is not None
    layer = max(team.blobs, key=lambda d: len(team.blobs[d]))
    digest = Digest.parse(layer)
    address = f"127.0.0.1:{node_b.swarm.peer_info.port}"
    key = load_cluster_key(tmp_path / "cluster.key")
    assert key is not None
    tls = PeerTls.derived(key, "node-x", tmp_path / "x-tls").client()

    async def chunk_with(node_id: str, grant: str | None) -> None:
        client = PeerClient(node_id, key, tls=tls)
        try:
            await client.fetch_chunk(address, digest, 0, 1024, grant)
        finally:
            await client.aclose()

    async with private_seed.client((NODE_USER, NODE_PASSWORD)) as seed:
        r = await seed.get(f"/v2/team/app/blobs/{layer}/grant", params={"node": "node-x"})
        assert r.status_code == 200, r.text
        grant = r.json()["grant"]
        other_blob = (await seed.get(f"/v2/team/app/blobs/{next(d for d in team.blobs if d != layer)}/grant",
                                     params={"node": "node-x"})).json()["grant"]
        # The seed grants only what the caller may pull, for blobs the repository holds.
        assert (await seed.get(f"/v2/other/app/blobs/{layer}/grant", params={"node": "node-x"})).status_code \
            in (401, 403, 404)
        assert (await seed.get(f"/v2/team/app/blobs/{layer}/grant", params={"node": "bad/id"})).status_code == 400
    forged = jwt.encode({**jwt.decode(grant, options={"verify_signature": False})},
                        ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                        headers={"kid": jwt.get_unverified_header(grant)["kid"]})
    with trio.fail_after(TIMEOUT):
        await chunk_with("node-x", grant)  # a member with its own grant: served
        for node_id, shown, reason in (("node-x", None, "missing"), ("node-y", grant, "other_node"),
                                       ("node-x", other_blob, "other_blob"), ("node-x", forged, "bad_signature"),
                                       ("node-x", "not-a-jwt", "malformed")):
            with pytest.raises(PeerRefused):
                await chunk_with(node_id, shown)
            assert agent_metric(node_b, "p2pd_peer_grants_refused_total", reason=reason) >= 1, reason
        # The chunk map of a protected blob needs the grant too.
        client = PeerClient("node-x", key, tls=tls)
        try:
            with pytest.raises(PeerRefused):
                await client.chunk_map(address, digest)
            assert (await client.chunk_map(address, digest, grant)).digest == digest
        finally:
            await client.aclose()
    # A grant is not an access token: the seed and the node refuse it as a client's credential.
    async with private_seed.client() as direct:
        assert (await direct.get("/v2/team/app/manifests/v1",
                                 headers={"Authorization": f"Bearer {grant}"})).status_code == 401
    assert (await ask(node_a, "GET", "/v2/team/app/manifests/v1", f"Bearer {grant}")).status_code == 401


# ---- the clients people use, through the node ---------------------------------------------


async def _push_busybox(seed: AuthSeed, layout: OciLayout) -> tuple[str, str]:
    host = seed.info.url.removeprefix("http://")
    digest = await trio.to_thread.run_sync(partial(
        skopeo.copy, layout.ref("busybox"), f"docker://{host}/team/busybox:v1",
        extra_args=["--dest-creds", f"u-admin:{PASSWORD.format('u-admin')}"]))
    return host, digest


@pytest.mark.root
async def test_containerd_pulls_through_the_node_with_its_own_credentials(
    closed_seed: AuthSeed, busybox_layout: OciLayout, containerd: PrivateContainerd,
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    _host, pushed = await _push_busybox(closed_seed, busybox_layout)
    agent = await start_agent(nursery, agent_toml(tmp_path, closed_seed.info.url))
    hosts = write_hosts(tmp_path / "hosts", agent.info.url, closed_seed.info.url)
    ref = f"{NS}/team/busybox:v1"
    # Tenant A: containerd gets the node's 401, logs in at the seed's realm, and comes back.
    await trio.to_thread.run_sync(partial(containerd.pull, ref, hosts_dir=hosts, timeout=60,
                                          extra_args=["--user", f"u-pull:{PASSWORD.format('u-pull')}"]))
    assert containerd.image_digest(ref) == pushed
    answered = served(agent)
    assert answered > 0 and agent_metric(agent, "p2pd_served_bytes_total") > 0
    assert denied(agent, "anonymous") >= 1 and checks(agent, "offline") >= 1
    # Anonymous and tenant B: refused by the node and by the seed.
    await trio.to_thread.run_sync(containerd.remove_all)
    for user in ([], ["--user", f"u-none:{PASSWORD.format('u-none')}"]):
        result = await trio.to_thread.run_sync(partial(containerd.pull, ref, hosts_dir=hosts, timeout=60,
                                                       check=False, extra_args=user))
        assert result.returncode != 0
    assert served(agent) == answered


async def _node_for(nursery: trio.Nursery, tmp_path: Path, seed: AuthSeed, host: str, *,
                    default: bool) -> tuple[Agent, str]:
    """A node serving the seed as ``host`` with the operator's account (and as its default
    upstream when ``default``); returns it and its address for podman."""
    lines = [f'default_upstream = "{seed.info.url}"', ""] if default else []
    lines += ["[[upstream]]", f'namespace = "{host}"', f'url = "{seed.info.url}"', f'username = "{NODE_USER}"',
              f'password = "{NODE_PASSWORD}"']
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    agent = await start_agent(nursery, load_config(path, listen="127.0.0.1:0", data=tmp_path / "agent"))
    return agent, agent.info.url.removeprefix("http://")


@pytest.mark.root
async def test_podman_pulls_through_the_node_with_its_own_credentials(
    closed_seed: AuthSeed, busybox_layout: OciLayout, nursery: trio.Nursery, tmp_path: Path,
) -> None:
    host, _pushed = await _push_busybox(closed_seed, busybox_layout)
    # podman asks a mirror with plain paths (no ns=): the node's default upstream is the seed,
    # with the operator's account from the [[upstream]] entry of the same URL.
    agent, mirror = await _node_for(nursery, tmp_path, closed_seed, host, default=True)
    image = f"{host}/team/busybox:v1"
    with Podman(tmp_path / "podman", insecure_registries=(host, mirror), mirrors={host: mirror}) as podman:
        refused = await trio.to_thread.run_sync(partial(podman.run, "pull", image))
        assert refused.returncode != 0
        assert served(agent) == 0 and denied(agent, "anonymous") >= 1
        # podman looks credentials up by the address it talks to: the mirror's. The login is
        # checked at the seed's realm (the node's /v2/ passes the seed's challenge on), so the
        # password goes to the seed only; the seed itself has no credentials stored here, so
        # the pull can only succeed through the node.
        login = await trio.to_thread.run_sync(podman.login, mirror, "u-pull", PASSWORD.format("u-pull"))
        assert login.returncode == 0, login.stderr
        await trio.to_thread.run_sync(partial(podman.run_ok, "pull", image))
    assert served(agent) > 0
    assert checks(agent, "offline") >= 1


@pytest.mark.root
async def test_podman_with_the_path_prefix_pulls_private_content_from_the_registry(
    closed_seed: AuthSeed, busybox_layout: OciLayout, nursery: trio.Nursery, tmp_path: Path,
) -> None:
    # The prefix is unknown at podman's /v2/ ping, so the node cannot pass a registry's challenge
    # on there; podman then never authenticates to the mirror (measured with 4.3: "Ping .../v2/
    # status 200", the manifest is 401 "unauthorized", next location). Private content therefore
    # bypasses the node, is never served to an anonymous client, and the pull still works.
    host, pushed = await _push_busybox(closed_seed, busybox_layout)
    agent, mirror = await _node_for(nursery, tmp_path, closed_seed, host, default=False)
    with Podman(tmp_path / "podman", insecure_registries=(host,)) as podman:
        assert p2pd.cli.main(["registries-config", "--dir", str(podman.drop_in_dir), "--endpoint", agent.info.url,
                              "--registry", host, "--registries-conf", str(podman.registries_conf)]) == 0
        for registry in (mirror, host):
            login = await trio.to_thread.run_sync(podman.login, registry, "u-pull", PASSWORD.format("u-pull"))
            assert login.returncode == 0, login.stderr
        await trio.to_thread.run_sync(partial(podman.run_ok, "pull", f"{host}/team/busybox:v1"))
        listed = await trio.to_thread.run_sync(partial(podman.run_ok, "images", "--digests", "--format",
                                                       "{{.Digest}}"))
    assert pushed in listed.stdout.decode()
    assert served(agent) == 0 and denied(agent, "anonymous") >= 1
    assert agent_metric(agent, "p2pd_upstream_fetches_total") == 0
