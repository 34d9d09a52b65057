"""LDAP and Active Directory logins (seed.auth.ldap) against a real OpenLDAP ``slapd`` on loopback."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from p2pd.tomlconfig import build_section
from seed.auth.identity import IdentityProvider, Principal
from seed.auth.ldap import LdapConfig, LdapProvider
from seed.errors import ConfigError, ProviderUnavailable
from tests.harness.net import free_port
from tests.harness.slapd import Slapd, SlapdTls, ssha
from tests.harness.tools import require_tool, run

BASE = Slapd.SUFFIX
PEOPLE = f"ou=people,{BASE}"
GROUPS = f"ou=groups,{BASE}"
AD_USERS = f"ou=ad,{BASE}"
SERVICE_DN = f"cn=reader,ou=services,{BASE}"
SERVICE_PASSWORD = "reader-Secret-1"
PASSWORDS = {
    "alice": "alice-Secret-1",
    "bob": "bob-Secret-2",
    "twin": "twin-Secret-3",
    "dave": "dave-Secret-4",
    "ws01$": "machine-Secret-5",
}

DIRECTORY_LDIF = f"""\
dn: ou=people,{BASE}
objectClass: organizationalUnit
ou: people

dn: ou=contractors,{BASE}
objectClass: organizationalUnit
ou: contractors

dn: ou=services,{BASE}
objectClass: organizationalUnit
ou: services

dn: ou=groups,{BASE}
objectClass: organizationalUnit
ou: groups

dn: ou=ad,{BASE}
objectClass: organizationalUnit
ou: ad

dn: {SERVICE_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: reader
userPassword: {ssha(SERVICE_PASSWORD)}

dn: uid=alice,{PEOPLE}
objectClass: inetOrgPerson
uid: alice
cn: Alice Example
sn: Example
userPassword: {ssha(PASSWORDS["alice"])}

dn: uid=bob,{PEOPLE}
objectClass: inetOrgPerson
uid: bob
cn: Bob Example
sn: Example
userPassword: {ssha(PASSWORDS["bob"])}

dn: uid=twin,{PEOPLE}
objectClass: inetOrgPerson
uid: twin
cn: Twin One
sn: One
userPassword: {ssha(PASSWORDS["twin"])}

dn: uid=twin,ou=contractors,{BASE}
objectClass: inetOrgPerson
uid: twin
cn: Twin Two
sn: Two
userPassword: {ssha(PASSWORDS["twin"])}

dn: cn=dave,{AD_USERS}
objectClass: inetOrgPerson
objectClass: user
cn: dave
sn: Dave
sAMAccountName: dave
userPrincipalName: dave@corp.example.com
userPassword: {ssha(PASSWORDS["dave"])}

dn: cn=ws01$,{AD_USERS}
objectClass: inetOrgPerson
objectClass: computer
cn: ws01$
sn: workstation
sAMAccountName: ws01$
userPassword: {ssha(PASSWORDS["ws01$"])}

dn: cn=devs,{GROUPS}
objectClass: groupOfNames
cn: devs
member: uid=alice,{PEOPLE}

dn: cn=ops\\, night shift,{GROUPS}
objectClass: groupOfNames
cn: ops, night shift
member: uid=alice,{PEOPLE}
member: uid=bob,{PEOPLE}

dn: cn=builders,{GROUPS}
objectClass: posixGroup
cn: builders
gidNumber: 5000
memberUid: alice

dn: cn=ad-admins,{GROUPS}
objectClass: groupOfNames
cn: ad-admins
member: cn=dave,{AD_USERS}
"""


# ---- fixtures: a test PKI and slapd ------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca_file: Path
    cert_file: Path
    key_file: Path
    other_ca_file: Path  # a CA that signed nothing the server has


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate it signs for IP 127.0.0.1 only, and an unrelated second CA."""
    ca_key, ca_cert = _make_ca("p2pd test LDAP CA")
    _, other_ca_cert = _make_ca("p2pd test untrusted CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Pki(
        ca_file=_write_pem(directory / "ca.pem", ca_cert.public_bytes(pem)),
        cert_file=_write_pem(directory / "server.pem", cert.public_bytes(pem)),
        key_file=_write_pem(directory / "server.key", key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())),
        other_ca_file=_write_pem(directory / "other-ca.pem", other_ca_cert.public_bytes(pem)),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def running_directory(workdir: Path, **kwargs: Any) -> Iterator[Slapd]:
    """A started slapd holding DIRECTORY_LDIF; stopped and removed afterwards."""
    server = Slapd(workdir, **kwargs)
    try:
        server.start()
        server.add_ldif(DIRECTORY_LDIF)
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Slapd]:
    """One directory (StartTLS and LDAPS too) for the tests that do not stop or count it."""
    tls = SlapdTls(cert_file=pki.cert_file, key_file=pki.key_file, ca_file=pki.ca_file)
    with running_directory(tmp_path_factory.mktemp("slapd"), tls=tls) as server:
        yield server


