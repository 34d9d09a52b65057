"""Upstream registries: the client p2pd uses when neither the store nor a peer has content.

``HttpUpstream`` speaks the OCI Distribution pull API over one ``httpx.AsyncClient``;
``UpstreamPool`` maps containerd's ``ns=`` value to an upstream. ``p2pd.testing.MemoryUpstream``
is the in-memory fake; ``tests/test_upstream_conformance.py`` holds both to one contract.

Rules/invariants:
- httpx exceptions never leave this module: they become ``UpstreamError`` subclasses at the
  boundary (``_translate``); statuses are mapped by ``_raise_for_status``.
- Blob bytes are passed through exactly as the upstream sent them (``aiter_raw``): layers are
  already compressed and their digest covers the encoded bytes, so a ``Content-Encoding``
  header is never decoded. Blobs are streamed, never held in memory; digests are checked by
  the caller (the fetcher), which knows the expected size.
- Manifests are read up to ``MAX_MANIFEST_SIZE`` bytes and checked here: against the digest
  reference and against ``Docker-Content-Digest`` when the upstream sent one.
- Credentials (the configured password, Basic headers, bearer tokens) are only ever sent to
  the registry's own origin or to the token realm that registry named in a challenge, never
  logged, and never put into exception messages. Redirects are followed inside httpx, which
  drops ``Authorization`` when the origin changes; challenges that arrive from another origin
  (e.g. from a blob storage host after a redirect) are ignored.
- No ``timeout=`` parameters: connect/read timeouts come from ``FetchConfig`` and bound each
  network wait; callers bound whole operations with ``trio.fail_after``.
- Clients made by ``UpstreamPool`` go through an ``EgressGuard``: every request (first hops,
  redirects, token requests) is checked against the ``EgressPolicy`` before it is sent, and
  connections to untrusted hosts go only to the addresses that were checked (``p2pd.egress``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import socket
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Protocol

import httpcore
import httpx
import jwt
import trio

from .access import Challenge, KeySet, PullProbe
from .config import AgentConfig, FetchConfig, UpstreamConfig
from .egress import EgressPolicy, EgressRefused, RefusalReason, ResolutionError, Resolver, parse_namespace
from .errors import (
    ConfigError,
    UpstreamAuthError,
    UpstreamError,
    UpstreamNotFound,
    UpstreamUnavailable,
    VerificationError,
)
from .oci import mediatypes
from .oci.chunkmap import ChunkMap, validate_chunk_size
from .oci.digest import Digest
from .oci.errors import OCIError
from .oci.grammar import validate_name, validate_reference
from .oci.manifest import MAX_MANIFEST_SIZE, Descriptor, parse_manifest
from .signing.errors import SignatureInvalid
from .signing.extension import MAX_LIST_BYTES, ExtensionSignature, parse_signature_list
from .swarm.grants import parse_grant_response

__all__ = [
    "CHUNK_MAP_MEDIA_TYPE",
    "CHUNK_MAP_UNSUPPORTED_TTL",
    "DEFAULT_NAMESPACE",
    "DOCKER_HUB_NAMESPACES",
    "DOCKER_HUB_URL",
    "GRANT_KEYS_TTL",
    "MAX_CHUNK_MAP_SIZE",
    "MAX_REDIRECTS",
    "BlobResponse",
    "EgressGuard",
    "HttpUpstream",
    "ManifestResult",
    "SystemResolver",
    "Upstream",
    "UpstreamPool",
    "validate_namespace",
]

log = logging.getLogger("p2pd.upstream")

CHUNK_MAP_MEDIA_TYPE = mediatypes.CHUNK_MAP
MAX_CHUNK_MAP_SIZE = 16 * 1024 * 1024  # bytes
# After an upstream says it has no chunk-map endpoint, it is not asked again for this long.
CHUNK_MAP_UNSUPPORTED_TTL = 300.0  # seconds (also: a registry without peer grants)
GRANT_KEYS_TTL = 300.0  # seconds the registry's keys for peer grants are reused
MAX_REDIRECTS = 5
DOCKER_HUB_URL = "https://registry-1.docker.io"
DOCKER_HUB_NAMESPACES = frozenset({"docker.io", "index.docker.io"})
DEFAULT_NAMESPACE = "default"  # the namespace of the upstream made from ``default_upstream``

_USER_AGENT = "p2pd/0.1"
_MAX_ERROR_BODY = 4096  # bytes of an error response read for its OCI error code
_MAX_TOKEN_RESPONSE = 1024 * 1024  # bytes
_MAX_TOKEN_LENGTH = 64 * 1024  # characters
_DEFAULT_TOKEN_LIFETIME = 60.0  # seconds, when the token server omits expires_in (token spec)
_TOKEN_MARGIN = 10.0  # seconds before expiry when a cached token stops being used
_MAX_CACHED_TOKENS = 1024
_MAX_CHALLENGE_LENGTH = 8192  # characters of WWW-Authenticate that are parsed
_MAX_JWKS_SIZE = 1024 * 1024  # bytes
_MAX_GRANT_ANSWER = 16 * 1024  # bytes of a peer grant answer
# Content types that say nothing about which manifest format a body is.
_GENERIC_TYPES = frozenset({"", "application/json", "text/plain", mediatypes.OCTET_STREAM})
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d{1,19})-(\d{1,19})/(\d{1,19}|\*)")
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # visible ASCII: safe in a header, no CR/LF
# One token of a WWW-Authenticate value: a bare auth scheme, or ``name=value`` (value quoted or not).
_CHALLENGE_TOKEN_RE = re.compile(r"""([A-Za-z0-9!#$%&'*+.^_`|~-]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]*))?""")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAMESPACE_RE = re.compile(  # a trailing dot is accepted here and dropped by the egress policy's normalisation
    rf"(?P<host>{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]{{2,45}}\])(?::(?P<port>[0-9]{{1,5}}))?"
)
# The request extension that tells the auth flow which repository a request is for.
_SCOPE_EXTENSION = "p2pd_token_scope"
# A connection attempt that times out is made again (nothing was sent yet): on an uplink whose
# queue is full of layer bytes, SYNs and SYN-ACKs are dropped and one fresh attempt with its own
# retransmissions often gets through within the caller's bound. Refused connections fail at once.
_CONNECT_ATTEMPTS = 3


# ---- interface ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestResult:
    """What an upstream said about a manifest.

    Attributes:
        digest: the manifest's digest (verified against the body for a GET).
        media_type: the manifest's media type, without parameters.
        size: the body's length in bytes.
        body: the exact bytes, or None for a HEAD.
    """

    digest: Digest
    media_type: str
    size: int
    body: bytes | None  # None for a HEAD


class BlobResponse(Protocol):
    """An open blob download, positioned at the offset that was asked for."""

    total_size: int  # size of the whole blob
    offset: int  # offset of the first byte this response carries (== requested offset)
    # The upstream ignored the Range asked for: it sends the blob from its first byte (those
    # before ``offset`` are read and dropped here) and on past the end asked for.
    range_ignored: bool

    def aiter_bytes(self, on_dropped: Callable[[int], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
        """Yields the blob's bytes from ``offset`` on, as they arrive.

        ``on_dropped`` is awaited with the length of each piece read and dropped before
        ``offset`` (``range_ignored``), before the next piece is read: those bytes crossed the
        link too, and an upstream cap pays for them as it does for the rest.

        Raises:
            UpstreamUnavailable: the connection broke or stalled past the read timeout.
        """
        ...


class Upstream(Protocol):
    """A registry that p2pd pulls from when neither the store nor a peer has the content.

    Error handling: every method raises ``UpstreamNotFound`` for unknown content,
    ``UpstreamUnavailable`` when the upstream cannot be reached or is overloaded,
    ``UpstreamAuthError`` when it refuses us, ``VerificationError`` when its bytes do not
    match their digest, and ``UpstreamError`` for any other failure.
    """

    namespace: str

    async def head_manifest(self, repository: str, reference: str) -> ManifestResult:
        """Resolves a tag or digest to a digest, media type and size (``body`` is None)."""
        ...

    async def get_manifest(self, repository: str, reference: str) -> ManifestResult:
        """Fetches a manifest's exact bytes and verifies them against their digest."""
        ...

    def open_blob(self, repository: str, digest: Digest, offset: int = 0,
                  end: int | None = None) -> AbstractAsyncContextManager[BlobResponse]:
        """Opens a blob download of bytes ``offset..end`` (inclusive; ``end`` None: to the end)."""
        ...

    async def blob_size(self, repository: str, digest: Digest) -> int:
        """The blob's size, from a HEAD request (no body crosses the network)."""
        ...

    async def get_chunk_map(self, repository: str, digest: Digest, largest: int) -> ChunkMap | None:
        """The blob's chunk map in chunks of at most ``largest`` bytes (the size
        ``chunk_size_for`` gives), or None when this upstream does not provide chunk maps."""
        ...

    async def get_signatures(self, repository: str, digest: Digest) -> list[ExtensionSignature]:
        """The manifest's signatures from the registry signature API extension (``[]`` when the
        registry has none or no extension); each checked as strictly as the seed checks a PUT."""
        ...

    async def get_referrers(self, repository: str, digest: Digest, artifact_type: str) -> list[Descriptor]:
        """The manifest's OCI 1.1 referrers of ``artifact_type`` (``[]`` without a referrers API)."""
        ...

    async def get_peer_grant(self, repository: str, digest: Digest, node: str) -> tuple[str, bytes] | None:
        """A peer grant for ``node`` and the registry's keys (JWKS) that check it; None when the
        registry issues none (``p2pd.swarm.grants``)."""
        ...

    async def aclose(self) -> None:
        """Releases connections; the upstream must not be used afterwards."""
        ...


# ---- error translation --------------------------------------------------------------------


@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    """Turns httpx exceptions raised in the block into our error tree (never Cancelled)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise UpstreamUnavailable(f"{what}: timed out ({type(exc).__name__})") from exc
    except httpx.TooManyRedirects as exc:
        raise UpstreamError(f"{what}: more than {MAX_REDIRECTS} redirects") from exc
    except httpx.TransportError as exc:
        # Connect and read errors, TLS failures, and bodies cut short (RemoteProtocolError).
        raise UpstreamUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise UpstreamError(f"{what}: {type(exc).__name__}: {exc}") from exc


async def _read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    """Reads a (decoded) body, refusing more than ``limit`` bytes without reading them all."""
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise UpstreamError(f"{what}: response of {length} bytes is larger than {limit}")
    parts: list[bytes] = []
    size = 0
    with _translate(what):
        async for piece in response.aiter_bytes():
            size += len(piece)
            if size > limit:
                raise UpstreamError(f"{what}: response is larger than {limit} bytes")
            parts.append(piece)
    return b"".join(parts)


async def _error_code(response: httpx.Response) -> str:
    """The first OCI error code in an error response's body, if it has one (best effort)."""
    if response.request.method == "HEAD":
        return ""
    try:
        body = await _read_capped(response, _MAX_ERROR_BODY, "error body")
        document = json.loads(body)
        code = document["errors"][0]["code"]
    except (UpstreamError, ValueError, LookupError, TypeError):
        return ""
    return code if isinstance(code, str) and code.isascii() and len(code) < 64 else ""


async def _endpoint_missing(response: httpx.Response) -> bool:
    """Whether a 400/404/405/501 says the registry lacks the endpoint (a p2pd extension), rather
    than that it lacks this blob or repository (an OCI ``BLOB_UNKNOWN``/``NAME_UNKNOWN``)."""
    return response.status_code != 404 or await _error_code(response) not in ("BLOB_UNKNOWN", "NAME_UNKNOWN")


async def _raise_for_status(response: httpx.Response, what: str) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    code = await _error_code(response)
    message = f"{what}: HTTP {status}" + (f" {code}" if code else "")
    if status == 404:
        raise UpstreamNotFound(message, status=status)
    if status in (401, 403):
        raise UpstreamAuthError(message, status=status)
    if status == 429 or status >= 500:
        raise UpstreamUnavailable(message, status=status)
    raise UpstreamError(message, status=status)


# ---- authentication -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> httpx.BasicAuth:
        return httpx.BasicAuth(self.username, self.password)

    def basic_header(self) -> str:
        userpass = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(userpass).decode("ascii")


@dataclass(frozen=True, slots=True)
class _Challenge:
    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str]


def _parse_challenges(values: list[str]) -> list[_Challenge]:
    """Parses ``WWW-Authenticate`` values (RFC 9110 section 11.6.1) into challenges."""
    challenges: list[_Challenge] = []
    for value in values:
        for match in _CHALLENGE_TOKEN_RE.finditer(value[:_MAX_CHALLENGE_LENGTH]):
            name, raw = match.group(1), match.group(2)
            if raw is None:
                challenges.append(_Challenge(name.lower(), {}))
            elif challenges:
                if raw.startswith('"'):
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                challenges[-1].params.setdefault(name.lower(), raw)
    return challenges


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default_port = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port if url.port is not None else default_port


def _pull_scope(repository: str) -> str:
    """The token scope of a pull from ``repository`` (never more than pull)."""
    return f"repository:{repository}:pull"


@dataclass(slots=True)
class _CachedToken:
    value: str = field(repr=False)
    expires_at: float  # trio.current_time()


class _RegistryAuth(httpx.Auth):
    """Docker token auth and Basic auth for one registry, as an httpx auth flow.

    On a 401 from the registry's own origin: a ``Bearer`` challenge makes us get a token
    from the named realm (``GET realm?service=…&scope=repository:<repo>:pull``, with Basic
    credentials when configured) and retry once; a ``Basic`` challenge makes us retry once
    with the configured credentials. Tokens are cached per (realm, service, scope) until
    shortly before they expire, and once a registry has challenged us, later requests get
    their token (or Basic header) before they are sent, saving the 401 round trip.

    Args:
        client: the client used to call the token realm (with auth disabled for that call).
        registry: the registry's base URL; challenges from other origins are ignored.
        credentials: username and password, or None for anonymous tokens.
    """

    def __init__(self, client: httpx.AsyncClient, registry: httpx.URL, credentials: _Credentials | None) -> None:
        self._client = client
        self._registry_origin = _origin(registry)
        self._credentials = credentials
        self._bearer: tuple[str, str] | None = None  # (realm, service) of the last Bearer challenge
        self._basic = False  # the registry asked for Basic credentials
        self._tokens: dict[tuple[str, str, str], _CachedToken] = {}
        self._token_lock = trio.Lock()
        self.token_requests = 0  # how many times a realm was asked for a token (for tests and metrics)
        self.challenge: _Challenge | None = None  # the registry's last challenge (passed through to clients)

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("p2pd's registry auth works with httpx.AsyncClient only")

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        scope = str(request.extensions.get(_SCOPE_EXTENSION, ""))
        sent_token: str | None = None
        sent_basic = False
        if self._bearer is not None:
            realm, service = self._bearer
            sent_token = await self._token(realm, service, scope)
            request.headers["Authorization"] = f"Bearer {sent_token}"
        elif self._basic and self._credentials is not None:
            request.headers["Authorization"] = self._credentials.basic_header()
            sent_basic = True

        response = yield request

        if response.status_code != 401 or _origin(response.url) != self._registry_origin:
            # A challenge from another origin (e.g. storage we were redirected to) is not
            # answered: our credentials are for the registry and its realm only.
            return
        challenges = _parse_challenges(response.headers.get_list("www-authenticate"))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        self.challenge = bearer or next((c for c in challenges if c.scheme == "basic"), None) or self.challenge
        if bearer is not None:
            realm = self._checked_realm(bearer.params.get("realm", ""))
            service = bearer.params.get("service", "")
            scope = scope or bearer.params.get("scope", "")
            if sent_token is not None:
                self._forget_token((realm, service, scope), sent_token)
            self._bearer = (realm, service)
            token = await self._token(realm, service, scope)
            request.headers["Authorization"] = f"Bearer {token}"
        elif any(c.scheme == "basic" for c in challenges) and self._credentials is not None and not sent_basic:
            self._basic = True
            request.headers["Authorization"] = self._credentials.basic_header()
        else:
            return
        yield request

    def _checked_realm(self, realm: str) -> str:
        """The realm, if it is a URL we may send credentials to; raises UpstreamAuthError."""
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host or url.userinfo or url.fragment:
            raise UpstreamAuthError(f"registry named an invalid token realm {realm[:200]!r}")
        if self._registry_origin[0] == "https" and url.scheme != "https":
            raise UpstreamAuthError(f"refusing plain-http token realm {realm[:200]!r} for an https registry")
        return str(url)

    def _forget_token(self, key: tuple[str, str, str], refused: str) -> None:
        cached = self._tokens.get(key)
        if cached is not None and hmac.compare_digest(cached.value.encode(), refused.encode()):
            del self._tokens[key]

    async def _token(self, realm: str, service: str, scope: str) -> str:
        key = (realm, service, scope)
        cached = self._tokens.get(key)
        if cached is not None and cached.expires_at > trio.current_time():
            return cached.value
        async with self._token_lock:  # one fetch at a time, so concurrent pulls share a token
            cached = self._tokens.get(key)
            if cached is not None and cached.expires_at > trio.current_time():
                return cached.value
            token, lifetime = await self._fetch_token(realm, service, scope)
            now = trio.current_time()
            if len(self._tokens) >= _MAX_CACHED_TOKENS:
                self._tokens = {k: v for k, v in self._tokens.items() if v.expires_at > now}
                while len(self._tokens) >= _MAX_CACHED_TOKENS:
                    del self._tokens[next(iter(self._tokens))]
            margin = min(_TOKEN_MARGIN, lifetime / 4)
            self._tokens[key] = _CachedToken(token, now + lifetime - margin)
            return token

    async def _fetch_token(self, realm: str, service: str, scope: str) -> tuple[str, float]:
        params = {k: v for k, v in (("service", service), ("scope", scope)) if v}
        url = httpx.URL(realm).copy_merge_params(params)
        what = f"token request to {url.host}"
        self.token_requests += 1
        log.debug("requesting a token from %s for scope %r", url.host, scope)
        # httpx.Auth() is "no auth": without it the client would run this flow again.
        auth = self._credentials.basic() if self._credentials is not None else httpx.Auth()
        request = self._client.build_request("GET", url, headers={"Accept": "application/json"})
        with _translate(what):
            response = await self._client.send(request, auth=auth, stream=True)
        try:
            if response.status_code in (401, 403):
                raise UpstreamAuthError(
                    f"{what}: credentials refused (HTTP {response.status_code})", status=response.status_code
                )
            await _raise_for_status(response, what)
            body = await _read_capped(response, _MAX_TOKEN_RESPONSE, what)
        finally:
            with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
                await response.aclose()
        try:
            document = json.loads(body)
        except ValueError as exc:
            raise UpstreamAuthError(f"{what}: response is not JSON") from exc
        token = (document.get("token") or document.get("access_token")) if isinstance(document, dict) else None
        if not isinstance(token, str) or len(token) > _MAX_TOKEN_LENGTH or not _TOKEN_RE.fullmatch(token):
            raise UpstreamAuthError(f"{what}: response has no usable token")
        lifetime = document.get("expires_in")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = _DEFAULT_TOKEN_LIFETIME
        return token, float(lifetime)


# ---- egress guard -------------------------------------------------------------------------

# Bound on resolving and connecting when httpcore passes no connect timeout (it always does
# when the client has one, which ours always has).
_CONNECT_FALLBACK_TIMEOUT = 30.0  # seconds
_REFUSAL_LOG_INTERVAL = 600.0  # seconds between log lines about one refused host and reason
_MAX_REFUSAL_LOG_KEYS = 1024  # hosts remembered for that; more new hosts are counted, not logged


class SystemResolver:
    """Resolves names with the system resolver: trio's getaddrinfo (/etc/hosts, then DNS).

    trio runs getaddrinfo in a worker thread and abandons it on cancellation, so the
    caller's deadline bounds a hanging lookup.
    """

    async def resolve(self, host: str, port: int) -> list[str]:
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:  # gaierror; UnicodeError from the idna codec
            raise ResolutionError(f"cannot resolve {host[:100]!r}: {exc}") from exc
        return list(dict.fromkeys(str(info[4][0]) for info in infos))


class EgressGuard:
    """Applies an ``EgressPolicy`` to the requests and connections of upstream clients.

    Args:
        policy: what may be contacted.
        resolver: resolves untrusted names; default ``SystemResolver``.
        on_refused: called with the reason of every refusal (the daemon counts them in
            ``p2pd_egress_refused_total``).

    Each refusal is logged at most once per host and reason every ``_REFUSAL_LOG_INTERVAL``
    seconds, so a client spraying ``ns`` values cannot flood the log.
    """

    def __init__(self, policy: EgressPolicy, *, resolver: Resolver | None = None,
                 on_refused: Callable[[RefusalReason], None] | None = None) -> None:
        self.policy = policy
        self.resolver: Resolver = resolver if resolver is not None else SystemResolver()
        self._on_refused = on_refused
        self._last_logged: dict[tuple[str, RefusalReason], float] = {}

    def refused(self, refusal: EgressRefused) -> EgressRefused:
        """Counts and (rate-limited) logs a refusal; returns it for the caller to raise."""
        if self._on_refused is not None:
            self._on_refused(refusal.reason)
        key = (refusal.host, refusal.reason)
        now = time.monotonic()
        last = self._last_logged.get(key)
        if last is not None and now - last < _REFUSAL_LOG_INTERVAL:
            return refusal
        if len(self._last_logged) >= _MAX_REFUSAL_LOG_KEYS:
            self._last_logged = {k: t for k, t in self._last_logged.items() if now - t < _REFUSAL_LOG_INTERVAL}
        if len(self._last_logged) < _MAX_REFUSAL_LOG_KEYS:
            self._last_logged[key] = now
            # An unconfigured registry is routine in --all setups; an address refusal may be an attack.
            level = logging.INFO if refusal.reason is RefusalReason.NOT_CONFIGURED else logging.WARNING
            log.log(level, "%s (answered 404; logged once per host every %d s)", refusal, _REFUSAL_LOG_INTERVAL)
        return refusal

    def check_request(self, url: httpx.URL) -> None:
        """Refuses a request URL the policy does not allow (before anything is sent).

        Raises:
            EgressRefused: userinfo in the URL, plain http to an untrusted origin, or a refused
                name or address literal.
        """
        host = url.raw_host.decode("ascii", errors="replace")
        port = url.port if url.port is not None else {"http": 80, "https": 443}.get(url.scheme)
        try:
            if port is None or url.userinfo:
                raise EgressRefused(host, RefusalReason.MALFORMED, "unsupported scheme or userinfo in URL")
            self.policy.check_url(url.scheme, host, port)
        except EgressRefused as exc:
            raise self.refused(exc) from None

    async def connect_addresses(self, host: str, port: int) -> list[str] | None:
        """The addresses a connection to ``host:port`` may use.

        Returns:
            None for a trusted origin (connect by name, as usual); otherwise the checked
            addresses: the literal itself, or every address the name resolved to.

        Raises:
            EgressRefused: the host, or one of its addresses, is refused.
            ResolutionError: the name does not resolve.
        """
        try:
            parsed = self.policy.check_host(host, port)
            if parsed is None:
                return None
            if parsed.address is not None:
                return [parsed.name]
            resolved = await self.resolver.resolve(parsed.name, port)
            return [str(address) for address in self.policy.check_addresses(parsed.name, resolved)]
        except EgressRefused as exc:
            raise self.refused(exc) from None


class _GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Connects only to addresses the guard checked: the pin against DNS rebinding.

    httpcore hands over the URL's host name. The name is resolved and checked once, and the
    TCP connection goes to one of those addresses; TLS (SNI and the certificate's name check)
    and the Host header still use the name, because httpcore does them with the origin's host.
    """

    def __init__(self, guard: EgressGuard) -> None:
        self._guard = guard
        self._backend = httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's interface passes the connect timeout
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        with trio.move_on_after(_CONNECT_FALLBACK_TIMEOUT if timeout is None else timeout):
            try:
                addresses = await self._guard.connect_addresses(host, port)
            except ResolutionError as exc:
                raise httpcore.ConnectError(str(exc)) from exc
            if addresses is None:
                return await self._backend.connect_tcp(host, port, math.inf, local_address, socket_options)
            failure: httpcore.ConnectError | None = None
            for address in addresses:  # every one passed the check; try them in the resolver's order
                try:
                    return await self._backend.connect_tcp(address, port, math.inf, local_address, socket_options)
                except httpcore.ConnectError as exc:
                    failure = exc
            raise failure or httpcore.ConnectError(f"no address to connect to for {host}")
        raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("upstreams are never reached over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


class _EgressTransport(httpx.AsyncBaseTransport):
    """Checks every request httpx sends (first hops, each redirect, token requests) before
    ``inner`` sees it; a refused request never reaches the network."""

    def __init__(self, guard: EgressGuard, inner: httpx.AsyncBaseTransport) -> None:
        self._guard = guard
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self._guard.check_request(request.url)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def receive_buffer_options(receive_buffer: int | None) -> list[httpcore.SOCKET_OPTION]:
    """Socket options for a capped upstream: a fixed receive buffer (``SO_RCVBUF``).

    A rate cap slows how fast p2pd *reads*; without a small buffer the kernel's autotuned
    window (megabytes) lets the registry send that much at the link's full rate first, and a
    site's cap is exceeded at the start of every transfer."""
    return [] if not receive_buffer else [(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)]


def _guarded_network_transport(guard: EgressGuard, verify: ssl.SSLContext | bool,
                               socket_options: list[httpcore.SOCKET_OPTION] | None = None) -> httpx.AsyncHTTPTransport:
    """httpx's own transport, connecting through ``_GuardedNetworkBackend``."""
    context = verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify, trust_env=False)
    transport = httpx.AsyncHTTPTransport(verify=context, trust_env=False)
    # httpx has no public way to choose the network backend: its connection pool is
    # replaced by one with the same TLS context and httpx's default limits.
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=context,
        max_connections=100,
        max_keepalive_connections=20,
        keepalive_expiry=5.0,
        network_backend=_GuardedNetworkBackend(guard),
        socket_options=socket_options or None,
    )
    return transport


# ---- the HTTP upstream --------------------------------------------------------------------


def _bare_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _header_digest(response: httpx.Response, what: str) -> Digest | None:
    text = response.headers.get("docker-content-digest")
    if text is None:
        return None
    try:
        return Digest.parse(text.strip())
    except OCIError as exc:
        raise UpstreamError(f"{what}: invalid Docker-Content-Digest header") from exc


def _json_media_type(body: bytes) -> tuple[str | None, bool]:
    """(the body's ``mediaType`` field, whether it holds an index) if it is a JSON object."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None, False
    if not isinstance(document, dict):
        return None, False
    declared = document.get("mediaType")
    return (declared if isinstance(declared, str) and declared else None), "manifests" in document


class _HttpBlobResponse:
    """A streaming blob response; see ``HttpUpstream.open_blob``."""

    def __init__(self, response: httpx.Response, total_size: int, offset: int, skip: int, what: str,
                 *, range_ignored: bool = False) -> None:
        self.total_size = total_size
        self.offset = offset
        self.range_ignored = range_ignored
        self._response = response
        self._skip = skip  # bytes at the start of the body before ``offset`` (Range ignored)
        self._what = what

    async def aiter_bytes(self, on_dropped: Callable[[int], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
        pieces = self._response.aiter_raw()
        while True:
            with _translate(self._what):
                try:
                    piece = await anext(pieces)
                except StopAsyncIteration:
                    return
            if self._skip:
                dropped = min(self._skip, len(piece))
                self._skip -= dropped
                piece = piece[dropped:]
                if on_dropped is not None:
                    await on_dropped(dropped)
            if piece:
                yield piece


class HttpUpstream:
    """An OCI Distribution registry reached over HTTP(S) with httpx.

    Args:
        config: where the registry is and how to authenticate (``namespace`` is kept as
            this upstream's ``namespace``).
        fetch: connect and read timeouts.
        transport: replaces the network (``httpx.MockTransport`` in tests); TLS settings
            are then unused.
        egress: checks every request and connection against the egress policy (the pool
            always passes one); without it the client contacts whatever it is sent to.

    Resource handling: one connection pool per instance; ``aclose`` closes it.

    Raises:
        ConfigError: the URL is not ``http(s)://host[:port]`` (credentials in it are refused),
            or the CA file or password file cannot be read.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        fetch: FetchConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        egress: EgressGuard | None = None,
        receive_buffer: int | None = None,
    ) -> None:
        self.namespace = config.namespace
        self.url = config.url.rstrip("/")
        try:
            parsed = httpx.URL(self.url)
        except httpx.InvalidURL as exc:
            raise ConfigError(f"upstream {config.namespace}: invalid URL") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host or parsed.userinfo:
            # Credentials in the URL would end up in logs and reprs: they belong in username/password.
            raise ConfigError(f"upstream {config.namespace}: URL must be http(s)://host[:port] without credentials")
        verify: ssl.SSLContext | bool = config.tls_verify
        try:
            if config.tls_verify and config.ca_file is not None:
                verify = ssl.create_default_context(cafile=str(config.ca_file))
            secret = config.secret() if config.username is not None else None
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"upstream {config.namespace}: {exc}") from exc
        credentials = _Credentials(config.username, secret or "") if config.username is not None else None
        timeout = httpx.Timeout(
            connect=fetch.connect_timeout, read=fetch.read_timeout, write=fetch.read_timeout, pool=fetch.connect_timeout
        )
        options = receive_buffer_options(receive_buffer)
        if egress is not None:
            transport = _EgressTransport(egress, transport or _guarded_network_transport(egress, verify, options))
        elif transport is None and options:
            transport = httpx.AsyncHTTPTransport(verify=verify, trust_env=False, socket_options=options)
        self._client = httpx.AsyncClient(
            verify=verify,
            timeout=timeout,
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
            trust_env=False,  # no proxies or .netrc from the environment
            headers={"User-Agent": _USER_AGENT},
            transport=transport,
        )
        self._auth = _RegistryAuth(self._client, httpx.URL(self.url), credentials)
        self.config = config
        self._chunk_maps_unsupported_until = float("-inf")
        # Registries without peer grants (most) are not asked again for a while: the request
        # would sit before every swarm download. The keys that check grants are kept likewise.
        self._grants_unsupported_until = float("-inf")
        self._grant_keys: tuple[str, bytes, float] | None = None  # (JWKS URL, document, fetched at)

    def __repr__(self) -> str:
        return f"HttpUpstream(namespace={self.namespace!r}, url={self.url!r})"

    @property
    def token_requests(self) -> int:
        """How many tokens were requested from the registry's token realm so far."""
        return self._auth.token_requests

    def _endpoint(self, repository: str, kind: str, reference: str) -> str:
        validate_name(repository)
        return f"{self.url}/v2/{repository}/{kind}/{reference}"

    @contextlib.asynccontextmanager
    async def _send(
        self,
        method: str,
        repository: str,
        url: str,
        headers: dict[str, str],
        what: str,
        params: dict[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Sends a request for ``repository`` (which sets its token scope); closes the response."""
        request = self._client.build_request(
            method, url, headers=headers, params=params, extensions={_SCOPE_EXTENSION: _pull_scope(repository)}
        )
        for attempt in range(1, _CONNECT_ATTEMPTS + 1):
            try:
                with _translate(what):
                    response = await self._client.send(request, auth=self._auth, stream=True)
                break
            except UpstreamUnavailable as exc:
                if attempt == _CONNECT_ATTEMPTS or not isinstance(exc.__cause__, httpx.ConnectTimeout):
                    raise
                log.info("%s: connecting timed out (attempt %d of %d); trying again", what, attempt,
                         _CONNECT_ATTEMPTS)
        try:
            yield response
        finally:
            with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
                await response.aclose()

    async def head_manifest(self, repository: str, reference: str) -> ManifestResult:
        """Resolves a manifest with HEAD; falls back to a GET when headers are missing.

        Returns:
            The digest from ``Docker-Content-Digest``, the media type from ``Content-Type``
            and the size from ``Content-Length``; ``body`` is None. When the upstream
            omits one of them the manifest is fetched (and verified) with a GET instead.

        Raises:
            UpstreamNotFound, UpstreamUnavailable, UpstreamAuthError, UpstreamError:
                see ``Upstream``; VerificationError when a digest reference and the
                upstream's digest disagree.
        """
        url = self._endpoint(repository, "manifests", validate_reference(reference))
        what = f"HEAD manifest {repository}:{reference}"
        async with self._send("HEAD", repository, url, {"Accept": mediatypes.MANIFEST_ACCEPT}, what) as response:
            await _raise_for_status(response, what)
            digest = _header_digest(response, what)
            media_type = _bare_type(response.headers.get("content-type"))
            length = response.headers.get("content-length", "")
        if digest is None or media_type in _GENERIC_TYPES or not length.isdigit():
            result = await self.get_manifest(repository, reference)
            return replace(result, body=None)
        if ":" in reference and Digest.parse(reference) != digest:
            raise VerificationError(f"{what}: upstream answered with digest {digest}")
        if int(length) > MAX_MANIFEST_SIZE:
            raise UpstreamError(f"{what}: manifest of {length} bytes is larger than {MAX_MANIFEST_SIZE}")
        return ManifestResult(digest, media_type, int(length), None)

    async def get_manifest(self, repository: str, reference: str) -> ManifestResult:
        """Fetches a manifest and checks it.

        The body is read up to ``MAX_MANIFEST_SIZE`` bytes. It must hash to the reference
        when that is a digest, and to ``Docker-Content-Digest`` when the upstream sent it.
        The media type is the ``Content-Type`` (without parameters) or, when that is absent
        or generic, the body's ``mediaType`` field.

        Raises:
            VerificationError: the body does not match a digest, or its ``mediaType``
                contradicts the ``Content-Type``.
            UpstreamError: the body is too large (and the other errors of ``Upstream``).
        """
        url = self._endpoint(repository, "manifests", validate_reference(reference))
        what = f"GET manifest {repository}:{reference}"
        headers = {"Accept": mediatypes.MANIFEST_ACCEPT, "Accept-Encoding": "identity"}
        async with self._send("GET", repository, url, headers, what) as response:
            await _raise_for_status(response, what)
            header_digest = _header_digest(response, what)
            header_type = _bare_type(response.headers.get("content-type"))
            body = await _read_capped(response, MAX_MANIFEST_SIZE, what)

        expected = [d for d in (Digest.parse(reference) if ":" in reference else None, header_digest) if d]
        for digest in expected:
            hasher = digest.hasher()
            hasher.update(body)
            if not hmac.compare_digest(hasher.hexdigest(), digest.encoded):
                raise VerificationError(f"{what}: body does not match digest {digest}")
        digest = expected[0] if expected else Digest("sha256", hashlib.sha256(body).hexdigest())

        declared, is_index = _json_media_type(body)
        if header_type not in _GENERIC_TYPES:
            if declared is not None and declared != header_type:
                raise VerificationError(f"{what}: mediaType {declared!r} contradicts Content-Type {header_type!r}")
            media_type = header_type
        elif declared is not None:
            media_type = declared
        elif header_type == "application/json" or body.lstrip().startswith(b"{"):
            # OCI manifests may omit mediaType; infer it the way the image spec allows.
            media_type = mediatypes.OCI_INDEX if is_index else mediatypes.OCI_MANIFEST
        else:
            raise UpstreamError(f"{what}: response is neither typed nor JSON")
        return ManifestResult(digest, media_type, len(body), body)

    @contextlib.asynccontextmanager
    async def open_blob(self, repository: str, digest: Digest, offset: int = 0,
                        end: int | None = None) -> AsyncIterator[BlobResponse]:
        """Opens ``GET /v2/<repository>/blobs/<digest>``, from ``offset`` on (up to ``end``).

        An offset above 0 or an ``end`` sends ``Range: bytes=<offset>-[<end>]``; with
        ``end`` the response may still carry more (a server ignoring Range) and the caller
        stops reading at ``end``. A 206 must carry a
        ``Content-Range`` that starts at ``offset`` and states the total size. A server
        that ignores Range answers 200 with the whole blob: the first ``offset`` bytes are
        then read and dropped here, so the caller always sees bytes from ``offset`` on
        (correct, but those bytes cross the network again).

        Bytes are yielded exactly as sent (no Content-Encoding decoding); the caller
        verifies the digest.

        Raises:
            VerificationError: ``Docker-Content-Digest`` names another blob.
            UpstreamError: a malformed 206, a missing length, or an offset past the end
                (and the other errors of ``Upstream``).
        """
        if offset < 0:
            raise ValueError("offset must not be negative")
        url = self._endpoint(repository, "blobs", str(digest))
        what = f"GET blob {repository}@{digest}" + (f" from {offset}" if offset else "")
        headers = {"Accept-Encoding": "identity"}
        ranged = bool(offset) or end is not None
        if ranged:
            headers["Range"] = f"bytes={offset}-{'' if end is None else end}"
        async with self._send("GET", repository, url, headers, what) as response:
            await _raise_for_status(response, what)
            header_digest = _header_digest(response, what)
            if header_digest is not None and header_digest.algorithm == digest.algorithm and header_digest != digest:
                raise VerificationError(f"{what}: upstream says it is sending {header_digest}")
            yield self._blob_response(response, offset, what, ranged=ranged)

    async def blob_size(self, repository: str, digest: Digest) -> int:
        url = self._endpoint(repository, "blobs", str(digest))
        what = f"HEAD blob {repository}@{digest}"
        async with self._send("HEAD", repository, url, {"Accept-Encoding": "identity"}, what) as response:
            await _raise_for_status(response, what)
            length = response.headers.get("content-length", "")
            if not length.isdigit():
                raise UpstreamError(f"{what}: no Content-Length", status=response.status_code)
            return int(length)

    @staticmethod
    def _blob_response(response: httpx.Response, offset: int, what: str, *, ranged: bool) -> _HttpBlobResponse:
        length_text = response.headers.get("content-length")
        length = int(length_text) if length_text is not None and length_text.isdigit() else None
        if response.status_code == 200:
            if length is None:
                raise UpstreamError(f"{what}: response has no Content-Length", status=200)
            if offset > length:
                raise UpstreamError(f"{what}: offset is past the end of a {length}-byte blob", status=200)
            return _HttpBlobResponse(response, length, offset, skip=offset, what=what, range_ignored=ranged)
        if response.status_code != 206 or not ranged:
            raise UpstreamError(f"{what}: unexpected HTTP {response.status_code}", status=response.status_code)
        match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("content-range", "").strip())
        if match is None or match.group(3) == "*":
            raise UpstreamError(f"{what}: 206 without a usable Content-Range", status=206)
        start, end, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
        if start != offset or end < start or end >= total:
            raise UpstreamError(f"{what}: 206 for bytes {start}-{end}/{total}, asked from {offset}", status=206)
        if length is not None and length != end - start + 1:
            raise UpstreamError(f"{what}: Content-Length does not match Content-Range", status=206)
        return _HttpBlobResponse(response, total, offset, skip=0, what=what)

    async def get_chunk_map(self, repository: str, digest: Digest, largest: int) -> ChunkMap | None:
        """Fetches ``/v2/<repository>/blobs/<digest>/chunks?largest=<largest>`` (a p2pd seed): the
        map in chunks of ``chunk_size_for(blob size, largest)`` bytes, the size every node uses.

        Returns:
            The decoded map, or None when the upstream has none: it answered 400, 404, 405
            or 501 or with another content type. Unless the 404 was an OCI ``BLOB_UNKNOWN``
            / ``NAME_UNKNOWN`` (the endpoint exists, the blob does not), the upstream is
            not asked again for ``CHUNK_MAP_UNSUPPORTED_TTL`` seconds.

        Raises:
            ValueError: ``largest`` is not a power of two in [64 KiB, 64 MiB].
            VerificationError: the map is malformed, describes another blob, or has chunks
                larger than ``largest``.
            UpstreamError: the map is larger than ``MAX_CHUNK_MAP_SIZE`` (and the other
                errors of ``Upstream``).
        """
        try:
            validate_chunk_size(largest)
        except OCIError as exc:
            raise ValueError(exc.message) from exc
        if trio.current_time() < self._chunk_maps_unsupported_until:
            return None
        url = self._endpoint(repository, "blobs", f"{digest}/chunks")
        what = f"GET chunk map {repository}@{digest}"
        params = {"largest": str(largest)}
        async with self._send("GET", repository, url, {"Accept": CHUNK_MAP_MEDIA_TYPE}, what, params) as response:
            status = response.status_code
            if status in (400, 404, 405, 501):
                if await _endpoint_missing(response):
                    self._chunk_maps_unsupported_until = trio.current_time() + CHUNK_MAP_UNSUPPORTED_TTL
                    log.debug("%s has no chunk maps (HTTP %d)", self.url, status)
                return None
            await _raise_for_status(response, what)
            if _bare_type(response.headers.get("content-type")) != CHUNK_MAP_MEDIA_TYPE:
                self._chunk_maps_unsupported_until = trio.current_time() + CHUNK_MAP_UNSUPPORTED_TTL
                return None
            data = await _read_capped(response, MAX_CHUNK_MAP_SIZE, what)
        try:
            chunk_map = ChunkMap.decode(data, expected_digest=digest)
        except OCIError as exc:
            raise VerificationError(f"{what}: {exc.message}") from exc
        # A seed that predates ``largest`` answers with its configured size: every node of the
        # site takes the same map from it, so they still agree, as long as it is within bounds.
        if chunk_map.chunk_size > largest:
            raise VerificationError(f"{what}: asked for chunks of at most {largest} bytes, "
                                    f"got {chunk_map.chunk_size}")
        return chunk_map

    async def get_signatures(self, repository: str, digest: Digest) -> list[ExtensionSignature]:
        """``GET /extensions/v2/<repository>/signatures/<digest>`` with this agent's credentials.

        Returns:
            The signatures; ``[]`` when the registry answers 404, 405 or 501 (no such manifest,
            or no extension: either way there is nothing to verify).

        Raises:
            UpstreamError: the answer is not the extension's list, or larger than
                ``MAX_LIST_BYTES`` (and the other errors of ``Upstream``).
        """
        validate_name(repository)
        url = f"{self.url}/extensions/v2/{repository}/signatures/{digest}"
        what = f"GET signatures {repository}@{digest}"
        async with self._send("GET", repository, url, {"Accept": "application/json"}, what) as response:
            if response.status_code in (404, 405, 501):
                return []
            await _raise_for_status(response, what)
            body = await _read_capped(response, MAX_LIST_BYTES, what)
        try:
            return parse_signature_list(body, digest)
        except SignatureInvalid as exc:
            raise UpstreamError(f"{what}: {exc}") from exc

    async def get_referrers(self, repository: str, digest: Digest, artifact_type: str) -> list[Descriptor]:
        """``GET /v2/<repository>/referrers/<digest>?artifactType=...`` (distribution-spec 1.1).

        Returns:
            The referrers of that type (filtered here too: a registry may ignore the
            parameter); ``[]`` on 404, 405 or 501 (no referrers API).

        Raises:
            UpstreamError: the answer is not an image index (and the other errors of ``Upstream``).
        """
        url = self._endpoint(repository, "referrers", str(digest))
        what = f"GET referrers {repository}@{digest}"
        headers = {"Accept": mediatypes.OCI_INDEX}
        async with self._send("GET", repository, url, headers, what, {"artifactType": artifact_type}) as response:
            if response.status_code in (404, 405, 501):
                return []
            await _raise_for_status(response, what)
            body = await _read_capped(response, MAX_MANIFEST_SIZE, what)
        try:
            index = parse_manifest(body, mediatypes.OCI_INDEX)
        except OCIError as exc:
            raise UpstreamError(f"{what}: not an image index: {exc.message}") from exc
        return [d for d in index.references if d.artifact_type == artifact_type]

    async def get_peer_grant(self, repository: str, digest: Digest, node: str) -> tuple[str, bytes] | None:
        """``GET /v2/<repository>/blobs/<digest>/grant?node=<node>`` with this agent's credentials,
        then the registry's JWKS (the answer's ``jwks`` path on the same origin, no credentials).

        Returns:
            (grant, JWKS document), or None when the registry issues no grants (404, 405, 501,
            or an answer without a usable grant or keys).

        Raises:
            UpstreamError: the registry refused or failed (and the other errors of ``Upstream``).
        """
        if trio.current_time() < self._grants_unsupported_until:
            return None
        url = self._endpoint(repository, "blobs", f"{digest}/grant")
        what = f"GET peer grant {repository}@{digest}"
        async with self._send("GET", repository, url, {"Accept": "application/json"}, what,
                              {"node": node}) as response:
            if response.status_code in (404, 405, 501):
                if await _endpoint_missing(response):
                    self._grants_unsupported_until = trio.current_time() + CHUNK_MAP_UNSUPPORTED_TTL
                return None
            await _raise_for_status(response, what)
            body = await _read_capped(response, _MAX_GRANT_ANSWER, what)
        try:
            grant = parse_grant_response(body)
            jwks_path = json.loads(body).get("jwks", "/token/keys")
        except ValueError as exc:
            log.info("%s: %s", what, exc)
            return None
        if not isinstance(jwks_path, str) or not jwks_path.startswith("/") or jwks_path.startswith("//"):
            return None  # keys only from the registry's own origin
        jwks_url = str(httpx.URL(self.url).copy_with(path=jwks_path, query=None, fragment=None))
        jwks = self._cached_grant_keys(jwks_url, grant)
        if jwks is None:
            jwks = await self.fetch_jwks(jwks_url)
            if jwks is None:
                return None
            self._grant_keys = (jwks_url, jwks, trio.current_time())
        return grant, jwks

    def _cached_grant_keys(self, url: str, grant: str) -> bytes | None:
        """The JWKS fetched from ``url`` less than ``GRANT_KEYS_TTL`` ago, if it holds the grant's key
        (a registry that rotated its keys signs with one the cache does not know yet)."""
        if self._grant_keys is None:
            return None
        cached_url, document, fetched = self._grant_keys
        if cached_url != url or trio.current_time() - fetched > GRANT_KEYS_TTL:
            return None
        try:
            kid = jwt.get_unverified_header(grant).get("kid", "")
            return document if isinstance(kid, str) and kid in KeySet.from_jwks(document) else None
        except (jwt.PyJWTError, ValueError):
            return None

    # ---- client authorization (p2pd.gate) ----------------------------------------------

    async def _status_of(self, request: httpx.Request, auth: httpx.Auth, what: str) -> int:
        """Sends ``request`` without following redirects; returns the status (body discarded).

        Raises:
            UpstreamUnavailable: unreachable, or 429/5xx.
        """
        with _translate(what):
            response = await self._client.send(request, auth=auth, stream=True, follow_redirects=False)
        with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
            await response.aclose()
        status = response.status_code
        if status == 429 or status >= 500:
            raise UpstreamUnavailable(f"{what}: HTTP {status}", status=status)
        return status

    def _pull_check_request(self, repository: str, headers: dict[str, str]) -> httpx.Request:
        # tags/list needs exactly pull on the repository at every registry, whatever its tags.
        return self._client.build_request("GET", self._endpoint(repository, "tags", "list"), params={"n": "1"},
                                          headers={"Accept": "application/json", **headers},
                                          extensions={_SCOPE_EXTENSION: _pull_scope(repository)})

    async def probe_base(self) -> PullProbe:
        """What the registry answers an anonymous ``GET /v2/`` (the ping clients start with).

        Raises:
            UpstreamUnavailable: unreachable, or 429/5xx.
        """
        request = self._client.build_request("GET", f"{self.url}/v2/", headers={"Accept": "application/json"})
        with _translate("anonymous ping"):
            response = await self._client.send(request, auth=httpx.Auth(), stream=True, follow_redirects=False)
        with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
            await response.aclose()
        status = response.status_code
        if status == 429 or status >= 500:
            raise UpstreamUnavailable(f"anonymous ping: HTTP {status}", status=status)
        challenges = _parse_challenges(response.headers.get_list("www-authenticate")) if status == 401 else []
        found = next((c for c in challenges if c.scheme == "bearer"), None) or \
            next((c for c in challenges if c.scheme == "basic"), None)
        challenge = Challenge.make(found.scheme, found.params.get("realm"), found.params.get("service")) \
            if found is not None else None
        return PullProbe(status, challenge)

    async def probe_pull(self, repository: str) -> PullProbe:
        """Whether an anonymous client may pull ``repository``, asked the way one would.

        ``GET /v2/<repository>/tags/list?n=1`` without credentials; on a Bearer challenge an
        anonymous token is fetched from the realm and the request retried once (Docker Hub
        serves public repositories that way). Never sent with the configured credentials. Each
        probe starts bare, as a new client would: some registries (the seed) serve public
        repositories to requests without a token but refuse anonymous tokens.

        Returns:
            The final status and the registry's challenge (realm and service), if it sent one.

        Raises:
            UpstreamUnavailable: the registry (or its realm) is unreachable or overloaded.
            UpstreamError: another failure (e.g. the egress policy refused the realm).
        """
        what = f"anonymous pull check of {repository}"
        request = self._pull_check_request(repository, {})
        anonymous = _RegistryAuth(self._client, httpx.URL(self.url), None)
        try:
            status = await self._status_of(request, anonymous, what)
        except UpstreamUnavailable:
            raise
        except UpstreamError:
            # The realm refused an anonymous token, named an unusable realm, or the egress policy
            # refused it: after a challenge, that is "not without credentials".
            if anonymous.challenge is None:
                raise
            status = 401
        found = anonymous.challenge
        challenge = Challenge.make(found.scheme, found.params.get("realm"), found.params.get("service")) \
            if found is not None else None
        return PullProbe(status, challenge)

    async def check_pull(self, repository: str, authorization: str) -> int:
        """Whether a client's own ``Authorization`` header may pull ``repository`` here.

        One ``GET /v2/<repository>/tags/list?n=1`` carrying the header as the client sent it,
        to this registry's origin only: no auth flow (our credentials are never added), no
        redirects followed, so the header reaches no other host.

        Returns:
            The HTTP status: 200 means allowed.

        Raises:
            UpstreamUnavailable: unreachable, or 429/5xx.
        """
        request = self._pull_check_request(repository, {"Authorization": authorization})
        return await self._status_of(request, httpx.Auth(), f"pull check of {repository} for a client")

    async def fetch_jwks(self, url: str) -> bytes | None:
        """The token issuer's public keys (JWKS) at ``url``, or None when it publishes none there.

        Sent without credentials and without following redirects.

        Raises:
            UpstreamUnavailable: unreachable, or 429/5xx.
            UpstreamError: the document is larger than 1 MiB, or the egress policy refused the URL.
        """
        what = "JWKS request"
        try:
            request = self._client.build_request("GET", url, headers={"Accept": "application/json"})
        except httpx.InvalidURL as exc:
            raise UpstreamError(f"{what}: invalid URL") from exc
        with _translate(what):
            response = await self._client.send(request, auth=httpx.Auth(), stream=True, follow_redirects=False)
        try:
            status = response.status_code
            if status == 429 or status >= 500:
                raise UpstreamUnavailable(f"{what}: HTTP {status}", status=status)
            if status != 200:
                return None
            return await _read_capped(response, _MAX_JWKS_SIZE, what)
        finally:
            with contextlib.suppress(httpx.HTTPError, httpx.StreamError):
                await response.aclose()

    async def aclose(self) -> None:
        """Closes the connection pool."""
        with contextlib.suppress(httpx.HTTPError):
            await self._client.aclose()


# ---- namespace mapping --------------------------------------------------------------------


def validate_namespace(ns: str) -> str:
    """Checks a ``host[:port]`` namespace (containerd's ``ns=``) and returns it lower-cased.

    Nothing but a DNS name, an IPv4 address or a bracketed IPv6 address, with an optional
    port, is accepted: no ``/``, ``@``, ``?``, spaces or userinfo can reach a URL.

    Raises:
        OCIError: NAME_INVALID.
    """
    match = _NAMESPACE_RE.fullmatch(ns) if len(ns) <= 260 else None
    valid = match is not None
    if match is not None:
        host, port = match.group("host"), match.group("port")
        if port is not None and not 0 < int(port) <= 65535:
            valid = False
        if host.startswith("["):
            try:
                ipaddress.IPv6Address(host[1:-1])
            except ValueError:
                valid = False
        elif len(host) > 253:
            valid = False
    if not valid:
        raise OCIError("NAME_INVALID", "invalid registry namespace", detail={"ns": ns[:100]})
    return ns.lower()


def _namespace_key(namespace: str) -> str:
    """A validated namespace in normal form (``Seed.Local.:5000`` → ``seed.local:5000``)."""
    try:
        host, port = parse_namespace(namespace)
    except EgressRefused:
        return namespace.lower()  # refused later by the policy, never contacted
    return host.netloc(port)


class UpstreamPool:
    """Chooses the upstream for containerd's ``ns=`` value and owns the clients.

    Mapping, in order: an ``[[upstream]]`` entry for the namespace; else the configured
    ``default_upstream`` (with the repository unchanged); else ``https://<ns>`` when an
    ``allow_registries`` pattern admits the namespace, where ``docker.io`` and
    ``index.docker.io`` mean ``https://registry-1.docker.io``; else the namespace is refused
    (``EgressRefused``, never a connection). For the Docker Hub namespaces a one-component
    repository gets the ``library/`` prefix.

    Args:
        config: the agent's configuration (upstreams, allow lists, fetch timeouts).
        resolver: resolves the names of untrusted hosts (default: the system resolver).
        on_refused: called with the reason of every egress refusal (for a metric).

    Resource handling: one ``HttpUpstream`` per distinct upstream (URL and credentials),
    created on first use, each behind this pool's ``EgressGuard``; ``aclose`` closes them all.

    Raises:
        ConfigError: an upstream URL, allow_registries pattern or allow_networks entry is invalid.
    """

    def __init__(self, config: AgentConfig, *, resolver: Resolver | None = None,
                 on_refused: Callable[[RefusalReason], None] | None = None) -> None:
        self._config = config
        self._explicit = {_namespace_key(u.namespace): u for u in config.upstreams}
        self._clients: dict[UpstreamConfig, HttpUpstream] = {}
        trusted = [u.url for u in config.upstreams] + [u for u in (config.default_upstream,) if u is not None]
        policy = EgressPolicy.build(trusted_urls=trusted, allow_registries=config.allow_registries,
                                    allow_networks=config.allow_networks)
        self.egress = EgressGuard(policy, resolver=resolver, on_refused=on_refused)

    def _receive_buffer(self) -> int | None:
        """1/16 s of the tightest upstream cap (32 KiB - 1 MiB), or None: the kernel's own.

        Every connection to the upstream can hold this much ahead of the cap (twice, as Linux
        counts), and a pull opens several at once (one per blob and node); a window of 32 KiB
        still carries ~5 Mbit/s over a 50 ms round trip per connection. (A range holder's
        fetch under a cap asks for no more than it has paid for: ``p2pd.swarm.engine``.)"""
        swarm = self._config.swarm
        caps = [rate for rate in (swarm.site_upstream_rate, swarm.upstream_rate) if rate > 0]
        return min(max(min(caps) // 16, 32 * 1024), 1024 * 1024) if caps else None

    def check_namespace(self, ns: str | None) -> str | None:
        """Checks containerd's ``ns=`` before anything is read or fetched for it.

        Returns:
            The namespace in normal form, or None when the request has none.

        Raises:
            OCIError: NAME_INVALID (400) for a malformed value; NAME_UNKNOWN (404, so
                containerd falls back to the registry itself) for a namespace this agent
                does not serve. Either way nothing was contacted.
        """
        if ns is None:
            return None
        namespace = _namespace_key(validate_namespace(ns))
        try:
            self._upstream_config(namespace)
        except EgressRefused as exc:
            raise OCIError("NAME_UNKNOWN", "this mirror does not serve that registry; fetch from the registry itself",
                           detail={"ns": ns[:100], "reason": exc.reason.value}) from None
        return namespace

    def settings(self, namespace: str | None) -> UpstreamConfig:
        """The upstream entry serving ``namespace`` (as returned by ``check_namespace``).

        Raises:
            OCIError, EgressRefused: as ``resolve``.
        """
        return self._upstream_config(namespace)

    def _upstream_config(self, namespace: str | None) -> UpstreamConfig:
        if namespace is not None and namespace in self._explicit:
            return self._explicit[namespace]
        if self._config.default_upstream is not None:
            # An [[upstream]] entry for the same URL gives the default its credentials and settings.
            same = next((u for u in self._config.upstreams if u.url == self._config.default_upstream), None)
            if same is not None:
                return replace(same, namespace=DEFAULT_NAMESPACE)
            return UpstreamConfig(namespace=DEFAULT_NAMESPACE, url=self._config.default_upstream)
        if namespace is None:
            raise OCIError("NAME_UNKNOWN", "no ns= in the request and no default upstream configured")
        hub = namespace in DOCKER_HUB_NAMESPACES
        try:
            admitted = self.egress.policy.admit_namespace(namespace)
        except EgressRefused as exc:
            if not (hub and any(self._admits(alias) for alias in DOCKER_HUB_NAMESPACES)):
                raise self.egress.refused(exc) from None
            admitted = namespace
        return UpstreamConfig(namespace=admitted, url=DOCKER_HUB_URL if hub else f"https://{admitted}")

    def _admits(self, namespace: str) -> bool:
        try:
            self.egress.policy.admit_namespace(namespace)
        except EgressRefused:
            return False
        return True

    def resolve(self, ns: str | None, repository: str) -> tuple[Upstream, str]:
        """The upstream for ``ns`` and the repository name to use there.

        Raises:
            OCIError: NAME_INVALID for a malformed namespace or repository; NAME_UNKNOWN
                when there is no ``ns`` and no default upstream.
            EgressRefused: the namespace has no upstream entry and no allow_registries
                pattern admits it (nothing is contacted).
            ConfigError: the upstream's CA or password file cannot be read.
        """
        namespace = _namespace_key(validate_namespace(ns)) if ns is not None else None
        if namespace in DOCKER_HUB_NAMESPACES and "/" not in repository:
            repository = f"library/{repository}"
        validate_name(repository)
        return self.upstream(namespace), repository

    def prepare(self) -> int:
        """Creates the clients of the configured upstreams (and the default) now, not at the first
        pull: each builds a TLS context from the system CA bundle, tens of milliseconds of CPU
        that every node of a cluster otherwise spends at the moment a rollout starts. Returns
        how many clients exist."""
        namespaces: list[str | None] = [u.namespace for u in self._config.upstreams]
        if self._config.default_upstream is not None:
            namespaces.append(None)
        for namespace in namespaces:
            with contextlib.suppress(OCIError):  # the first request reports it, as before
                self.upstream(namespace)
        return len(self._clients)

    def upstream(self, ns: str | None) -> HttpUpstream:
        """The upstream client for ``ns`` (created on first use); raises as ``resolve``."""
        namespace = _namespace_key(validate_namespace(ns)) if ns is not None else None
        config = self._upstream_config(namespace)
        key = replace(config, namespace="")  # one client per URL and credentials
        upstream = self._clients.get(key)
        if upstream is None:
            upstream = self._clients[key] = HttpUpstream(config, self._config.fetch, egress=self.egress,
                                                         receive_buffer=self._receive_buffer())
        return upstream

    async def aclose(self) -> None:
        """Closes every upstream client created so far."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
