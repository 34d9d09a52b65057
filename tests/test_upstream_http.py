"""HttpUpstream beyond the shared contract: token auth against a real distribution registry,
credentials and redirects, hostile or broken responses, and namespace mapping.

Real servers listen on 127.0.0.1 only; protocol corner cases use ``httpx.MockTransport``.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

import seed.registry
from p2pd.config import AgentConfig, FetchConfig, UpstreamConfig
from p2pd.egress import EgressRefused
from p2pd.errors import (
    ConfigError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
    VerificationError,
)
from p2pd.fetcher import Fetcher
from p2pd.httpd import Request, Response, ServerInfo, serve_http
from p2pd.metrics import AgentMetrics
from p2pd.oci import mediatypes
from p2pd.oci.chunkmap import MIN_CHUNK_SIZE, ChunkHasher
from p2pd.oci.digest import Digest, digest_of
from p2pd.oci.errors import OCIError
from p2pd.oci.manifest import MAX_MANIFEST_SIZE
from p2pd.oci.ranges import parse_range
from p2pd.upstream import (
    CHUNK_MAP_MEDIA_TYPE,
    CHUNK_MAP_UNSUPPORTED_TTL,
    DOCKER_HUB_URL,
    GRANT_KEYS_TTL,
    HttpUpstream,
    UpstreamPool,
    _parse_challenges,
    validate_namespace,
)
from seed.auth.tokens import jwk_of
from tests.harness.net import assert_loopback, free_port
from tests.harness.reference_registry import ReferenceRegistry
from tests.test_upstream_conformance import IMAGE, REPOSITORY, TAG, push_image

TIMEOUT = 20.0  # seconds per test
MockHandler = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]
PASSWORD = "correct horse battery staple"

# ---- helpers ----------------------------------------------------------------------------------


async def read_blob(upstream: HttpUpstream, repository: str, digest: Digest, offset: int = 0) -> bytes:
    async with upstream.open_blob(repository, digest, offset) as response:
        assert response.offset == offset
        return b"".join([piece async for piece in response.aiter_bytes()])


def mock_upstream(
    handler: MockHandler,
    *,
    url: str = "https://registry.test",
    username: str | None = None,
    fetch: FetchConfig | None = None,
) -> HttpUpstream:
    config = UpstreamConfig(
        namespace="registry.test", url=url, username=username, password=PASSWORD if username else None
    )
    return HttpUpstream(config, fetch or FetchConfig(), transport=httpx.MockTransport(handler))


@dataclass
class Recorder:
    """Requests one loopback server received: (method, target, lower-cased headers)."""

    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def record(self, request: Request) -> None:
        self.seen.append((request.method, request.target, dict(request.headers.items())))

    def with_header(self, name: str) -> list[str]:
        return [target for _, target, headers in self.seen if name in headers]


async def start_server(nursery: trio.Nursery, handler: Callable[[Request], Awaitable[Response]]) -> ServerInfo:
    info: ServerInfo = await nursery.start(functools.partial(serve_http, handler, "127.0.0.1", 0))
    assert_loopback(info.url)
    return info


def basic_ok(request: Request, username: str, password: str) -> bool:
    header = request.headers.get("authorization") or ""
    expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
    return hmac.compare_digest(header.encode(), expected.encode())


# ---- token auth against docker-registry (distribution 2.8) ------------------------------------


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """The ``kid`` distribution 2.8 looks up among the keys of its rootcertbundle (libtrust's
    KeyID): base32 of the first 240 bits of sha256(DER SubjectPublicKeyInfo), in groups of 4."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def self_signed(key: rsa.RSAPrivateKey, name: str) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


