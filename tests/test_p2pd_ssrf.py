"""No open proxy: a real agent refuses what the egress policy refuses, fast and without a connection.

Each test runs an in-process agent whose only configured upstream is a small registry on
127.0.0.1, plus TCP listeners on 127.0.0.1 and ::1 that count every connection they accept:
a refused ``ns=`` value or redirect target that points at them must leave them at zero.
Names under ``ssrf.test`` resolve through a ``StaticResolver`` (never the system's), so
"a DNS name that resolves to loopback" is tested without any DNS traffic.
"""

from __future__ import annotations

import base64
import datetime
import hmac
import json
import re
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pd.config import AgentConfig, load_config
from p2pd.daemon import Agent, serve_agent
from p2pd.egress import RefusalReason, StaticResolver
from p2pd.httpd import Request, Response, ServerInfo, serve_http
from p2pd.mirror_prefix import PREFIX_MARKER, prefix_path
from p2pd.oci import mediatypes
from tests.harness.net import assert_loopback
from tests.p2pd_support import NS, agent_metric, sha256

R = RefusalReason
TIMEOUT = 20.0  # seconds per test
FAST = 2.0  # seconds: a refusal is answered well before fetch.first_byte_timeout (5 s)
BLOB = b"a layer that must only come from where the operator said\n" * 64
BLOB_DIGEST = sha256(BLOB)
MANIFEST = json.dumps({
    "schemaVersion": 2,
    "mediaType": mediatypes.OCI_MANIFEST,
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": BLOB_DIGEST, "size": len(BLOB)},
    "layers": [],
}).encode()
MANIFEST_DIGEST = sha256(MANIFEST)
USERNAME, PASSWORD = "robot", "correct horse battery staple"
STORAGE_NAME = "storage.ssrf.test"
RESOLVER = StaticResolver({
    "loopback.ssrf.test": ["127.0.0.1"],
    "loopback6.ssrf.test": ["::1"],
    "metadata.ssrf.test": ["169.254.169.254"],
    STORAGE_NAME: ["127.0.0.1"],
})


# ---- servers ------------------------------------------------------------------------------


@dataclass
class CountingListener:
    """Accepts TCP connections on one loopback address and counts them (then hangs up)."""

    host: str
    port: int = 0
    accepted: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[CountingListener] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]

        async def count(stream: trio.SocketStream) -> None:
            self.accepted += 1
            await trio.aclose_forcefully(stream)

        task_status.started(self)
        await trio.serve_listeners(count, listeners)


@dataclass
class Listeners:
    v4: CountingListener
    v6: CountingListener

    @property
    def accepted(self) -> int:
        return self.v4.accepted + self.v6.accepted

    def fill(self, template: str) -> str:
        return template.format(v4=self.v4.port, v6=self.v6.port)


@pytest.fixture
async def listeners(nursery: trio.Nursery) -> Listeners:
    v4 = await nursery.start(CountingListener("127.0.0.1").serve)
    v6 = await nursery.start(CountingListener("::1").serve)
    return Listeners(v4, v6)


@dataclass
class FakeRegistry:
    """The configured upstream: serves one blob and one manifest, redirects some repositories.

    Args:
        redirects: repository → ``Location`` for its blobs and manifests.
        basic_auth: require Basic credentials (401 challenge first), like a private registry.
    """

    redirects: dict[str, str] = field(default_factory=dict)
    basic_auth: bool = False
    seen: list[tuple[str, str, bool]] = field(default_factory=list)  # (method, path, had Authorization)
    url: str = ""

    async def handle(self, request: Request) -> Response:
        authorization = request.headers.get("authorization") or ""
        self.seen.append((request.method, request.path, bool(authorization)))
        expected = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
        if self.basic_auth and not hmac.compare_digest(authorization.encode(), expected.encode()):
            return Response(401, [("WWW-Authenticate", 'Basic realm="fake"')])
        match = re.fullmatch(r"/v2/(?P<name>.+)/(?P<kind>blobs|manifests)/(?P<ref>[^/]+)(?P<chunks>/chunks)?",
                             request.path)
        if match is None or match["chunks"]:
            return Response(404)
        if match["name"] in self.redirects:
            return Response(307, [("Location", self.redirects[match["name"]])])
        if match["kind"] == "blobs" and match["ref"] == BLOB_DIGEST:
            return Response(200, [("Content-Type", "application/octet-stream"),
                                  ("Docker-Content-Digest", BLOB_DIGEST)], BLOB)
        if match["kind"] == "manifests" and match["ref"] in ("v1", MANIFEST_DIGEST):
            return Response(200, [("Content-Type", mediatypes.OCI_MANIFEST),
                                  ("Docker-Content-Digest", MANIFEST_DIGEST)], MANIFEST)
        return Response(404)

    async def serve(self, *, task_status: trio.TaskStatus[FakeRegistry] = trio.TASK_STATUS_IGNORED) -> None:
        async def run(*, task_status: trio.TaskStatus[ServerInfo]) -> None:
            await serve_http(self.handle, "127.0.0.1", 0, task_status=task_status)

        async with trio.open_nursery() as nursery:
            info: ServerInfo = await nursery.start(run)
            assert_loopback(info.url)
            self.url = info.url
            task_status.started(self)


