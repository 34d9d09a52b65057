"""Signed images on the seed (issue 9): the signature API extension, GPG simple signing verified
with GnuPG, cosign signatures verified with ``cryptography``, the ``[[signatures]]`` pull policy,
its verdict API, cache, audit and subscribers.

Signatures are made by real tools: GPG messages by Debian's ``gpg`` (tests/harness/gpg.py);
cosign signatures follow cosign's published format (a ``sha256-<hex>.sig`` tagged manifest, or
an OCI 1.1 referrer, whose layers are simple-signing payloads annotated with
``dev.cosignproject.cosign/signature``), signed with ECDSA P-256 by ``cryptography`` because
Debian ships no cosign. The real clients (skopeo, podman, containerd) are in
tests/test_seed_signatures_clients.py.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa, x25519

from p2pd.errors import ConfigError
from p2pd.httpd import ServerInfo
from p2pd.oci import mediatypes
from p2pd.oci.digest import Digest, digest_of
from p2pd.oci.errors import OCIError
from p2pd.oci.manifest import parse_manifest
from p2pd.signing import (
    ExtensionSignature,
    SignatureInvalid,
    SignatureVerdict,
    identity_matches,
    load_trusted_keys,
    parse_claim,
    parse_docker_reference,
)
from p2pd.signing.cosign import (
    ARTIFACT_TYPE,
    SIGNATURE_ANNOTATION,
    SIMPLESIGNING_MEDIA_TYPE,
    parse_signature_manifest,
    signature_tag,
)
from p2pd.signing.extension import MAX_SIGNATURES, parse_extension_signature
from p2pd.signing.openpgp import OpenPGPVerifier
from p2pd.signing.payload import ATOMIC_TYPE, COSIGN_TYPE
from p2pd.signing.rules import from_toml
from seed.audit import AuditEvent, audit_directory, iter_directory_records
from seed.config import load_config
from seed.registry import SeedRegistry, serve_seed
from seed.signatures import (
    FileSignatureStore,
    MemorySignatureStore,
    SignatureService,
    SignatureStore,
    TooManySignatures,
)
from seed.storage import Storage
from tests.harness.gpg import GpgHome
from tests.harness.tools import require_tool
from tests.test_seed_api import image_manifest, push_blob, push_image
from tests.test_seed_auth_api import make_htpasswd

WAIT = 10.0  # seconds any wait for the audit writer may take
HOST = "seed.example:5000"


# ---- signing helpers (what skopeo --sign-by and cosign sign produce) -----------------------------


def payload(reference: str, digest: str, kind: str = ATOMIC_TYPE, **critical_extra: Any) -> bytes:
    """A simple-signing payload as containers/image writes it (or cosign, with COSIGN_TYPE)."""
    critical = {"identity": {"docker-reference": reference}, "image": {"docker-manifest-digest": digest},
                "type": kind, **critical_extra}
    optional = {"creator": "atomic 5.23.1", "timestamp": 1_700_000_000} if kind == ATOMIC_TYPE else None
    return json.dumps({"critical": critical, "optional": optional}).encode()


def extension_body(digest: str, content: bytes, suffix: str = "0" * 32) -> bytes:
    """The PUT body skopeo sends to the signature API extension."""
    return json.dumps({"schemaVersion": 2, "name": f"{digest}@{suffix}", "type": "atomic",
                       "content": base64.b64encode(content).decode()}).encode()


def cosign_sign(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, data: bytes) -> str:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return base64.b64encode(key.sign(data)).decode()
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


def cosign_layer(key: ec.EllipticCurvePrivateKey, blob: bytes) -> list[tuple[bytes, dict[str, str]]]:
    """One cosign signature layer: the payload blob and its signature annotation."""
    return [(blob, {SIGNATURE_ANNOTATION: cosign_sign(key, blob)})]


def write_pem_public(key: Any, path: Path) -> Path:
    path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


async def push_cosign(client: httpx.AsyncClient, repo: str, digest: str, layers: list[tuple[bytes, dict[str, str]]],
                      *, referrer: bool = False, layer_type: str = SIMPLESIGNING_MEDIA_TYPE) -> str:
    """Pushes a cosign signature manifest: tagged ``sha256-<hex>.sig``, or an OCI 1.1 referrer."""
    descriptors = []
    for blob, layer_annotations in layers:
        await push_blob(client, repo, blob)
        descriptors.append({"mediaType": layer_type, "digest": str(digest_of(blob)), "size": len(blob),
                            "annotations": layer_annotations})
    if referrer:
        config = b"{}"
        config_type = "application/vnd.oci.empty.v1+json"
    else:
        config = json.dumps({"architecture": "", "os": "", "config": {},
                             "rootfs": {"type": "layers",
                                        "diff_ids": [d["digest"] for d in descriptors]}}).encode()
        config_type = "application/vnd.oci.image.config.v1+json"
    await push_blob(client, repo, config)
    document: dict[str, Any] = {"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
                                "config": {"mediaType": config_type, "digest": str(digest_of(config)),
                                           "size": len(config)},
                                "layers": descriptors}
    if referrer:
        subject = await client.head(f"/v2/{repo}/manifests/{digest}")
        document["artifactType"] = ARTIFACT_TYPE
        document["subject"] = {"mediaType": subject.headers["content-type"], "digest": digest,
                               "size": int(subject.headers["content-length"])}
    body = json.dumps(document).encode()
    reference = str(digest_of(body)) if referrer else signature_tag(Digest.parse(digest))
    r = await client.put(f"/v2/{repo}/manifests/{reference}", content=body,
                         headers={"Content-Type": mediatypes.OCI_MANIFEST})
    assert r.status_code == 201, r.text
    return str(digest_of(body))


# ---- the signed payload and identities (pure) --------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("seed.example:5000/prod/app:v1", ("seed.example:5000", "prod/app", "v1", None)),
    ("127.0.0.1:5000/prod/app", ("127.0.0.1:5000", "prod/app", None, None)),
    ("localhost/app@sha256:" + "a" * 64, ("localhost", "app", None, "sha256:" + "a" * 64)),
    ("busybox", ("docker.io", "library/busybox", None, None)),
    ("team/app:latest", ("docker.io", "team/app", "latest", None)),
    ("[::1]:5000/a/b:t@sha256:" + "b" * 64, ("[::1]:5000", "a/b", "t", "sha256:" + "b" * 64)),
])
def test_docker_references_are_normalized_like_docker(text: str, expected: tuple[str, ...]) -> None:
    ref = parse_docker_reference(text)
    assert (ref.domain, ref.path, ref.tag, ref.digest) == expected


@pytest.mark.parametrize("text", ["", "Seed/App", "host:5000/", "host/app:bad tag", "host/app@sha256:xyz",
                                  "a" * 2000, "host/../etc", "-bad-/app"])
def test_bad_docker_references_are_refused(text: str) -> None:
    with pytest.raises(SignatureInvalid):
        parse_docker_reference(text)


@pytest.mark.parametrize(("signed", "tag", "mode", "expected"), [
    # matchRepoDigestOrExact (signedBy's default): by tag exactly repository:tag; by digest the repository.
    ("h.example/prod/app:v1", "v1", "matchRepoDigestOrExact", True),
    ("h.example/prod/app:v1", "v2", "matchRepoDigestOrExact", False),
    ("h.example/prod/app:v1", None, "matchRepoDigestOrExact", True),
    ("h.example/prod/app", "v1", "matchRepoDigestOrExact", False),  # name-only: never, as in containers/image
    ("h.example/prod/other:v1", "v1", "matchRepoDigestOrExact", False),
    ("h.example/prod/app:v1", "v1", "matchExact", True),
    ("h.example/prod/app:v1", None, "matchExact", False),
    ("h.example/prod/app@sha256:" + "c" * 64, None, "matchExact", True),
    ("h.example/prod/app", "v1", "matchRepository", True),  # how cosign signs
    ("h.example/prod/app:v9", None, "matchRepository", True),
    ("h.example/prod/apps", "v1", "matchRepository", False),
])
def test_identity_matching_follows_containers_image(signed: str, tag: str | None, mode: str, expected: bool) -> None:
    reference = parse_docker_reference(signed)
    assert identity_matches(reference, "prod/app", tag, mode=mode, digest="sha256:" + "c" * 64) is expected


def test_identity_registries_restrict_the_host() -> None:
    reference = parse_docker_reference("other.example/prod/app:v1")
    assert not identity_matches(reference, "prod/app", "v1", mode="matchRepoDigestOrExact", registries=(HOST,))
    assert identity_matches(parse_docker_reference(f"{HOST}/prod/app:v1"), "prod/app", "v1",
                            mode="matchRepoDigestOrExact", registries=(HOST,))


def test_claims_are_read_strictly() -> None:
    digest = "sha256:" + "d" * 64
    claim = parse_claim(payload(f"{HOST}/prod/app:v1", digest), ATOMIC_TYPE)
    assert str(claim.docker_reference) == f"{HOST}/prod/app:v1" and str(claim.manifest_digest) == digest
    assert parse_claim(payload(f"{HOST}/prod/app", digest, COSIGN_TYPE), COSIGN_TYPE).type == COSIGN_TYPE
    bad = {
        "another type": payload("h/a:b", digest, COSIGN_TYPE),
        "an unknown critical member": payload("h/a:b", digest, ATOMIC_TYPE, extra={"x": 1}),
        "not JSON": b"\x00\x01",
        "no critical": b'{"optional": {}}',
        "a bad digest": payload("h/a:b", "sha256:nothex"),
        "a bad reference": payload("H/A:b", digest),
        "huge": b'{"critical": {}, "pad": "' + b"x" * 70_000 + b'"}',
    }
    for case, data in bad.items():
        with pytest.raises(SignatureInvalid):
            parse_claim(data, ATOMIC_TYPE)
            pytest.fail(case)


def test_extension_bodies_are_checked() -> None:
    digest = Digest.parse("sha256:" + "e" * 64)
    good = parse_extension_signature(extension_body(str(digest), b"sig", "a" * 32), digest)
    assert good.name == f"{digest}@{'a' * 32}" and good.content == b"sig"
    assert json.loads(json.dumps(good.to_json()))["content"] == base64.b64encode(b"sig").decode()
    other = "sha256:" + "f" * 64
    cases = [b"[]", b"{", extension_body(other, b"sig"), extension_body(str(digest), b""),
             extension_body(str(digest), b"sig", "XYZ"), extension_body(str(digest), b"x" * (64 * 1024 + 1)),
             json.dumps({"schemaVersion": 2, "name": f"{digest}@{'0' * 32}", "type": "sigstore",
                         "content": "c2ln"}).encode(),
             json.dumps({"schemaVersion": 2, "name": f"{digest}@{'0' * 32}", "type": "atomic",
                         "content": "not base64!"}).encode(),
             json.dumps({"schemaVersion": 1, "name": f"{digest}@{'0' * 32}", "type": "atomic",
                         "content": "c2ln"}).encode(),
             json.dumps({"schemaVersion": 2, "name": f"{digest}@{'0' * 32}", "type": "atomic",
                         "content": "c2ln", "extra": 1}).encode()]
    for body in cases:
        with pytest.raises(SignatureInvalid):
            parse_extension_signature(body, digest)


def test_cosign_manifests_are_read_layer_by_layer() -> None:
    payload_blob = b"{}"
    good = {"mediaType": SIMPLESIGNING_MEDIA_TYPE, "digest": str(digest_of(payload_blob)), "size": 2,
            "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(b"sig").decode()}}
    layers = [good, {**good, "mediaType": "application/octet-stream"}, {**good, "annotations": {}},
              {**good, "annotations": {SIGNATURE_ANNOTATION: "%%%"}}, {**good, "size": 10_000_000}]
    manifest = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                                      "digest": str(digest_of(b"{}")), "size": 2}, "layers": layers}).encode()
    parsed = parse_signature_manifest(manifest, mediatypes.OCI_MANIFEST)
    assert parsed[0].signature == b"sig" and not parsed[0].error
    assert ["simple-signing payload" in parsed[1].error, "no dev.cosignproject" in parsed[2].error,
            "not base64" in parsed[3].error, "bytes (at most" in parsed[4].error] == [True] * 4
    for body, media_type in [(b"not json", mediatypes.OCI_MANIFEST), (manifest, mediatypes.OCI_INDEX),
                             (manifest.replace(b'"layers": [', b'"layers": [], "x": ['), mediatypes.OCI_MANIFEST)]:
        with pytest.raises(SignatureInvalid):
            parse_signature_manifest(body, media_type)


# ---- trusted keys ---------------------------------------------------------------------------------


def test_trusted_keys_load_openpgp_and_pem(release: GpgHome, cosign_key: ec.EllipticCurvePrivateKey,
                                           tmp_path: Path) -> None:
    armored = release.export_public(tmp_path / "release.asc")
    binary = release.export_public(tmp_path / "release.gpg", armor=False)
    pems = {"p256.pub": cosign_key, "ed.pub": ed25519.Ed25519PrivateKey.generate(),
            "rsa.pub": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
    paths = [armored, binary, *(write_pem_public(key, tmp_path / name) for name, key in pems.items())]
    keys = load_trusted_keys(paths)
    assert [k.fingerprint for k in keys.openpgp] == [release.fingerprint] * 2
    assert [k.kind for k in keys.pem] == ["ecdsa-p256", "ed25519", "rsa-2048"]
    assert keys.openpgp_key(release.fingerprint.lower()) is not None and keys.keyring
    assert keys.id != load_trusted_keys(paths[:1]).id == load_trusted_keys(paths[:1]).id
    assert {entry["type"] for entry in keys.describe()} == {"openpgp", "ecdsa-p256", "ed25519", "rsa-2048"}


def test_unusable_keys_are_config_errors_naming_the_file(release: GpgHome, tmp_path: Path) -> None:
    def pem_private(key: Any) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    cases: dict[str, tuple[bytes | None, str]] = {
        "secret.asc": (release.export_secret(tmp_path / "s").read_bytes(), "private key"),
        "private.pem": (pem_private(ec.generate_private_key(ec.SECP256R1())), "private key"),
        "dsa.pub": (None, "unsupported key type"),
        "x25519.pub": (None, "unsupported key type"),
        "p224.pub": (None, "unsupported elliptic curve"),
        "rsa1024.pub": (None, "too weak"),
        "cert.pem": (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "certificate"),
        "garbage.txt": (b"hello, I am not a key\n", "unknown key type"),
        "broken.asc": (b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nAAAA\n-----END PGP PUBLIC KEY BLOCK-----\n",
                       "OpenPGP"),
        "empty.asc": (b"", "empty"),
    }
    write_pem_public(dsa.generate_private_key(key_size=2048), tmp_path / "dsa.pub")
    (tmp_path / "x25519.pub").write_bytes(x25519.X25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    write_pem_public(ec.generate_private_key(ec.SECP224R1()), tmp_path / "p224.pub")
    write_pem_public(rsa.generate_private_key(public_exponent=65537, key_size=1024), tmp_path / "rsa1024.pub")
    for name, (data, message) in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=message) as info:
            load_trusted_keys([tmp_path / name])
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_trusted_keys([tmp_path / "missing.asc"])


def test_signatures_section_of_the_configuration(release: GpgHome, tmp_path: Path) -> None:
    release.export_public(tmp_path / "release.asc")
    config = tmp_path / "seed.toml"
    config.write_text('[[signatures]]\nrepositories = ["prod/**"]\nkeys = ["release.asc"]\n'
                      'signed_identity = "matchRepository"\nregistries = ["seed.example:5000"]\n')
    policy = load_config(config).signatures
    rule = policy.rule_for("prod/app")
    assert rule is not None and rule.mode == "enforce" and rule.keys == (tmp_path / "release.asc",)
    assert rule.trusted.openpgp[0].fingerprint == release.fingerprint and policy.rule_for("dev/app") is None
    bad = {
        'mode = "audit"': "mode must be",
        'signed_identity = "matchAnything"': "signed_identity must be",
        "surprise = 1": "unknown setting",
        'keys = []': "at least one trusted public key",
        'keys = ["nope.asc"]': "cannot read",
        'repositories = ["prod/***"]': "invalid repository pattern",
    }
    for line, message in bad.items():
        key = line.split(" ")[0]
        base = {"repositories": '["prod/**"]', "keys": '["release.asc"]'}
        base.pop(key, None)
        text = "[[signatures]]\n" + "".join(f"{k} = {v}\n" for k, v in base.items()) + line + "\n"
        config.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(config)
    with pytest.raises(ConfigError, match="array of tables"):
        from_toml({"signatures": {"repositories": ["x"]}})


# ---- the signature store (one conformance test for every implementation) -------------------------


@pytest.fixture(params=["file", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SignatureStore:
    if request.param == "memory":
        return MemorySignatureStore()
    return FileSignatureStore(Storage(tmp_path / "data", chunk_size=1024 * 1024))


def test_signature_store_conformance(store: SignatureStore) -> None:
    digest = Digest.parse("sha256:" + "1" * 64)
    other = Digest.parse("sha256:" + "2" * 64)

    def signature(n: int, content: bytes = b"c") -> ExtensionSignature:
        return ExtensionSignature(f"{digest}@{n:032x}", content + bytes([n]))

    assert store.list_signatures("a/b", digest) == []
    empty = store.version("a/b", digest)
    assert store.add_signature("a/b", digest, signature(1)) is True
    first = store.version("a/b", digest)
    assert first != empty
    assert store.add_signature("a/b", digest, signature(2)) is True
    assert store.add_signature("a/b", digest, signature(1, b"replaced")) is False
    assert store.version("a/b", digest) != first
    assert sorted(s.content for s in store.list_signatures("a/b", digest)) == [b"c\x02", b"replaced\x01"]
    assert store.list_signatures("a/c", digest) == store.list_signatures("a/b", other) == []
    for n in range(3, MAX_SIGNATURES + 1):
        store.add_signature("a/b", digest, signature(n))
    with pytest.raises(TooManySignatures):
        store.add_signature("a/b", digest, signature(MAX_SIGNATURES + 1))
    store.add_signature("a/b", digest, signature(5, b"still replaceable"))
    assert store.remove_signatures("a/b", digest, signature(2).name) == 1
    assert store.remove_signatures("a/b", digest, signature(2).name) == 0
    assert store.remove_signatures("a/b", digest, f"{other}@{'0' * 32}") == 0
    assert store.remove_signatures("a/b", digest) == MAX_SIGNATURES - 1
    assert store.list_signatures("a/b", digest) == []


# ---- gpgv ---------------------------------------------------------------------------------------


async def test_gpgv_accepts_one_good_signature_and_explains_the_rest(release: GpgHome, intruder: GpgHome,
                                                                      tmp_path: Path) -> None:
    keys = load_trusted_keys([release.export_public(tmp_path / "release.asc")])
    keyring = tmp_path / "ring.gpg"
    keyring.write_bytes(keys.keyring)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    verifier = OpenPGPVerifier(require_tool("gpgv"), keyring, home)
    message = release.sign(b"the payload")
    verified = await verifier.verify(message)
    assert verified.payload == b"the payload" and verified.primary_key == release.fingerprint
    tampered = release.sign(b"the payload", compress=False).replace(b"the payload", b"the paylOad")
    # A zip bomb: 20 MB of zeros compress to a few KiB; gpgv is killed past the payload limit.
    bomb = release.gpg("--passphrase", "", "--local-user", release.fingerprint, "--compress-level", "9", "--sign",
                       "--output", "-", input=bytes(20 * 1024 * 1024))
    assert len(bomb) < 64 * 1024
    detached = release.gpg("--passphrase", "", "--local-user", release.fingerprint, "--detach-sign", "--output", "-",
                           input=b"x")
    cases = [
        ("not trusted", intruder.sign(b"the payload")),
        ("does not match", tampered),
        ("not an OpenPGP", b"garbage, not a message"),
        ("larger than", bomb),
        ("not an OpenPGP", detached),  # a detached signature carries no payload
    ]
    for expected, data in cases:
        with trio.fail_after(WAIT), pytest.raises(SignatureInvalid, match=expected):
            await verifier.verify(data)


# ---- the seed over HTTP ---------------------------------------------------------------------------


@dataclass
class SignedSeed:
    info: ServerInfo
    registry: SeedRegistry
    client: httpx.AsyncClient
    data: Path
    config_path: Path
    verdicts: list[SignatureVerdict] = field(default_factory=list)

    def audit(self, action: str) -> list[AuditEvent]:
        return [r.event for r in iter_directory_records(audit_directory(self.data)) if r.action == action]

    async def wait_audit(self, action: str, predicate: Callable[[AuditEvent], bool]) -> AuditEvent:
        with trio.fail_after(WAIT):
            while True:
                found = [record for record in self.audit(action) if predicate(record)]
                if found:
                    return found[-1]
                await trio.sleep(0.02)

    async def put_signature(self, repo: str, digest: str, content: bytes, suffix: str = "0" * 32) -> httpx.Response:
        return await self.client.put(f"/extensions/v2/{repo}/signatures/{digest}",
                                     content=extension_body(digest, content, suffix))

    async def verdict(self, repo: str, reference: str) -> dict[str, Any]:
        r = await self.client.get(f"/extensions/v2/{repo}/verdict/{reference}")
        assert r.status_code == 200, r.text
        return dict(r.json())


POLICY = """
[scan]
enabled = false

