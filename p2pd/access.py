"""Who may pull what through the agent: the pure half of client authorization.

A node that cached a private image must not become the hole in the registry's access control.
For every manifest or blob request, the front (``p2pd.registry``) asks ``p2pd.gate.AccessGate``
once, before the store, the fetcher, the peers or the upstream is touched; the gate gathers the
evidence (what the upstream answers an anonymous client, the client's token verified against
the issuer's keys, or one upstream check with the client's own credentials) and the functions
here decide:

- ``decide_pull``: may this client pull this repository? Anonymous clients of a repository
  the upstream does not serve anonymously get the upstream's own challenge (401 +
  ``WWW-Authenticate``), so containerd and podman fetch a token from the upstream's realm with
  their own credentials and come back with it.
- ``decide_link``: is this digest part of this repository? A blob or a manifest by digest is
  served under a repository only when a manifest of that repository references it (or the
  upstream confirmed it): knowing a digest is not a right to its bytes.

Rules/invariants:
- No I/O here (no trio, no httpx, no files): values in, decisions out; tested as a matrix in
  ``tests/test_p2pd_access.py``.
- ``alg`` never comes from the token: each key's algorithm is the one its JWKS entry names (or
  its type implies), from a fixed list of asymmetric algorithms — ``none`` and HMAC never verify.
- A token's ``access`` claim is read for one thing only: ``pull`` (or ``*``) on the repository.
- Credentials (tokens, Basic headers) never appear in reprs, exception messages or logs; caches
  key them by their sha256 (``Credential.fingerprint``).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt

from .errors import P2PDError
from .oci.errors import OCIError

__all__ = [
    "MAX_AUTHORIZATION_LENGTH",
    "MAX_TOKEN_LENGTH",
    "TOKEN_LEEWAY",
    "Challenge",
    "Credential",
    "CredentialKind",
    "Decision",
    "KeySet",
    "PullProbe",
    "TokenGrant",
    "TokenRejected",
    "UnknownKey",
    "Verdict",
    "decide_base",
    "decide_link",
    "decide_pull",
    "looks_like_jwt",
    "parse_authorization",
    "unverified_expiry",
    "verify_token",
]

MAX_AUTHORIZATION_LENGTH = 16 * 1024  # characters of an Authorization header that are looked at
MAX_TOKEN_LENGTH = 8192  # characters; the seed refuses longer tokens too
TOKEN_LEEWAY = 30.0  # seconds of clock skew tolerated on exp/nbf (the seed's own leeway)
_MAX_ACCESS_ENTRIES = 64
_MAX_JWKS_KEYS = 64
# Asymmetric algorithms only. Each key verifies with exactly one of them: the JWKS entry's ``alg``
# when it names one of these, else the one its key type implies (pyjwt's PyJWK).
_SAFE_ALGORITHMS = frozenset({"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                              "EdDSA"})
_VISIBLE_ASCII_RE = re.compile(r"[\x21-\x7e]+")
_HEADER_VALUE_RE = re.compile(r"[\x20-\x7e]*")  # what may go into a quoted challenge parameter


class TokenRejected(P2PDError):
    """A bearer token failed verification.

    Attributes:
        reason: a short label (``malformed``, ``expired``, ``not_yet_valid``, ``bad_signature``,
            ``bad_algorithm``, ``wrong_audience``, ``wrong_issuer``, ``unknown_key``), used as the
            metric label and in logs; it never contains the token.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"token rejected: {reason}")
        self.reason = reason


class UnknownKey(TokenRejected):
    """The token names a key the key set does not hold (refresh the keys, or ask the upstream)."""

    def __init__(self) -> None:
        super().__init__("unknown_key")


# ---- credentials --------------------------------------------------------------------------


class CredentialKind(enum.Enum):
    NONE = "none"
    BEARER = "bearer"
    BASIC = "basic"
    UNSUPPORTED = "unsupported"  # another scheme, or a header too long or malformed to use


@dataclass(frozen=True, slots=True)
class Credential:
    """What a client presented in ``Authorization``.

    Attributes:
        kind: the scheme.
        header: the exact header value; sent to nobody but the upstream registry whose realm
            issued it (``p2pd.upstream.HttpUpstream.check_pull``).
        fingerprint: sha256 (hex) of the header, the only form in which caches keep it.
    """

    kind: CredentialKind
    header: str = field(default="", repr=False)
    fingerprint: str = ""

    @property
    def token(self) -> str:
        """The bearer token (empty for other kinds)."""
        if self.kind is not CredentialKind.BEARER:
            return ""
        return self.header.split(None, 1)[1].strip()


ANONYMOUS = Credential(CredentialKind.NONE)


