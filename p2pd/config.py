"""The agent's configuration: one frozen dataclass tree, loaded once from TOML and flags.

No other module reads the environment or configuration files. Example ``p2pd.toml``::

    listen = "127.0.0.1:5080"
    data = "/var/lib/p2pd"
    default_upstream = "http://seed.example:5000"   # for registries without their own entry
    allow_registries = ["docker.io", "*.example.com"]  # without a default: https://<ns> for these only
    allow_networks = []                               # private ranges those hosts may resolve to

    [[upstream]]
    namespace = "docker.io"
    url = "https://registry-1.docker.io"
    username = "robot"
    password_file = "/etc/p2pd/dockerhub.password"
    anonymous_pull = false   # true: clients without credentials get what the robot may pull

    [[upstream]]
    namespace = "seed.local:5000"
    url = "http://10.0.0.5:5000"

    [cache]
    max_bytes = 21474836480
    tag_ttl = 60.0
    pinned = ["sha256:…"]

    [fetch]
    stall_timeout = 10.0

    [[signatures]]                 # optional: enforce signatures at the node (docs/security.md)
    repositories = ["prod/**"]
    keys = ["/etc/p2pd/keys/release.asc", "/etc/p2pd/keys/cosign.pub"]
    mode = "enforce"               # or "warn"
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from p2pd.httpd import ServerLimits, check_congestion_control
from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE
from p2pd.oci.digest import Digest

from .egress import RegistryPattern, parse_network
from .errors import ConfigError
from .signing.rules import SignaturePolicy
from .signing.rules import from_toml as signature_policy_from_toml
from .tomlconfig import build_section, parse_listen, read_toml

__all__ = [
    "DEFAULT_LISTEN",
    "AccessConfig",
    "AgentConfig",
    "CacheConfig",
    "FetchConfig",
    "SwarmConfig",
    "UpstreamConfig",
    "load_config",
    "parse_listen",
]

DEFAULT_LISTEN = "127.0.0.1:5080"


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream registry, selected by the ``ns=`` value containerd sends."""

    namespace: str
    url: str
    username: str | None = None
    password: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    tls_verify: bool = True
    # Local clients without credentials are served with the agent's own credentials (explicit
    # opt-in; by default each client's own right to pull is checked, docs/security.md).
    anonymous_pull: bool = False
    jwks_url: str | None = None  # the token issuer's keys; default <realm origin>/token/keys
    token_issuer: str | None = None  # ``iss`` client tokens must carry; default: not checked

    def secret(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        return self.password


@dataclass(frozen=True)
class CacheConfig:
    max_bytes: int = 20 * 1024**3
    tag_ttl: float = 60.0  # seconds a resolved tag is trusted before asking the upstream again
    tag_stale_max: float = 7 * 24 * 3600.0  # how long a tag is answered from cache while the upstream fails
    pinned: tuple[str, ...] = ()


@dataclass(frozen=True)
class FetchConfig:
    stall_timeout: float = 10.0  # a client stream with no new bytes for this long is closed
    first_byte_timeout: float = 5.0  # a miss with no bytes after this long is answered 404 (containerd falls back)
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 5  # upstream (re)tries per blob, each resuming with Range
    manifest_timeout: float = 10.0
    failure_hold: float = 30.0  # after a failed download, misses for that blob answer 404 this long


@dataclass(frozen=True)
class AccessConfig:
    """How the agent checks each client's right to pull (``[access]``; see docs/security.md)."""

    anonymous_ttl: float = 300.0  # an upstream's answer to "may anonymous clients pull R?" is reused this long
    check_ttl: float = 300.0  # longest reuse of "this credential may pull R" (never past the token's exp)
    opaque_ttl: float = 60.0  # reuse of an upstream check for a credential without a readable expiry
    denied_ttl: float = 5.0  # reuse of a refusal (bounds upstream checks by clients with bad credentials)
    jwks_ttl: float = 300.0  # an issuer's keys (or their absence) are reused this long
    jwks_min_interval: float = 30.0  # a token with an unknown key id refetches the keys at most this often
    max_entries: int = 10_000  # bound of each verdict cache (LRU)
    max_links: int = 200_000  # (repository, digest) pairs remembered as referenced by the repository


@dataclass(frozen=True)
class SwarmConfig:
    """Peer-to-peer settings; the swarm is off unless ``peer_listen`` is set."""

    peer_listen: str | None = None  # HOST:PORT of the peer endpoint (separate from containerd's)
    advertise: str | None = None  # HOST:PORT other nodes use to reach us (default: peer_listen)
    node_id: str | None = None  # default: generated once and kept in <data>/node_id
    site: str | None = None  # locality label; default: derived from the advertised address
    peers: tuple[str, ...] = ()  # static HOST:PORT peers
    peer_dns: tuple[str, ...] = ()  # NAME or NAME:PORT resolved periodically (e.g. a headless service)
    peer_dns_interval: float = 30.0
    mdns: bool = True  # announce and browse _p2pd._tcp.local. on mdns_interface
    mdns_interface: str | None = None  # IPv4 address to bind mDNS to (default: the advertised host)
    cluster_key_file: Path | None = None
    insecure_peers: bool = False  # run without a cluster key (explicit opt-in only)
    # Mutual TLS on the peer port (p2pd.swarm.tls): certificates from the operator's CA when these
    # are set ('p2pd ca init|issue'), else derived from the cluster key. Off only explicitly.
    peer_tls: bool = True
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE  # the largest; small blobs get smaller chunks (chunk_size_for)
    coordinator_backups: int = 2
    lease_ttl: float = 15.0
    peer_timeout: float = 5.0  # a chunk request with no progress for this long moves to another source (a relay: 3x)
    # chunk requests of a blob in flight; fewer of chunks over 128 KiB (docs/architecture.md, "Request slots")
    max_parallel_chunks: int = 16
    max_requests_per_peer: int = 2
    ban_seconds: float = 300.0  # a peer that sent bad bytes is ignored this long
    suspend_after_failures: int = 3
    suspend_seconds: float = 30.0
    upload_rate: int = 0  # bytes/s served to peers; 0 = unlimited
    # TCP congestion control of the connections the peer port accepts (what carries chunks and
    # relays); "" = the host's default. Why reno: docs/architecture.md, "Congestion control on
    # the peer port".
    peer_congestion_control: str = "reno"
    max_uploads: int = 4  # concurrent chunk uploads; more get 429 + Retry-After
    download_rate: int = 0  # bytes/s fetched from peers; 0 = unlimited
    upstream_rate: int = 0  # bytes/s fetched from upstreams; 0 = unlimited
    # A range holder's upstream response that stops for this long once its bytes flow is
    # reopened where it stopped (0: never); its peers and their readers wait for those chunks.
    # Longer than nearly every gap TCP recovers from by itself (on the testbed, 202 of 203 gaps
    # over 1 s in two pulls; the longest 5.3 s at N = 16, 6.6 s at N = 32: docs/benchmarks.md):
    # a reopen during one throws away the window in flight.
    upstream_stall: float = 6.0
    # bytes/s the whole site (all its nodes together) fetches from upstreams; 0 = unlimited.
    # Kept by one member of the site and shared by its fetchers (p2pd/swarm/budget.py).
    site_upstream_rate: int = 0

    @property
    def enabled(self) -> bool:
        return self.peer_listen is not None


@dataclass(frozen=True)
class AgentConfig:
    host: str = "127.0.0.1"
    port: int = 5080
    data: Path = Path("/var/lib/p2pd")
    upstreams: tuple[UpstreamConfig, ...] = ()
    default_upstream: str | None = None
    # ns values served from https://<ns> without an [[upstream]] entry (docs/security.md, "No open proxy").
    allow_registries: tuple[str, ...] = ()
    # Private, loopback or link-local ranges that hosts other than configured upstreams may resolve to.
    allow_networks: tuple[str, ...] = ()
    cache: CacheConfig = field(default_factory=CacheConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    limits: ServerLimits = field(default_factory=ServerLimits)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    # [[signatures]]: manifests pulled by tag under these repositories need a trusted signature.
    signatures: SignaturePolicy = field(default_factory=SignaturePolicy)
    signature_ttl: float = 60.0  # an allowed verdict is reused this long before signatures are read again

    @property
    def listen(self) -> str:
        return f"{self.host}:{self.port}"


def parse_upstream_flag(value: str) -> UpstreamConfig:
    """``NS=URL`` from the command line."""
    namespace, sep, url = value.partition("=")
    if not sep or not namespace or not url:
        raise ConfigError(f"--upstream takes NS=URL, got {value!r}")
    return _checked_upstream(UpstreamConfig(namespace=namespace.strip(), url=url.strip()))


def _checked_upstream(upstream: UpstreamConfig) -> UpstreamConfig:
    if not upstream.url.startswith(("http://", "https://")):
        raise ConfigError(f"upstream URL must start with http:// or https://: {upstream.url!r}")
    if upstream.password is not None and upstream.password_file is not None:
        raise ConfigError(f"upstream {upstream.namespace}: give password or password_file, not both")
    if upstream.jwks_url is not None and not upstream.jwks_url.startswith(("http://", "https://")):
        raise ConfigError(f"upstream {upstream.namespace}: jwks_url must be an http(s) URL")
    return replace(upstream, url=upstream.url.rstrip("/"))


def load_config(
    path: Path | None = None,
    *,
    listen: str | None = None,
    data: Path | None = None,
    upstreams: list[str] | None = None,
    default_upstream: str | None = None,
    allow_registries: list[str] | None = None,
    allow_networks: list[str] | None = None,
    cache_max_bytes: int | None = None,
    swarm: dict[str, Any] | None = None,
) -> AgentConfig:
    """Reads the TOML file (if any), then applies command-line overrides.

    Raises:
        ConfigError: unreadable file, unknown keys, wrong types or invalid values.
    """
    document = read_toml(path)
    top_level = {"listen", "data", "default_upstream", "allow_registries", "allow_networks", "upstream", "cache",
                 "fetch", "server", "swarm", "access", "signatures", "signature_ttl"}
    unknown = set(document) - top_level
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")

    host, port = parse_listen(listen or document.get("listen") or DEFAULT_LISTEN)
    data_dir = Path(data or document.get("data") or AgentConfig.data)
    table_upstreams = document.get("upstream", [])
    if not isinstance(table_upstreams, list):
        raise ConfigError("[[upstream]] must be an array of tables")
    configured = [_checked_upstream(build_section(UpstreamConfig, t, "upstream")) for t in table_upstreams]
    flagged = [parse_upstream_flag(value) for value in upstreams or []]
    by_namespace = {u.namespace: u for u in configured}
    for upstream in flagged:  # a flag overrides the URL but keeps the file's credentials
        base = by_namespace.get(upstream.namespace)
        by_namespace[upstream.namespace] = replace(base, url=upstream.url) if base else upstream
    default = default_upstream or document.get("default_upstream")
    if default is not None and not str(default).startswith(("http://", "https://")):
        raise ConfigError(f"default upstream must be an http(s) URL: {default!r}")
    # The file's lists and the flags add up, like [[upstream]] and --upstream.
    registries = _string_list(document, "allow_registries") + list(allow_registries or [])
    networks = _string_list(document, "allow_networks") + list(allow_networks or [])
    for pattern in registries:
        RegistryPattern.parse(pattern)
    for network in networks:
        parse_network(network)

    cache = build_section(CacheConfig, dict(document.get("cache", {})), "cache")
    if cache_max_bytes is not None:
        cache = replace(cache, max_bytes=cache_max_bytes)
    bad_pins = [d for d in cache.pinned if not Digest.is_valid(d)]
    if bad_pins:
        raise ConfigError(f"cache.pinned: invalid digest {bad_pins[0]!r}")
    if cache.max_bytes <= 0 or cache.tag_ttl < 0:
        raise ConfigError("cache.max_bytes must be positive and cache.tag_ttl non-negative")
    fetch = build_section(FetchConfig, dict(document.get("fetch", {})), "fetch")
    if fetch.max_attempts < 1:
        raise ConfigError("fetch.max_attempts must be at least 1")
    limits = build_section(ServerLimits, dict(document.get("server", {})), "server")
    access = build_section(AccessConfig, dict(document.get("access", {})), "access")
    if min(access.anonymous_ttl, access.check_ttl, access.opaque_ttl, access.denied_ttl, access.jwks_ttl,
           access.jwks_min_interval) < 0 or access.max_entries < 1 or access.max_links < 1:
        raise ConfigError("[access]: durations must not be negative and sizes must be positive")
    swarm_table = dict(document.get("swarm", {}))
    swarm_table.update({k: v for k, v in (swarm or {}).items() if v not in (None, (), [])})
    swarm_config = _checked_swarm(build_section(SwarmConfig, swarm_table, "swarm"))
    signatures = signature_policy_from_toml(document, path.parent if path is not None else None)
    signature_ttl = document.get("signature_ttl", AgentConfig.signature_ttl)
    if not isinstance(signature_ttl, int | float) or isinstance(signature_ttl, bool) or signature_ttl < 0:
        raise ConfigError("signature_ttl must be a non-negative number of seconds")
    return AgentConfig(host=host, port=port, data=data_dir, upstreams=tuple(by_namespace.values()),
                       default_upstream=str(default).rstrip("/") if default else None,
                       allow_registries=tuple(dict.fromkeys(registries)), allow_networks=tuple(dict.fromkeys(networks)),
                       cache=cache, fetch=fetch, limits=limits, swarm=swarm_config, access=access,
                       signatures=signatures, signature_ttl=float(signature_ttl))


def _string_list(document: dict[str, Any], key: str) -> list[str]:
    value = document.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of strings")
    return list(value)


def _checked_swarm(swarm: SwarmConfig) -> SwarmConfig:
    for address in (swarm.peer_listen, swarm.advertise, *swarm.peers):
        if address is not None:
            parse_listen(address)
    if swarm.enabled and swarm.cluster_key_file is None and not swarm.insecure_peers:
        raise ConfigError("the swarm needs a cluster key: --cluster-key-file FILE (make one with 'p2pd keygen'), "
                          "or --insecure-peers to run without authentication")
    tls_files = (swarm.tls_ca_file, swarm.tls_cert_file, swarm.tls_key_file)
    if any(f is not None for f in tls_files) and not all(f is not None for f in tls_files):
        raise ConfigError("swarm: give tls_ca_file, tls_cert_file and tls_key_file together (or none: the "
                          "peer certificates are then derived from the cluster key)")
    if any(f is not None for f in tls_files) and not swarm.peer_tls:
        raise ConfigError("swarm: peer_tls = false contradicts the tls_*_file settings")
    if swarm.node_id is not None and not _NODE_ID_RE.fullmatch(swarm.node_id):
        raise ConfigError("swarm.node_id: 1-63 letters, digits and '-' (no dots)")
    if swarm.site is not None and not _NODE_ID_RE.fullmatch(swarm.site):
        raise ConfigError("swarm.site: 1-63 letters, digits and '-'")
    for name in ("upload_rate", "download_rate", "upstream_rate", "site_upstream_rate"):
        if getattr(swarm, name) < 0:
            raise ConfigError(f"swarm.{name} must be 0 (unlimited) or a positive number of bytes per second")
    try:
        check_congestion_control(swarm.peer_congestion_control)
    except ValueError as exc:
        raise ConfigError(f"swarm.peer_congestion_control: {exc}") from None
    if not 0 <= swarm.upstream_stall < float("inf"):
        raise ConfigError("swarm.upstream_stall must be 0 (never) or a positive number of seconds")
    if swarm.chunk_size & (swarm.chunk_size - 1) or not 64 * 1024 <= swarm.chunk_size <= 64 * 1024 * 1024:
        raise ConfigError("swarm.chunk_size must be a power of two between 64 KiB and 64 MiB")
    return swarm


_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")