class TokenIssuer:
    """A tiny Docker token server: Basic credentials in, RS256 JWT (``kid`` header) out."""

    service = "p2pd-test-registry"
    issuer = "p2pd-test-issuer"

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cert_pem = self_signed(self.key, "p2pd test token issuer")
        self.kid = libtrust_key_id(self.key.public_key())
        self.users = {"reader": PASSWORD}
        self.requests = Recorder()

    def mint(self, subject: str, access: list[dict[str, Any]], *, key: rsa.RSAPrivateKey | None = None) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_key = key or self.key
        return jwt.encode(
            claims, signing_key, algorithm="RS256", headers={"kid": libtrust_key_id(signing_key.public_key())}
        )

    async def handle(self, request: Request) -> Response:
        self.requests.record(request)
        if request.path != "/token":
            return Response(404)
        user = next((u for u, p in self.users.items() if basic_ok(request, u, p)), None)
        if user is None or request.query_one("service") != self.service:
            return Response(401, [("Content-Type", "application/json")], b'{"details":"denied"}')
        access = []
        scope = request.query_one("scope") or ""
        if scope.count(":") == 2 and scope.startswith("repository:"):
            _, name, actions = scope.split(":")
            # Grant the intersection of what was asked and what readers may do.
            granted = [a for a in actions.split(",") if a == "pull"]
            access.append({"type": "repository", "name": name, "actions": granted})
        body = {
            "token": self.mint(user, access),
            "expires_in": 300,
            "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        return Response(200, [("Content-Type", "application/json")], json.dumps(body).encode())


@dataclass
class TokenRegistry:
    registry: ReferenceRegistry
    issuer: TokenIssuer

    def upstream(self, username: str | None = "reader", password: str = PASSWORD) -> HttpUpstream:
        config = UpstreamConfig(
            namespace="token.test", url=self.registry.url, username=username, password=password if username else None
        )
        return HttpUpstream(config, FetchConfig())


@pytest.fixture
async def token_registry(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TokenRegistry]:
    issuer = TokenIssuer()
    with trio.fail_after(TIMEOUT):
        token_server = await start_server(nursery, issuer.handle)
        bundle = tmp_path / "token-issuer.pem"
        bundle.write_bytes(issuer.cert_pem)
        auth = {
            "token": {
                "realm": f"{token_server.url}/token",
                "service": issuer.service,
                "issuer": issuer.issuer,
                "rootcertbundle": str(bundle),
            }
        }
        registry = ReferenceRegistry(tmp_path / "registry", extra_config={"auth": auth})
        await trio.to_thread.run_sync(registry.start)
    try:
        with trio.fail_after(TIMEOUT):
            for repository in (REPOSITORY, "conformance/second"):
                push_token = issuer.mint(
                    "pusher", [{"type": "repository", "name": repository, "actions": ["pull", "push"]}]
                )
                await push_image(registry.url, repository, TAG, IMAGE, {"Authorization": f"Bearer {push_token}"})
        issuer.requests.seen.clear()
        yield TokenRegistry(registry, issuer)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(registry.stop)


async def test_token_auth_pulls_and_caches_the_token(token_registry: TokenRegistry) -> None:
    upstream = token_registry.upstream()
    issuer = token_registry.issuer
    try:
        with trio.fail_after(TIMEOUT):
            # Without a token the registry answers 401 with a Bearer challenge.
            anonymous = await httpx.AsyncClient(trust_env=False).get(
                f"{token_registry.registry.url}/v2/{REPOSITORY}/manifests/{TAG}"
            )
            assert anonymous.status_code == 401
            assert anonymous.headers["www-authenticate"].startswith("Bearer ")

            manifest = await upstream.get_manifest(REPOSITORY, TAG)
            assert manifest.body == IMAGE.manifest
            head = await upstream.head_manifest(REPOSITORY, str(IMAGE.manifest_digest))
            assert head.digest == IMAGE.manifest_digest
            assert await read_blob(upstream, REPOSITORY, IMAGE.layer_digest) == IMAGE.layer
            assert await read_blob(upstream, REPOSITORY, IMAGE.layer_digest, 1000) == IMAGE.layer[1000:]
            with pytest.raises(UpstreamNotFound):
                await upstream.get_manifest(REPOSITORY, "missing")
            assert await upstream.get_chunk_map(REPOSITORY, IMAGE.layer_digest, MIN_CHUNK_SIZE) is None

            # One token served all of that.
            assert len(issuer.requests.seen) == 1 == upstream.token_requests
            _, target, headers = issuer.requests.seen[0]
            query = httpx.URL(target).params
            assert query["scope"] == f"repository:{REPOSITORY}:pull"
            assert query["service"] == issuer.service
            assert "authorization" in headers

            # Another repository needs its own scope, hence its own token (fetched before the
            # request this time: the registry's realm is known now).
            assert (await upstream.get_manifest("conformance/second", TAG)).body == IMAGE.manifest
            assert upstream.token_requests == 2
            await upstream.get_manifest(REPOSITORY, TAG)
            assert upstream.token_requests == 2
    finally:
        await upstream.aclose()


async def test_token_auth_refusals(token_registry: TokenRegistry) -> None:
    with trio.fail_after(TIMEOUT):
        for upstream in (token_registry.upstream(password="wrong"), token_registry.upstream(username=None)):
            try:
                with pytest.raises(UpstreamAuthError) as info:
                    await upstream.get_manifest(REPOSITORY, TAG)
                assert "credentials refused" in str(info.value)
                assert "wrong" not in str(info.value)
                with pytest.raises(UpstreamAuthError):
                    await read_blob(upstream, REPOSITORY, IMAGE.layer_digest)
            finally:
                await upstream.aclose()


async def test_registry_rejects_tokens_signed_by_an_untrusted_key(token_registry: TokenRegistry) -> None:
    issuer = token_registry.issuer
    mallory = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    original = issuer.mint
    issuer.mint = functools.partial(original, key=mallory)  # type: ignore[method-assign]
    upstream = token_registry.upstream()
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(UpstreamAuthError) as info:
            await upstream.get_manifest(REPOSITORY, TAG)
        assert info.value.status == 401
        assert upstream.token_requests == 1  # one token, one retry, then give up
    finally:
        await upstream.aclose()


# ---- credentials and redirects ----------------------------------------------------------------


@dataclass
class RedirectSetup:
    registry: ServerInfo
    storage: ServerInfo
    registry_requests: Recorder
    storage_requests: Recorder


async def redirect_setup(nursery: trio.Nursery, scheme: str, storage_challenges: bool = False) -> RedirectSetup:
    """A registry that wants credentials and 307-redirects blob GETs to a storage server on
    another loopback port; both record what they receive."""
    token = "tok-" + secrets.token_hex(16)
    registry_requests, storage_requests = Recorder(), Recorder()
    ports: dict[str, int] = {}

    async def storage(request: Request) -> Response:
        storage_requests.record(request)
        if storage_challenges:
            realm = f"http://127.0.0.1:{ports['storage']}/token"
            return Response(401, [("WWW-Authenticate", f'Bearer realm="{realm}",service="storage"')])
        data = IMAGE.layer
        byte_range = parse_range(request.headers.get("range"), len(data))
        if byte_range is None:
            return Response(200, [("Content-Type", "application/octet-stream")], data)
        return Response(
            206, [("Content-Range", byte_range.content_range(len(data)))], data[byte_range.start : byte_range.end + 1]
        )

    async def registry(request: Request) -> Response:
        registry_requests.record(request)
        if request.path == "/token":
            if not basic_ok(request, "reader", PASSWORD):
                return Response(401)
            return Response(200, [("Content-Type", "application/json")], json.dumps({"token": token}).encode())
        authorized = (
            request.headers.get("authorization") == f"Bearer {token}"
            if scheme == "bearer"
            else basic_ok(request, "reader", PASSWORD)
        )
        if not authorized:
            challenge = (
                f'Bearer realm="http://127.0.0.1:{ports["registry"]}/token",service="registry"'
                if scheme == "bearer"
                else 'Basic realm="registry"'
            )
            return Response(401, [("WWW-Authenticate", challenge)])
        location = f"http://127.0.0.1:{ports['storage']}/storage/{IMAGE.layer_digest}?signature=abc"
        return Response(307, [("Location", location)])

    storage_info = await start_server(nursery, storage)
    registry_info = await start_server(nursery, registry)
    ports.update(storage=storage_info.port, registry=registry_info.port)
    return RedirectSetup(registry_info, storage_info, registry_requests, storage_requests)


@pytest.mark.parametrize("scheme", ["bearer", "basic"])
async def test_authorization_is_not_forwarded_across_a_redirect(nursery: trio.Nursery, scheme: str) -> None:
    with trio.fail_after(TIMEOUT):
        setup = await redirect_setup(nursery, scheme)
        assert setup.registry.port != setup.storage.port
        config = UpstreamConfig(namespace="r.test", url=setup.registry.url, username="reader", password=PASSWORD)
        upstream = HttpUpstream(config, FetchConfig())
        try:
            assert await read_blob(upstream, REPOSITORY, IMAGE.layer_digest) == IMAGE.layer
            assert await read_blob(upstream, REPOSITORY, IMAGE.layer_digest, 4321) == IMAGE.layer[4321:]
        finally:
            await upstream.aclose()
    # The registry got credentials on the blob requests that it redirected ...
    blob_targets = [t for t in setup.registry_requests.with_header("authorization") if "/blobs/" in t]
    assert len(blob_targets) >= 2
    # ... the storage host on another port got the Range header but never the credentials.
    assert len(setup.storage_requests.seen) == 2
    assert setup.storage_requests.with_header("authorization") == []
    assert setup.storage_requests.with_header("range") != []


async def test_challenge_from_a_redirect_target_is_not_answered(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        setup = await redirect_setup(nursery, "bearer", storage_challenges=True)
        config = UpstreamConfig(namespace="r.test", url=setup.registry.url, username="reader", password=PASSWORD)
        upstream = HttpUpstream(config, FetchConfig())
        try:
            with pytest.raises(UpstreamAuthError):
                await read_blob(upstream, REPOSITORY, IMAGE.layer_digest)
        finally:
            await upstream.aclose()
    # The storage server asked for a token from its own realm: it was never called, and it
    # never saw our credentials or the registry's token.
    assert [t for _, t, _ in setup.storage_requests.seen if t.startswith("/token")] == []
    assert setup.storage_requests.with_header("authorization") == []


async def test_https_registry_refuses_a_plain_http_realm() -> None:
    realm_calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.test":
            realm_calls.append(request)
            return httpx.Response(200, json={"token": "t"})
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="http://auth.test/token",service="s"'})

    upstream = mock_upstream(handler, username="reader")
    with trio.fail_after(TIMEOUT), pytest.raises(UpstreamAuthError, match="plain-http token realm"):
        await upstream.get_manifest("app", "v1")
    assert realm_calls == []
    await upstream.aclose()


async def test_token_is_reused_until_it_expires(autojump_clock: trio.testing.MockClock) -> None:
    issued: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            assert request.headers["authorization"].startswith("Basic ")
            assert request.url.params["scope"] == "repository:app:pull"
            issued.append(f"token{len(issued)}")
            return httpx.Response(200, json={"access_token": issued[-1], "expires_in": 120})
        if issued and request.headers.get("authorization") == f"Bearer {issued[-1]}":
            return httpx.Response(404)
        return httpx.Response(
            401,
            headers={
                "WWW-Authenticate": 'Bearer realm="https://registry.test/token",service="s",scope="repository:app:pull"'
            },
        )

    upstream = mock_upstream(handler, username="reader")
    for _ in range(3):
        with pytest.raises(UpstreamNotFound):
            await upstream.get_manifest("app", "v1")
    assert issued == ["token0"]
    await trio.sleep(119)  # within the 10 s margin before expiry: a fresh token is fetched
    with pytest.raises(UpstreamNotFound):
        await upstream.get_manifest("app", "v1")
    assert issued == ["token0", "token1"]
    await upstream.aclose()


async def test_concurrent_requests_share_one_token() -> None:
    issued: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            await trio.sleep(0.05)  # slow token server: every request is waiting for it
            issued.append("t")
            return httpx.Response(200, json={"token": "t"})
        if request.headers.get("authorization") == "Bearer t":
            return httpx.Response(404)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://registry.test/token"'})

    upstream = mock_upstream(handler, username="reader")

    async def pull() -> None:
        with pytest.raises(UpstreamNotFound):
            await upstream.get_manifest("app", "v1")

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(pull)
    assert issued == ["t"]
    await upstream.aclose()


async def test_secrets_stay_out_of_logs_and_reprs(caplog: pytest.LogCaptureFixture) -> None:
    token = "sekrit-token-" + secrets.token_hex(8)

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            return httpx.Response(200, json={"token": token})
        if request.headers.get("authorization") == f"Bearer {token}":
            return httpx.Response(403)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://registry.test/token"'})

    caplog.set_level(logging.DEBUG)
    upstream = mock_upstream(handler, username="reader")
    with pytest.raises(UpstreamAuthError) as info:
        await upstream.get_manifest("app", "v1")
    for text in (caplog.text, str(info.value), repr(upstream), repr(upstream._auth.__dict__)):
        assert PASSWORD not in text
    assert token not in caplog.text and token not in str(info.value)
    await upstream.aclose()


def test_challenge_parsing() -> None:
    [bearer] = _parse_challenges(
        [
            'Bearer realm="https://auth.example/token",service="registry.example",'
            'scope="repository:a/b:pull,push",error="insufficient_scope"'
        ]
    )
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
        "error": "insufficient_scope",
    }
    basic, other = _parse_challenges(['Basic realm="a \\"quoted\\" realm", Newauth realm=x'])
    assert (basic.scheme, basic.params) == ("basic", {"realm": 'a "quoted" realm'})
    assert (other.scheme, other.params) == ("newauth", {"realm": "x"})
    assert _parse_challenges([""]) == []


# ---- hostile or broken responses --------------------------------------------------------------


MANIFEST = IMAGE.manifest
MANIFEST_DIGEST = IMAGE.manifest_digest


def manifest_handler(**overrides: Any) -> MockHandler:
    async def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Content-Type": mediatypes.OCI_MANIFEST, "Docker-Content-Digest": str(MANIFEST_DIGEST)}
        headers.update(overrides.get("headers", {}))
        headers = {k: v for k, v in headers.items() if v is not None}
        body = overrides.get("body", MANIFEST)
        if request.method == "HEAD":
            return httpx.Response(200, headers={**headers, "Content-Length": str(len(body))})
        return httpx.Response(200, headers=headers, content=body)

    return handler


async def test_manifest_too_large_is_refused_without_reading_it_all() -> None:
    sent = []

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(64):
            sent.append(1)
            yield b" " * (256 * 1024)

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/declared"):
            return httpx.Response(200, headers={"Content-Length": str(MAX_MANIFEST_SIZE + 1)}, content=endless())
        return httpx.Response(200, content=endless())  # no length: streamed until the cap

    upstream = mock_upstream(handler)
    with pytest.raises(UpstreamError, match="larger than"):
        await upstream.get_manifest("app", "declared")
    assert sent == []
    with pytest.raises(UpstreamError, match="larger than"):
        await upstream.get_manifest("app", "streamed")
    assert len(sent) <= MAX_MANIFEST_SIZE // (256 * 1024) + 2
    await upstream.aclose()


async def test_manifest_digest_checks() -> None:
    wrong = str(digest_of(b"something else"))
    upstream = mock_upstream(manifest_handler(headers={"Docker-Content-Digest": wrong}))
    with pytest.raises(VerificationError):
        await upstream.get_manifest("app", "v1")
    with pytest.raises(VerificationError):  # HEAD trusts the header, but not against a digest reference
        await upstream.head_manifest("app", str(MANIFEST_DIGEST))
    await upstream.aclose()

    upstream = mock_upstream(manifest_handler(headers={"Docker-Content-Digest": None}))
    with pytest.raises(VerificationError):  # the body must hash to the digest that was asked for
        await upstream.get_manifest("app", wrong)
    result = await upstream.get_manifest("app", "v1")  # no header: computed
    assert result.digest == MANIFEST_DIGEST
    await upstream.aclose()


async def test_head_without_digest_header_falls_back_to_get() -> None:
    methods = []
    inner = manifest_handler(headers={"Docker-Content-Digest": None})

    async def handler(request: httpx.Request) -> httpx.Response:
        methods.append(request.method)
        assert request.headers["accept"] == mediatypes.MANIFEST_ACCEPT
        return await inner(request)

    upstream = mock_upstream(handler)
    result = await upstream.head_manifest("app", "v1")
    assert (result.digest, result.size, result.body, result.media_type) == (
        MANIFEST_DIGEST,
        len(MANIFEST),
        None,
        mediatypes.OCI_MANIFEST,
    )
    assert methods == ["HEAD", "GET"]
    await upstream.aclose()


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("application/json", MANIFEST, mediatypes.OCI_MANIFEST),
        (None, MANIFEST, mediatypes.OCI_MANIFEST),
        (f"{mediatypes.OCI_MANIFEST}; charset=utf-8", MANIFEST, mediatypes.OCI_MANIFEST),
        ("application/json", b'{"schemaVersion":2,"manifests":[]}', mediatypes.OCI_INDEX),
        (mediatypes.DOCKER_MANIFEST, b'{"schemaVersion":2}', mediatypes.DOCKER_MANIFEST),
    ],
)
async def test_manifest_media_type(content_type: str | None, body: bytes, expected: str) -> None:
    upstream = mock_upstream(
        manifest_handler(body=body, headers={"Content-Type": content_type, "Docker-Content-Digest": None})
    )
    assert (await upstream.get_manifest("app", "v1")).media_type == expected
    await upstream.aclose()


