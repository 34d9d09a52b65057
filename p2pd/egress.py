"""Egress policy: which hosts and addresses the agent may contact on a client's behalf.

containerd names a registry in ``ns=``, and upstreams name redirect targets and token
realms. An agent that connected wherever those values pointed would be an open proxy into
the node's network: loopback services, the cloud metadata endpoint, private ranges. This
module decides, without I/O, what may be contacted; ``p2pd.upstream`` applies the decisions
to every request (``EgressGuard``) and every connection (it connects only to addresses
that passed ``EgressPolicy.check_addresses``). docs/security.md ("No open proxy") explains
the model.

Rules/invariants:
- Trusted origins are the (host, port) pairs of configured upstream URLs (``[[upstream]]
  url`` and ``default_upstream``). They are contacted whatever their address, loopback
  included, because an operator named them; nothing else is trusted.
- An ``ns`` without its own ``[[upstream]]`` entry (and without a default upstream) is
  served only when an ``allow_registries`` pattern admits it. Patterns name DNS hosts: an
  ``ns`` written as an address (``10.0.0.7:6000``, ``[::1]``) is never admitted.
- Every untrusted host (an admitted ``ns``, a redirect target, a token realm) must be
  reached over https, must be a DNS name of at least two labels or an address literal, must
  not be ``localhost`` or a metadata name, and every address it resolves to must be
  globally routable or inside ``allow_networks``. Metadata, unspecified and multicast
  addresses are refused even inside ``allow_networks``.
- One refused address refuses the host. The caller connects only to the addresses this
  module checked and never resolves the name again for that connection (no DNS-rebinding
  window between the check and the connect).
- Input that does not parse cleanly is refused, never repaired. The only normalisations are
  ASCII lower-casing, dropping one trailing dot of a name, and the default https port.
  getaddrinfo's numeric forms (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``)
  are refused by name: a real top-level domain starts with a letter.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from .errors import ConfigError, UpstreamNotFound, UpstreamUnavailable

__all__ = [
    "METADATA_ADDRESSES",
    "METADATA_NAMES",
    "EgressPolicy",
    "EgressRefused",
    "Host",
    "IPAddress",
    "IPNetwork",
    "RefusalReason",
    "RegistryPattern",
    "ResolutionError",
    "Resolver",
    "StaticResolver",
    "classify_address",
    "parse_host",
    "parse_namespace",
    "parse_network",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

HTTPS_PORT = 443

# Cloud instance metadata and platform endpoints: never a registry, always refused outside
# trusted origins (even when an allow_networks range covers them).
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "168.63.129.16",  # Azure wire server (a public address)
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
    )
)
METADATA_NAMES = frozenset({"metadata.google.internal", "metadata.goog", "instance-data.ec2.internal"})

_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_MAX_NAME_LENGTH = 253
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: local-use translation prefixes


class RefusalReason(enum.StrEnum):
    """Why a host or address was refused (the ``reason`` label of ``p2pd_egress_refused_total``)."""

    NOT_CONFIGURED = "not-configured"  # an ns with no upstream entry that no allow_registries pattern admits
    MALFORMED = "malformed"  # does not parse as a host, port or address
    IP_LITERAL = "ip-literal"  # an ns written as an address: only [[upstream]] can name one
    NUMERIC_HOST = "numeric-host"  # a name getaddrinfo would read as an address (2130706433, 127.1)
    SINGLE_LABEL = "single-label"  # resolved through the search domains: its meaning depends on the node
    SPECIAL_NAME = "special-name"  # localhost, *.localhost, metadata service names
    PLAIN_HTTP = "plain-http"  # http:// to a host that is not a trusted origin
    METADATA = "metadata"
    LOOPBACK = "loopback"
    LINK_LOCAL = "link-local"
    PRIVATE = "private"  # private, shared, reserved and documentation ranges: anything not global
    MULTICAST = "multicast"
    UNSPECIFIED = "unspecified"


# Reasons an allow_networks range can override; the others stay refused.
_OVERRIDABLE = frozenset({RefusalReason.LOOPBACK, RefusalReason.LINK_LOCAL, RefusalReason.PRIVATE})


class EgressRefused(UpstreamNotFound):
    """The egress policy refused a host or address; nothing was sent to it.

    A subclass of ``UpstreamNotFound`` on purpose: the download is not retried and the
    client gets a 404, so containerd falls back to the next host at once.

    Attributes:
        host: the refused host or address (normalised when it parsed).
        reason: why.
    """

    def __init__(self, host: str, reason: RefusalReason, detail: str = "") -> None:
        super().__init__(f"refused to contact {host[:260]!r}: {reason}" + (f" ({detail})" if detail else ""))
        self.host = host[:260]
        self.reason = reason


class ResolutionError(UpstreamUnavailable):
    """A host name did not resolve (or the resolver failed)."""


# ---- parsing ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Host:
    """A normalised host: a DNS name (ASCII lower case, no trailing dot) or an address.

    Attributes:
        name: the name, or the address in its canonical text form (IPv6 without brackets).
        address: the address when the host is an address literal, else None.
    """

    name: str
    address: IPAddress | None = None

    @property
    def labels(self) -> list[str]:
        return self.name.split(".")

    def netloc(self, port: int | None) -> str:
        """``name[:port]``, with IPv6 addresses in brackets."""
        host = f"[{self.name}]" if isinstance(self.address, ipaddress.IPv6Address) else self.name
        return host if port is None else f"{host}:{port}"


def parse_host(text: str) -> Host:
    """Parses and normalises a host: a DNS name, an IPv4 address, or an IPv6 address
    (bracketed or not).

    Raises:
        EgressRefused: MALFORMED for anything else (non-ASCII, empty or over-long labels,
            scope ids, percent signs, userinfo); NUMERIC_HOST for names whose last label does
            not start with a letter, which getaddrinfo may read as an address.
    """
    shown = text[:260]
    if not text or not text.isascii() or "%" in text:
        raise EgressRefused(shown, RefusalReason.MALFORMED)
    if text.startswith("["):
        if not text.endswith("]"):
            raise EgressRefused(shown, RefusalReason.MALFORMED)
        try:
            address6 = ipaddress.IPv6Address(text[1:-1])
        except ValueError:
            raise EgressRefused(shown, RefusalReason.MALFORMED) from None
        return Host(str(address6), address6)
    host = text.lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return Host(str(address), address)
    if host.endswith("."):
        host = host[:-1]
    labels = host.split(".")
    if len(host) > _MAX_NAME_LENGTH or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise EgressRefused(shown, RefusalReason.MALFORMED)
    if not labels[-1][0].isalpha():
        raise EgressRefused(host, RefusalReason.NUMERIC_HOST)
    return Host(host)


def _parse_port(text: str, shown: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 0 < int(text) <= 65535:
        raise EgressRefused(shown, RefusalReason.MALFORMED)
    return int(text)


def parse_namespace(ns: str) -> tuple[Host, int | None]:
    """Splits containerd's ``ns=`` value (``host``, ``host:port``, ``[v6]``, ``[v6]:port``).

    Returns:
        The normalised host and the port (None when the value has none).

    Raises:
        EgressRefused: MALFORMED or NUMERIC_HOST (see ``parse_host``).
    """
    shown = ns[:260]
    if ns.startswith("["):
        end = ns.find("]")
        rest = ns[end + 1 :] if end >= 0 else ""
        if end < 0 or (rest and not rest.startswith(":")):
            raise EgressRefused(shown, RefusalReason.MALFORMED)
        return parse_host(ns[: end + 1]), _parse_port(rest[1:], shown) if rest else None
    host, sep, port = ns.rpartition(":")
    if not sep:
        return parse_host(ns), None
    if ":" in host:  # an IPv6 address without brackets: ambiguous with a port
        raise EgressRefused(shown, RefusalReason.MALFORMED)
    return parse_host(host), _parse_port(port, shown)


def _refused_name(host: Host) -> RefusalReason | None:
    """Why a DNS name may not be contacted unless it is a trusted origin, or None."""
    name = host.name
    if name == "localhost" or name.endswith(".localhost") or name in METADATA_NAMES:
        return RefusalReason.SPECIAL_NAME
    if len(host.labels) < 2:
        return RefusalReason.SINGLE_LABEL
    return None


# ---- addresses ----------------------------------------------------------------------------


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4 or NAT64), which is where a
    connection to it may really end up."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _classify_one(address: IPAddress) -> RefusalReason | None:
    if address in METADATA_ADDRESSES:
        return RefusalReason.METADATA
    if address.is_unspecified:
        return RefusalReason.UNSPECIFIED
    if address.is_loopback:
        return RefusalReason.LOOPBACK
    if address.is_link_local:
        return RefusalReason.LINK_LOCAL
    if address.is_multicast:
        return RefusalReason.MULTICAST
    if isinstance(address, ipaddress.IPv6Address) and (address.is_site_local or address in _NAT64_LOCAL):
        return RefusalReason.PRIVATE  # Python calls deprecated site-local fec0::/10 "global"
    if address.is_private or address.is_reserved or not address.is_global:
        return RefusalReason.PRIVATE
    return None


def classify_address(address: IPAddress) -> RefusalReason | None:
    """Why an address is not a public unicast address, or None when it is one.

    IPv6 addresses that carry an IPv4 address (``::ffff:127.0.0.1``, 6to4 ``2002::/16``,
    NAT64 ``64:ff9b::/96``) are judged by that IPv4 address: it is where they lead.
    """
    embedded = _embedded_ipv4(address)
    return _classify_one(address if embedded is None else embedded)


def parse_network(text: str) -> IPNetwork:
    """An ``allow_networks`` entry: ``10.20.0.0/16``, ``fd12:3456::/48`` or one address.

    Raises:
        ConfigError: not a network, or host bits set (``10.0.0.5/8``).
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ConfigError(f"allow_networks: {text!r} is not a network ({exc})") from None


