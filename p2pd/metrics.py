"""Prometheus metrics of one agent (its own registry, so tests can run several agents)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from p2pd.httpd import Request

__all__ = ["AgentMetrics"]

_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"}


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("p2pd_http_requests", "Requests to the containerd-facing endpoint",
                                ["method", "route", "status"], registry=self.registry)
        self.fetched_bytes = Counter("p2pd_fetched_bytes", "Blob bytes received, by source",
                                     ["source"], registry=self.registry)
        self.served_bytes = Counter("p2pd_served_bytes", "Blob and manifest body bytes served to clients",
                                    registry=self.registry)
        self.cache_hits = Counter("p2pd_cache_hits", "Requests answered from the local store",
                                  ["kind"], registry=self.registry)
        self.cache_misses = Counter("p2pd_cache_misses", "Requests that needed a fetch", ["kind"],
                                    registry=self.registry)
        self.cache_bytes = Gauge("p2pd_cache_bytes", "Bytes of complete blobs in the store",
                                 registry=self.registry)
        self.inflight = Gauge("p2pd_inflight_fetches", "Blob downloads in progress", registry=self.registry)
        self.upstream_fetches = Counter("p2pd_upstream_fetches", "Blob GET requests sent to upstreams",
                                        registry=self.registry)
        self.upstream_stalls = Counter("p2pd_upstream_stalls", "Upstream range responses reopened after their "
                                       "bytes stopped for [swarm] upstream_stall seconds", registry=self.registry)
        self.upstream_range_ignored = Counter("p2pd_upstream_range_ignored",
                                              "Upstream answers to a Range request that sent the whole blob "
                                              "(the bytes before the range are read and dropped)",
                                              registry=self.registry)
        self.verification_failures = Counter("p2pd_verification_failures",
                                             "Content that failed digest or chunk verification", ["source"],
                                             registry=self.registry)
        self.stale_tags = Counter("p2pd_stale_tag_answers",
                                  "Tags answered from the last known digest while the upstream failed",
                                  registry=self.registry)
        self.stalled_streams = Counter("p2pd_stalled_streams", "Client streams closed for lack of progress",
                                       registry=self.registry)
        self.auth_denied = Counter("p2pd_auth_denied", "Client requests refused by the access check (nothing "
                                   "was read or fetched for them), by reason", ["reason"], registry=self.registry)
        self.auth_checks = Counter("p2pd_auth_checks", "Work done to decide who may pull: anonymous probes, "
                                   "offline token verifications, upstream checks with a client's credentials, "
                                   "key set fetches, link confirmations", ["kind"], registry=self.registry)
        self.egress_refused = Counter("p2pd_egress_refused", "Namespaces, requests and connections the egress "
                                      "policy refused (nothing was sent), by reason", ["reason"],
                                      registry=self.registry)

        # Swarm (peer-to-peer) transfer.
        self.peer_fetched_bytes = Counter("p2pd_peer_fetched_bytes", "Chunk bytes received, by peer node id",
                                          ["peer"], registry=self.registry)
        self.peer_served_bytes = Counter("p2pd_peer_served_bytes", "Chunk bytes served to other nodes",
                                         registry=self.registry)
        self.chunks_relayed = Counter("p2pd_peer_chunks_relayed", "Chunks sent to other nodes while they were "
                                      "still arriving here from the upstream (not counted in uploads_active)",
                                      registry=self.registry)
        self.chunks_verified = Counter("p2pd_chunks_verified", "Chunks from peers that matched the chunk map",
                                       registry=self.registry)
        self.chunks_failed = Counter("p2pd_chunks_failed", "Chunks from peers that failed verification",
                                     registry=self.registry)
        self.peers_known = Gauge("p2pd_peers_known", "Live peers in the member table", registry=self.registry)
        self.peers_banned = Gauge("p2pd_peers_banned", "Peers banned for sending bad bytes",
                                  registry=self.registry)
        self.peer_requests_served = Counter("p2pd_peer_requests_served", "Requests answered on the peer "
                                            "endpoint, by route (chunk, map, announce, hello, ...) and status",
                                            ["route", "status"], registry=self.registry)
        self.peer_connections = Counter("p2pd_peer_connections", "Connections opened to other nodes (chunks and "
                                        "messages), by handshake (full or resumed TLS, or plain)", ["handshake"],
                                        registry=self.registry)
        self.peer_messages = Counter("p2pd_peer_messages", "Requests sent to other nodes, by kind "
                                     "(announce, handoff, budget, chunkmap, chunk)", ["kind"], registry=self.registry)
        self.leases = Counter("p2pd_leases", "Upstream leases this node was granted", registry=self.registry)
        self.site_upstream_share = Gauge("p2pd_site_upstream_share_bytes_per_second", "This node's current share "
                                         "of its site's upstream budget ([swarm] site_upstream_rate)",
                                         registry=self.registry)
        self.site_budget_asks = Counter("p2pd_site_budget_asks", "Requests for a share of a site's upstream "
                                        "budget answered by this node (its site's budget keeper)",
                                        registry=self.registry)
        self.reader_rescues = Counter("p2pd_swarm_reader_rescues", "Chunks fetched from the upstream for a local "
                                      "reader that had waited too long while peers that have them sent nothing",
                                      registry=self.registry)
        self.swarm_fallbacks = Counter("p2pd_swarm_fallbacks", "Blob downloads whose swarm path failed with an "
                                       "unexpected error (a defect, logged with its traceback) and went on from the "
                                       "upstream alone", registry=self.registry)
        self.claims_disputed = Counter("p2pd_claims_disputed", "Peers that answered 'not here' for chunks they "
                                       "claimed to hold (reported to the coordinator)", registry=self.registry)
        self.uploads_active = Gauge("p2pd_peer_uploads_active", "Chunk uploads to other nodes in progress "
                                    "(at most [swarm] max_uploads)", registry=self.registry)
        self.uploads_waiting = Gauge("p2pd_peer_uploads_waiting", "Peer chunk requests waiting for an upload "
                                     "slot", registry=self.registry)
        self.uploads_refused = Counter("p2pd_peer_uploads_refused", "Peer chunk requests answered 429",
                                       registry=self.registry)
        self.peer_tls_refused = Counter("p2pd_peer_tls_refused", "Peer connections refused in the TLS handshake, by "
                                        "reason (no_certificate, unknown_ca, expired, not_tls, timeout, other)",
                                        ["reason"], registry=self.registry)
        self.peer_grants_refused = Counter("p2pd_peer_grants_refused", "Peer requests for a protected blob refused "
                                           "for want of a valid peer grant, by reason", ["reason"],
                                           registry=self.registry)
        self.peer_grants = Counter("p2pd_peer_grants", "Peer grants obtained from upstreams (blobs this node "
                                   "protects)", registry=self.registry)
        self.signature_verdicts = Counter("p2pd_signature_verdicts", "Tag pulls checked by the node's "
                                          "[[signatures]] policy, by verdict (allowed, warned, denied)",
                                          ["verdict"], registry=self.registry)

    def observe(self, request: Request, status: int, bytes_sent: int, seconds: float) -> None:
        method = request.method if request.method in _METHODS else "OTHER"
        self.requests.labels(method, request.route, str(status)).inc()
        if request.route in ("blob", "manifest") and request.method == "GET":
            self.served_bytes.inc(bytes_sent)

    def observe_peer(self, request: Request, status: int, bytes_sent: int, seconds: float) -> None:
        self.peer_requests_served.labels(request.route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
