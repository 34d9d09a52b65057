"""Composition root of the agent: store, upstreams, fetcher and the registry front."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import trio

from p2pd.httpd import ServerInfo, serve_http

from .config import AgentConfig
from .egress import Resolver
from .fetcher import Fetcher
from .gate import AccessGate
from .metrics import AgentMetrics
from .oci.platform import host_platform
from .prefetch import Prefetcher, prefetch_api
from .preheat import Preheater
from .registry import MirrorFront
from .store import BlobStore
from .swarm.node import SwarmNode, serve_swarm
from .upstream import UpstreamPool

__all__ = ["Agent", "serve_agent"]


@dataclass(frozen=True)
class Agent:
    """What a running agent exposes to its caller (the CLI, tests)."""

    info: ServerInfo
    store: BlobStore
    fetcher: Fetcher
    front: MirrorFront
    metrics: AgentMetrics
    swarm: SwarmNode | None = None
    prefetcher: Prefetcher | None = None


async def serve_agent(
    config: AgentConfig,
    *,
    shutdown: trio.Event | None = None,
    resolver: Resolver | None = None,
    task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs the agent until cancelled or until ``shutdown`` is set.

    ``task_status.started`` receives an ``Agent`` once the endpoint is listening.
    ``resolver`` replaces the system resolver for hosts that are not configured upstreams
    (tests use ``p2pd.egress.StaticResolver``).
    """
    store = await trio.to_thread.run_sync(
        partial(BlobStore, config.data, max_bytes=config.cache.max_bytes, pinned=config.cache.pinned))
    metrics = AgentMetrics()
    metrics.cache_bytes.set(store.total_bytes)
    upstreams = UpstreamPool(config, resolver=resolver,
                             on_refused=lambda reason: metrics.egress_refused.labels(reason.value).inc())
    try:
        upstreams.prepare()
        fetcher = Fetcher(config, store, upstreams, metrics)
        # Every client request is authorized before the store, the fetcher or the peers see it.
        front = MirrorFront(config, store, fetcher, upstreams, metrics, AccessGate(config, upstreams, metrics))
        async with trio.open_nursery() as nursery:
            await nursery.start(fetcher.run)
            swarm_node: SwarmNode | None = None
            if config.swarm.enabled:
                swarm_node = await nursery.start(partial(serve_swarm, config, store, metrics, shutdown=shutdown))
                fetcher.swarm = swarm_node.swarm
                front.swarm_node = swarm_node

            prefetcher = Prefetcher(store, fetcher, front, host_platform())
            await nursery.start(prefetcher.run)
            preheater = None
            if swarm_node is not None and swarm_node.service is not None:
                preheater = Preheater(swarm_node, prefetcher, metrics)
                swarm_node.service.preheat_handler = preheater.handle_peer

            async def run_server(*, task_status: trio.TaskStatus[ServerInfo]) -> None:
                # Loopback-only operator API (prefetch, preheat) in front of the registry front.
                handler = prefetch_api(prefetcher, front.handle, preheat=preheater.handle_api if preheater else None)
                await serve_http(handler, config.host, config.port, limits=config.limits,
                                 observer=metrics.observe, shutdown=shutdown, task_status=task_status)
                nursery.cancel_scope.cancel()  # the server finished its graceful shutdown

            info = await nursery.start(run_server)
            front.ready = True
            task_status.started(Agent(info, store, fetcher, front, metrics, swarm_node, prefetcher))
    finally:
        with trio.CancelScope(shield=True):
            await upstreams.aclose()
