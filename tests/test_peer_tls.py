"""Mutual TLS on the peer port: certificates derived from the cluster key by default, or issued by
an operator CA (``p2pd ca init|issue``); a connection without a certificate from the cluster's
CA — none at all, another CA, an expired one, plain HTTP — is refused in the handshake and
counted (``p2pd_peer_tls_refused_total{reason}``). Every request is real TLS on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ssl
import stat
from pathlib import Path

import httpx
import pytest
import trio

import p2pd.cli
from p2pd.config import load_config
from p2pd.daemon import Agent
from p2pd.errors import ConfigError
from p2pd.swarm.auth import generate_key
from p2pd.swarm.peers import PeerClient, PeerError
from p2pd.swarm.tls import PeerTls, derive_cluster_ca, issue_node_certificate, pem_certificate, pem_private_key
from tests.p2pd_support import agent_metric, start_agent
from tests.swarm_cluster import wait_until


def write_key(path: Path) -> bytes:
    key = generate_key()
    path.write_text(key + "\n")
    return bytes.fromhex(key)


async def start_peer_agent(nursery: trio.Nursery, tmp_path: Path, name: str, swarm: str) -> Agent:
    config_file = tmp_path / f"{name}.toml"
    config_file.write_text(f'default_upstream = "http://127.0.0.1:9"\n[swarm]\npeer_listen = "127.0.0.1:0"\n'
                           f'mdns = false\nnode_id = "{name}"\n{swarm}')
    return await start_agent(nursery, load_config(config_file, listen="127.0.0.1:0", data=tmp_path / name))


def refused(agent: Agent, reason: str) -> float:
    return agent_metric(agent, "p2pd_peer_tls_refused_total", reason=reason)


async def handshake_fails(address: str, context: ssl.SSLContext) -> None:
    """Connects with ``context`` and expects the server to end the handshake (or the first read)."""
    host, port = address.rsplit(":", 1)
    with pytest.raises((trio.BrokenResourceError, ssl.SSLError)):
        stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=context)
        await stream.send_all(b"GET /p2p/v1/hello HTTP/1.1\r\nhost: x\r\n\r\n")
        assert not await stream.receive_some(100)
        raise trio.BrokenResourceError("closed without an answer")


def unverified_client(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A client that does not check the server (an attacker's): only the server's check counts."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def test_the_cluster_ca_is_the_same_wherever_the_key_is() -> None:
    key = bytes.fromhex(generate_key())
    (first_key, first), (second_key, second) = derive_cluster_ca(key), derive_cluster_ca(key)
    assert first.public_key() == second.public_key() and first.subject == second.subject
    assert first_key.private_numbers() == second_key.private_numbers()
    _, other = derive_cluster_ca(bytes.fromhex(generate_key()))
    assert other.public_key() != first.public_key() and other.subject != first.subject
    # A node certificate made from one derivation verifies against the other's certificate.
    _, node = issue_node_certificate(first_key, first, "n1")
    node.verify_directly_issued_by(second)
    with pytest.raises(ValueError):
        node.verify_directly_issued_by(other)


async def test_peers_with_the_cluster_key_talk_and_everyone_else_is_refused_and_counted(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    key = write_key(tmp_path / "cluster.key")
    agent = await start_peer_agent(nursery, tmp_path, "n1", f'cluster_key_file = "{tmp_path / "cluster.key"}"\n')
    assert agent.swarm is not None
    address = f"127.0.0.1:{agent.swarm.peer_info.port}"
    assert agent.swarm.peer_info.scheme == "https"
    # A member: its certificate is derived from the same key; the HMAC is checked inside TLS.
    member = PeerClient("n2", key, tls=PeerTls.derived(key, "n2", tmp_path / "n2-tls").client())
    try:
        assert await member.hello(address) == ("n1", agent.swarm.me.site)
    finally:
        await member.aclose()

    # No certificate; a certificate from another cluster's CA; plain HTTP.
    await handshake_fails(address, unverified_client())
    stranger = PeerTls.derived(bytes.fromhex(generate_key()), "n3", tmp_path / "n3-tls")
    await handshake_fails(address, unverified_client(stranger.cert_file, stranger.key_file))
    async with httpx.AsyncClient(trust_env=False, timeout=5) as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get(f"http://{address}/p2p/v1/hello")
    # A member's client verifies the server too: a node of another cluster is refused by the client.
    outsider = PeerClient("n3", bytes.fromhex(generate_key()), tls=stranger.client())
    try:
        with pytest.raises(PeerError):
            await outsider.hello(address)
    finally:
        await outsider.aclose()
    with trio.fail_after(5):
        await wait_until(lambda: min(refused(agent, reason) for reason in ("no_certificate", "unknown_ca", "not_tls")))


async def test_a_members_client_trusts_the_cluster_ca_alone_not_the_machines_ca_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peers are reached by address, so the client checks no host name: were the machine's CA
    store trusted too, any certificate from a public CA would pass for a peer. Here the
    "machine's store" (``SSL_CERT_FILE``) holds a stranger's CA, whose server the member meets."""
    key = bytes.fromhex(generate_key())
    stranger = PeerTls.derived(bytes.fromhex(generate_key()), "n9", tmp_path / "stranger-tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(stranger.ca_file))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    member = PeerTls.derived(key, "n2", tmp_path / "n2-tls")
    client, server = member.client(), member.server()
    for context in (client, server):
        assert context.cert_store_stats()["x509_ca"] == 1
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2

    # A server presenting the stranger's certificate (and asking nothing of the client).
    stranger_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    stranger_server.load_cert_chain(stranger.cert_file, stranger.key_file)

    async def serve(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await trio.SSLStream(stream, stranger_server, server_side=True).do_handshake()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as refusal:
            stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=client)
            await stream.do_handshake()
        assert "CERTIFICATE_VERIFY_FAILED" in repr(refusal.value.__cause__)
        nursery.cancel_scope.cancel()


async def test_an_operator_ca_issues_node_certificates_and_expired_ones_are_refused(
        nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    assert p2pd.cli.main(["ca", "init", "--dir", str(ca)]) == 0
    for node in ("n1", "n2"):
        assert p2pd.cli.main(["ca", "issue", node, "--dir", str(ca), "--address", "127.0.0.1"]) == 0
    assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((ca / "n1.key").stat().st_mode) == 0o600
    # Never overwritten; a bad node id or a missing CA is a clear error.
    assert p2pd.cli.main(["ca", "issue", "n1", "--dir", str(ca)]) == 2
    assert p2pd.cli.main(["ca", "issue", "bad/name", "--dir", str(ca)]) == 2
    assert p2pd.cli.main(["ca", "issue", "n9", "--dir", str(tmp_path / "none")]) == 2
    assert "exists" in capsys.readouterr().err

    key = write_key(tmp_path / "cluster.key")
    files = (f'cluster_key_file = "{tmp_path / "cluster.key"}"\ntls_ca_file = "{ca / "ca.pem"}"\n'
             f'tls_cert_file = "{ca / "n1.pem"}"\ntls_key_file = "{ca / "n1.key"}"\n')
    agent = await start_peer_agent(nursery, tmp_path, "n1", files)
    assert agent.swarm is not None
    address = f"127.0.0.1:{agent.swarm.peer_info.port}"
    member = PeerClient("n2", key, tls=PeerTls(ca / "ca.pem", ca / "n2.pem", ca / "n2.key").client())
    try:
        assert (await member.hello(address))[0] == "n1"
    finally:
        await member.aclose()
    # With an operator CA, a certificate derived from the cluster key is not enough.
    derived = PeerTls.derived(key, "n3", tmp_path / "n3-tls")
    await handshake_fails(address, unverified_client(derived.cert_file, derived.key_file))
    # An expired certificate from the right CA.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    ca_key = serialization.load_pem_private_key((ca / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    old_key, old_cert = issue_node_certificate(ca_key, ca_cert, "n4", days=1,  # type: ignore[arg-type]
                                               now=dt.datetime.now(dt.UTC) - dt.timedelta(days=30))
    (tmp_path / "old.pem").write_bytes(pem_certificate(old_cert))
    (tmp_path / "old.key").write_bytes(pem_private_key(old_key))
    await handshake_fails(address, unverified_client(tmp_path / "old.pem", tmp_path / "old.key"))
    with trio.fail_after(5):
        await wait_until(lambda: min(refused(agent, "unknown_ca"), refused(agent, "expired")))


def test_peer_tls_settings(tmp_path: Path) -> None:
    (tmp_path / "cluster.key").write_text(generate_key())
    base = f'[swarm]\npeer_listen = "127.0.0.1:0"\ncluster_key_file = "{tmp_path / "cluster.key"}"\n'
    for extra, message in (('tls_ca_file = "/x/ca.pem"\n', "together"),
                           ('peer_tls = false\ntls_ca_file = "a"\ntls_cert_file = "b"\ntls_key_file = "c"\n',
                            "contradicts")):
        (tmp_path / "bad.toml").write_text(base + extra)
        with pytest.raises(ConfigError, match=message):
            load_config(tmp_path / "bad.toml")
    (tmp_path / "off.toml").write_text(base + "peer_tls = false\n")
    assert load_config(tmp_path / "off.toml").swarm.peer_tls is False


async def test_peer_tls_can_be_turned_off_explicitly(nursery: trio.Nursery, tmp_path: Path) -> None:
    key = write_key(tmp_path / "cluster.key")
    agent = await start_peer_agent(nursery, tmp_path, "n1",
                                   f'cluster_key_file = "{tmp_path / "cluster.key"}"\npeer_tls = false\n')
    assert agent.swarm is not None and agent.swarm.peer_info.scheme == "http"
    client = PeerClient("n2", key)
    try:
        assert (await client.hello(f"127.0.0.1:{agent.swarm.peer_info.port}"))[0] == "n1"
    finally:
        await client.aclose()
