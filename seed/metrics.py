"""Prometheus metrics of one seed instance (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from p2pd.httpd import Request

__all__ = ["SeedMetrics"]


class SeedMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("seed_http_requests", "HTTP requests by method, route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.duration = Histogram("seed_http_request_duration_seconds", "Time to answer a request",
                                  ["route"], registry=self.registry,
                                  buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60))
        self.blob_bytes_sent = Counter("seed_blob_bytes_sent", "Blob body bytes sent to clients",
                                       registry=self.registry)
        self.bytes_received = Counter("seed_bytes_received", "Blob and manifest bytes received in pushes",
                                      registry=self.registry)
        self.uploads_in_progress = Gauge("seed_uploads_in_progress", "Upload sessions open on disk",
                                         registry=self.registry)
        self.uploads_purged = Counter("seed_uploads_purged", "Stale upload sessions removed",
                                      registry=self.registry)

    def observe(self, request: Request, status: int, bytes_sent: int, seconds: float) -> None:
        method = request.method if request.method in _METHODS else "OTHER"
        self.requests.labels(method, request.route, str(status)).inc()
        self.duration.labels(request.route).observe(seconds)
        # Only blob content counts: not the JSON body of an error (404, 416) on the blob route.
        if request.route == "blob" and request.method == "GET" and status in (200, 206):
            self.blob_bytes_sent.inc(bytes_sent)

    def render(self) -> bytes:
        return generate_latest(self.registry)


_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"}
