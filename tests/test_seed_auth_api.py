"""The seed as a private registry over HTTP: challenges, the token service, Basic and Bearer
auth, and the role x endpoint matrix generated from the API's own route table.

Users come from an htpasswd file made by Debian's real ``htpasswd`` (bcrypt).
"""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from p2pd.httpd import ServerInfo
from p2pd.oci import mediatypes
from p2pd.oci.digest import digest_of
from seed.config import load_config
from seed.registry import SeedRegistry, serve_seed
from tests.harness.tools import require_tool
from tests.test_seed_api import image_manifest, push_blob, raw_request

ROLES = ("pull", "push", "delete", "admin")
PASSWORD = "pw-{}-secret"
USERS = {f"u-{role}": role for role in ROLES} | {"u-none": None}
# What each method of each route needs, written from the OCI spec independently of seed/access.py.
SPEC_ACTION = {
    ("blob", "GET"): "pull", ("blob", "HEAD"): "pull", ("blob", "DELETE"): "delete",
    ("chunks", "GET"): "pull", ("chunks", "HEAD"): "pull",
    # A peer grant (p2pd.swarm.grants) says the caller may pull the blob: it needs pull.
    ("grant", "GET"): "pull", ("grant", "HEAD"): "pull",
    ("manifest", "GET"): "pull", ("manifest", "HEAD"): "pull", ("manifest", "PUT"): "push",
    ("manifest", "DELETE"): "delete",
    ("tags", "GET"): "pull", ("tags", "HEAD"): "pull",
    ("referrers", "GET"): "pull", ("referrers", "HEAD"): "pull",
    # The scan API (docs/operations.md): reading a report is pulling; asking for a rescan makes the seed work.
    ("scan", "GET"): "pull", ("scan", "HEAD"): "pull", ("scan", "POST"): "push",
    # The registry signature API extension (containers/image): reading signatures is pulling,
    # storing one is pushing, removing them is deleting; the verdict API is read like a manifest.
    ("signatures", "GET"): "pull", ("signatures", "HEAD"): "pull", ("signatures", "PUT"): "push",
    ("signatures", "DELETE"): "delete",
    ("verdict", "GET"): "pull", ("verdict", "HEAD"): "pull",
    ("upload", "POST"): "push", ("upload", "PATCH"): "push", ("upload", "PUT"): "push",
    ("upload", "GET"): "push", ("upload", "HEAD"): "push", ("upload", "DELETE"): "push",
}
ROLE_ORDER = {"pull": 0, "push": 1, "delete": 2, "admin": 3}


def role_allows(role: str | None, action: str) -> bool:
    return role is not None and ROLE_ORDER[role] >= ROLE_ORDER[action]