[[signatures]]
repositories = ["prod/**"]
keys = ["release.asc"]

[[signatures]]
repositories = ["staging/**"]
keys = ["release.asc"]
mode = "warn"

[[signatures]]
repositories = ["cosign/**"]
keys = ["cosign.pub"]
signed_identity = "matchRepository"

[[signatures]]
repositories = ["strict/**"]
keys = ["cosign.pub", "release.asc"]
"""


@pytest.fixture
async def signed_seed(nursery: trio.Nursery, tmp_path: Path, release: GpgHome,
                      cosign_key: ec.EllipticCurvePrivateKey) -> AsyncIterator[SignedSeed]:
    release.export_public(tmp_path / "release.asc")
    write_pem_public(cosign_key, tmp_path / "cosign.pub")
    config_path = tmp_path / "seed.toml"
    config_path.write_text(POLICY)
    data = tmp_path / "data"
    config = load_config(config_path, listen="127.0.0.1:0", data=data)
    info, registry = await nursery.start(partial(serve_seed, config))
    async with httpx.AsyncClient(base_url=info.url, trust_env=False, timeout=30) as client:
        seed = SignedSeed(info, registry, client, data, config_path)
        registry.on_signature_verdict.append(seed.verdicts.append)
        yield seed


def gpg_signature(home: GpgHome, repo: str, tag: str | None, digest: str) -> bytes:
    reference = f"{HOST}/{repo}:{tag}" if tag else f"{HOST}/{repo}"
    return home.sign(payload(reference, digest))


async def test_v2_announces_the_signature_extension(signed_seed: SignedSeed, nursery: trio.Nursery,
                                                    tmp_path: Path) -> None:
    r = await signed_seed.client.get("/v2/")
    assert r.status_code == 200 and r.headers["x-registry-supports-signatures"] == "1"
    # With access control, containers/image reads the header from its first, refused, ping.
    make_htpasswd(tmp_path / "htpasswd", {"alice": "alice-pw"})
    (tmp_path / "auth.toml").write_text(f'[auth]\nhtpasswd = "{tmp_path / "htpasswd"}"\n')
    config = load_config(tmp_path / "auth.toml", listen="127.0.0.1:0", data=tmp_path / "auth-data")
    info, _registry = await nursery.start(partial(serve_seed, config))
    async with httpx.AsyncClient(base_url=info.url, trust_env=False) as client:
        r = await client.get("/v2/")
    assert r.status_code == 401 and r.headers["x-registry-supports-signatures"] == "1"


async def test_signature_api_stores_lists_and_bounds(signed_seed: SignedSeed, release: GpgHome) -> None:
    seed = signed_seed
    _, digest, _ = await push_image(seed.client, "dev/app", "v1")
    path = f"/extensions/v2/dev/app/signatures/{digest}"
    assert (await seed.client.get(path)).json() == {"signatures": []}
    signature = gpg_signature(release, "dev/app", "v1", digest)
    r = await seed.put_signature("dev/app", digest, signature, "a" * 32)
    assert r.status_code == 201, r.text
    assert (await seed.put_signature("dev/app", digest, b"second", "b" * 32)).status_code == 201
    listed = (await seed.client.get(path)).json()["signatures"]
    assert [base64.b64decode(s["content"]) for s in listed] == [signature, b"second"]
    assert listed[0] == {"schemaVersion": 2, "name": f"{digest}@{'a' * 32}", "type": "atomic",
                         "content": base64.b64encode(signature).decode()}
    # Unknown manifests, malformed bodies, oversize bodies and too many signatures: 4xx, never 500.
    missing = str(digest_of(b"never pushed"))
    assert (await seed.client.get(f"/extensions/v2/dev/app/signatures/{missing}")).status_code == 404
    assert (await seed.put_signature("dev/app", missing, b"x")).status_code == 404
    assert (await seed.client.get("/extensions/v2/dev/app/signatures/sha256:nope")).status_code == 400
    assert (await seed.client.put(path, content=b"{not json")).status_code == 400
    r = await seed.client.put(path, content=extension_body(str(digest_of(b"x")), b"sig"))
    assert r.status_code == 400 and "another manifest" in r.json()["errors"][0]["message"]
    assert (await seed.client.put(path, content=b"x" * (200 * 1024))).status_code == 413
    for n in range(2, MAX_SIGNATURES):
        assert (await seed.put_signature("dev/app", digest, b"s", f"{n:032x}")).status_code == 201
    r = await seed.put_signature("dev/app", digest, b"one too many", "f" * 32)
    assert r.status_code == 409 and r.json()["errors"][0]["code"] == "DENIED"
    assert (await seed.client.post(path)).status_code == 405
    # DELETE one by name, then all.
    r = await seed.client.delete(path, params={"name": f"{digest}@{'b' * 32}"})
    assert r.status_code == 202 and r.json() == {"removed": 1}
    assert (await seed.client.delete(path, params={"name": f"{digest}@{'b' * 32}"})).status_code == 404
    assert (await seed.client.delete(path)).json() == {"removed": MAX_SIGNATURES - 1}
    assert (await seed.client.get(path)).json() == {"signatures": []}
    record = await seed.wait_audit("signature.push", lambda e: e.detail["name"] == f"{digest}@{'a' * 32}")
    assert record.repository == "dev/app" and record.detail["size"] == len(signature)
    await seed.wait_audit("signature.delete", lambda e: e.digest == digest)


async def test_signatures_go_with_their_manifest_and_gc_removes_orphans(signed_seed: SignedSeed) -> None:
    seed = signed_seed
    _, digest, _ = await push_image(seed.client, "dev/app", "v1")
    _, kept, _ = await push_image(seed.client, "dev/app", "v2")
    for target in (digest, kept):
        assert (await seed.put_signature("dev/app", target, b"sig")).status_code == 201
    directory = seed.registry.storage.signatures_dir("dev/app", Digest.parse(digest))
    assert directory.is_dir()
    assert (await seed.client.delete(f"/v2/dev/app/manifests/{digest}")).status_code == 202
    assert not directory.exists()
    # A crash between the manifest's removal and its signatures' (simulated): GC finishes the job.
    orphan = seed.registry.storage.signatures_dir("dev/app", Digest.parse(str(digest_of(b"gone"))))
    orphan.mkdir(parents=True)
    (orphan / ("0" * 32 + ".json")).write_text("{}")
    storage = Storage(seed.data, chunk_size=1024 * 1024, clean_tmp=False)
    assert storage.collect_garbage(dry_run=True, grace=0).removed_signatures == 1 and orphan.exists()
    assert storage.collect_garbage(dry_run=False, grace=0).removed_signatures == 1 and not orphan.exists()
    kept_listing = await seed.client.get(f"/extensions/v2/dev/app/signatures/{kept}")
    assert len(kept_listing.json()["signatures"]) == 1


async def test_enforced_pulls_need_a_trusted_signature_of_exactly_that_image(
        signed_seed: SignedSeed, release: GpgHome, intruder: GpgHome) -> None:
    seed = signed_seed
    manifest, signed, layers = await push_image(seed.client, "prod/app", "v1")
    _, unsigned, _ = await push_image(seed.client, "prod/unsigned", "v1")
    assert (await seed.put_signature("prod/app", signed, gpg_signature(release, "prod/app", "v1", signed))).is_success
    r = await seed.client.get("/v2/prod/app/manifests/v1")
    assert r.status_code == 200 and r.content == manifest
    # The blobs of an allowed image, and any pull by digest, are served as always.
    assert (await seed.client.get(f"/v2/prod/app/blobs/{digest_of(layers[0])}")).status_code == 200
    assert (await seed.client.get(f"/v2/prod/unsigned/manifests/{unsigned}")).status_code == 200

    async def refused(repo: str, tag: str, reason: str) -> None:
        for method in ("GET", "HEAD"):  # containerd resolves a tag with HEAD
            r = await seed.client.request(method, f"/v2/{repo}/manifests/{tag}")
            assert r.status_code == 403, (repo, tag, r.text)
        r = await seed.client.get(f"/v2/{repo}/manifests/{tag}")
        error = r.json()["errors"][0]
        assert error["code"] == "DENIED" and "signature policy" in error["message"], error
        assert reason in error["message"], error["message"]
        assert error["detail"]["policy"] == "signatures"

    await refused("prod/unsigned", "v1", "has no signature")
    # A signature of another image (its digest), put under this one.
    _, victim, _ = await push_image(seed.client, "prod/victim", "v1")
    await seed.put_signature("prod/victim", victim, gpg_signature(release, "prod/victim", "v1", signed))
    await refused("prod/victim", "v1", f"for manifest {signed}, not this one")
    # A key that is not trusted.
    _, foreign, _ = await push_image(seed.client, "prod/foreign", "v1")
    await seed.put_signature("prod/foreign", foreign, gpg_signature(intruder, "prod/foreign", "v1", foreign))
    await refused("prod/foreign", "v1", "not trusted")
    # The signature edited by one byte.
    _, edited, _ = await push_image(seed.client, "prod/edited", "v1")
    damaged = release.sign(payload(f"{HOST}/prod/edited:v1", edited), compress=False)
    damaged = damaged.replace(b"atomic container signature", b"atomic container signaturE")
    await seed.put_signature("prod/edited", edited, damaged)
    await refused("prod/edited", "v1", "no valid signature")
    # The image edited by one byte, under the same tag, with the original signature copied over.
    changed = manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":  2')
    changed_digest = str(digest_of(changed))
    r = await seed.client.put("/v2/prod/app/manifests/v1", content=changed,
                              headers={"Content-Type": mediatypes.OCI_MANIFEST})
    assert r.status_code == 201
    await seed.put_signature("prod/app", changed_digest, gpg_signature(release, "prod/app", "v1", signed))
    await refused("prod/app", "v1", f"for manifest {signed}, not this one")
    # Signed for another tag: matchRepoDigestOrExact wants exactly repository:tag.
    _, retagged, _ = await push_image(seed.client, "prod/retagged", "v2")
    await seed.put_signature("prod/retagged", retagged, gpg_signature(release, "prod/retagged", "v1", retagged))
    await refused("prod/retagged", "v2", f"but for {HOST}/prod/retagged:v1, not prod/retagged:v2")
    record = await seed.wait_audit("policy.denied", lambda e: e.repository == "prod/unsigned")
    assert record.detail["policy"] == "signatures" and record.reference == "v1"


async def test_verdict_api_reports_signatures_keys_and_verdict(signed_seed: SignedSeed, release: GpgHome,
                                                               intruder: GpgHome) -> None:
    seed = signed_seed
    _, digest, _ = await push_image(seed.client, "prod/app", "v1")
    await seed.put_signature("prod/app", digest, gpg_signature(release, "prod/app", "v1", digest), "1" * 32)
    await seed.put_signature("prod/app", digest, gpg_signature(intruder, "prod/app", "v1", digest), "2" * 32)
    verdict = await seed.verdict("prod/app", "v1")
    assert verdict["verdict"] == "allowed" and verdict["allowed"] and verdict["digest"] == digest
    release_key = str(seed.config_path.parent / "release.asc")
    assert verdict["verified_by"] == [release_key]
    assert verdict["policy"]["mode"] == "enforce" and verdict["policy"]["keys"][0]["fingerprint"] == release.fingerprint
    good, bad = verdict["signatures"]
    assert good["verified"] and good["identity_matches"] and good["key"]["fingerprint"] == release.fingerprint
    assert good["docker_reference"] == f"{HOST}/prod/app:v1" and good["signed_digest"] == digest
    assert not bad["verified"] and "not trusted" in bad["error"]
    # By digest: the repository is enough (matchRepoDigestOrExact); another tag is not.
    assert (await seed.verdict("prod/app", digest))["verdict"] == "allowed"
    await seed.client.put("/v2/prod/app/manifests/v2", content=(await seed.client.get(
        f"/v2/prod/app/manifests/{digest}")).content, headers={"Content-Type": mediatypes.OCI_MANIFEST})
    other_tag = await seed.verdict("prod/app", "v2")
    assert other_tag["verdict"] == "denied" and other_tag["signatures"][0]["identity_matches"] is False
    # Without a rule: no policy, signatures still listed; unknown manifests are 404.
    await push_image(seed.client, "dev/app", "v1")
    assert (await seed.verdict("dev/app", "v1"))["verdict"] == "no-policy"
    assert (await seed.client.get("/extensions/v2/dev/app/verdict/nope")).status_code == 404
    assert (await seed.client.get("/extensions/v2/dev/app/verdict/sha256:bad")).status_code == 400
    record = await seed.wait_audit("signature.verdict", lambda e: e.reference == "v1" and e.digest == digest)
    assert record.detail["verdict"] == "allowed" and record.detail["verified_by"] == [release_key]
    assert any(v.reference == "v2" and v.status == "denied" for v in seed.verdicts)


async def test_warn_mode_serves_and_records_what_is_missing(signed_seed: SignedSeed) -> None:
    seed = signed_seed
    manifest, digest, _ = await push_image(seed.client, "staging/app", "v1")
    r = await seed.client.get("/v2/staging/app/manifests/v1")
    assert r.status_code == 200 and r.content == manifest
    verdict = await seed.verdict("staging/app", "v1")
    assert verdict["verdict"] == "warned" and verdict["allowed"] and "no signature" in verdict["reason"]
    record = await seed.wait_audit("signature.verdict", lambda e: e.repository == "staging/app")
    assert record.detail["verdict"] == "warned" and record.digest == digest


async def test_cosign_signatures_by_tag_and_by_referrer(signed_seed: SignedSeed,
                                                        cosign_key: ec.EllipticCurvePrivateKey) -> None:
    seed = signed_seed
    # By tag (cosign's default), for a repository-only reference (how cosign signs).
    manifest, digest, _ = await push_image(seed.client, "cosign/app", "v1")
    blob = payload(f"{HOST}/cosign/app", digest, COSIGN_TYPE)
    assert (await seed.client.get("/v2/cosign/app/manifests/v1")).status_code == 403
    await push_cosign(seed.client, "cosign/app", digest, cosign_layer(cosign_key, blob))
    r = await seed.client.get("/v2/cosign/app/manifests/v1")
    assert r.status_code == 200 and r.content == manifest
    verdict = await seed.verdict("cosign/app", "v1")
    assert verdict["signatures"][0]["format"] == "cosign" and verdict["signatures"][0]["source"] == "tag"
    # The .sig tag itself is an attachment a cosign client reads: never refused.
    assert (await seed.client.get(f"/v2/cosign/app/manifests/{signature_tag(Digest.parse(digest))}")).is_success
    # As an OCI 1.1 referrer.
    _, referred, _ = await push_image(seed.client, "cosign/ref", "v1")
    blob = payload(f"{HOST}/cosign/ref", referred, COSIGN_TYPE)
    await push_cosign(seed.client, "cosign/ref", referred, cosign_layer(cosign_key, blob),
                      referrer=True)
    assert (await seed.client.get("/v2/cosign/ref/manifests/v1")).status_code == 200
    assert (await seed.verdict("cosign/ref", "v1"))["signatures"][0]["source"] == "referrer"
    # The default identity (strict/**) does not accept cosign's repository-only reference.
    _, strict, _ = await push_image(seed.client, "strict/app", "v1")
    blob = payload(f"{HOST}/strict/app", strict, COSIGN_TYPE)
    await push_cosign(seed.client, "strict/app", strict, cosign_layer(cosign_key, blob))
    r = await seed.client.get("/v2/strict/app/manifests/v1")
    assert r.status_code == 403 and "signed_identity = matchRepoDigestOrExact" in r.json()["errors"][0]["message"]
    blob = payload(f"{HOST}/strict/app:v1", strict, COSIGN_TYPE)
    await push_cosign(seed.client, "strict/app", strict, cosign_layer(cosign_key, blob))
    assert (await seed.client.get("/v2/strict/app/manifests/v1")).status_code == 200


async def test_bad_cosign_signatures_are_refused_never_a_500(signed_seed: SignedSeed,
                                                             cosign_key: ec.EllipticCurvePrivateKey) -> None:
    seed = signed_seed
    stranger = ec.generate_private_key(ec.SECP256R1())
    cases: dict[str, Callable[[str, str], list[tuple[bytes, dict[str, str]]]]] = {}

    def signed_by(key: Any, transform: Callable[[bytes], bytes] = lambda b: b) -> Callable[[str, str], Any]:
        def make(repo: str, digest: str) -> list[tuple[bytes, dict[str, str]]]:
            blob = payload(f"{HOST}/{repo}", digest, COSIGN_TYPE)
            return [(transform(blob), {SIGNATURE_ANNOTATION: cosign_sign(key, blob)})]
        return make

    cases["untrusted"] = signed_by(stranger)
    cases["ed25519"] = signed_by(ed25519.Ed25519PrivateKey.generate())
    cases["tampered"] = signed_by(cosign_key, lambda b: b.replace(b"cosign container", b"cosign Container"))
    cases["no-annotation"] = lambda repo, digest: [(payload(f"{HOST}/{repo}", digest, COSIGN_TYPE), {})]
    cases["bad-base64"] = lambda repo, digest: [(payload(f"{HOST}/{repo}", digest, COSIGN_TYPE),
                                                 {SIGNATURE_ANNOTATION: "%%% not base64"})]
    huge = b'{"pad": "' + b"x" * (100 * 1024) + b'"}'
    cases["huge-payload"] = lambda repo, digest: [(huge, {SIGNATURE_ANNOTATION: cosign_sign(cosign_key, huge)})]

    def wrong_type(repo: str, digest: str) -> list[tuple[bytes, dict[str, str]]]:
        blob = payload(f"{HOST}/{repo}", digest, ATOMIC_TYPE)
        return cosign_layer(cosign_key, blob)

    cases["atomic-type"] = wrong_type
    cases["other-digest"] = lambda repo, digest: signed_by(cosign_key)(repo, "sha256:" + "0" * 64)
    for name, make in cases.items():
        repo = f"cosign/{name}"
        _, digest, _ = await push_image(seed.client, repo, "v1")
        await push_cosign(seed.client, repo, digest, make(repo, digest))
        r = await seed.client.get(f"/v2/{repo}/manifests/v1")
        assert r.status_code == 403, (name, r.text)
        verdict = await seed.verdict(repo, "v1")
        assert verdict["verdict"] == "denied" and verdict["signatures"], name
        assert all(not s["verified"] and s["error"] for s in verdict["signatures"]), (name, verdict)
    # Layers of the wrong media type, and a .sig tag on an index: errors, not crashes.
    _, digest, _ = await push_image(seed.client, "cosign/wrong-layers", "v1")
    blob = payload(f"{HOST}/cosign/wrong-layers", digest, COSIGN_TYPE)
    await push_cosign(seed.client, "cosign/wrong-layers", digest,
                      cosign_layer(cosign_key, blob), layer_type="text/plain")
    verdict = await seed.verdict("cosign/wrong-layers", "v1")
    assert "not a simple-signing payload" in verdict["signatures"][0]["error"]
    _, digest, _ = await push_image(seed.client, "cosign/index-sig", "v1")
    index = json.dumps({"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": [
        {"mediaType": mediatypes.OCI_MANIFEST, "digest": digest, "size": int(
            (await seed.client.head(f"/v2/cosign/index-sig/manifests/{digest}")).headers["content-length"])}]}).encode()
    r = await seed.client.put(f"/v2/cosign/index-sig/manifests/{signature_tag(Digest.parse(digest))}",
                              content=index, headers={"Content-Type": mediatypes.OCI_INDEX})
    assert r.status_code == 201
    verdict = await seed.verdict("cosign/index-sig", "v1")
    assert "must be an image manifest" in verdict["signatures"][0]["error"]


async def test_verdicts_are_cached_per_digest_and_recomputed_when_things_change(
        signed_seed: SignedSeed, release: GpgHome, intruder: GpgHome, tmp_path: Path) -> None:
    seed = signed_seed
    service = seed.registry.signatures
    _, digest, _ = await push_image(seed.client, "prod/app", "v1")
    assert (await seed.client.get("/v2/prod/app/manifests/v1")).status_code == 403
    await seed.put_signature("prod/app", digest, gpg_signature(release, "prod/app", "v1", digest))
    # The new signature is seen at the next pull (no stale "unsigned" verdict).
    assert (await seed.client.get("/v2/prod/app/manifests/v1")).status_code == 200
    checked = service.verifications
    for _ in range(5):
        assert (await seed.client.get("/v2/prod/app/manifests/v1")).status_code == 200
    assert service.verifications == checked  # warm: no gpgv run
    # A reload with other keys (the intruder's only) computes the verdict again: refused.
    intruder.export_public(tmp_path / "release.asc")
    await seed.registry.reload(load_config(seed.config_path, listen="127.0.0.1:0", data=seed.data))
    r = await seed.client.get("/v2/prod/app/manifests/v1")
    assert r.status_code == 403 and service.verifications > checked
    release.export_public(tmp_path / "release.asc")
    await seed.registry.reload(load_config(seed.config_path, listen="127.0.0.1:0", data=seed.data))
    assert (await seed.client.get("/v2/prod/app/manifests/v1")).status_code == 200
    # Removing the signature is seen too.
    await seed.client.delete(f"/extensions/v2/prod/app/signatures/{digest}")
    assert (await seed.client.get("/v2/prod/app/manifests/v1")).status_code == 403
    statuses = [(v.reference, v.status) for v in seed.verdicts if v.repository == "prod/app"]
    assert ("v1", "denied") in statuses and ("v1", "allowed") in statuses


async def test_a_missing_verifier_fails_closed(signed_seed: SignedSeed, release: GpgHome,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seed = signed_seed
    _, digest, _ = await push_image(seed.client, "prod/app", "v1")
    await seed.put_signature("prod/app", digest, gpg_signature(release, "prod/app", "v1", digest))
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("shutil.which", lambda *args, **kwargs: None)
    seed.registry.signatures.replace_policy(seed.registry.signatures.policy)  # forget prepared verifiers
    r = await seed.client.get("/v2/prod/app/manifests/v1")
    assert r.status_code == 403, r.text
    verdict = await seed.verdict("prod/app", "v1")
    assert "verifier is unavailable" in verdict["signatures"][0]["error"]


async def test_service_audits_changes_only_and_isolates_subscribers(tmp_path: Path, release: GpgHome) -> None:
    release.export_public(tmp_path / "release.asc")
    policy = from_toml({"signatures": [{"repositories": ["prod/**"], "keys": ["release.asc"]}]}, tmp_path)
    storage = Storage(tmp_path / "data", chunk_size=1024 * 1024)
    events: list[tuple[str, dict[str, Any]]] = []
    seen: list[SignatureVerdict] = []

    def broken(verdict: SignatureVerdict) -> None:
        raise RuntimeError("a subscriber bug")

    service = SignatureService(storage, policy, audit=lambda action, fields: events.append((action, dict(fields))),
                               on_verdict=[broken, seen.append], store=MemorySignatureStore())
    config = json.dumps({"os": "linux"}).encode()
    manifest = image_manifest(config, [])
    storage.store_blob_bytes("prod/app", config, digest_of(config))
    parsed = parse_manifest(manifest, mediatypes.OCI_MANIFEST)
    storage.put_manifest("prod/app", manifest, parsed, "v1")
    actor = {"actor": "alice", "actor_kind": "user", "source": "127.0.0.1"}
    for _ in range(3):  # a client retrying: one verdict record, one denial record
        with pytest.raises(OCIError, match="signature policy"):
            await service.check_pull("prod/app", "v1", parsed.digest, actor)
    assert [action for action, _ in events] == ["signature.verdict", "policy.denied"]
    await service.add_signature("prod/app", parsed.digest, extension_body(
        str(parsed.digest), gpg_signature(release, "prod/app", "v1", str(parsed.digest))), actor)
    for _ in range(2):
        await service.check_pull("prod/app", "v1", parsed.digest, actor)
    # The by-digest verdict changed when the signature came, then the tag's: each once.
    assert [(v.reference, v.status) for v in seen] == [("v1", "denied"), (None, "allowed"), ("v1", "allowed")]
    assert [action for action, _ in events] == ["signature.verdict", "policy.denied", "signature.push",
                                                "signature.verdict", "signature.verdict"]
    assert events[0][1]["actor"] == "alice" and events[0][1]["detail"]["verdict"] == "denied"


async def test_nothing_malformed_gives_a_500(signed_seed: SignedSeed) -> None:
    seed = signed_seed
    _, digest, _ = await push_image(seed.client, "prod/app", "v1")
    bodies = [b"", b"\xff\xfe", b"[]", b"{}", b'{"schemaVersion": 2}', b"null", b"9" * 5000,
              json.dumps({"schemaVersion": 2, "name": f"{digest}@{'0' * 32}", "type": "atomic",
                          "content": base64.b64encode(zlib.compress(b"x" * 100)).decode()}).encode()]
    statuses = set()
    for body in bodies:
        statuses.add((await seed.client.put(f"/extensions/v2/prod/app/signatures/{digest}", content=body)).status_code)
    for path in ("/extensions/v2/", "/extensions/v2/prod/app/signatures/", "/extensions/v2/PROD/signatures/" + digest,
                 "/extensions/v2/prod/app/verdict/", "/extensions/v2/prod/app/other/" + digest, "/extensions/x"):
        statuses.add((await seed.client.get(path)).status_code)
    statuses.add((await seed.client.get("/v2/prod/app/manifests/v1")).status_code)  # a garbage signature is stored
    assert statuses <= {201, 400, 403, 404}, statuses
    assert 403 in statuses and 500 not in statuses
