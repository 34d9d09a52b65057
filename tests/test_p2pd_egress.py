"""The egress policy as a pure matrix (no sockets): namespaces, hosts, addresses, patterns,
configuration, the namespace mapping of ``UpstreamPool``, and the ``Resolver`` contract.

The integration side (a real agent, redirects, a listener that proves no connection was
made) is in tests/test_p2pd_ssrf.py.
"""

from __future__ import annotations

import ast
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import p2pd.egress
from p2pd.config import AgentConfig, UpstreamConfig, load_config
from p2pd.egress import (
    EgressPolicy,
    EgressRefused,
    RefusalReason,
    RegistryPattern,
    ResolutionError,
    Resolver,
    StaticResolver,
    classify_address,
    parse_host,
    parse_namespace,
)
from p2pd.errors import ConfigError, UpstreamNotFound
from p2pd.oci.errors import OCIError
from p2pd.upstream import DOCKER_HUB_URL, HttpUpstream, SystemResolver, UpstreamPool

R = RefusalReason
ALLOW = ("docker.io", "*.example.com", "registry.test:5000")


def policy(**kwargs: Any) -> EgressPolicy:
    settings: dict[str, Any] = {"trusted_urls": ["http://127.0.0.1:5000", "https://seed.corp"]}
    settings.update(kwargs)
    return EgressPolicy.build(**settings)


def refusal(call: Callable[[], object]) -> RefusalReason:
    with pytest.raises(EgressRefused) as info:
        call()
    return info.value.reason


