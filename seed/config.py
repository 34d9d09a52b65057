"""The seed's configuration: one frozen dataclass tree, loaded once from TOML and flags.

Example ``seed.toml``::

    [server]
    listen = "0.0.0.0:5000"
    idle_timeout = 75.0
    use_sendfile = true    # false: send blobs with pread + send instead of os.sendfile

    [storage]
    data = "/var/lib/seed"
    chunk_size = 1048576
    upload_max_age = 86400
    max_blob_size = 107374182400

    [registry]
    delete_enabled = true
    max_page_size = 1000

    [auth]                       # absent: no access control (allowed only on a loopback address)
    htpasswd = "/etc/seed/htpasswd"
    service = "seed.example"     # the token audience clients ask for
    realm = "https://seed.example/token"   # default: built from the request's Host
    providers = ["robots", "htpasswd", "ldap:corp"]   # order tried (this is the default order)

    [auth.token]
    issuer = "seed"
    expiry = 300                 # access token lifetime, seconds
    refresh_expiry = 604800
    extra_public_keys = []       # more PEM public keys whose tokens verify

    [auth.throttle]
    max_failures_per_user = 10

    [[auth.ldap]]
    name = "corp"
    url = "ldaps://ldap.example:636"
    # ... see seed/auth/ldap.py LdapConfig and docs/configuration.md

    [[auth.issuer]]              # tokens from another issuer, accepted too
    name = "sso"
    issuer = "https://sso.example"
    audience = "seed.example"
    jwks_file = "/etc/seed/sso-jwks.json"

    [[access]]
    repositories = ["team-a/**"]
    groups = ["team-a"]
    role = "push"                # pull | push | delete | admin

    [[access]]
    repositories = ["public/**"]
    anonymous = true
    role = "pull"

    [audit]
    rotate_bytes = 67108864

    [scan]                       # the background scanner (all settings: seed/scan/config.py)
    cpu_share = 0.5

    [[scanning]]                 # pull policy from scan results
    repositories = ["prod/**"]
    block_severity = "critical"

    [[signatures]]               # pull policy from signatures (p2pd/signing/rules.py)
    repositories = ["prod/**"]
    keys = ["/etc/seed/keys/release.asc"]
    mode = "enforce"

    [[webhooks]]                 # events to automation (all settings: seed/events/_config.py)
    url = "https://deploy.example/hooks/seed"
    events = ["push", "tag.moved"]
    secret_file = "/etc/seed/deploy.secret"
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from p2pd.errors import ConfigError
from p2pd.httpd import ServerLimits, check_congestion_control
from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE, validate_chunk_size
from p2pd.oci.errors import OCIError
from p2pd.signing.rules import SignaturePolicy
from p2pd.signing.rules import from_toml as signature_policy_from_toml
from p2pd.tomlconfig import build_section, parse_listen, read_toml

from .access import AccessRule
from .auth.ldap import LdapConfig
from .auth.throttle import ThrottleConfig
from .events import WebhookConfig, webhooks_from_toml
from .scan.config import ScanSettings
from .scan.config import from_toml as scan_settings_from_toml

__all__ = ["AuditConfig", "AuthConfig", "ConfigError", "IssuerConfig", "RegistryConfig", "SeedConfig",
           "ServerConfig", "StorageConfig", "TlsConfig", "TokenConfig", "load_config", "parse_listen"]


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    limits: ServerLimits = field(default_factory=ServerLimits)
    # bytes/s the blob downloads in progress share, each paced by the kernel at its part (0: none).
    upload_rate: int = 0
    # TCP congestion control of the connections it accepts ("": the host's default). For a seed in
    # front of swarm sites: docs/architecture.md, "Congestion control on the peer port".
    congestion_control: str = ""


@dataclass(frozen=True)
class StorageConfig:
    data: Path = Path("/var/lib/seed")
    chunk_size: int = DEFAULT_CHUNK_SIZE
    upload_max_age: float = 24 * 3600.0  # seconds an idle upload session is kept
    purge_interval: float = 3600.0  # seconds between purges of stale uploads
    max_blob_size: int = 100 * 1024**3
    gc_grace: float = 3600.0  # seconds an unreferenced blob is kept by GC


@dataclass(frozen=True)
class RegistryConfig:
    delete_enabled: bool = True
    max_page_size: int = 1000  # cap on tags/catalog ?n= (CVE-2023-2253)


@dataclass(frozen=True)
class TokenConfig:
    issuer: str = "seed"
    expiry: float = 300.0  # seconds an access token is valid
    refresh_expiry: float = 7 * 86400.0  # seconds a refresh token is valid
    extra_public_keys: tuple[str, ...] = ()  # PEM public keys whose tokens also verify


@dataclass(frozen=True)
class IssuerConfig:
    """A trusted external token issuer (``[[auth.issuer]]``)."""

    name: str = ""
    issuer: str = ""
    audience: str = ""
    jwks_file: Path | None = None
    public_key_file: Path | None = None
    groups_claim: str = "groups"


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: who may log in, and how.

    ``mode`` is ``enforce`` (deny by default, the ``[[access]]`` rules grant) or ``open``
    (no access control). Without an ``[auth]`` table the seed is open, which is refused on a
    non-loopback address unless ``mode = "open"`` is said explicitly (or ``--open``).
    """

    mode: str = "enforce"
    htpasswd: Path | None = None
    service: str = "seed"
    realm: str | None = None
    providers: tuple[str, ...] = ()
    token: TokenConfig = field(default_factory=TokenConfig)
    throttle: ThrottleConfig = field(default_factory=ThrottleConfig)
    ldap: tuple[LdapConfig, ...] = ()
    issuers: tuple[IssuerConfig, ...] = ()
    configured: bool = False  # an [auth] table was given

    @property
    def enforced(self) -> bool:
        return self.mode == "enforce" and self.configured


