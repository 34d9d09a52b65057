"""The containerd-facing registry front: a read-only OCI mirror.

containerd (via hosts.toml) sends ``HEAD/GET /v2/<name>/manifests/<ref>?ns=<registry>`` and
``GET /v2/<name>/blobs/<digest>?ns=<registry>``; podman and CRI-O (via registries.conf) send no
``ns=`` and name the registry in the path instead, ``/v2/p2pd-ns/<registry>/<name>/...``
(``p2pd.mirror_prefix``). Local content is served straight from the
store; a miss joins (or starts) the single-flight download and streams as bytes are
released. Whatever cannot be served quickly is answered 404 so containerd falls back to
the next host; a stream that stops making progress is cut so containerd resumes with Range.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack

import trio
from prometheus_client import Counter

from p2pd.httpd import FileBody, Request, Response
from p2pd.oci import mediatypes
from p2pd.oci.digest import Digest, digest_of
from p2pd.oci.errors import OCIError
from p2pd.oci.grammar import validate_name, validate_reference
from p2pd.oci.manifest import MAX_MANIFEST_SIZE, parse_manifest
from p2pd.oci.ranges import parse_range

from .config import AgentConfig
from .errors import P2PDError, UpstreamAuthError, UpstreamError, UpstreamNotFound, VerificationError
from .fetcher import Download, Fetcher, stream_download
from .gate import AccessGate
from .metrics import AgentMetrics
from .mirror_prefix import PREFIX_MARKER, split_prefixed_name
from .signatures import NodeSignatures
from .signing.extension import SUPPORTS_SIGNATURES_HEADER
from .store import BlobStore, TagRecord
from .swarm.node import SwarmNode
from .upstream import UpstreamPool

__all__ = ["MirrorFront"]

log = logging.getLogger("p2pd.registry")

_API_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
_MANIFEST_RE = re.compile(r"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)")
_BLOB_RE = re.compile(r"/v2/(?P<name>.+)/blobs/(?P<digest>[^/]+)")
_SIGNATURES_RE = re.compile(r"/extensions/v2/(?P<name>.+)/signatures/(?P<digest>[^/]+)")
_READ_METHODS = ("GET", "HEAD")


def _namespace(request: Request, upstreams: UpstreamPool) -> str | None:
    """containerd's ``ns=`` in normal form, checked before anything is read or fetched for it:
    a namespace this agent does not serve is a fast 404, so containerd falls back."""
    return upstreams.check_namespace(request.query_one("ns"))


def _route(request: Request, upstreams: UpstreamPool, name: str) -> tuple[str | None, str]:
    """The namespace (normal form) and the repository of a manifest or blob request.

    containerd names the registry with ``ns=``, podman and CRI-O with a path prefix; either way
    the namespace is checked before anything is read or fetched for it, and the gate, the store
    and the upstream see the repository without the prefix.
    """
    prefixed = split_prefixed_name(name)
    if prefixed is None:
        validate_name(name)
        return _namespace(request, upstreams), name
    namespace, repository = prefixed
    validate_name(repository)
    if request.query_one("ns") is not None:
        # Nobody sends both; two names for the upstream could disagree, so neither is guessed.
        raise OCIError("NAME_INVALID", f"name the registry with ns= or with the {PREFIX_MARKER}/ path, not both")
    return upstreams.check_namespace(namespace), repository


_PEERS_ASKED_FOR_MANIFESTS = 3
_SIZE_HINTS = 16_384  # (repository, blob) sizes remembered from the manifests served


def _declared_media_type(body: bytes) -> str:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    declared = document.get("mediaType") if isinstance(document, dict) else None
    if isinstance(declared, str) and declared in mediatypes.MANIFEST_TYPES:
        return declared
    is_index = isinstance(document, dict) and "manifests" in document
    return mediatypes.OCI_INDEX if is_index else mediatypes.OCI_MANIFEST


def _samples(counter: Counter) -> list[tuple[dict[str, str], float]]:
    return [(sample.labels, sample.value) for metric in counter.collect() for sample in metric.samples
            if sample.name.endswith("_total")]


def _total(counter: Counter) -> float:
    return sum(value for _labels, value in _samples(counter))


def _not_found(code: str, message: str, **detail: str) -> OCIError:
    return OCIError(code, message, status=404, detail=detail or None)


class MirrorFront:
    """Request handler of the agent's containerd-facing endpoint.

    Every manifest and blob request passes ``AccessGate.authorize`` (may this client pull the
    repository?) and, for a digest, ``require_link`` (does the repository reference it?) before
    the store, the fetcher, the peers or the upstream does anything for it (docs/security.md).
    """

    def __init__(self, config: AgentConfig, store: BlobStore, fetcher: Fetcher, upstreams: UpstreamPool,
                 metrics: AgentMetrics, access: AccessGate | None = None,
                 signatures: NodeSignatures | None = None) -> None:
        self.config = config
        self.store = store
        self.fetcher = fetcher
        self.upstreams = upstreams
        self.metrics = metrics
        self.access = access if access is not None else AccessGate(config, upstreams, metrics)
        self.signatures = signatures if signatures is not None else NodeSignatures(config, upstreams, metrics)
        self.ready = False
        self.swarm_node: SwarmNode | None = None  # set by the daemon when the swarm is on
        # The sizes the manifests served here give their blobs, per repository: a blob whose
        # download cannot say its size within first_byte_timeout is answered with this one
        # instead of a 404 (see _blob).
        self._size_hints: OrderedDict[tuple[str, str, Digest], int] = OrderedDict()

    async def handle(self, request: Request) -> Response:
        path = request.path
        if path == "/healthz":
            request.route = "healthz"
            return Response(200, [("Content-Type", "text/plain")], b"ok\n")
        if path == "/readyz":
            request.route = "readyz"
            return Response(200 if self.ready else 503, [("Content-Type", "text/plain")],
                            b"ready\n" if self.ready else b"starting\n")
        if path == "/debug/status":
            request.route = "status"
            return Response(200, [("Content-Type", "application/json")], json.dumps(self.status()).encode())
        if path == "/metrics":
            request.route = "metrics"
            self.metrics.cache_bytes.set(self.store.total_bytes)
            return Response(200, [("Content-Type", "text/plain; version=0.0.4")], self.metrics.render())
        if match := _SIGNATURES_RE.fullmatch(path):
            request.route = "signatures"
            namespace, name = _route(request, self.upstreams, match["name"])
            return await self._signatures(request, namespace, name, Digest.parse(match["digest"]))
        if not (path == "/v2" or path.startswith("/v2/")):
            raise OCIError("NOT_FOUND", "not found")
        try:
            response = await self._dispatch(request)
        except OCIError as exc:
            if request.route == "base":  # containers/image reads the extension's header from a 401 ping too
                exc.headers.append(SUPPORTS_SIGNATURES_HEADER)
            raise
        response.headers.append(_API_HEADER)
        return response

    async def _dispatch(self, request: Request) -> Response:
        if request.method not in _READ_METHODS:
            # A read-only mirror: pushes go to the registry itself.
            request.route = "write"
            raise OCIError("UNSUPPORTED", "this mirror is read-only", status=405, headers=[("Allow", "GET, HEAD")])
        path = request.path
        if path in ("/v2", "/v2/"):
            request.route = "base"
            try:
                namespace = _namespace(request, self.upstreams)
            except OCIError:
                namespace = None  # the ping names no content: an odd ns is judged where content is asked
            else:
                await self.access.authorize_base(request, namespace)
            return Response(200, [("Content-Type", "application/json"), SUPPORTS_SIGNATURES_HEADER], b"{}")
        if match := _MANIFEST_RE.fullmatch(path):
            request.route = "manifest"
            namespace, name = _route(request, self.upstreams, match["name"])
            validate_reference(match["reference"])
            return await self._manifest(request, namespace, name, match["reference"])
        if match := _BLOB_RE.fullmatch(path):
            request.route = "blob"
            namespace, name = _route(request, self.upstreams, match["name"])
            return await self._blob(request, namespace, name, Digest.parse(match["digest"]))
        request.route = "other"
        raise _not_found("NOT_FOUND", "this mirror serves manifests and blobs only")

    def status(self) -> dict[str, object]:
        """What ``p2pd status`` prints (p2pd/status_view.py): peers, transfers in flight, bytes by
        source, cache use and limit."""
        by_source = {labels["source"]: value for labels, value in _samples(self.metrics.fetched_bytes)}
        result: dict[str, object] = {
            "ready": self.ready,
            "cache_bytes": self.store.total_bytes,
            "cache_max_bytes": self.store.max_bytes,
            "cache_blobs": self.store.blob_count,
            "fetched_bytes": by_source,
            "served_bytes": _total(self.metrics.served_bytes),
            "downloads": [{"digest": str(d.digest), "size": d.size, "written": d.written, "released": d.released}
                          for d in self.fetcher.in_flight.values()],
        }
        node = self.swarm_node
        if node is not None:
            now = time.monotonic()
            result["node"] = {"id": node.me.node_id, "address": node.me.address, "site": node.me.site}
            result["peers"] = [{"id": member.node_id, "address": member.address, "site": member.site,
                                "sources": sources, "failures": failures,
                                "suspended": suspended > now, "banned": banned > now}
                               for member, sources, failures, suspended, banned in node.membership.known()]
            result["transfers"] = [{"digest": str(t.digest), "size": t.size, "chunks": t.count,
                                    "have": t.have.cardinality(), "leased": t.leased, "lessee": t.lessee,
                                    "peer_bytes": dict(t.peer_bytes), "upstream_bytes": t.upstream_bytes}
                                   for t in node.swarm.transfers.values()]
            result["peer_served_bytes"] = _total(self.metrics.peer_served_bytes)
        return result

    # ---- manifests --------------------------------------------------------------------

    async def _manifest(self, request: Request, namespace: str | None, name: str, reference: str) -> Response:
        access = await self.access.authorize(request, namespace, name, manifest=True)
        media_type: str | None = None
        if ":" in reference:
            digest = Digest.parse(reference)
            if not self.access.is_linked(access, digest) and self.store.size(digest) is not None:
                # Cached, perhaps for another repository: served only if this one references it.
                await self.access.require_link(request, access, digest, manifest=True)
        else:
            record = await self._resolve_tag(namespace, name, reference)
            digest, media_type = record.digest, record.media_type
            self.access.learn_link(access, digest)
            # Whichever way the digest or its bytes arrive (cache, peer, upstream), a tag under a
            # [[signatures]] rule is answered only for a signed digest.
            await self.signatures.check_pull(namespace, name, reference, digest)
        # Unlinked means not cached when checked above: fetched under this repository instead,
        # never read from the store (another request may have stored it since).
        linked = self.access.is_linked(access, digest)
        body = await trio.to_thread.run_sync(self.store.read_small, digest, MAX_MANIFEST_SIZE) if linked else None
        if body is not None:
            self.metrics.cache_hits.labels("manifest").inc()
            media_type = self.store.media_type(digest) or media_type
        else:
            self.metrics.cache_misses.labels("manifest").inc()
            body, media_type = await self._fetch_manifest(namespace, name, digest, peers=linked)
        self.access.learn_manifest(access, digest, body)
        self._learn_sizes(namespace, name, body)
        headers = [("Content-Type", media_type or "application/vnd.oci.image.manifest.v1+json"),
                   ("Docker-Content-Digest", str(digest)), ("ETag", f'"{digest}"')]
        return Response(200, headers, body)

    def _learn_sizes(self, namespace: str | None, name: str, body: bytes) -> None:
        try:
            parsed = parse_manifest(body, None)
        except OCIError:
            return
        if parsed.is_index:
            return  # its references are manifests, fetched whole
        for reference in parsed.references:
            key = (namespace or "", name, reference.digest)
            self._size_hints[key] = reference.size
            self._size_hints.move_to_end(key)
        while len(self._size_hints) > _SIZE_HINTS:
            self._size_hints.popitem(last=False)

    async def _resolve_tag(self, namespace: str | None, name: str, tag: str) -> TagRecord:
        """The tag's digest: cached within its TTL, else asked upstream, else stale-if-error."""
        namespace_key = namespace or ""
        record = self.store.load_tag(namespace_key, name, tag)
        now = time.time()
        if record is not None and now - record.checked < self.config.cache.tag_ttl:
            self.metrics.cache_hits.labels("tag").inc()
            return record
        self.metrics.cache_misses.labels("tag").inc()
        try:
            upstream, remote_repository = self.upstreams.resolve(namespace, name)
            with trio.fail_after(self.config.fetch.manifest_timeout):
                result = await upstream.head_manifest(remote_repository, tag)
        except UpstreamNotFound:
            self.store.forget_tag(namespace_key, name, tag)
            raise _not_found("MANIFEST_UNKNOWN", "manifest unknown upstream", tag=tag) from None
        except UpstreamAuthError as exc:
            # A refusal is an answer, not an outage: never the last known digest (stale-if-error
            # would turn the seed's 403, e.g. its [[scanning]] pull policy, into a pull). 404
            # sends containerd on to the next host, the seed, which tells it why (docs/operations.md).
            self.store.forget_tag(namespace_key, name, tag)
            raise _not_found("MANIFEST_UNKNOWN", "the upstream refused this tag", tag=tag) from exc
        except (UpstreamError, trio.TooSlowError) as exc:
            if record is not None and now - record.checked < self.config.cache.tag_stale_max:
                self.metrics.stale_tags.inc()
                log.warning("upstream failed for %s:%s (%s); answering last known %s", name, tag,
                            exc or "timeout", record.digest)
                return record
            raise _not_found("MANIFEST_UNKNOWN", "upstream unavailable and tag not cached", tag=tag) from exc
        record = TagRecord(namespace_key, name, tag, result.digest, result.media_type, result.size, now)
        await trio.to_thread.run_sync(self.store.save_tag, record)
        if result.body is not None:
            await trio.to_thread.run_sync(self.store.put_bytes, result.digest, result.body, result.media_type)
        return record

    async def _fetch_manifest(self, namespace: str | None, name: str, digest: Digest,
                              *, peers: bool) -> tuple[bytes, str]:
        """The manifest from the upstream under ``name``; from peers (by digest) only when
        ``peers``: the repository is known to reference it."""
        try:
            upstream, remote_repository = self.upstreams.resolve(namespace, name)
            with trio.fail_after(self.config.fetch.manifest_timeout):
                result = await upstream.get_manifest(remote_repository, str(digest))
        except (UpstreamError, trio.TooSlowError) as exc:
            if isinstance(exc, VerificationError):
                self.metrics.verification_failures.labels("upstream").inc()
            from_peer = await self._manifest_from_peers(digest) if peers else None
            if from_peer is None:
                raise _not_found("MANIFEST_UNKNOWN", "manifest not available", digest=str(digest)) from exc
            return from_peer
        body = result.body
        if body is None or digest_of(body, digest.algorithm) != digest:
            self.metrics.verification_failures.labels("upstream").inc()
            raise _not_found("MANIFEST_UNKNOWN", "upstream manifest failed verification", digest=str(digest))
        await trio.to_thread.run_sync(self.store.put_bytes, digest, body, result.media_type)
        return body, result.media_type

    async def _manifest_from_peers(self, digest: Digest) -> tuple[bytes, str] | None:
        """A manifest by digest from a peer (verified), when the upstream cannot serve it."""
        node = self.swarm_node
        if node is None:
            return None
        for member in node.membership.live()[1:][:_PEERS_ASKED_FOR_MANIFESTS]:
            try:
                with trio.fail_after(self.config.fetch.manifest_timeout / _PEERS_ASKED_FOR_MANIFESTS):
                    body = await node.swarm.client.manifest(member.address, digest)
            except (P2PDError, trio.TooSlowError):
                continue
            if digest_of(body, digest.algorithm) != digest:
                self.metrics.verification_failures.labels("peer").inc()
                node.membership.ban(member.node_id, node.swarm.ban_seconds)
                continue
            media_type = _declared_media_type(body)
            await trio.to_thread.run_sync(self.store.put_bytes, digest, body, media_type)
            self.metrics.fetched_bytes.labels("peer").inc(len(body))
            return body, media_type
        return None

    # ---- the signature API extension (read-only) ---------------------------------------

    async def _signatures(self, request: Request, namespace: str | None, name: str, digest: Digest) -> Response:
        """``GET /extensions/v2/<name>/signatures/<digest>`` from the upstream, for a client that
        may pull ``name``: podman and CRI-O verify pulls made through the agent with it."""
        if request.method not in _READ_METHODS:
            raise OCIError("UNSUPPORTED", "this mirror is read-only; store signatures in the registry itself",
                           status=405, headers=[("Allow", "GET, HEAD")])
        await self.access.authorize(request, namespace, name, manifest=True)
        signatures = await self.signatures.list_signatures(namespace, name, digest)
        body = json.dumps({"signatures": [signature.to_json() for signature in signatures]},
                          separators=(",", ":")).encode()
        return Response(200, [("Content-Type", "application/json")], body)

    # ---- blobs ------------------------------------------------------------------------

    async def _blob(self, request: Request, namespace: str | None, name: str, digest: Digest) -> Response:
        access = await self.access.authorize(request, namespace, name, manifest=False)
        if not self.access.is_linked(access, digest) and (self.store.size(digest) is not None
                                                          or digest in self.fetcher.in_flight):
            # Cached or downloading, perhaps for another repository: only if this one references it.
            # A miss is fetched under this repository, and the upstream's answer is the check
            # (made before any peer is asked). No checkpoint between here and fetcher.start.
            await self.access.require_link(request, access, digest, manifest=False)
        headers = [("Content-Type", "application/octet-stream"), ("Docker-Content-Digest", str(digest)),
                   ("Accept-Ranges", "bytes"), ("ETag", f'"{digest}"')]
        local = self._open_local(digest)
        if local is not None:
            self.metrics.cache_hits.labels("blob").inc()
            fd, size, release = local
            try:
                byte_range = parse_range(request.headers.get("range"), size)
            except OCIError:
                release()
                raise
            if byte_range is None:
                return Response(200, headers, FileBody(fd, 0, size), on_close=release)
            headers.append(("Content-Range", byte_range.content_range(size)))
            return Response(206, headers, FileBody(fd, byte_range.start, byte_range.length), on_close=release)

        self.metrics.cache_misses.labels("blob").inc()
        if self.fetcher.failed_recently(digest) and digest not in self.fetcher.in_flight:
            # Let containerd fall back to the next host instead of retrying us.
            raise _not_found("BLOB_UNKNOWN", "the last download of this blob failed; try the next host",
                             digest=str(digest))
        download = self.fetcher.start(digest, namespace, name)
        if not self.access.is_linked(access, digest) and (download.namespace, download.repository) != (namespace, name):
            # Cannot happen (checked above, no checkpoint since), and must not: never join another
            # repository's download without a link.
            raise _not_found("BLOB_UNKNOWN", "not part of this repository", digest=str(digest))
        hint = self._size_hints.get((namespace or "", name, digest))
        try:
            with trio.fail_after(self.config.fetch.first_byte_timeout):
                size = await download.wait_size()
        except trio.TooSlowError:
            if hint is None or download.error is not None:
                raise _not_found("BLOB_UNKNOWN", "blob not available quickly; fetching in the background",
                                 digest=str(digest)) from None
            # The manifest served here gave its size. On a congested uplink the upstream's
            # answer (chunk map, HEAD) can take longer than first_byte_timeout, and a 404 then
            # sends the client to the registry for a copy of its own over that same uplink
            # (N = 32 on a 3 Mbit/s link: two clients did). The stream still ends if the
            # download fails, stalls, or turns out to have another size.
            size = hint
        except (P2PDError, OCIError) as exc:
            raise _not_found("BLOB_UNKNOWN", "blob not available", digest=str(digest)) from exc
        self.access.learn_link(access, digest)  # the upstream (or a linked download) vouched for it
        byte_range = parse_range(request.headers.get("range"), size)
        start, end = (0, size - 1) if byte_range is None else (byte_range.start, byte_range.end)
        if byte_range is not None:
            headers.append(("Content-Range", byte_range.content_range(size)))
        body = self._stream(download, start, end, size) if request.method == "GET" and size else b""
        return Response(200 if byte_range is None else 206, headers, body, content_length=end - start + 1)

    def _open_local(self, digest: Digest) -> tuple[int, int, Callable[[], None]] | None:
        if self.store.size(digest) is None:
            return None
        stack = ExitStack()
        stack.enter_context(self.store.reading(digest))
        try:
            fd, size = self.store.open_blob(digest)
        except KeyError:
            stack.close()
            return None
        return fd, size, stack.close

    async def _stream(self, download: Download, start: int, end: int, size: int) -> AsyncIterator[FileBody]:
        try:
            async for piece in stream_download(download, self.store, start, end, self.config.fetch.stall_timeout):
                if download.size is not None and download.size != size:
                    # Answered with the manifest's size before the download knew its own.
                    raise P2PDError(f"{download.digest} is {download.size} bytes, not {size} as its manifest says")
                yield piece
        except P2PDError:
            if download.error is None:
                self.metrics.stalled_streams.inc()
            raise