def test_policy_module_is_pure() -> None:
    """The policy decides; p2pd/upstream.py does the I/O. Nothing here may open a socket."""
    tree = ast.parse(Path(p2pd.egress.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    io_modules = {"trio", "httpx", "httpcore", "socket", "ssl", "asyncio", "anyio", "os", "select", "subprocess"}
    assert imported and not {name.split(".")[0] for name in imported} & io_modules
    assert {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level} == {"errors"}


# ---- namespaces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ns", "expected"),
    [
        ("docker.io", "docker.io"),
        ("DOCKER.IO.", "docker.io"),  # case and one trailing dot are normalised
        ("docker.io:443", "docker.io:443"),  # the default port of a pattern without one
        ("a.example.com", "a.example.com"),
        ("a.b.example.com", "a.b.example.com"),
        ("xn--bcher-kva.example.com", "xn--bcher-kva.example.com"),  # IDNA names in their ASCII form
        ("registry.test:5000", "registry.test:5000"),
    ],
)
def test_allowed_namespaces_are_admitted(ns: str, expected: str) -> None:
    assert policy(allow_registries=ALLOW).admit_namespace(ns) == expected


@pytest.mark.parametrize(
    ("ns", "reason"),
    [
        # Not covered by a pattern.
        ("example.com", R.NOT_CONFIGURED),  # *.example.com is below the name only
        ("evil.test", R.NOT_CONFIGURED),
        ("docker.io:5000", R.NOT_CONFIGURED),  # a pattern without a port admits 443 only
        ("registry.test", R.NOT_CONFIGURED),
        ("a.example.com.evil.test", R.NOT_CONFIGURED),
        # IP literals in every spelling, whatever the patterns say.
        ("127.0.0.1", R.IP_LITERAL),
        ("127.0.0.1:5000", R.IP_LITERAL),
        ("10.0.0.7:6000", R.IP_LITERAL),
        ("169.254.169.254", R.IP_LITERAL),
        ("[::1]", R.IP_LITERAL),
        ("[::1]:5000", R.IP_LITERAL),
        ("[::ffff:127.0.0.1]:5000", R.IP_LITERAL),
        ("[fd00:ec2::254]", R.IP_LITERAL),
        ("[0:0:0:0:0:0:0:1]", R.IP_LITERAL),
        # getaddrinfo's numeric forms of 127.0.0.1.
        ("2130706433", R.NUMERIC_HOST),
        ("0x7f000001", R.NUMERIC_HOST),
        ("0177.0.0.1", R.NUMERIC_HOST),
        ("127.1", R.NUMERIC_HOST),
        ("0x7f.0.0.1:5000", R.NUMERIC_HOST),
        ("127.0.0.1.", R.NUMERIC_HOST),
        # Names that mean this machine or the metadata service.
        ("localhost", R.SPECIAL_NAME),
        ("localhost.", R.SPECIAL_NAME),
        ("LocalHost:5000", R.SPECIAL_NAME),
        ("registry.localhost", R.SPECIAL_NAME),
        ("metadata.google.internal", R.SPECIAL_NAME),
        ("seed", R.SINGLE_LABEL),
        # Anything odd.
        ("user@docker.io", R.MALFORMED),
        ("%31%32%37.0.0.1", R.MALFORMED),  # a percent sign that survived the query decoding
        ("d\u00f6cker.io", R.MALFORMED),  # non-ASCII: IDNA names must come in xn-- form
        ("\uff44ocker.io", R.MALFORMED),  # fullwidth letters that an IDNA mapping would fold
        ("docker.io:0", R.MALFORMED),
        ("docker.io:99999", R.MALFORMED),
        ("docker.io:", R.MALFORMED),
        ("::1", R.MALFORMED),  # IPv6 without brackets
        ("[::1", R.MALFORMED),
        ("[::1]x", R.MALFORMED),
        ("[fe80::1%25eth0]", R.MALFORMED),
        ("a..b", R.MALFORMED),
        ("-a.test", R.MALFORMED),
        ("a_b.test", R.MALFORMED),
        ("docker.io/x", R.MALFORMED),
        ("", R.MALFORMED),
    ],
)
def test_refused_namespaces(ns: str, reason: RefusalReason) -> None:
    assert refusal(lambda: policy(allow_registries=ALLOW).admit_namespace(ns)) is reason


def test_nothing_is_admitted_without_an_allow_list() -> None:
    assert refusal(lambda: policy().admit_namespace("docker.io")) is R.NOT_CONFIGURED
    assert refusal(lambda: policy().admit_namespace("seed.corp")) is R.NOT_CONFIGURED  # trusted URL, not an ns


def test_star_admits_names_but_never_addresses_or_special_names() -> None:
    anything = policy(allow_registries=["*"])
    assert anything.admit_namespace("ghcr.io") == "ghcr.io"
    assert anything.admit_namespace("quay.io:443") == "quay.io:443"
    assert refusal(lambda: anything.admit_namespace("quay.io:8443")) is R.NOT_CONFIGURED
    for ns, reason in [("127.0.0.1", R.IP_LITERAL), ("2130706433", R.NUMERIC_HOST), ("localhost", R.SPECIAL_NAME),
                       ("metadata.google.internal", R.SPECIAL_NAME), ("seed", R.SINGLE_LABEL)]:
        assert refusal(lambda ns=ns: anything.admit_namespace(ns)) is reason


def test_parse_namespace_splits_host_and_port() -> None:
    assert parse_namespace("Seed.Local.:5000") == (parse_host("seed.local"), 5000)
    host, port = parse_namespace("[FD00::1]:5000")
    assert (host.name, host.address, port, host.netloc(port)) == (
        "fd00::1", ipaddress.ip_address("fd00::1"), 5000, "[fd00::1]:5000")
    assert parse_namespace("docker.io") == (parse_host("docker.io"), None)


# ---- addresses ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", R.LOOPBACK),
        ("127.255.0.9", R.LOOPBACK),
        ("::1", R.LOOPBACK),
        ("::ffff:127.0.0.1", R.LOOPBACK),  # IPv4-mapped
        ("2002:7f00:1::", R.LOOPBACK),  # 6to4 of 127.0.0.1
        ("0.0.0.0", R.UNSPECIFIED),
        ("::", R.UNSPECIFIED),
        ("169.254.169.254", R.METADATA),
        ("169.254.170.2", R.METADATA),
        ("fd00:ec2::254", R.METADATA),
        ("::ffff:169.254.169.254", R.METADATA),
        ("64:ff9b::a9fe:a9fe", R.METADATA),  # NAT64 of 169.254.169.254
        ("168.63.129.16", R.METADATA),  # public, but Azure's platform endpoint
        ("100.100.100.200", R.METADATA),
        ("169.254.1.1", R.LINK_LOCAL),
        ("fe80::1", R.LINK_LOCAL),
        ("fe80::1%eth0", R.LINK_LOCAL),
        ("10.0.0.7", R.PRIVATE),
        ("172.16.0.1", R.PRIVATE),
        ("192.168.1.1", R.PRIVATE),
        ("100.64.0.1", R.PRIVATE),  # shared address space (carrier-grade NAT)
        ("192.0.2.1", R.PRIVATE),  # documentation
        ("198.18.0.1", R.PRIVATE),  # benchmarking
        ("240.0.0.1", R.PRIVATE),  # reserved
        ("255.255.255.255", R.PRIVATE),
        ("0.1.2.3", R.PRIVATE),  # "this network"
        ("fc00::1", R.PRIVATE),
        ("fd12:3456::1", R.PRIVATE),
        ("fec0::1", R.PRIVATE),  # deprecated site-local, which Python calls global
        ("64:ff9b:1::1", R.PRIVATE),  # local-use NAT64
        ("2001:db8::1", R.PRIVATE),
        ("::ffff:10.0.0.7", R.PRIVATE),
        ("224.0.0.1", R.MULTICAST),
        ("ff02::1", R.MULTICAST),
    ],
)
def test_address_classification(address: str, reason: RefusalReason) -> None:
    assert classify_address(ipaddress.ip_address(address)) is reason


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808"])
def test_public_addresses_pass(address: str) -> None:
    assert classify_address(ipaddress.ip_address(address)) is None
    assert policy().check_addresses("registry.example", [address]) == [ipaddress.ip_address(address)]