@pytest.fixture
def own_slapd(tmp_path: Path) -> Iterator[Slapd]:
    """A directory of this test's own (it may be stopped, or its connections counted)."""
    with running_directory(tmp_path / "slapd") as server:
        yield server


@pytest.fixture(scope="module")
def service_password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secrets") / "ldap-bind-password"
    path.write_text(SERVICE_PASSWORD + "\n")
    path.chmod(0o600)
    return path


def search_config(url: str, password_file: Path, **overrides: Any) -> LdapConfig:
    """Search-then-bind with the service account, memberOf only."""
    settings: dict[str, Any] = {
        "name": "corp",
        "url": url,
        "bind_dn": SERVICE_DN,
        "bind_password_file": password_file,
        "user_base": PEOPLE,
        "timeout": 2.0,
    }
    settings.update(overrides)
    return LdapConfig(**settings)


def closed_port_url() -> str:
    return f"ldap://127.0.0.1:{free_port()}"


# ---- logins ------------------------------------------------------------------------------------


def test_provider_satisfies_the_identity_provider_protocol(slapd: Slapd, service_password_file: Path) -> None:
    provider = LdapProvider(search_config(slapd.url, service_password_file))
    assert isinstance(provider, IdentityProvider)
    assert provider.name == "ldap:corp"


def test_right_password_gives_groups_from_member_of(slapd: Slapd, service_password_file: Path) -> None:
    provider = LdapProvider(search_config(slapd.url, service_password_file))
    principal = provider.authenticate("alice", PASSWORDS["alice"])
    assert principal == Principal(kind="user", name="alice", groups=frozenset({"devs", "ops, night shift"}),
                                  provider="ldap:corp")
    bob = provider.authenticate("bob", PASSWORDS["bob"])
    assert bob is not None and bob.groups == frozenset({"ops, night shift"})


def test_groups_from_a_group_search(slapd: Slapd, service_password_file: Path) -> None:
    # memberOf off: groups come only from the search, groupOfNames by DN and posixGroup by uid.
    provider = LdapProvider(search_config(slapd.url, service_password_file, group_attribute="",
                                          group_base=GROUPS, group_filter="(|(member={dn})(memberUid={username}))"))
    principal = provider.authenticate("alice", PASSWORDS["alice"])
    assert principal is not None
    assert principal.groups == frozenset({"devs", "ops, night shift", "builders"})
    posix_only = LdapProvider(search_config(slapd.url, service_password_file, group_base=GROUPS,
                                            group_filter="(memberUid={username})"))
    bob = posix_only.authenticate("bob", PASSWORDS["bob"])
    assert bob is not None and bob.groups == frozenset({"ops, night shift"})  # memberOf, no posix group


def test_name_is_the_directory_spelling(slapd: Slapd, service_password_file: Path) -> None:
    provider = LdapProvider(search_config(slapd.url, service_password_file))
    principal = provider.authenticate("ALICE", PASSWORDS["alice"])
    assert principal is not None and principal.name == "alice"