def agent_config(tmp_path: Path, registry: FakeRegistry, *, allow_registries: tuple[str, ...] = (),
                 allow_networks: tuple[str, ...] = (), ca_file: Path | None = None) -> AgentConfig:
    """An agent on a free port whose only upstream entry maps ``NS`` to ``registry``."""
    lines = ["[[upstream]]", f'namespace = "{NS}"', f'url = "{registry.url}"']
    if registry.basic_auth:
        # anonymous_pull: the test's client has no credentials; the operator opens the namespace.
        lines += [f'username = "{USERNAME}"', f'password = "{PASSWORD}"', "anonymous_pull = true"]
    if ca_file is not None:
        lines.append(f'ca_file = "{ca_file}"')
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path, listen="127.0.0.1:0", data=tmp_path / "agent", allow_registries=list(allow_registries),
                       allow_networks=list(allow_networks))


async def start_agent(nursery: trio.Nursery, config: AgentConfig) -> Agent:
    return await nursery.start(partial(serve_agent, config, resolver=RESOLVER))


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(15.0, connect=5.0)) as client:
        yield client


async def timed(http: httpx.AsyncClient, method: str, url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await http.request(method, url)
    return response, time.monotonic() - started


def error_code(response: httpx.Response) -> str | None:
    if response.request.method == "HEAD":
        return None
    code = response.json()["errors"][0]["code"]
    assert isinstance(code, str)
    return code


def refused(agent: Agent, reason: RefusalReason) -> float:
    return agent_metric(agent, "p2pd_egress_refused_total", reason=reason.value)


# ---- unconfigured ns values ---------------------------------------------------------------

# (ns as sent in the query string, expected outcome, reason counted). Outcomes: "name" — the
# front refuses the namespace (404 NAME_UNKNOWN); "address" — the namespace is admitted by a
# pattern but its address is refused at connection time (404 MANIFEST_UNKNOWN/BLOB_UNKNOWN);
# "invalid" — malformed (400 NAME_INVALID). Never a connection.
NS_MATRIX = [
    ("127.0.0.1:{v4}", "name", R.IP_LITERAL),
    ("169.254.169.254", "name", R.IP_LITERAL),
    ("169.254.169.254:80", "name", R.IP_LITERAL),
    ("10.0.0.7:6000", "name", R.IP_LITERAL),
    ("[::1]:{v6}", "name", R.IP_LITERAL),
    ("%5B::1%5D:{v6}", "name", R.IP_LITERAL),
    ("[::ffff:127.0.0.1]:{v4}", "name", R.IP_LITERAL),
    ("[0:0:0:0:0:0:0:1]:{v6}", "name", R.IP_LITERAL),
    ("[fd00:ec2::254]", "name", R.IP_LITERAL),
    ("2130706433:{v4}", "name", R.NUMERIC_HOST),
    ("0x7f000001:{v4}", "name", R.NUMERIC_HOST),
    ("0177.0.0.1:{v4}", "name", R.NUMERIC_HOST),
    ("127.1:{v4}", "name", R.NUMERIC_HOST),
    ("%31%32%37.0.0.1:{v4}", "name", R.IP_LITERAL),  # the query decoding makes it 127.0.0.1
    ("localhost:{v4}", "name", R.SPECIAL_NAME),
    ("localhost.:{v4}", "name", R.SPECIAL_NAME),
    ("LocalHost:{v4}", "name", R.SPECIAL_NAME),
    ("ip6-localhost:{v6}", "name", R.SINGLE_LABEL),
    ("metadata.google.internal", "name", R.SPECIAL_NAME),
    ("unlisted.example:{v4}", "name", R.NOT_CONFIGURED),
    ("loopback.ssrf.test:{v4}", "address", R.LOOPBACK),  # admitted by *.ssrf.test:PORT, resolves to 127.0.0.1
    ("loopback6.ssrf.test:{v6}", "address", R.LOOPBACK),
    ("metadata.ssrf.test", "address", R.METADATA),
    ("user@127.0.0.1:{v4}", "invalid", None),
    ("user%40127.0.0.1:{v4}", "invalid", None),
    ("%2531%2532%2537.0.0.1:{v4}", "invalid", None),  # decoded once: a percent sign is left
    ("127.0.0.1:{v4}/v2", "invalid", None),
    ("127.0.0.1:{v4}%23x", "invalid", None),
]


@pytest.mark.parametrize(("template", "outcome", "reason"), NS_MATRIX, ids=[case[0] for case in NS_MATRIX])
async def test_unconfigured_ns_is_refused_without_a_connection(
    tmp_path: Path, nursery: trio.Nursery, listeners: Listeners, http: httpx.AsyncClient,
    template: str, outcome: str, reason: RefusalReason | None,
) -> None:
    registry = await nursery.start(FakeRegistry().serve)
    patterns = ("*.ssrf.test", listeners.fill("*.ssrf.test:{v4}"), listeners.fill("*.ssrf.test:{v6}"))
    agent = await start_agent(nursery, agent_config(tmp_path, registry, allow_registries=patterns))
    ns = listeners.fill(template)
    requests = [("HEAD", f"/v2/lab/app/manifests/v1?ns={ns}", "MANIFEST_UNKNOWN"),
                ("GET", f"/v2/lab/app/manifests/{MANIFEST_DIGEST}?ns={ns}", "MANIFEST_UNKNOWN"),
                ("GET", f"/v2/lab/app/blobs/{BLOB_DIGEST}?ns={ns}", "BLOB_UNKNOWN")]
    with trio.fail_after(TIMEOUT):
        for method, target, unknown in requests:
            response, seconds = await timed(http, method, agent.info.url + target)
            assert seconds < FAST, (method, target, seconds)
            if outcome == "invalid":
                assert response.status_code == 400
                assert error_code(response) == ("NAME_INVALID" if method == "GET" else None)
            else:
                assert response.status_code == 404, (method, target, response.text)
                if method == "GET":
                    assert error_code(response) == ("NAME_UNKNOWN" if outcome == "name" else unknown)
    assert listeners.accepted == 0
    assert registry.seen == []  # the configured upstream is not asked either
    assert agent_metric(agent, "p2pd_upstream_fetches_total") == 0 or outcome == "address"
    if reason is not None:
        assert refused(agent, reason) >= 1


# podman and CRI-O name the registry in the path (p2pd.mirror_prefix): the same refusals, the same
# speed, never a connection. (prefix as sent in the path, outcome, reason counted)
PREFIX_MATRIX = [
    ("127.0.0.1__{v4}", "name", R.IP_LITERAL),
    ("169.254.169.254", "name", R.IP_LITERAL),
    ("2130706433__{v4}", "name", R.NUMERIC_HOST),
    ("localhost__{v4}", "name", R.SPECIAL_NAME),
    ("metadata.google.internal", "name", R.SPECIAL_NAME),
    ("ip6-localhost__{v6}", "name", R.SINGLE_LABEL),
    ("unlisted.example__{v4}", "name", R.NOT_CONFIGURED),
    ("loopback.ssrf.test__{v4}", "address", R.LOOPBACK),
    ("metadata.ssrf.test", "address", R.METADATA),
    ("127.0.0.1:{v4}", "invalid", None),
    ("user@127.0.0.1__{v4}", "invalid", None),
    ("Loopback.ssrf.test__{v4}", "invalid", None),
    ("loopback.ssrf.test__99999", "invalid", None),
]


@pytest.mark.parametrize(("template", "outcome", "reason"), PREFIX_MATRIX, ids=[case[0] for case in PREFIX_MATRIX])
async def test_unconfigured_path_prefix_is_refused_without_a_connection(
    tmp_path: Path, nursery: trio.Nursery, listeners: Listeners, http: httpx.AsyncClient,
    template: str, outcome: str, reason: RefusalReason | None,
) -> None:
    registry = await nursery.start(FakeRegistry().serve)
    patterns = ("*.ssrf.test", listeners.fill("*.ssrf.test:{v4}"), listeners.fill("*.ssrf.test:{v6}"))
    agent = await start_agent(nursery, agent_config(tmp_path, registry, allow_registries=patterns))
    prefix = f"{PREFIX_MARKER}/{listeners.fill(template)}"
    requests = [("HEAD", f"/v2/{prefix}/lab/app/manifests/v1", "MANIFEST_UNKNOWN"),
                ("GET", f"/v2/{prefix}/lab/app/manifests/{MANIFEST_DIGEST}", "MANIFEST_UNKNOWN"),
                ("GET", f"/v2/{prefix}/lab/app/blobs/{BLOB_DIGEST}", "BLOB_UNKNOWN")]
    with trio.fail_after(TIMEOUT):
        for method, target, unknown in requests:
            response, seconds = await timed(http, method, agent.info.url + target)
            assert seconds < FAST, (method, target, seconds)
            if outcome == "invalid":
                assert response.status_code == 400
                assert error_code(response) == ("NAME_INVALID" if method == "GET" else None)
            else:
                assert response.status_code == 404, (method, target, response.text)
                if method == "GET":
                    assert error_code(response) == ("NAME_UNKNOWN" if outcome == "name" else unknown)
    assert listeners.accepted == 0
    assert registry.seen == []
    if reason is not None:
        assert refused(agent, reason) >= 1


async def test_configured_path_prefix_reaches_only_its_upstream(
    tmp_path: Path, nursery: trio.Nursery, listeners: Listeners, http: httpx.AsyncClient,
) -> None:
    registry = await nursery.start(FakeRegistry().serve)
    agent = await start_agent(nursery, agent_config(tmp_path, registry))
    base = f"{agent.info.url}/v2/{prefix_path(NS)}/lab/app"
    with trio.fail_after(TIMEOUT):
        blob = await http.get(f"{base}/blobs/{BLOB_DIGEST}")
        assert (blob.status_code, blob.content) == (200, BLOB)
        manifest = await http.get(f"{base}/manifests/v1")
        assert (manifest.status_code, manifest.content) == (200, MANIFEST)
        # The upstream is asked for the repository without the prefix.
        assert {path for _method, path, _auth in registry.seen} >= {f"/v2/lab/app/blobs/{BLOB_DIGEST}",
                                                                    "/v2/lab/app/manifests/v1"}
        # Two names for the upstream (ns= and the path) are refused, whatever they say.
        both = await http.get(f"{base}/blobs/{BLOB_DIGEST}?ns={NS}")
        assert (both.status_code, error_code(both)) == (400, "NAME_INVALID")
        # A prefix with nothing after it names no repository.
        bare = await http.get(f"{agent.info.url}/v2/{prefix_path(NS)}/manifests/v1")
        assert (bare.status_code, error_code(bare)) == (400, "NAME_INVALID")
    assert listeners.accepted == 0


async def test_configured_loopback_upstream_still_works(
    tmp_path: Path, nursery: trio.Nursery, listeners: Listeners, http: httpx.AsyncClient,
) -> None:
    registry = await nursery.start(FakeRegistry().serve)
    agent = await start_agent(nursery, agent_config(tmp_path, registry))
    with trio.fail_after(TIMEOUT):
        blob = await http.get(f"{agent.info.url}/v2/lab/app/blobs/{BLOB_DIGEST}?ns={NS}")
        assert (blob.status_code, blob.content) == (200, BLOB)
        # The namespace is normalised (case, trailing dot) before it is looked up.
        manifest = await http.get(f"{agent.info.url}/v2/lab/app/manifests/v1?ns=SEED.Local.:5000")
        assert (manifest.status_code, manifest.content) == (200, MANIFEST)
        # A cached blob is not served under a namespace the agent does not serve either.
        loopback_ns = listeners.fill("127.0.0.1:{v4}")
        cached = await http.get(f"{agent.info.url}/v2/lab/app/blobs/{BLOB_DIGEST}?ns={loopback_ns}")
        assert (cached.status_code, error_code(cached)) == (404, "NAME_UNKNOWN")
    assert listeners.accepted == 0
    assert sum(refused(agent, r) for r in R) == 1


# ---- redirects ----------------------------------------------------------------------------

REDIRECT_MATRIX = [
    ("http://127.0.0.1:{v4}/blob", R.PLAIN_HTTP),
    ("https://127.0.0.1:{v4}/blob", R.LOOPBACK),
    ("https://[::1]:{v6}/blob", R.LOOPBACK),
    ("https://[::ffff:127.0.0.1]:{v4}/blob", R.LOOPBACK),
    ("https://169.254.169.254/latest/meta-data/", R.METADATA),
    ("http://169.254.169.254/latest/meta-data/", R.PLAIN_HTTP),
    ("https://loopback.ssrf.test:{v4}/blob", R.LOOPBACK),
    ("https://loopback6.ssrf.test:{v6}/blob", R.LOOPBACK),
    ("https://metadata.ssrf.test/latest/meta-data/", R.METADATA),
    ("http://storage.ssrf.test:{v4}/blob", R.PLAIN_HTTP),
    ("https://localhost:{v4}/blob", R.SPECIAL_NAME),
    ("https://2130706433:{v4}/blob", R.NUMERIC_HOST),
    ("https://user:secret@storage.ssrf.test:{v4}/blob", R.MALFORMED),
]


@pytest.mark.parametrize(("template", "reason"), REDIRECT_MATRIX, ids=[case[0] for case in REDIRECT_MATRIX])
async def test_redirect_to_a_refused_target_is_a_fast_404_without_a_connection(
    tmp_path: Path, nursery: trio.Nursery, listeners: Listeners, http: httpx.AsyncClient,
    template: str, reason: RefusalReason,
) -> None:
    location = listeners.fill(template)
    registry = await nursery.start(FakeRegistry({"lab/redirected": location}).serve)
    agent = await start_agent(nursery, agent_config(tmp_path, registry))
    with trio.fail_after(TIMEOUT):
        blob, seconds = await timed(http, "GET", f"{agent.info.url}/v2/lab/redirected/blobs/{BLOB_DIGEST}?ns={NS}")
        assert (blob.status_code, error_code(blob)) == (404, "BLOB_UNKNOWN")
        assert seconds < FAST
        manifest, seconds = await timed(
            http, "GET", f"{agent.info.url}/v2/lab/redirected/manifests/{MANIFEST_DIGEST}?ns={NS}")
        assert (manifest.status_code, error_code(manifest)) == (404, "MANIFEST_UNKNOWN")
        assert seconds < FAST
        # containerd retries the blob once more before it moves on: still 404 at once.
        again, seconds = await timed(http, "GET", f"{agent.info.url}/v2/lab/redirected/blobs/{BLOB_DIGEST}?ns={NS}")
        assert again.status_code == 404 and seconds < FAST
    assert listeners.accepted == 0
    assert ("GET", f"/v2/lab/redirected/blobs/{BLOB_DIGEST}", False) in registry.seen  # the upstream was asked
    assert refused(agent, reason) >= 2  # the blob and the manifest
    assert agent_metric(agent, "p2pd_upstream_fetches_total") == 1  # refused: not retried


async def test_redirect_within_the_configured_registry_is_followed(
    tmp_path: Path, nursery: trio.Nursery, http: httpx.AsyncClient,
) -> None:
    registry = await nursery.start(FakeRegistry({"lab/moved": f"/v2/lab/app/blobs/{BLOB_DIGEST}"}).serve)
    agent = await start_agent(nursery, agent_config(tmp_path, registry))
    with trio.fail_after(TIMEOUT):
        response = await http.get(f"{agent.info.url}/v2/lab/moved/blobs/{BLOB_DIGEST}?ns={NS}")
    assert (response.status_code, response.content) == (200, BLOB)
    assert ("GET", f"/v2/lab/app/blobs/{BLOB_DIGEST}", False) in registry.seen
    assert sum(refused(agent, r) for r in R) == 0


# ---- an allowed https storage host, reached at its checked address ------------------------


@dataclass
class Certificates:
    ca_pem: bytes
    chain_pem: bytes
    key_pem: bytes


def make_certificates(name: str) -> Certificates:
    """A test CA and a server certificate for ``name`` signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pd ssrf test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Certificates(
        ca.public_bytes(pem), leaf.public_bytes(pem) + ca.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


@dataclass
class TlsStorage:
    """An https blob store on 127.0.0.1: records SNI names and request heads, serves ``BLOB``."""

    certificates: Certificates
    directory: Path
    port: int = 0
    accepted: int = 0
    server_names: list[str | None] = field(default_factory=list)
    heads: list[dict[str, str]] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[TlsStorage] = trio.TASK_STATUS_IGNORED) -> None:
        chain, key = self.directory / "chain.pem", self.directory / "key.pem"
        chain.write_bytes(self.certificates.chain_pem)
        key.write_bytes(self.certificates.key_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(chain, key)
        context.sni_callback = lambda _socket, name, _context: self.server_names.append(name)
        listeners = await trio.open_ssl_over_tcp_listeners(0, context, host="127.0.0.1")
        self.port = listeners[0].transport_listener.socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.accepted += 1
        try:
            with trio.fail_after(5):
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    piece = await stream.receive_some(65536)
                    if not piece:
                        return
                    data += piece
                lines = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
                head = {"request-line": lines[0]}
                head.update({k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])})
                self.heads.append(head)
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                      b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(BLOB) + BLOB)
        except (trio.BrokenResourceError, trio.TooSlowError):
            pass  # a client that refused our certificate, or went away
        finally:
            await trio.aclose_forcefully(stream)


@pytest.fixture
async def storage(tmp_path: Path, nursery: trio.Nursery) -> TlsStorage:
    return await nursery.start(TlsStorage(make_certificates(STORAGE_NAME), tmp_path).serve)


@pytest.mark.parametrize("allowed", [True, False], ids=["allow_networks", "default"])
async def test_https_storage_redirect_is_pinned_to_the_checked_address(
    tmp_path: Path, nursery: trio.Nursery, listeners: Listeners, http: httpx.AsyncClient, storage: TlsStorage,
    allowed: bool,
) -> None:
    """A private registry (Basic auth) redirects a blob to https storage by name. The name
    exists only in the agent's resolver, so reaching it proves the connection went to the
    checked address; TLS still verifies the name, and the registry's credentials stay behind.
    Without ``allow_networks`` covering the address, the same redirect is refused unopened."""
    location = f"https://{STORAGE_NAME}:{storage.port}/blobs/{BLOB_DIGEST}?signature=abc"
    registry = await nursery.start(FakeRegistry({"lab/private": location}, basic_auth=True).serve)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(storage.certificates.ca_pem)
    config = agent_config(tmp_path, registry, ca_file=ca_file, allow_networks=("127.0.0.1/32",) if allowed else ())
    agent = await start_agent(nursery, config)
    with trio.fail_after(TIMEOUT):
        response, seconds = await timed(http, "GET", f"{agent.info.url}/v2/lab/private/blobs/{BLOB_DIGEST}?ns={NS}")
    assert ("GET", f"/v2/lab/private/blobs/{BLOB_DIGEST}", True) in registry.seen  # the registry got the credentials
    if allowed:
        assert (response.status_code, response.content) == (200, BLOB)
        assert storage.server_names == [STORAGE_NAME]
        [head] = storage.heads
        assert head["request-line"] == f"GET /blobs/{BLOB_DIGEST}?signature=abc HTTP/1.1"
        assert head["host"] == f"{STORAGE_NAME}:{storage.port}"
        assert "authorization" not in head  # never forwarded to another origin
        assert sum(refused(agent, r) for r in R) == 0
    else:
        assert (response.status_code, error_code(response), seconds < FAST) == (404, "BLOB_UNKNOWN", True)
        assert (storage.accepted, storage.heads) == (0, [])
        assert refused(agent, R.LOOPBACK) == 1
    assert listeners.accepted == 0


async def test_allowed_ns_is_contacted_only_at_its_checked_address(
    tmp_path: Path, nursery: trio.Nursery, http: httpx.AsyncClient, storage: TlsStorage,
) -> None:
    """An ns admitted by a pattern goes to ``https://<ns>`` at the address the agent checked,
    with the name in SNI. (The test CA is not trusted for allow-listed registries, so the
    handshake then fails and the client gets a 404: the point is where the connection went.)"""
    registry = await nursery.start(FakeRegistry().serve)
    config = agent_config(tmp_path, registry, allow_registries=(f"*.ssrf.test:{storage.port}",),
                          allow_networks=("127.0.0.1/32",))
    agent = await start_agent(nursery, config)
    with trio.fail_after(TIMEOUT):
        response, seconds = await timed(http, "HEAD", f"{agent.info.url}/v2/lab/app/manifests/v1"
                                                      f"?ns={STORAGE_NAME}:{storage.port}")
    assert response.status_code == 404 and seconds < FAST
    assert storage.accepted >= 1
    assert set(storage.server_names) == {STORAGE_NAME}
    assert storage.heads == []  # the agent did not accept the certificate, so nothing was sent
    assert registry.seen == []