async def test_manifest_media_type_confusion_is_refused() -> None:
    upstream = mock_upstream(manifest_handler(headers={"Content-Type": mediatypes.OCI_INDEX}))
    with pytest.raises(VerificationError, match="contradicts"):
        await upstream.get_manifest("app", "v1")
    await upstream.aclose()


async def streamed(data: bytes, piece: int = 10_000) -> AsyncIterator[bytes]:
    """A body that httpx has to stream (``content=bytes`` would be read in advance)."""
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


def blob_handler(status: int, headers: dict[str, str], body: bytes) -> MockHandler:
    async def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["accept-encoding"] == "identity"
        return httpx.Response(status, headers=headers, content=streamed(body))

    return handler


async def test_range_ignored_by_the_server_is_skipped_transparently() -> None:
    data = IMAGE.layer
    upstream = mock_upstream(blob_handler(200, {"Content-Length": str(len(data))}, data))
    async with upstream.open_blob("app", IMAGE.layer_digest, 70_000) as response:
        assert (response.total_size, response.offset) == (len(data), 70_000)
        assert response.range_ignored  # a capped range holder then asks for no more pieces
        assert b"".join([p async for p in response.aiter_bytes()]) == data[70_000:]
    # Each piece dropped is reported (and awaited: a cap pays for it) before the next is read.
    events: list[tuple[str, int]] = []

    async def dropped(length: int) -> None:
        await trio.lowlevel.checkpoint()
        events.append(("dropped", length))

    async with upstream.open_blob("app", IMAGE.layer_digest, 70_000) as response:
        async for piece in response.aiter_bytes(dropped):
            events.append(("kept", len(piece)))
    assert sum(n for kind, n in events if kind == "dropped") == 70_000
    assert sum(n for kind, n in events if kind == "kept") == len(data) - 70_000
    assert events[:7] == [("dropped", 10_000)] * 7  # the body comes in pieces of 10,000 (``streamed``)
    await upstream.aclose()