def test_wrong_password_and_unknown_user_are_none(slapd: Slapd, service_password_file: Path) -> None:
    provider = LdapProvider(search_config(slapd.url, service_password_file))
    assert provider.authenticate("alice", PASSWORDS["bob"]) is None
    assert provider.authenticate("alice", PASSWORDS["alice"] + " ") is None
    assert provider.authenticate("mallory", "anything") is None


def test_a_username_two_entries_match_is_refused(slapd: Slapd, service_password_file: Path) -> None:
    provider = LdapProvider(search_config(slapd.url, service_password_file, user_base=BASE))
    assert provider.authenticate("twin", PASSWORDS["twin"]) is None
    # Under a base where it is unique the same login works.
    assert LdapProvider(search_config(slapd.url, service_password_file)).authenticate(
        "twin", PASSWORDS["twin"]) is not None


@pytest.mark.parametrize("username", ["*", "ali*", "*)(uid=*", "alice)(uid=*", "*)(|(uid=*", "alice\\2a"])
def test_filter_injection_finds_nobody(slapd: Slapd, service_password_file: Path, username: str) -> None:
    # With alice's right password: an unescaped "ali*" or "*)(uid=*" would find her entry.
    provider = LdapProvider(search_config(slapd.url, service_password_file))
    assert provider.authenticate(username, PASSWORDS["alice"]) is None


def test_anonymous_search_when_no_service_account(slapd: Slapd) -> None:
    provider = LdapProvider(LdapConfig(name="corp", url=slapd.url, user_base=PEOPLE, timeout=2.0))
    principal = provider.authenticate("alice", PASSWORDS["alice"])
    assert principal is not None and principal.groups == frozenset({"devs", "ops, night shift"})
    assert provider.authenticate("alice", "wrong") is None


def test_direct_bind_with_a_dn_template(slapd: Slapd) -> None:
    provider = LdapProvider(LdapConfig(name="corp", url=slapd.url, timeout=2.0,
                                       bind_template=f"uid={{username}},{PEOPLE}"))
    principal = provider.authenticate("alice", PASSWORDS["alice"])
    assert principal == Principal(kind="user", name="alice", groups=frozenset({"devs", "ops, night shift"}),
                                  provider="ldap:corp")
    assert provider.authenticate("alice", "wrong") is None
    assert provider.authenticate("mallory", "anything") is None
    # DN metacharacters are escaped: this is not "uid=reader" under another branch.
    assert provider.authenticate(f"x,{SERVICE_DN}", SERVICE_PASSWORD) is None
    assert provider.authenticate("alice+cn=Alice Example", PASSWORDS["alice"]) is None


def test_direct_bind_entry_must_match_the_user_filter(slapd: Slapd) -> None:
    # The service account's password is right, but it is no (uid=...) user.
    provider = LdapProvider(LdapConfig(name="corp", url=slapd.url, timeout=2.0,
                                       bind_template=f"cn={{username}},ou=services,{BASE}"))
    assert provider.authenticate("reader", SERVICE_PASSWORD) is None


def test_active_directory_preset_search_then_bind(slapd: Slapd, service_password_file: Path) -> None:
    # AD emulated in slapd: sAMAccountName and the user/computer classes from AD_LITE_SCHEMA,
    # memberOf from the overlay. (UPN binds and objectCategory are AD-only.)
    provider = LdapProvider(search_config(slapd.url, service_password_file, user_base=AD_USERS,
                                          active_directory=True))
    principal = provider.authenticate("Dave", PASSWORDS["dave"])
    assert principal == Principal(kind="user", name="dave", groups=frozenset({"ad-admins"}), provider="ldap:corp")
    assert provider.authenticate("dave", "wrong") is None
    # A computer account has a password, but the preset filter does not admit it as a user.
    assert provider.authenticate("ws01$", PASSWORDS["ws01$"]) is None


