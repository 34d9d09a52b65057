"""Tokens (seed/auth/tokens.py): ES256 with kid, rotation, JWKS, refusal of forged tokens."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from seed.auth.identity import Principal
from seed.auth.tokens import MAX_TOKEN_LENGTH, KeyDirectory, TokenAuthority, TrustedIssuer, load_public_keys
from seed.errors import TokenInvalid

ALICE = Principal(kind="user", name="alice", groups=frozenset({"dev"}), provider="htpasswd")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _authority(tmp_path: Path, clock: Clock | None = None, **kwargs: object) -> TokenAuthority:
    return TokenAuthority(KeyDirectory(tmp_path / "keys"), issuer="seed", service="seed.test",
                          clock=clock or Clock(), **kwargs)  # type: ignore[arg-type]


def test_round_trip_carries_principal_and_access(tmp_path: Path) -> None:
    authority = _authority(tmp_path)
    issued = authority.issue(ALICE, [("repository", "team/app", {"pull", "push"}),
                                     ("registry", "catalog", {"*"})])
    header = jwt.get_unverified_header(issued.token)
    assert header["alg"] == "ES256" and header["kid"]
    claims = authority.verify(issued.token)
    assert claims.principal.name == "alice" and claims.principal.groups == {"dev"}
    assert claims.access == {"team/app": {"pull", "push"}}
    assert claims.catalog
    assert issued.expires_in == 300


def test_key_file_is_private_and_published_in_jwks(tmp_path: Path) -> None:
    authority = _authority(tmp_path)
    (key_file,) = (tmp_path / "keys").glob("*.pem")
    assert key_file.stat().st_mode & 0o077 == 0
    jwks = authority.keys.jwks()
    assert [k["kty"] for k in jwks["keys"]] == ["EC"]
    assert "d" not in jwks["keys"][0]  # never the private part
    # Another service verifies offline with the JWKS alone.
    token = authority.issue(ALICE, [("repository", "a", {"pull"})]).token
    jwk = next(k for k in jwks["keys"] if k["kid"] == jwt.get_unverified_header(token)["kid"])
    decoded = jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=["ES256"], audience="seed.test")
    assert decoded["sub"] == "alice"


def test_rotation_keeps_old_tokens_valid_until_the_key_is_removed(tmp_path: Path) -> None:
    authority = _authority(tmp_path)
    old = authority.issue(ALICE, []).token
    new_kid = authority.keys.rotate()
    new = authority.issue(ALICE, []).token
    assert jwt.get_unverified_header(new)["kid"] == new_kid != jwt.get_unverified_header(old)["kid"]
    authority.verify(old)
    authority.verify(new)
    # A fresh process reads the directory: the newest key signs, both verify.
    reloaded = _authority(tmp_path)
    assert reloaded.keys.signer[0] == new_kid
    reloaded.verify(old)
    # Retiring the old key: its tokens stop verifying.
    oldest = sorted((tmp_path / "keys").glob("*.pem"))[0]
    oldest.unlink()
    retired = _authority(tmp_path)
    retired.verify(new)
    with pytest.raises(TokenInvalid):
        retired.verify(old)


def test_expired_token_is_refused(tmp_path: Path) -> None:
    clock = Clock()
    authority = _authority(tmp_path, clock)
    token = authority.issue(ALICE, []).token
    clock.now += 300 + 31
    with pytest.raises(TokenInvalid, match="expired"):
        authority.verify(token)


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_forged_tokens_are_refused(tmp_path: Path) -> None:
    authority = _authority(tmp_path)
    good = authority.issue(ALICE, [("repository", "a", {"pull"})]).token
    claims = jwt.decode(good, options={"verify_signature": False})
    kid = jwt.get_unverified_header(good)["kid"]
    # alg=none
    none_token = f"{_b64({'alg': 'none', 'kid': kid})}.{_b64(claims)}."
    # HS256 keyed with the public key (algorithm confusion)
    public_pem = authority.keys.verifier(kid).public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs_token = f"{_b64({'alg': 'HS256', 'kid': kid})}.{_b64(claims)}."
    import hashlib
    import hmac
    signing_input = hs_token[:-1].encode()
    hs_token += base64.urlsafe_b64encode(hmac.new(public_pem, signing_input, hashlib.sha256).digest()).rstrip(
        b"=").decode()
    # Signed by a key of the same kind that is not ours, with our kid.
    foreign = ec.generate_private_key(ec.SECP256R1())
    foreign_token = jwt.encode(claims, foreign, algorithm="ES256", headers={"kid": kid})
    # Edited claims with the original signature.
    header, _payload, signature = good.split(".")
    edited = f"{header}.{_b64({**claims, 'sub': 'admin'})}.{signature}"
    # Wrong audience, wrong issuer.
    key = authority.keys.signer[1]
    wrong_aud = jwt.encode({**claims, "aud": "other"}, key, algorithm="ES256", headers={"kid": kid})
    for token in [none_token, hs_token, foreign_token, edited, wrong_aud, "", "x", "a.b.c",
                  "é" * 10, "A" * (MAX_TOKEN_LENGTH + 1)]:
        with pytest.raises(TokenInvalid):
            authority.verify(token)


def test_refresh_and_access_tokens_are_not_interchangeable(tmp_path: Path) -> None:
    authority = _authority(tmp_path)
    refresh = authority.issue_refresh(ALICE)
    access = authority.issue(ALICE, []).token
    assert authority.verify(refresh, use="refresh").principal.name == "alice"
    with pytest.raises(TokenInvalid):
        authority.verify(refresh)
    with pytest.raises(TokenInvalid):
        authority.verify(access, use="refresh")


def test_external_issuer_by_jwks_and_by_pem(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    jwks_file = tmp_path / "sso.json"
    jwks_file.write_text(json.dumps({"keys": [{**jwk, "kid": "sso-1"}]}))
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem_file = tmp_path / "other.pem"
    pem_file.write_bytes(ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    authority = _authority(tmp_path, trusted=[
        TrustedIssuer("sso", "https://sso.example", "seed.test", load_public_keys(jwks_file)),
        TrustedIssuer("other", "https://other.example", "seed.test", load_public_keys(pem_file)),
    ])
    now = int(time.time())
    base = {"sub": "carol", "aud": "seed.test", "iat": now, "exp": now + 60, "groups": ["ops"],
            "access": [{"type": "repository", "name": "ops/tool", "actions": ["pull"]}]}
    sso = jwt.encode({**base, "iss": "https://sso.example"}, rsa_key, algorithm="RS256", headers={"kid": "sso-1"})
    claims = authority.verify(sso)
    assert claims.external and claims.principal.provider == "token:sso" and claims.principal.groups == {"ops"}
    assert claims.access == {"ops/tool": {"pull"}}
    other = jwt.encode({**base, "iss": "https://other.example"}, ec_key, algorithm="ES256")
    assert authority.verify(other).principal.name == "carol"
    # The same token claiming another trusted issuer, or an unknown one, fails.
    with pytest.raises(TokenInvalid):
        authority.verify(jwt.encode({**base, "iss": "https://sso.example"}, ec_key, algorithm="ES256",
                                    headers={"kid": "sso-1"}))
    with pytest.raises(TokenInvalid):
        authority.verify(jwt.encode({**base, "iss": "https://evil.example"}, ec_key, algorithm="ES256"))
    # External refresh tokens are not a thing.
    with pytest.raises(TokenInvalid):
        authority.verify(sso, use="refresh")


def test_malformed_access_claim_is_refused(tmp_path: Path) -> None:
    authority = _authority(tmp_path)
    kid, key = authority.keys.signer
    now = int(time.time())
    base = {"iss": "seed", "sub": "alice", "aud": "seed.test", "iat": now, "exp": now + 60, "use": "access",
            "kind": "user"}
    for access in ["all", [1, 2], [{"type": "repository", "name": 5, "actions": []}],
                   [{"type": "repository", "name": "a", "actions": ["pull"]}] * 65]:
        token = jwt.encode({**base, "access": access}, key, algorithm="ES256", headers={"kid": kid})
        with pytest.raises(TokenInvalid):
            authority.verify(token)
    token = jwt.encode({**base, "kind": "root"}, key, algorithm="ES256", headers={"kid": kid})
    with pytest.raises(TokenInvalid):
        authority.verify(token)


def test_keys_cli_rotate_list_retire(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from seed.cli import main

    data = str(tmp_path / "data")
    assert main(["keys", "list", "--data", data]) == 0
    first = capsys.readouterr().out.split()[0]
    assert main(["keys", "rotate", "--data", data]) == 0
    # Key ids are base64url and may start with "-": "--" ends the options (as the help says).
    assert main(["keys", "retire", "--data", data, "--", first]) == 0  # it no longer signs
    assert "retired" in capsys.readouterr().out
    assert main(["keys", "list", "--data", data]) == 0
    (second, role, _name) = capsys.readouterr().out.split()
    assert second != first and role == "signs"
    assert main(["keys", "retire", "--data", data, "--", second]) == 1  # the signing key stays
    assert main(["keys", "retire", "no-such-kid", "--data", data]) == 1


def test_verified_token_cache_still_rechecks_robots_and_expiry(tmp_path: Path) -> None:
    from seed.auth.authenticator import Authenticator
    from seed.auth.robots import MemoryRobotStore, RobotProvider, parse_access_spec
    from seed.auth.throttle import LoginThrottle
    from seed.errors import CredentialsRejected

    clock = Clock()
    authority = _authority(tmp_path, clock)
    robots = MemoryRobotStore()
    record, _secret = robots.create("ci", parse_access_spec("team/*:pull"), None)
    authenticator = Authenticator([RobotProvider(robots)], authority, LoginThrottle(), robots, lambda a, f: None)
    authenticator._clock = clock
    robot = Principal(kind="robot", name=record.login_name, provider="robot")
    token = authority.issue(robot, [("repository", "team/app", {"pull"})]).token
    verified = authenticator.verify_token(token)
    assert verified.principal.grants == record.grants
    assert authenticator.verify_token(token) == verified  # the second time from the cache
    robots.revoke("ci")
    with pytest.raises(CredentialsRejected):
        authenticator.verify_token(token)  # cached, but the robot is looked up every time
    user_token = authority.issue(ALICE, []).token
    authenticator.verify_token(user_token)
    clock.now += 300 + 31
    with pytest.raises(CredentialsRejected):
        authenticator.verify_token(user_token)  # a cached token does not outlive its expiry
