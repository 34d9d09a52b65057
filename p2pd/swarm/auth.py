"""Authentication of peer requests and responses with the cluster key (HMAC-SHA256).

Every request carries ``X-P2PD-Node`` (sender id), ``X-P2PD-Time`` (unix seconds) and
``X-P2PD-Signature`` = hex HMAC over the method, path (with query), time, node id and the
body's sha256. Responses that carry metadata are signed the same way over the request
path, status and body. A receiver accepts a signature only within ``MAX_SKEW`` seconds of
its own clock and compares in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = [
    "KEY_BYTES",
    "MAX_SKEW",
    "AuthError",
    "generate_key",
    "parse_key",
    "sign_request",
    "sign_response",
    "verify_request",
    "verify_response",
]

KEY_BYTES = 32
MAX_SKEW = 60.0  # seconds


class AuthError(Exception):
    """A peer message failed authentication."""


def generate_key() -> str:
    """A new cluster key, hex encoded (what ``p2pd keygen`` prints)."""
    return secrets.token_hex(KEY_BYTES)


def parse_key(text: str) -> bytes:
    """Decodes a key file's content; at least 32 bytes of hex."""
    value = text.strip()
    try:
        key = bytes.fromhex(value)
    except ValueError as exc:
        raise AuthError("cluster key must be hex") from exc
    if len(key) < KEY_BYTES:
        raise AuthError(f"cluster key must be at least {KEY_BYTES} bytes")
    return key


def _mac(key: bytes, *parts: str) -> str:
    return hmac.new(key, "\n".join(parts).encode(), hashlib.sha256).hexdigest()


def _body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def sign_request(key: bytes, method: str, target: str, node_id: str, timestamp: float, body: bytes = b"") -> str:
    return _mac(key, "req", method.upper(), target, f"{int(timestamp)}", node_id, _body_digest(body))


def _fresh_timestamp(timestamp_text: str, now: float) -> int:
    try:
        timestamp = int(timestamp_text)
    except (TypeError, ValueError) as exc:
        raise AuthError("bad timestamp") from exc
    if abs(now - timestamp) > MAX_SKEW:
        raise AuthError("timestamp outside the allowed clock skew")
    return timestamp


def _check(expected: str, signature: str) -> None:
    if not hmac.compare_digest(expected, signature or ""):
        raise AuthError("bad signature")


def verify_request(key: bytes, method: str, target: str, node_id: str, timestamp_text: str, signature: str,
                   now: float, body: bytes = b"") -> None:
    """Raises AuthError unless the signature is valid and fresh."""
    timestamp = _fresh_timestamp(timestamp_text, now)
    _check(sign_request(key, method, target, node_id, timestamp, body), signature)


def sign_response(key: bytes, target: str, status: int, node_id: str, timestamp: float, body: bytes) -> str:
    return _mac(key, "resp", target, str(status), f"{int(timestamp)}", node_id, _body_digest(body))


def verify_response(key: bytes, target: str, status: int, node_id: str, timestamp_text: str, signature: str,
                    now: float, body: bytes) -> None:
    """Raises AuthError unless the response signature is valid and fresh."""
    timestamp = _fresh_timestamp(timestamp_text, now)
    _check(sign_response(key, target, status, node_id, timestamp, body), signature)