def test_active_directory_preset_direct_bind(slapd: Slapd) -> None:
    # In AD the template would be "{username}@corp.example.com" plus user_base; slapd binds DNs only.
    provider = LdapProvider(LdapConfig(name="ad", url=slapd.url, timeout=2.0, active_directory=True,
                                       bind_template=f"cn={{username}},{AD_USERS}"))
    principal = provider.authenticate("dave", PASSWORDS["dave"])
    assert principal == Principal(kind="user", name="dave", groups=frozenset({"ad-admins"}), provider="ldap:ad")
    assert provider.authenticate("ws01$", PASSWORDS["ws01$"]) is None


def test_a_non_dn_template_finds_the_entry_that_bound(slapd: Slapd) -> None:
    # The UPN path (bind name not a DN, entry found by searching) run against slapd: the "UPN" is
    # the DN itself and the filter finds the entry by entryDN.
    provider = LdapProvider(LdapConfig(name="corp", url=slapd.url, timeout=2.0, bind_template="{username}",
                                       user_base=PEOPLE, user_filter="(entryDN={username})"))
    principal = provider.authenticate(f"uid=alice,{PEOPLE}", PASSWORDS["alice"])
    assert principal is not None and principal.name == "alice"
    assert principal.groups == frozenset({"devs", "ops, night shift"})
    assert provider.authenticate(f"uid=alice,{PEOPLE}", "wrong") is None


def test_a_non_dn_template_refuses_an_entry_other_than_the_bound_one(slapd: Slapd,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    # As when alice@corp.example.com is an account whose sAMAccountName is not "alice" while
    # another account's is: the filter here finds bob for alice's bind.
    provider = LdapProvider(LdapConfig(name="corp", url=slapd.url, timeout=2.0, bind_template="{username}",
                                       user_base=PEOPLE, user_filter="(|(uid=bob)(description={username}))"))
    with caplog.at_level(logging.WARNING, logger="seed.auth.ldap"):
        assert provider.authenticate(f"uid=alice,{PEOPLE}", PASSWORDS["alice"]) is None
    assert "bound as" in caplog.text


def test_a_upn_template_needs_a_user_base() -> None:
    with pytest.raises(ValueError, match="user_base"):
        LdapConfig(name="ad", url="ldaps://dc.corp.example:636", bind_template="{username}@corp.example.com")


# ---- what never reaches the server -------------------------------------------------------------


def test_empty_password_is_refused_though_the_server_would_accept_it(tmp_path: Path) -> None:
    with running_directory(tmp_path / "slapd", allow_unauthenticated_bind=True) as server:
        # The hazard: with a DN and no password, this server answers "success" (anonymously).
        whoami = run([require_tool("ldapwhoami"), "-x", "-H", server.url, "-D", f"uid=alice,{PEOPLE}", "-w", ""],
                     timeout=10)
        assert whoami.returncode == 0 and whoami.stdout.strip() == b"anonymous"
        before = server.connection_count()
        for config in (
            LdapConfig(name="corp", url=server.url, bind_template=f"uid={{username}},{PEOPLE}", timeout=2.0),
            LdapConfig(name="corp", url=server.url, user_base=PEOPLE, timeout=2.0),
        ):
            assert LdapProvider(config).authenticate("alice", "") is None
        assert server.connection_count() == before  # refused before connecting


@pytest.mark.parametrize("username", ["", "alice\n", "al\x00ice", "alice\r", "ali\u200bce", "a" * 257])
def test_bad_usernames_are_refused_without_asking(username: str) -> None:
    # The URL is a closed port: asking would raise ProviderUnavailable.
    provider = LdapProvider(LdapConfig(name="corp", url=closed_port_url(), user_base=PEOPLE, timeout=1.0))
    assert provider.authenticate(username, "some password") is None


def test_service_account_without_a_password_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bind_dn needs"):
        LdapConfig(name="corp", url="ldap://127.0.0.1:389", bind_dn=SERVICE_DN, user_base=PEOPLE)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        LdapProvider(LdapConfig(name="corp", url="ldap://127.0.0.1:389", bind_dn=SERVICE_DN,
                                bind_password_file=empty, user_base=PEOPLE))


# ---- servers that cannot be asked --------------------------------------------------------------


def test_closed_port_is_unavailable_quickly(caplog: pytest.LogCaptureFixture) -> None:
    url = closed_port_url()
    provider = LdapProvider(LdapConfig(name="corp", url=url, user_base=PEOPLE, timeout=2.0))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="seed.auth.ldap"), pytest.raises(ProviderUnavailable) as raised:
        provider.authenticate("alice", PASSWORDS["alice"])
    assert time.monotonic() - started < 2.0
    assert url in str(raised.value)
    assert any(url in record.getMessage() and "did not answer" in record.getMessage() for record in caplog.records)
    assert PASSWORDS["alice"] not in caplog.text and PASSWORDS["alice"] not in str(raised.value)