# ---- registry patterns --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegistryPattern:
    """An ``allow_registries`` entry: which ``ns`` values may be fetched from ``https://<ns>``.

    ``docker.io`` admits that name; ``*.example.com`` admits every name below
    ``example.com`` (not ``example.com`` itself); ``*`` admits every DNS name. Without a port
    the pattern admits the name without a port or with ``:443``; ``name:5000`` admits that
    port only. Every admitted host is still subject to the address checks.

    Attributes:
        name: ``*``, ``*.<suffix>`` or an exact name (normalised).
        port: the admitted port (443 when the pattern has none).
    """

    name: str
    port: int = HTTPS_PORT

    @classmethod
    def parse(cls, text: str) -> RegistryPattern:
        """Parses one pattern.

        Raises:
            ConfigError: not ``*``, ``*.name`` or ``name`` (an optional ``:port`` after
                each), or it names an address, ``localhost``, a metadata name or a
                single-label name.
        """
        value = text.strip().lower()
        host_text, sep, port_text = value.rpartition(":")
        if not sep:
            host_text = value
        try:
            port = _parse_port(port_text, value) if sep else HTTPS_PORT
            if host_text == "*":
                return cls("*", port)
            wildcard = host_text.startswith("*.")
            host = parse_host(host_text[2:] if wildcard else host_text)
        except EgressRefused as exc:
            raise ConfigError(f"allow_registries: {text!r} is not a host pattern ({exc.reason})") from None
        if host.address is not None:
            raise ConfigError(f"allow_registries: {text!r} is an address; name it in an [[upstream]] entry instead")
        reason = _refused_name(host)
        if reason is RefusalReason.SPECIAL_NAME or (reason is not None and not wildcard):
            raise ConfigError(f"allow_registries: {text!r} cannot be allowed ({reason}); "
                              "name it in an [[upstream]] entry instead")
        return cls(f"*.{host.name}" if wildcard else host.name, port)

    def matches(self, host: Host, port: int | None) -> bool:
        """Whether this pattern admits ``host`` (a DNS name) on ``port``."""
        if host.address is not None or (HTTPS_PORT if port is None else port) != self.port:
            return False
        if self.name == "*":
            return True
        if self.name.startswith("*."):
            return host.name.endswith(self.name[1:])
        return host.name == self.name


