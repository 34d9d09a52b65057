"""The access gate: one authorization decision per client request, made before any work.

``MirrorFront`` calls ``AccessGate.authorize`` for every manifest and blob request, before the
store, the fetcher (and through it the peers) or the upstream does anything for it, and
``require_link`` before a blob or a manifest by digest is looked up. The evidence is gathered
here, lazily and cached; the decisions are ``p2pd.access.decide_pull`` and ``decide_link``.

Evidence, cheapest first:

1. ``anonymous_pull = true`` on the namespace's ``[[upstream]]`` (the operator opened it), or
   no ``username`` there: the agent then fetches only what the upstream serves anonymously, so
   every client may read it and only links (below) are checked.
2. Whether the upstream lets an anonymous client pull the repository: ``probe_pull``, asked
   once per repository every ``access.anonymous_ttl`` seconds. If it does, every client may.
   The probe also yields the upstream's challenge (realm, service).
3. A bearer token is verified offline against the issuer's keys (JWKS at
   ``<realm origin>/token/keys`` or ``jwks_url``, cached ``jwks_ttl``, refetched on an unknown
   ``kid`` at most every ``jwks_min_interval``), with ``aud`` = the challenge's service.
4. Otherwise (no keys, an opaque token, a key the issuer does not publish, Basic credentials):
   one upstream check with the client's own header (``check_pull``), cached per (sha256 of the
   header, repository) until the token expires, at most ``check_ttl`` (``opaque_ttl`` when
   the expiry cannot be read).

Rules/invariants:
- What is sent on behalf of a client: an anonymous probe (no credentials at all), a JWKS fetch
  (no credentials), and the client's own ``Authorization`` to the upstream registry's origin
  (no redirects, no auth flow). Nothing else; the agent's credentials are never used to answer
  "may this client pull".
- Links (which digests a repository references) are learned from manifests served for that
  repository and from the upstream's own answer (``HEAD`` under the repository with the agent's
  credentials); a digest nobody linked is never served from the store, a download or a peer.
- State is in memory and bounded (LRU); this object owns it. Per-key locks make concurrent
  requests share one upstream question instead of asking it N times.
- Credentials are never logged; denials are logged once a minute per (reason, client,
  repository) and counted in ``p2pd_auth_denied_total{reason}``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, NoReturn, Protocol, TypeVar, runtime_checkable

import httpx
import trio

from p2pd.httpd import Request
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from p2pd.oci.manifest import parse_manifest

from .access import (
    TOKEN_LEEWAY,
    Challenge,
    Credential,
    CredentialKind,
    Decision,
    KeySet,
    PullProbe,
    TokenGrant,
    TokenRejected,
    UnknownKey,
    Verdict,
    decide_base,
    decide_link,
    decide_pull,
    looks_like_jwt,
    parse_authorization,
    unverified_expiry,
    verify_token,
)
from .config import AgentConfig, UpstreamConfig
from .errors import UpstreamAuthError, UpstreamError, UpstreamNotFound
from .metrics import AgentMetrics
from .upstream import Upstream

__all__ = ["Access", "AccessGate", "RegistryAccessClient", "UpstreamResolver", "default_jwks_url"]

log = logging.getLogger("p2pd.access")

_DENIAL_LOG_INTERVAL = 60.0  # seconds between log lines for one (reason, client, repository)
_DENIAL_LOG_KEYS = 4096

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@runtime_checkable
class RegistryAccessClient(Protocol):
    """What the gate asks an upstream registry (``p2pd.upstream.HttpUpstream`` implements it).

    Each method raises ``UpstreamUnavailable`` when the registry cannot be asked now and
    ``UpstreamError`` for other failures.
    """

    url: str

    async def probe_base(self) -> PullProbe:
        """What the registry answers an anonymous ``GET /v2/``."""
        ...

    async def probe_pull(self, repository: str) -> PullProbe:
        """What the registry answers an anonymous client asking to pull ``repository``."""
        ...

    async def check_pull(self, repository: str, authorization: str) -> int:
        """The status the registry answers a pull check carrying the client's ``authorization``."""
        ...

    async def fetch_jwks(self, url: str) -> bytes | None:
        """The JWKS document at ``url``, or None when there is none."""
        ...


class UpstreamResolver(Protocol):
    """Maps a namespace to its upstream (``p2pd.upstream.UpstreamPool`` is the real one)."""

    def resolve(self, ns: str | None, repository: str) -> tuple[Upstream, str]:
        """The upstream serving ``ns`` and the repository's name there."""
        ...

    def upstream(self, ns: str | None) -> Upstream:
        """The upstream serving ``ns``."""
        ...

    def settings(self, namespace: str | None) -> UpstreamConfig:
        """The ``[[upstream]]`` entry (or the implied one) serving ``namespace``."""
        ...