def test_one_refused_address_refuses_the_host() -> None:
    with pytest.raises(EgressRefused) as info:
        policy().check_addresses("rebind.example", ["8.8.8.8", "127.0.0.1"])
    assert (info.value.host, info.value.reason) == ("rebind.example", R.LOOPBACK)
    assert "resolves to 127.0.0.1" in str(info.value)
    assert refusal(lambda: policy().check_addresses("none.example", [])) is R.MALFORMED
    assert refusal(lambda: policy().check_addresses("odd.example", ["not-an-address"])) is R.MALFORMED


def test_allow_networks_open_private_ranges_but_never_metadata() -> None:
    corp = policy(allow_networks=["10.0.0.0/8", "127.0.0.1/32", "169.254.0.0/16", "fd00::/8"])
    assert corp.check_addresses("harbor.corp.example", ["10.1.2.3", "127.0.0.1"]) == [
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")]
    assert corp.check_addresses("link.example", ["169.254.1.1"])
    for address, reason in [("169.254.169.254", R.METADATA), ("fd00:ec2::254", R.METADATA),
                            ("127.0.0.2", R.LOOPBACK), ("192.168.1.1", R.PRIVATE),
                            ("::ffff:10.0.0.1", R.PRIVATE)]:  # a mapped address is not inside an IPv4 range
        assert refusal(lambda a=address: corp.check_addresses("x.example", [a])) is reason
    everything = policy(allow_networks=["0.0.0.0/0", "::/0"])
    assert everything.check_addresses("x.example", ["127.0.0.2", "10.0.0.1", "::1"])
    for address, reason in [("169.254.169.254", R.METADATA), ("0.0.0.0", R.UNSPECIFIED), ("::", R.UNSPECIFIED),
                            ("224.0.0.1", R.MULTICAST), ("ff02::1", R.MULTICAST)]:
        assert refusal(lambda a=address: everything.check_addresses("x.example", [a])) is reason


# ---- request URLs and connections ---------------------------------------------------------


def test_trusted_origins_are_contacted_whatever_their_address() -> None:
    trusted = policy(trusted_urls=["http://127.0.0.1:5000", "https://seed.corp", "http://[::1]:6000",
                                   "http://Registry.Local.:7000"])
    assert trusted.check_url("http", "127.0.0.1", 5000) is None
    assert trusted.check_url("https", "127.0.0.1", 5000) is None
    assert trusted.check_url("https", "seed.corp", 443) is None
    assert trusted.check_url("http", "::1", 6000) is None
    assert trusted.check_url("http", "0:0::1", 6000) is None  # addresses compare canonically
    assert trusted.check_url("http", "registry.local", 7000) is None
    assert trusted.check_host("127.0.0.1", 5000) is None
    # Another port of a trusted host is another origin.
    assert refusal(lambda: trusted.check_url("http", "127.0.0.1", 5001)) is R.PLAIN_HTTP
    assert refusal(lambda: trusted.check_url("https", "127.0.0.1", 5001)) is R.LOOPBACK
    assert refusal(lambda: trusted.check_url("http", "seed.corp", 80)) is R.PLAIN_HTTP


@pytest.mark.parametrize(
    ("scheme", "host", "reason"),
    [
        ("http", "storage.example", R.PLAIN_HTTP),
        ("https", "127.0.0.1", R.LOOPBACK),
        ("https", "169.254.169.254", R.METADATA),
        ("https", "::1", R.LOOPBACK),
        ("https", "10.0.0.7", R.PRIVATE),
        ("https", "localhost", R.SPECIAL_NAME),
        ("https", "metadata.google.internal", R.SPECIAL_NAME),
        ("https", "2130706433", R.NUMERIC_HOST),
        ("https", "internal", R.SINGLE_LABEL),
        ("https", "bad_name.example", R.MALFORMED),
    ],
)
def test_untrusted_request_urls(scheme: str, host: str, reason: RefusalReason) -> None:
    assert refusal(lambda: policy().check_url(scheme, host, 443)) is reason


def test_untrusted_names_must_be_resolved_and_checked() -> None:
    host = policy().check_url("https", "Production.Cloudflare.Docker.com.", 443)
    assert host is not None and (host.name, host.address) == ("production.cloudflare.docker.com", None)
    literal = policy().check_url("https", "151.101.1.1", 443)
    assert literal is not None and literal.address == ipaddress.ip_address("151.101.1.1")


# ---- patterns and configuration -----------------------------------------------------------


def test_pattern_forms() -> None:
    assert RegistryPattern.parse(" Docker.IO ") == RegistryPattern("docker.io", 443)
    assert RegistryPattern.parse("*.Example.com.") == RegistryPattern("*.example.com", 443)
    assert RegistryPattern.parse("*") == RegistryPattern("*", 443)
    assert RegistryPattern.parse("*:5000") == RegistryPattern("*", 5000)
    assert RegistryPattern.parse("registry.test:5000") == RegistryPattern("registry.test", 5000)
    assert RegistryPattern.parse("*.io") == RegistryPattern("*.io", 443)


@pytest.mark.parametrize(
    "pattern",
    ["", "*.", "a.*.com", "*foo.com", "**.com", "10.0.0.1", "[::1]:5000", "::1", "localhost", "*.localhost",
     "metadata.google.internal", "seed", "exa mple.com", "docker.io:99999", "docker.io:", "user@docker.io",
     "https://docker.io"],
)
def test_bad_patterns_are_config_errors(pattern: str) -> None:
    with pytest.raises(ConfigError):
        RegistryPattern.parse(pattern)


def test_config_loads_and_checks_allow_lists(tmp_path: Path) -> None:
    path = tmp_path / "p2pd.toml"
    path.write_text('allow_registries = ["docker.io", "*.example.com"]\nallow_networks = ["10.20.0.0/16"]\n')
    config = load_config(path, listen="127.0.0.1:0", data=tmp_path / "d",
                         allow_registries=["ghcr.io", "docker.io"], allow_networks=["fd12::/16"])
    assert config.allow_registries == ("docker.io", "*.example.com", "ghcr.io")  # file and flags add up
    assert config.allow_networks == ("10.20.0.0/16", "fd12::/16")
    assert load_config(None, data=tmp_path / "d").allow_registries == ()
    for bad in ({"allow_registries": ["127.0.0.1"]}, {"allow_registries": ["localhost"]},
                {"allow_networks": ["10.0.0.5/8"]}, {"allow_networks": ["nope"]}):
        with pytest.raises(ConfigError):
            load_config(None, data=tmp_path / "d", **bad)
    path.write_text('allow_registries = "docker.io"\n')
    with pytest.raises(ConfigError):
        load_config(path, data=tmp_path / "d")


def test_cli_flags_reach_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import p2pd.cli

    seen: list[AgentConfig] = []
    monkeypatch.setattr(p2pd.cli.trio, "run", lambda _serve, config: seen.append(config))
    status = p2pd.cli.main(["serve", "--data", str(tmp_path / "d"), "--allow-registry", "docker.io",
                            "--allow-registry", "*.example.com", "--allow-network", "10.0.0.0/8"])
    assert status == 0
    assert (seen[0].allow_registries, seen[0].allow_networks) == (("docker.io", "*.example.com"), ("10.0.0.0/8",))
    assert p2pd.cli.main(["serve", "--data", str(tmp_path / "d"), "--allow-registry", "10.0.0.7"]) == 2


# ---- the namespace mapping of UpstreamPool ------------------------------------------------


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., UpstreamPool]]:
    made: list[UpstreamPool] = []

    def make(*, refused: list[RefusalReason] | None = None, **config: Any) -> UpstreamPool:
        on_refused = refused.append if refused is not None else None
        made.append(UpstreamPool(AgentConfig(**config), on_refused=on_refused))
        return made[-1]

    yield make
    for pool in made:
        await pool.aclose()


