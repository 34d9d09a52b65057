"""Bearer tokens: the seed's own signed JWTs (ES256), their keys and JWKS, and tokens from
trusted external issuers.

Rules/invariants:
- Our tokens are ES256 only, with a ``kid``; verification looks the key up by ``kid`` among
  every key in the key directory (and configured extra public keys), so keys can rotate: a new
  key signs, old ones still verify until removed.
- ``alg`` is never taken from the token: each issuer has a fixed list of asymmetric
  algorithms (no ``none``, no HMAC with a public key as secret).
- A token is a ceiling on what its bearer may do (see ``seed.access``); expiry is short.
- Access and refresh tokens are not interchangeable (``use`` claim and audience differ).
- Tokens are bounded in size before anything parses them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from p2pd.fsutil import fsync_dir, write_atomic
from p2pd.swarm.grants import PEER_GRANT_AUDIENCE, PEER_GRANT_SECONDS, PEER_GRANT_USE

from ..access import expand_actions
from ..errors import ConfigError, TokenInvalid
from .identity import ANONYMOUS, Grant, Principal

__all__ = [
    "MAX_TOKEN_LENGTH",
    "IssuedToken",
    "KeyDirectory",
    "TokenAuthority",
    "TokenClaims",
    "TrustedIssuer",
    "jwk_of",
    "load_public_keys",
    "robot_principal_with",
]

log = logging.getLogger("seed.auth.tokens")

MAX_TOKEN_LENGTH = 8192
_MAX_ACCESS_ENTRIES = 64
_MAX_GROUPS = 256
_LEEWAY = 30.0  # seconds of clock skew tolerated on exp/nbf/iat
_OUR_ALGORITHMS = ["ES256"]
_EXTERNAL_ALGORITHMS = ["ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "EdDSA"]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_of(public_key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public JWK (RFC 7517) of a P-256 key, without kid/use/alg."""
    numbers = public_key.public_numbers()
    return {"kty": "EC", "crv": "P-256", "x": _b64url(numbers.x.to_bytes(32, "big")),
            "y": _b64url(numbers.y.to_bytes(32, "big"))}


