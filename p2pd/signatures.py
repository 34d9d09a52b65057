"""Signatures at the node: the registry signature API extension passed through (read-only),
and the optional ``[[signatures]]`` policy enforced on manifests pulled by tag.

Why at the node: a manifest may come from a peer, a cache or another upstream, so the seed's
own policy is not the only door. With a rule for ``prod/**`` the agent answers a tag of
``prod/app`` only when a trusted key signed exactly the digest the tag resolves to, with the
same checks as the seed (``p2pd.signing``). Off unless ``[[signatures]]`` is configured.

Rules/invariants:
- Signatures are read from the namespace's upstream with the agent's credentials, only after
  the client was authorized for the repository (``MirrorFront``); never from peers.
- Fail closed: an upstream that cannot be asked and no earlier *allowed* verdict for the same
  keys and digest → refused. An allowed verdict is reused for ``signature_ttl`` seconds, and
  while the upstream fails for at most ``tag_stale_max`` (like the tag it guards).
- Bounded: the extension list (4 MiB), cosign manifests per image, payload sizes, cache
  entries (LRU).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import trio

from .config import AgentConfig
from .errors import UpstreamError, UpstreamNotFound
from .metrics import AgentMetrics
from .oci.digest import Digest, digest_of
from .oci.errors import OCIError
from .oci.manifest import Descriptor
from .signing import cosign
from .signing.errors import SignatureInvalid
from .signing.extension import ExtensionSignature
from .signing.keys import TrustedKeys
from .signing.payload import MAX_PAYLOAD_SIZE
from .signing.policy import SignatureCheck, SignatureVerdict, decide
from .signing.rules import SignatureRule
from .signing.verifier import SignatureVerifier
from .upstream import Upstream, UpstreamPool

__all__ = ["NodeSignatures"]

log = logging.getLogger("p2pd.signatures")

_CACHE_SIZE = 4096  # verdicts and last-good signature lists kept (LRU)
_MAX_COSIGN_MANIFESTS = 16  # the .sig tag plus referrers read for one image
_FETCH_SECONDS = 10.0  # everything read from the upstream for one verdict
_K = TypeVar("_K")
_V = TypeVar("_V")


@dataclass(frozen=True, slots=True)
class _Verdict:
    checks: tuple[SignatureCheck, ...]
    at: float


class NodeSignatures:
    """The agent's signature pass-through and pull check.

    Args:
        config: the agent's configuration (``signatures``, ``cache``, ``data``).
        upstreams: where signatures are read.
        metrics: ``signature_verdicts``.
        clock: wall-clock seconds (tests pass a fake).
    """

    def __init__(self, config: AgentConfig, upstreams: UpstreamPool, metrics: AgentMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._upstreams = upstreams
        self._metrics = metrics
        self._clock = clock
        self.verifier = SignatureVerifier(Path(config.data) / "signatures", Path(config.data) / "tmp")
        self._checks: OrderedDict[tuple[str, str, str, str], _Verdict] = OrderedDict()
        self._lists: OrderedDict[tuple[str, str, str], list[ExtensionSignature]] = OrderedDict()

    def rule_for(self, repository: str) -> SignatureRule | None:
        return self._config.signatures.rule_for(repository)

    # ---- the extension, read-only ----------------------------------------------------------

    async def list_signatures(self, namespace: str | None, name: str, digest: Digest) -> list[ExtensionSignature]:
        """The manifest's signatures as the upstream has them; the last good answer while the
        upstream fails (podman verifying a pull made from cache).

        Raises:
            OCIError: 404 when the upstream cannot be asked and nothing was read before.
        """
        upstream, repository = self._upstreams.resolve(namespace, name)
        key = (namespace or "", repository, str(digest))
        try:
            with trio.fail_after(_FETCH_SECONDS):
                signatures = await upstream.get_signatures(repository, digest)
        except (UpstreamError, trio.TooSlowError) as exc:
            cached = self._lists.get(key)
            if cached is None:
                raise OCIError("NOT_FOUND", "signatures not available from the upstream", status=404,
                               detail={"digest": str(digest)}) from exc
            log.warning("signatures of %s@%s: upstream failed (%s); answering the last known list",
                        name, digest, exc or "timeout")
            return cached
        _remember(self._lists, key, signatures)
        return signatures

    # ---- enforcement ---------------------------------------------------------------------

    async def check_pull(self, namespace: str | None, name: str, tag: str, digest: Digest) -> None:
        """Returns if manifest ``digest``, the tag ``name:tag`` resolved to, may be served.

        Raises:
            OCIError: 403 ``DENIED`` saying what is missing, when an enforcing rule refuses.
        """
        rule = self.rule_for(name)
        if rule is None or cosign.is_attachment_tag(tag):
            return
        verdict = await self.verdict(namespace, name, tag, digest, rule)
        self._metrics.signature_verdicts.labels(verdict.status).inc()
        if verdict.status == "warned":
            log.warning("signature policy (warn) would refuse %s:%s (%s): %s", name, tag, digest, verdict.reason)
        if verdict.allowed:
            return
        log.warning("refused %s:%s (%s): %s", name, tag, digest, verdict.reason)
        raise OCIError("DENIED", f"pull of {name}:{tag} refused by this node's signature policy: {verdict.reason}",
                       status=403, detail={"policy": "signatures", "digest": str(digest)})

    async def verdict(self, namespace: str | None, name: str, tag: str | None, digest: Digest,
                      rule: SignatureRule) -> SignatureVerdict:
        """The rule's verdict on ``digest`` pulled as ``name:tag``; never raises for bad signatures."""
        upstream, repository = self._upstreams.resolve(namespace, name)
        key = (rule.trusted.id, namespace or "", repository, str(digest))
        cached = self._checks.get(key)
        now = self._clock()
        if cached is not None and now - cached.at < self._config.signature_ttl:
            self._checks.move_to_end(key)
            return decide(rule, repository, str(digest), tag, cached.checks)
        try:
            with trio.fail_after(_FETCH_SECONDS):
                checks = await self._compute(upstream, repository, digest, rule.trusted)
        except (UpstreamError, trio.TooSlowError) as exc:
            stale = cached is not None and now - cached.at < self._config.cache.tag_stale_max
            if stale and cached is not None and decide(rule, repository, str(digest), tag, cached.checks).allowed:
                log.warning("signatures of %s@%s: upstream failed (%s); using the verdict of %.0f s ago",
                            name, digest, exc or "timeout", now - cached.at)
                return decide(rule, repository, str(digest), tag, cached.checks)
            failed = SignatureCheck("unknown", "upstream", "-", False,
                                    error=f"the signatures could not be read from the upstream: {exc or 'timeout'}")
            return decide(rule, repository, str(digest), tag, (failed,))
        _remember(self._checks, key, _Verdict(checks, now))
        return decide(rule, repository, str(digest), tag, checks)

    async def _compute(self, upstream: Upstream, repository: str, digest: Digest,
                       keys: TrustedKeys) -> tuple[SignatureCheck, ...]:
        extension = await upstream.get_signatures(repository, digest)
        checks = [await self.verifier.check_extension(signature, digest, keys) for signature in extension]
        sources: list[tuple[str, str]] = []
        with contextlib.suppress(UpstreamNotFound):
            tagged = await upstream.head_manifest(repository, cosign.signature_tag(digest))
            sources.append(("tag", str(tagged.digest)))
        referrers = await upstream.get_referrers(repository, digest, cosign.ARTIFACT_TYPE)
        sources += [("referrer", str(descriptor.digest)) for descriptor in referrers]
        for source, manifest_digest in sources[:_MAX_COSIGN_MANIFESTS]:
            checks += await self._check_cosign_manifest(upstream, repository, digest, source, manifest_digest, keys)
        return tuple(checks)

    async def _check_cosign_manifest(self, upstream: Upstream, repository: str, digest: Digest, source: str,
                                     manifest_digest: str, keys: TrustedKeys) -> list[SignatureCheck]:
        try:
            result = await upstream.get_manifest(repository, manifest_digest)
            layers = cosign.parse_signature_manifest(result.body or b"", result.media_type)
        except (UpstreamNotFound, SignatureInvalid) as exc:
            return [SignatureCheck("cosign", source, manifest_digest, False, error=str(exc))]
        payloads: dict[int, bytes | Exception] = {}
        for layer in layers:
            if layer.payload is not None and not layer.error and keys.pem:
                try:
                    payloads[layer.index] = await _read_payload(upstream, repository, layer.payload)
                except (UpstreamNotFound, SignatureInvalid) as exc:
                    payloads[layer.index] = exc

        def check_all() -> list[SignatureCheck]:
            return [self.verifier.check_cosign_layer(layer, partial(_payload, payloads, layer.index),
                                                     source=source, manifest_digest=manifest_digest, digest=digest,
                                                     keys=keys)
                    for layer in layers]

        return await trio.to_thread.run_sync(check_all)


def _payload(payloads: dict[int, bytes | Exception], index: int) -> bytes:
    found = payloads.get(index)
    if isinstance(found, bytes):
        return found
    raise SignatureInvalid(str(found) if found is not None else "the payload was not read")


async def _read_payload(upstream: Upstream, repository: str, descriptor: Descriptor) -> bytes:
    """A cosign payload blob (at most ``MAX_PAYLOAD_SIZE``), checked against its descriptor."""
    if descriptor.size > MAX_PAYLOAD_SIZE:
        raise SignatureInvalid(f"the payload is larger than {MAX_PAYLOAD_SIZE} bytes")
    data = bytearray()
    async with upstream.open_blob(repository, descriptor.digest) as response:
        async for piece in response.aiter_bytes():
            data += piece
            if len(data) > descriptor.size:
                raise SignatureInvalid(f"the payload is larger than its descriptor's {descriptor.size} bytes")
    if len(data) != descriptor.size or digest_of(bytes(data), descriptor.digest.algorithm) != descriptor.digest:
        raise SignatureInvalid("the payload does not match its descriptor")
    return bytes(data)


def _remember(cache: OrderedDict[_K, _V], key: _K, value: _V) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
