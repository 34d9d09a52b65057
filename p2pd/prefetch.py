"""Prefetch: fetching an image's manifests and blobs into the cache ahead of a rollout.

An operator action, not a client pull: it runs with the agent's own upstream credentials and
puts content in the cache, but opens nothing to clients (AccessGate still judges each later
pull). The blobs go through the normal Fetcher, so with the swarm on a site fetches each
blob from upstream once. What it fetched is pinned until the pin expires or is released;
after that the cache limit applies as to any other blob.

Resumable by construction: what is cached is skipped, and a blob interrupted half-way
resumes from the store's partial file.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from p2pd.httpd import Handler, Request, Response

from .fetcher import Fetcher
from .fsutil import write_atomic
from .oci.digest import Digest
from .oci.errors import OCIError
from .oci.grammar import validate_name, validate_reference
from .oci.manifest import MAX_MANIFEST_SIZE, parse_manifest
from .oci.platform import Platform, select_manifest
from .registry import MirrorFront
from .store import BlobStore

__all__ = ["MAX_IMAGES", "PREFETCH_PATH", "PREHEAT_PATH", "ImageRef", "ImageReport", "Prefetcher", "parse_image",
           "parse_prefetch_request", "prefetch_api"]

log = logging.getLogger(__name__)

MAX_IMAGES = 32  # per request
MAX_REQUEST_BYTES = 64 * 1024
PREFETCH_PATH = "/p2pd/v1/prefetch"
PREHEAT_PATH = "/p2pd/v1/preheat"
MAX_IMAGE_TEXT = 512
MAX_PIN_SECONDS = 30 * 24 * 3600
_HOST_RE = re.compile(r"(?:[a-z0-9-]+(?:\.[a-z0-9-]+)+|localhost|\[[0-9a-f:]+\])(?::[0-9]{1,5})?|"
                      r"[a-z0-9-]+:[0-9]{1,5}", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """``[registry/]name[:tag][@digest]``; no registry means the default upstream."""

    namespace: str | None
    name: str
    reference: str

    def __str__(self) -> str:
        separator = "@" if ":" in self.reference else ":"
        return f"{self.namespace + '/' if self.namespace else ''}{self.name}{separator}{self.reference}"


def parse_image(text: str) -> ImageRef:
    """Reads an image reference the way docker and ctr write them.

    Raises:
        ValueError: not a valid reference (bounded length, OCI grammar).
    """
    if not text or len(text) > MAX_IMAGE_TEXT:
        raise ValueError("image reference missing or too long")
    namespace: str | None = None
    first, slash, rest = text.partition("/")
    if slash and _HOST_RE.fullmatch(first):
        namespace, text = first.lower(), rest
    name, at, digest = text.partition("@")
    tag = "latest"
    if ":" in name:
        name, _, tag = name.rpartition(":")
    try:
        validate_name(name)
        reference = validate_reference(digest if at else tag)
    except OCIError as exc:
        raise ValueError(f"invalid image reference: {exc}") from None
    return ImageRef(namespace, name, reference)


@dataclass(slots=True)
class ImageReport:
    """The outcome of one image's prefetch (what the CLI's summary table shows)."""

    image: str
    status: str = "running"  # running, done, failed
    manifest: str = ""
    platform: str = ""
    blobs: int = 0
    bytes_total: int = 0
    bytes_cached: int = 0  # already in the cache when asked
    bytes_fetched: int = 0
    seconds: float = 0.0
    error: str = ""
    _done: trio.Event = field(default_factory=trio.Event)

    def to_json(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__ if not name.startswith("_")}


class Prefetcher:
    """Fetches images into the cache and holds their pins with an expiry (pins-expiry.json)."""

    def __init__(self, store: BlobStore, fetcher: Fetcher, front: MirrorFront, platform: Platform,
                 *, max_concurrent: int = 2) -> None:
        self.store = store
        self.fetcher = fetcher
        self.front = front
        self.platform = platform
        self._limit = trio.CapacityLimiter(max_concurrent)
        self._expiry_path = Path(store.root) / "pins-expiry.json"
        self._expiry: dict[str, float] = self._load_expiry()

    def _load_expiry(self) -> dict[str, float]:
        try:
            data = json.loads(self._expiry_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(k, str) and isinstance(v, (int, float))}

    def _save_expiry(self) -> None:
        write_atomic(self._expiry_path, json.dumps(self._expiry, sort_keys=True).encode())

    def release_expired(self, now: float | None = None) -> int:
        """Unpins what a prefetch pinned once its time is over; returns how many were released."""
        now = time.time() if now is None else now
        expired = [d for d, until in self._expiry.items() if until <= now]
        for digest in expired:
            self.store.unpin(Digest.parse(digest))
            del self._expiry[digest]
        if expired:
            self._save_expiry()
        return len(expired)

    def _pin(self, digest: Digest, until: float) -> None:
        key = str(digest)
        if key not in self._expiry and self.store.is_pinned(digest):
            return  # pinned by the operator (config, 'p2pd cache pin'): never released by an expiry
        self.store.pin(digest)
        self._expiry[key] = max(until, self._expiry.get(key, 0.0))

    async def run(self, *, sweep_every: float = 60.0,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Releases expired pins now and then, until cancelled."""
        task_status.started()
        while True:
            await trio.to_thread.run_sync(self.release_expired)
            await trio.sleep(sweep_every)

    async def prefetch(self, image: ImageRef, *, platform: Platform | None = None,
                       pin_seconds: float = 0.0) -> ImageReport:
        """Fetches ``image`` (resolved to ``platform``, default this node's) into the cache.

        Never raises for a content problem: the report says ``failed`` and why.
        """
        report = ImageReport(str(image))
        started = time.monotonic()
        async with self._limit:
            try:
                await self._prefetch(image, platform or self.platform, pin_seconds, report)
                report.status = "done"
            except (OCIError, OSError, ValueError) as exc:
                report.status, report.error = "failed", str(exc)[:500]
                log.warning("prefetch of %s failed: %s", image, report.error)
        report.seconds = round(time.monotonic() - started, 3)
        return report

    async def _manifest(self, image: ImageRef, digest: Digest) -> tuple[bytes, str | None]:
        body = await trio.to_thread.run_sync(self.store.read_small, digest, MAX_MANIFEST_SIZE)
        if body is not None:
            return body, self.store.media_type(digest)
        # The front's path: digest-verified upstream fetch, peers as a fallback, stored.
        body, media_type = await self.front._fetch_manifest(image.namespace, image.name, digest, peers=True)
        return body, media_type

    async def _prefetch(self, image: ImageRef, platform: Platform, pin_seconds: float,
                        report: ImageReport) -> None:
        until = time.time() + min(max(pin_seconds, 0.0), MAX_PIN_SECONDS)
        if ":" in image.reference:
            digest = Digest.parse(image.reference)
        else:
            digest = (await self.front._resolve_tag(image.namespace, image.name, image.reference)).digest
        body, media_type = await self._manifest(image, digest)
        manifests = [digest]
        parsed = parse_manifest(body, media_type)
        if parsed.is_index:
            chosen = select_manifest(body, media_type, platform)
            report.platform = str(platform)
            body, media_type = await self._manifest(image, chosen.digest)
            parsed = parse_manifest(body, media_type)
            if parsed.is_index:
                raise OCIError("MANIFEST_INVALID", "an index inside an index is not prefetched")
            manifests.append(chosen.digest)
        report.manifest = str(manifests[-1])
        report.blobs = len(parsed.references)
        report.bytes_total = sum(d.size for d in parsed.references)
        for descriptor in parsed.references:
            if self.store.size(descriptor.digest) is not None:
                report.bytes_cached += descriptor.size
                continue
            download = self.fetcher.start(descriptor.digest, image.namespace, image.name)
            while not download.finished:
                await download.wait_changed()
            if download.error is not None:
                raise OCIError("BLOB_UNKNOWN", f"blob {descriptor.digest} could not be fetched: "
                                               f"{download.error}")
            report.bytes_fetched += descriptor.size
        if pin_seconds > 0:
            for pinned in [*manifests, *(d.digest for d in parsed.references)]:
                await trio.to_thread.run_sync(self._pin, pinned, until)
            await trio.to_thread.run_sync(self._save_expiry)