@dataclass
class AuthSeed:
    info: ServerInfo
    registry: SeedRegistry
    data: Path
    tmp: Path

    def client(self, auth: tuple[str, str] | None = None, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(base_url=self.info.url, trust_env=False, timeout=30, auth=auth, headers=headers)


def make_htpasswd(path: Path, users: dict[str, str]) -> None:
    htpasswd = require_tool("htpasswd")
    for index, (user, password) in enumerate(users.items()):
        flags = "-bBc" if index == 0 else "-bB"
        subprocess.run([htpasswd, flags, "-C", "5", str(path), user, password], check=True, capture_output=True,
                       timeout=30)


def write_config(tmp: Path, extra: str = "") -> Path:
    htpasswd = tmp / "htpasswd"
    if not htpasswd.exists():
        make_htpasswd(htpasswd, {user: PASSWORD.format(user) for user in USERS})
    rules = "\n".join(f'[[access]]\nrepositories = ["team/**"]\nusers = ["u-{role}"]\nrole = "{role}"\n'
                      for role in ROLES)
    config = tmp / "seed.toml"
    config.write_text(f'[auth]\nhtpasswd = "{htpasswd}"\nservice = "seed.test"\n\n[auth.throttle]\n'
                      f'max_failures_per_user = 1000\nmax_failures_per_address = 1000\n\n{rules}\n'
                      f'[[access]]\nrepositories = ["public/**"]\nanonymous = true\nrole = "pull"\n\n'
                      f'[[access]]\nrepositories = ["public/**"]\nusers = ["u-admin"]\nrole = "admin"\n{extra}')
    return config


@pytest.fixture
async def auth_seed(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[AuthSeed]:
    data = tmp_path / "data"
    config = load_config(write_config(tmp_path), listen="127.0.0.1:0", data=data)
    info, registry = await nursery.start(partial(serve_seed, config))
    yield AuthSeed(info, registry, data, tmp_path)


def creds(user: str) -> tuple[str, str]:
    return (user, PASSWORD.format(user))


async def token_for(seed: AuthSeed, scope: str, user: str | None) -> str:
    async with seed.client(creds(user) if user else None) as client:
        r = await client.get("/token", params={"service": "seed.test", "scope": scope})
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


async def push_image(client: httpx.AsyncClient, name: str, tag: str) -> tuple[str, list[str]]:
    config, layer = json.dumps({"os": "linux", "name": name}).encode(), f"layer of {name}".encode()
    blobs = [await push_blob(client, name, blob) for blob in (config, layer)]
    manifest = image_manifest(config, [layer])
    r = await client.put(f"/v2/{name}/manifests/{tag}", content=manifest,
                         headers={"Content-Type": mediatypes.OCI_MANIFEST})
    assert r.status_code == 201, r.text
    return str(digest_of(manifest)), blobs


# ---- challenge and token service ---------------------------------------------------------


async def test_anonymous_gets_a_bearer_challenge_with_scope(auth_seed: AuthSeed) -> None:
    async with auth_seed.client() as client:
        r = await client.get("/v2/team/app/manifests/v1")
    assert r.status_code == 401
    assert r.json()["errors"][0]["code"] == "UNAUTHORIZED"
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'realm="{auth_seed.info.url}/token"' in challenge.replace("127.0.0.1", "127.0.0.1")
    assert 'service="seed.test"' in challenge
    assert 'scope="repository:team/app:pull"' in challenge
    async with auth_seed.client() as client:
        r = await client.post("/v2/team/app/blobs/uploads/")
    assert 'scope="repository:team/app:pull,push"' in r.headers["www-authenticate"]


async def test_token_flow_docker_style_get(auth_seed: AuthSeed) -> None:
    token = await token_for(auth_seed, "repository:team/app:pull,push", "u-push")
    async with auth_seed.client(token=token) as client:
        digest, _ = await push_image(client, "team/app", "v1")
        r = await client.get("/v2/team/app/manifests/v1")
        assert r.status_code == 200 and r.headers["docker-content-digest"] == digest
        # The token is for team/app only.
        r = await client.get("/v2/team/other/tags/list")
        assert r.status_code == 401 and 'error="insufficient_scope"' in r.headers["www-authenticate"]


async def test_token_grants_requested_intersected_with_allowed(auth_seed: AuthSeed) -> None:
    token = await token_for(auth_seed, "repository:team/app:pull,push,delete", "u-pull")
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    anonymous = await token_for(auth_seed, "repository:team/app:pull repository:public/base:pull", None)
    payload = json.loads(base64.urlsafe_b64decode(anonymous.split(".")[1] + "=="))
    assert {e["name"]: e["actions"] for e in payload["access"]} == {"team/app": [], "public/base": ["pull"]}


async def test_oauth2_password_and_refresh_grants(auth_seed: AuthSeed) -> None:
    async with auth_seed.client() as client:
        r = await client.post("/token", data={"grant_type": "password", "username": "u-push",
                                              "password": PASSWORD.format("u-push"), "service": "seed.test",
                                              "scope": "repository:team/app:pull", "client_id": "containerd-client",
                                              "access_type": "offline"})
        assert r.status_code == 200, r.text
        first = r.json()
        assert first["access_token"] and first["refresh_token"] and first["expires_in"] == 300
        r = await client.post("/token", data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"],
                                              "service": "seed.test", "scope": "repository:team/app:pull,push"})
        assert r.status_code == 200, r.text
        payload = json.loads(base64.urlsafe_b64decode(r.json()["access_token"].split(".")[1] + "=="))
        assert payload["sub"] == "u-push" and payload["access"][0]["actions"] == ["pull", "push"]
        # An access token is not a refresh token; a wrong password is 401.
        r = await client.post("/token", data={"grant_type": "refresh_token", "refresh_token": first["access_token"]})
        assert r.status_code == 401
        r = await client.post("/token", data={"grant_type": "password", "username": "u-push", "password": "nope"})
        assert r.status_code == 401
        r = await client.post("/token", data={"grant_type": "client_credentials"})
        assert r.status_code == 400


async def test_jwks_verifies_issued_tokens(auth_seed: AuthSeed) -> None:
    import jwt

    token = await token_for(auth_seed, "repository:team/app:pull", "u-pull")
    async with auth_seed.client() as client:
        jwks = (await client.get("/token/keys")).json()
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(jwt.PyJWK(k).key for k in jwks["keys"] if k["kid"] == kid)
    assert jwt.decode(token, key, algorithms=["ES256"], audience="seed.test")["sub"] == "u-pull"


async def test_basic_auth_directly_on_v2(auth_seed: AuthSeed) -> None:
    async with auth_seed.client(creds("u-push")) as client:
        await push_image(client, "team/app", "v1")
        assert (await client.get("/v2/")).status_code == 200
    async with auth_seed.client(("u-push", "wrong")) as client:
        r = await client.get("/v2/team/app/tags/list")
        assert r.status_code == 401
    async with auth_seed.client(creds("u-none")) as client:
        r = await client.get("/v2/team/app/tags/list")
        assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED"


async def test_catalog_lists_only_what_the_caller_may_pull(auth_seed: AuthSeed) -> None:
    async with auth_seed.client(creds("u-admin")) as client:
        await push_image(client, "team/app", "v1")
        await push_image(client, "public/base", "v1")
    async with auth_seed.client(creds("u-pull")) as client:
        assert (await client.get("/v2/_catalog")).json()["repositories"] == ["public/base", "team/app"]
    async with auth_seed.client(creds("u-none")) as client:
        assert (await client.get("/v2/_catalog")).json()["repositories"] == ["public/base"]
    anonymous = await token_for(auth_seed, "registry:catalog:*", None)
    async with auth_seed.client(token=anonymous) as client:
        assert (await client.get("/v2/_catalog")).json()["repositories"] == ["public/base"]
    async with auth_seed.client() as client:
        assert (await client.get("/v2/_catalog")).status_code == 401


async def test_public_repository_pulls_without_login(auth_seed: AuthSeed) -> None:
    async with auth_seed.client() as client:
        # Allowed, but nothing there yet: the anonymous caller may learn that of a public pattern.
        assert (await client.get("/v2/public/base/tags/list")).status_code == 404
    async with auth_seed.client(creds("u-admin")) as client:
        digest, _ = await push_image(client, "public/base", "v1")
    # Pushing there needs a rule: u-push has push on team/** only.
    async with auth_seed.client(creds("u-push")) as client:
        r = await client.post("/v2/public/base/blobs/uploads/")
        assert r.status_code == 403
    async with auth_seed.client() as client:
        # /v2/ asks everyone without credentials to log in (that is how clients find the realm)...
        assert (await client.get("/v2/")).status_code == 401
        # ... but a public repository answers a bare request too.
        r = await client.get("/v2/public/base/manifests/v1")
        assert r.status_code == 200 and r.headers["docker-content-digest"] == digest
        r = await client.post("/v2/public/base/blobs/uploads/")
        assert r.status_code == 401
    # The docker way: an anonymous token from the realm, then everything public with it.
    anonymous = await token_for(auth_seed, "repository:public/base:pull", None)
    async with auth_seed.client(token=anonymous) as client:
        assert (await client.get("/v2/")).status_code == 200
        r = await client.get("/v2/public/base/manifests/v1")
        assert r.status_code == 200 and r.headers["docker-content-digest"] == digest
        assert (await client.get("/v2/team/app/tags/list")).status_code == 401


async def test_mount_needs_pull_on_the_source(auth_seed: AuthSeed, tmp_path: Path) -> None:
    async with auth_seed.client(creds("u-admin")) as client:
        _, blobs = await push_image(client, "team/app", "v1")
    # u-push may push to team/** but a mount from a repository it cannot pull is refused
    # (a separate rule would be needed); here both are under team/**, so it works.
    async with auth_seed.client(creds("u-push")) as client:
        r = await client.post("/v2/team/copy/blobs/uploads/", params={"mount": blobs[0], "from": "team/app"})
        assert r.status_code == 201
        r = await client.post("/v2/team/copy/blobs/uploads/", params={"mount": blobs[0], "from": "private/x"})
        assert r.status_code == 403


# ---- the role x endpoint matrix ------------------------------------------------------------


def _endpoints() -> list[tuple[str, str]]:
    """Every (route, method) the registry serves, HEAD included where GET is, from its own table."""
    pairs = set(SeedRegistry._handlers)
    pairs |= {(route, "HEAD") for route, method in SeedRegistry._handlers if method == "GET"}
    pairs.discard(("catalog", "GET"))  # registry-wide, filtered: tested above
    pairs.discard(("catalog", "HEAD"))
    missing = pairs - set(SPEC_ACTION)
    assert not missing, f"routes without a spec entry: {missing}"
    return sorted(pairs)


async def _request_for(client: httpx.AsyncClient, route: str, method: str, repo: str,
                       digest: str, blob: str) -> httpx.Response:
    paths = {
        "blob": f"/v2/{repo}/blobs/{blob}",
        "chunks": f"/v2/{repo}/blobs/{blob}/chunks",
        "grant": f"/v2/{repo}/blobs/{blob}/grant?node=n1",
        "manifest": f"/v2/{repo}/manifests/{digest}",
        "tags": f"/v2/{repo}/tags/list",
        "referrers": f"/v2/{repo}/referrers/{digest}",
        "scan": f"/v2/{repo}/scan/{digest}",
        "signatures": f"/extensions/v2/{repo}/signatures/{digest}",
        "verdict": f"/extensions/v2/{repo}/verdict/{digest}",
        "upload": f"/v2/{repo}/blobs/uploads/",
    }
    path = paths[route]
    if route == "upload" and method != "POST":
        path += "0123456789abcdef0123456789abcdef"
    if route == "manifest" and method == "PUT":
        manifest = image_manifest(b"{}", [])
        return await client.put(f"/v2/{repo}/manifests/m", content=manifest,
                                headers={"Content-Type": mediatypes.OCI_MANIFEST})
    return await client.request(method, path)


@pytest.mark.parametrize("existing", [True, False], ids=["existing", "absent"])
async def test_role_endpoint_matrix(auth_seed: AuthSeed, existing: bool) -> None:
    """Every user x every endpoint, by Basic and by Bearer: allowed ↔ the spec says the role
    includes the action; a refusal looks the same whether the repository exists or not."""
    repo = "team/app" if existing else "team/never-pushed"
    async with auth_seed.client(creds("u-admin")) as client:
        digest, blobs = await push_image(client, "team/app", "v1")
    failures = []
    for (route, method), (user, role) in itertools.product(_endpoints(), [*USERS.items(), (None, None)]):
        action = SPEC_ACTION[(route, method)]
        expected_allowed = role_allows(role, action)
        # Basic: refused → 403 (logged in) or 401 (anonymous).
        async with auth_seed.client(creds(user) if user else None) as client:
            r = await _request_for(client, route, method, repo, digest, blobs[1])
        refused = 401 if user is None else 403
        ok = (r.status_code not in (401, 403)) if expected_allowed else (r.status_code == refused)
        if not ok:
            failures.append(("basic", user, route, method, r.status_code))
        # Bearer: a token asked for everything; the grant is what the role allows.
        token = await token_for(auth_seed, f"repository:{repo}:pull,push,delete", user)
        async with auth_seed.client(token=token) as client:
            r = await _request_for(client, route, method, repo, digest, blobs[1])
        ok = (r.status_code not in (401, 403)) if expected_allowed else (r.status_code == 401)
        if not ok:
            failures.append(("bearer", user, route, method, r.status_code))
    assert not failures, failures


async def test_refusals_do_not_reveal_existence(auth_seed: AuthSeed) -> None:
    async with auth_seed.client(creds("u-admin")) as client:
        _digest, blobs = await push_image(client, "team/app", "v1")
    for auth in (None, creds("u-none")):
        answers = []
        for repo in ("team/app", "team/absent"):
            async with auth_seed.client(auth) as client:
                for path in (f"/v2/{repo}/manifests/v1", f"/v2/{repo}/blobs/{blobs[0]}", f"/v2/{repo}/tags/list"):
                    r = await client.get(path)
                    answers.append((r.status_code, r.content.replace(repo.encode(), b"REPO"),
                                    r.headers.get("www-authenticate", "").replace(repo, "REPO")))
        assert answers[:3] == answers[3:]


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [
    "Basic", "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode(), "Basic " + "A" * 20000,
    "Bearer", "Bearer x.y.z", "Bearer " + "a" * 9000, "Digest foo=bar", "Negotiate abc", "BASIC Og==",
    "Basic " + base64.b64encode(b"\x00user:pw").decode(), "Basic " + base64.b64encode(b"\xff\xfe:pw").decode(),
    "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1LWFkbWluIn0.",
])
async def test_malformed_authorization_headers(auth_seed: AuthSeed, authorization: str) -> None:
    status, _headers, body = await raw_request(auth_seed.info, "GET", "/v2/team/app/tags/list",
                                              [("Authorization", authorization)])
    assert status in (400, 401, 431), (status, body)
    if status != 431:
        assert json.loads(body)["errors"][0]["code"] in ("UNAUTHORIZED", "BAD_REQUEST")


