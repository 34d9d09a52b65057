"""Fakes for tests, shipped with the product like ``trio.testing``.

``MemoryUpstream`` implements ``p2pd.upstream.Upstream`` over dictionaries, with knobs that
inject the failures a real registry produces (cut connections, corrupt bytes, outages,
stalls) and counters that let single-flight tests see how often the upstream was asked.
``tests/test_upstream_conformance.py`` runs the same checks against it and real registries.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import trio

from .errors import UpstreamError, UpstreamNotFound, UpstreamUnavailable
from .oci import mediatypes
from .oci.chunkmap import ChunkHasher, ChunkMap, chunk_size_for, validate_chunk_size
from .oci.digest import Digest, digest_of
from .oci.errors import OCIError
from .oci.grammar import validate_name, validate_reference
from .oci.manifest import Descriptor
from .signing.extension import ExtensionSignature
from .upstream import BlobResponse, ManifestResult

__all__ = ["MemoryBlobResponse", "MemoryUpstream"]


class MemoryBlobResponse:
    """The ``BlobResponse`` of ``MemoryUpstream.open_blob``."""

    def __init__(self, upstream: MemoryUpstream, data: bytes, offset: int, end: int | None = None) -> None:
        self.total_size = len(data)
        self.offset = offset
        self.range_ignored = False
        self._limit = len(data) if end is None else min(end + 1, len(data))
        self._upstream = upstream
        self._data = data

    async def aiter_bytes(self, on_dropped: Callable[[int], Awaitable[None]] | None = None) -> AsyncIterator[bytes]:
        # Range is always honoured here: nothing is dropped (``on_dropped`` is never called).
        upstream = self._upstream
        if upstream.stall_seconds:
            await trio.sleep(upstream.stall_seconds)
        sent = 0
        position = self.offset
        while position < self._limit:
            piece = self._data[position : min(position + upstream.piece_size, self._limit)]
            if upstream.truncate_blob_after is not None:
                piece = piece[: max(0, upstream.truncate_blob_after - sent)]
                if not piece:
                    raise UpstreamUnavailable("connection lost (injected by MemoryUpstream.truncate_blob_after)")
            if upstream.corrupt_blobs:
                piece = bytes([piece[0] ^ 0xFF]) + piece[1:]
            position += len(piece)
            sent += len(piece)
            upstream.bytes_sent += len(piece)
            yield piece
            await trio.lowlevel.checkpoint()


class MemoryUpstream:
    """An in-memory registry that implements ``Upstream``.

    Content is added with ``add_blob``, ``add_manifest`` and ``add_image``; chunk maps are
    computed from the blobs on request (``chunk_maps = False`` makes ``get_chunk_map``
    return None, like a registry without the endpoint; ``chunk_map_overrides`` serves a
    given map instead, e.g. a wrong one).

    Fault injection (change the attributes at any time):
        truncate_blob_after: each blob response sends at most this many bytes, then fails
            with ``UpstreamUnavailable`` as a broken connection would.
        corrupt_blobs: the first byte of every piece sent is flipped.
        unavailable: every call raises ``UpstreamUnavailable``.
        stall_seconds: manifests and chunk maps are answered, and blob bodies start,
            only after sleeping this long.

    Counters: ``manifest_requests`` (HEAD and GET), ``blob_requests`` (every
    ``open_blob``), ``chunk_map_requests`` and ``bytes_sent`` (blob bytes yielded).
    """

    def __init__(self, namespace: str = "memory.test") -> None:
        self.namespace = namespace
        self.piece_size = 64 * 1024
        self.chunk_maps = True
        self.chunk_map_overrides: dict[Digest, ChunkMap] = {}
        self.truncate_blob_after: int | None = None
        self.corrupt_blobs = False
        self.unavailable = False
        self.stall_seconds = 0.0
        self.manifest_requests = 0
        self.blob_requests = 0
        self.chunk_map_requests = 0
        self.bytes_sent = 0
        self.closed = False
        self._blobs: dict[tuple[str, Digest], bytes] = {}
        self._manifests: dict[tuple[str, Digest], tuple[bytes, str]] = {}
        self._tags: dict[tuple[str, str], Digest] = {}
        # What get_signatures and get_referrers answer; tests fill them directly.
        self.signatures: dict[tuple[str, Digest], list[ExtensionSignature]] = {}
        self.referrers: dict[tuple[str, Digest], list[Descriptor]] = {}

    # ---- content ------------------------------------------------------------------------

    def add_blob(self, repository: str, data: bytes) -> Digest:
        """Stores a blob in ``repository`` and returns its sha256 digest."""
        digest = digest_of(data)
        self._blobs[(validate_name(repository), digest)] = bytes(data)
        return digest

    def add_manifest(
        self, repository: str, body: bytes, *, media_type: str | None = None, tag: str | None = None
    ) -> Digest:
        """Stores a manifest's exact bytes (tagged if ``tag`` is given); returns its digest.

        The media type defaults to the body's ``mediaType`` field, else the OCI manifest type.
        """
        if media_type is None:
            document = json.loads(body)
            media_type = document.get("mediaType") or mediatypes.OCI_MANIFEST
        digest = digest_of(body)
        self._manifests[(validate_name(repository), digest)] = (bytes(body), str(media_type))
        if tag is not None:
            self.set_tag(repository, tag, digest)
        return digest

    def set_tag(self, repository: str, tag: str, digest: Digest) -> None:
        self._tags[(validate_name(repository), tag)] = digest

    def remove_tag(self, repository: str, tag: str) -> None:
        self._tags.pop((repository, tag), None)

    def add_image(self, repository: str, tag: str, layers: Sequence[bytes], config: bytes = b"{}") -> Digest:
        """Stores the blobs and an OCI image manifest for them; returns the manifest digest."""

        def descriptor(media_type: str, data: bytes) -> dict[str, object]:
            return {"mediaType": media_type, "digest": str(self.add_blob(repository, data)), "size": len(data)}

        manifest = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", layer) for layer in layers],
        }
        return self.add_manifest(repository, json.dumps(manifest).encode(), tag=tag)

    # ---- Upstream -----------------------------------------------------------------------

    async def _answer(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.closed:
            raise RuntimeError("MemoryUpstream used after aclose()")
        if self.unavailable:
            raise UpstreamUnavailable("upstream unavailable (injected by MemoryUpstream.unavailable)")
        if self.stall_seconds:
            await trio.sleep(self.stall_seconds)

    async def get_manifest(self, repository: str, reference: str) -> ManifestResult:
        self.manifest_requests += 1
        validate_name(repository)
        validate_reference(reference)
        await self._answer()
        if ":" in reference:
            digest: Digest | None = Digest.parse(reference)
        else:
            digest = self._tags.get((repository, reference))
        stored = self._manifests.get((repository, digest)) if digest is not None else None
        if digest is None or stored is None:
            raise UpstreamNotFound(f"manifest {repository}:{reference} unknown", status=404)
        body, media_type = stored
        return ManifestResult(digest, media_type, len(body), body)

    async def head_manifest(self, repository: str, reference: str) -> ManifestResult:
        result = await self.get_manifest(repository, reference)
        return ManifestResult(result.digest, result.media_type, result.size, None)

    async def blob_size(self, repository: str, digest: Digest) -> int:
        validate_name(repository)
        await trio.lowlevel.checkpoint()
        if self.unavailable:
            raise UpstreamUnavailable("upstream unavailable (injected by MemoryUpstream.unavailable)")
        data = self._blobs.get((repository, digest))
        if data is None:
            raise UpstreamNotFound(f"blob {repository}@{digest} unknown", status=404)
        return len(data)

    @contextlib.asynccontextmanager
    async def open_blob(self, repository: str, digest: Digest, offset: int = 0,
                        end: int | None = None) -> AsyncIterator[BlobResponse]:
        self.blob_requests += 1
        if offset < 0:
            raise ValueError("offset must not be negative")
        validate_name(repository)
        await trio.lowlevel.checkpoint()
        if self.unavailable:
            raise UpstreamUnavailable("upstream unavailable (injected by MemoryUpstream.unavailable)")
        data = self._blobs.get((repository, digest))
        if data is None:
            raise UpstreamNotFound(f"blob {repository}@{digest} unknown", status=404)
        if offset and offset >= len(data):
            raise UpstreamError(f"blob {repository}@{digest}: range from {offset} not satisfiable", status=416)
        yield MemoryBlobResponse(self, data, offset, end)

    async def get_chunk_map(self, repository: str, digest: Digest, largest: int) -> ChunkMap | None:
        self.chunk_map_requests += 1
        try:
            validate_chunk_size(largest)
        except OCIError as exc:
            raise ValueError(exc.message) from exc
        validate_name(repository)
        await self._answer()
        if not self.chunk_maps:
            return None
        data = self._blobs.get((repository, digest))
        if data is None:
            return None
        if digest in self.chunk_map_overrides:
            return self.chunk_map_overrides[digest]
        hasher = ChunkHasher(chunk_size_for(len(data), largest))
        hasher.update(data)
        return hasher.finish(digest)

    async def get_signatures(self, repository: str, digest: Digest) -> list[ExtensionSignature]:
        validate_name(repository)
        await self._answer()
        return list(self.signatures.get((repository, digest), ()))

    async def get_referrers(self, repository: str, digest: Digest, artifact_type: str) -> list[Descriptor]:
        validate_name(repository)
        await self._answer()
        return [d for d in self.referrers.get((repository, digest), ()) if d.artifact_type == artifact_type]

    async def get_peer_grant(self, repository: str, digest: Digest, node: str) -> tuple[str, bytes] | None:
        validate_name(repository)
        await self._answer()
        return None  # an in-memory registry issues no grants: its blobs are not protected

    async def aclose(self) -> None:
        self.closed = True