def _thumbprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 JWK thumbprint: the key id other services can recompute from the JWKS."""
    jwk = jwk_of(public_key)
    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


class KeyDirectory:
    """The seed's signing keys: ES256 private keys as PEM files in one directory (mode 0600).

    The newest file signs; all of them verify and are published in the JWKS. ``rotate``
    adds a new key; removing a file retires a key (tokens it signed stop verifying).

    Args:
        directory: e.g. ``DATA/auth/keys``; created with the first key if missing.
        extra_public_keys: PEM public keys that also verify (keys of another replica, or a
            retired key kept while its tokens expire).
    """

    def __init__(self, directory: Path, extra_public_keys: Iterable[Path] = ()) -> None:
        self.directory = directory
        self._extra = tuple(extra_public_keys)
        self._signer: tuple[str, ec.EllipticCurvePrivateKey] | None = None
        self._verifiers: dict[str, ec.EllipticCurvePublicKey] = {}
        self.load()

    def load(self) -> None:
        """(Re)reads the directory, creating the first key when there is none."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = sorted(self.directory.glob("*.pem"))
        if not files:
            self.rotate()
            return
        verifiers: dict[str, ec.EllipticCurvePublicKey] = {}
        signer: tuple[str, ec.EllipticCurvePrivateKey] | None = None
        for path in files:  # names start with a sortable creation time: the last one signs
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load token signing key {path}: {exc}") from exc
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
                raise ConfigError(f"token signing key {path} is not an EC P-256 key")
            kid = _thumbprint(key.public_key())
            verifiers[kid] = key.public_key()
            signer = (kid, key)
        for path in self._extra:
            for kid, public in load_public_keys(path).items():
                if isinstance(public, ec.EllipticCurvePublicKey):
                    verifiers[kid] = public
        self._verifiers, self._signer = verifiers, signer

    def rotate(self) -> str:
        """Creates a new signing key (it signs from now on); returns its key id."""
        key = ec.generate_private_key(ec.SECP256R1())
        kid = _thumbprint(key.public_key())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        # One clock reading for both parts, so names sort in creation order (the newest signs).
        now_ns = time.time_ns()
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now_ns // 10**9))}-{now_ns % 10**9:09d}-{kid[:16]}.pem"
        write_atomic(self.directory / name, pem, mode=0o600)
        self._verifiers[kid] = key.public_key()
        self._signer = (kid, key)
        return kid

    def describe(self) -> list[tuple[str, Path, bool]]:
        """(key id, file, signs) of every key in the directory, oldest first."""
        self.load()
        signing = self.signer[0]
        result = []
        for path in sorted(self.directory.glob("*.pem")):
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            kid = _thumbprint(key.public_key())  # type: ignore[arg-type]
            result.append((kid, path, kid == signing))
        return result

    def retire(self, kid: str) -> bool:
        """Removes a key that no longer signs: tokens it signed stop verifying. False if unknown."""
        for found, path, signs in self.describe():
            if found == kid:
                if signs:
                    raise ConfigError("refusing to retire the signing key: rotate first")
                path.unlink()
                fsync_dir(self.directory)
                self.load()
                return True
        return False

    @property
    def signer(self) -> tuple[str, ec.EllipticCurvePrivateKey]:
        assert self._signer is not None
        return self._signer

    def verifier(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        return self._verifiers.get(kid)

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JSON Web Key Set (``GET /token/keys``)."""
        keys = [{**jwk_of(public), "kid": kid, "use": "sig", "alg": "ES256"}
                for kid, public in sorted(self._verifiers.items())]
        return {"keys": keys}


def load_public_keys(path: Path) -> dict[str, Any]:
    """Public keys from a JWKS JSON file or a PEM public key (key id → key).

    A PEM key without a ``kid`` is stored under its RFC 7638 thumbprint (EC) and under ``""``,
    so a token without ``kid`` from a single-key issuer still verifies.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read public key file {path}: {exc}") from exc
    if data.lstrip().startswith(b"{"):
        try:
            document = json.loads(data)
            keys: dict[str, Any] = {}
            for entry in document.get("keys", []):
                kid = str(entry.get("kid", ""))
                keys[kid] = jwt.PyJWK(entry).key
            return keys
        except (ValueError, TypeError, AttributeError, jwt.PyJWKError) as exc:
            raise ConfigError(f"invalid JWKS in {path}: {exc}") from exc
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"invalid PEM public key in {path}: {exc}") from exc
    keys = {"": public}
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1":
        keys[_thumbprint(public)] = public
    return keys


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """An external token issuer whose tokens the seed accepts (``[[auth.issuer]]``).

    Attributes:
        name: a label for logs and the principal's provider (``token:<name>``).
        issuer: the ``iss`` its tokens carry.
        audience: the ``aud`` they must carry (usually the seed's service name).
        keys: key id → public key (from its JWKS file or PEM key).
        groups_claim: the claim that lists the subject's groups, if any.
    """

    name: str
    issuer: str
    audience: str
    keys: Mapping[str, Any]
    groups_claim: str = "groups"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """A verified token: who it is for and what it grants (repository → actions)."""

    principal: Principal
    access: Mapping[str, frozenset[str]]
    catalog: bool
    expires_at: float
    token_id: str
    issuer: str
    external: bool = False


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_in: int
    issued_at: str
    access: tuple[tuple[str, str, tuple[str, ...]], ...] = field(default=())


