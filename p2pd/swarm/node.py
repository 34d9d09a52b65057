"""Starts this node's part of the swarm: identity, membership and discovery, the peer
endpoint, and the swarm engine the fetcher uses."""

from __future__ import annotations

import ipaddress
import logging
import secrets
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from p2pd.config import AgentConfig
from p2pd.errors import ConfigError
from p2pd.fsutil import write_atomic
from p2pd.httpd import Request, Response, ServerInfo, serve_http
from p2pd.metrics import AgentMetrics
from p2pd.store import BlobStore
from p2pd.tomlconfig import parse_listen

from . import auth
from .discovery import run_dns, run_mdns, run_static
from .engine import Swarm
from .grants import GrantStore
from .membership import Member, Membership
from .peers import PeerClient
from .service import PeerService
from .tls import PeerTls, refusal_reason

__all__ = ["SwarmNode", "default_site", "load_cluster_key", "load_node_id", "peer_tls", "serve_swarm"]

log = logging.getLogger("p2pd.swarm")

_METRICS_INTERVAL = 2.0


@dataclass(frozen=True)
class SwarmNode:
    """What a running swarm exposes to the daemon and to tests."""

    me: Member
    swarm: Swarm
    membership: Membership
    peer_info: ServerInfo
    service: PeerService | None = None  # the daemon plugs the preheat handler into it


def load_cluster_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return auth.parse_key(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read cluster key {path}: {exc}") from exc
    except auth.AuthError as exc:
        raise ConfigError(f"cluster key {path}: {exc}") from exc


def load_node_id(data: Path, configured: str | None) -> str:
    """The configured id, or one generated once and kept in ``<data>/node_id``."""
    if configured:
        return configured
    path = Path(data) / "node_id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    node_id = f"node-{secrets.token_hex(6)}"
    write_atomic(path, node_id.encode())
    return node_id


def default_site(host: str) -> str:
    """A site label from the advertised address: its /24 (IPv4) or /64 (IPv6) network."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "default"
    prefix = 24 if address.version == 4 else 64
    network = ipaddress.ip_network(f"{host}/{prefix}", strict=False)
    return "net-" + str(network.network_address).replace(".", "-").replace(":", "-").strip("-")


async def serve_swarm(
    config: AgentConfig,
    store: BlobStore,
    metrics: AgentMetrics,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[SwarmNode] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs membership, discovery and the peer endpoint until cancelled."""
    settings = config.swarm
    assert settings.peer_listen is not None
    key = load_cluster_key(settings.cluster_key_file)
    if key is None:
        log.warning("peers are NOT authenticated (--insecure-peers)")
    peer_host, peer_port = parse_listen(settings.peer_listen)
    node_id = await trio.to_thread.run_sync(load_node_id, config.data, settings.node_id)
    tls = await trio.to_thread.run_sync(peer_tls, config, key, node_id)
    client = PeerClient(node_id, key, connect_timeout=min(2.0, settings.peer_timeout),
                        read_timeout=settings.peer_timeout, tls=tls.client() if tls is not None else None,
                        on_connect=lambda handshake: metrics.peer_connections.labels(handshake).inc())
    server_context = tls.server() if tls is not None else None

    def tls_refused(error: BaseException | None) -> None:
        reason = "timeout" if error is None else refusal_reason(error)
        metrics.peer_tls_refused.labels(reason).inc()
        log.info("refused a peer connection in the TLS handshake: %s", reason)
    try:
        async with trio.open_nursery() as nursery:
            # The peer endpoint starts first: with port 0 the advertised port is known only then.
            service_box: list[PeerService] = []

            async def handle(request: Request) -> Response:
                return await service_box[0].handle(request)

            peer_info = await nursery.start(partial(
                serve_http, handle, peer_host, peer_port, limits=config.limits, observer=metrics.observe_peer,
                shutdown=shutdown, congestion_control=settings.peer_congestion_control,
                tls=(lambda: server_context) if server_context is not None else None, on_tls_refused=tls_refused))
            advertise = settings.advertise or f"{peer_host}:{peer_info.port}"
            advertise_host, _ = parse_listen(advertise)
            if ipaddress.ip_address(advertise_host).is_unspecified if _is_ip(advertise_host) else False:
                raise ConfigError("--peer-listen on a wildcard address needs --advertise HOST:PORT")
            me = Member(node_id, advertise, settings.site or default_site(advertise_host))
            membership = Membership(me, client.hello, suspend_after=settings.suspend_after_failures,
                                    suspend_seconds=settings.suspend_seconds)
            swarm = Swarm(me=me, membership=membership, client=client, metrics=metrics,
                          chunk_size=settings.chunk_size, lease_ttl=settings.lease_ttl,
                          coordinator_backups=settings.coordinator_backups, peer_timeout=settings.peer_timeout,
                          max_parallel_chunks=settings.max_parallel_chunks,
                          max_requests_per_peer=settings.max_requests_per_peer, ban_seconds=settings.ban_seconds,
                          grants=GrantStore(Path(config.data) / "peer-grants"),
                          download_rate=settings.download_rate, upstream_rate=settings.upstream_rate,
                          site_upstream_rate=settings.site_upstream_rate)
            service_box.append(PeerService(swarm=swarm, store=store, key=key, metrics=metrics,
                                           max_uploads=settings.max_uploads, upload_rate=settings.upload_rate,
                                           chunk_wait=min(2.0, settings.peer_timeout / 2),
                                           slot_wait=min(1.0, settings.peer_timeout / 4)))
            await nursery.start(membership.run)
            if settings.peers:
                await nursery.start(partial(run_static, settings.peers, membership.sightings))
            if settings.peer_dns:
                await nursery.start(partial(run_dns, settings.peer_dns, peer_info.port, membership.sightings,
                                            interval=settings.peer_dns_interval))
            if settings.mdns:
                await nursery.start(partial(run_mdns, node_id=node_id, site=me.site, address=advertise,
                                            interface=settings.mdns_interface or advertise_host,
                                            send=membership.sightings))
            nursery.start_soon(_update_gauges, membership, metrics)
            log.info("swarm node %s (site %s) listening for peers on %s", node_id, me.site, advertise)
            task_status.started(SwarmNode(me, swarm, membership, peer_info, service_box[0]))
            if shutdown is not None:
                await shutdown.wait()
                nursery.cancel_scope.deadline = trio.current_time() + config.limits.graceful_timeout
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


def peer_tls(config: AgentConfig, key: bytes | None, node_id: str) -> PeerTls | None:
    """The peer port's TLS: the operator's files, else derived from the cluster key; None when
    turned off explicitly (or without a cluster key, --insecure-peers, and no files)."""
    settings = config.swarm
    if not settings.peer_tls:
        log.warning("peer traffic is NOT encrypted (peer_tls = false)")
        return None
    if settings.tls_ca_file is not None and settings.tls_cert_file is not None and settings.tls_key_file is not None:
        tls = PeerTls(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
        tls.server()  # a bad file stops the start, with the file named
        return tls
    if key is None:
        log.warning("peer traffic is NOT encrypted (no cluster key to derive certificates from)")
        return None
    return PeerTls.derived(key, node_id, Path(config.data) / "peer-tls")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _update_gauges(membership: Membership, metrics: AgentMetrics) -> None:
    while True:
        metrics.peers_known.set(len(membership.live()) - 1)
        metrics.peers_banned.set(membership.banned())
        await trio.sleep(_METRICS_INTERVAL)