@pytest.mark.parametrize("honours_range", [True, False])
async def test_the_fetchers_range_says_whether_the_upstream_ignored_the_range(
        honours_range: bool, caplog: pytest.LogCaptureFixture) -> None:
    """``Fetcher._upstream_range`` (a range holder's fetch) accepts only the bytes asked for either
    way, and returns True when the upstream answered with the whole blob: a capped range holder
    then asks for the rest of its run at once instead of piece by piece (p2pd.swarm.engine)."""
    data = IMAGE.layer

    async def handler(request: httpx.Request) -> httpx.Response:
        byte_range = parse_range(request.headers.get("range"), len(data)) if honours_range else None
        if byte_range is None:
            return httpx.Response(200, headers={"Content-Length": str(len(data))}, content=streamed(data))
        return httpx.Response(206, headers={"Content-Range": byte_range.content_range(len(data))},
                              content=streamed(data[byte_range.start : byte_range.end + 1]))

    upstream = mock_upstream(handler)
    metrics = AgentMetrics()
    fetcher = Fetcher(AgentConfig(), None, None, metrics)  # type: ignore[arg-type]  # the range path uses neither
    accepted = bytearray()
    dropped: list[int] = []

    async def accept(piece: bytes) -> None:
        accepted.extend(piece)

    async def drop(length: int) -> None:
        dropped.append(length)

    ignored = await fetcher._upstream_range(upstream, "app", IMAGE.layer_digest, 70_000, 84_999, accept, dropped=drop)
    assert (ignored, bytes(accepted)) == (not honours_range, data[70_000:85_000])
    # What a capped range holder pays for besides: the blob's start, and the rest of the last
    # piece read (the body comes in pieces of 10,000: 80,000..89,999 holds the range's end).
    assert dropped == ([] if honours_range else [10_000] * 7 + [5_000])
    # Operators see it: a counter, and a warning once per upstream (docs/operations.md).
    await fetcher._upstream_range(upstream, "app", IMAGE.layer_digest, 70_000, 84_999, accept)
    assert metrics.upstream_range_ignored._value.get() == (0 if honours_range else 2)
    warnings = [r for r in caplog.records if "ignores Range" in r.getMessage()]
    assert len(warnings) == (0 if honours_range else 1)
    await upstream.aclose()


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (206, {"Content-Range": "bytes 0-99/1000"}),  # not the start that was asked for
        (206, {"Content-Range": "bytes 100-199/*"}),  # total unknown
        (206, {}),  # no Content-Range
        (206, {"Content-Range": "bytes 100-1999/1000"}),  # past the end
        (206, {"Content-Range": "bytes 100-199/1000", "Content-Length": "5"}),
        (200, {}),  # no length: the total size is unknown
    ],
)
async def test_bad_blob_responses_are_errors(status: int, headers: dict[str, str]) -> None:
    upstream = mock_upstream(blob_handler(status, headers, b"x" * 100))
    with pytest.raises(UpstreamError) as info:
        await read_blob(upstream, "app", IMAGE.layer_digest, 100)
    assert not isinstance(info.value, UpstreamUnavailable)
    await upstream.aclose()


