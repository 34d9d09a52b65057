"""The verdict of a ``[[signatures]]`` rule on one image, from the checked signatures. Pure.

A signature *verifies* when its cryptography holds with a trusted key, its payload is a
well-formed simple-signing document of the right type, and it signs exactly the manifest's
digest (``SignatureCheck.verified``); that does not depend on how the image was named, so the
service caches it per digest. Whether a verified signature *accepts* a pull also depends on
the name it was pulled by (the signed docker-reference against ``repository:tag``), which is
cheap and decided here on every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .payload import SignedClaim, identity_matches
from .rules import SignatureRule

__all__ = ["SignatureCheck", "SignatureVerdict", "decide"]

_ERRORS_NAMED = 3  # signature problems named in one refusal


@dataclass(frozen=True)
class SignatureCheck:
    """What one stored signature says, once checked against a rule's keys.

    Attributes:
        format: ``simple-signing`` (GPG, through the signature API) or ``cosign``.
        source: ``extension`` (the signature API), ``tag`` (cosign's ``sha256-<hex>.sig``) or
            ``referrer`` (an OCI 1.1 referrer).
        id: the extension signature's name, or ``<signature manifest digest>#<layer>``.
        verified: signed by a trusted key, well-formed, and for exactly this manifest digest.
        key: the file of the trusted key that verified it.
        fingerprint: that key's fingerprint.
        claim: the signed claims (present when the payload could be read).
        error: why it does not verify (empty when it does).
    """

    format: str
    source: str
    id: str
    verified: bool
    key: str = ""
    fingerprint: str = ""
    claim: SignedClaim | None = field(default=None, compare=False)
    error: str = ""

    def to_json(self, accepted: bool | None = None) -> dict[str, Any]:
        document: dict[str, Any] = {"format": self.format, "source": self.source, "id": self.id,
                                    "verified": self.verified}
        if self.key:
            document["key"] = {"source": self.key, "fingerprint": self.fingerprint}
        if self.claim is not None:
            document["docker_reference"] = str(self.claim.docker_reference)
            document["signed_digest"] = str(self.claim.manifest_digest)
        if accepted is not None:
            document["identity_matches"] = accepted
        if self.error:
            document["error"] = self.error
        return document


@dataclass(frozen=True)
class SignatureVerdict:
    """The policy's answer for one image, named as pulled.

    Attributes:
        repository: the repository.
        digest: the manifest digest.
        reference: the tag it was pulled by, or None (by digest).
        status: ``no-policy``, ``allowed``, ``warned`` (warn mode, would be refused) or ``denied``.
        reason: what is missing, for a refusal (or a warning).
        rule: the matching rule's repository patterns (empty without a rule).
        mode: the rule's mode (empty without a rule).
        checks: every signature found, checked.
        accepted_by: the checks that accept the pull (verified and naming this image).
        trusted_keys: the rule's keys, for the API.
    """

    repository: str
    digest: str
    reference: str | None
    status: str
    reason: str = ""
    rule: tuple[str, ...] = ()
    mode: str = ""
    signed_identity: str = ""
    checks: tuple[SignatureCheck, ...] = ()
    accepted_by: tuple[SignatureCheck, ...] = ()
    trusted_keys: tuple[dict[str, str], ...] = ()

    @property
    def allowed(self) -> bool:
        return self.status != "denied"

    @property
    def verified_keys(self) -> list[str]:
        """The key files that verified an accepting signature (sorted, no duplicates)."""
        return sorted({check.key for check in self.accepted_by})

    def to_json(self) -> dict[str, Any]:
        accepted = {id(check) for check in self.accepted_by}
        return {
            "repository": self.repository,
            "digest": self.digest,
            "reference": self.reference,
            "verdict": self.status,
            "allowed": self.allowed,
            "reason": self.reason,
            "policy": ({"repositories": list(self.rule), "mode": self.mode, "signed_identity": self.signed_identity,
                        "keys": list(self.trusted_keys)} if self.rule else None),
            "verified_by": self.verified_keys,
            "signatures": [check.to_json(id(check) in accepted if check.verified else None)
                           for check in self.checks],
        }


def decide(rule: SignatureRule | None, repository: str, digest: str, tag: str | None,
           checks: Sequence[SignatureCheck]) -> SignatureVerdict:
    """The verdict of ``rule`` (None: no rule matches) on an image pulled as ``repository:tag``
    (``tag`` None: by digest) whose stored signatures were checked into ``checks``."""
    checks = tuple(checks)
    if rule is None:
        return SignatureVerdict(repository, digest, tag, "no-policy", checks=checks)
    accepted = tuple(check for check in checks if check.verified and check.claim is not None and identity_matches(
        check.claim.docker_reference, repository, tag, mode=rule.signed_identity, digest=digest,
        registries=rule.registries))
    common: dict[str, Any] = {"rule": rule.repositories, "mode": rule.mode, "signed_identity": rule.signed_identity,
                              "checks": checks, "accepted_by": accepted,
                              "trusted_keys": tuple(rule.trusted.describe())}
    if accepted:
        return SignatureVerdict(repository, digest, tag, "allowed", **common)
    reason = _missing(rule, repository, tag, checks)
    return SignatureVerdict(repository, digest, tag, "denied" if rule.mode == "enforce" else "warned", reason,
                            **common)


def _missing(rule: SignatureRule, repository: str, tag: str | None, checks: tuple[SignatureCheck, ...]) -> str:
    """What a refusal tells the client: none at all, none valid, or none for this name."""
    pulled = f"{repository}:{tag}" if tag is not None else repository
    if not checks:
        return ("the image has no signature (none through the signature API, no cosign "
                "sha256-<hex>.sig tag or referrer); a signature from a trusted key is required")
    verified = [check for check in checks if check.verified]
    if not verified:
        problems = "; ".join(sorted({check.error for check in checks})[:_ERRORS_NAMED])
        return f"no valid signature from a trusted key ({len(checks)} found: {problems})"
    names = sorted({str(check.claim.docker_reference) for check in verified if check.claim is not None})
    hosts = f" on {', '.join(rule.registries)}" if rule.registries else ""
    return (f"signed by a trusted key, but for {', '.join(names[:_ERRORS_NAMED])}, not {pulled}{hosts} "
            f"(signed_identity = {rule.signed_identity})")