def parse_authorization(value: str | None) -> Credential:
    """Classifies an ``Authorization`` header; never raises."""
    if value is None or not value.strip():
        return ANONYMOUS
    value = value.strip()
    if len(value) > MAX_AUTHORIZATION_LENGTH or not _HEADER_VALUE_RE.fullmatch(value):
        return Credential(CredentialKind.UNSUPPORTED)
    fingerprint = hashlib.sha256(value.encode()).hexdigest()
    scheme, _, rest = value.partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer" and rest and len(rest) <= MAX_TOKEN_LENGTH and _VISIBLE_ASCII_RE.fullmatch(rest):
        return Credential(CredentialKind.BEARER, f"Bearer {rest}", fingerprint)
    if scheme.lower() == "basic" and rest and _VISIBLE_ASCII_RE.fullmatch(rest):
        return Credential(CredentialKind.BASIC, f"Basic {rest}", fingerprint)
    return Credential(CredentialKind.UNSUPPORTED, "", fingerprint)


# ---- challenges ---------------------------------------------------------------------------


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class Challenge:
    """The upstream's ``WWW-Authenticate`` challenge, passed through to clients.

    Attributes:
        scheme: ``bearer`` (token auth) or ``basic``.
        realm: the token service URL (bearer) or the realm label (basic).
        service: the token service's name (bearer); it is the ``aud`` of its tokens.
    """

    scheme: str
    realm: str
    service: str | None = None

    @classmethod
    def make(cls, scheme: str, realm: str | None, service: str | None = None) -> Challenge | None:
        """A challenge safe to put into a response header, or None (unknown scheme, or a value
        with control characters that would let the upstream inject headers)."""
        scheme = scheme.lower()
        if scheme not in ("bearer", "basic") or realm is None or len(realm) > 2048:
            return None
        if not _HEADER_VALUE_RE.fullmatch(realm) or (scheme == "bearer" and not realm):
            return None
        if service is not None and (len(service) > 512 or not _HEADER_VALUE_RE.fullmatch(service)):
            return None
        return cls(scheme, realm, service or None)

    def header(self, repository: str | None, *, error: str | None = None) -> tuple[str, str]:
        """The ``WWW-Authenticate`` header asking for pull on ``repository`` (the upstream's
        name; None for the ``/v2/`` ping, which names no scope)."""
        if self.scheme == "basic":
            return ("WWW-Authenticate", f"Basic realm={_quote(self.realm)}")
        parts = [f"realm={_quote(self.realm)}"]
        if self.service is not None:
            parts.append(f"service={_quote(self.service)}")
        if repository is not None:
            parts.append(f"scope={_quote(f'repository:{repository}:pull')}")
        if error is not None:
            parts.append(f"error={_quote(error)}")
        return ("WWW-Authenticate", "Bearer " + ",".join(parts))


@dataclass(frozen=True, slots=True)
class PullProbe:
    """What an upstream answered to a pull check (``tags/list`` of one repository).

    Attributes:
        status: the final HTTP status (after an anonymous token, for an anonymous probe).
        challenge: the registry's challenge, when it sent one.
    """

    status: int
    challenge: Challenge | None = None


# ---- tokens -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What a verified token grants: repository → actions, until ``expires_at`` (epoch seconds)."""

    access: Mapping[str, frozenset[str]]
    expires_at: float

    def allows_pull(self, repository: str) -> bool:
        actions = self.access.get(repository, frozenset())
        return "pull" in actions or "*" in actions


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any
    algorithm: str


class KeySet:
    """Public keys of a token issuer, by key id, from its JWKS document.

    Entries that do not parse, are not asymmetric signing keys or name an algorithm outside
    the fixed list are skipped. A key without ``kid`` is kept under ``""``.
    """

    def __init__(self, keys: Mapping[str, _Key]) -> None:
        self._keys = dict(keys)

    @classmethod
    def from_jwks(cls, document: bytes) -> KeySet:
        """Parses a JWKS (``{"keys": [...]}``).

        Raises:
            ValueError: the document is not a JWKS or holds no usable key.
        """
        try:
            parsed = json.loads(document)
        except (ValueError, RecursionError) as exc:
            raise ValueError("JWKS is not JSON") from exc
        entries = parsed.get("keys") if isinstance(parsed, dict) else None
        if not isinstance(entries, list):
            raise ValueError("JWKS has no keys list")
        keys: dict[str, _Key] = {}
        for entry in entries[:_MAX_JWKS_KEYS]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") not in ("EC", "RSA", "OKP") or "d" in entry:  # never a private or symmetric key
                continue
            try:
                jwk = jwt.PyJWK(entry)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
                continue
            if jwk.algorithm_name not in _SAFE_ALGORITHMS:
                continue
            kid = entry.get("kid", "")
            keys[kid if isinstance(kid, str) else ""] = _Key(jwk.key, jwk.algorithm_name)
        if not keys:
            raise ValueError("JWKS holds no usable signing key")
        return cls(keys)

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, kid: str) -> _Key | None:
        return self._keys.get(kid)


