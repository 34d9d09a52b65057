"""The seed's token service, as Docker/OCI clients expect it (the realm of the 401 challenge).

- ``GET /token?service=S&scope=repository:NAME:pull,push`` with Basic credentials (docker,
  skopeo, podman) or none (anonymous: a token with what anonymous callers may do).
- ``POST /token`` with a form body (OAuth2): ``grant_type=password`` (containerd sends
  username, password, scope, service, client_id) or ``grant_type=refresh_token``;
  ``access_type=offline`` (or GET's ``offline_token=true``) also returns a refresh token.
- ``GET /token/keys``: the JWKS other services (p2pd) use to verify tokens offline.

Scopes granted are the scopes requested intersected with what the access policy allows now.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from p2pd.httpd import Request, Response
from p2pd.oci.errors import OCIError
from p2pd.oci.grammar import validate_name

from ..access import AccessPolicy
from ..errors import CredentialsRejected
from .authenticator import Authenticator, AuthEvent, LoginThrottled, parse_basic
from .identity import ANONYMOUS, Principal
from .tokens import TokenAuthority

__all__ = ["MAX_SCOPES", "TokenService", "parse_scopes"]

MAX_SCOPES = 32
_MAX_SCOPE_LENGTH = 512
_MAX_FORM_BODY = 16 * 1024
_KNOWN_ACTIONS = {"pull", "push", "delete", "*"}


def parse_scopes(values: list[str]) -> list[tuple[str, str, frozenset[str]]]:
    """``repository:NAME:pull,push`` strings (space-separated too) → (type, name, actions).

    Raises ``OCIError`` 400 for malformed scopes, names that break the OCI grammar, unknown
    actions or too many scopes. Resource types other than ``repository`` and
    ``registry:catalog`` are skipped (nothing to grant).
    """
    scopes: list[tuple[str, str, frozenset[str]]] = []
    for value in values:
        for scope in value.split():
            if len(scope) > _MAX_SCOPE_LENGTH or len(scopes) >= MAX_SCOPES:
                raise OCIError("BAD_REQUEST", "too many or too long scopes", status=400)
            resource_type, sep1, rest = scope.partition(":")
            name, sep2, actions_text = rest.rpartition(":")
            if not (sep1 and sep2 and name and actions_text):
                raise OCIError("BAD_REQUEST", "malformed scope", status=400, detail={"scope": scope[:100]})
            actions = frozenset(a for a in actions_text.split(",") if a)
            if not actions or not actions <= _KNOWN_ACTIONS:
                raise OCIError("BAD_REQUEST", "unknown action in scope", status=400, detail={"scope": scope[:100]})
            resource_type = resource_type.split("(", 1)[0]  # "repository(plugin)" is a repository
            if resource_type == "repository":
                validate_name(name)
                scopes.append(("repository", name, actions))
            elif resource_type == "registry" and name == "catalog":
                scopes.append(("registry", "catalog", actions))
    return scopes


class TokenService:
    """Handles ``/token`` and ``/token/keys``.

    Args:
        authenticator: checks credentials.
        authority: issues tokens.
        policy: returns the current access policy (it changes on reload).
        on_event: audit hook.
    """

    def __init__(self, authenticator: Authenticator, authority: TokenAuthority,
                 policy: Callable[[], AccessPolicy], on_event: AuthEvent) -> None:
        self.authenticator = authenticator
        self.authority = authority
        self._policy = policy
        self._on_event = on_event

    async def handle(self, request: Request, source: str) -> Response:
        if request.path == "/token/keys":
            request.route = "token-keys"
            if request.method not in ("GET", "HEAD"):
                raise OCIError("UNSUPPORTED", "method not allowed", status=405, headers=[("Allow", "GET, HEAD")])
            return _json(200, self.authority.keys.jwks(), [("Cache-Control", "max-age=60")])
        request.route = "token"
        if request.method in ("GET", "HEAD"):
            return await self._get(request, source)
        if request.method == "POST":
            return await self._post(request, source)
        raise OCIError("UNSUPPORTED", "method not allowed", status=405, headers=[("Allow", "GET, POST")])

    def _check_service(self, service: str | None) -> None:
        if service is not None and service != self.authority.service:
            raise OCIError("BAD_REQUEST", "unknown service", status=400, detail={"service": service[:100]})

    async def _get(self, request: Request, source: str) -> Response:
        self._check_service(request.query_one("service"))
        scopes = parse_scopes(request.query.get("scope", []))
        authorization = request.headers.get("authorization")
        principal: Principal = ANONYMOUS
        if authorization is not None:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "basic":
                raise _unauthorized("the token service takes Basic credentials")
            principal = await self._login(*_basic(value), source)
        offline = request.query_one("offline_token") == "true"
        return self._issue(principal, scopes, source, refresh=offline and not principal.is_anonymous)

    async def _post(self, request: Request, source: str) -> Response:
        form = await _read_form(request)
        self._check_service(_one(form, "service"))
        scopes = parse_scopes(form.get("scope", []))
        grant_type = _one(form, "grant_type")
        if grant_type == "password":
            username, password = _one(form, "username"), _one(form, "password")
            if not username or password is None:
                raise OCIError("BAD_REQUEST", "username and password are required", status=400)
            principal = await self._login(username, password, source)
            refresh = _one(form, "access_type") == "offline"
        elif grant_type == "refresh_token":
            refresh_token = _one(form, "refresh_token")
            if not refresh_token:
                raise OCIError("BAD_REQUEST", "refresh_token is required", status=400)
            try:
                principal = self.authenticator.verify_refresh(refresh_token)
            except CredentialsRejected as exc:
                self._on_event("login.failure", {"source": source, "detail": {"reason": "refresh token rejected"}})
                raise _unauthorized(str(exc)) from None
            refresh = False
        else:
            raise OCIError("BAD_REQUEST", "unsupported grant_type", status=400)
        return self._issue(principal, scopes, source, refresh=refresh)

    async def _login(self, username: str, password: str, source: str) -> Principal:
        try:
            return await self.authenticator.login(username, password, source)
        except LoginThrottled as exc:
            raise OCIError("TOOMANYREQUESTS", "too many failed logins", status=429,
                           headers=[("Retry-After", str(max(1, int(exc.retry_after + 0.999))))]) from None
        except CredentialsRejected:
            raise _unauthorized("authentication failed") from None

    def _issue(self, principal: Principal, scopes: list[tuple[str, str, frozenset[str]]], source: str,
               *, refresh: bool) -> Response:
        policy = self._policy()
        granted: list[tuple[str, str, frozenset[str]]] = []
        for resource_type, name, actions in scopes:
            if resource_type == "registry":
                if not principal.is_anonymous or policy.has_public:
                    granted.append((resource_type, name, frozenset({"*"})))
                continue
            allowed = policy.grantable(principal, name, actions)
            # An empty grant is still written: the client then learns "denied" from the
            # registry's 401/403, the same answer whether the repository exists or not.
            granted.append((resource_type, name, allowed))
        issued = self.authority.issue(principal, granted)
        document: dict[str, Any] = {"token": issued.token, "access_token": issued.token,
                                    "expires_in": issued.expires_in, "issued_at": issued.issued_at}
        if refresh:
            document["refresh_token"] = self.authority.issue_refresh(principal)
        self._on_event("token.issued", {
            "actor": principal.name, "actor_kind": principal.kind, "provider": principal.provider, "source": source,
            "scopes": [f"{t}:{n}:{','.join(sorted(a))}" for t, n, a in granted]})
        return _json(200, document, [("Cache-Control", "no-store"), ("Pragma", "no-cache")])


def _basic(value: str) -> tuple[str, str]:
    try:
        return parse_basic(value)
    except CredentialsRejected:
        raise _unauthorized("malformed Basic credentials") from None


def _unauthorized(message: str) -> OCIError:
    return OCIError("UNAUTHORIZED", message, status=401, headers=[("WWW-Authenticate", 'Basic realm="seed"')])


async def _read_form(request: Request) -> dict[str, list[str]]:
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise OCIError("BAD_REQUEST", "expected an application/x-www-form-urlencoded body", status=400)
    body = await request.body.read(_MAX_FORM_BODY)
    try:
        return urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False,
                                     max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        raise OCIError("BAD_REQUEST", "malformed form body", status=400) from None


def _one(form: Mapping[str, list[str]], key: str) -> str | None:
    values = form.get(key)
    return values[0] if values else None


def _json(status: int, document: Any, headers: list[tuple[str, str]]) -> Response:
    return Response(status, [("Content-Type", "application/json"), *headers],
                    json.dumps(document, separators=(",", ":")).encode())
