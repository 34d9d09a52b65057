"""Peer grants: what a node shows its peers to be given the chunks of a private blob.

A grant is a short-lived JWT that the registry (the seed) signs with its token keys: "node N may
fetch blob D of repository R", issued to the node's own upstream account after the registry
checked that the account may pull R and that R holds D (``GET /v2/<R>/blobs/<D>/grant?node=N``).
A node that fetched D under a grant *protects* D: it keeps the registry's public keys (JWKS)
next to it and serves D's chunks and chunk map only to a request that carries a valid grant for
D naming the requesting node (``X-P2PD-Grant``). Members cannot forge grants: the cluster key
and the peer certificates do not sign them, the registry does. Blobs from registries that issue
no grants (no access control, Docker Hub) are not protected and are served to members as before.

Why a registry-signed grant rather than the client's token or a coordinator's statement: a
client's token must never leave for another host, and every member could sign as a
coordinator (docs/security.md, "Peer grants").
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import jwt

from p2pd.access import KeySet
from p2pd.fsutil import write_atomic
from p2pd.oci.digest import Digest

__all__ = [
    "GRANT_HEADER",
    "PEER_GRANT_AUDIENCE",
    "PEER_GRANT_SECONDS",
    "PEER_GRANT_USE",
    "GrantRefused",
    "GrantStore",
    "PeerGrant",
    "verify_grant",
]

log = logging.getLogger("p2pd.swarm.grants")

GRANT_HEADER = "X-P2PD-Grant"
PEER_GRANT_AUDIENCE = "p2pd-peers"
PEER_GRANT_USE = "peer-grant"
PEER_GRANT_SECONDS = 600.0  # a grant's lifetime: one pull, with room for a slow one
MAX_GRANT_LENGTH = 4096
_LEEWAY = 30.0  # clock skew tolerated between nodes and the registry
_MAX_JWKS = 64 * 1024
_CACHE = 4096  # protected digests whose keys are kept in memory
_CLOSED = b'{"keys": []}'  # a protection nobody's grant passes


class GrantRefused(Exception):
    """A peer request's grant is missing or not valid; ``reason`` is the metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PeerGrant:
    repository: str
    digest: str
    node: str
    expires_at: float


def verify_grant(token: str | None, keys: KeySet, *, digest: Digest, node: str, now: float) -> PeerGrant:
    """Checks a grant for blob ``digest`` presented by ``node`` (authenticated by the cluster key).

    Raises:
        GrantRefused: ``missing``, ``malformed``, ``unknown_key``, ``bad_signature``,
            ``expired``, ``other_blob`` or ``other_node``.
    """
    if not token:
        raise GrantRefused("missing")
    if len(token) > MAX_GRANT_LENGTH or not token.isascii():
        raise GrantRefused("malformed")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise GrantRefused("malformed") from None
    kid = header.get("kid", "")
    key = keys.get(kid if isinstance(kid, str) else "")
    if key is None:
        raise GrantRefused("unknown_key")
    try:
        claims = jwt.decode(token, key.key, algorithms=[key.algorithm], audience=PEER_GRANT_AUDIENCE,
                            options={"require": ["exp", "digest", "node"], "verify_exp": False,
                                     "verify_nbf": False, "verify_iat": False})
    except jwt.InvalidSignatureError:
        raise GrantRefused("bad_signature") from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise GrantRefused("malformed") from None
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float) or claims.get("use") != PEER_GRANT_USE:
        raise GrantRefused("malformed")
    if exp + _LEEWAY <= now:
        raise GrantRefused("expired")
    if claims.get("digest") != str(digest):
        raise GrantRefused("other_blob")
    if claims.get("node") != node:
        raise GrantRefused("other_node")
    return PeerGrant(str(claims.get("repository", "")), str(digest), node, float(exp))


class GrantStore:
    """Which blobs this node protects, and the registry keys their grants are checked with.

    One small file per protected digest under ``<data>/peer-grants/`` (written crash-safely), so
    the protection survives restarts; read lazily and cached.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._cache: OrderedDict[Digest, KeySet | None] = OrderedDict()

    def _path(self, digest: Digest) -> Path:
        return self._directory / f"{digest.algorithm}-{digest.encoded}.jwks"

    def protect(self, digest: Digest, jwks: bytes) -> None:
        """Marks ``digest`` as protected by grants checked with ``jwks`` (the registry's keys).

        Raises:
            ValueError: ``jwks`` holds no usable key (the caller then does not ask peers at all).
        """
        if len(jwks) > _MAX_JWKS:
            raise ValueError("JWKS too large")
        keys = KeySet.from_jwks(jwks)
        path = self._path(digest)
        with contextlib.suppress(FileNotFoundError):
            if path.read_bytes() == jwks:
                self._remember(digest, keys)
                return
        write_atomic(path, jwks)
        self._remember(digest, keys)

    def protect_closed(self, digest: Digest) -> None:
        """Marks ``digest`` as protected with no usable keys: no peer is given it (fail closed)."""
        write_atomic(self._path(digest), _CLOSED)
        self._remember(digest, KeySet({}))

    def keys_for(self, digest: Digest) -> KeySet | None:
        """The keys grants for ``digest`` are checked with; None when it is not protected.

        A protection file that cannot be used protects with no keys: every grant is refused
        (fail closed), the blob is fetched from the registry instead.
        """
        if digest in self._cache:
            self._cache.move_to_end(digest)
            return self._cache[digest]
        try:
            document = self._path(digest).read_bytes()
        except FileNotFoundError:
            keys: KeySet | None = None
        except OSError as exc:
            log.warning("cannot read the grant keys of %s: %s; refusing its peers", digest, exc)
            keys = KeySet({})
        else:
            try:
                keys = KeySet.from_jwks(document[:_MAX_JWKS])
            except ValueError:
                keys = KeySet({})
        self._remember(digest, keys)
        return keys

    def _remember(self, digest: Digest, keys: KeySet | None) -> None:
        self._cache[digest] = keys
        self._cache.move_to_end(digest)
        while len(self._cache) > _CACHE:
            self._cache.popitem(last=False)


def parse_grant_response(body: bytes) -> str:
    """The grant of the registry's ``/grant`` answer (``{"grant": "<jwt>", ...}``)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("grant answer is not JSON") from None
    grant = document.get("grant") if isinstance(document, dict) else None
    if not isinstance(grant, str) or not grant or len(grant) > MAX_GRANT_LENGTH:
        raise ValueError("grant answer has no grant")
    return grant