def _b64_json(segment: str) -> Any:
    padded = segment + "=" * (-len(segment) % 4)
    return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))


def _unverified_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(header, claims) of a JWS compact token, without checking anything; None if it is not one."""
    if len(token) > MAX_TOKEN_LENGTH or token.count(".") != 2:
        return None
    header_text, claims_text, _signature = token.split(".")
    try:
        header, claims = _b64_json(header_text), _b64_json(claims_text)
    except (ValueError, UnicodeError, RecursionError):
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return header, claims


def looks_like_jwt(token: str) -> bool:
    """Whether ``token`` is a JWS compact token at all (else only its issuer can judge it)."""
    return _unverified_parts(token) is not None


def unverified_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, unverified: only ever used to make a cache entry shorter."""
    parts = _unverified_parts(token)
    exp = parts[1].get("exp") if parts is not None else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def _access(claim: Any) -> dict[str, frozenset[str]]:
    """The ``access`` claim (Docker token spec) → repository → actions; other types are ignored."""
    if not isinstance(claim, list):
        return {}
    access: dict[str, set[str]] = {}
    for entry in claim[:_MAX_ACCESS_ENTRIES]:
        if not isinstance(entry, dict):
            continue
        resource_type, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
        if not isinstance(resource_type, str) or resource_type.split("(", 1)[0] != "repository":
            continue
        if not isinstance(name, str) or not isinstance(actions, list):
            continue
        access.setdefault(name, set()).update(a for a in actions if isinstance(a, str))
    return {name: frozenset(actions) for name, actions in access.items()}


def verify_token(token: str, keys: KeySet, *, audience: str, issuer: str | None, now: float,
                 leeway: float = TOKEN_LEEWAY) -> TokenGrant:
    """Verifies a bearer token offline against the issuer's keys.

    Args:
        token: the compact JWS.
        keys: the issuer's public keys (its JWKS).
        audience: the ``aud`` the token must carry: the ``service`` of the upstream's challenge.
        issuer: the ``iss`` it must carry, or None to accept any issuer whose key signed it.
        now: the current time (epoch seconds).
        leeway: clock skew tolerated on ``exp`` and ``nbf``.

    Returns:
        What the token grants, and until when.

    Raises:
        UnknownKey: the token's ``kid`` is not in ``keys``.
        TokenRejected: anything else is wrong (malformed, expired, not yet valid, signature,
            audience, issuer); ``reason`` says what.
    """
    parts = _unverified_parts(token)
    if parts is None:
        raise TokenRejected("malformed")
    header, _claims = parts
    kid = header.get("kid", "")
    if not isinstance(kid, str):
        raise TokenRejected("malformed")
    key = keys.get(kid)
    if key is None:
        raise UnknownKey()
    try:
        # Expiry and not-before are checked below against ``now`` (the caller's clock).
        claims = jwt.decode(token, key.key, algorithms=[key.algorithm], audience=audience, issuer=issuer,
                            options={"require": ["exp"], "verify_exp": False, "verify_nbf": False,
                                     "verify_iat": False})
    except jwt.InvalidSignatureError:
        raise TokenRejected("bad_signature") from None
    except jwt.InvalidAudienceError:
        raise TokenRejected("wrong_audience") from None
    except jwt.InvalidIssuerError:
        raise TokenRejected("wrong_issuer") from None
    except jwt.InvalidAlgorithmError:  # alg "none", HMAC, or another algorithm than the key's
        raise TokenRejected("bad_algorithm") from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise TokenRejected("malformed") from None
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise TokenRejected("malformed")
    if exp + leeway <= now:
        raise TokenRejected("expired")
    if nbf is not None and (isinstance(nbf, bool) or not isinstance(nbf, int | float)):
        raise TokenRejected("malformed")
    if nbf is not None and nbf - leeway > now:
        raise TokenRejected("not_yet_valid")
    if claims.get("use", "access") != "access":  # a seed refresh token is not an access token
        raise TokenRejected("wrong_audience")
    return TokenGrant(_access(claims.get("access")), float(exp))


# ---- decisions ----------------------------------------------------------------------------


