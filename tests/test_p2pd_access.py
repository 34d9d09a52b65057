"""Client authorization at the node, without sockets: the pure decisions of ``p2pd.access`` as a
matrix (credential x endpoint), token verification against real keys, and ``p2pd.gate.AccessGate``
over ``FakeRegistry`` — an in-memory token-auth registry that ``tests/test_p2pd_private.py`` holds
to the same contract as ``HttpUpstream`` against a real private seed.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import p2pd.access
from p2pd.access import (
    Challenge,
    CredentialKind,
    KeySet,
    PullProbe,
    TokenRejected,
    UnknownKey,
    Verdict,
    decide_link,
    decide_pull,
    parse_authorization,
    unverified_expiry,
    verify_token,
)
from p2pd.config import AccessConfig, AgentConfig, UpstreamConfig, load_config
from p2pd.errors import ConfigError, UpstreamNotFound, UpstreamUnavailable
from p2pd.gate import AccessGate, default_jwks_url
from p2pd.httpd import Headers, Request
from p2pd.metrics import AgentMetrics
from p2pd.oci.digest import Digest, digest_of
from p2pd.oci.errors import OCIError
from p2pd.upstream import DEFAULT_NAMESPACE, ManifestResult, UpstreamPool

SERVICE = "fake.test"
REALM = "https://auth.fake.test/token"
NOW = 1_900_000_000.0

# ---- an in-memory token-auth registry -----------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(_b64(json.dumps(part).encode()) for part in (header, claims)) + "." + _b64(signature)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeRegistry:
    """A registry with token auth in memory: implements ``p2pd.gate.RegistryAccessClient`` and the
    two ``Upstream`` methods link confirmation uses (``head_manifest``, ``blob_size``).

    ``public`` repositories are pullable anonymously; ``links`` says which digests each
    repository holds; ``basic`` maps a Basic header to the repositories it may pull; tokens
    minted by ``mint`` carry a Docker-style ``access`` claim and are what ``check_pull`` accepts.
    """

    clock: Clock = field(default_factory=Clock)
    public: set[str] = field(default_factory=set)
    links: dict[str, set[Digest]] = field(default_factory=dict)
    basic: dict[str, set[str]] = field(default_factory=dict)
    opaque: dict[str, set[str]] = field(default_factory=dict)  # opaque bearer token → repositories
    url: str = "https://registry.fake.test"
    publish_keys: bool = True
    unavailable: bool = False
    calls: Counter[str] = field(default_factory=Counter)
    received_authorization: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "key-1"

    @property
    def jwks_url(self) -> str:
        return "https://auth.fake.test/token/keys"

    def mint(self, access: dict[str, list[str]], *, lifetime: float = 300.0, key: Any = None,
             kid: str | None = None, audience: str = SERVICE, issuer: str = "fake", use: str = "access",
             not_before: float | None = None) -> str:
        now = self.clock()
        claims = {"iss": issuer, "sub": "someone", "aud": audience, "iat": int(now), "exp": int(now + lifetime),
                  "use": use, "access": [{"type": "repository", "name": n, "actions": a} for n, a in access.items()]}
        if not_before is not None:
            claims["nbf"] = int(not_before)
        return jwt.encode(claims, key or self.key, algorithm="ES256", headers={"kid": kid or self.kid})

    def jwks(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        entry = {"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig", "alg": "ES256",
                 "x": _b64(numbers.x.to_bytes(32, "big")), "y": _b64(numbers.y.to_bytes(32, "big"))}
        return json.dumps({"keys": [entry]}).encode()

    def _check(self) -> None:
        if self.unavailable:
            raise UpstreamUnavailable("fake registry unavailable")

    async def probe_base(self) -> PullProbe:
        await trio.lowlevel.checkpoint()
        self.calls["ping"] += 1
        self._check()
        return PullProbe(401, Challenge.make("bearer", REALM, SERVICE))

    async def probe_pull(self, repository: str) -> PullProbe:
        await trio.lowlevel.checkpoint()
        self.calls["probe"] += 1
        self._check()
        if repository in self.public:
            return PullProbe(200)
        return PullProbe(401, Challenge.make("bearer", REALM, SERVICE))

    async def check_pull(self, repository: str, authorization: str) -> int:
        await trio.lowlevel.checkpoint()
        self.calls["check"] += 1
        self.received_authorization.append(authorization)
        self._check()
        scheme, _, value = authorization.partition(" ")
        if scheme == "Basic":
            return 200 if repository in self.basic.get(authorization, set()) else 403
        if value in self.opaque:
            return 200 if repository in self.opaque[value] else 401
        try:
            claims = jwt.decode(value, self.key.public_key(), algorithms=["ES256"], audience=SERVICE,
                                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False})
        except jwt.PyJWTError:
            return 401
        if claims["exp"] <= self.clock() or claims.get("use") != "access":
            return 401
        granted = any(e["name"] == repository and "pull" in e["actions"] for e in claims["access"])
        return 200 if granted else 401

    async def fetch_jwks(self, url: str) -> bytes | None:
        await trio.lowlevel.checkpoint()
        self.calls["jwks"] += 1
        self._check()
        return self.jwks() if self.publish_keys and url == self.jwks_url else None

    async def head_manifest(self, repository: str, reference: str) -> ManifestResult:
        return ManifestResult(Digest.parse(reference), "application/vnd.oci.image.manifest.v1+json",
                              await self.blob_size(repository, Digest.parse(reference)), None)

    async def blob_size(self, repository: str, digest: Digest) -> int:
        await trio.lowlevel.checkpoint()
        self.calls["link"] += 1
        self._check()
        if digest not in self.links.get(repository, set()):
            raise UpstreamNotFound(f"{digest} not in {repository}", status=404)
        return 1


class FakePool:
    """``p2pd.gate.UpstreamResolver`` over one ``FakeRegistry``; the agent has credentials for it
    unless ``credentials`` is false."""

    def __init__(self, registry: FakeRegistry, *, anonymous_pull: bool = False, jwks_url: str | None = None,
                 token_issuer: str | None = None, credentials: bool = True) -> None:
        self.registry = registry
        self.entry = UpstreamConfig(namespace="fake.test", url=registry.url, anonymous_pull=anonymous_pull,
                                    jwks_url=jwks_url, token_issuer=token_issuer,
                                    username="robot" if credentials else None, password="pw" if credentials else None)

    def resolve(self, ns: str | None, repository: str) -> tuple[Any, str]:
        return self.registry, repository

    def upstream(self, ns: str | None) -> Any:
        return self.registry

    def settings(self, namespace: str | None) -> UpstreamConfig:
        return self.entry


def request(authorization: str | None = None, path: str = "/v2/x/manifests/v1") -> Request:
    headers = [("Authorization", authorization)] if authorization is not None else []
    return Request("GET", path, path, {}, Headers(headers), None, ("127.0.0.1", 4000), "1.1")  # type: ignore[arg-type]


def make_gate(registry: FakeRegistry, **pool: Any) -> tuple[AccessGate, AgentMetrics]:
    metrics = AgentMetrics()
    config = AgentConfig(access=AccessConfig(anonymous_ttl=300, check_ttl=300, opaque_ttl=60, denied_ttl=5,
                                             jwks_ttl=300, jwks_min_interval=30))
    return AccessGate(config, FakePool(registry, **pool), metrics, clock=registry.clock), metrics


def status_of(exc: pytest.ExceptionInfo[OCIError]) -> int:
    return exc.value.status


LAYER_A, LAYER_B, SHARED = (digest_of(name.encode()) for name in ("layer-a", "layer-b", "shared"))


def tenant_registry() -> FakeRegistry:
    registry = FakeRegistry(public={"public/base"})
    registry.links = {"team/a": {LAYER_A, SHARED}, "team/b": {LAYER_B, SHARED}, "public/base": {SHARED}}
    registry.basic = {"Basic " + base64.b64encode(b"alice:pw").decode(): {"team/a"}}
    registry.opaque = {"opaque-token-for-a": {"team/a"}}
    return registry


# ---- the matrix: credential x endpoint ----------------------------------------------------


def credentials(registry: FakeRegistry) -> dict[str, str | None]:
    other_key = ec.generate_private_key(ec.SECP256R1())
    public_pem = registry.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = {"iss": "fake", "aud": SERVICE, "exp": int(NOW + 300), "access": [
        {"type": "repository", "name": "team/a", "actions": ["pull"]}]}
    hs_header = {"alg": "HS256", "typ": "JWT", "kid": registry.kid}
    signing_input = ".".join(_b64(json.dumps(p).encode()) for p in (hs_header, claims)).encode()
    hs256 = signing_input.decode() + "." + _b64(hmac.new(public_pem, signing_input, hashlib.sha256).digest())
    return {
        "anonymous": None,
        "tenant-a": "Bearer " + registry.mint({"team/a": ["pull"]}),
        "tenant-a-pull-push": "Bearer " + registry.mint({"team/a": ["pull", "push"]}),
        "tenant-a-star": "Bearer " + registry.mint({"team/a": ["*"]}),
        "tenant-b": "Bearer " + registry.mint({"team/b": ["pull"]}),
        "tenant-a-push-only": "Bearer " + registry.mint({"team/a": ["push"]}),
        "expired": "Bearer " + registry.mint({"team/a": ["pull"]}, lifetime=-3600),
        "not-yet-valid": "Bearer " + registry.mint({"team/a": ["pull"]}, not_before=NOW + 3600),
        "wrong-audience": "Bearer " + registry.mint({"team/a": ["pull"]}, audience="other.service"),
        "refresh-token": "Bearer " + registry.mint({"team/a": ["pull"]}, use="refresh"),
        "forged-known-kid": "Bearer " + registry.mint({"team/a": ["pull"]}, key=other_key),
        "forged-unknown-kid": "Bearer " + registry.mint({"team/a": ["pull"]}, key=other_key, kid="nobody"),
        "alg-none": "Bearer " + _unsigned({"alg": "none", "typ": "JWT", "kid": registry.kid}, claims),
        "hs256-public-key": "Bearer " + hs256,
        "garbage-bearer": "Bearer not.a.jwt",
        "opaque-a": "Bearer opaque-token-for-a",
        "basic-alice": "Basic " + base64.b64encode(b"alice:pw").decode(),
        "basic-wrong": "Basic " + base64.b64encode(b"alice:nope").decode(),
        "negotiate": "Negotiate abc",
    }


ALLOWED_ON_A = {"tenant-a", "tenant-a-pull-push", "tenant-a-star", "opaque-a", "basic-alice"}
# What a client is told about team/a when it may not pull it.
REFUSAL_ON_A = {"anonymous": 401, "tenant-b": 401, "tenant-a-push-only": 401, "expired": 401, "not-yet-valid": 401,
                "wrong-audience": 401, "refresh-token": 401, "forged-known-kid": 401, "forged-unknown-kid": 401,
                "alg-none": 401, "hs256-public-key": 401, "garbage-bearer": 401, "basic-wrong": 403, "negotiate": 401}
ENDPOINTS = ("manifest-by-tag", "manifest-by-digest", "blob-linked", "blob-of-b-only", "blob-shared",
             "blob-never-seen")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("role", sorted(ALLOWED_ON_A | set(REFUSAL_ON_A)))
async def test_matrix_credential_by_endpoint_on_a_private_repository(role: str, endpoint: str) -> None:
    registry = tenant_registry()
    gate, metrics = make_gate(registry)
    header = credentials(registry)[role]
    repository = "team/a"
    digest = {"manifest-by-digest": LAYER_A, "blob-linked": LAYER_A, "blob-of-b-only": LAYER_B,
              "blob-shared": SHARED, "blob-never-seen": digest_of(b"unknown")}.get(endpoint)

    async def attempt() -> None:
        access = await gate.authorize(request(header), "fake.test", repository, manifest=endpoint.startswith("m"))
        if digest is not None:
            await gate.require_link(request(header), access, digest, manifest=endpoint == "manifest-by-digest")

    if role in ALLOWED_ON_A:
        if endpoint in ("blob-of-b-only", "blob-never-seen"):
            # Knowing a digest is not a right to it: B's layer is not part of team/a.
            with pytest.raises(OCIError) as refused:
                await attempt()
            assert status_of(refused) == 404 and refused.value.code == "BLOB_UNKNOWN"
            assert metrics.registry.get_sample_value("p2pd_auth_denied_total", {"reason": "not_linked"}) == 1
        else:
            await attempt()
        return
    with pytest.raises(OCIError) as refused:
        await attempt()
    assert status_of(refused) == REFUSAL_ON_A[role], (role, endpoint, refused.value)
    challenge = dict(refused.value.headers).get("WWW-Authenticate")
    if refused.value.status == 401:
        assert challenge is not None and challenge.startswith(f'Bearer realm="{REALM}",service="{SERVICE}"')
        assert 'scope="repository:team/a:pull"' in challenge
        assert ('error=' in challenge) == (role != "anonymous")
    else:
        assert refused.value.code == "DENIED" and challenge is None
    # Refused before any link was asked: the decision comes first.
    assert registry.calls["link"] == 0


@pytest.mark.parametrize("role", ["anonymous", "tenant-b", "expired", "forged-known-kid", "alg-none"])
async def test_public_repository_is_open_to_every_client(role: str) -> None:
    registry = tenant_registry()
    gate, _ = make_gate(registry)
    header = credentials(registry)[role]
    access = await gate.authorize(request(header), "fake.test", "public/base", manifest=False)
    await gate.require_link(request(header), access, SHARED, manifest=False)
    # ...but only for what the public repository holds.
    with pytest.raises(OCIError) as refused:
        await gate.require_link(request(header), access, LAYER_A, manifest=False)
    assert status_of(refused) == 404
    assert registry.calls["check"] == 0 and registry.calls["jwks"] == 0  # no credential was looked at


async def test_operator_opened_namespace_serves_anonymous_clients_without_probing() -> None:
    registry = tenant_registry()
    gate, _ = make_gate(registry, anonymous_pull=True)
    access = await gate.authorize(request(None), "fake.test", "team/a", manifest=True)
    assert registry.calls["probe"] == 0
    # Links are still required: the open namespace is not a way to read other repositories' digests.
    with pytest.raises(OCIError):
        await gate.require_link(request(None), access, LAYER_B, manifest=False)


@pytest.mark.parametrize("credentials", [True, False])
async def test_ping_asks_anonymous_clients_to_log_in_like_the_upstream(credentials: bool) -> None:
    registry = tenant_registry()
    gate, _ = make_gate(registry, credentials=credentials)
    for header in ("Bearer anything", "Basic eDp5"):
        await gate.authorize_base(request(header, "/v2/"), "fake.test")  # reveals nothing: 200
    if not credentials:
        await gate.authorize_base(request(None, "/v2/"), "fake.test")
        assert registry.calls["ping"] == 0
        return
    for _ in range(3):
        with pytest.raises(OCIError) as refused:
            await gate.authorize_base(request(None, "/v2/"), "fake.test")
        assert refused.value.status == 401
        assert dict(refused.value.headers)["WWW-Authenticate"] == f'Bearer realm="{REALM}",service="{SERVICE}"'
    assert registry.calls["ping"] == 1


async def test_without_agent_credentials_only_links_are_checked() -> None:
    """The agent then fetches only what the upstream serves anonymously: nothing to guard but
    which digests belong to which repository."""
    registry = tenant_registry()
    gate, _ = make_gate(registry, credentials=False)
    access = await gate.authorize(request(None), "fake.test", "team/a", manifest=False)
    assert registry.calls["probe"] == 0
    await gate.require_link(request(None), access, LAYER_A, manifest=False)  # the upstream said so
    with pytest.raises(OCIError):
        await gate.require_link(request(None), access, LAYER_B, manifest=False)


# ---- caching, single flight, failures -----------------------------------------------------


async def test_answers_are_cached_within_their_lifetimes() -> None:
    registry = tenant_registry()
    gate, metrics = make_gate(registry)
    token = "Bearer " + registry.mint({"team/a": ["pull"]}, lifetime=100)
    for _ in range(5):
        await gate.authorize(request(token), "fake.test", "team/a", manifest=False)
    assert registry.calls == Counter({"probe": 1, "jwks": 1})  # verified offline, keys fetched once
    registry.clock.now += 301  # the anonymous answer and the token have both expired
    with pytest.raises(OCIError) as refused:
        await gate.authorize(request(token), "fake.test", "team/a", manifest=False)
    assert status_of(refused) == 401 and 'error="invalid_token"' in dict(refused.value.headers)["WWW-Authenticate"]
    assert registry.calls["probe"] == 2
    assert metrics.registry.get_sample_value("p2pd_auth_denied_total", {"reason": "expired"}) == 1


async def test_without_published_keys_one_upstream_check_per_token_and_repository() -> None:
    registry = tenant_registry()
    registry.publish_keys = False
    gate, _ = make_gate(registry)
    token = "Bearer " + registry.mint({"team/a": ["pull"], "team/b": ["pull"]}, lifetime=120)
    for _ in range(3):
        await gate.authorize(request(token), "fake.test", "team/a", manifest=False)
        await gate.authorize(request(token), "fake.test", "team/b", manifest=False)
    assert registry.calls["check"] == 2
    # Cached for at most the token's lifetime: 120 s, below check_ttl.
    registry.clock.now += 119
    await gate.authorize(request(token), "fake.test", "team/a", manifest=False)
    assert registry.calls["check"] == 2
    registry.clock.now += 2
    with pytest.raises(OCIError):
        await gate.authorize(request(token), "fake.test", "team/a", manifest=False)
    assert registry.calls["check"] == 3
    # Opaque credentials are reused for opaque_ttl (60 s) only.
    opaque = "Bearer opaque-token-for-a"
    await gate.authorize(request(opaque), "fake.test", "team/a", manifest=False)
    registry.clock.now += 59
    await gate.authorize(request(opaque), "fake.test", "team/a", manifest=False)
    assert registry.calls["check"] == 4
    registry.clock.now += 2
    await gate.authorize(request(opaque), "fake.test", "team/a", manifest=False)
    assert registry.calls["check"] == 5
    # The header went to the registry exactly as the client sent it, and to nobody else.
    assert set(registry.received_authorization) == {token, opaque}


async def test_unknown_key_refetches_keys_at_most_once_per_interval() -> None:
    registry = tenant_registry()
    gate, _ = make_gate(registry)
    await gate.authorize(request("Bearer " + registry.mint({"team/a": ["pull"]})), "fake.test", "team/a",
                         manifest=False)
    assert registry.calls["jwks"] == 1
    # The issuer rotates: a new key signs, published in its JWKS.
    registry.key, registry.kid = ec.generate_private_key(ec.SECP256R1()), "key-2"
    rotated = "Bearer " + registry.mint({"team/a": ["pull"]})
    registry.clock.now += 31
    await gate.authorize(request(rotated), "fake.test", "team/a", manifest=False)
    assert registry.calls["jwks"] == 2 and registry.calls["check"] == 0
    # A stream of tokens with unknown key ids does not hammer the key endpoint.
    stranger = ec.generate_private_key(ec.SECP256R1())
    for index in range(5):
        token = "Bearer " + registry.mint({"team/a": ["pull"]}, key=stranger, kid=f"unknown-{index}")
        with pytest.raises(OCIError):
            await gate.authorize(request(token), "fake.test", "team/a", manifest=False)
    assert registry.calls["jwks"] == 2
    assert registry.calls["check"] == 5  # each was asked of the registry, which refused it


async def test_concurrent_requests_share_one_upstream_question() -> None:
    registry = tenant_registry()
    registry.publish_keys = False
    gate, _ = make_gate(registry)
    token = "Bearer " + registry.mint({"team/a": ["pull"]})
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(partial(gate.authorize, request(token), "fake.test", "team/a", manifest=False))
    assert registry.calls["probe"] == 1 and registry.calls["check"] == 1


async def test_unreachable_upstream_fails_closed_and_then_stale() -> None:
    registry = tenant_registry()
    gate, metrics = make_gate(registry)
    registry.unavailable = True
    with pytest.raises(OCIError) as refused:
        await gate.authorize(request(None), "fake.test", "public/base", manifest=True)
    assert status_of(refused) == 404 and refused.value.code == "MANIFEST_UNKNOWN"
    assert metrics.registry.get_sample_value("p2pd_auth_denied_total", {"reason": "unavailable"}) == 1
    registry.unavailable = False
    await gate.authorize(request(None), "fake.test", "public/base", manifest=True)
    # Later the upstream goes away: the last answer is used (stale-if-error, like tags).
    registry.unavailable = True
    registry.clock.now += 3600
    await gate.authorize(request(None), "fake.test", "public/base", manifest=True)
    # A credential that cannot be checked is a fast 404 (containerd asks the registry itself).
    registry.publish_keys = False
    with pytest.raises(OCIError) as refused:
        await gate.authorize(request("Bearer opaque-token-for-a"), "fake.test", "team/a", manifest=False)
    assert status_of(refused) == 404 and refused.value.code == "BLOB_UNKNOWN"


async def test_links_learned_from_manifests(caplog: pytest.LogCaptureFixture) -> None:
    registry = tenant_registry()
    gate, _ = make_gate(registry)
    access = await gate.authorize(request(None), "fake.test", "public/base", manifest=True)
    config, layer = digest_of(b"cfg"), digest_of(b"lay")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": str(config), "size": 3},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": str(layer), "size": 3}]}).encode()
    gate.learn_manifest(access, digest_of(manifest), manifest)
    for digest in (config, layer):
        await gate.require_link(request(None), access, digest, manifest=False)
    await gate.require_link(request(None), access, digest_of(manifest), manifest=True)
    assert registry.calls["link"] == 0  # known from the manifest: the upstream was not asked
    # A repository's links are its own.
    registry.public.add("public/other")
    other = await gate.authorize(request(None), "fake.test", "public/other", manifest=False)
    with pytest.raises(OCIError):
        await gate.require_link(request(None), other, layer, manifest=False)


async def test_tokens_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    registry = tenant_registry()
    gate, _ = make_gate(registry)
    headers = [h for h in credentials(registry).values() if h]
    for header in headers:
        with pytest.raises(OCIError):
            await gate.authorize(request(header), "fake.test", "team/c", manifest=False)
    assert "refused GET" in caplog.text
    for header in headers:
        assert header.split(" ", 1)[1] not in caplog.text


# ---- the pure pieces ----------------------------------------------------------------------


def test_parse_authorization() -> None:
    assert parse_authorization(None).kind is CredentialKind.NONE
    assert parse_authorization("  ").kind is CredentialKind.NONE
    bearer = parse_authorization("bearer abc.def.ghi")
    assert (bearer.kind, bearer.token, bearer.header) == (CredentialKind.BEARER, "abc.def.ghi", "Bearer abc.def.ghi")
    assert bearer.fingerprint == hashlib.sha256(b"bearer abc.def.ghi").hexdigest()
    assert "abc" not in repr(bearer)
    assert parse_authorization("Basic Zm9vOmJhcg==").kind is CredentialKind.BASIC
    for odd in ("Bearer", "Bearer a b", "Digest x", "Bearer " + "a" * 9000, "Bearer \x00"):
        assert parse_authorization(odd).kind is CredentialKind.UNSUPPORTED, odd


def test_challenge_header_is_safe() -> None:
    challenge = Challenge.make("Bearer", 'https://r.test/token?a="b"', "svc")
    assert challenge is not None
    assert challenge.header("team/a") == (
        "WWW-Authenticate", 'Bearer realm="https://r.test/token?a=\\"b\\"",service="svc",scope="repository:team/a:pull"')
    assert Challenge.make("bearer", "https://r.test/\r\nSet-Cookie: x", "svc") is None
    assert Challenge.make("negotiate", "x") is None
    assert Challenge.make("bearer", "") is None
    basic = Challenge.make("basic", "registry")
    assert basic is not None and basic.header("team/a", error="invalid_token") == ("WWW-Authenticate",
                                                                                  'Basic realm="registry"')
    assert default_jwks_url("https://auth.example:8443/v2/token?x=1") == "https://auth.example:8443/token/keys"
    assert default_jwks_url("not a url") is None


def test_key_set_takes_only_public_signing_keys() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    private_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key))
    document = {"keys": [{**rsa_jwk, "kid": "rsa", "alg": "RS256"}, {**private_jwk, "kid": "private"},
                         {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}, {**rsa_jwk, "kid": "enc", "use": "enc"},
                         {**rsa_jwk, "kid": "weird-alg", "alg": "HS256"}, "not an object"]}
    keys = KeySet.from_jwks(json.dumps(document).encode())
    assert len(keys) == 1 and "rsa" in keys
    for bad in (b"[]", b"{}", b"not json", json.dumps({"keys": [{"kty": "oct", "k": "eA"}]}).encode()):
        with pytest.raises(ValueError):
            KeySet.from_jwks(bad)


def test_verify_token_reasons() -> None:
    registry = FakeRegistry()
    keys = KeySet.from_jwks(registry.jwks())
    grant = verify_token(registry.mint({"team/a": ["pull"], "team/b": ["push"]}), keys, audience=SERVICE,
                         issuer="fake", now=NOW)
    assert grant.allows_pull("team/a") and not grant.allows_pull("team/b") and not grant.allows_pull("team/c")
    assert grant.expires_at == NOW + 300
    cases = {
        "expired": registry.mint({"a": ["pull"]}, lifetime=-31),
        "not_yet_valid": registry.mint({"a": ["pull"]}, not_before=NOW + 31),
        "wrong_audience": registry.mint({"a": ["pull"]}, audience="x"),
        "wrong_issuer": registry.mint({"a": ["pull"]}, issuer="mallory"),
        "bad_signature": registry.mint({"a": ["pull"]}, key=ec.generate_private_key(ec.SECP256R1())),
        "bad_algorithm": _unsigned({"alg": "none", "kid": registry.kid}, {"aud": SERVICE, "exp": NOW + 60}),
        "malformed": "a.b.c",
    }
    for reason, token in cases.items():
        with pytest.raises(TokenRejected) as rejected:
            verify_token(token, keys, audience=SERVICE, issuer="fake", now=NOW)
        assert rejected.value.reason == reason, reason
        assert token not in str(rejected.value)
    # Within the leeway, expiry and not-before are tolerated.
    verify_token(registry.mint({"a": ["pull"]}, lifetime=-29), keys, audience=SERVICE, issuer=None, now=NOW)
    with pytest.raises(UnknownKey):
        verify_token(registry.mint({"a": ["pull"]}, kid="other"), keys, audience=SERVICE, issuer=None, now=NOW)
    assert unverified_expiry(registry.mint({}, lifetime=10)) == NOW + 10
    assert unverified_expiry("opaque") is None


@pytest.mark.parametrize("anonymous", list(Verdict))
@pytest.mark.parametrize("presented", [None, *Verdict])
@pytest.mark.parametrize("kind", list(CredentialKind))
def test_decide_pull_never_allows_without_evidence(anonymous: Verdict, presented: Verdict | None,
                                                   kind: CredentialKind) -> None:
    challenge = Challenge.make("bearer", REALM, SERVICE)
    decision = decide_pull(open_namespace=False, credential=kind, anonymous=anonymous, presented=presented,
                           rejection="upstream_denied", challenge=challenge, repository="r", manifest=True)
    assert decision.allowed == (Verdict.ALLOWED in (anonymous, presented))
    if not decision.allowed:
        assert decision.status in (401, 403, 404) and decision.reason
        if decision.status == 404:
            assert decision.code == "MANIFEST_UNKNOWN"
    opened = decide_pull(open_namespace=True, credential=kind, anonymous=anonymous, presented=presented,
                         rejection=None, challenge=None, repository="r", manifest=True)
    assert opened.allowed
    # Without the upstream's challenge there is nothing to send the client to: 404, fall back.
    blind = decide_pull(open_namespace=False, credential=kind, anonymous=anonymous, presented=presented,
                        rejection="expired", challenge=None, repository="r", manifest=False)
    assert blind.allowed or blind.status in (403, 404)


def test_decide_link() -> None:
    assert decide_link(Verdict.ALLOWED, manifest=False).allowed
    assert decide_link(Verdict.DENIED, manifest=False).code == "BLOB_UNKNOWN"
    assert decide_link(Verdict.UNKNOWN, manifest=True).code == "MANIFEST_UNKNOWN"


def _imports(path: Path) -> Iterable[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def test_access_module_is_pure() -> None:
    io_modules = {"trio", "httpx", "httpcore", "socket", "ssl", "os", "pathlib", "subprocess", "threading", "asyncio",
                  "urllib", "http", "time"}
    assert not {name.split(".")[0] for name in _imports(Path(p2pd.access.__file__))} & io_modules


# ---- configuration ------------------------------------------------------------------------


def test_configuration_of_client_checks(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('default_upstream = "https://seed.example"\n\n[[upstream]]\nnamespace = "seed.example"\n'
                    'url = "https://seed.example"\nusername = "robot"\npassword = "pw"\nanonymous_pull = true\n'
                    'jwks_url = "https://auth.example/keys"\ntoken_issuer = "seed"\n\n'
                    '[access]\nanonymous_ttl = 60\nmax_links = 10\n')
    config = load_config(path, data=tmp_path / "data")
    [entry] = config.upstreams
    assert (entry.anonymous_pull, entry.jwks_url, entry.token_issuer) == (True, "https://auth.example/keys", "seed")
    assert (config.access.anonymous_ttl, config.access.max_links, config.access.check_ttl) == (60.0, 10, 300.0)
    # The default upstream takes the credentials and settings of the entry with its URL.
    default = UpstreamPool(config).settings(None)
    assert (default.namespace, default.username, default.anonymous_pull) == (DEFAULT_NAMESPACE, "robot", True)
    for bad in ('[[upstream]]\nnamespace = "x"\nurl = "https://x"\njwks_url = "file:///etc/keys"\n',
                '[access]\nanonymous_ttl = -1\n', '[access]\nmax_entries = 0\n', '[access]\nunknown = 1\n',
                '[[upstream]]\nnamespace = "x"\nurl = "https://x"\nanonymous_pull = "yes"\n'):
        path.write_text(bad)
        with pytest.raises(ConfigError):
            load_config(path)