def default_jwks_url(realm: str) -> str | None:
    """Where a seed publishes its token keys: ``<realm origin>/token/keys`` (None if no URL)."""
    try:
        url = httpx.URL(realm)
    except httpx.InvalidURL:
        return None
    if url.scheme not in ("http", "https") or not url.host:
        return None
    return str(url.copy_with(path="/token/keys", query=None, fragment=None))


@dataclass(frozen=True, slots=True)
class Access:
    """A request that passed ``authorize``: what it may read, and where that comes from.

    Attributes:
        namespace: containerd's ``ns`` in normal form ("" without one).
        repository: the repository as the client named it.
        upstream: the upstream serving the namespace.
        remote_repository: the repository's name there (``library/`` added for Docker Hub).
    """

    namespace: str
    repository: str
    upstream: Upstream
    remote_repository: str


class _Lru(Generic[K, V]):
    """A dict that forgets its least recently used entries beyond ``size``."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(slots=True)
class _Cached:
    verdict: Verdict
    until: float  # reused until then (clock seconds)
    checked: float  # when the upstream said so


@dataclass(slots=True)
class _RegistryState:
    """What the gate learned about one upstream registry."""

    size: int
    challenge: Challenge | None = None
    base: PullProbe | None = None  # the upstream's answer to an anonymous /v2/
    base_until: float = float("-inf")
    keys: KeySet | None = None
    keys_url: str | None = None
    keys_until: float = float("-inf")
    keys_fetched: float = float("-inf")
    anonymous: _Lru[str, _Cached] = field(init=False)
    checks: _Lru[tuple[str, str], _Cached] = field(init=False)
    grants: _Lru[str, TokenGrant] = field(init=False)

    def __post_init__(self) -> None:
        self.anonymous = _Lru(self.size)
        self.checks = _Lru(self.size)
        self.grants = _Lru(self.size)


class AccessGate:
    """Decides, once per request and before any work, whether a client may read what it asks.

    Args:
        config: the agent configuration (``[access]``, ``[[upstream]]`` settings, timeouts).
        upstreams: the pool that maps namespaces to upstreams.
        metrics: ``p2pd_auth_denied_total`` and ``p2pd_auth_checks_total``.
        clock: epoch seconds (token expiry is wall-clock time); tests pass a fake.
    """

    def __init__(self, config: AgentConfig, upstreams: UpstreamResolver, metrics: AgentMetrics,
                 *, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._settings = config.access
        self._upstreams = upstreams
        self._metrics = metrics
        self._clock = clock
        self._registries: dict[str, _RegistryState] = {}
        self._links: _Lru[tuple[str, str, Digest], bool] = _Lru(self._settings.max_links)
        self._unlinked: _Lru[tuple[str, str, Digest], float] = _Lru(self._settings.max_entries)
        self._locks: dict[Hashable, trio.Lock] = {}
        self._denials_logged: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    # ---- the two questions -------------------------------------------------------------

    async def authorize(self, request: Request, namespace: str | None, repository: str, *,
                        manifest: bool) -> Access:
        """May this request's client pull ``repository`` of ``namespace``?

        Args:
            request: the client's request (its ``Authorization`` header is the credential).
            namespace: containerd's ``ns`` as ``check_namespace`` returned it.
            repository: the repository the client named.
            manifest: a manifest request (else a blob), for the code of a 404.

        Returns:
            The ``Access`` to pass to ``require_link`` and ``learn_*``.

        Raises:
            OCIError: 401 with the upstream's challenge (no or unusable credentials), 403 (Basic
                credentials without pull), or 404 when nothing can be decided now (containerd
                then asks the registry itself).
        """
        try:
            upstream, remote = self._upstreams.resolve(namespace, repository)
            settings = self._upstreams.settings(namespace)
        except UpstreamError as exc:  # EgressRefused: already refused by check_namespace in practice
            raise OCIError("MANIFEST_UNKNOWN" if manifest else "BLOB_UNKNOWN", "this mirror does not serve that "
                           "registry", status=404) from exc
        access = Access(namespace or "", repository, upstream, remote)
        if settings.anonymous_pull or settings.username is None:
            # Opened by the operator, or nothing to protect: without credentials the agent
            # fetches only what the upstream serves anonymously, and links keep each
            # repository to its own digests.
            return access
        credential = parse_authorization(request.headers.get("authorization"))
        state = self._state(upstream)
        anonymous = await self._anonymous_verdict(state, upstream, remote)
        presented: Verdict | None = None
        rejection: str | None = None
        if anonymous is not Verdict.ALLOWED and credential.kind in (CredentialKind.BEARER, CredentialKind.BASIC):
            presented, rejection = await self._credential_verdict(state, upstream, settings, credential, remote)
        decision = decide_pull(open_namespace=False, credential=credential.kind, anonymous=anonymous,
                               presented=presented, rejection=rejection, challenge=state.challenge,
                               repository=remote, manifest=manifest)
        if not decision.allowed:
            self._refuse(request, access, decision)
        return access

    def is_linked(self, access: Access, digest: Digest) -> bool:
        """Whether the repository is known to reference ``digest`` (no I/O)."""
        return bool(self._links.get((access.namespace, access.repository, digest)))

    async def authorize_base(self, request: Request, namespace: str | None) -> None:
        """The ``/v2/`` ping: 401 with the upstream's challenge when the upstream challenges an
        anonymous ping and the namespace's clients are checked (podman and skopeo log in only
        when the ping asks them to); otherwise nothing to refuse.

        Raises:
            OCIError: 401 UNAUTHORIZED with the upstream's challenge.
        """
        try:
            settings = self._upstreams.settings(namespace)
            upstream = self._upstreams.upstream(namespace)
        except (OCIError, UpstreamError):
            return  # a namespace this agent does not serve: its manifests and blobs are 404 anyway
        credential = parse_authorization(request.headers.get("authorization"))
        checked = not settings.anonymous_pull and settings.username is not None
        probe: PullProbe | None = None
        if checked and credential.kind is CredentialKind.NONE and isinstance(upstream, RegistryAccessClient):
            probe = await self._base_probe(self._state(upstream), upstream)
        decision = decide_base(checked=checked, credential=credential.kind, upstream=probe)
        if not decision.allowed:
            self._refuse(request, Access(namespace or "", "", upstream, ""), decision)

    async def require_link(self, request: Request, access: Access, digest: Digest, *, manifest: bool) -> None:
        """Is ``digest`` part of the repository ``access`` is for?

        Known links answer at once; an unknown one is asked of the upstream under the
        repository (``HEAD`` with the agent's credentials) and remembered. Needed before a
        digest is read from the store, joined in flight or asked of peers; a fetch from the
        upstream under the repository is its own confirmation.

        Raises:
            OCIError: 404 BLOB_UNKNOWN / MANIFEST_UNKNOWN when it is not, or cannot be confirmed.
        """
        key = (access.namespace, access.repository, digest)
        if self._links.get(key):
            return
        verdict = await self._confirm_link(access, digest, manifest=manifest)
        decision = decide_link(verdict, manifest=manifest)
        if not decision.allowed:
            self._refuse(request, access, decision)

    def learn_link(self, access: Access, digest: Digest) -> None:
        """Records that the repository references ``digest`` (a tag resolved to it, say)."""
        self._links.put((access.namespace, access.repository, digest), True)

    def learn_manifest(self, access: Access, digest: Digest, body: bytes) -> None:
        """Records a manifest served for the repository and everything it references."""
        self.learn_link(access, digest)
        try:
            parsed = parse_manifest(body, None)
        except OCIError:
            return  # not a manifest we understand: its blobs are confirmed one by one upstream
        for reference in parsed.references:
            self.learn_link(access, reference.digest)

    # ---- evidence ----------------------------------------------------------------------

    def _state(self, upstream: Upstream) -> _RegistryState:
        key = getattr(upstream, "url", None) or repr(upstream)
        state = self._registries.get(key)
        if state is None:
            state = self._registries[key] = _RegistryState(self._settings.max_entries)
        return state

    @contextlib.asynccontextmanager
    async def _exclusive(self, key: Hashable) -> AsyncIterator[None]:
        """One task at a time per key, so concurrent requests share one upstream question."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = trio.Lock()
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting and self._locks.get(key) is lock:
                del self._locks[key]

    async def _base_probe(self, state: _RegistryState, upstream: RegistryAccessClient) -> PullProbe | None:
        if state.base_until > self._clock():
            return state.base
        async with self._exclusive(("base", upstream.url)):
            now = self._clock()
            if state.base_until > now:
                return state.base
            self._metrics.auth_checks.labels("anonymous_probe").inc()
            try:
                with trio.fail_after(self._config.fetch.manifest_timeout):
                    state.base = await upstream.probe_base()
            except (UpstreamError, trio.TooSlowError):
                return state.base  # the last answer, if any
            if state.base.challenge is not None:
                state.challenge = state.challenge or state.base.challenge
            state.base_until = now + self._settings.anonymous_ttl
            return state.base

    async def _anonymous_verdict(self, state: _RegistryState, upstream: Upstream, remote: str) -> Verdict:
        cached = state.anonymous.get(remote)
        if cached is not None and cached.until > self._clock():
            return cached.verdict
        if not isinstance(upstream, RegistryAccessClient):
            return Verdict.UNKNOWN  # an upstream that cannot be asked: nothing is served without a check
        async with self._exclusive(("anonymous", upstream.url, remote)):
            cached = state.anonymous.get(remote)
            now = self._clock()
            if cached is not None and cached.until > now:
                return cached.verdict
            self._metrics.auth_checks.labels("anonymous_probe").inc()
            try:
                with trio.fail_after(self._config.fetch.manifest_timeout):
                    probe = await upstream.probe_pull(remote)
            except (UpstreamError, trio.TooSlowError) as exc:
                # Stale-if-error, like tags: the last answer while the upstream is unreachable.
                if cached is not None and now - cached.checked < self._config.cache.tag_stale_max:
                    return cached.verdict
                log.info("cannot ask %s whether anonymous clients may pull %s: %s", upstream.url, remote,
                         exc or "timeout")
                return Verdict.UNKNOWN
            if probe.challenge is not None:
                state.challenge = probe.challenge
            verdict = Verdict.ALLOWED if 200 <= probe.status < 300 else Verdict.DENIED
            state.anonymous.put(remote, _Cached(verdict, now + self._settings.anonymous_ttl, now))
            return verdict

    async def _credential_verdict(self, state: _RegistryState, upstream: Upstream, settings: UpstreamConfig,
                                  credential: Credential, remote: str) -> tuple[Verdict, str | None]:
        """Whether the client's own credential grants pull on ``remote``, and if not, why."""
        if credential.kind is CredentialKind.BEARER:
            grant = state.grants.get(credential.fingerprint)
            if grant is None or grant.expires_at + TOKEN_LEEWAY <= self._clock():
                grant = None
                try:
                    grant = await self._verify_offline(state, upstream, settings, credential)
                except TokenRejected as exc:
                    return Verdict.DENIED, exc.reason
            if grant is not None:
                return (Verdict.ALLOWED, None) if grant.allows_pull(remote) else (Verdict.DENIED, "insufficient_scope")
        return await self._upstream_check(state, upstream, credential, remote)

    async def _verify_offline(self, state: _RegistryState, upstream: Upstream, settings: UpstreamConfig,
                              credential: Credential) -> TokenGrant | None:
        """The token's grant, verified with the issuer's keys; None when that is not possible.

        Raises:
            TokenRejected: the token is not valid (an unknown key is not a rejection: the
                issuer may sign with keys it does not publish, so the upstream is asked).
        """
        challenge = state.challenge
        if challenge is None or challenge.scheme != "bearer" or challenge.service is None:
            return None  # no audience to check against: only the upstream can tell
        if not looks_like_jwt(credential.token):
            return None  # an opaque token: only its issuer can tell
        for refresh in (False, True):
            keys = await self._keys(state, upstream, settings, refresh=refresh)
            if keys is None:
                return None
            try:
                grant = verify_token(credential.token, keys, audience=challenge.service,
                                     issuer=settings.token_issuer, now=self._clock())
            except UnknownKey:
                continue
            finally:
                self._metrics.auth_checks.labels("offline").inc()
            state.grants.put(credential.fingerprint, grant)
            return grant
        return None

    async def _keys(self, state: _RegistryState, upstream: Upstream, settings: UpstreamConfig,
                    *, refresh: bool) -> KeySet | None:
        challenge = state.challenge
        url = settings.jwks_url or (default_jwks_url(challenge.realm) if challenge is not None else None)
        if url is None or not isinstance(upstream, RegistryAccessClient):
            return None
        now = self._clock()
        if state.keys_url == url:
            if not refresh and state.keys_until > now:
                return state.keys
            if refresh and now - state.keys_fetched < self._settings.jwks_min_interval:
                return state.keys
        async with self._exclusive(("jwks", url)):
            if state.keys_url == url and state.keys_fetched >= now:
                return state.keys  # fetched while this task waited
            self._metrics.auth_checks.labels("jwks_fetch").inc()
            try:
                with trio.fail_after(self._config.fetch.manifest_timeout):
                    document = await upstream.fetch_jwks(url)
            except (UpstreamError, trio.TooSlowError) as exc:
                log.info("cannot fetch token keys from %s: %s", url, exc or "timeout")
                return state.keys if state.keys_url == url else None
            keys: KeySet | None = None
            if document is not None:
                try:
                    keys = KeySet.from_jwks(document)
                except ValueError as exc:
                    log.warning("ignoring the token keys at %s: %s", url, exc)
            state.keys, state.keys_url = keys, url
            state.keys_fetched = self._clock()
            state.keys_until = state.keys_fetched + self._settings.jwks_ttl
            return keys

    async def _upstream_check(self, state: _RegistryState, upstream: Upstream, credential: Credential,
                              remote: str) -> tuple[Verdict, str | None]:
        key = (credential.fingerprint, remote)
        cached = state.checks.get(key)
        if cached is None or cached.until <= self._clock():
            if not isinstance(upstream, RegistryAccessClient):
                return Verdict.UNKNOWN, None
            async with self._exclusive(("check", upstream.url, *key)):
                cached = state.checks.get(key)
                now = self._clock()
                if cached is None or cached.until <= now:
                    cached = await self._ask_upstream(state, upstream, credential, remote, now)
        if cached.verdict is Verdict.DENIED:
            return Verdict.DENIED, "upstream_denied"
        return cached.verdict, None

    async def _ask_upstream(self, state: _RegistryState, upstream: RegistryAccessClient, credential: Credential,
                            remote: str, now: float) -> _Cached:
        self._metrics.auth_checks.labels("upstream").inc()
        try:
            with trio.fail_after(self._config.fetch.manifest_timeout):
                status = await upstream.check_pull(remote, credential.header)
        except (UpstreamError, trio.TooSlowError) as exc:
            log.info("cannot check a client's credentials for %s at %s: %s", remote, upstream.url, exc or "timeout")
            return _Cached(Verdict.UNKNOWN, now, now)  # not stored
        if 200 <= status < 300:
            expires = unverified_expiry(credential.token) if credential.kind is CredentialKind.BEARER else None
            until = now + self._settings.check_ttl
            until = min(until, expires) if expires is not None else min(until, now + self._settings.opaque_ttl)
            result = _Cached(Verdict.ALLOWED, until, now)
        elif status in (401, 403, 404):
            result = _Cached(Verdict.DENIED, now + self._settings.denied_ttl, now)
        else:  # a redirect or an odd status: not an answer to rely on
            return _Cached(Verdict.UNKNOWN, now, now)
        state.checks.put((credential.fingerprint, remote), result)
        return result

    async def _confirm_link(self, access: Access, digest: Digest, *, manifest: bool) -> Verdict:
        key = (access.namespace, access.repository, digest)
        refused_until = self._unlinked.get(key)
        if refused_until is not None and refused_until > self._clock():
            return Verdict.DENIED
        async with self._exclusive(("link", *key)):
            if self._links.get(key):
                return Verdict.ALLOWED
            self._metrics.auth_checks.labels("link_upstream").inc()
            try:
                with trio.fail_after(self._config.fetch.manifest_timeout):
                    if manifest:
                        await access.upstream.head_manifest(access.remote_repository, str(digest))
                    else:
                        await access.upstream.blob_size(access.remote_repository, digest)
            except (UpstreamNotFound, UpstreamAuthError):
                self._unlinked.put(key, self._clock() + self._settings.denied_ttl)
                return Verdict.DENIED
            except (UpstreamError, trio.TooSlowError):
                return Verdict.UNKNOWN
            self.learn_link(access, digest)
            return Verdict.ALLOWED

    # ---- refusals ----------------------------------------------------------------------

    def _refuse(self, request: Request, access: Access, decision: Decision) -> NoReturn:
        """Counts and (rate-limited) logs a refusal, then raises its error response."""
        self._metrics.auth_denied.labels(decision.reason).inc()
        client = request.client[0] if request.client else "-"
        key = (decision.reason, client, f"{access.namespace}/{access.repository}")
        now = time.monotonic()
        last = self._denials_logged.get(key)
        if last is None or now - last >= _DENIAL_LOG_INTERVAL:
            self._denials_logged[key] = now
            self._denials_logged.move_to_end(key)
            while len(self._denials_logged) > _DENIAL_LOG_KEYS:
                self._denials_logged.popitem(last=False)
            log.info("refused %s %s for %s (ns=%s, repository %s): %s -> %d (logged once a minute per client, "
                     "repository and reason)", request.method, request.route, client, access.namespace or "-",
                     access.repository, decision.reason, decision.status)
        raise decision.error()
