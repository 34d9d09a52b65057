"""One contract for every ``Upstream``: the in-memory fake, our seed, and CNCF distribution.

Each check runs against (a) ``p2pd.testing.MemoryUpstream``, (b) ``HttpUpstream`` talking to
our seed started in-process, and (c) ``HttpUpstream`` talking to Debian's docker-registry
(which has no chunk-map endpoint, so ``get_chunk_map`` must answer None there).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

import seed.config
import seed.registry
from p2pd.config import FetchConfig, UpstreamConfig
from p2pd.errors import UpstreamError, UpstreamNotFound
from p2pd.oci import mediatypes
from p2pd.oci.chunkmap import MIN_CHUNK_SIZE
from p2pd.oci.digest import Digest, digest_of
from p2pd.oci.manifest import Descriptor
from p2pd.signing import cosign
from p2pd.signing.extension import ExtensionSignature
from p2pd.testing import MemoryUpstream
from p2pd.upstream import HttpUpstream, Upstream
from tests.harness.reference_registry import ReferenceRegistry
from tests.test_seed_signatures import push_cosign

TIMEOUT = 20.0  # seconds for one check, including pushing the image
REPOSITORY = "conformance/app"
TAG = "v1"
CHUNK_SIZE = MIN_CHUNK_SIZE


@dataclass(frozen=True)
class Image:
    config: bytes
    layer: bytes
    manifest: bytes

    @property
    def layer_digest(self) -> Digest:
        return digest_of(self.layer)

    @property
    def manifest_digest(self) -> Digest:
        return digest_of(self.manifest)


def _make_image() -> Image:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = random.Random(1).randbytes(5 * CHUNK_SIZE + 1234)  # several chunks and a short last one
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": str(digest_of(config)),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": str(digest_of(layer)),
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    return Image(config, layer, manifest)


IMAGE = _make_image()
SIGNATURE = ExtensionSignature(f"{IMAGE.manifest_digest}@{'ab' * 16}", b"an OpenPGP message")
REFERRER = digest_of(b"a cosign signature manifest")


async def push_image(
    base_url: str, repository: str, tag: str, image: Image, headers: dict[str, str] | None = None
) -> None:
    """Pushes with the plain OCI API: ``POST ?digest=`` (finished with PUT if the registry
    answers 202, as distribution 2.8 does), then ``PUT`` the manifest."""
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, headers=headers or {}) as client:
        for blob in (image.config, image.layer):
            digest = str(digest_of(blob))
            response = await client.post(f"/v2/{repository}/blobs/uploads/", params={"digest": digest}, content=blob)
            if response.status_code == 202:
                location = httpx.URL(base_url).join(response.headers["location"])
                response = await client.put(location.copy_merge_params({"digest": digest}), content=blob)
            assert response.status_code == 201, response.text
        response = await client.put(
            f"/v2/{repository}/manifests/{tag}",
            content=image.manifest,
            headers={"Content-Type": mediatypes.OCI_MANIFEST},
        )
        assert response.status_code == 201, response.text


@dataclass
class Backend:
    upstream: Upstream
    chunk_maps: bool
    # Signatures and referrers stored for IMAGE (None: the registry has no extension / referrers API).
    signature: ExtensionSignature | None = None
    referrer: Digest | None = None


@pytest.fixture(scope="module")
def shared_reference_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReferenceRegistry]:
    with ReferenceRegistry(tmp_path_factory.mktemp("conformance-registry")) as registry:
        yield registry


@pytest.fixture(params=["memory", "seed", "docker-registry"])
def backend_kind(request: pytest.FixtureRequest) -> tuple[str, ReferenceRegistry | None]:
    if request.param == "docker-registry":
        return request.param, request.getfixturevalue("shared_reference_registry")
    return request.param, None


@pytest.fixture
async def backend(
    backend_kind: tuple[str, ReferenceRegistry | None], nursery: trio.Nursery, tmp_path: Path
) -> AsyncIterator[Backend]:
    kind, reference = backend_kind
    upstream: Upstream
    with trio.fail_after(TIMEOUT):
        if kind == "memory":
            memory = MemoryUpstream()
            memory.add_blob(REPOSITORY, IMAGE.config)
            memory.add_blob(REPOSITORY, IMAGE.layer)
            memory.add_manifest(REPOSITORY, IMAGE.manifest, tag=TAG)
            memory.signatures[(REPOSITORY, IMAGE.manifest_digest)] = [SIGNATURE]
            memory.referrers[(REPOSITORY, IMAGE.manifest_digest)] = [
                Descriptor(mediatypes.OCI_MANIFEST, REFERRER, 100, cosign.ARTIFACT_TYPE),
                Descriptor(mediatypes.OCI_MANIFEST, digest_of(b"sbom"), 100, "application/spdx+json")]
            upstream, chunk_maps, signature, referrer = memory, True, SIGNATURE, REFERRER
        else:
            if kind == "seed":
                config = seed.config.load_config(None, listen="127.0.0.1:0", data=tmp_path / "seed")
                info, _ = await nursery.start(functools.partial(seed.registry.serve_seed, config))
                url, chunk_maps = info.url, True
            else:
                assert reference is not None
                url, chunk_maps = reference.url, False
            await push_image(url, REPOSITORY, TAG, IMAGE)
            signature, referrer = None, None
            if kind == "seed":
                async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
                    r = await client.put(f"/extensions/v2/{REPOSITORY}/signatures/{IMAGE.manifest_digest}",
                                         content=json.dumps(SIGNATURE.to_json()).encode())
                    assert r.status_code == 201, r.text
                    signature = SIGNATURE
                    referrer = Digest.parse(await push_cosign(client, REPOSITORY, str(IMAGE.manifest_digest),
                                                              [(b"payload", {})], referrer=True))
            upstream = HttpUpstream(UpstreamConfig(namespace=kind, url=url), FetchConfig())
    try:
        yield Backend(upstream, chunk_maps, signature, referrer)
    finally:
        await upstream.aclose()


async def read_blob(upstream: Upstream, digest: Digest, offset: int = 0) -> tuple[int, int, bytes]:
    async with upstream.open_blob(REPOSITORY, digest, offset) as response:
        data = b"".join([piece async for piece in response.aiter_bytes()])
        assert not response.range_ignored  # every backend here honours Range
        return response.total_size, response.offset, data


async def test_manifest_by_tag_and_digest(backend: Backend) -> None:
    upstream = backend.upstream
    with trio.fail_after(TIMEOUT):
        by_tag = await upstream.get_manifest(REPOSITORY, TAG)
        assert by_tag.body == IMAGE.manifest
        assert by_tag.digest == IMAGE.manifest_digest
        assert by_tag.media_type == mediatypes.OCI_MANIFEST
        assert by_tag.size == len(IMAGE.manifest)

        by_digest = await upstream.get_manifest(REPOSITORY, str(IMAGE.manifest_digest))
        assert by_digest == by_tag

        for reference in (TAG, str(IMAGE.manifest_digest)):
            head = await upstream.head_manifest(REPOSITORY, reference)
            assert (head.digest, head.media_type, head.size, head.body) == (
                IMAGE.manifest_digest,
                mediatypes.OCI_MANIFEST,
                len(IMAGE.manifest),
                None,
            )


async def test_unknown_content_is_not_found(backend: Backend) -> None:
    upstream = backend.upstream
    missing = digest_of(b"not pushed anywhere")
    with trio.fail_after(TIMEOUT):
        for call in (upstream.get_manifest, upstream.head_manifest):
            with pytest.raises(UpstreamNotFound):
                await call(REPOSITORY, "no-such-tag")
            with pytest.raises(UpstreamNotFound):
                await call(REPOSITORY, str(missing))
            with pytest.raises(UpstreamNotFound):
                await call("conformance/other", TAG)
        with pytest.raises(UpstreamNotFound):
            await read_blob(upstream, missing)


async def test_blob_whole_and_resumed(backend: Backend) -> None:
    upstream = backend.upstream
    layer = IMAGE.layer
    with trio.fail_after(TIMEOUT):
        assert await read_blob(upstream, IMAGE.layer_digest) == (len(layer), 0, layer)
        for offset in (1, CHUNK_SIZE, len(layer) - 1):
            assert await read_blob(upstream, IMAGE.layer_digest, offset) == (len(layer), offset, layer[offset:])
        assert await read_blob(upstream, digest_of(IMAGE.config)) == (len(IMAGE.config), 0, IMAGE.config)


async def test_blob_offset_at_end_is_an_error(backend: Backend) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(UpstreamError) as info:
        await read_blob(backend.upstream, IMAGE.layer_digest, len(IMAGE.layer))
    assert info.value.status == 416


async def test_blob_response_can_be_abandoned_early(backend: Backend) -> None:
    upstream = backend.upstream
    with trio.fail_after(TIMEOUT):
        async with upstream.open_blob(REPOSITORY, IMAGE.layer_digest) as response:
            async for piece in response.aiter_bytes():
                assert IMAGE.layer.startswith(piece)
                break
        # The upstream is still usable afterwards.
        assert (await read_blob(upstream, IMAGE.layer_digest))[2] == IMAGE.layer


async def test_chunk_map(backend: Backend) -> None:
    upstream = backend.upstream
    with trio.fail_after(TIMEOUT):
        chunk_map = await upstream.get_chunk_map(REPOSITORY, IMAGE.layer_digest, CHUNK_SIZE)
        if not backend.chunk_maps:
            assert chunk_map is None
            return
        assert chunk_map is not None
        assert (chunk_map.digest, chunk_map.size, chunk_map.chunk_size) == (
            IMAGE.layer_digest,
            len(IMAGE.layer),
            CHUNK_SIZE,
        )
        assert len(chunk_map.hashes) == 6
        for index in range(len(chunk_map.hashes)):
            offset, length = chunk_map.chunk_bounds(index)
            assert chunk_map.verify_chunk(index, IMAGE.layer[offset : offset + length])
        # An unknown blob has no map, and that does not turn chunk maps off for the upstream.
        assert await upstream.get_chunk_map(REPOSITORY, digest_of(b"unknown"), CHUNK_SIZE) is None
        assert await upstream.get_chunk_map(REPOSITORY, IMAGE.layer_digest, CHUNK_SIZE) == chunk_map


async def test_invalid_names_are_refused_before_any_request(backend: Backend) -> None:
    from p2pd.oci.errors import OCIError

    upstream = backend.upstream
    with trio.fail_after(TIMEOUT):
        for repository in ("../etc", "UPPER/case", "a//b"):
            with pytest.raises(OCIError):
                await upstream.get_manifest(repository, TAG)
        for reference in ("bad tag", "sha256:xyz", "../x"):
            with pytest.raises(OCIError):
                await upstream.head_manifest(REPOSITORY, reference)


async def test_signatures_and_referrers(backend: Backend) -> None:
    upstream = backend.upstream
    digest = IMAGE.manifest_digest
    with trio.fail_after(TIMEOUT):
        signatures = await upstream.get_signatures(REPOSITORY, digest)
        assert signatures == ([backend.signature] if backend.signature else [])
        referrers = await upstream.get_referrers(REPOSITORY, digest, cosign.ARTIFACT_TYPE)
        assert [d.digest for d in referrers] == ([backend.referrer] if backend.referrer else [])
        assert all(d.artifact_type == cosign.ARTIFACT_TYPE for d in referrers)
        # Unknown manifests and repositories: nothing to verify, not an error.
        unknown = digest_of(b"never pushed")
        assert await upstream.get_signatures(REPOSITORY, unknown) == []
        assert await upstream.get_signatures("conformance/other", digest) == []
        assert await upstream.get_referrers(REPOSITORY, unknown, cosign.ARTIFACT_TYPE) == []
