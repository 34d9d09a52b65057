"""Credentials → principal: the ``Authorization`` header of a request, or a login at the token
service, checked against the identity providers in order, with brute-force throttling.

Rules/invariants:
- Providers are tried in the configured order; the first that vouches for the user wins.
  When none does and one of them could not be asked, the login fails (closed) and the log
  says which provider was down, never with the password.
- Throttling is checked before any provider is asked, so a locked-out user or address costs
  no bcrypt or LDAP round trip.
- Every login success and failure is reported to ``on_event`` (the audit log), with the
  source address and never the secret.
- Robot tokens are re-checked against the robot store on every use: a revoked robot's token
  stops working at once.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import trio

from ..errors import CredentialsRejected, ProviderUnavailable, TokenInvalid
from .identity import ANONYMOUS, IdentityProvider, Principal
from .robots import RobotStore, RobotStoreError
from .throttle import LoginThrottle
from .tokens import TokenAuthority, TokenClaims, robot_principal_with

__all__ = ["MAX_AUTHORIZATION_LENGTH", "AuthEvent", "Authenticator", "Caller", "LoginThrottled"]

log = logging.getLogger("seed.auth")

MAX_AUTHORIZATION_LENGTH = 10 * 1024
_MAX_USERNAME = 256
_VERIFIED_CACHE_SIZE = 4096
_MAX_PASSWORD = 1024

# (action, fields) → the audit log; fields never contain secrets.
AuthEvent = Callable[[str, Mapping[str, Any]], None]


class LoginThrottled(CredentialsRejected):
    """Too many failed logins for this user or address: try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many failed logins, retry after {retry_after:.0f}s")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request, as far as its credentials show.

    Attributes:
        principal: the authenticated principal, or ``ANONYMOUS``.
        via: ``none`` (no Authorization header), ``basic`` or ``bearer``.
        token: the verified bearer token, if any (its access is a ceiling on the request).
        source: the client's address, for throttling and the audit log.
    """

    principal: Principal
    via: Literal["none", "basic", "bearer"]
    token: TokenClaims | None
    source: str

    @property
    def token_access(self) -> Mapping[str, frozenset[str]] | None:
        return self.token.access if self.token is not None else None


class Authenticator:
    """Checks credentials against the providers (in order), robot tokens against the store.

    Args:
        providers: identity providers in the order they are tried.
        tokens: verifies bearer tokens.
        throttle: failed-login throttling.
        robots: the robot store (to re-check robot tokens), if robots are enabled.
        on_event: audit hook, ``on_event(action, fields)``.
    """

    def __init__(self, providers: Sequence[IdentityProvider], tokens: TokenAuthority, throttle: LoginThrottle,
                 robots: RobotStore | None, on_event: AuthEvent) -> None:
        self.providers = tuple(providers)
        self.tokens = tokens
        self.throttle = throttle
        self.robots = robots
        self._on_event = on_event
        self._clock = time.time
        self._verified: dict[str, TokenClaims] = {}

    async def identify(self, authorization: str | None, source: str) -> Caller:
        """The caller of a request with this ``Authorization`` header.

        Raises:
            CredentialsRejected: wrong or malformed credentials, bad token (answer 401).
            LoginThrottled: too many failures (answer 429 with Retry-After).
        """
        if authorization is None:
            return Caller(ANONYMOUS, "none", None, source)
        if len(authorization) > MAX_AUTHORIZATION_LENGTH:
            raise CredentialsRejected("Authorization header too long")
        scheme, _, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            username, password = parse_basic(value)
            principal = await self.login(username, password, source)
            return Caller(principal, "basic", None, source)
        if scheme == "bearer":
            claims = self.verify_token(value.strip())
            return Caller(claims.principal, "bearer", claims, source)
        raise CredentialsRejected("unsupported authorization scheme")

    def verify_token(self, token: str) -> TokenClaims:
        """A verified access token whose principal still exists (robots re-checked).

        A token verified once is remembered until it expires (bounded), so a client that
        sends the same token with every request pays for one ECDSA verification, not one per
        request. Robots are looked up again every time.
        """
        cached = self._verified.get(token)
        if cached is not None and cached.expires_at > self._clock():
            return self._current(cached)
        try:
            claims = self.tokens.verify(token)
        except TokenInvalid as exc:
            raise CredentialsRejected(str(exc)) from None
        if len(self._verified) >= _VERIFIED_CACHE_SIZE:
            self._verified.pop(next(iter(self._verified)))  # oldest first
        self._verified[token] = claims
        return self._current(claims)

    def verify_refresh(self, token: str) -> Principal:
        try:
            claims = self.tokens.verify(token, use="refresh")
        except TokenInvalid as exc:
            raise CredentialsRejected(str(exc)) from None
        return self._current(claims).principal

    def _current(self, claims: TokenClaims) -> TokenClaims:
        principal = claims.principal
        if principal.kind != "robot" or claims.external:
            return claims
        try:
            record = self.robots.get(principal.name.removeprefix("robot$")) if self.robots is not None else None
        except RobotStoreError as exc:  # fail closed: a robot we cannot look up is not let in
            log.error("robot store unreadable: %s", exc)
            raise CredentialsRejected("robot account cannot be checked") from None
        if record is None or not record.usable():
            raise CredentialsRejected("robot account revoked or expired")
        return TokenClaims(robot_principal_with(claims, record.grants), claims.access, claims.catalog,
                           claims.expires_at, claims.token_id, claims.issuer)

    async def login(self, username: str, password: str, source: str) -> Principal:
        """Username and password → principal, through the providers in order.

        Raises:
            LoginThrottled: too many recent failures for this user or address.
            CredentialsRejected: no provider vouched for the user.
        """
        wait = self.throttle.check(username, source)
        if wait is not None:
            self._on_event("login.failure", {"actor": username, "source": source, "detail": {"reason": "throttled"}})
            raise LoginThrottled(wait)
        unavailable: list[str] = []
        for provider in self.providers:
            try:
                principal = await trio.to_thread.run_sync(provider.authenticate, username, password,
                                                          abandon_on_cancel=True)
            except ProviderUnavailable as exc:
                log.warning("identity provider %s unavailable: %s", provider.name, exc)
                unavailable.append(provider.name)
                continue
            if principal is not None:
                self.throttle.record_success(username, source)
                self._on_event("login.success", {"actor": principal.name, "actor_kind": principal.kind,
                                                 "provider": principal.provider, "source": source})
                return principal
        self.throttle.record_failure(username, source)
        detail: dict[str, Any] = {"reason": "provider unavailable" if unavailable else "bad credentials"}
        if unavailable:
            detail["unavailable"] = unavailable
        self._on_event("login.failure", {"actor": username, "source": source, "detail": detail})
        raise CredentialsRejected("authentication failed")


def parse_basic(value: str) -> tuple[str, str]:
    """The ``user:password`` of a Basic credential; raises ``CredentialsRejected`` if malformed."""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise CredentialsRejected("malformed Basic credentials") from None
    username, sep, password = decoded.partition(":")
    if not sep or not username or len(username) > _MAX_USERNAME or len(password) > _MAX_PASSWORD:
        raise CredentialsRejected("malformed Basic credentials")
    if any(ord(c) < 32 or ord(c) == 127 for c in username):
        raise CredentialsRejected("malformed Basic credentials")
    return username, password