def url_of(upstream: object) -> str:
    assert isinstance(upstream, HttpUpstream)
    return upstream.url


async def test_pool_serves_configured_and_allowed_namespaces_only(pools: Callable[..., UpstreamPool]) -> None:
    refused: list[RefusalReason] = []
    pool = pools(refused=refused, upstreams=(UpstreamConfig("seed.local:5000", "http://127.0.0.1:5000"),),
                 allow_registries=("*.example.com", "index.docker.io"))
    seed, _ = pool.resolve("Seed.Local.:5000", "team/app")  # normalised before the lookup
    assert url_of(seed) == "http://127.0.0.1:5000"
    assert pool.check_namespace("SEED.local:5000") == "seed.local:5000"
    allowed, _ = pool.resolve("r.example.com", "team/app")
    assert url_of(allowed) == "https://r.example.com"
    # Either Docker Hub name in the allow list admits both.
    hub, repository = pool.resolve("docker.io", "busybox")
    assert (url_of(hub), repository) == (DOCKER_HUB_URL, "library/busybox")
    assert refused == []

    for ns, reason in [("ghcr.io", R.NOT_CONFIGURED), ("127.0.0.1:5000", R.IP_LITERAL), ("localhost", R.SPECIAL_NAME),
                       ("0x7f000001", R.NUMERIC_HOST)]:
        with pytest.raises(EgressRefused) as info:
            pool.resolve(ns, "app")
        assert isinstance(info.value, UpstreamNotFound) and info.value.reason is reason  # a fast 404, no retries
        with pytest.raises(OCIError) as front:
            pool.check_namespace(ns)
        assert (front.value.code, front.value.status) == ("NAME_UNKNOWN", 404)
    assert refused == [R.NOT_CONFIGURED, R.NOT_CONFIGURED, R.IP_LITERAL, R.IP_LITERAL, R.SPECIAL_NAME,
                       R.SPECIAL_NAME, R.NUMERIC_HOST, R.NUMERIC_HOST]
    with pytest.raises(OCIError) as malformed:
        pool.check_namespace("user@docker.io")
    assert (malformed.value.code, malformed.value.status) == ("NAME_INVALID", 400)
    assert pool.check_namespace(None) is None


