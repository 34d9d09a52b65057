"""One conformance test for every ``IdentityProvider``: the in-memory fake, htpasswd (made by
Debian's ``htpasswd``), robot accounts, and LDAP against a real ``slapd``.

What every provider must do: the right password gives the principal with the provider's
name; a wrong, empty or overlong password, an unknown user and a username with control
characters give ``None``; the answer never depends on anything but the pair given.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from seed.auth.htpasswd import HtpasswdProvider
from seed.auth.identity import IdentityProvider, MemoryIdentityProvider
from seed.auth.ldap import LdapConfig, LdapProvider
from seed.auth.robots import MemoryRobotStore, RobotProvider, parse_access_spec
from tests.harness.slapd import Slapd, ssha
from tests.harness.tools import require_tool


@dataclass
class Case:
    provider: IdentityProvider
    username: str
    password: str
    kind: str
    provider_name: str


def _memory(tmp_path: Path) -> Iterator[Case]:
    yield Case(MemoryIdentityProvider({"alice": ("alice-pw", frozenset({"dev"}))}), "alice", "alice-pw", "user",
               "memory")


def _htpasswd(tmp_path: Path) -> Iterator[Case]:
    path = tmp_path / "htpasswd"
    subprocess.run([require_tool("htpasswd"), "-bBc", "-C", "5", str(path), "alice", "alice-pw"], check=True,
                   capture_output=True, timeout=30)
    yield Case(HtpasswdProvider(path), "alice", "alice-pw", "user", "htpasswd")


def _robot(tmp_path: Path) -> Iterator[Case]:
    store = MemoryRobotStore()
    record, secret = store.create("ci", parse_access_spec("team/*:pull,push"), None)
    yield Case(RobotProvider(store), record.login_name, secret, "robot", "robot")


def _ldap(tmp_path: Path) -> Iterator[Case]:
    server = Slapd(tmp_path / "slapd")
    try:
        server.start()
        server.add_ldif(f"dn: ou=people,{Slapd.SUFFIX}\nobjectClass: organizationalUnit\nou: people\n\n"
                        f"dn: uid=alice,ou=people,{Slapd.SUFFIX}\nobjectClass: inetOrgPerson\nuid: alice\n"
                        f"cn: Alice\nsn: A\nuserPassword: {ssha('alice-pw')}\n")
        config = LdapConfig(name="corp", url=server.url, bind_template=f"uid={{username}},ou=people,{Slapd.SUFFIX}",
                            user_base=f"ou=people,{Slapd.SUFFIX}", timeout=2.0, cache_ttl=0.0)
        yield Case(LdapProvider(config), "alice", "alice-pw", "user", "ldap:corp")
    finally:
        server.close()


@pytest.fixture(params=[_memory, _htpasswd, _robot, _ldap], ids=["memory", "htpasswd", "robot", "ldap"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    yield from request.param(tmp_path)


def test_identity_provider_conformance(case: Case) -> None:
    provider = case.provider
    assert isinstance(provider, IdentityProvider)
    assert provider.name
    principal = provider.authenticate(case.username, case.password)
    assert principal is not None
    assert principal.name == case.username and principal.kind == case.kind
    assert principal.provider == case.provider_name
    # Everything else is "no", never an exception.
    for username, password in [
        (case.username, case.password + "x"),
        (case.username, case.password[:-1]),
        (case.username, ""),
        (case.username, "x" * 2000),
        ("nobody-" + case.username, case.password),
        (case.username + "\x00", case.password),
        ("", case.password),
    ]:
        assert provider.authenticate(username, password) is None, (username, password[:20])
    # And the right pair still works afterwards (no lockout or state inside providers).
    assert provider.authenticate(case.username, case.password) is not None
