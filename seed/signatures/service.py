"""The seed's signature service: the signature API extension's storage, verification of GPG
and cosign signatures against the ``[[signatures]]`` keys, the verdict cache, and the pull
check the registry calls for manifests pulled by tag.

Rules/invariants:
- Fail closed: a signature that cannot be checked (gpgv missing, killed, too slow, a blob
  that cannot be read) is reported with its error and never counts as valid; an unexpected
  failure of the whole check refuses an enforced pull with 403, never a 500, never serves.
- Checks are cached per (keys, repository, digest) together with a *version* of what is
  stored about that digest (its extension signatures, its cosign tag and referrers). Each
  pull recomputes the version (a few stat calls) and reuses the checks only if it is
  unchanged, so a new signature, a moved ``.sig`` tag or a removed referrer takes effect at
  the next pull, and another key set (a reload) never sees old results.
- A verdict is audited (``signature.verdict``) and handed to the ``on_verdict`` subscribers
  when it is new or differs from the last one for the same name, not on every pull.
- One verification per cache key at a time; at most ``_GPGV_PROCESSES`` gpgv processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import trio

from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from p2pd.signing import cosign
from p2pd.signing.errors import SignatureInvalid
from p2pd.signing.extension import ExtensionSignature, parse_extension_signature
from p2pd.signing.keys import TrustedKeys
from p2pd.signing.payload import MAX_PAYLOAD_SIZE
from p2pd.signing.policy import SignatureCheck, SignatureVerdict, decide
from p2pd.signing.rules import SignaturePolicy, SignatureRule
from p2pd.signing.verifier import SignatureVerifier

from ..storage import Storage
from .store import FileSignatureStore, SignatureStore

__all__ = ["AuditHook", "SignatureService", "VerdictSubscriber"]

log = logging.getLogger("seed.signatures")

AuditHook = Callable[[str, Mapping[str, Any]], None]
VerdictSubscriber = Callable[[SignatureVerdict], None]

_CACHE_SIZE = 4096  # (keys, repository, digest) entries
_VERDICT_MEMORY = 4096  # last verdict per name, to audit changes only
_MAX_COSIGN_MANIFESTS = 16  # signature manifests (tag + referrers) read for one image
_DENIAL_INTERVAL = 10.0  # seconds: one policy.denied record per caller, image and interval


class SignatureService:
    """Signatures of one seed.

    Args:
        storage: the registry's content (manifests, tags, referrers, blobs).
        policy: the ``[[signatures]]`` rules (``replace_policy`` swaps them on reload).
        audit: the audit hook.
        on_verdict: subscribers told of each new or changed verdict (called in the trio thread;
            the registry passes its ``on_signature_verdict`` list, which webhooks extend).
        store: where extension signatures live (default: files in the data directory).
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(self, storage: Storage, policy: SignaturePolicy, *, audit: AuditHook | None = None,
                 on_verdict: list[VerdictSubscriber] | None = None, store: SignatureStore | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.storage = storage
        self.store: SignatureStore = store if store is not None else FileSignatureStore(storage)
        self._policy = policy
        self._audit: AuditHook = audit or (lambda action, fields: None)
        self.on_verdict: list[VerdictSubscriber] = on_verdict if on_verdict is not None else []
        self._clock = clock
        self.verifier = SignatureVerifier(Path(storage.root) / "signatures", Path(storage.root) / "tmp")
        self._cache: OrderedDict[tuple[str, str, str], tuple[Hashable, tuple[SignatureCheck, ...]]] = OrderedDict()
        self._inflight: dict[tuple[str, str, str], trio.Event] = {}
        self._last_verdicts: OrderedDict[tuple[str, str], tuple[str, str, str]] = OrderedDict()
        self._denials: OrderedDict[tuple[str, ...], float] = OrderedDict()

    @property
    def policy(self) -> SignaturePolicy:
        return self._policy

    def replace_policy(self, policy: SignaturePolicy) -> None:
        """Uses new rules and keys (reload). Cached checks are keyed by the keys' hash, so none
        computed under other keys is reused; dropping them all also frees the memory."""
        self._policy = policy
        self._cache.clear()
        self.verifier.forget_keys()

    @property
    def verifications(self) -> int:
        """Signatures checked cryptographically (cache misses), for tests and metrics."""
        return self.verifier.verifications

    def rule_for(self, repository: str) -> SignatureRule | None:
        return self._policy.rule_for(repository)

    # ---- the signature API extension ------------------------------------------------------

    async def list_signatures(self, name: str, digest: Digest) -> list[ExtensionSignature]:
        """The stored signatures of a manifest of ``name`` (404 if the manifest is unknown)."""
        self.storage.stat_manifest(name, str(digest))
        return await trio.to_thread.run_sync(self.store.list_signatures, name, digest)

    async def add_signature(self, name: str, digest: Digest, body: bytes, actor: Mapping[str, Any]) -> bool:
        """Stores one signature PUT by a client; returns whether it is new.

        Raises:
            OCIError: 404 for an unknown manifest, 400 for a malformed signature, 409 when the
                manifest has as many signatures as allowed.
        """
        try:
            signature = parse_extension_signature(body, digest)
        except SignatureInvalid as exc:
            raise OCIError("BAD_REQUEST", f"invalid signature: {exc}") from None
        self.storage.stat_manifest(name, str(digest))
        try:
            new = await trio.to_thread.run_sync(self.store.add_signature, name, digest, signature)
        except SignatureInvalid as exc:  # TooManySignatures
            raise OCIError("DENIED", str(exc), status=409, detail={"digest": str(digest)}) from None
        self._audit("signature.push", {**actor, "repository": name, "digest": str(digest),
                                       "detail": {"name": signature.name, "size": len(signature.content),
                                                  "new": new}})
        await self._announce(name, digest, None, actor)
        return new

    async def remove_signatures(self, name: str, digest: Digest, signature_name: str | None,
                                actor: Mapping[str, Any]) -> int:
        """Removes one signature by name, or all of a manifest's; returns how many."""
        self.storage.stat_manifest(name, str(digest))
        removed = await trio.to_thread.run_sync(self.store.remove_signatures, name, digest, signature_name)
        if removed:
            self._audit("signature.delete", {**actor, "repository": name, "digest": str(digest),
                                             "detail": {"name": signature_name or "*", "removed": removed}})
            await self._announce(name, digest, None, actor)
        return removed

    # ---- verdicts ------------------------------------------------------------------------

    async def verdict(self, name: str, digest: Digest, tag: str | None,
                      actor: Mapping[str, Any] | None = None) -> SignatureVerdict:
        """The policy's verdict on manifest ``digest`` of ``name`` pulled by ``tag`` (None: by digest).

        Never raises for a bad signature: every problem is in the verdict's checks. An
        unexpected failure becomes a refusal in enforce mode (fail closed).
        """
        rule = self.rule_for(name)
        keys = rule.trusted if rule is not None else TrustedKeys()
        try:
            checks = await self._checks(name, digest, rule, keys)
        except Exception as exc:
            log.exception("checking the signatures of %s@%s failed", name, digest)
            failed = SignatureCheck("unknown", "seed", "-", False, error=f"the seed could not check signatures: "
                                                                          f"{type(exc).__name__}")
            checks = (failed,)
        verdict = decide(rule, name, str(digest), tag, checks)
        self._remember(verdict, actor or {"actor": "", "actor_kind": "system"})
        return verdict

    async def check_pull(self, name: str, tag: str, digest: Digest, actor: Mapping[str, Any]) -> None:
        """The pull check for a manifest pulled by tag: returns if it may be served.

        Raises:
            OCIError: 403 ``DENIED`` saying what is missing, when an enforcing rule refuses.
        """
        if self.rule_for(name) is None or cosign.is_attachment_tag(tag):
            return
        verdict = await self.verdict(name, digest, tag, actor)
        if verdict.status == "warned":
            log.warning("signature policy (warn) would refuse %s:%s (%s): %s", name, tag, digest, verdict.reason)
        if verdict.allowed:
            return
        self._record_denial(verdict, actor)
        raise OCIError("DENIED", f"pull of {name}:{tag} refused by the signature policy: {verdict.reason}",
                       status=403, detail={"policy": "signatures", "digest": str(digest),
                                           "verify": f"/extensions/v2/{name}/verdict/{tag}"})

    async def _announce(self, name: str, digest: Digest, tag: str | None, actor: Mapping[str, Any]) -> None:
        # A signature came or went: its by-digest verdict may have changed; say so if it did.
        if self.rule_for(name) is not None:
            await self.verdict(name, digest, tag, actor)

    def _remember(self, verdict: SignatureVerdict, actor: Mapping[str, Any]) -> None:
        if verdict.status == "no-policy":
            return
        key = (verdict.repository, verdict.reference or verdict.digest)
        summary = (verdict.digest, verdict.status, verdict.reason)
        if self._last_verdicts.get(key) == summary:
            self._last_verdicts.move_to_end(key)
            return
        self._last_verdicts[key] = summary
        self._last_verdicts.move_to_end(key)
        while len(self._last_verdicts) > _VERDICT_MEMORY:
            self._last_verdicts.popitem(last=False)
        self._audit("signature.verdict", {**actor, "repository": verdict.repository,
                                          "reference": verdict.reference or "", "digest": verdict.digest,
                                          "detail": {"verdict": verdict.status, "reason": verdict.reason[:500],
                                                     "mode": verdict.mode, "rule": list(verdict.rule),
                                                     "verified_by": verdict.verified_keys,
                                                     "signatures": len(verdict.checks)}})
        for subscriber in list(self.on_verdict):
            try:
                subscriber(verdict)
            except Exception:  # one broken subscriber must not silence the others
                log.exception("signature verdict subscriber %r failed", subscriber)

    def _record_denial(self, verdict: SignatureVerdict, actor: Mapping[str, Any]) -> None:
        # Clients retry a refused pull: one record per caller, image and interval is enough.
        key = (str(actor.get("actor", "")), str(actor.get("source", "")), verdict.repository, verdict.digest)
        now = self._clock()
        last = self._denials.get(key)
        if last is not None and now - last < _DENIAL_INTERVAL:
            return
        self._denials[key] = now
        self._denials.move_to_end(key)
        while len(self._denials) > _VERDICT_MEMORY:
            self._denials.popitem(last=False)
        self._audit("policy.denied", {**actor, "repository": verdict.repository, "reference": verdict.reference or "",
                                      "digest": verdict.digest, "status": 403,
                                      "detail": {"policy": "signatures", "reason": verdict.reason[:500],
                                                 "rule": list(verdict.rule)}})

    # ---- checking (cached) ----------------------------------------------------------------

    def _version(self, name: str, digest: Digest) -> Hashable:
        """What is stored about ``digest`` that its checks depend on; cheap (stat and small reads)."""
        try:
            tagged: str | None = str(self.storage.resolve(name, cosign.signature_tag(digest)))
        except OCIError:
            tagged = None
        referrers = tuple(sorted(str(d.digest) for d in self.storage.referrers(name, digest)
                                 if d.artifact_type == cosign.ARTIFACT_TYPE))
        return (self.store.version(name, digest), tagged, referrers)

    async def _checks(self, name: str, digest: Digest, rule: SignatureRule | None,
                      keys: TrustedKeys) -> tuple[SignatureCheck, ...]:
        key = (keys.id, name, str(digest))
        while True:
            version = self._version(name, digest)
            cached = self._cache.get(key)
            if cached is not None and cached[0] == version:
                self._cache.move_to_end(key)
                return cached[1]
            pending = self._inflight.get(key)
            if pending is None:
                break
            await pending.wait()  # someone is computing it: use theirs (or retry if it failed)
        done = self._inflight[key] = trio.Event()
        try:
            checks = await self._compute(name, digest, rule, keys)
            self._cache[key] = (version, checks)
            self._cache.move_to_end(key)
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return checks
        finally:
            del self._inflight[key]
            done.set()

    async def _compute(self, name: str, digest: Digest, rule: SignatureRule | None,
                       keys: TrustedKeys) -> tuple[SignatureCheck, ...]:
        extension = await trio.to_thread.run_sync(self.store.list_signatures, name, digest)
        checks = [await self.verifier.check_extension(signature, digest, keys) for signature in extension]
        checks += await trio.to_thread.run_sync(self._check_cosign, name, digest, keys)
        return tuple(checks)

    def _check_cosign(self, name: str, digest: Digest, keys: TrustedKeys) -> list[SignatureCheck]:
        """cosign signatures of ``digest``: the ``sha256-<hex>.sig`` tag, then OCI 1.1 referrers.
        Runs in a worker thread (blob reads, public-key cryptography)."""
        sources: list[tuple[str, str]] = []
        with contextlib.suppress(OCIError):  # no .sig tag
            sources.append(("tag", str(self.storage.resolve(name, cosign.signature_tag(digest)))))
        sources += [("referrer", str(d.digest)) for d in self.storage.referrers(name, digest)
                    if d.artifact_type == cosign.ARTIFACT_TYPE]
        checks: list[SignatureCheck] = []
        for source, manifest_digest in sources[:_MAX_COSIGN_MANIFESTS]:
            checks += self._check_cosign_manifest(name, digest, source, manifest_digest, keys)
        return checks

    def _check_cosign_manifest(self, name: str, digest: Digest, source: str, manifest_digest: str,
                               keys: TrustedKeys) -> list[SignatureCheck]:
        try:
            stored, body = self.storage.get_manifest(name, manifest_digest)
            layers = cosign.parse_signature_manifest(body, stored.media_type)
        except (OCIError, SignatureInvalid) as exc:
            message = exc.message if isinstance(exc, OCIError) else str(exc)
            return [SignatureCheck("cosign", source, manifest_digest, False, error=message)]
        return [self.verifier.check_cosign_layer(layer, partial(self._read_payload, name, layer), source=source,
                                                 manifest_digest=manifest_digest, digest=digest, keys=keys)
                for layer in layers]

    def _read_payload(self, name: str, layer: cosign.CosignLayer) -> bytes:
        assert layer.payload is not None  # check_cosign_layer reads only layers with a payload
        digest, size = layer.payload.digest, layer.payload.size
        if size > MAX_PAYLOAD_SIZE:
            raise SignatureInvalid(f"the payload is larger than {MAX_PAYLOAD_SIZE} bytes")
        try:
            fd, actual = self.storage.open_blob(name, digest)
        except OCIError as exc:
            raise SignatureInvalid(exc.message) from None
        try:
            if actual != size:
                raise SignatureInvalid(f"the payload is {actual} bytes, its descriptor says {size}")
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