async def test_blob_bytes_are_not_decoded() -> None:
    data = b"\x1f\x8b\x08 pretend gzip layer"  # a layer's digest covers its encoded bytes
    upstream = mock_upstream(blob_handler(200, {"Content-Length": str(len(data)), "Content-Encoding": "gzip"}, data))
    assert await read_blob(upstream, "app", digest_of(data)) == data
    await upstream.aclose()


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (404, UpstreamNotFound),
        (401, UpstreamAuthError),
        (403, UpstreamAuthError),
        (429, UpstreamUnavailable),
        (500, UpstreamUnavailable),
        (503, UpstreamUnavailable),
        (400, UpstreamError),
        (416, UpstreamError),
        (304, UpstreamError),
    ],
)
async def test_status_mapping(status: int, error: type[UpstreamError]) -> None:
    body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]}).encode()
    upstream = mock_upstream(blob_handler(status, {}, body))
    for call in (upstream.get_manifest("app", "v1"), read_blob(upstream, "app", IMAGE.layer_digest)):
        with pytest.raises(error) as info:
            await call
        assert type(info.value) is error
        assert info.value.status == status
    await upstream.aclose()


async def test_chunk_map_support_is_remembered(autojump_clock: trio.testing.MockClock) -> None:
    data = IMAGE.layer
    hasher = ChunkHasher(MIN_CHUNK_SIZE)
    hasher.update(data)
    encoded = hasher.finish(IMAGE.layer_digest).encode()
    answer: dict[str, Any] = {"status": 404, "json": None}
    calls = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url)
        assert request.url.path.startswith("/v2/app/blobs/sha256:") and request.url.path.endswith("/chunks")
        assert request.url.params["largest"] == str(MIN_CHUNK_SIZE) and "size" not in request.url.params
        if answer["status"] == 200:
            return httpx.Response(200, headers={"Content-Type": CHUNK_MAP_MEDIA_TYPE}, content=answer["body"])
        return httpx.Response(answer["status"], json=answer["json"])

    upstream = mock_upstream(handler)
    # A 404 for the blob (OCI BLOB_UNKNOWN) says nothing about the endpoint: ask again next time.
    answer.update(json={"errors": [{"code": "BLOB_UNKNOWN", "message": "unknown"}]})
    assert await upstream.get_chunk_map("app", IMAGE.layer_digest, MIN_CHUNK_SIZE) is None
    assert await upstream.get_chunk_map("app", IMAGE.layer_digest, MIN_CHUNK_SIZE) is None
    assert len(calls) == 2
    # A bare 404 (no such route) means "no chunk maps here": not asked again for a while.
    answer.update(json=None)
    assert await upstream.get_chunk_map("app", IMAGE.layer_digest, MIN_CHUNK_SIZE) is None
    assert await upstream.get_chunk_map("app", IMAGE.layer_digest, MIN_CHUNK_SIZE) is None
    assert len(calls) == 3
    await trio.sleep(CHUNK_MAP_UNSUPPORTED_TTL + 1)
    answer.update(status=200, body=encoded)
    chunk_map = await upstream.get_chunk_map("app", IMAGE.layer_digest, MIN_CHUNK_SIZE)
    assert chunk_map is not None and chunk_map.size == len(data)
    assert len(calls) == 4
    # A map for another blob, or garbage, is the upstream misbehaving.
    with pytest.raises(VerificationError):
        await upstream.get_chunk_map("app", digest_of(b"other"), MIN_CHUNK_SIZE)
    answer.update(body=b"\xc1 not msgpack")
    with pytest.raises(VerificationError):
        await upstream.get_chunk_map("app", IMAGE.layer_digest, MIN_CHUNK_SIZE)
    with pytest.raises(ValueError):
        await upstream.get_chunk_map("app", IMAGE.layer_digest, 1000)
    # Chunks larger than asked for would not fit the size the other nodes use.
    bigger = ChunkHasher(2 * MIN_CHUNK_SIZE)
    bigger.update(data)
    answer.update(body=bigger.finish(IMAGE.layer_digest).encode())
    with pytest.raises(VerificationError, match="at most"):
        await upstream.get_chunk_map("app", IMAGE.layer_digest, MIN_CHUNK_SIZE)
    await upstream.aclose()


