"""Logins against an LDAP directory or Active Directory (``[[auth.ldap]]``), through ldap3.

Two ways to check a password:

- search, then bind: a service account (``bind_dn``) or an anonymous connection finds the
  user's entry under ``user_base`` with ``user_filter``; a second connection binds as that
  entry's DN with the password. Groups are read with the service connection.
- direct bind (``bind_template``): the user binds with a DN or an AD user principal name made
  from the username, then reads its own entry and groups with that same connection.

Rules/invariants:
- An empty password never reaches the server: a simple bind with a DN and no password is an
  "unauthenticated bind" that many servers (Active Directory among them) answer with success,
  as an anonymous session. A service account configured without a password is refused too.
- A login names the entry that bound: the one found by search-then-bind, the DN of a DN
  template, or, with a UPN template, the entry the server's Who am I? answer points to.
- Usernames are bounded (256 characters, no control or format characters) and escaped before
  they go into a filter (``escape_filter_chars``) or a DN (``escape_rdn``); a user search must
  find exactly one entry.
- Every network wait is bounded by ``timeout`` (connect, and each answer); StartTLS that is
  refused or a certificate that does not verify fails closed, never falls back to clear text.
- The directory saying no is ``None``; the directory not answering (refused, timed out, TLS
  failure, an unexpected result) is ``ProviderUnavailable`` once every URL has been tried.
  ldap3's exceptions do not leave this module.
- Passwords are never logged or kept: the login cache holds an HMAC of the password under a
  key made at start-up and compares it in constant time; only successes are cached.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import ssl
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import escape_rdn, parse_dn

from ..errors import ConfigError, ProviderUnavailable
from .identity import Principal

__all__ = ["MAX_USERNAME_LENGTH", "LdapConfig", "LdapProvider"]

log = logging.getLogger("seed.auth.ldap")

MAX_USERNAME_LENGTH = 256
_CACHE_MAX_ENTRIES = 10_000
_GROUP_PAGE_SIZE = 500
_MAX_REASON = 300  # characters of a server's or ldap3's error text kept in logs and exceptions

_USER_FILTER = "(uid={username})"
_USERNAME_ATTRIBUTE = "uid"
# Computers are users too in AD (``computer`` is a subclass of ``user``) and have passwords.
_AD_USER_FILTER = "(&(objectClass=user)(!(objectClass=computer))(sAMAccountName={username}))"
_AD_USERNAME_ATTRIBUTE = "sAMAccountName"

# LDAP result codes (RFC 4511).
_SUCCESS = 0
_SIZE_LIMIT_EXCEEDED = 4
_NO_SUCH_OBJECT = 32
# A bind answered with one of these is the directory saying no to these credentials: wrong
# password or unknown DN (49, also AD's locked, disabled and expired accounts), a password policy
# refusal (19), or a server that refuses this kind of bind for this entry (48, 50, 53).
_BIND_REFUSALS = frozenset({19, 32, 34, 48, 49, 50, 53})

# ldap3 refusing the credentials itself, before or instead of sending them.
_LOCAL_REFUSALS: tuple[type[Exception], ...] = (
    ldap_errors.LDAPPasswordIsMandatoryError,
    ldap_errors.LDAPUserNameIsMandatoryError,
    ldap_errors.LDAPSASLPrepError,
    ldap_errors.LDAPInvalidDnError,
)


@dataclass(frozen=True, slots=True)
class LdapConfig:
    """One ``[[auth.ldap]]`` directory.

    Attributes:
        name: names the provider: principals say ``provider = "ldap:<name>"`` and
            ``[auth] providers`` lists it as ``ldap:<name>``.
        url: ``ldap://host:389`` or ``ldaps://host:636``.
        failover_urls: more servers of the same directory, tried in order when the ones before
            do not answer (never when one answers "no").
        start_tls: upgrade ``ldap://`` connections with StartTLS before anything is sent; a
            server that refuses fails the login.
        ca_file: PEM file of the CAs that may sign the servers' certificates (LDAPS or
            StartTLS). Unset: the system's CAs. Certificates are always verified, host name too.
        bind_dn: the service account that searches for users (search-then-bind). Unset: the
            search is anonymous (or, with ``bind_template``, there is no search).
        bind_password: the service account's password. Prefer ``bind_password_file``.
        bind_password_file: file holding the service account's password (one line).
        user_base: where users are searched (subtree), e.g. ``ou=people,dc=example,dc=org``.
        user_filter: the user search; ``{username}`` is replaced by the escaped username.
            Default ``(uid={username})``, or with ``active_directory``
            ``(&(objectClass=user)(!(objectClass=computer))(sAMAccountName={username}))``.
            With a DN ``bind_template`` the bound entry must match it too.
        username_attribute: the entry's attribute holding the canonical username (principals
            are named by it, so ``ALICE`` logs in as ``alice``). Default ``uid``, or
            ``sAMAccountName`` with ``active_directory``.
        bind_template: direct bind instead of search-then-bind: the bind name, with
            ``{username}`` replaced. A DN (``uid={username},ou=people,dc=example,dc=org``; the
            username is DN-escaped) or, in AD, a user principal name (``{username}@corp.example.com``)
            or down-level name (``CORP\\{username}``), which then needs ``user_base`` to find
            the entry; that entry must be the one the server says is bound (Who am I?).
        group_attribute: attribute of the user's entry listing its groups' DNs (``memberOf``;
            needs OpenLDAP's memberof overlay, built into AD). Each group is named by its DN's
            first value (``cn=devs,ou=groups,...`` is ``devs``). Empty: not read.
        group_base: where to search groups (subtree). Empty: no group search.
        group_filter: the group search; ``{dn}`` is the user's DN and ``{username}`` the
            canonical username, both escaped: ``(member={dn})`` (groupOfNames),
            ``(memberUid={username})`` (posixGroup), or in AD nested groups with
            ``(member:1.2.840.113556.1.4.1941:={dn})``.
        group_name_attribute: the attribute that names a group found by the search (``cn``).
        timeout: seconds allowed to connect, and to wait for each answer (an LDAPS handshake
            waits this rounded up to whole seconds, an ldap3 limit).
        cache_ttl: seconds a successful login is remembered (0 turns the cache off). A
            password changed or an account disabled in the directory still works this long.
        active_directory: Active Directory defaults for ``user_filter`` and
            ``username_attribute`` (above). AD specifics otherwise: ``bind_template`` may be a
            UPN, ``memberOf`` does not list the primary group (``Domain Users``), nested groups
            need the in-chain matching rule in ``group_filter``.
    """

    name: str
    url: str
    failover_urls: tuple[str, ...] = ()
    start_tls: bool = False
    ca_file: Path | None = None
    bind_dn: str = ""
    bind_password: str = field(default="", repr=False)
    bind_password_file: Path | None = None
    user_base: str = ""
    user_filter: str = ""
    username_attribute: str = ""
    bind_template: str = ""
    group_attribute: str = "memberOf"
    group_base: str = ""
    group_filter: str = "(member={dn})"
    group_name_attribute: str = "cn"
    timeout: float = 5.0
    cache_ttl: float = 60.0
    active_directory: bool = False

    def __post_init__(self) -> None:
        # ValueError: build_section reports it as a ConfigError naming [auth.ldap].
        if not self.name:
            raise ValueError("name is required")
        where = f"ldap:{self.name}"
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
                raise ValueError(f"{where}: url must be ldap://host[:port] or ldaps://host[:port], got {url!r}")
        if self.start_tls and any(url.startswith("ldaps:") for url in self.urls):
            raise ValueError(f"{where}: start_tls is for ldap:// URLs (ldaps:// is TLS already)")
        if self.bind_password and self.bind_password_file is not None:
            raise ValueError(f"{where}: give bind_password or bind_password_file, not both")
        if self.bind_dn and not self.bind_password and self.bind_password_file is None:
            # A DN without a password binds anonymously on many servers: never mean that.
            raise ValueError(f"{where}: bind_dn needs bind_password_file (or bind_password)")
        if not self.bind_template and not self.user_base:
            raise ValueError(f"{where}: set user_base (search, then bind) or bind_template (direct bind)")
        if self.bind_template:
            if "{username}" not in self.bind_template:
                raise ValueError(f"{where}: bind_template must contain {{username}}")
            if not self.bind_template_is_dn and not self.user_base:
                raise ValueError(f"{where}: a bind_template that is not a DN needs user_base to find the entry")
        if "{username}" not in self.effective_user_filter or not self.effective_user_filter.startswith("("):
            raise ValueError(f"{where}: user_filter must be a parenthesized filter containing {{username}}")
        if self.group_base and not ("{dn}" in self.group_filter or "{username}" in self.group_filter):
            raise ValueError(f"{where}: group_filter must contain {{dn}} or {{username}}")
        if self.group_base and not self.group_name_attribute:
            raise ValueError(f"{where}: group_name_attribute is required with group_base")
        if not 0 < self.timeout <= 300:
            raise ValueError(f"{where}: timeout must be in (0, 300] seconds")
        if self.cache_ttl < 0:
            raise ValueError(f"{where}: cache_ttl must not be negative")

    @property
    def urls(self) -> tuple[str, ...]:
        """The servers in the order they are tried."""
        return (self.url, *self.failover_urls)

    @property
    def uses_tls(self) -> bool:
        return self.start_tls or all(url.startswith("ldaps:") for url in self.urls)

    @property
    def bind_template_is_dn(self) -> bool:
        # A UPN (user@domain) or down-level name (DOMAIN\user) has no "attr=value" part.
        return "=" in self.bind_template

    @property
    def effective_user_filter(self) -> str:
        return self.user_filter or (_AD_USER_FILTER if self.active_directory else _USER_FILTER)

    @property
    def effective_username_attribute(self) -> str:
        return self.username_attribute or (_AD_USERNAME_ATTRIBUTE if self.active_directory else _USERNAME_ATTRIBUTE)


class _DirectoryUnavailable(Exception):
    """This server could not give an answer (try the next one)."""


@dataclass(frozen=True, slots=True)
class _UserEntry:
    dn: str
    attributes: dict[str, list[str]]


class _LoginCache:
    """Recent successful logins: username → (HMAC of the password, principal, expiry).

    One entry per username (the last password that worked). The HMAC key lives only in this
    process, so the cache holds nothing that could be checked against a guessed password
    elsewhere. Thread-safe: logins run in worker threads.
    """

    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[bytes, Principal, float]] = {}

    def _digest(self, username: str, password: str) -> bytes:
        message = username.encode("utf-8", "surrogatepass") + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def get(self, username: str, password: str) -> Principal | None:
        if self._ttl <= 0:
            return None
        digest = self._digest(username, password)
        with self._lock:
            entry = self._entries.get(username)
            if entry is None:
                return None
            if self._clock() >= entry[2]:
                del self._entries[username]
                return None
        return entry[1] if hmac.compare_digest(entry[0], digest) else None

    def put(self, username: str, password: str, principal: Principal) -> None:
        if self._ttl <= 0:
            return
        digest = self._digest(username, password)
        now = self._clock()
        with self._lock:
            self._entries.pop(username, None)
            if len(self._entries) >= _CACHE_MAX_ENTRIES:
                for key in [k for k, (_, _, expires) in self._entries.items() if expires <= now]:
                    del self._entries[key]
            while len(self._entries) >= _CACHE_MAX_ENTRIES:  # all live: drop the oldest
                del self._entries[next(iter(self._entries))]
            self._entries[username] = (digest, principal, now + self._ttl)


def _acceptable_username(username: str) -> bool:
    """Bounded, and free of control, format (invisible) and surrogate characters."""
    if not username or len(username) > MAX_USERNAME_LENGTH:
        return False
    return not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in username)


def _read_service_password(config: LdapConfig) -> str:
    if config.bind_password_file is None:
        return config.bind_password
    try:
        password = config.bind_password_file.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"ldap:{config.name}: cannot read bind_password_file {config.bind_password_file}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from exc
    if not password:
        raise ConfigError(f"ldap:{config.name}: bind_password_file {config.bind_password_file} is empty")
    return password


def _unescape_dn_value(value: str) -> str:
    """``a\\,b`` → ``a,b`` and ``caf\\c3\\a9`` → ``café`` (RFC 4514 escapes)."""
    out = bytearray()
    for match in re.finditer(r"\\([0-9A-Fa-f]{2})|\\(.)|([^\\]+)", value, re.DOTALL):
        hex_pair, escaped, plain = match.groups()
        if hex_pair is not None:
            out.append(int(hex_pair, 16))
        else:
            out += (escaped if escaped is not None else plain).encode("utf-8", "surrogatepass")
    return out.decode("utf-8", "replace")


def _group_name_from_dn(value: str) -> str:
    """The first RDN's value of a group DN (``cn=devs,ou=groups,...`` → ``devs``); a non-DN as is."""
    try:
        components = parse_dn(value)
    except ldap_errors.LDAPInvalidDnError:
        return value
    return _unescape_dn_value(components[0][1]) if components else value


def _same_dn(first: str, second: str) -> bool:
    """DN equality, ignoring case and escaping differences (enough for servers' own DNs)."""
    try:
        parsed = [parse_dn(dn) for dn in (first, second)]
    except ldap_errors.LDAPInvalidDnError:
        return False
    normalized = [[(attr.casefold(), _unescape_dn_value(value).strip().casefold()) for attr, value, _ in dn]
                  for dn in parsed]
    return normalized[0] == normalized[1]


def _values(attributes: dict[str, Any], name: str) -> list[str]:
    value = attributes.get(name)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    # ldap3 puts the whole peer certificate into a host name mismatch message: keep the point.
    mismatch = re.search(r"doesn't match any name in (\[.*?\])", text)
    if mismatch:
        text = f"{type(exc).__name__}: TLS certificate does not match the server name {mismatch.group(1)}"
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."


def _describe(connection: ldap3.Connection) -> str:
    result = connection.result or {}
    text = f"{result.get('description', 'no result')} ({result.get('result')})"
    if result.get("message"):
        text += f": {result['message']}"
    return text[:_MAX_REASON]


class LdapProvider:
    """An ``IdentityProvider`` backed by one LDAP directory or Active Directory domain.

    Args:
        config: the ``[[auth.ldap]]`` table.
        clock: monotonic seconds, for the login cache (tests pass a fake).

    Raises:
        ConfigError: the service password file or the CA file cannot be read.
    """

    def __init__(self, config: LdapConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.name = f"ldap:{config.name}"
        self._service_password = _read_service_password(config)
        self._cache = _LoginCache(config.cache_ttl, clock)
        self._search_time_limit = max(1, math.ceil(config.timeout))  # server-side, whole seconds
        try:
            self._tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=str(config.ca_file) if config.ca_file is not None else None,
            )
        except ldap_errors.LDAPException as exc:
            raise ConfigError(f"{self.name}: ca_file {config.ca_file}: {exc}") from exc
        if not config.uses_tls:
            log.warning("%s: %s without start_tls sends passwords in clear text", self.name,
                        ", ".join(url for url in config.urls if url.startswith("ldap:")))

    def authenticate(self, username: str, password: str) -> Principal | None:
        """The principal if the directory accepts this password for this user, else ``None``.

        Blocks (call it in a worker thread) for at most a few ``timeout``s per server.

        Raises:
            ProviderUnavailable: no server gave an answer (refused, timed out, TLS failed).
        """
        # An empty password would be an unauthenticated bind, which succeeds as anonymous.
        if not password or not _acceptable_username(username):
            return None
        cached = self._cache.get(username, password)
        if cached is not None:
            return cached
        principal = self._ask_directory(username, password)
        if principal is not None:
            self._cache.put(username, password, principal)
        return principal

    def _ask_directory(self, username: str, password: str) -> Principal | None:
        failures: list[str] = []
        for url in self.config.urls:
            try:
                if self.config.bind_template:
                    return self._direct_bind(url, username, password)
                return self._search_then_bind(url, username, password)
            except _LOCAL_REFUSALS as exc:
                log.warning("%s: ldap3 refused the bind name or password before sending: %s", self.name,
                            type(exc).__name__)
                return None
            except _DirectoryUnavailable as exc:
                reason = str(exc)
            except (ldap_errors.LDAPException, OSError) as exc:
                reason = _reason(exc)
            except Exception as exc:
                # ldap3's decoder raises KeyError, IndexError, ... on a garbled answer: whatever
                # breaks while talking to a server, that server gave no answer (fail closed). The
                # traceback is logged in case it is a bug of ours instead.
                reason = _reason(exc)
                log.warning("%s: unexpected error talking to %s", self.name, url, exc_info=True)
            log.warning("%s: %s did not answer: %s", self.name, url, reason)
            failures.append(f"{url}: {reason}")
        raise ProviderUnavailable(f"{self.name}: no server answered ({'; '.join(failures)})")

    @contextmanager
    def _connection(self, url: str, user: str | None, password: str | None) -> Iterator[ldap3.Connection]:
        """An open connection (TLS started if configured), not yet bound; closed on exit."""
        server = ldap3.Server(url, connect_timeout=self.config.timeout, tls=self._tls, get_info=ldap3.NONE)
        connection = ldap3.Connection(
            server,
            user=user,
            password=password,
            authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
            # ldap3 packs this into SO_RCVTIMEO as whole seconds; the exact value is set after open.
            receive_timeout=math.ceil(self.config.timeout),
            raise_exceptions=False,
            read_only=True,
            auto_referrals=False,
        )
        try:
            connection.open()
            if connection.socket is not None:
                connection.socket.settimeout(self.config.timeout)
            if self.config.start_tls and not connection.start_tls():
                raise _DirectoryUnavailable("StartTLS was not started")
            yield connection
        finally:
            with suppress(ldap_errors.LDAPException, OSError):
                connection.unbind()

    def _bind_user(self, connection: ldap3.Connection) -> bool:
        """Binds with the user's credentials: True if accepted, False if the directory said no."""
        if connection.bind():
            return True
        code = (connection.result or {}).get("result")
        if code in _BIND_REFUSALS:
            return False
        raise _DirectoryUnavailable(f"bind failed: {_describe(connection)}")

    def _search_then_bind(self, url: str, username: str, password: str) -> Principal | None:
        service_user = self.config.bind_dn or None
        with self._connection(url, service_user, self._service_password or None) as service:
            if not service.bind():
                log.error("%s: the service account %r cannot bind at %s: %s", self.name,
                          self.config.bind_dn or "(anonymous)", url, _describe(service))
                raise _DirectoryUnavailable(f"service account bind failed: {_describe(service)}")
            entry = self._find_user(service, self.config.user_base, ldap3.SUBTREE, username)
            if entry is None:
                return None
            with self._connection(url, entry.dn, password) as user_connection:
                if not self._bind_user(user_connection):
                    return None
            return self._principal(service, entry, username)

    def _direct_bind(self, url: str, username: str, password: str) -> Principal | None:
        config = self.config
        if config.bind_template_is_dn:
            bind_name = config.bind_template.replace("{username}", escape_rdn(username))
        else:
            bind_name = config.bind_template.replace("{username}", username)
        with self._connection(url, bind_name, password) as connection:
            if not self._bind_user(connection):
                return None
            if config.bind_template_is_dn:
                entry = self._find_user(connection, bind_name, ldap3.BASE, username)
            else:
                entry = self._find_user(connection, config.user_base, ldap3.SUBTREE, username)
            if entry is None:
                # The password was right, but this is not an entry the filter admits as a user
                # (or the user may not read it): no canonical name, so no login.
                log.warning("%s: %r bound but no matching user entry was found; refused", self.name, username)
                return None
            principal = self._principal(connection, entry, username)
            # A UPN names an account independently of sAMAccountName (alice@corp may be the
            # account "asmith" while another account is "alice"): the entry the filter found
            # must be the one that bound, or we would hand out someone else's name and groups.
            if not config.bind_template_is_dn and not self._is_bound_as(connection, entry, principal.name):
                return None
            return principal

    def _is_bound_as(self, connection: ldap3.Connection, entry: _UserEntry, canonical: str) -> bool:
        """Whether the connection's identity (RFC 4532 Who am I?) is ``entry``."""
        authzid = connection.extend.standard.who_am_i()
        if (connection.result or {}).get("result") != _SUCCESS:
            raise _DirectoryUnavailable(f"who-am-i failed: {_describe(connection)}")
        authzid = authzid or ""
        if authzid.startswith("dn:"):
            same = _same_dn(authzid[3:], entry.dn)
        elif authzid.startswith("u:"):  # AD: u:DOMAIN\sAMAccountName
            same = authzid[2:].rpartition("\\")[2].casefold() == canonical.casefold()
        else:
            same = False
        if not same:
            log.warning("%s: bound as %r, but the user filter found %r; refused", self.name, authzid, entry.dn)
        return same

    def _find_user(self, connection: ldap3.Connection, base: str, scope: str, username: str) -> _UserEntry | None:
        """The one entry ``user_filter`` finds for ``username`` under ``base``, or None."""
        config = self.config
        search_filter = config.effective_user_filter.replace("{username}", escape_filter_chars(username))
        attributes = [config.effective_username_attribute]
        if config.group_attribute:
            attributes.append(config.group_attribute)
        connection.search(base, search_filter, scope, attributes=attributes, size_limit=2,
                          time_limit=self._search_time_limit)
        code = (connection.result or {}).get("result")
        if code == _NO_SUCH_OBJECT:
            log.warning("%s: search base %r does not exist", self.name, base)
            return None
        if code not in (_SUCCESS, _SIZE_LIMIT_EXCEEDED):
            raise _DirectoryUnavailable(f"user search failed: {_describe(connection)}")
        entries = [r for r in connection.response or () if r.get("type") == "searchResEntry"]
        if len(entries) > 1 or code == _SIZE_LIMIT_EXCEEDED:
            log.warning("%s: more than one entry matches the user filter for %r; refused", self.name, username)
            return None
        if not entries or not entries[0].get("dn"):
            return None
        return _UserEntry(dn=entries[0]["dn"], attributes=dict(entries[0].get("attributes") or {}))

    def _principal(self, connection: ldap3.Connection, entry: _UserEntry, username: str) -> Principal:
        names = _values(entry.attributes, self.config.effective_username_attribute)
        # uid may hold several values: prefer the one that was typed (in the directory's case).
        canonical = next((n for n in names if n.casefold() == username.casefold()), names[0] if names else username)
        groups: set[str] = set()
        if self.config.group_attribute:
            groups.update(_group_name_from_dn(v) for v in _values(entry.attributes, self.config.group_attribute))
        if self.config.group_base:
            groups.update(self._search_groups(connection, entry.dn, canonical))
        groups.discard("")
        return Principal(kind="user", name=canonical, groups=frozenset(groups), provider=self.name)

    def _search_groups(self, connection: ldap3.Connection, dn: str, username: str) -> set[str]:
        config = self.config
        search_filter = (config.group_filter.replace("{dn}", escape_filter_chars(dn))
                         .replace("{username}", escape_filter_chars(username)))
        responses = connection.extend.standard.paged_search(
            config.group_base, search_filter, ldap3.SUBTREE, attributes=[config.group_name_attribute],
            time_limit=self._search_time_limit, paged_size=_GROUP_PAGE_SIZE, generator=False,
        )
        code = (connection.result or {}).get("result")
        if code == _NO_SUCH_OBJECT:
            log.warning("%s: group_base %r does not exist", self.name, config.group_base)
            return set()
        if code != _SUCCESS:
            raise _DirectoryUnavailable(f"group search failed: {_describe(connection)}")
        groups: set[str] = set()
        for response in responses or ():
            if response.get("type") == "searchResEntry":
                names = _values(response.get("attributes") or {}, config.group_name_attribute)
                if names:
                    groups.add(names[0])
        return groups
