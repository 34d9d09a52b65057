"""The door every registry request passes: who is asking (``seed.auth``), may they
(``seed.access``), and what the log says about it (the audit hook).

The registry calls ``Gate.admit`` exactly once per ``/v2/`` request, after routing and
before any handler or storage sees the request. A refused request never reaches storage,
so the answer cannot depend on whether the repository exists.

Answers to a refusal, as Docker/OCI clients expect them:
- no credentials → 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``;
- a bearer token without the needed scope → the same 401 with ``error="insufficient_scope"``
  (the client may ask for a new token; the token service grants only what the policy allows);
- Basic credentials without the right → 403 ``DENIED``;
- wrong credentials → 401; too many failures → 429 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from p2pd.httpd import Request
from p2pd.oci.errors import OCIError

from .access import AccessPolicy, Need, needs_for
from .auth.authenticator import Authenticator, Caller, LoginThrottled
from .auth.identity import ANONYMOUS
from .errors import CredentialsRejected

__all__ = ["AuditHook", "Gate", "open_caller"]

log = logging.getLogger("seed.gate")

AuditHook = Callable[[str, Mapping[str, Any]], None]
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]{1,253}(:\d{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:\d{1,5})?")
_DENIAL_LOG_SIZE = 4096
_ANONYMOUS_DENIAL_INTERVAL = 60.0  # seconds: a client's first, credential-less try is normal
_DENIAL_INTERVAL = 10.0


def open_caller(request: Request) -> Caller:
    return Caller(ANONYMOUS, "none", None, _source(request))


def _source(request: Request) -> str:
    return request.client[0] if request.client else "-"


class Gate:
    """Authentication and the access decision for one seed.

    Args:
        policy: the current access policy (``replace_policy`` swaps it on reload).
        authenticator: checks credentials; ``None`` when the seed runs open.
        service: the token service name (``service=`` of the challenge).
        realm: the token endpoint URL; ``None`` builds it from the request's Host header.
        scheme: ``http`` or ``https``, for a realm built from the Host header.
        audit: the audit hook.
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(self, policy: AccessPolicy, authenticator: Authenticator | None, *, service: str,
                 realm: str | None, scheme: str, audit: AuditHook,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self.authenticator = authenticator
        self.service = service
        self.realm = realm
        self.scheme = scheme
        self._audit = audit
        self._clock = clock
        self._recent_denials: OrderedDict[tuple[str, ...], float] = OrderedDict()

    @property
    def policy(self) -> AccessPolicy:
        return self._policy

    def replace_policy(self, policy: AccessPolicy) -> None:
        self._policy = policy

    async def admit(self, request: Request, route: str, name: str | None) -> Caller:
        """Authenticates the request and decides whether it may go on; raises ``OCIError`` if not."""
        source = _source(request)
        if self.authenticator is None:
            return Caller(ANONYMOUS, "none", None, source)
        needs = needs_for(route, request.method, name, request.query)
        try:
            caller = await self.authenticator.identify(request.headers.get("authorization"), source)
        except LoginThrottled as exc:
            raise OCIError("TOOMANYREQUESTS", "too many failed logins", status=429,
                           headers=[("Retry-After", str(max(1, int(exc.retry_after + 0.999))))]) from None
        except CredentialsRejected as exc:
            raise OCIError("UNAUTHORIZED", "authentication required", status=401,
                           headers=[self._challenge(request, needs, error="invalid_token")],
                           detail={"reason": str(exc)[:200]}) from None
        decision = self._policy.decide(caller.principal, needs, caller.token_access)
        if decision.allowed:
            return caller
        self._record_denial(caller, request, decision.missing)
        if caller.via == "basic":
            raise OCIError("DENIED", "requested access to the resource is denied", status=403)
        error = "insufficient_scope" if caller.via == "bearer" else None
        raise OCIError("UNAUTHORIZED", "authentication required", status=401,
                       headers=[self._challenge(request, decision.missing, error=error)])

    def visible(self, caller: Caller, repositories: Iterable[str]) -> list[str]:
        """Catalog filtering: only what the caller may pull."""
        return self._policy.visible(caller.principal, repositories)

    def _challenge(self, request: Request, needs: Iterable[Need], *, error: str | None = None) -> tuple[str, str]:
        realm = self.realm or f"{self.scheme}://{self._host(request)}/token"
        parts = [f'realm="{realm}"', f'service="{self.service}"']
        scopes = [need.scope() for need in needs if need.action not in ("login",)]
        if scopes:
            parts.append(f'scope="{" ".join(scopes)}"')
        if error:
            parts.append(f'error="{error}"')
        return ("WWW-Authenticate", "Bearer " + ",".join(parts))

    @staticmethod
    def _host(request: Request) -> str:
        host = request.headers.get("host") or ""
        if _HOST_RE.fullmatch(host):
            return host
        # A Host header we would not put in a URL: fall back to the address the client reached.
        return "localhost"

    def _record_denial(self, caller: Caller, request: Request, missing: tuple[Need, ...]) -> None:
        principal = caller.principal
        repository = next((need.repository for need in missing if need.repository), None) or ""
        action = ",".join(sorted({need.action for need in missing}))
        key = (caller.via, principal.name, caller.source, repository, action)
        now = self._clock()
        interval = _ANONYMOUS_DENIAL_INTERVAL if caller.via == "none" else _DENIAL_INTERVAL
        last = self._recent_denials.get(key)
        if last is not None and now - last < interval:
            return
        self._recent_denials[key] = now
        self._recent_denials.move_to_end(key)
        while len(self._recent_denials) > _DENIAL_LOG_SIZE:
            self._recent_denials.popitem(last=False)
        self._audit("access.denied", {"actor": principal.name, "actor_kind": principal.kind,
                                      "provider": principal.provider, "source": caller.source,
                                      "repository": repository,
                                      "detail": {"method": request.method, "route": request.route,
                                                 "needs": action, "via": caller.via}})