def test_chunk_map_media_type_matches_the_seed() -> None:
    assert CHUNK_MAP_MEDIA_TYPE == seed.registry.CHUNK_MAP_MEDIA_TYPE


async def test_unreachable_upstream_is_unavailable() -> None:
    upstream = HttpUpstream(
        UpstreamConfig(namespace="closed", url=f"http://127.0.0.1:{free_port()}"), FetchConfig(connect_timeout=2.0)
    )
    with trio.fail_after(TIMEOUT):
        with pytest.raises(UpstreamUnavailable):
            await upstream.get_manifest("app", "v1")
        with pytest.raises(UpstreamUnavailable):
            await read_blob(upstream, "app", IMAGE.layer_digest)
        with pytest.raises(UpstreamUnavailable):
            await upstream.get_chunk_map("app", IMAGE.layer_digest, MIN_CHUNK_SIZE)
    await upstream.aclose()


async def raw_server(nursery: trio.Nursery, respond: Callable[[trio.SocketStream], Awaitable[None]]) -> int:
    async def handler(stream: trio.SocketStream) -> None:
        try:
            await stream.receive_some(65536)
            await respond(stream)
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def test_stalled_and_truncated_responses_are_unavailable(nursery: trio.Nursery) -> None:
    async def stall(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async def truncate(stream: trio.SocketStream) -> None:
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)

    fetch = FetchConfig(connect_timeout=2.0, read_timeout=0.3)
    with trio.fail_after(TIMEOUT):
        stalled = HttpUpstream(UpstreamConfig("s", f"http://127.0.0.1:{await raw_server(nursery, stall)}"), fetch)
        with pytest.raises(UpstreamUnavailable, match="timed out"):
            await stalled.get_manifest("app", "v1")
        await stalled.aclose()

        truncated = HttpUpstream(UpstreamConfig("t", f"http://127.0.0.1:{await raw_server(nursery, truncate)}"), fetch)
        received = []
        with pytest.raises(UpstreamUnavailable):
            async with truncated.open_blob("app", IMAGE.layer_digest) as response:
                assert response.total_size == 1000
                async for piece in response.aiter_bytes():
                    received.append(piece)
        assert b"".join(received) == b"x" * 100
        await truncated.aclose()


