"""The seed's HTTP API: OCI Distribution 1.1 (pull, push, delete, tags, catalog, referrers),
the chunk-map endpoint for peers, ``/metrics`` and ``/healthz``.

Routing checks the grammar of every name, tag and digest before storage sees it. Storage
calls that write (and fsync) run in worker threads; cheap metadata reads run inline.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from p2pd.httpd import FileBody, Request, Response, ServerInfo, SharedPacing, TlsContextProvider, TlsFiles, serve_http
from p2pd.oci import mediatypes
from p2pd.oci.chunkmap import chunk_size_for, validate_chunk_size
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from p2pd.oci.grammar import validate_name, validate_reference
from p2pd.oci.manifest import MAX_MANIFEST_SIZE, parse_manifest, referrers_index
from p2pd.oci.ranges import parse_range
from p2pd.signing import SignatureVerdict
from p2pd.swarm.grants import PEER_GRANT_SECONDS

from .access import AccessPolicy
from .audit import open_audit
from .auth.authenticator import Caller
from .auth.setup import build_identity
from .auth.token_service import TokenService
from .config import SeedConfig
from .events import Dispatcher, open_webhooks
from .gate import AuditHook, Gate, open_caller
from .metrics import SeedMetrics
from .scan import PullDecision, ScanReport, ScanService, decide_pull, is_container_image
from .signatures import SignatureService
from .signatures import api as signatures_api
from .storage import Storage, UploadSession, UploadSessions, is_disk_full

__all__ = ["CHUNK_MAP_MEDIA_TYPE", "SeedRegistry", "serve_seed"]

log = logging.getLogger("seed.registry")

CHUNK_MAP_MEDIA_TYPE = mediatypes.CHUNK_MAP
_API_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
_WRITE_BUFFER = 1024 * 1024
_CONTENT_RANGE_RE = re.compile(r"(?:bytes[ =])?(\d{1,19})-(\d{1,19})")

# (route name, method set, pattern) in match order: more specific paths first, because
# repository names may themselves contain "blobs" or "manifests" as components.
_ROUTES: list[tuple[str, re.Pattern[str]]] = [
    ("catalog", re.compile(r"/v2/_catalog")),
    ("chunks", re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)/chunks")),
    # A peer grant: what a p2pd node shows other nodes to get this blob's chunks (docs/security.md).
    ("grant", re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)/grant")),
    ("upload", re.compile(r"/v2/(?P<name>.+)/blobs/uploads/(?P<upload>[^/]*)")),
    ("blob", re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)")),
    ("manifest", re.compile(r"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)")),
    ("tags", re.compile(r"/v2/(?P<name>.+)/tags/list")),
    ("referrers", re.compile(r"/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)")),
    ("scan", re.compile(r"/v2/(?P<name>.+)/scan/(?P<reference>[^/]+)")),
    # The registry signature API extension (containers/image) and the signature verdict (seed.signatures).
    ("signatures", re.compile(r"/extensions/v2/(?P<name>.+)/signatures/(?P<digest>[^/]+)")),
    ("verdict", re.compile(r"/extensions/v2/(?P<name>.+)/verdict/(?P<reference>[^/]+)")),
]
_SCAN_STATE_HEADER = "P2PD-Scan-State"
_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")  # p2pd's node ids
_POLICY_DENIAL_INTERVAL = 10.0  # seconds: one policy.denied record per caller, image and interval
_POLICY_DENIAL_LOG_SIZE = 4096


def _method_not_allowed(allowed: str) -> OCIError:
    return OCIError("UNSUPPORTED", "method not allowed", status=405, headers=[("Allow", allowed)])


def _byte_count(text: str, what: str) -> int:
    if text.isascii() and text.isdigit() and len(text) < 12:
        return int(text)
    raise OCIError("BAD_REQUEST", f"{what} must be a number of bytes")


def _range_header(size: int) -> str:
    return f"0-{max(size - 1, 0)}"


class SeedRegistry:
    """Request handler of one seed instance.

    Args:
        config: the loaded configuration.
        storage: where content lives (``Storage(config.storage.data, ...)``).
        metrics: Prometheus metrics of this instance.
        gate: authentication and the access decision (see ``seed.gate``).
        token_service: the ``/token`` endpoints, when the seed enforces access control.
        audit: where security-relevant events go (pushes, deletes; the gate logs the rest).
    """

    def __init__(self, config: SeedConfig, storage: Storage, metrics: SeedMetrics, gate: Gate,
                 token_service: TokenService | None = None, audit: AuditHook | None = None) -> None:
        self.config = config
        self.storage = storage
        # [server] upload_rate: the blob downloads in progress share it, each connection paced by
        # the kernel at its part. Unpaced, the flows to a site's range holders started together,
        # overflowed the uplink's queue and some stalled for seconds in retransmission timeouts
        # while others ran at many times their share (docs/benchmarks.md, fifteenth session).
        self.pacing = SharedPacing(config.server.upload_rate)
        # Upload sessions are state, not content: a shared store can take them over when the
        # seed runs as several replicas (the local files are the default).
        self.uploads: UploadSessions = storage
        self.tls: TlsContextProvider | None = None  # set by serve_seed; see reload_tls
        self.metrics = metrics
        self.gate = gate
        self.token_service = token_service
        self._audit: AuditHook = audit or (lambda action, fields: None)
        self._upload_locks: dict[str, trio.Lock] = {}
        self.metrics.uploads_in_progress.set(sum(1 for _ in self.uploads.list_uploads()))
        # The background scanner (set by serve_seed unless [scan] enabled = false), and who is
        # told of each new or changed result (webhooks subscribe here; called in the trio thread).
        self.scanner: ScanService | None = None
        self.on_scan_completed: list[Callable[[ScanReport], None]] = []
        # Signatures and the [[signatures]] pull policy; who is told of each new or changed
        # verdict (webhooks subscribe here; called in the trio thread).
        self.on_signature_verdict: list[Callable[[SignatureVerdict], None]] = []
        self.signatures = SignatureService(storage, config.signatures, audit=self._audit,
                                           on_verdict=self.on_signature_verdict)
        self._policy_denials: OrderedDict[tuple[str, ...], float] = OrderedDict()
        # The webhooks (set by serve_seed). The audit hook already feeds them pushes, tag moves,
        # deletes, scans, signature verdicts and login failures; emit() is for anything else.
        self.webhooks: Dispatcher | None = None

    async def reload_tls(self) -> bool:
        """Re-reads the ``[tls]`` certificate and key (SIGHUP), for new connections only.

        Called before the configuration is read again, so that a renewed certificate does not
        wait for a valid rule file. Files that do not load keep the current certificate (logged).
        Returns whether a new certificate is in use (False without ``[tls]``).
        """
        if self.tls is None:
            return False
        return await trio.to_thread.run_sync(self.tls.reload)

    async def reload(self, config: SeedConfig) -> None:
        """Applies a re-read configuration (SIGHUP): access rules, identity providers, token keys,
        the shared upload rate.

        Listen address, congestion control, storage and TLS files are not changed here
        (``reload_tls`` re-reads the certificate). A configuration that fails to build leaves the
        running one in place.
        """
        # Reading files and keys happens in a worker thread; the swap and the audit record
        # happen here, in the trio thread, between two requests.
        gate, token_service = await trio.to_thread.run_sync(build_gate, config, self._audit)
        if self.gate.authenticator is not None and gate.authenticator is not None:
            gate.authenticator.throttle = self.gate.authenticator.throttle  # failures survive a reload
        if config.webhooks != self.config.webhooks:
            log.warning("[[webhooks]] changed: the running seed keeps its endpoints until it is restarted")
        self.gate, self.token_service, self.config = gate, token_service, config
        self.pacing.rate = config.server.upload_rate  # for the downloads that start from now on
        self.signatures.replace_policy(config.signatures)  # new keys: verdicts are computed again
        self._audit("config.reload", {"actor": "", "actor_kind": "system",
                                      "detail": {"rules": len(config.access), "mode": config.auth.mode}})

    async def handle(self, request: Request) -> Response:
        path = request.path
        if path == "/healthz":
            request.route = "healthz"
            return Response(200, [("Content-Type", "text/plain")], b"ok\n")
        if path == "/metrics":
            request.route = "metrics"
            return Response(200, [("Content-Type", "text/plain; version=0.0.4")], self.metrics.render())
        if self.token_service is not None and path in ("/token", "/token/keys"):
            return await self.token_service.handle(request, request.client[0] if request.client else "-")
        if not (path == "/v2" or path.startswith(("/v2/", "/extensions/v2/"))):
            raise OCIError("NOT_FOUND", "not found")
        response = await self._dispatch(request)
        response.headers.append(_API_HEADER)
        return response

    async def _dispatch(self, request: Request) -> Response:
        path = request.path
        if path in ("/v2", "/v2/"):
            request.route = "base"
            if request.method not in ("GET", "HEAD"):
                raise _method_not_allowed("GET, HEAD")
            try:
                request.identity = await self.gate.admit(request, "base", None)
            except OCIError as exc:
                # containers/image reads the header from its first, unauthenticated ping.
                exc.headers.append(signatures_api.SUPPORTS_SIGNATURES_HEADER)
                raise
            return Response(200, [("Content-Type", "application/json"), signatures_api.SUPPORTS_SIGNATURES_HEADER],
                            b"{}")
        for route, pattern in _ROUTES:
            match = pattern.fullmatch(path)
            if match is None:
                continue
            request.route = route
            params = match.groupdict()
            if "name" in params:
                validate_name(params["name"])
            # The one access decision of this request, before any handler or storage sees it.
            request.identity = await self.gate.admit(request, route, params.get("name"))
            handler = self._handlers.get((route, request.method))
            if handler is None:
                if request.method == "HEAD" and (route, "GET") in self._handlers:
                    handler = self._handlers[(route, "GET")]
                else:
                    allowed = sorted({m for (r, m) in self._handlers if r == route})
                    raise _method_not_allowed(", ".join(allowed))
            try:
                return await handler(self, request, **params)
            except OSError as exc:
                if is_disk_full(exc):
                    raise OCIError("UNAVAILABLE", "registry storage is full", status=507) from exc
                raise
        raise OCIError("NOT_FOUND", "no such API endpoint", detail={"path": path[:200]})

    def observe(self, request: Request, status: int, bytes_sent: int, seconds: float) -> None:
        """Called by the HTTP server after every response: metrics, and a DEBUG access-log line."""
        self.metrics.observe(request, status, bytes_sent, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %d in=%d out=%d range=%s %.3fs", request.method, request.target[:200], status,
                      request.body.received, bytes_sent, request.headers.get("content-range", "-"), seconds)

    # ---- pull -------------------------------------------------------------------------

    async def get_blob(self, request: Request, name: str, digest: str) -> Response:
        parsed = Digest.parse(digest)
        fd, size = self.storage.open_blob(name, parsed)
        try:
            byte_range = parse_range(request.headers.get("range"), size)
        except OCIError:
            os.close(fd)
            raise
        headers = [("Content-Type", mediatypes.OCTET_STREAM), ("Docker-Content-Digest", str(parsed)),
                   ("Accept-Ranges", "bytes"), ("ETag", f'"{parsed}"'),
                   ("Cache-Control", "max-age=31536000")]
        end_pacing = self.pacing.start(request.pace) if request.method == "GET" else None
        # A paced download's share ends when its last bytes have left, not when they are queued.
        drained = end_pacing is not None
        if byte_range is None:
            return Response(200, headers, FileBody(fd, 0, size), on_close=end_pacing, drained_close=drained)
        headers.append(("Content-Range", byte_range.content_range(size)))
        return Response(206, headers, FileBody(fd, byte_range.start, byte_range.length), on_close=end_pacing,
                        drained_close=drained)

    async def get_manifest(self, request: Request, name: str, reference: str) -> Response:
        try:
            validate_reference(reference)
        except OCIError:
            # Nothing can be stored under a reference that is neither a tag nor a digest, so it
            # is unknown (the OCI conformance suite expects 404 here, not 400).
            raise OCIError("MANIFEST_UNKNOWN", "manifest unknown", status=404,
                           detail={"reference": reference[:200]}) from None
        stored, body = self.storage.get_manifest(name, reference)
        if ":" not in reference:
            await self.signatures.check_pull(name, reference, stored.digest, _actor(request))
            await self._check_scanning_policy(request, name, reference, stored.digest, stored.media_type, body)
        headers = [("Content-Type", stored.media_type), ("Docker-Content-Digest", str(stored.digest)),
                   ("ETag", f'"{stored.digest}"')]
        return Response(200, headers, body)

    async def _check_scanning_policy(self, request: Request, name: str, tag: str, digest: Digest, media_type: str,
                                     body: bytes) -> None:
        """``[[scanning]]``: refuses a pull by tag of an image its scan blocks (403 ``DENIED``).

        Only pulls by tag: a pull by digest names exact content the client already chose (and
        the blobs and platform manifests of an image are always fetched by digest), so a blocked
        image stops at the step where a tag becomes a digest.
        """
        settings = self.config.scanning
        if settings.rule_for(name) is None or not _scannable(media_type, body):
            return
        scanner = self.scanner
        report = await scanner.report(digest) if scanner is not None else None
        if report is None and scanner is not None and scanner.state(digest) == "unscanned":
            # Pushed before scanning was on, or dropped by a full queue: catch up now.
            scanner.enqueue(name, digest)
        decision = decide_pull(settings, name, report, today=datetime.datetime.now(datetime.UTC).date())
        if decision.allowed:
            return
        self._record_policy_denial(request, name, tag, digest, decision)
        raise OCIError("DENIED", f"pull of {name}:{tag} refused by the scanning policy: {decision.reason}",
                       status=403, detail={"policy": "scanning", "digest": str(digest),
                                           "advisories": list(decision.advisories)})

    def _record_policy_denial(self, request: Request, name: str, tag: str, digest: Digest,
                              decision: PullDecision) -> None:
        # Clients retry a refused pull: one record per caller, image and interval is enough.
        actor = _actor(request)
        key = (str(actor["actor"]), str(actor["source"]), name, str(digest))
        now = time.monotonic()
        last = self._policy_denials.get(key)
        if last is not None and now - last < _POLICY_DENIAL_INTERVAL:
            return
        self._policy_denials[key] = now
        self._policy_denials.move_to_end(key)
        while len(self._policy_denials) > _POLICY_DENIAL_LOG_SIZE:
            self._policy_denials.popitem(last=False)
        rule = list(decision.rule.repositories) if decision.rule is not None else []
        self._audit("policy.denied", {**actor, "repository": name, "reference": tag, "digest": str(digest),
                                      "status": 403,
                                      "detail": {"policy": "scanning", "reason": decision.reason,
                                                 "advisories": list(decision.advisories), "rule": rule}})

    async def get_grant(self, request: Request, name: str, digest: str) -> Response:
        """A short-lived statement, signed with the token keys, that node ``?node=`` may fetch
        ``digest`` of ``name`` from its peers; issued to a caller with pull on ``name`` for a
        blob the repository holds. 404 from a seed without access control (nothing to protect)."""
        parsed = Digest.parse(digest)
        node = request.query_one("node") or ""
        if not _NODE_ID_RE.fullmatch(node):
            raise OCIError("BAD_REQUEST", "node must be the node id (1-63 letters, digits and '-')")
        if self.token_service is None:
            raise OCIError("NOT_FOUND", "this registry issues no peer grants (no access control)")
        fd, _size = await trio.to_thread.run_sync(self.storage.open_blob, name, parsed)  # 404 unless linked here
        os.close(fd)
        grant = self.token_service.authority.issue_peer_grant(_caller(request).principal, name, str(parsed), node)
        return _json(200, {"grant": grant, "expires_in": int(PEER_GRANT_SECONDS),
                           "jwks": "/token/keys"})

    async def get_chunks(self, request: Request, name: str, digest: str) -> Response:
        parsed = Digest.parse(digest)
        # ?size=N: chunks of exactly N bytes. ?largest=N: the size every p2pd node computes
        # from the blob's size (chunk_size_for), at most N, so small blobs come in enough
        # chunks to pipeline. Neither: the configured size.
        size_text, largest_text = request.query_one("size"), request.query_one("largest")
        if size_text is not None:
            chunk_size = _byte_count(size_text, "size")
            encoded = await trio.to_thread.run_sync(self.storage.chunk_map, name, parsed, chunk_size)
        elif largest_text is not None:
            largest = validate_chunk_size(_byte_count(largest_text, "largest"))
            encoded = await trio.to_thread.run_sync(self._adaptive_chunk_map, name, parsed, largest)
        else:
            encoded = await trio.to_thread.run_sync(self.storage.chunk_map, name, parsed,
                                                    self.config.storage.chunk_size)
        return Response(200, [("Content-Type", CHUNK_MAP_MEDIA_TYPE), ("Docker-Content-Digest", str(parsed))],
                        encoded)

    def _adaptive_chunk_map(self, name: str, digest: Digest, largest: int) -> bytes:
        size = self.storage.repository_blob_size(name, digest)
        if size is None:
            raise OCIError("BLOB_UNKNOWN", "blob unknown to registry", detail={"digest": str(digest)})
        return self.storage.chunk_map(name, digest, chunk_size_for(size, largest))

    # ---- discovery --------------------------------------------------------------------

    def _page(self, request: Request, items: list[str], base_path: str) -> tuple[list[str], list[tuple[str, str]]]:
        limit = self.config.registry.max_page_size
        n_text, last = request.query_one("n"), request.query_one("last")
        if n_text is not None:
            # ASCII only: str.isdigit() also accepts "²", which int() rejects.
            if not (n_text.isascii() and n_text.isdigit()):
                raise OCIError("PAGINATION_NUMBER_INVALID", "n must be a non-negative integer",
                               detail={"n": n_text[:20]})
            # A huge n gets the cap, not an error (CVE-2023-2253); one longer than any cap is
            # not even converted.
            significant = n_text.lstrip("0")
            if len(significant) <= 18:
                limit = min(int(significant or "0"), limit)
        if last:
            items = [item for item in items if item > last]
        page = items[:limit]
        headers: list[tuple[str, str]] = []
        if limit and len(items) > limit:
            query = urllib.parse.urlencode({"n": limit, "last": page[-1]})
            headers.append(("Link", f'<{base_path}?{query}>; rel="next"'))
        return page, headers

    async def list_tags(self, request: Request, name: str) -> Response:
        tags = self.storage.list_tags(name)
        page, headers = self._page(request, tags, f"/v2/{name}/tags/list")
        return _json(200, {"name": name, "tags": page}, headers)

    async def list_catalog(self, request: Request) -> Response:
        repositories = await trio.to_thread.run_sync(self.storage.list_repositories)
        repositories = self.gate.visible(_caller(request), repositories)
        page, headers = self._page(request, repositories, "/v2/_catalog")
        return _json(200, {"repositories": page}, headers)

    async def get_referrers(self, request: Request, name: str, digest: str) -> Response:
        subject = Digest.parse(digest)
        artifact_type = request.query_one("artifactType")
        body = referrers_index(self.storage.referrers(name, subject), artifact_type)
        headers = [("Content-Type", mediatypes.OCI_INDEX)]
        if artifact_type is not None:
            headers.append(("OCI-Filters-Applied", "artifactType"))
        return Response(200, headers, body)

    # ---- push -------------------------------------------------------------------------

    def _tag_digest(self, name: str, tag: str) -> str | None:
        """The digest a tag points at now, or None (for the audit log's old → new)."""
        try:
            return str(self.storage.resolve(name, tag))
        except OCIError:
            return None

    def _upload_lock(self, upload_id: str) -> trio.Lock:
        return self._upload_locks.setdefault(upload_id, trio.Lock())

    async def _receive_into(self, request: Request, session: UploadSession) -> int:
        """Streams the request body onto the end of the upload; returns the new size.

        If the disk fills up, the session is cut back to where this request started (the last
        offset the client was told about), so the space is given back at once instead of
        keeping the disk full, and every later push failing, until the stale-upload purge.
        """
        acknowledged = size = session.size()
        buffer = bytearray()
        append = partial(self.uploads.append_upload, session, max_size=self.config.storage.max_blob_size)
        try:
            async for piece in request.body:
                buffer += piece
                self.metrics.bytes_received.inc(len(piece))
                if len(buffer) >= _WRITE_BUFFER:
                    size = await trio.to_thread.run_sync(append, bytes(buffer))
                    buffer.clear()
            if buffer:
                size = await trio.to_thread.run_sync(append, bytes(buffer))
        except OSError as exc:
            if is_disk_full(exc):
                await trio.to_thread.run_sync(self.uploads.truncate_upload, session, acknowledged)
            raise
        return size

    def _check_content_range(self, request: Request, session: UploadSession) -> None:
        header = request.headers.get("content-range")
        if header is None:
            return
        match = _CONTENT_RANGE_RE.fullmatch(header.strip())
        current = session.size()
        if match is None:
            raise OCIError("BLOB_UPLOAD_INVALID", "malformed Content-Range", detail={"range": header[:100]})
        start, end = int(match.group(1)), int(match.group(2))
        if start != current or end < start:
            raise OCIError("RANGE_INVALID", "chunk out of order", status=416,
                           headers=[("Location", self._upload_location(session)),
                                    ("Range", _range_header(current)),
                                    ("Docker-Upload-UUID", session.id)],
                           detail={"expected_start": current})
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != end - start + 1:
            raise OCIError("BLOB_UPLOAD_INVALID", "Content-Range does not match Content-Length")

    @staticmethod
    def _upload_location(session: UploadSession) -> str:
        return f"/v2/{session.name}/blobs/uploads/{session.id}"

    def _upload_status(self, status: int, session: UploadSession, size: int) -> Response:
        return Response(status, [("Location", self._upload_location(session)), ("Range", _range_header(size)),
                                 ("Docker-Upload-UUID", session.id)])

    def _blob_created(self, name: str, digest: Digest) -> Response:
        return Response(201, [("Location", f"/v2/{name}/blobs/{digest}"), ("Docker-Content-Digest", str(digest))])

    async def start_upload(self, request: Request, name: str, upload: str) -> Response:
        if upload:
            raise _method_not_allowed("GET, PATCH, PUT, DELETE")
        mount, source = request.query_one("mount"), request.query_one("from")
        if mount is not None:
            digest = Digest.parse(mount)
            mounted: bool = source is not None and await trio.to_thread.run_sync(
                self.storage.mount_blob, name, digest, source)
            if mounted:
                return self._blob_created(name, digest)
        session = await trio.to_thread.run_sync(self.uploads.create_upload, name)
        self.metrics.uploads_in_progress.inc()
        digest_text = request.query_one("digest")
        if digest_text is None:
            return self._upload_status(202, session, 0)
        # Single-request upload: the body is the whole blob.
        return await self._finish_upload(request, session, digest_text)

    async def patch_upload(self, request: Request, name: str, upload: str) -> Response:
        session = self.uploads.get_upload(name, upload)
        async with self._upload_lock(session.id):
            self._check_content_range(request, session)
            size = await self._receive_into(request, session)
        return self._upload_status(202, session, size)

    async def put_upload(self, request: Request, name: str, upload: str) -> Response:
        session = self.uploads.get_upload(name, upload)
        digest_text = request.query_one("digest")
        if digest_text is None:
            raise OCIError("DIGEST_INVALID", "digest query parameter is required to finish an upload")
        async with self._upload_lock(session.id):
            return await self._finish_upload(request, session, digest_text)

    async def _finish_upload(self, request: Request, session: UploadSession, digest_text: str) -> Response:
        try:
            digest = Digest.parse(digest_text)
            self._check_content_range(request, session)
            await self._receive_into(request, session)
            await trio.to_thread.run_sync(self.uploads.commit_upload, session, digest)
        except OCIError as exc:
            if exc.code in ("DIGEST_INVALID", "SIZE_INVALID", "UNSUPPORTED"):
                await trio.to_thread.run_sync(self.uploads.cancel_upload, session)
                self._forget_upload(session)
            raise
        self._forget_upload(session)
        return self._blob_created(session.name, digest)

    def _forget_upload(self, session: UploadSession) -> None:
        self._upload_locks.pop(session.id, None)
        self.metrics.uploads_in_progress.set(sum(1 for _ in self.uploads.list_uploads()))

    async def upload_status(self, request: Request, name: str, upload: str) -> Response:
        session = self.uploads.get_upload(name, upload)
        return self._upload_status(204, session, session.size())

    async def cancel_upload(self, request: Request, name: str, upload: str) -> Response:
        session = self.uploads.get_upload(name, upload)
        async with self._upload_lock(session.id):
            await trio.to_thread.run_sync(self.uploads.cancel_upload, session)
        self._forget_upload(session)
        return Response(204)

    async def put_manifest(self, request: Request, name: str, reference: str) -> Response:
        validate_reference(reference)
        body = await request.body.read(MAX_MANIFEST_SIZE)
        self.metrics.bytes_received.inc(len(body))
        parsed = parse_manifest(body, request.headers.get("content-type"))
        tag = None
        if ":" in reference:
            if Digest.parse(reference) != parsed.digest:
                raise OCIError("DIGEST_INVALID", "manifest digest does not match the reference",
                               detail={"reference": reference, "actual": str(parsed.digest)})
        else:
            tag = reference
        old_digest = await trio.to_thread.run_sync(self._tag_digest, name, tag) if tag is not None else None
        await trio.to_thread.run_sync(self.storage.put_manifest, name, body, parsed, tag)
        fields: dict[str, Any] = {"repository": name, "digest": str(parsed.digest),
                                  "detail": {"media_type": parsed.media_type, "size": len(body)}}
        self._audit("manifest.push", {**_actor(request), **fields, "reference": tag})
        if tag is not None and old_digest != str(parsed.digest):
            self._audit("tag.move", {**_actor(request), "repository": name, "reference": tag,
                                     "old_digest": old_digest, "new_digest": str(parsed.digest)})
        await self._scan_pushed(name, parsed.digest, parsed.media_type, body)
        headers = [("Location", f"/v2/{name}/manifests/{parsed.digest}"),
                   ("Docker-Content-Digest", str(parsed.digest))]
        if parsed.subject is not None:
            headers.append(("OCI-Subject", str(parsed.subject.digest)))
        return Response(201, headers)

    # ---- scanning -----------------------------------------------------------------------

    async def _scan_pushed(self, name: str, digest: Digest, media_type: str, body: bytes) -> None:
        """Queues a pushed image (or index) for a background scan; never artifacts, such as the
        scanner's own SBOM and report referrers."""
        scanner = self.scanner
        if scanner is None or not self.config.scanning.scan.scan_on_push or not _scannable(media_type, body):
            return
        state = scanner.state(digest)
        if state in ("pending", "scanning"):
            return
        if state == "scanned":
            report = await scanner.report(digest)
            if report is not None and report.repository == name:
                return  # the same content under another tag: its report stands
        scanner.enqueue(name, digest)

    def _require_scanner(self) -> ScanService:
        if self.scanner is None:
            raise OCIError("NOT_FOUND", "scanning is disabled on this registry ([scan] enabled = false)")
        return self.scanner

    async def get_scan(self, request: Request, name: str, reference: str) -> Response:
        """The scan report of a manifest of ``name`` (by tag or digest).

        200: the report (``P2PD-Scan-State`` says whether a newer scan is pending or running);
        202: no report yet, a scan is pending or running; 404: the manifest is unknown, or it
        was never scanned.
        """
        scanner = self._require_scanner()
        validate_reference(reference)
        digest = self.storage.stat_manifest(name, reference).digest
        body = await scanner.report_bytes(digest)
        state = scanner.state(digest)
        if body is not None:
            return Response(200, [("Content-Type", "application/json"), ("Docker-Content-Digest", str(digest)),
                                  (_SCAN_STATE_HEADER, state)], body)
        if state in ("pending", "scanning"):
            return _json(202, {"repository": name, "digest": str(digest), "state": state},
                         [(_SCAN_STATE_HEADER, state)])
        raise OCIError("NOT_FOUND", "this manifest has not been scanned (POST to this URL to scan it)",
                       detail={"digest": str(digest), "state": state})

    async def request_scan(self, request: Request, name: str, reference: str) -> Response:
        """Queues a (re)scan of a manifest of ``name``; 202 with the state to poll with GET."""
        scanner = self._require_scanner()
        validate_reference(reference)
        stored, body = self.storage.get_manifest(name, reference)
        if not _scannable(stored.media_type, body):
            raise OCIError("UNSUPPORTED", "not a container image (an artifact): nothing to scan", status=400,
                           detail={"digest": str(stored.digest)})
        if not scanner.enqueue(name, stored.digest):
            raise OCIError("TOOMANYREQUESTS", "the scan queue is full", headers=[("Retry-After", "60")])
        state = scanner.state(stored.digest)
        return _json(202, {"repository": name, "digest": str(stored.digest), "state": state},
                     [("Location", f"/v2/{name}/scan/{stored.digest}"), (_SCAN_STATE_HEADER, state)])

    async def scan_completed(self, report: ScanReport) -> None:
        """The scanner's ``on_complete``: record ``scan.completed`` and tell the
        ``on_scan_completed`` subscribers.

        The scan process has already stored the SBOM and the report as OCI 1.1 referrers of the
        image (``ScanService(attach=True)``), except for an incomplete scan (a layer could not
        be read): an SBOM is a claim about everything in the image, and that one would be
        missing packages. Its report is served by the scan API, and ``[[scanning]] incomplete``
        decides its pulls.
        """
        counts = {severity: count for severity, count in report.severity_counts().items() if count}
        advisories = sorted({finding.id for _platform, finding in report.findings})
        self._audit("scan.completed", {"actor": "", "actor_kind": "system", "repository": report.repository,
                                       "digest": report.digest,
                                       "detail": {"status": report.status, "summary": counts,
                                                  "advisories": advisories[:100],
                                                  "database": (report.database or {}).get("import_id", ""),
                                                  "problems": len(report.problems)}})
        for subscriber in list(self.on_scan_completed):
            try:
                subscriber(report)
            except Exception:  # one broken subscriber must not silence the others
                log.exception("scan completion subscriber %r failed", subscriber)

    # ---- signatures (seed.signatures.api) ------------------------------------------------

    async def get_signatures(self, request: Request, name: str, digest: str) -> Response:
        return await signatures_api.get_signatures(self.signatures, request, name, digest)

    async def put_signature(self, request: Request, name: str, digest: str) -> Response:
        return await signatures_api.put_signature(self.signatures, request, name, digest, _actor(request))

    async def delete_signatures(self, request: Request, name: str, digest: str) -> Response:
        self._check_delete_enabled()
        return await signatures_api.delete_signatures(self.signatures, request, name, digest, _actor(request))

    async def get_verdict(self, request: Request, name: str, reference: str) -> Response:
        return await signatures_api.get_verdict(self.signatures, request, name, reference, _actor(request))

    # ---- delete -----------------------------------------------------------------------

    def _check_delete_enabled(self) -> None:
        if not self.config.registry.delete_enabled:
            raise OCIError("UNSUPPORTED", "deletes are disabled on this registry", status=405)

    async def delete_manifest(self, request: Request, name: str, reference: str) -> Response:
        self._check_delete_enabled()
        validate_reference(reference)
        if ":" in reference:
            await trio.to_thread.run_sync(self.storage.delete_manifest, name, Digest.parse(reference))
            self._audit("manifest.delete", {**_actor(request), "repository": name, "digest": reference})
        else:
            old_digest = await trio.to_thread.run_sync(self._tag_digest, name, reference)
            await trio.to_thread.run_sync(self.storage.delete_tag, name, reference)
            self._audit("tag.delete", {**_actor(request), "repository": name, "reference": reference,
                                       "old_digest": old_digest})
        return Response(202)

    async def delete_blob(self, request: Request, name: str, digest: str) -> Response:
        self._check_delete_enabled()
        await trio.to_thread.run_sync(self.storage.delete_blob, name, Digest.parse(digest))
        self._audit("blob.delete", {**_actor(request), "repository": name, "digest": digest})
        return Response(202)

    async def purge_stale_uploads(self) -> int:
        purged = await trio.to_thread.run_sync(self.uploads.purge_uploads, self.config.storage.upload_max_age)
        if purged:
            log.info("purged %d stale upload sessions", purged)
            self.metrics.uploads_purged.inc(purged)
        self.metrics.uploads_in_progress.set(sum(1 for _ in self.uploads.list_uploads()))
        return purged

    _handlers: dict[tuple[str, str], Callable[..., Awaitable[Response]]] = {
        ("catalog", "GET"): list_catalog,
        ("chunks", "GET"): get_chunks,
        ("grant", "GET"): get_grant,
        ("upload", "POST"): start_upload,
        ("upload", "PATCH"): patch_upload,
        ("upload", "PUT"): put_upload,
        ("upload", "GET"): upload_status,
        ("upload", "DELETE"): cancel_upload,
        ("blob", "GET"): get_blob,
        ("blob", "DELETE"): delete_blob,
        ("manifest", "GET"): get_manifest,
        ("manifest", "PUT"): put_manifest,
        ("manifest", "DELETE"): delete_manifest,
        ("tags", "GET"): list_tags,
        ("referrers", "GET"): get_referrers,
        ("scan", "GET"): get_scan,
        ("scan", "POST"): request_scan,
        ("signatures", "GET"): get_signatures,
        ("signatures", "PUT"): put_signature,
        ("signatures", "DELETE"): delete_signatures,
        ("verdict", "GET"): get_verdict,
    }


def build_gate(config: SeedConfig, audit: AuditHook) -> tuple[Gate, TokenService | None]:
    """The access policy, identity stack and token service of a configuration."""
    policy = AccessPolicy(config.access, open_mode=not config.auth.enforced)
    scheme = "https" if getattr(config, "tls", None) is not None else "http"
    if not config.auth.enforced:
        log.warning("no access control: anyone who can reach %s:%d can push, overwrite tags and delete "
                     "(configure [auth] and [[access]]; see docs/configuration.md)",
                     config.server.host, config.server.port)
        return Gate(policy, None, service=config.auth.service, realm=None, scheme=scheme, audit=audit), None
    stack = build_identity(config.auth, config.storage.data, audit)
    gate = Gate(policy, stack.authenticator, service=config.auth.service, realm=config.auth.realm, scheme=scheme,
                audit=audit)
    return gate, TokenService(stack.authenticator, stack.authority, lambda: gate.policy, audit)


def _scannable(media_type: str, body: bytes) -> bool:
    """Whether a manifest is an image, or an index of them, rather than an artifact (an SBOM,
    a signature, a Helm chart, the scanner's own results)."""
    try:
        document = json.loads(body)
    except ValueError:
        return False
    if media_type in mediatypes.INDEX_TYPES:
        return isinstance(document, dict) and not document.get("artifactType")
    return is_container_image(document)


def _caller(request: Request) -> Caller:
    identity = request.identity
    return identity if isinstance(identity, Caller) else open_caller(request)


def _actor(request: Request) -> dict[str, Any]:
    """The audit fields that say who did it."""
    principal = _caller(request).principal
    return {"actor": principal.name, "actor_kind": principal.kind, "provider": principal.provider,
            "source": request.client[0] if request.client else "-"}


def _json(status: int, document: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, [("Content-Type", "application/json"), *(headers or [])],
                    json.dumps(document, separators=(",", ":")).encode())


async def _purge_periodically(registry: SeedRegistry, interval: float) -> None:
    while True:
        await registry.purge_stale_uploads()
        await trio.sleep(interval)


async def serve_seed(
    config: SeedConfig,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[ServerInfo, SeedRegistry]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Runs a seed registry until cancelled or until ``shutdown`` is set.

    ``task_status.started`` receives the bound address and the registry (for tests and
    the CLI's readiness notification).
    """
    storage = await trio.to_thread.run_sync(
        partial(Storage, config.storage.data, chunk_size=config.storage.chunk_size))
    metrics = SeedMetrics()
    tls = None
    if config.tls is not None:
        assert config.tls.cert_file is not None and config.tls.key_file is not None
        tls = await trio.to_thread.run_sync(TlsContextProvider, TlsFiles(
            config.tls.cert_file, config.tls.key_file, config.tls.client_ca_file))
    audit = await trio.to_thread.run_sync(open_audit, config, metrics)
    webhooks: Dispatcher | None = None
    try:
        webhooks = await trio.to_thread.run_sync(open_webhooks, config, metrics)
        hook = webhooks.tee(audit)  # every audit event also goes to the webhooks that want it
        gate, token_service = await trio.to_thread.run_sync(build_gate, config, hook)
        registry = SeedRegistry(config, storage, metrics, gate, token_service, hook)
        registry.tls = tls
        registry.webhooks = webhooks
        if config.scanning.scan.enabled:
            registry.scanner = ScanService(storage, config.storage.data, config.scanning.scan,
                                           registry=metrics.registry, on_complete=registry.scan_completed,
                                           attach=True)
        async with trio.open_nursery() as nursery:
            # The audit writer first: it fsyncs in a worker thread, and on cancellation it
            # writes what is still queued before it returns.
            await nursery.start(audit.serve)
            await nursery.start(webhooks.serve)  # likewise stores what is queued when cancelled
            if registry.scanner is not None:
                await nursery.start(registry.scanner.serve)  # after the audit writer: scans record events

            async def run_server(*, task_status: trio.TaskStatus[ServerInfo]) -> None:
                # Every answer waits until the webhook events of its request are on disk.
                await serve_http(webhooks.durable(registry.handle), config.server.host, config.server.port,
                                 limits=config.server.limits, observer=registry.observe,
                                 shutdown=shutdown, tls=tls.context if tls is not None else None,
                                 congestion_control=config.server.congestion_control, task_status=task_status)
                nursery.cancel_scope.cancel()  # graceful shutdown finished: stop the purge loop too

            nursery.start_soon(_purge_periodically, registry, config.storage.purge_interval)
            info = await nursery.start(run_server)
            task_status.started((info, registry))
    finally:
        if webhooks is not None:
            webhooks.close()
        audit.close()