# ---- the policy ---------------------------------------------------------------------------


def _origin(host: str, port: int) -> tuple[str, int]:
    """A trusted-origin key: canonical address text, or the name lower-cased without its dot."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare)), port
    except ValueError:
        return bare.lower().removesuffix("."), port


def _url_origin(url: str) -> tuple[str, int]:
    """(host, port) of a configured ``http(s)://host[:port]`` URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"upstream URL {url!r} is invalid ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"upstream URL must be http(s)://host[:port]: {url!r}")
    return _origin(parts.hostname, port if port is not None else {"http": 80, "https": HTTPS_PORT}[parts.scheme])


@dataclass(frozen=True)
class EgressPolicy:
    """What the agent may contact; see the module docstring for the rules.

    Attributes:
        trusted_origins: (host, port) of every configured upstream URL.
        allow_registries: patterns of the ``ns`` values served without an upstream entry.
        allow_networks: ranges whose addresses untrusted hosts may resolve to although they
            are loopback, link-local or private.
    """

    trusted_origins: frozenset[tuple[str, int]] = frozenset()
    allow_registries: tuple[RegistryPattern, ...] = ()
    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def build(cls, *, trusted_urls: Iterable[str], allow_registries: Iterable[str] = (),
              allow_networks: Iterable[str] = ()) -> EgressPolicy:
        """The policy of an agent from its configured upstream URLs and allow lists.

        Raises:
            ConfigError: an invalid URL, pattern or network.
        """
        return cls(
            trusted_origins=frozenset(_url_origin(url) for url in trusted_urls),
            allow_registries=tuple(RegistryPattern.parse(p) for p in allow_registries),
            allow_networks=tuple(parse_network(n) for n in allow_networks),
        )

    def is_trusted(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is the origin of a configured upstream."""
        return _origin(host, port) in self.trusted_origins

    def admit_namespace(self, ns: str) -> str:
        """Admits an ``ns`` that has no upstream entry, if an ``allow_registries`` pattern covers it.

        Returns:
            The normalised namespace (``name`` or ``name:port``), for ``https://<namespace>``.

        Raises:
            EgressRefused: MALFORMED, NUMERIC_HOST, IP_LITERAL, SPECIAL_NAME, SINGLE_LABEL, or
                NOT_CONFIGURED when no pattern admits it.
        """
        host, port = parse_namespace(ns)
        if host.address is not None:
            raise EgressRefused(host.name, RefusalReason.IP_LITERAL)
        reason = _refused_name(host)
        if reason is not None:
            raise EgressRefused(host.name, reason)
        if not any(pattern.matches(host, port) for pattern in self.allow_registries):
            raise EgressRefused(host.netloc(port), RefusalReason.NOT_CONFIGURED)
        return host.netloc(port)

    def check_host(self, host: str, port: int) -> Host | None:
        """Checks a host before anything is sent to it (no scheme rule; see ``check_url``).

        Returns:
            None for a trusted origin (connect as usual); otherwise the parsed host, whose
            addresses (the literal, or what the name resolves to) must still pass
            ``check_addresses`` before a connection is made.

        Raises:
            EgressRefused: the name or literal address is refused.
        """
        if self.is_trusted(host, port):
            return None
        parsed = parse_host(host)
        if parsed.address is not None:
            self.check_addresses(parsed.name, [parsed.name])
            return parsed
        reason = _refused_name(parsed)
        if reason is not None:
            raise EgressRefused(parsed.name, reason)
        return parsed

    def check_url(self, scheme: str, host: str, port: int) -> Host | None:
        """``check_host`` for a request URL: an untrusted origin must also use https."""
        if self.is_trusted(host, port):
            return None
        if scheme != "https":
            raise EgressRefused(host, RefusalReason.PLAIN_HTTP)
        return self.check_host(host, port)

    def check_addresses(self, host: str, addresses: Sequence[str]) -> list[IPAddress]:
        """Checks every address an untrusted host resolved to.

        Returns:
            The parsed addresses, in order: the only ones a connection may use.

        Raises:
            EgressRefused: no addresses, an unparsable one, or any refused one (one bad
                address refuses the host).
        """
        if not addresses:
            raise EgressRefused(host, RefusalReason.MALFORMED, "no addresses")
        checked: list[IPAddress] = []
        for text in addresses:
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                raise EgressRefused(host, RefusalReason.MALFORMED, f"resolver returned {text[:60]!r}") from None
            reason = classify_address(address)
            if reason is not None and not (reason in _OVERRIDABLE and self._allowed_network(address)):
                detail = "" if address == _literal(host) else f"resolves to {address}"
                raise EgressRefused(host, reason, detail)
            checked.append(address)
        return checked

    def _allowed_network(self, address: IPAddress) -> bool:
        return any(address in network for network in self.allow_networks)


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


# ---- name resolution ----------------------------------------------------------------------


class Resolver(Protocol):
    """Resolves a host name to the addresses a connection may use.

    ``p2pd.upstream.SystemResolver`` asks the system (trio's getaddrinfo);
    ``StaticResolver`` is the in-memory fake. ``tests/test_p2pd_egress.py`` holds both to
    one contract.
    """

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` (address literals resolve to themselves), in the
        order to try them, without duplicates.

        Raises:
            ResolutionError: the name does not resolve.
        """
        ...


class StaticResolver:
    """A resolver that answers from a table (tests, and names an operator pins).

    Args:
        table: name → addresses. Names are matched after ``parse_host`` normalisation.
    """

    def __init__(self, table: Mapping[str, Sequence[str]]) -> None:
        self._table = {parse_host(name).name: list(dict.fromkeys(addresses)) for name, addresses in table.items()}

    async def resolve(self, host: str, port: int) -> list[str]:
        try:
            parsed = parse_host(host)
        except EgressRefused as exc:
            raise ResolutionError(f"cannot resolve {host[:100]!r}: {exc.reason}") from None
        if parsed.address is not None:
            return [parsed.name]
        addresses = self._table.get(parsed.name)
        if not addresses:
            raise ResolutionError(f"cannot resolve {parsed.name!r}: unknown name")
        return list(addresses)