async def test_too_many_redirects() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(307, headers={"Location": str(request.url.copy_with(path=request.url.path + "x"))})

    upstream = mock_upstream(handler)
    with pytest.raises(UpstreamError, match="redirects"):
        await upstream.get_manifest("app", "v1")
    await upstream.aclose()


def test_bad_upstream_configs_are_config_errors(tmp_path: Path) -> None:
    config = UpstreamConfig("x", "https://x.test", username="u", password_file=tmp_path / "missing")
    with pytest.raises(ConfigError):
        HttpUpstream(config, FetchConfig())
    with pytest.raises(ConfigError) as info:
        HttpUpstream(UpstreamConfig("x", "https://u:hunter2@x.test"), FetchConfig())
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError):
        HttpUpstream(UpstreamConfig("x", "ftp://x.test"), FetchConfig())


# ---- namespace mapping ------------------------------------------------------------------------


@pytest.fixture
async def pool_factory() -> AsyncIterator[Callable[..., UpstreamPool]]:
    pools: list[UpstreamPool] = []

    def make(**kwargs: Any) -> UpstreamPool:
        pools.append(UpstreamPool(AgentConfig(**kwargs)))
        return pools[-1]

    yield make
    for pool in pools:
        await pool.aclose()


def url_of(upstream: object) -> str:
    assert isinstance(upstream, HttpUpstream)
    return upstream.url


async def test_docker_hub_mapping(pool_factory: Callable[..., UpstreamPool]) -> None:
    pool = pool_factory(allow_registries=("docker.io",))
    hub, repository = pool.resolve("docker.io", "busybox")
    assert (url_of(hub), repository) == (DOCKER_HUB_URL, "library/busybox")
    assert pool.resolve("index.docker.io", "library/busybox") == (hub, "library/busybox")
    assert pool.resolve("Docker.IO", "grafana/grafana") == (hub, "grafana/grafana")
    # The library/ prefix belongs to the namespace, whichever URL serves it.
    explicit = pool_factory(upstreams=(UpstreamConfig("docker.io", "http://127.0.0.1:1"),))
    upstream, repository = explicit.resolve("docker.io", "alpine")
    assert (url_of(upstream), repository, upstream.namespace) == ("http://127.0.0.1:1", "library/alpine", "docker.io")


async def test_configured_upstream_clients_are_made_before_the_first_pull(
        pool_factory: Callable[..., UpstreamPool]) -> None:
    """Building a client reads the system CA bundle (tens of ms of CPU): the agent does it at
    startup, not when every node of a cluster pulls at once. The first request uses that client."""
    pool = pool_factory(upstreams=(UpstreamConfig("reg.test", "http://127.0.0.1:1"),),
                        default_upstream="https://other.test")
    assert pool.prepare() == 2
    made = dict(pool._clients)
    assert pool.resolve("reg.test", "app")[0] in made.values()
    assert pool.resolve(None, "app")[0] in made.values()
    assert pool._clients == made  # nothing new at the first request
    assert pool_factory().prepare() == 0  # nothing configured: clients come with the requests


async def test_namespace_mapping_order(pool_factory: Callable[..., UpstreamPool]) -> None:
    plain = pool_factory(allow_registries=("ghcr.io",))
    ghcr, repository = plain.resolve("ghcr.io", "org/app")
    assert (url_of(ghcr), repository, ghcr.namespace) == ("https://ghcr.io", "org/app", "ghcr.io")
    assert plain.resolve("ghcr.io", "org/other")[0] is ghcr  # one client per upstream
    for ns in ("quay.io", "127.0.0.1:5000", "[::1]:5000"):  # no open proxy (tests/test_p2pd_egress.py)
        with pytest.raises(EgressRefused):
            plain.resolve(ns, "app")
    with pytest.raises(OCIError) as info:
        plain.resolve(None, "app")
    assert info.value.code == "NAME_UNKNOWN"

    configured = pool_factory(
        upstreams=(UpstreamConfig("seed.local:5000", "http://10.0.0.5:5000"),),
        default_upstream="http://seed.example:5000",
    )
    seed_upstream, _ = configured.resolve("seed.local:5000", "team/app")
    assert (url_of(seed_upstream), seed_upstream.namespace) == ("http://10.0.0.5:5000", "seed.local:5000")
    default, repository = configured.resolve("quay.io", "team/app")
    assert (url_of(default), repository) == ("http://seed.example:5000", "team/app")
    assert configured.resolve(None, "team/app")[0] is default
    assert configured.resolve("docker.io", "busybox") == (default, "library/busybox")


