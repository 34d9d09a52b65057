"""What a signature claims: the simple-signing payload, the docker reference in it, and
whether that reference names the image being pulled. Pure: values in, values out.

Both formats the seed verifies sign the same JSON document ("simple signing", from
containers/image's ``docs/containers-signature.5.md``)::

    {"critical": {"identity": {"docker-reference": "registry.example/prod/app:v1"},
                  "image": {"docker-manifest-digest": "sha256:..."},
                  "type": "atomic container signature"},
     "optional": {"creator": "...", "timestamp": 1700000000}}

GPG signatures from skopeo/podman say ``"atomic container signature"``; cosign says
``"cosign container image signature"``. As containers/image does, ``critical`` must hold
exactly those three members: a signer's tool that adds claims we do not understand is
refused rather than half-understood.

Identity matching follows containers/image's ``signedIdentity`` choices (containers-policy.json(5)):
``matchRepoDigestOrExact`` (the default of ``signedBy``), ``matchExact`` and ``matchRepository``.
The registry host part of a signed reference is compared only when the policy names the
hosts the seed is known by (``registries``): one seed is reached under several names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from p2pd.oci.grammar import is_valid_name, is_valid_tag

from .errors import SignatureInvalid

__all__ = [
    "ATOMIC_TYPE",
    "COSIGN_TYPE",
    "IDENTITY_MODES",
    "DockerReference",
    "SignedClaim",
    "identity_matches",
    "parse_claim",
    "parse_docker_reference",
]

ATOMIC_TYPE = "atomic container signature"
COSIGN_TYPE = "cosign container image signature"
IDENTITY_MODES = ("matchRepoDigestOrExact", "matchExact", "matchRepository")
MAX_PAYLOAD_SIZE = 64 * 1024  # bytes of one signed payload; real ones are a few hundred

_DOMAIN_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                        r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_DEFAULT_DOMAIN = "docker.io"


@dataclass(frozen=True, slots=True)
class DockerReference:
    """A parsed ``docker-reference``: ``domain/path[:tag][@digest]``, normalized as Docker does
    (no domain means ``docker.io``; a one-component Docker Hub path gets ``library/``)."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name_only(self) -> bool:
        return self.tag is None and self.digest is None

    def __str__(self) -> str:
        text = f"{self.domain}/{self.path}"
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True, slots=True)
class SignedClaim:
    """The critical part of a verified payload."""

    docker_reference: DockerReference
    manifest_digest: Digest
    type: str


def parse_docker_reference(text: str) -> DockerReference:
    """Parses a reference as the distribution ``reference.ParseNormalizedNamed`` does.

    Raises:
        SignatureInvalid: not a valid reference.
    """
    if not isinstance(text, str) or not text or len(text) > 1024:
        raise SignatureInvalid("the signed docker-reference is empty or too long")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        try:
            Digest.parse(digest)
        except OCIError:
            raise SignatureInvalid(f"the signed docker-reference {text[:200]!r} has an invalid digest") from None
    tag = None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        rest, tag = rest[:colon], rest[colon + 1:]
        if not is_valid_tag(tag):
            raise SignatureInvalid(f"the signed docker-reference {text[:200]!r} has an invalid tag")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        domain, path = first, remainder
        if not _DOMAIN_RE.fullmatch(domain):
            raise SignatureInvalid(f"the signed docker-reference {text[:200]!r} has an invalid registry host")
    else:
        domain, path = _DEFAULT_DOMAIN, rest
    if domain == _DEFAULT_DOMAIN and "/" not in path:
        path = f"library/{path}"
    if not is_valid_name(path):
        raise SignatureInvalid(f"the signed docker-reference {text[:200]!r} has an invalid repository path")
    return DockerReference(domain, path, tag, digest)


def _exact_object(value: object, members: Iterable[str], where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise SignatureInvalid(f"{where} is not a JSON object")
    expected = set(members)
    if set(value) != expected:
        unknown = sorted(set(value) - expected)
        missing = sorted(expected - set(value))
        raise SignatureInvalid(f"{where} must hold exactly {sorted(expected)}"
                               + (f"; unknown {unknown}" if unknown else "")
                               + (f"; missing {missing}" if missing else ""))
    return value


def parse_claim(payload: bytes, expected_type: str) -> SignedClaim:
    """Reads the critical claims of a signed payload (after its signature was verified).

    Args:
        payload: the exact signed bytes.
        expected_type: ``ATOMIC_TYPE`` for GPG simple signing, ``COSIGN_TYPE`` for cosign.

    Raises:
        SignatureInvalid: not JSON, another type, missing or unknown critical members.
    """
    if len(payload) > MAX_PAYLOAD_SIZE:
        raise SignatureInvalid(f"the signed payload is larger than {MAX_PAYLOAD_SIZE} bytes")
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        raise SignatureInvalid("the signed payload is not JSON") from None
    if not isinstance(document, dict) or "critical" not in document:
        raise SignatureInvalid("the signed payload has no 'critical' object")
    critical = _exact_object(document["critical"], ("identity", "image", "type"), "critical")
    if critical["type"] != expected_type:
        raise SignatureInvalid(f"the signed payload's type is {str(critical['type'])[:80]!r}, not {expected_type!r}")
    image = _exact_object(critical["image"], ("docker-manifest-digest",), "critical.image")
    identity = _exact_object(critical["identity"], ("docker-reference",), "critical.identity")
    digest_text = image["docker-manifest-digest"]
    if not isinstance(digest_text, str):
        raise SignatureInvalid("critical.image.docker-manifest-digest is not a string")
    try:
        digest = Digest.parse(digest_text)
    except OCIError:
        raise SignatureInvalid(f"the signed manifest digest {digest_text[:200]!r} is invalid") from None
    reference = identity["docker-reference"]
    if not isinstance(reference, str):
        raise SignatureInvalid("critical.identity.docker-reference is not a string")
    return SignedClaim(parse_docker_reference(reference), digest, expected_type)


def identity_matches(signed: DockerReference, repository: str, tag: str | None, *, mode: str,
                     digest: str | None = None, registries: tuple[str, ...] = ()) -> bool:
    """Whether a signature's docker-reference names the image pulled as ``repository:tag``
    (``tag`` None: pulled by digest), under a containers/image ``signedIdentity`` mode.

    - ``matchRepoDigestOrExact``: by tag, the signed reference is exactly ``repository:tag``;
      by digest, the same repository (whatever tag or digest it names).
    - ``matchExact``: by tag, exactly ``repository:tag``; by digest, exactly
      ``repository@digest``.
    - ``matchRepository``: the same repository; the signed reference may be name-only
      (how cosign signs).

    A name-only signed reference matches only under ``matchRepository``, as in containers/image.
    ``registries``, when given, are the host names the seed is known by; the signed
    reference's host must be one of them.
    """
    if mode not in IDENTITY_MODES:
        raise ValueError(f"unknown signed identity mode {mode!r}")
    if registries and signed.domain not in registries:
        return False
    if signed.path != repository:
        return False
    if mode == "matchRepository":
        return True
    if signed.name_only:
        return False
    if tag is None:
        if mode == "matchExact":
            return signed.tag is None and digest is not None and signed.digest == digest
        return True
    return signed.tag == tag and signed.digest is None
