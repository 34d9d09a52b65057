"""Single-flight blob downloads that clients stream from while they grow.

One ``Download`` exists per digest at a time: every request for a blob that is not in the
store joins it, and reads the partial file as the fetch task releases bytes.

Rules/invariants:
- Bytes are *released* to readers only once they can no longer turn out wrong: with a
  trusted chunk map (the seed's), each chunk is released after its sha256 matched; without
  one, everything but the last ``HOLDBACK`` bytes is released as it arrives and the tail
  only after the whole blob matched its digest. A client can therefore never receive a
  complete blob that fails verification; a failed download aborts its readers'
  connections; the retry that follows is answered 404 for ``fetch.failure_hold``
  seconds, so containerd moves on to its next host.
- Interrupted upstream transfers resume with Range from the last byte written; a partial
  file left by a restart is resumed after rehashing what it holds.
- A failure of the swarm path that is not the upstream's, the store's or a bad blob's is a
  defect of ours: logged with its traceback and counted, and the download goes on from the
  upstream alone from the bytes already released, so the client's stream is not cut.
- The in-flight table belongs to this module; entries are added synchronously by
  ``start`` (trio is single-threaded, so no two downloads of one digest can start) and
  removed by the download task when it ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from p2pd.httpd import FileBody
from p2pd.oci.chunkmap import ChunkMap
from p2pd.oci.digest import Digest

from .config import AgentConfig
from .errors import P2PDError, RemoteError, StoreError, UpstreamError, UpstreamNotFound, VerificationError
from .metrics import AgentMetrics
from .store import BlobStore
from .upstream import Upstream, UpstreamPool

if TYPE_CHECKING:
    from .swarm.engine import Swarm

__all__ = ["HOLDBACK", "Download", "Fetcher"]

log = logging.getLogger("p2pd.fetcher")

HOLDBACK = 1024 * 1024
_SEND_PIECE = 4 * 1024 * 1024
_READ_PIECE = 1024 * 1024
# Upstreams whose Range-ignoring is logged (once each); more are counted, not logged.
_MAX_RANGE_IGNORED_WARNINGS = 1024
# An upstream body read as it arrives costs one pass through httpx, httpcore, h11 and trio per
# read, and over a slow link a read returns one burst of packets: a node's CPU per MiB fetched at
# 4-8 Mbit/s was 7-13x what it is unpaced. A read that returns less than _GATHER_BYTES is followed
# by a pause until about that much could have come at the body's rate so far (at most
# _GATHER_PAUSE): the kernel collects the packets meanwhile, and the next read takes them at once.
_GATHER_BYTES = 64 * 1024
_GATHER_PAUSE = 0.1


@dataclass(eq=False)
class Download:
    """A blob being fetched; readers wait on it for released bytes."""

    digest: Digest
    namespace: str | None
    repository: str
    size: int | None = None
    written: int = 0
    released: int = 0
    complete: bool = False
    error: BaseException | None = None
    _changed: trio.Event = field(default_factory=trio.Event)
    # Readers (``stream_download``) waiting for bytes not released yet: reader → since when.
    _waiting: dict[object, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.complete or self.error is not None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _release(self, released: int) -> None:
        if released > self.released:
            self.released = released
        self._notify()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self._notify()

    async def wait_changed(self) -> None:
        """Returns at the next progress, release, completion or failure."""
        await self._changed.wait()

    def reader_wait(self) -> float:
        """Seconds the longest-waiting reader has gone without a byte (0: none waits)."""
        return time.monotonic() - min(self._waiting.values()) if self._waiting else 0.0

    async def wait_size(self) -> int:
        """The blob's size, once the first upstream response (or chunk map) says it.

        Raises:
            P2PDError (or the download's error): the download failed first.
        """
        while self.size is None:
            if self.error is not None:
                raise P2PDError(f"download of {self.digest} failed: {self.error}") from self.error
            await self.wait_changed()
        return self.size


class Fetcher:
    """Starts and tracks downloads; ``run`` must be running (``nursery.start(fetcher.run)``).

    Args:
        config: the agent configuration (fetch limits).
        store: where partial and complete blobs live.
        upstreams: maps containerd's ``ns`` to an upstream registry.
        metrics: counters for bytes by source, in-flight downloads, verification failures.
    """

    def __init__(self, config: AgentConfig, store: BlobStore, upstreams: UpstreamPool,
                 metrics: AgentMetrics) -> None:
        self.config = config
        self.store = store
        self.upstreams = upstreams
        self.metrics = metrics
        self.in_flight: dict[Digest, Download] = {}
        self._jobs: trio.MemorySendChannel[Download] | None = None
        # Set by the daemon when peer-to-peer distribution is on.
        self.swarm: Swarm | None = None
        self.recent_failures: dict[Digest, float] = {}  # digest → until when misses answer 404
        self._warned_range_ignored: set[str] = set()  # upstreams (namespace) said to ignore Range

    def failed_recently(self, digest: Digest) -> bool:
        """Whether a download of ``digest`` failed within ``fetch.failure_hold`` seconds."""
        until = self.recent_failures.get(digest)
        if until is None:
            return False
        if until <= time.monotonic():
            del self.recent_failures[digest]
            return False
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs download tasks until cancelled."""
        send, receive = trio.open_memory_channel[Download](math.inf)
        async with trio.open_nursery() as nursery, receive:
            self._jobs = send
            task_status.started()
            async for download in receive:
                nursery.start_soon(self._download, download)

    def start(self, digest: Digest, namespace: str | None, repository: str) -> Download:
        """The download of ``digest``: the one in flight, or a new one."""
        existing = self.in_flight.get(digest)
        if existing is not None:
            return existing
        if self._jobs is None:
            raise RuntimeError("Fetcher.run is not running")
        download = Download(digest, namespace, repository)
        self.in_flight[digest] = download
        self.metrics.inflight.set(len(self.in_flight))
        self._jobs.send_nowait(download)
        return download

    # ---- the download task ------------------------------------------------------------

    async def _download(self, download: Download) -> None:
        digest = download.digest
        try:
            await self._fetch_verified(download)
        except trio.Cancelled:
            download._fail(P2PDError("agent shutting down"))
            raise
        except Exception as exc:
            if isinstance(exc, VerificationError):
                self.metrics.verification_failures.labels("upstream").inc()
                log.warning("discarding %s: %s", digest, exc)
            elif not isinstance(exc, UpstreamNotFound):
                log.warning("download of %s failed: %s", digest, exc)
            # containerd retries the same host after a cut stream and moves on only after a
            # 404: remember the failure so that the retry is answered 404 at once.
            self.recent_failures[digest] = time.monotonic() + self.config.fetch.failure_hold
            download._fail(exc)
        finally:
            self.in_flight.pop(digest, None)
            self.metrics.inflight.set(len(self.in_flight))
            self.metrics.cache_bytes.set(self.store.total_bytes)

    async def _fetch_verified(self, download: Download) -> None:
        upstream, remote_repository = self.upstreams.resolve(download.namespace, download.repository)
        chunk_map: ChunkMap | None = None
        with trio.move_on_after(self.config.fetch.first_byte_timeout):
            try:
                chunk_map = await upstream.get_chunk_map(remote_repository, download.digest,
                                                         self.config.swarm.chunk_size)
            except RemoteError as exc:  # no map, or a bad one: fall back to whole-digest checks
                log.debug("no chunk map for %s: %s", download.digest, exc)
        if chunk_map is not None:
            download.size = chunk_map.size
            download._notify()
        if self.swarm is None:
            await self._fetch_plain(download, upstream, remote_repository, chunk_map)
            return
        try:
            await self._fetch_swarm(download, upstream, remote_repository, chunk_map)
            return
        except Exception as exc:
            if not _is_swarm_fault(exc):
                raise
            if download.complete:  # stored and released: only telling the swarm about it failed
                log.error("the swarm failed after %s was complete", download.digest, exc_info=exc)
                return
            # A defect of the swarm path (an exception nobody meant to raise), not the upstream's
            # or the disk's: the upstream alone can still serve the blob, so the pull goes on
            # there, and the client's stream with it (readers keep what was released).
            self.metrics.swarm_fallbacks.inc()
            log.error("the swarm's fetch of %s failed unexpectedly; fetching it from the upstream alone",
                      download.digest, exc_info=exc)
            try:
                # Its coordinator releases this node's range leases now: the site's other nodes
                # fetch those ranges at once instead of waiting out the leases.
                await self.swarm.announce_gone(download.digest)
            except Exception:
                log.exception("telling the swarm that %s is no longer fetched here failed", download.digest)
        await trio.to_thread.run_sync(self._keep_released_prefix, download)
        await self._fetch_plain(download, upstream, remote_repository, chunk_map)
        assert download.size is not None  # the plain path completed the blob
        try:
            await self.swarm.announce_complete(download.digest, download.size)
        except Exception:  # the blob is complete and stored: peers learn of it at the next pull
            log.exception("announcing %s to the swarm failed", download.digest)

    def _keep_released_prefix(self, download: Download) -> None:
        """Cuts the partial file to the bytes released to readers (runs in a thread): those are
        verified (with a chunk map) or about to be checked with the whole blob; what the swarm
        wrote past them may have holes. Readers never read past ``released``."""
        fd, existing = self.store.open_partial(download.digest)
        try:
            os.ftruncate(fd, min(existing, download.released))
        finally:
            os.close(fd)

    async def _fetch_plain(self, download: Download, upstream: Upstream, remote_repository: str,
                           chunk_map: ChunkMap | None) -> None:
        """The blob from the upstream alone, resuming from a partial file's verified bytes."""
        for fresh_start in (False, True):
            fd, existing = await trio.to_thread.run_sync(self.store.open_partial, download.digest)
            try:
                if fresh_start:
                    os.ftruncate(fd, 0)
                    existing = 0
                transfer = _Transfer(download, fd, chunk_map)
                resumed = await trio.to_thread.run_sync(transfer.adopt_existing, existing)
                transfer.announce_existing()
                try:
                    await self._transfer(transfer, upstream, remote_repository)
                except VerificationError:
                    if resumed and not fresh_start:
                        # The bytes left by an earlier run may be what was wrong: start over once.
                        log.warning("resumed download of %s failed verification, restarting", download.digest)
                        continue
                    await trio.to_thread.run_sync(self.store.discard_partial, download.digest)
                    raise
                await trio.to_thread.run_sync(self.store.commit_partial, download.digest, fd, transfer.offset)
            finally:
                os.close(fd)
            download.complete = True
            download._release(transfer.offset)
            return

    async def _peer_grant(self, upstream: Upstream, repository: str, digest: Digest) -> str | None:
        """The registry's peer grant for this node, protecting ``digest`` here (``p2pd.swarm.grants``).

        A registry without grants leaves the blob unprotected. When the registry could not be
        asked, the blob is protected with no keys (fail closed: no peer gets it from us, and
        we ask peers without a grant; protected holders refuse, the upstream serves).
        """
        swarm = self.swarm
        assert swarm is not None
        try:
            with trio.fail_after(self.config.fetch.manifest_timeout):
                answer = await upstream.get_peer_grant(repository, digest, swarm.me.node_id)
        except (UpstreamError, trio.TooSlowError) as exc:
            log.warning("no peer grant for %s (%s): keeping it from peers", digest, exc or "timeout")
            await trio.to_thread.run_sync(swarm.grants.protect_closed, digest)
            return None
        if answer is None:
            return None
        grant, jwks = answer
        try:
            await trio.to_thread.run_sync(swarm.grants.protect, digest, jwks)
        except ValueError as exc:
            log.warning("the registry's keys for peer grants are unusable (%s): keeping %s from peers", exc, digest)
            await trio.to_thread.run_sync(swarm.grants.protect_closed, digest)
            return None
        self.metrics.peer_grants.inc()
        return grant

    async def _fetch_swarm(self, download: Download, upstream: Upstream, repository: str,
                           chunk_map: ChunkMap | None) -> None:
        """Assembles the blob from peers and (once per site) the upstream; see ``p2pd.swarm.engine``."""
        swarm = self.swarm
        assert swarm is not None
        digest = download.digest
        if download.size is None:
            with trio.fail_after(self.config.fetch.manifest_timeout):
                download.size = await upstream.blob_size(repository, digest)
            download._notify()
        size = download.size
        grant = await self._peer_grant(upstream, repository, digest)
        fd, existing = await trio.to_thread.run_sync(self.store.open_partial, digest)
        transfer = swarm.start_transfer(digest, size, fd, chunk_map, grant)
        try:
            await trio.to_thread.run_sync(swarm.adopt_existing, transfer, existing)

            def on_progress() -> None:
                download.written = transfer.have.cardinality() * transfer.chunk_size
                download._release(swarm.released(transfer))

            async def upstream_range(start: int, end: int, accept: Callable[[bytes], Awaitable[None]],
                                     on_range_ignored: Callable[[int], int] | None = None) -> bool:
                return await self._upstream_range(upstream, repository, digest, start, end, accept,
                                                  stall=self.config.swarm.upstream_stall,
                                                  dropped=swarm.pay_for_upstream_bytes,
                                                  on_range_ignored=on_range_ignored)

            on_progress()
            await swarm.run_transfer(transfer, upstream_range, on_progress, download.reader_wait)
            actual = await trio.to_thread.run_sync(_hash_file, fd, size, digest.algorithm)
            if actual != digest.encoded:
                await trio.to_thread.run_sync(self.store.discard_partial, digest)
                raise VerificationError(f"{digest}: assembled content does not match the digest")
            swarm.remember_map(transfer)
            await trio.to_thread.run_sync(self.store.commit_partial, digest, fd, size)
        finally:
            swarm.finish_transfer(transfer)
            os.close(fd)
        download.complete = True
        download._release(size)
        await swarm.announce_complete(digest, size)

    async def _upstream_range(self, upstream: Upstream, repository: str, digest: Digest, start: int, end: int,
                              accept: Callable[[bytes], Awaitable[None]], *, stall: float = 0.0,
                              dropped: Callable[[int], Awaitable[None]] | None = None,
                              on_range_ignored: Callable[[int], int] | None = None) -> bool:
        """Feeds bytes start..end from the upstream to ``accept``, resuming after failures;
        True when the upstream ignored the Range asked for (``BlobResponse.range_ignored``).
        ``dropped`` is awaited with the length of each piece such an upstream sent that was
        read and dropped — the blob's start (``BlobResponse.aiter_bytes``) and the end of the
        last read past ``end``: the swarm's upstream cap pays for them. ``on_range_ignored``,
        when given, is called with the offset asked for once such an answer has come, before
        its body is read: it returns the last byte to read from now on (the swarm reads on to
        the blob's end when it asked from byte 0), or raises to give the request up before
        the blob's start crosses the link.

        ``stall`` > 0: a response whose bytes stop for that long, once they flow, is reopened
        where it stopped. On a thin uplink shared by a site's range holders, one holder's flow
        stalled or trickled for ~11 s mid-chunk (TCP backing off after losses at the uplink's
        queue) while the others ran at their share; it carried the blob's first chunk, and every
        node's reader waited for it (N = 32 equal links: clients fell back to the seed). A new
        connection does not wait out the backoff; a trickle is not caught by this bound (the
        relay tick and the first chunks' own requests, ``p2pd.swarm.engine``, are for that).
        The first byte is not bounded this way: a registry may take long to start a blob (a
        pull-through cache fetching it first)."""
        position = start
        failures_without_progress = 0
        range_ignored = False
        while position <= end:
            before = position
            try:
                self.metrics.upstream_fetches.inc()
                async with upstream.open_blob(repository, digest, position, end) as response:
                    if response.range_ignored:
                        range_ignored = True
                        self._note_range_ignored(upstream)
                        if on_range_ignored is not None:
                            end = max(end, on_range_ignored(position))
                    async with contextlib.aclosing(_gathered(response.aiter_bytes(dropped),
                                                             end + 1 - position)) as pieces:
                        while True:
                            with trio.move_on_after(stall if stall > 0 and position > before else math.inf) as waited:
                                piece = await anext(pieces, b"")
                            if waited.cancelled_caught:
                                self.metrics.upstream_stalls.inc()
                                raise UpstreamError(f"no byte for {stall:g}s")
                            wanted = end + 1 - position
                            if len(piece) > wanted and dropped is not None:
                                # Read past the end asked for (an upstream that ignored the Range
                                # sends on to the blob's end): crossed the link too, so the cap pays.
                                await dropped(len(piece) - wanted)
                            piece = piece[:wanted]
                            if not piece:
                                break
                            position += len(piece)
                            await accept(piece)
                            if position > end:
                                break
            except UpstreamNotFound:
                raise
            except UpstreamError as exc:
                failures_without_progress = 0 if position > before else failures_without_progress + 1
                if failures_without_progress >= self.config.fetch.max_attempts:
                    raise
                log.info("upstream range of %s interrupted at %d (%s); resuming", digest, position, exc)
                await trio.sleep(min(0.1 * 2**failures_without_progress, 2.0))
                continue
            if position == before:
                failures_without_progress += 1
                if failures_without_progress >= self.config.fetch.max_attempts:
                    raise UpstreamError(f"upstream keeps ending {digest} early")
        return range_ignored

    def _note_range_ignored(self, upstream: Upstream) -> None:
        """Counts an upstream answer that ignored the Range asked for, and says so once per
        upstream: a site then fetches each blob from it in one range (its other range holders
        give their requests up before the blob's start crosses the link: a copy and the start
        of one more answer per holder), and a resumed download starts over."""
        self.metrics.upstream_range_ignored.inc()
        if upstream.namespace not in self._warned_range_ignored \
                and len(self._warned_range_ignored) < _MAX_RANGE_IGNORED_WARNINGS:
            self._warned_range_ignored.add(upstream.namespace)
            log.warning("upstream %s ignores Range requests (it answers with the whole blob): a site's "
                        "nodes fetch a blob from it in one range, not several, and a resumed download "
                        "starts over", upstream.namespace)

    async def _transfer(self, transfer: _Transfer, upstream: Upstream, repository: str) -> None:
        """Fetches from the upstream until the blob is complete and verified."""
        download = transfer.download
        failures_without_progress = 0
        while download.size is None or transfer.offset < download.size:
            start_offset = transfer.offset
            try:
                self.metrics.upstream_fetches.inc()
                async with upstream.open_blob(repository, download.digest, transfer.offset) as response:
                    if response.range_ignored:
                        self._note_range_ignored(upstream)
                    transfer.set_size(response.total_size)
                    fetched = self.metrics.fetched_bytes.labels("upstream")
                    length = response.total_size - transfer.offset
                    async with contextlib.aclosing(_gathered(response.aiter_bytes(), length)) as pieces:
                        async for piece in pieces:
                            transfer.write(piece)
                            fetched.inc(len(piece))
            except UpstreamNotFound:
                raise
            except UpstreamError as exc:
                failures_without_progress = 0 if transfer.offset > start_offset else failures_without_progress + 1
                if failures_without_progress >= self.config.fetch.max_attempts:
                    raise
                log.info("upstream transfer of %s interrupted at %d (%s); resuming", download.digest,
                         transfer.offset, exc)
                await trio.sleep(min(0.1 * 2**failures_without_progress, 2.0))
                continue
            ended_early_without_progress = (download.size is not None and transfer.offset < download.size
                                            and transfer.offset == start_offset)
            if ended_early_without_progress:
                # The body ended early without an error (e.g. a close-delimited response).
                failures_without_progress += 1
                if failures_without_progress >= self.config.fetch.max_attempts:
                    raise UpstreamError(f"upstream keeps ending {download.digest} early")
        transfer.finish()


class _Transfer:
    """Writes upstream bytes into the partial file, verifying and releasing them."""

    def __init__(self, download: Download, fd: int, chunk_map: ChunkMap | None) -> None:
        self.download = download
        self.fd = fd
        self.chunk_map = chunk_map
        self.offset = 0
        self._sha256 = hashlib.sha256() if download.digest.algorithm == "sha256" else hashlib.sha512()
        # sha256 of the bytes of chunk ``_chunk_index`` received so far: chunks are verified
        # as the pieces arrive, without buffering or copying them.
        self._chunk_sha256 = hashlib.sha256()
        self._chunk_index = 0

    def adopt_existing(self, existing: int) -> bool:
        """Continues from bytes a previous run left (runs in a thread); returns whether any."""
        keep = existing
        if self.chunk_map is not None:
            # Keep only whole chunks that still verify; the rest is fetched again.
            keep = 0
            for index in range(len(self.chunk_map.hashes)):
                offset, length = self.chunk_map.chunk_bounds(index)
                if offset + length > existing:
                    break
                if not self.chunk_map.verify_chunk(index, os.pread(self.fd, length, offset)):
                    break
                keep = offset + length
            self._chunk_index = keep // self.chunk_map.chunk_size if keep else 0
        os.ftruncate(self.fd, keep)
        position = 0
        while position < keep:
            data = os.pread(self.fd, min(_READ_PIECE, keep - position), position)
            if not data:
                break
            self._sha256.update(data)
            position += len(data)
        self.offset = position
        return position > 0

    def announce_existing(self) -> None:
        """Tells readers about adopted bytes (in trio; ``adopt_existing`` runs in a thread)."""
        self.download.written = self.offset
        if self.chunk_map is not None:
            self.download._release(self.offset)

    def set_size(self, size: int) -> None:
        download = self.download
        if download.size is not None and download.size != size:
            raise VerificationError(f"upstream says {download.digest} has {size} bytes, expected {download.size}")
        if download.size is None:
            download.size = size
            download._notify()

    def write(self, piece: bytes) -> None:
        download = self.download
        assert download.size is not None
        if self.offset + len(piece) > download.size:
            raise VerificationError(f"upstream sent more than {download.size} bytes of {download.digest}")
        written = os.pwrite(self.fd, piece, self.offset)
        if written != len(piece):
            raise P2PDError("short write to the partial file")
        self._sha256.update(piece)
        self.offset += len(piece)
        download.written = self.offset
        if self.chunk_map is None:
            download._release(min(self.offset, download.size - min(HOLDBACK, download.size)))
            return
        view = memoryview(piece)
        position = self.offset - len(piece)
        while view:
            chunk_offset, length = self.chunk_map.chunk_bounds(self._chunk_index)
            take = min(len(view), chunk_offset + length - position)
            self._chunk_sha256.update(view[:take])
            view = view[take:]
            position += take
            if position < chunk_offset + length:
                break
            if not hmac.compare_digest(self._chunk_sha256.digest(), self.chunk_map.hashes[self._chunk_index]):
                raise VerificationError(f"chunk {self._chunk_index} of {download.digest} failed verification")
            self._chunk_sha256 = hashlib.sha256()
            self._chunk_index += 1
            download._release(chunk_offset + length)

    def finish(self) -> None:
        download = self.download
        if download.size is None or self.offset != download.size:
            raise VerificationError(f"{download.digest}: got {self.offset} bytes, expected {download.size}")
        if self._sha256.hexdigest() != download.digest.encoded:
            raise VerificationError(f"{download.digest}: content does not match the digest")


async def stream_download(download: Download, store: BlobStore, start: int, end: int,
                          stall_timeout: float) -> AsyncIterator[FileBody]:
    """Yields spans of bytes ``start..end`` (inclusive) of a download as they are released.

    The spans refer to the growing file (sent with sendfile by the HTTP layer); the file
    stays open until the iterator ends.

    Raises:
        P2PDError: the download failed, or released nothing new for ``stall_timeout``
            seconds; the HTTP layer then closes the connection so the client resumes or
            falls back instead of waiting forever.
    """
    fd: int | None = None
    position = start
    reader = object()
    try:
        while position <= end:
            if download.error is not None:
                raise P2PDError(f"download of {download.digest} failed: {download.error}")
            if download.size is not None and end >= download.size:
                # Asked with a size from elsewhere (the manifest) that the blob does not have.
                raise P2PDError(f"{download.digest} has {download.size} bytes, fewer than asked")
            if download.released > position:
                if fd is None:
                    fd = _open_growing(store, download.digest)
                length = min(download.released, end + 1, position + _SEND_PIECE) - position
                download._waiting.pop(reader, None)
                yield FileBody(fd, position, length)
                position += length
                continue
            download._waiting.setdefault(reader, time.monotonic())
            with trio.move_on_after(stall_timeout) as scope:
                await download.wait_changed()
            if scope.cancelled_caught:
                raise P2PDError(f"download of {download.digest} made no progress for {stall_timeout}s")
    finally:
        download._waiting.pop(reader, None)
        if fd is not None:
            os.close(fd)


class _ReadGathering:
    """When to pause between reads of one upstream body of ``length`` bytes (None: unknown; see
    ``_GATHER_BYTES``)."""

    __slots__ = ("_left", "_received", "_since")

    def __init__(self, length: int | None = None) -> None:
        self._left = length  # bytes of the body still to come
        self._since: float | None = None  # when the first byte came
        self._received = 0  # bytes since then

    def pause_after(self, piece: int, now: float) -> float:
        """Seconds to wait before the next read, after one that returned ``piece`` bytes.

        Until ``_GATHER_BYTES``, or the rest of the body when that is less, could have come at
        the body's rate so far; at most ``_GATHER_PAUSE``. Near its end the wait is for the rest:
        the read after it ends the response, and the request after it (the next range) starts on
        time instead of on an idle link."""
        if self._left is not None:
            self._left -= piece
        if self._since is None:
            self._since = now
            return 0.0  # no rate yet (and a first byte is worth passing on at once)
        self._received += piece
        elapsed = now - self._since
        want = _GATHER_BYTES if self._left is None else min(_GATHER_BYTES, self._left)
        if piece >= _GATHER_BYTES or want <= 0 or elapsed <= 0.0 or self._received <= 0:
            return 0.0
        return min(_GATHER_PAUSE, want * elapsed / self._received)


async def _gathered(pieces: AsyncIterator[bytes], length: int | None) -> AsyncGenerator[bytes, None]:
    """The pieces of an upstream body of ``length`` bytes (None: unknown), with a pause after
    each one that came short of ``_GATHER_BYTES`` (``_ReadGathering``): the next read then takes
    what the kernel collected meanwhile, in one pass through the HTTP client's layers instead of
    one per packet or two. (The body itself is closed with its response.)"""
    gathering = _ReadGathering(length)
    async for piece in pieces:
        yield piece
        if pause := gathering.pause_after(len(piece), trio.current_time()):
            await trio.sleep(pause)


def _is_swarm_fault(exc: BaseException) -> bool:
    """Whether a failure of the swarm path is its own (a defect: what remains after every
    peer failure was handled as a ``PeerError``), not the upstream's, the store's, or a bad
    blob's, which the plain path would meet as well. A nursery's group is the swarm's fault
    when any exception in it is."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_swarm_fault(inner) for inner in exc.exceptions)
    return not isinstance(exc, UpstreamError | StoreError | VerificationError | trio.TooSlowError | trio.Cancelled)


def _hash_file(fd: int, size: int, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    position = 0
    while position < size:
        data = os.pread(fd, min(_READ_PIECE, size - position), position)
        if not data:
            break
        hasher.update(data)
        position += len(data)
    return hasher.hexdigest()


def _open_growing(store: BlobStore, digest: Digest) -> int:
    # The partial file is renamed into blobs/ on commit; an fd opened before that keeps
    # working, and after it the complete blob is the same bytes.
    for path in (store.partial_path(digest), store.blob_path(digest)):
        try:
            return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
    raise P2PDError(f"{digest}: neither partial nor complete file exists")