async def test_default_upstream_serves_every_namespace(pools: Callable[..., UpstreamPool]) -> None:
    pool = pools(default_upstream="http://127.0.0.1:5000")
    for ns in ("ghcr.io", "127.0.0.1:6000", "localhost"):  # the connection goes to the default upstream
        assert url_of(pool.resolve(ns, "app")[0]) == "http://127.0.0.1:5000"


async def test_refusals_are_logged_once_per_host(pools: Callable[..., UpstreamPool],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    refused: list[RefusalReason] = []
    pool = pools(refused=refused)
    with caplog.at_level(logging.INFO, logger="p2pd.upstream"):
        for _ in range(5):
            for ns in ("127.0.0.1:6000", "ghcr.io"):
                with pytest.raises(OCIError):
                    pool.check_namespace(ns)
    lines = [r for r in caplog.records if r.name == "p2pd.upstream"]
    assert len(refused) == 10
    assert [(r.levelno, "127.0.0.1" in r.getMessage()) for r in lines] == [(logging.WARNING, True),
                                                                           (logging.INFO, False)]


# ---- the Resolver contract ----------------------------------------------------------------


def static_resolver() -> StaticResolver:
    return StaticResolver({"localhost": ["127.0.0.1", "127.0.0.1"], "Registry.Example.": ["192.0.2.7"]})


@pytest.fixture(params=["static", "system"])
def resolver(request: pytest.FixtureRequest) -> Resolver:
    return static_resolver() if request.param == "static" else SystemResolver()


async def test_resolver_contract(resolver: Resolver) -> None:
    """Every resolver: names to address strings without duplicates, literals to themselves,
    and ``ResolutionError`` for a name that cannot resolve. Only /etc/hosts and literals are
    used, so the system resolver sends no query."""
    with trio.fail_after(5):
        addresses = await resolver.resolve("localhost", 443)
        assert "127.0.0.1" in addresses and len(addresses) == len(set(addresses))
        assert all(ipaddress.ip_address(a) for a in addresses)
        assert await resolver.resolve("127.0.0.9", 443) == ["127.0.0.9"]
        assert await resolver.resolve("::1", 443) == ["::1"]
        with pytest.raises(ResolutionError):
            await resolver.resolve("bad..name", 443)  # refused before any lookup


async def test_static_resolver_normalises_and_refuses_unknown_names() -> None:
    resolver = static_resolver()
    assert await resolver.resolve("REGISTRY.example", 443) == ["192.0.2.7"]
    with pytest.raises(ResolutionError):
        await resolver.resolve("unknown.example", 443)
