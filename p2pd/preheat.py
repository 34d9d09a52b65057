"""Cluster-wide preheat: every live member (or those of one site) prefetches the same images.

The local agent, asked on loopback (``POST /p2pd/v1/preheat``), sends each member a signed
peer message (``POST /p2p/v1/preheat``, cluster-key HMAC over mutual TLS like every peer
request). Each member runs the prefetch itself, with its own upstream credentials, so the
swarm makes it one upstream fetch per site; it answers with its report when done. Re-running
after an interruption is cheap: members skip what they have cached.
"""

from __future__ import annotations

import json
import time

import trio

from p2pd.httpd import Request, Response

from .errors import P2PDError
from .metrics import AgentMetrics
from .oci.errors import OCIError
from .oci.platform import Platform
from .prefetch import MAX_REQUEST_BYTES, ImageRef, Prefetcher, parse_prefetch_request
from .swarm.node import SwarmNode

__all__ = ["Preheater"]

MAX_PARALLEL_MEMBERS = 16


def _fetched_by_source(metrics: AgentMetrics) -> dict[str, float]:
    return {sample.labels["source"]: sample.value for metric in metrics.fetched_bytes.collect()
            for sample in metric.samples if sample.name.endswith("_total")}


class Preheater:
    """Runs a member's share of a preheat and fans a preheat out to the members."""

    def __init__(self, node: SwarmNode, prefetcher: Prefetcher, metrics: AgentMetrics) -> None:
        self.node = node
        self.prefetcher = prefetcher
        self.metrics = metrics

    async def run_here(self, images: list[ImageRef], platform: Platform | None, pin_seconds: float
                       ) -> dict[str, object]:
        """This member's prefetch of ``images``: its report, bytes by source included.

        Bytes by source are the agent's counters over the run: concurrent pulls add to them.
        """
        before = _fetched_by_source(self.metrics)
        started = time.monotonic()
        reports = [await self.prefetcher.prefetch(image, platform=platform, pin_seconds=pin_seconds)
                   for image in images]
        after = _fetched_by_source(self.metrics)
        me = self.node.me
        return {"node": me.node_id, "site": me.site,
                "status": "done" if all(r.status == "done" for r in reports) else "failed",
                "images": [r.to_json() for r in reports],
                "bytes": sum(r.bytes_fetched for r in reports),
                "from": {source: int(after.get(source, 0) - before.get(source, 0)) for source in after},
                "seconds": round(time.monotonic() - started, 3)}

    async def handle_peer(self, body: bytes) -> bytes:
        """``POST /p2p/v1/preheat`` (already authenticated by PeerService)."""
        images, platform, pin_seconds, _, _ = parse_prefetch_request(body)
        return json.dumps(await self.run_here(images, platform, pin_seconds)).encode()

    async def handle_api(self, request: Request) -> Response:
        """``POST /p2pd/v1/preheat`` from loopback: ``{"images", "platform", "pin_seconds",
        "site", "nodes"}`` → ``{"nodes": [report...]}`` once every member answered."""
        body = await request.body.read(MAX_REQUEST_BYTES)
        images, platform, pin_seconds, site, only = parse_prefetch_request(body)
        members = [m for m in self.node.membership.live()
                   if (site is None or m.site == site) and (only is None or m.node_id in only)]
        member_request = json.dumps({"images": [str(i) for i in images], "pin_seconds": pin_seconds,
                                     **({"platform": str(platform)} if platform else {})}).encode()
        results: list[dict[str, object]] = []
        limiter = trio.CapacityLimiter(MAX_PARALLEL_MEMBERS)

        async def one(index: int) -> None:
            member = members[index]
            async with limiter:
                started = time.monotonic()
                try:
                    if member.node_id == self.node.me.node_id:
                        report = await self.run_here(images, platform, pin_seconds)
                    else:
                        answer = json.loads(await self.node.swarm.client.preheat(member.address, member_request))
                        if not isinstance(answer, dict):
                            raise P2PDError("malformed preheat report")
                        report = answer
                except (P2PDError, ValueError) as exc:
                    report = {"node": member.node_id, "site": member.site, "status": "failed",
                              "error": str(exc)[:300], "seconds": round(time.monotonic() - started, 3)}
                results.append(report)

        async with trio.open_nursery() as nursery:
            for index in range(len(members)):
                nursery.start_soon(one, index)
        if not members:
            raise OCIError("NAME_UNKNOWN", "no live member matches", status=404)
        results.sort(key=lambda r: str(r.get("node")))
        return Response(200, [("Content-Type", "application/json")], json.dumps({"nodes": results}).encode())