@pytest.mark.parametrize("scope", [
    "repository:team/app", "repository::pull", "repository:Team/App:pull", "repository:team/app:fly",
    "repository:team/../x:pull", "repository:team/app:pull " * 40, "x" * 600, "repository:a%00b:pull",
])
async def test_odd_scopes_are_400(auth_seed: AuthSeed, scope: str) -> None:
    async with auth_seed.client(creds("u-pull")) as client:
        r = await client.get("/token", params={"service": "seed.test", "scope": scope})
    assert r.status_code == 400, r.text
    assert r.json()["errors"][0]["code"] in ("BAD_REQUEST", "NAME_INVALID")


async def test_wrong_service_and_expired_and_foreign_tokens(auth_seed: AuthSeed) -> None:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    async with auth_seed.client(creds("u-pull")) as client:
        r = await client.get("/token", params={"service": "other", "scope": "repository:team/app:pull"})
        assert r.status_code == 400
    token = await token_for(auth_seed, "repository:team/app:pull", "u-pull")
    claims = jwt.decode(token, options={"verify_signature": False})
    header = jwt.get_unverified_header(token)
    foreign = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers=header)
    expired = jwt.encode({**claims, "exp": claims["iat"] - 100},
                         auth_seed.registry.token_service.authority.keys.signer[1],  # type: ignore[union-attr]
                         algorithm="ES256", headers=header)
    for bad in (foreign, expired):
        async with auth_seed.client(token=bad) as client:
            r = await client.get("/v2/team/app/tags/list")
        assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]


async def test_failed_logins_are_throttled_with_retry_after(nursery: trio.Nursery, tmp_path: Path) -> None:
    config_file = write_config(tmp_path)
    text = config_file.read_text().replace("max_failures_per_user = 1000", "max_failures_per_user = 3")
    config_file.write_text(text)
    info, _registry = await nursery.start(partial(serve_seed, load_config(config_file, listen="127.0.0.1:0",
                                                                          data=tmp_path / "data")))
    async with httpx.AsyncClient(base_url=info.url, trust_env=False, timeout=30) as client:
        for _ in range(3):
            r = await client.get("/token", params={"service": "seed.test"}, auth=("u-pull", "wrong"))
            assert r.status_code == 401
        # Locked: even the right password waits, without a bcrypt check; both doors agree.
        r = await client.get("/token", params={"service": "seed.test"}, auth=creds("u-pull"))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
        r = await client.get("/v2/team/app/tags/list", auth=creds("u-pull"))
        assert r.status_code == 429
        # Another user from the same address is not locked (the per-address limit is higher).
        r = await client.get("/v2/team/app/tags/list", auth=creds("u-push"))
        assert r.status_code == 404