class TokenAuthority:
    """Issues and verifies tokens.

    Args:
        keys: the seed's signing keys.
        issuer: ``iss`` of our tokens.
        service: the service name clients ask for (``aud`` of our access tokens).
        expiry: lifetime of access tokens in seconds.
        refresh_expiry: lifetime of refresh tokens in seconds.
        trusted: external issuers whose tokens are accepted too.
        clock: seconds since the epoch (tests pass a fake).
    """

    def __init__(self, keys: KeyDirectory, *, issuer: str, service: str, expiry: float = 300.0,
                 refresh_expiry: float = 7 * 86400.0, trusted: Iterable[TrustedIssuer] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.keys = keys
        self.issuer = issuer
        self.service = service
        self.expiry = expiry
        self.refresh_expiry = refresh_expiry
        self.trusted = {t.issuer: t for t in trusted}
        self._clock = clock

    # ---- issuing ------------------------------------------------------------------------

    def _sign(self, claims: dict[str, Any]) -> str:
        kid, key = self.keys.signer
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid, "typ": "JWT"})

    def _base_claims(self, principal: Principal, audience: str, lifetime: float, use: str) -> dict[str, Any]:
        now = int(self._clock())
        # JWTs need a subject; an anonymous caller has no name, so its tokens say "anonymous"
        # (kind "anonymous" is what counts when they come back).
        subject = principal.name or "anonymous"
        claims: dict[str, Any] = {"iss": self.issuer, "sub": subject, "aud": audience, "iat": now,
                                  "nbf": now - 1, "exp": now + int(lifetime), "jti": secrets.token_urlsafe(12),
                                  "use": use, "kind": principal.kind, "provider": principal.provider}
        if principal.groups:
            claims["groups"] = sorted(principal.groups)[:_MAX_GROUPS]
        return claims

    def issue(self, principal: Principal, access: Iterable[tuple[str, str, Iterable[str]]]) -> IssuedToken:
        """An access token for ``principal`` granting ``access`` ((type, name, actions) triples)."""
        entries = tuple((t, n, tuple(sorted(a))) for t, n, a in access)
        claims = self._base_claims(principal, self.service, self.expiry, "access")
        claims["access"] = [{"type": t, "name": n, "actions": list(a)} for t, n, a in entries]
        issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(claims["iat"]))
        return IssuedToken(self._sign(claims), int(self.expiry), issued_at, entries)

    def issue_peer_grant(self, principal: Principal, repository: str, digest: str, node: str) -> str:
        """A peer grant (``p2pd.swarm.grants``): node ``node`` may fetch blob ``digest`` of
        ``repository`` from its peers. Its audience and use make it worthless as an access token."""
        claims = self._base_claims(principal, PEER_GRANT_AUDIENCE, PEER_GRANT_SECONDS, PEER_GRANT_USE)
        claims.update({"repository": repository, "digest": digest, "node": node})
        return self._sign(claims)

    def issue_refresh(self, principal: Principal) -> str:
        """A long-lived token that only buys new access tokens (OAuth2 ``refresh_token``)."""
        return self._sign(self._base_claims(principal, f"{self.service}#refresh", self.refresh_expiry, "refresh"))

    # ---- verifying ----------------------------------------------------------------------

    def verify(self, token: str, *, use: str = "access") -> TokenClaims:
        """Checks signature, issuer, audience, expiry and use; raises ``TokenInvalid``.

        The returned principal of one of our robot tokens carries no grants: the caller
        looks the robot up (it may have been revoked since).
        """
        if not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
            raise TokenInvalid("malformed or oversized token")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise TokenInvalid(f"malformed token: {exc}") from None
        if not isinstance(unverified, dict):
            raise TokenInvalid("malformed token")
        issuer = unverified.get("iss")
        if issuer == self.issuer:
            return self._verify_ours(token, header, use)
        trusted = self.trusted.get(issuer) if isinstance(issuer, str) else None
        if trusted is None or use != "access":
            raise TokenInvalid("token from an unknown issuer")
        return self._verify_external(token, header, trusted)

    def _verify_ours(self, token: str, header: Mapping[str, Any], use: str) -> TokenClaims:
        kid = header.get("kid")
        key = self.keys.verifier(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenInvalid("token signed by an unknown key")
        audience = self.service if use == "access" else f"{self.service}#refresh"
        claims = self._decode(token, key, _OUR_ALGORITHMS, audience, self.issuer)
        if claims.get("use") != use:
            raise TokenInvalid(f"not an {use} token")
        kind = claims.get("kind")
        if kind not in ("user", "robot", "anonymous"):
            raise TokenInvalid("token names an unknown kind of principal")
        if kind == "anonymous":
            principal = ANONYMOUS
        else:
            principal = Principal(kind=kind, name=str(claims["sub"]), groups=_groups(claims.get("groups")),
                                  provider=str(claims.get("provider", "")))
        access, catalog = _access(claims.get("access", []))
        return TokenClaims(principal, access, catalog, float(claims["exp"]), str(claims.get("jti", "")),
                           self.issuer)

    def _verify_external(self, token: str, header: Mapping[str, Any], trusted: TrustedIssuer) -> TokenClaims:
        kid = header.get("kid", "")
        key = trusted.keys.get(kid if isinstance(kid, str) else "")
        if key is None:
            raise TokenInvalid("token signed by an unknown key")
        # Only the algorithms of the key's own type: an RSA key never checks an EC signature.
        algorithms = [a for a in _EXTERNAL_ALGORITHMS if a.startswith(("RS", "PS"))] \
            if isinstance(key, rsa.RSAPublicKey) else [a for a in _EXTERNAL_ALGORITHMS if a.startswith(("ES", "Ed"))]
        claims = self._decode(token, key, algorithms, trusted.audience, trusted.issuer)
        principal = Principal(kind="user", name=str(claims["sub"]),
                              groups=_groups(claims.get(trusted.groups_claim)), provider=f"token:{trusted.name}")
        access, catalog = _access(claims.get("access", []))
        return TokenClaims(principal, access, catalog, float(claims["exp"]), str(claims.get("jti", "")),
                           trusted.issuer, external=True)

    def _decode(self, token: str, key: Any, algorithms: list[str], audience: str, issuer: str) -> dict[str, Any]:
        try:
            claims = jwt.decode(token, key, algorithms=algorithms, audience=audience, issuer=issuer,
                                leeway=_LEEWAY, options={"require": ["exp", "iat", "sub", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise TokenInvalid("token expired") from None
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            # TypeError/ValueError: a token whose alg does not fit the key's type.
            raise TokenInvalid(f"token rejected: {exc}") from None
        now = self._clock()
        if claims["exp"] + _LEEWAY < now:  # pyjwt checks against the real clock; ours may be fake
            raise TokenInvalid("token expired")
        if not isinstance(claims.get("sub"), str) or not claims["sub"] or len(claims["sub"]) > 256:
            raise TokenInvalid("token has no valid subject")
        return dict(claims)


def _groups(value: Any) -> frozenset[str]:
    if not isinstance(value, list):
        return frozenset()
    return frozenset(str(g)[:256] for g in value[:_MAX_GROUPS] if isinstance(g, str))


def _access(entries: Any) -> tuple[dict[str, frozenset[str]], bool]:
    """The ``access`` claim → (repository → actions, catalog granted)."""
    result: dict[str, frozenset[str]] = {}
    catalog = False
    if not isinstance(entries, list) or len(entries) > _MAX_ACCESS_ENTRIES:
        raise TokenInvalid("token has a malformed access claim")
    for entry in entries:
        if not isinstance(entry, dict):
            raise TokenInvalid("token has a malformed access claim")
        kind, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
        if not isinstance(name, str) or not isinstance(actions, list):
            raise TokenInvalid("token has a malformed access claim")
        if kind == "registry" and name == "catalog":
            catalog = True
        elif kind == "repository":
            result[name] = result.get(name, frozenset()) | expand_actions(a for a in actions if isinstance(a, str))
    return result, catalog


def robot_principal_with(claims: TokenClaims, grants: tuple[Grant, ...]) -> Principal:
    """The principal of a robot token with the robot's current grants."""
    p = claims.principal
    return Principal(kind=p.kind, name=p.name, groups=p.groups, provider=p.provider, grants=grants)