@pytest.mark.parametrize(
    "ns",
    [
        "",
        "evil.test/x",
        "user@host",
        "user:pw@host",
        "host?x=1",
        "host#f",
        "a b",
        "host:",
        "host:99999",
        "host:0",
        "-bad.test",
        "bad-.test",
        "a..b",
        "[zz]:5000",
        "[::1",
        "host:5000/v2",
        "http://host",
        "%2e%2e",
        "host\r\nx",
        "a" * 64 + ".test",
    ],
)
async def test_invalid_namespaces_are_refused(ns: str, pool_factory: Callable[..., UpstreamPool]) -> None:
    with pytest.raises(OCIError) as info:
        validate_namespace(ns)
    assert info.value.code == "NAME_INVALID"
    with pytest.raises(OCIError):
        pool_factory(default_upstream="http://seed.example:5000").resolve(ns, "app")


def test_valid_namespaces() -> None:
    for ns in ("docker.io", "registry-1.docker.io:443", "localhost:5000", "10.0.0.5", "[fd00::1]:5000", "seed"):
        assert validate_namespace(ns) == ns.lower()
    assert validate_namespace("GHCR.io") == "ghcr.io"


async def test_pool_aclose_closes_every_client(pool_factory: Callable[..., UpstreamPool]) -> None:
    pool = pool_factory(allow_registries=("a.test", "b.test", "docker.io"))
    clients = [pool.resolve(ns, "app")[0] for ns in ("a.test", "b.test", "docker.io")]
    await pool.aclose()
    for client in clients:
        assert isinstance(client, HttpUpstream)
        assert client._client.is_closed


async def test_peer_grant_support_and_keys_are_remembered(autojump_clock: trio.testing.MockClock) -> None:
    """A registry without peer grants is not asked before every swarm download; the registry's
    keys are fetched once and again only after GRANT_KEYS_TTL or for a grant signed by a new key."""
    calls: list[str] = []
    answer: dict[str, Any] = {"status": 404, "json": None, "kid": "k1"}
    signing = ec.generate_private_key(ec.SECP256R1())

    def jwks(kid: str) -> dict[str, Any]:
        return {"keys": [{**jwk_of(signing.public_key()), "kid": kid, "use": "sig", "alg": "ES256"}]}

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/token/keys":
            return httpx.Response(200, json=jwks(answer["kid"]))
        assert request.url.path.endswith("/grant") and request.url.params["node"] == "n1"
        if answer["status"] == 200:
            grant = jwt.encode({"aud": "p2pd-peers"}, signing, algorithm="ES256", headers={"kid": answer["kid"]})
            return httpx.Response(200, json={"grant": grant, "jwks": "/token/keys"})
        return httpx.Response(answer["status"], json=answer["json"])

    upstream = mock_upstream(handler)
    # BLOB_UNKNOWN is about the blob: asked again next time. A bare 404: no grants here for a while.
    answer.update(json={"errors": [{"code": "BLOB_UNKNOWN", "message": "unknown"}]})
    for _ in range(2):
        assert await upstream.get_peer_grant("app", IMAGE.layer_digest, "n1") is None
    answer.update(json=None)
    for _ in range(3):
        assert await upstream.get_peer_grant("app", IMAGE.layer_digest, "n1") is None
    assert len(calls) == 3
    await trio.sleep(CHUNK_MAP_UNSUPPORTED_TTL + 1)
    answer.update(status=200)
    first = await upstream.get_peer_grant("app", IMAGE.layer_digest, "n1")
    second = await upstream.get_peer_grant("app", IMAGE.layer_digest, "n1")
    assert first is not None and second is not None and first[1] == second[1]
    assert calls[3:] == [calls[3], "/token/keys", calls[3]]  # keys fetched once for two grants
    answer.update(kid="k2")  # the registry rotated its signing key
    rotated = await upstream.get_peer_grant("app", IMAGE.layer_digest, "n1")
    assert rotated is not None and b'"k2"' in rotated[1] and calls[-1] == "/token/keys"
    await trio.sleep(GRANT_KEYS_TTL + 1)
    await upstream.get_peer_grant("app", IMAGE.layer_digest, "n1")
    assert calls[-1] == "/token/keys"
    await upstream.aclose()


async def test_a_connection_attempt_that_times_out_is_made_again_and_a_refused_one_is_not() -> None:
    """A thin uplink full of layer bytes drops SYNs: the tag HEAD of a node that joins late timed
    out connecting (the agent then answered 404 and the client failed on the same link)."""
    calls: list[str] = []

    async def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) < 3:
            raise httpx.ConnectTimeout("SYN lost", request=request)
        return httpx.Response(200, headers={"Docker-Content-Digest": str(digest_of(b"{}")),
                                            "Content-Type": "application/vnd.oci.image.manifest.v1+json",
                                            "Content-Length": "2"})

    upstream = mock_upstream(flaky)
    with trio.fail_after(TIMEOUT):
        result = await upstream.head_manifest("lab/app", "v1")
    assert result.digest == digest_of(b"{}") and calls == ["HEAD"] * 3

    calls.clear()

    async def never(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ConnectTimeout("SYN lost", request=request)

    with pytest.raises(UpstreamUnavailable), trio.fail_after(TIMEOUT):
        await mock_upstream(never).head_manifest("lab/app", "v1")
    assert len(calls) == 3  # bounded

    calls.clear()

    async def refused(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(UpstreamUnavailable), trio.fail_after(TIMEOUT):
        await mock_upstream(refused).head_manifest("lab/app", "v1")
    assert calls == ["HEAD"]