async def serve_silently(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Accepts TCP connections on a loopback port and never sends a byte."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []
    async with listeners[0]:
        task_status.started(listeners[0].socket.getsockname()[1])
        while True:
            held.append(await listeners[0].accept())


@pytest.mark.parametrize("scheme", ["ldap", "ldaps"])
async def test_silent_server_is_unavailable_within_the_timeout(
    nursery: trio.Nursery, pki: Pki, scheme: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = await nursery.start(serve_silently)
    url = f"{scheme}://127.0.0.1:{port}"
    provider = LdapProvider(LdapConfig(name="corp", url=url, bind_dn=SERVICE_DN, bind_password=SERVICE_PASSWORD,
                                       user_base=PEOPLE, ca_file=pki.ca_file, timeout=0.5))
    started = trio.current_time()
    with trio.fail_after(10), pytest.raises(ProviderUnavailable):
        await trio.to_thread.run_sync(provider.authenticate, "alice", PASSWORDS["alice"], abandon_on_cancel=True)
    assert 0.4 <= trio.current_time() - started < 3.0
    assert url in caplog.text
    assert SERVICE_PASSWORD not in caplog.text and PASSWORDS["alice"] not in caplog.text


async def serve_garbage(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answers every connection with bytes that are no LDAP message, then closes it."""

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(5):
                await stream.receive_some()
                await stream.send_all(b"\x30\x0c\x02\x01\x01\x61\x07not-ldap-at-all" * 4)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0], trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        while True:
            nursery.start_soon(answer, await listeners[0].accept())


async def test_garbled_answers_are_unavailable(nursery: trio.Nursery) -> None:
    port = await nursery.start(serve_garbage)
    for config in (
        LdapConfig(name="corp", url=f"ldap://127.0.0.1:{port}", user_base=PEOPLE, timeout=1.0),
        LdapConfig(name="corp", url=f"ldap://127.0.0.1:{port}", bind_template=f"uid={{username}},{PEOPLE}",
                   timeout=1.0),
    ):
        with trio.fail_after(10), pytest.raises(ProviderUnavailable):
            await trio.to_thread.run_sync(LdapProvider(config).authenticate, "alice", PASSWORDS["alice"],
                                          abandon_on_cancel=True)


async def test_failover_to_the_next_url(nursery: trio.Nursery, slapd: Slapd, service_password_file: Path) -> None:
    silent = await nursery.start(serve_silently)
    provider = LdapProvider(search_config(closed_port_url(), service_password_file, timeout=0.5,
                                          failover_urls=(f"ldap://127.0.0.1:{silent}", slapd.url)))
    with trio.fail_after(10):
        principal = await trio.to_thread.run_sync(provider.authenticate, "alice", PASSWORDS["alice"],
                                                  abandon_on_cancel=True)
    assert principal is not None and principal.name == "alice"


def test_no_failover_when_the_server_says_no(slapd: Slapd, service_password_file: Path) -> None:
    # The second URL is closed: were it asked after the "no", the result would be unavailable.
    provider = LdapProvider(search_config(slapd.url, service_password_file, failover_urls=(closed_port_url(),)))
    assert provider.authenticate("alice", "wrong") is None


def test_wrong_service_password_is_unavailable(slapd: Slapd, caplog: pytest.LogCaptureFixture) -> None:
    provider = LdapProvider(LdapConfig(name="corp", url=slapd.url, bind_dn=SERVICE_DN, bind_password="not-it",
                                       user_base=PEOPLE, timeout=2.0))
    with caplog.at_level(logging.WARNING, logger="seed.auth.ldap"), pytest.raises(ProviderUnavailable):
        provider.authenticate("alice", PASSWORDS["alice"])
    assert "service account" in caplog.text and "not-it" not in caplog.text


# ---- TLS ---------------------------------------------------------------------------------------


def test_start_tls_and_ldaps_with_the_right_ca(slapd: Slapd, pki: Pki, service_password_file: Path) -> None:
    for config in (
        search_config(slapd.url, service_password_file, start_tls=True, ca_file=pki.ca_file),
        search_config(slapd.ldaps_url, service_password_file, ca_file=pki.ca_file),
        LdapConfig(name="corp", url=slapd.ldaps_url, ca_file=pki.ca_file, timeout=2.0,
                   bind_template=f"uid={{username}},{PEOPLE}"),
    ):
        principal = LdapProvider(config).authenticate("alice", PASSWORDS["alice"])
        assert principal is not None and principal.groups == frozenset({"devs", "ops, night shift"}), config
        assert LdapProvider(config).authenticate("alice", "wrong") is None


def test_untrusted_certificate_fails_closed(slapd: Slapd, pki: Pki, service_password_file: Path) -> None:
    port = slapd.ldaps_url.rsplit(":", 1)[1]
    for config in (
        search_config(slapd.url, service_password_file, start_tls=True, ca_file=pki.other_ca_file),
        search_config(slapd.ldaps_url, service_password_file, ca_file=pki.other_ca_file),
        search_config(slapd.ldaps_url, service_password_file),  # the system's CAs do not know ours
        LdapConfig(name="corp", url=slapd.ldaps_url, ca_file=pki.other_ca_file, timeout=2.0,
                   bind_template=f"uid={{username}},{PEOPLE}"),
    ):
        with pytest.raises(ProviderUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            LdapProvider(config).authenticate("alice", PASSWORDS["alice"])
    # The right CA, but the certificate names 127.0.0.1, not localhost.
    for config in (
        search_config(f"ldaps://localhost:{port}", service_password_file, ca_file=pki.ca_file),
        search_config(f"ldap://localhost:{slapd.port}", service_password_file, start_tls=True, ca_file=pki.ca_file),
    ):
        with pytest.raises(ProviderUnavailable, match=r"does not match the server name \['localhost'\]"):
            LdapProvider(config).authenticate("alice", PASSWORDS["alice"])


def test_start_tls_refused_fails_closed(own_slapd: Slapd, pki: Pki, service_password_file: Path) -> None:
    # own_slapd has no TLS: StartTLS is refused, and the login must not go on in clear text.
    provider = LdapProvider(search_config(own_slapd.url, service_password_file, start_tls=True, ca_file=pki.ca_file))
    with pytest.raises(ProviderUnavailable, match=r"(?i)starttls"):
        provider.authenticate("alice", PASSWORDS["alice"])
    assert " BIND dn=" not in own_slapd.log_text().split("EXT oid=1.3.6.1.4.1.1466.20037", 1)[1]


# ---- the login cache ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_serves_a_repeat_login_and_never_a_wrong_password(own_slapd: Slapd,
                                                                service_password_file: Path) -> None:
    clock = FakeClock()
    provider = LdapProvider(search_config(own_slapd.url, service_password_file, cache_ttl=60), clock=clock)
    first = provider.authenticate("alice", PASSWORDS["alice"])
    assert first is not None
    connections = own_slapd.connection_count()
    assert provider.authenticate("alice", PASSWORDS["alice"]) == first
    assert own_slapd.connection_count() == connections  # no round trip
    assert provider.authenticate("alice", "wrong") is None
    assert own_slapd.connection_count() > connections  # a wrong password is asked, not answered from cache

    own_slapd.stop()
    clock.now += 59
    assert provider.authenticate("alice", PASSWORDS["alice"]) == first  # still within ttl, server down
    with pytest.raises(ProviderUnavailable):
        provider.authenticate("alice", "wrong")
    with pytest.raises(ProviderUnavailable):
        provider.authenticate("bob", PASSWORDS["bob"])
    clock.now += 2  # past ttl
    with pytest.raises(ProviderUnavailable):
        provider.authenticate("alice", PASSWORDS["alice"])


def test_cache_off_asks_every_time(own_slapd: Slapd, service_password_file: Path) -> None:
    provider = LdapProvider(search_config(own_slapd.url, service_password_file, cache_ttl=0))
    assert provider.authenticate("alice", PASSWORDS["alice"]) is not None
    connections = own_slapd.connection_count()
    assert provider.authenticate("alice", PASSWORDS["alice"]) is not None
    assert own_slapd.connection_count() > connections


async def test_concurrent_logins_from_worker_threads(slapd: Slapd, service_password_file: Path) -> None:
    provider = LdapProvider(search_config(slapd.url, service_password_file, cache_ttl=0))
    results: dict[int, Principal | None] = {}

    async def login(index: int) -> None:
        user = "alice" if index % 2 else "bob"
        password = PASSWORDS[user] if index % 3 else "wrong"
        results[index] = await trio.to_thread.run_sync(provider.authenticate, user, password, abandon_on_cancel=True)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for index in range(12):
                nursery.start_soon(login, index)
    for index, principal in results.items():
        if index % 3:
            assert principal is not None and principal.name == ("alice" if index % 2 else "bob")
        else:
            assert principal is None


# ---- configuration and secrets -----------------------------------------------------------------


def test_built_from_a_toml_table(tmp_path: Path) -> None:
    table = {
        "name": "corp",
        "url": "ldaps://ldap1.corp.example:636",
        "failover_urls": ["ldaps://ldap2.corp.example:636"],
        "ca_file": str(tmp_path / "ca.pem"),
        "bind_dn": SERVICE_DN,
        "bind_password_file": str(tmp_path / "pw"),
        "user_base": PEOPLE,
        "group_base": GROUPS,
        "timeout": 3,
        "cache_ttl": 30,
        "active_directory": False,
    }
    config = build_section(LdapConfig, table, "auth.ldap")
    assert config.urls == ("ldaps://ldap1.corp.example:636", "ldaps://ldap2.corp.example:636")
    assert config.ca_file == tmp_path / "ca.pem" and config.timeout == 3.0
    assert config.effective_user_filter == "(uid={username})"
    assert replace(config, active_directory=True).effective_username_attribute == "sAMAccountName"
    for bad in (
        {"url": "http://ldap.example"},
        {"start_tls": True},  # with ldaps:// URLs
        {"bind_password": "x"},  # and a password file
        {"user_filter": "uid={username}"},
        {"user_filter": "(uid=alice)"},
        {"timeout": 0},
        {"colour": "blue"},
        {"user_base": ""},
    ):
        with pytest.raises(ConfigError):
            build_section(LdapConfig, {**table, **bad}, "auth.ldap")


def test_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_file"):
        LdapProvider(LdapConfig(name="corp", url="ldaps://127.0.0.1:636", user_base=PEOPLE,
                                ca_file=tmp_path / "absent.pem"))


def test_secrets_never_logged_or_shown(slapd: Slapd, caplog: pytest.LogCaptureFixture) -> None:
    config = LdapConfig(name="corp", url=slapd.url, bind_dn=SERVICE_DN, bind_password=SERVICE_PASSWORD,
                        user_base=PEOPLE, group_base=GROUPS, timeout=2.0)
    assert SERVICE_PASSWORD not in repr(config)
    provider = LdapProvider(config)
    with caplog.at_level(logging.DEBUG):
        provider.authenticate("alice", PASSWORDS["alice"])
        provider.authenticate("alice", PASSWORDS["alice"])
        provider.authenticate("alice", "wrong-Secret-9")
        provider.authenticate("twin", PASSWORDS["twin"])
        provider.authenticate("alice", "")
    for secret in (SERVICE_PASSWORD, PASSWORDS["alice"], "wrong-Secret-9", PASSWORDS["twin"]):
        assert secret not in caplog.text