@dataclass(frozen=True)
class TlsConfig:
    """``[tls]``: serve HTTPS with this certificate (reloaded on SIGHUP)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None  # clients must present a certificate from this CA


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool = True
    rotate_bytes: int = 64 * 1024 * 1024  # the live file is rotated past this size


@dataclass(frozen=True)
class SeedConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    access: tuple[AccessRule, ...] = ()
    audit: AuditConfig = field(default_factory=AuditConfig)
    tls: TlsConfig | None = None
    scanning: ScanSettings = field(default_factory=ScanSettings)  # [scan] and [[scanning]] (seed.scan)
    signatures: SignaturePolicy = field(default_factory=SignaturePolicy)  # [[signatures]] (seed.signatures)
    webhooks: tuple[WebhookConfig, ...] = ()  # [[webhooks]] (seed.events)
    source: Path | None = None  # the TOML file it was read from (reloaded on SIGHUP)


def load_config(path: Path | None = None, **overrides: Any) -> SeedConfig:
    """Reads the TOML file (if any), then applies command-line overrides.

    Overrides: ``listen`` ("HOST:PORT"), ``data`` (path), ``open`` (true: run without access
    control even on a non-loopback address), ``serving`` (true for ``seed serve``: an open
    seed on a non-loopback address is refused unless ``open``).
    """
    document = read_toml(path)
    unknown = set(document) - {"server", "storage", "registry", "auth", "access", "audit", "tls", "scan", "scanning",
                               "signatures", "webhooks"}
    if unknown:
        raise ConfigError(f"unknown sections: {', '.join(sorted(unknown))}")
    server_table = dict(document.get("server", {}))
    listen = overrides.get("listen") or server_table.pop("listen", None)
    upload_rate = server_table.pop("upload_rate", 0)
    if overrides.get("upload_rate") is not None:
        upload_rate = overrides["upload_rate"]
    if isinstance(upload_rate, bool) or not isinstance(upload_rate, int) or upload_rate < 0:
        raise ConfigError("server.upload_rate must be a whole number of bytes per second, 0 or more")
    congestion_control = server_table.pop("congestion_control", "")
    if overrides.get("congestion_control") is not None:
        congestion_control = overrides["congestion_control"]
    if not isinstance(congestion_control, str):
        raise ConfigError("server.congestion_control must be a string (\"\" for the host's default)")
    try:
        check_congestion_control(congestion_control)
    except ValueError as exc:
        raise ConfigError(f"server.congestion_control: {exc}") from None
    limits = build_section(ServerLimits, {k: v for k, v in server_table.items() if k in _LIMIT_KEYS}, "server")
    rest = {k: v for k, v in server_table.items() if k not in _LIMIT_KEYS}
    if rest:
        raise ConfigError(f"unknown setting server.{sorted(rest)[0]}")
    server = ServerConfig(limits=limits, upload_rate=upload_rate, congestion_control=congestion_control)
    if listen:
        host, port = parse_listen(listen)
        server = replace(server, host=host, port=port)
    storage = build_section(StorageConfig, document.get("storage", {}), "storage")
    if overrides.get("data"):
        storage = replace(storage, data=Path(overrides["data"]))
    try:
        validate_chunk_size(storage.chunk_size)
    except OCIError as exc:
        raise ConfigError(f"storage.chunk_size: {exc.message}") from exc
    registry = build_section(RegistryConfig, document.get("registry", {}), "registry")
    if registry.max_page_size < 1:
        raise ConfigError("registry.max_page_size must be positive")
    auth = _auth_section(document.get("auth"), open_flag=bool(overrides.get("open")))
    access = _access_rules(document.get("access", []))
    if access and not auth.configured:
        raise ConfigError("[[access]] rules need an [auth] table (at least `[auth]` with a provider)")
    audit = build_section(AuditConfig, document.get("audit", {}), "audit")
    tls = _tls_section(document.get("tls"))
    scanning = scan_settings_from_toml(document)
    signatures = signature_policy_from_toml(document, Path(path).parent if path is not None else None)
    webhooks = webhooks_from_toml(document.get("webhooks", []), Path(path).parent if path is not None else None)
    if overrides.get("serving") and not auth.configured and not _is_loopback(server.host) \
            and not overrides.get("open"):
        raise ConfigError(f"refusing to serve {server.host} without access control: configure [auth] "
                          "(see docs/configuration.md), or say `[auth] mode = \"open\"` / --open")
    return SeedConfig(server=server, storage=storage, registry=registry, auth=auth, access=access, audit=audit,
                      tls=tls, scanning=scanning, signatures=signatures, webhooks=webhooks,
                      source=Path(path) if path is not None else None)


def _tls_section(table: Any) -> TlsConfig | None:
    if table is None:
        return None
    tls = build_section(TlsConfig, table, "tls")
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError("[tls] needs cert_file and key_file")
    for name in ("cert_file", "key_file", "client_ca_file"):
        value = getattr(tls, name)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"tls.{name}: {value} is not a readable file")
    return tls


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _auth_section(table: Any, *, open_flag: bool) -> AuthConfig:
    if table is None:
        return AuthConfig(mode="open" if open_flag else "enforce", configured=False)
    if not isinstance(table, dict):
        raise ConfigError("[auth] must be a table")
    table = dict(table)
    if "configured" in table:
        raise ConfigError("unknown setting auth.configured")
    token = build_section(TokenConfig, table.pop("token", {}), "auth.token")
    throttle = build_section(ThrottleConfig, table.pop("throttle", {}), "auth.throttle")
    ldap_tables = table.pop("ldap", [])
    issuer_tables = table.pop("issuer", [])
    if not isinstance(ldap_tables, list) or not isinstance(issuer_tables, list):
        raise ConfigError("auth.ldap and auth.issuer are arrays of tables: [[auth.ldap]], [[auth.issuer]]")
    ldap = tuple(build_section(LdapConfig, t, "auth.ldap") for t in ldap_tables)
    issuers = tuple(build_section(IssuerConfig, t, "auth.issuer") for t in issuer_tables)
    for issuer in issuers:
        if not issuer.name or not issuer.issuer or not issuer.audience:
            raise ConfigError("[[auth.issuer]] needs name, issuer and audience")
        if (issuer.jwks_file is None) == (issuer.public_key_file is None):
            raise ConfigError(f"[[auth.issuer]] {issuer.name}: give exactly one of jwks_file, public_key_file")
    names = [f"ldap:{entry.name}" for entry in ldap]
    if len(set(names)) != len(names):
        raise ConfigError("[[auth.ldap]] names must be unique")
    auth = build_section(AuthConfig, table, "auth")
    if open_flag:
        auth = replace(auth, mode="open")
    if auth.mode not in ("enforce", "open"):
        raise ConfigError('auth.mode must be "enforce" or "open"')
    known = {"robots", "htpasswd", *names}
    for provider in auth.providers:
        if provider not in known:
            raise ConfigError(f"auth.providers: unknown provider {provider!r} (known: {', '.join(sorted(known))})")
    if token.expiry <= 0 or token.expiry > 86400 or token.refresh_expiry <= 0:
        raise ConfigError("auth.token.expiry must be between 0 and 86400 seconds")
    return replace(auth, token=token, throttle=throttle, ldap=ldap, issuers=issuers, configured=True)


def _access_rules(tables: Any) -> tuple[AccessRule, ...]:
    if not isinstance(tables, list):
        raise ConfigError("access rules are an array of tables: [[access]]")
    rules = []
    for table in tables:
        if not isinstance(table, dict):
            raise ConfigError("[[access]] must be a table")
        table = dict(table)
        repositories = table.get("repositories")
        if isinstance(repositories, str):
            table["repositories"] = [repositories]
        for key in ("repositories", "users", "groups", "robots"):
            value = table.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"access.{key} must be a list of strings")
            table[key] = tuple(value)
        unknown = set(table) - {"repositories", "role", "users", "groups", "robots", "anonymous", "authenticated"}
        if unknown:
            raise ConfigError(f"unknown setting access.{sorted(unknown)[0]}")
        if not isinstance(table.get("role"), str):
            raise ConfigError("[[access]] needs role = \"pull\" | \"push\" | \"delete\" | \"admin\"")
        for key in ("anonymous", "authenticated"):
            if not isinstance(table.get(key, False), bool):
                raise ConfigError(f"access.{key} must be true or false")
        rules.append(AccessRule(**table))
    return tuple(rules)


_LIMIT_KEYS = {f.name for f in fields(ServerLimits)}