class Verdict(enum.Enum):
    ALLOWED = "allowed"
    DENIED = "denied"
    UNKNOWN = "unknown"  # could not be established (upstream unreachable, nothing cached)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one question about one request.

    Attributes:
        allowed: go on.
        reason: why not (the ``reason`` label of ``p2pd_auth_denied_total``).
        status, code, message, headers: the error response when not allowed.
    """

    allowed: bool
    reason: str = ""
    status: int = 200
    code: str = ""
    message: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    def error(self) -> OCIError:
        return OCIError(self.code, self.message, status=self.status, headers=list(self.headers))


ALLOW = Decision(True)
_TOKEN_REJECTIONS = frozenset({"malformed", "expired", "not_yet_valid", "bad_signature", "bad_algorithm",
                               "wrong_audience", "wrong_issuer", "unknown_key"})


def _fall_back(reason: str, message: str, manifest: bool) -> Decision:
    # 404 makes containerd try its next host (the registry itself), which answers the client
    # with its own checks: the agent never serves what it cannot vouch for.
    return Decision(False, reason, 404, "MANIFEST_UNKNOWN" if manifest else "BLOB_UNKNOWN", message)


def _unauthorized(reason: str, challenge: Challenge | None, repository: str, error: str | None,
                  manifest: bool) -> Decision:
    if challenge is None:
        return _fall_back(reason, "this mirror cannot check access to this repository; ask the registry", manifest)
    return Decision(False, reason, 401, "UNAUTHORIZED", "authentication required",
                    (challenge.header(repository, error=error if challenge.scheme == "bearer" else None),))


def decide_pull(*, open_namespace: bool, credential: CredentialKind, anonymous: Verdict,
                presented: Verdict | None, rejection: str | None, challenge: Challenge | None,
                repository: str, manifest: bool) -> Decision:
    """May the client pull ``repository``?

    Args:
        open_namespace: the operator set ``anonymous_pull = true`` for the namespace: every local
            client is served with the agent's own credentials.
        credential: what the client presented.
        anonymous: whether the upstream lets an anonymous client pull the repository.
        presented: whether the client's own credential grants pull (None: not evaluated, e.g.
            when anonymous access was enough or nothing was presented).
        rejection: why the credential was refused, when it was (a ``TokenRejected`` reason,
            ``insufficient_scope`` for a valid token without pull, ``upstream_denied`` when the
            upstream refused it).
        challenge: the upstream's challenge, when known.
        repository: the repository's name at the upstream (the challenge's scope).
        manifest: the request is for a manifest (else a blob), for the error code of a 404.
    """
    if open_namespace or anonymous is Verdict.ALLOWED or presented is Verdict.ALLOWED:
        return ALLOW
    if credential is CredentialKind.NONE:
        if anonymous is Verdict.UNKNOWN:
            return _fall_back("unavailable", "the registry cannot be asked who may pull this repository", manifest)
        return _unauthorized("anonymous", challenge, repository, None, manifest)
    if credential is CredentialKind.UNSUPPORTED:
        return _unauthorized("unsupported_credential", challenge, repository, "invalid_request", manifest)
    if presented is Verdict.UNKNOWN or presented is None:
        return _fall_back("unverifiable", "the client's credentials cannot be checked now", manifest)
    if rejection in _TOKEN_REJECTIONS:
        return _unauthorized(rejection or "invalid_token", challenge, repository, "invalid_token", manifest)
    if credential is CredentialKind.BASIC:
        return Decision(False, rejection or "upstream_denied", 403, "DENIED",
                        "requested access to the resource is denied")
    return _unauthorized(rejection or "upstream_denied", challenge, repository, "insufficient_scope", manifest)


def decide_base(*, checked: bool, credential: CredentialKind, upstream: PullProbe | None) -> Decision:
    """The ``/v2/`` ping: answered as the upstream answers an anonymous one.

    Clients (podman, skopeo) decide from this answer whether to authenticate at all: a 200
    makes them send later requests without credentials. It reveals nothing, so any credential
    gets 200; only an anonymous ping of a checked namespace whose upstream challenges it gets
    the upstream's challenge.

    Args:
        checked: clients of the namespace are checked (the agent holds credentials for it and
            the operator did not open it).
        credential: what the client presented.
        upstream: the upstream's answer to an anonymous ping (None: not known now).
    """
    if not checked or credential is not CredentialKind.NONE or upstream is None or upstream.status != 401:
        return ALLOW
    if upstream.challenge is None:
        return ALLOW
    return Decision(False, "anonymous", 401, "UNAUTHORIZED", "authentication required",
                    (upstream.challenge.header(None),))


def decide_link(linked: Verdict, *, manifest: bool) -> Decision:
    """May a digest be served under the repository it was asked under?

    Args:
        linked: whether a manifest of the repository references it (or the upstream said the
            repository holds it).
        manifest: a manifest by digest (else a blob), for the error code.
    """
    if linked is Verdict.ALLOWED:
        return ALLOW
    code = "MANIFEST_UNKNOWN" if manifest else "BLOB_UNKNOWN"
    if linked is Verdict.DENIED:
        return Decision(False, "not_linked", 404, code, "not part of this repository")
    return Decision(False, "link_unverifiable", 404, code, "cannot confirm this digest belongs to this repository")