def _is_loopback(request: Request) -> bool:
    if request.client is None:
        return False
    try:
        return ipaddress.ip_address(request.client[0].split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _bad_request(message: str) -> OCIError:
    return OCIError("UNSUPPORTED", message, status=400)


def parse_prefetch_request(body: bytes) -> tuple[list[ImageRef], Platform | None, float, str | None,
                                                  set[str] | None]:
    """Images, platform, pin seconds, and for a preheat the site and node ids (None: all).

    Raises:
        OCIError: 400 for anything malformed or out of bounds.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise _bad_request("the body must be JSON") from None
    if not isinstance(document, dict):
        raise _bad_request("the body must be a JSON object")
    images, platform, pin_seconds = document.get("images"), document.get("platform"), document.get("pin_seconds", 0)
    if not isinstance(images, list) or not 1 <= len(images) <= MAX_IMAGES or \
            not all(isinstance(i, str) for i in images):
        raise _bad_request(f"images must be a list of 1 to {MAX_IMAGES} image references")
    if platform is not None and not isinstance(platform, str):
        raise _bad_request("platform must be os/arch[/variant]")
    if not isinstance(pin_seconds, (int, float)) or isinstance(pin_seconds, bool) or \
            not 0 <= pin_seconds <= MAX_PIN_SECONDS:
        raise _bad_request(f"pin_seconds must be between 0 and {MAX_PIN_SECONDS}")
    site, nodes = document.get("site"), document.get("nodes")
    if site is not None and (not isinstance(site, str) or not 0 < len(site) <= 128):
        raise _bad_request("site must be a site name")
    if nodes is not None and (not isinstance(nodes, list) or len(nodes) > 1024 or
                              not all(isinstance(n, str) and len(n) <= 128 for n in nodes)):
        raise _bad_request("nodes must be a list of node ids")
    try:
        return ([parse_image(i) for i in images], Platform.parse(platform) if platform else None,
                float(pin_seconds), site, set(nodes) if nodes is not None else None)
    except ValueError as exc:
        raise _bad_request(str(exc)) from None


def prefetch_api(prefetcher: Prefetcher, inner: Handler, *, preheat: Handler | None = None) -> Handler:
    """``POST /p2pd/v1/prefetch`` from loopback clients only, in front of ``inner``.

    Body: ``{"images": [...], "platform": "linux/arm64", "pin_seconds": 7200}``. The answer
    (200, once every image is done or failed) is ``{"images": [ImageReport...]}``.
    ``preheat`` serves ``POST /p2pd/v1/preheat`` under the same loopback rule (p2pd/preheat.py).
    """

    async def handle(request: Request) -> Response:
        if request.path not in (PREFETCH_PATH, PREHEAT_PATH):
            return await inner(request)
        request.route = "prefetch" if request.path == PREFETCH_PATH else "preheat"
        if not _is_loopback(request):
            # An operator action: remote callers use the signed peer message (p2pd preheat).
            raise OCIError("DENIED", "prefetch is accepted from loopback clients only", status=403)
        if request.method != "POST":
            raise OCIError("UNSUPPORTED", "use POST", status=405, headers=[("Allow", "POST")])
        if request.path == PREHEAT_PATH:
            if preheat is None:
                raise OCIError("NOT_FOUND", "preheat needs the swarm (--peer-listen)", status=404)
            return await preheat(request)
        images, platform, pin_seconds, _, _ = parse_prefetch_request(await request.body.read(MAX_REQUEST_BYTES))
        reports: list[ImageReport] = [ImageReport(str(i)) for i in images]

        async def one(index: int) -> None:
            reports[index] = await prefetcher.prefetch(images[index], platform=platform, pin_seconds=pin_seconds)

        async with trio.open_nursery() as nursery:
            for index in range(len(images)):
                nursery.start_soon(one, index)
        body = json.dumps({"images": [r.to_json() for r in reports]}).encode()
        return Response(200, [("Content-Type", "application/json")], body)

    return handle
