"""LDAP through the whole seed: ``[[auth.ldap]]`` in the TOML, group rules in ``[[access]]``, the
token service and Basic auth, against a real ``slapd``; the directory going away fails closed
(401 within the timeout, a clear log line) while other providers keep working."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from seed.config import load_config
from seed.registry import serve_seed
from tests.harness.slapd import Slapd
from tests.test_seed_api import push_blob
from tests.test_seed_auth_api import make_htpasswd
from tests.test_seed_ldap import PASSWORDS, PEOPLE, SERVICE_DN, SERVICE_PASSWORD, running_directory


@pytest.fixture
def directory(tmp_path: Path) -> Iterator[Slapd]:
    with running_directory(tmp_path / "slapd") as server:
        yield server


def _config(tmp_path: Path, url: str) -> Path:
    password_file = tmp_path / "bind.password"
    password_file.write_text(SERVICE_PASSWORD)
    htpasswd = tmp_path / "htpasswd"
    make_htpasswd(htpasswd, {"local-admin": "local-pw"})
    config = tmp_path / "seed.toml"
    config.write_text(f"""
[auth]
htpasswd = "{htpasswd}"
service = "seed.test"
providers = ["ldap:corp", "htpasswd"]

[[auth.ldap]]
name = "corp"
url = "{url}"
bind_dn = "{SERVICE_DN}"
bind_password_file = "{password_file}"
user_base = "{PEOPLE}"
timeout = 1.0
cache_ttl = 0.0

[[access]]
repositories = ["devs/**"]
groups = ["devs"]
role = "push"

[[access]]
repositories = ["devs/**"]
users = ["local-admin"]
role = "admin"
""")
    return config


async def test_ldap_groups_grant_and_a_dead_directory_fails_closed(
        directory: Slapd, tmp_path: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(_config(tmp_path, directory.url), listen="127.0.0.1:0", data=tmp_path / "data")
    info, _registry = await nursery.start(partial(serve_seed, config))
    alice = ("alice", PASSWORDS["alice"])  # member of cn=devs
    bob = ("bob", PASSWORDS["bob"])  # not a member
    async with httpx.AsyncClient(base_url=info.url, trust_env=False, timeout=30) as client:
        r = await client.get("/token", params={"service": "seed.test", "scope": "repository:devs/app:pull,push"},
                             auth=alice)
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        await push_blob(httpx.AsyncClient(base_url=info.url, trust_env=False, timeout=30,
                                          headers={"Authorization": f"Bearer {token}"}), "devs/app", b"layer")
        assert (await client.get("/v2/devs/app/tags/list", auth=bob)).status_code == 403
        assert (await client.get("/v2/devs/app/tags/list", auth=("alice", "wrong"))).status_code == 401
        assert (await client.get("/v2/devs/app/tags/list", auth=("alice", ""))).status_code == 401

        # The directory goes away: LDAP logins fail closed, quickly, with a clear log line;
        # the next provider (htpasswd) still answers for its own users.
        directory.close()
        caplog.set_level(logging.WARNING)
        started = time.monotonic()
        r = await client.get("/v2/devs/app/tags/list", auth=alice)
        assert r.status_code == 401
        assert time.monotonic() - started < 10
        assert any("ldap:corp" in rec.getMessage() and "unavailable" in rec.getMessage() for rec in caplog.records)
        assert all(PASSWORDS["alice"] not in rec.getMessage() for rec in caplog.records)
        assert (await client.get("/v2/devs/app/tags/list", auth=("local-admin", "local-pw"))).status_code == 200
