"""The seed's OCI Distribution API, endpoint by endpoint, against a real in-process seed on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx
import msgpack
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from p2pd.httpd import FileBody, ServerInfo
from p2pd.oci import mediatypes
from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE, MIN_CHUNK_SIZE, ChunkMap, chunk_size_for
from p2pd.oci.digest import Digest, digest_of
from p2pd.oci.manifest import MAX_MANIFEST_SIZE
from seed.cli import main as seed_main
from seed.config import SeedConfig, load_config
from seed.registry import CHUNK_MAP_MEDIA_TYPE, SeedRegistry, serve_seed
from seed.storage import Storage

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
MISSING = str(digest_of(b"this blob was never pushed"))


@dataclass
class Seed:
    info: ServerInfo
    registry: SeedRegistry
    client: httpx.AsyncClient
    config: SeedConfig
    data: Path


@pytest.fixture
async def seed(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Seed]:
    data = tmp_path / "data"
    config = load_config(None, listen="127.0.0.1:0", data=data)
    info, registry = await nursery.start(partial(serve_seed, config))
    async with httpx.AsyncClient(base_url=info.url, trust_env=False, timeout=30) as client:
        yield Seed(info, registry, client, config, data)


# ---- helpers ---------------------------------------------------------------------------


def _error_code(response: httpx.Response) -> str:
    """The single OCI error code of a response, after checking the error body's shape."""
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert list(document) == ["errors"]
    assert len(document["errors"]) == 1
    entry = document["errors"][0]
    assert {"code", "message"} <= set(entry) <= {"code", "message", "detail"}
    assert isinstance(entry["message"], str)
    return str(entry["code"])


def _assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    assert _error_code(response) == code


async def push_blob(client: httpx.AsyncClient, name: str, data: bytes) -> str:
    """Monolithic push: POST, then PUT ?digest= with the whole body."""
    digest = str(digest_of(data))
    r = await client.post(f"/v2/{name}/blobs/uploads/")
    assert r.status_code == 202, r.text
    r = await client.put(r.headers["location"], params={"digest": digest}, content=data)
    assert r.status_code == 201, r.text
    return digest


def _descriptor(data: bytes, media_type: str = LAYER_TYPE) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(digest_of(data)), "size": len(data)}


def image_manifest(config: bytes, layers: list[bytes], **extra: Any) -> bytes:
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": _descriptor(config, extra.pop("config_type", CONFIG_TYPE)),
        "layers": [_descriptor(layer) for layer in layers],
        **extra,
    }
    # Indented on purpose: the registry must store and return these exact bytes.
    return json.dumps(document, indent=3).encode() + b"\n"


async def push_image(
    client: httpx.AsyncClient, name: str, tag: str | None, *, seed_bytes: int = 0, **extra: Any
) -> tuple[bytes, str, list[bytes]]:
    """Pushes a config and two layers, then the manifest (by tag, or by digest when tag is None)."""
    rng = random.Random(f"{name}:{tag}:{seed_bytes}")
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": rng.random()}).encode()
    layers = [rng.randbytes(1000 + seed_bytes), rng.randbytes(3000)]
    for blob in (config, *layers):
        await push_blob(client, name, blob)
    manifest = image_manifest(config, layers, **extra)
    digest = str(digest_of(manifest))
    r = await client.put(
        f"/v2/{name}/manifests/{tag or digest}", content=manifest, headers={"Content-Type": mediatypes.OCI_MANIFEST}
    )
    assert r.status_code == 201, r.text
    return manifest, digest, [config, *layers]


async def raw_request(
    info: ServerInfo, method: str, target: str, headers: list[tuple[str, str]] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One request with a target sent exactly as given (httpx would normalise ``..``)."""
    conn = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(info.host, info.port)
    all_headers = [("Host", "seed"), ("Connection", "close"), ("Content-Length", str(len(body))), *(headers or [])]
    try:
        with trio.fail_after(10):
            await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=all_headers)))
            if body:
                await stream.send_all(conn.send(h11.Data(data=body)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            status, response_headers, content = 0, {}, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    content += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return status, response_headers, bytes(content)
                else:
                    raise AssertionError(f"unexpected {event!r}")
    finally:
        await stream.aclose()


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def _metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    r = await client.get("/metrics")
    assert r.status_code == 200
    return _metrics(r.text).get((name, tuple(sorted(labels.items()))), 0.0)


def _files_outside(root: Path, data: Path) -> set[Path]:
    return {p for p in root.rglob("*") if data not in p.parents and p != data}


# ---- base, health, routing -------------------------------------------------------------


async def test_base_endpoint(seed: Seed) -> None:
    r = await seed.client.get("/v2/")
    assert r.status_code == 200
    assert r.json() == {}
    assert r.headers["docker-distribution-api-version"] == "registry/2.0"
    r = await seed.client.head("/v2/")
    assert r.status_code == 200
    assert r.content == b""
    assert (await seed.client.get("/v2")).status_code == 200
    r = await seed.client.post("/v2/")
    _assert_error(r, 405, "UNSUPPORTED")
    assert "GET" in r.headers["allow"]


async def test_healthz_and_unknown_routes(seed: Seed) -> None:
    r = await seed.client.get("/healthz")
    assert (r.status_code, r.text) == (200, "ok\n")
    for path in (
        "/",
        "/nope",
        "/v1/",
        "/v2x",
        "/v2/foo",
        "/v2/foo/bar",
        "/v2/foo/blobs",
        "/v2/foo/tags/list/x",
        "/v2/foo/manifests",
        "/v2/foo/referrers",
    ):
        r = await seed.client.get(path)
        _assert_error(r, 404, "NOT_FOUND")


async def test_wrong_method_is_405(seed: Seed) -> None:
    digest = await push_blob(seed.client, "repo", b"x")
    cases = [
        ("POST", "/v2/repo/manifests/latest"),
        ("PATCH", f"/v2/repo/blobs/{digest}"),
        ("PUT", f"/v2/repo/blobs/{digest}"),
        ("POST", "/v2/repo/tags/list"),
        ("DELETE", "/v2/repo/tags/list"),
        ("PUT", "/v2/_catalog"),
        ("POST", f"/v2/repo/referrers/{digest}"),
        ("DELETE", f"/v2/repo/blobs/{digest}/chunks"),
        ("OPTIONS", "/v2/repo/manifests/latest"),
        ("POST", "/v2/repo/blobs/uploads/0123456789abcdef0123456789abcdef"),
    ]
    for method, path in cases:
        r = await seed.client.request(method, path)
        _assert_error(r, 405, "UNSUPPORTED")
        assert r.headers.get("allow"), (method, path)
        assert method not in r.headers["allow"].split(", ")


# ---- blob push ---------------------------------------------------------------------------


async def test_monolithic_push(seed: Seed) -> None:
    data = random.Random(1).randbytes(50_000)
    digest = str(digest_of(data))
    r = await seed.client.post("/v2/team/app/blobs/uploads/")
    assert r.status_code == 202
    location = r.headers["location"]
    assert location.startswith("/v2/team/app/blobs/uploads/")
    assert r.headers["docker-upload-uuid"] == location.rsplit("/", 1)[1]
    assert r.headers["range"] == "0-0"
    r = await seed.client.put(location, params={"digest": digest}, content=data)
    assert r.status_code == 201
    assert r.headers["location"] == f"/v2/team/app/blobs/{digest}"
    assert r.headers["docker-content-digest"] == digest
    r = await seed.client.get(f"/v2/team/app/blobs/{digest}")
    assert (r.status_code, r.content) == (200, data)


async def test_blob_downloads_share_the_upload_rate(tmp_path: Path) -> None:
    """``[server] upload_rate`` (``--upload-rate``): each blob download in progress has its
    connection paced at the rate ÷ the downloads in progress, re-divided as they start and end;
    HEAD and manifests are not paced, and without the setting nothing is. A reload applies a new
    rate to the downloads that start after it."""
    from p2pd.httpd import Headers, Request, RequestBody

    config = load_config(None, listen="127.0.0.1:0", data=tmp_path / "data", upload_rate=1_000_000)
    assert config.server.upload_rate == 1_000_000
    assert load_config(None, data=tmp_path / "data").server.upload_rate == 0
    data = random.Random(3).randbytes(4096)
    async with trio.open_nursery() as nursery:
        info, registry = await nursery.start(partial(serve_seed, config))
        async with httpx.AsyncClient(base_url=info.url, trust_env=False, timeout=30) as client:
            digest = await push_blob(client, "team/app", data)
        paces: list[list[int]] = [[], [], []]

        def request(method: str, pace: list[int], byte_range: str | None = None) -> Request:
            target = f"/v2/team/app/blobs/{digest}"
            headers = Headers([("Range", byte_range)] if byte_range else [])
            return Request(method, target, target, {}, headers, RequestBody(None),  # type: ignore[arg-type]
                           ("127.0.0.1", 1), "1.1", pace=pace.append)

        whole = await registry.handle(request("GET", paces[0]))
        ranged = await registry.handle(request("GET", paces[1], "bytes=0-99"))
        head = await registry.handle(request("HEAD", paces[2]))
        assert (whole.status, ranged.status, head.status) == (200, 206, 200)
        assert paces == [[1_000_000, 500_000], [500_000], []]
        for response in (whole, ranged, head):
            assert isinstance(response.body, FileBody)
            os.close(response.body.fd)
        assert whole.on_close is not None and head.on_close is None
        # a paced download's share ends once its bytes have left the socket, not when queued
        assert whole.drained_close and ranged.drained_close and not head.drained_close
        whole.on_close()
        assert paces[1][-1] == 1_000_000
        # A reload (SIGHUP) changes the rate for the downloads that start from then on.
        await registry.reload(load_config(None, listen="127.0.0.1:0", data=tmp_path / "data", upload_rate=300_000))
        again = await registry.handle(request("GET", paces[2]))
        assert paces[2] == [150_000] and paces[1][-1] == 150_000
        assert isinstance(again.body, FileBody) and again.on_close is not None and ranged.on_close is not None
        os.close(again.body.fd)
        again.on_close()
        ranged.on_close()
        nursery.cancel_scope.cancel()


async def test_single_request_push(seed: Seed) -> None:
    data = b"single request blob"
    digest = str(digest_of(data))
    r = await seed.client.post("/v2/repo/blobs/uploads/", params={"digest": digest}, content=data)
    assert r.status_code == 201
    assert r.headers["docker-content-digest"] == digest
    assert r.headers["location"] == f"/v2/repo/blobs/{digest}"
    assert (await seed.client.get(f"/v2/repo/blobs/{digest}")).content == data
    assert await _metric(seed.client, "seed_uploads_in_progress") == 0
    # An empty blob is a blob too.
    empty = str(digest_of(b""))
    r = await seed.client.post("/v2/repo/blobs/uploads/", params={"digest": empty}, content=b"")
    assert r.status_code == 201
    r = await seed.client.get(f"/v2/repo/blobs/{empty}")
    assert (r.status_code, r.content, r.headers["content-length"]) == (200, b"", "0")


async def test_chunked_push_with_content_range(seed: Seed) -> None:
    data = random.Random(2).randbytes(250_000)
    digest = str(digest_of(data))
    r = await seed.client.post("/v2/repo/blobs/uploads/")
    location = r.headers["location"]
    pieces = [(0, 99_999), (100_000, 199_999)]
    for start, end in pieces:
        r = await seed.client.patch(
            location,
            content=data[start : end + 1],
            headers={"Content-Range": f"{start}-{end}", "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 202, r.text
        assert r.headers["range"] == f"0-{end}"
        assert r.headers["location"] == location
        location = r.headers["location"]

    # Out of order (a gap, an overlap, a chunk that was already sent): 416 with the current state.
    for start, end in ((210_000, 219_999), (150_000, 249_999), (0, 99_999)):
        r = await seed.client.patch(
            location, content=data[start : end + 1], headers={"Content-Range": f"{start}-{end}"}
        )
        _assert_error(r, 416, "RANGE_INVALID")
        assert r.headers["range"] == "0-199999"
        assert r.headers["location"] == location
    # Content-Range and the body disagree; or the range is malformed.
    r = await seed.client.patch(location, content=b"abc", headers={"Content-Range": "200000-200009"})
    _assert_error(r, 400, "BLOB_UPLOAD_INVALID")
    r = await seed.client.patch(location, content=b"abc", headers={"Content-Range": "garbage"})
    _assert_error(r, 400, "BLOB_UPLOAD_INVALID")

    r = await seed.client.get(location)
    assert (r.status_code, r.headers["range"]) == (204, "0-199999")
    # The last chunk travels with the closing PUT.
    r = await seed.client.put(
        location,
        params={"digest": digest},
        content=data[200_000:],
        headers={"Content-Range": f"200000-{len(data) - 1}"},
    )
    assert r.status_code == 201, r.text
    r = await seed.client.get(f"/v2/repo/blobs/{digest}")
    assert r.content == data


async def test_patch_without_content_range_streams(seed: Seed) -> None:
    data = random.Random(3).randbytes(3 * 1024 * 1024 + 11)
    digest = str(digest_of(data))
    r = await seed.client.post("/v2/repo/blobs/uploads/")
    location = r.headers["location"]

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 300_000):
            yield data[i : i + 300_000]
            await trio.lowlevel.checkpoint()

    r = await seed.client.patch(location, content=body())  # chunked transfer encoding
    assert r.status_code == 202, r.text
    assert r.headers["range"] == f"0-{len(data) - 1}"
    r = await seed.client.put(location, params={"digest": digest})
    assert r.status_code == 201
    assert (await seed.client.get(f"/v2/repo/blobs/{digest}")).content == data


async def test_upload_status_and_cancel(seed: Seed) -> None:
    r = await seed.client.post("/v2/repo/blobs/uploads/")
    location = r.headers["location"]
    r = await seed.client.get(location)
    assert r.status_code == 204
    assert r.headers["range"] == "0-0"
    assert r.headers["location"] == location
    assert r.headers["docker-upload-uuid"] == location.rsplit("/", 1)[1]
    await seed.client.patch(location, content=b"0123456789")
    assert (await seed.client.get(location)).headers["range"] == "0-9"
    assert await _metric(seed.client, "seed_uploads_in_progress") == 1
    r = await seed.client.delete(location)
    assert r.status_code == 204
    assert await _metric(seed.client, "seed_uploads_in_progress") == 0
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        r = await seed.client.request(method, location, params={"digest": str(digest_of(b"0123456789"))})
        _assert_error(r, 404, "BLOB_UPLOAD_UNKNOWN")
    # Ids we did not issue, and an upload looked up through another repository.
    for upload_id in ("0" * 32, "not-an-id", "A" * 32, "0" * 33):
        _assert_error(await seed.client.get(f"/v2/repo/blobs/uploads/{upload_id}"), 404, "BLOB_UPLOAD_UNKNOWN")
    r = await seed.client.post("/v2/repo/blobs/uploads/")
    other = r.headers["location"].replace("/v2/repo/", "/v2/other/")
    _assert_error(await seed.client.get(other), 404, "BLOB_UPLOAD_UNKNOWN")
    # Closing without a digest is an error, and the session survives it.
    _assert_error(await seed.client.put(r.headers["location"]), 400, "DIGEST_INVALID")
    assert (await seed.client.get(r.headers["location"])).status_code == 204


async def test_cross_repository_mount(seed: Seed) -> None:
    data = b"shared layer"
    digest = await push_blob(seed.client, "source/repo", data)
    r = await seed.client.post("/v2/target/blobs/uploads/", params={"mount": digest, "from": "source/repo"})
    assert r.status_code == 201
    assert r.headers["location"] == f"/v2/target/blobs/{digest}"
    assert r.headers["docker-content-digest"] == digest
    assert (await seed.client.get(f"/v2/target/blobs/{digest}")).content == data

    # Absent: the blob is not in the source repository, the source does not exist or is
    # invalid, or "from" is missing. Each gets an ordinary upload session.
    for params in (
        {"mount": MISSING, "from": "source/repo"},
        {"mount": digest, "from": "nowhere"},
        {"mount": digest, "from": "../etc"},
        {"mount": digest},
    ):
        r = await seed.client.post("/v2/third/blobs/uploads/", params=params)
        assert r.status_code == 202, params
        assert r.headers["location"].startswith("/v2/third/blobs/uploads/")
        assert (await seed.client.get(r.headers["location"])).status_code == 204
    _assert_error(await seed.client.get(f"/v2/third/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    r = await seed.client.post("/v2/third/blobs/uploads/", params={"mount": "sha256:nope", "from": "source/repo"})
    _assert_error(r, 400, "DIGEST_INVALID")


async def test_wrong_digest_is_rejected_and_not_stored(seed: Seed) -> None:
    data = b"the real content"
    claimed = str(digest_of(b"something else"))
    r = await seed.client.post("/v2/repo/blobs/uploads/")
    location = r.headers["location"]
    r = await seed.client.put(location, params={"digest": claimed}, content=data)
    _assert_error(r, 400, "DIGEST_INVALID")
    for digest in (claimed, str(digest_of(data))):
        _assert_error(await seed.client.get(f"/v2/repo/blobs/{digest}"), 404, "BLOB_UNKNOWN")
        assert not (seed.data / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()
    _assert_error(await seed.client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert await _metric(seed.client, "seed_uploads_in_progress") == 0
    # Single-request form, and a chunked upload closed with the wrong digest.
    r = await seed.client.post("/v2/repo/blobs/uploads/", params={"digest": claimed}, content=data)
    _assert_error(r, 400, "DIGEST_INVALID")
    r = await seed.client.post("/v2/repo/blobs/uploads/")
    await seed.client.patch(r.headers["location"], content=data, headers={"Content-Range": f"0-{len(data) - 1}"})
    _assert_error(await seed.client.put(r.headers["location"], params={"digest": claimed}), 400, "DIGEST_INVALID")
    assert list((seed.data / "uploads").iterdir()) == []
    assert not any(p.is_file() for p in (seed.data / "blobs").rglob("*"))


# ---- blob pull ---------------------------------------------------------------------------


async def test_blob_get_and_head(seed: Seed) -> None:
    data = random.Random(4).randbytes(123_457)
    digest = await push_blob(seed.client, "repo", data)
    r = await seed.client.get(f"/v2/repo/blobs/{digest}")
    assert r.status_code == 200
    assert r.content == data
    assert r.headers["docker-content-digest"] == digest
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["accept-ranges"] == "bytes"
    r = await seed.client.head(f"/v2/repo/blobs/{digest}")
    assert r.status_code == 200
    assert r.content == b""
    assert r.headers["docker-content-digest"] == digest
    assert r.headers["content-length"] == str(len(data))
    _assert_error(await seed.client.get(f"/v2/repo/blobs/{MISSING}"), 404, "BLOB_UNKNOWN")
    r = await seed.client.head(f"/v2/repo/blobs/{MISSING}")
    assert (r.status_code, r.content) == (404, b"")
    # Content belongs to the repositories it was pushed to.
    _assert_error(await seed.client.get(f"/v2/other/blobs/{digest}"), 404, "BLOB_UNKNOWN")


@pytest.mark.parametrize(
    ("header", "status", "content_range", "span"),
    [
        ("bytes=500-1499", 206, "bytes 500-1499/2048", (500, 1500)),
        ("bytes=500-", 206, "bytes 500-2047/2048", (500, 2048)),
        ("bytes=-500", 206, "bytes 1548-2047/2048", (1548, 2048)),
        ("bytes=2000-5000", 206, "bytes 2000-2047/2048", (2000, 2048)),
        ("bytes=0-0", 206, "bytes 0-0/2048", (0, 1)),
        ("bytes=500-0", 416, "bytes */2048", None),
        ("bytes=5000-10000", 416, "bytes */2048", None),
        ("bytes=2048-", 416, "bytes */2048", None),
        ("bytes=0-1,5-6", 200, None, (0, 2048)),
        ("bytes=garbage", 200, None, (0, 2048)),
    ],
)
async def test_blob_ranges(
    seed: Seed, header: str, status: int, content_range: str | None, span: tuple[int, int] | None
) -> None:
    data = random.Random(5).randbytes(2048)
    digest = await push_blob(seed.client, "repo", data)
    r = await seed.client.get(f"/v2/repo/blobs/{digest}", headers={"Range": header})
    assert r.status_code == status
    assert r.headers.get("content-range") == content_range
    if span is None:
        assert _error_code(r) == "RANGE_INVALID"
    else:
        assert r.content == data[span[0] : span[1]]
        assert r.headers["content-length"] == str(span[1] - span[0])
        assert r.headers["docker-content-digest"] == digest
    r = await seed.client.head(f"/v2/repo/blobs/{digest}", headers={"Range": header})
    assert r.status_code == status
    assert r.content == b""


# ---- manifests -------------------------------------------------------------------------


async def test_manifest_push_and_pull_oci(seed: Seed) -> None:
    manifest, digest, _ = await push_image(seed.client, "team/app", "v1")
    r = await seed.client.put(
        "/v2/team/app/manifests/v1", content=manifest, headers={"Content-Type": mediatypes.OCI_MANIFEST}
    )
    assert r.status_code == 201  # pushing the same manifest again is fine
    assert r.headers["location"] == f"/v2/team/app/manifests/{digest}"
    assert r.headers["docker-content-digest"] == digest
    for reference in ("v1", digest):
        r = await seed.client.get(f"/v2/team/app/manifests/{reference}", headers={"Accept": mediatypes.MANIFEST_ACCEPT})
        assert r.status_code == 200
        assert r.content == manifest  # the exact bytes, whitespace included
        assert r.headers["content-type"] == mediatypes.OCI_MANIFEST
        assert r.headers["docker-content-digest"] == digest
        assert r.headers["content-length"] == str(len(manifest))
        r = await seed.client.head(f"/v2/team/app/manifests/{reference}")
        assert r.status_code == 200
        assert r.content == b""
        assert r.headers["content-type"] == mediatypes.OCI_MANIFEST
        assert r.headers["docker-content-digest"] == digest
        assert r.headers["content-length"] == str(len(manifest))
    # A manifest is also addressable as a blob of its repository.
    assert (await seed.client.get(f"/v2/team/app/blobs/{digest}")).content == manifest
    for reference in ("v2", MISSING):
        _assert_error(await seed.client.get(f"/v2/team/app/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
        r = await seed.client.head(f"/v2/team/app/manifests/{reference}")
        assert (r.status_code, r.content) == (404, b"")
    _assert_error(await seed.client.get("/v2/other/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    # A blob digest is not a manifest.
    _, _, blobs = await push_image(seed.client, "team/app", "v3")
    _assert_error(await seed.client.get(f"/v2/team/app/manifests/{digest_of(blobs[1])}"), 404, "MANIFEST_UNKNOWN")


async def test_manifest_push_by_digest_and_docker_types(seed: Seed) -> None:
    config = b'{"architecture":"arm64"}'
    layer = b"docker layer"
    await push_blob(seed.client, "docker/img", config)
    await push_blob(seed.client, "docker/img", layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.DOCKER_MANIFEST,
            "config": _descriptor(config, "application/vnd.docker.container.image.v1+json"),
            "layers": [_descriptor(layer, "application/vnd.docker.image.rootfs.diff.tar.gzip")],
        }
    ).encode()
    digest = str(digest_of(manifest))
    r = await seed.client.put(
        f"/v2/docker/img/manifests/{digest}", content=manifest, headers={"Content-Type": mediatypes.DOCKER_MANIFEST}
    )
    assert r.status_code == 201
    assert r.headers["docker-content-digest"] == digest
    r = await seed.client.get(f"/v2/docker/img/manifests/{digest}")
    assert r.headers["content-type"] == mediatypes.DOCKER_MANIFEST
    assert r.content == manifest

    manifest_list = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.DOCKER_MANIFEST_LIST,
            "manifests": [
                {
                    **_descriptor(manifest, mediatypes.DOCKER_MANIFEST),
                    "platform": {"architecture": "arm64", "os": "linux"},
                }
            ],
        }
    ).encode()
    r = await seed.client.put(
        "/v2/docker/img/manifests/multi",
        content=manifest_list,
        headers={"Content-Type": mediatypes.DOCKER_MANIFEST_LIST},
    )
    assert r.status_code == 201, r.text
    r = await seed.client.get("/v2/docker/img/manifests/multi")
    assert r.headers["content-type"] == mediatypes.DOCKER_MANIFEST_LIST
    assert r.content == manifest_list

    # An OCI index over an OCI manifest, pushed with a Content-Type that has parameters.
    oci_manifest, oci_digest, _ = await push_image(seed.client, "docker/img", None)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_INDEX,
            "manifests": [_descriptor(oci_manifest, mediatypes.OCI_MANIFEST)],
        }
    ).encode()
    r = await seed.client.put(
        "/v2/docker/img/manifests/index",
        content=index,
        headers={"Content-Type": mediatypes.OCI_INDEX + "; charset=utf-8"},
    )
    assert r.status_code == 201
    r = await seed.client.get("/v2/docker/img/manifests/index")
    assert r.headers["content-type"] == mediatypes.OCI_INDEX  # no parameters
    assert (await seed.client.get(f"/v2/docker/img/manifests/{oci_digest}")).content == oci_manifest


async def test_manifest_push_errors(seed: Seed) -> None:
    manifest, _, blobs = await push_image(seed.client, "repo", "good")
    put = partial(seed.client.put, "/v2/repo/manifests/bad")
    oci = {"Content-Type": mediatypes.OCI_MANIFEST}

    _assert_error(await put(content=b"{not json", headers=oci), 400, "MANIFEST_INVALID")
    _assert_error(await put(content=b"[]", headers=oci), 400, "MANIFEST_INVALID")
    # Over 4 MiB.
    # Exactly one byte over, so the server has read the whole body when it answers.
    base = len(image_manifest(blobs[0], blobs[1:], annotations={"pad": ""}))
    big = image_manifest(blobs[0], blobs[1:], annotations={"pad": "x" * (MAX_MANIFEST_SIZE + 1 - base)})
    assert len(big) == MAX_MANIFEST_SIZE + 1
    r = await put(content=big, headers=oci)
    assert r.status_code == 413
    assert _error_code(r) == "SIZE_INVALID"
    # mediaType and Content-Type disagree (CVE-2021-41190).
    _assert_error(await put(content=manifest, headers={"Content-Type": mediatypes.OCI_INDEX}), 400, "MANIFEST_INVALID")
    # An index with layers.
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": [], "layers": [_descriptor(blobs[1])]}
    ).encode()
    _assert_error(await put(content=index, headers={"Content-Type": mediatypes.OCI_INDEX}), 400, "MANIFEST_INVALID")
    # A layer that was never pushed; an index over a manifest that was never pushed.
    missing_layer = image_manifest(blobs[0], [blobs[1], b"never pushed"])
    _assert_error(await put(content=missing_layer, headers=oci), 400, "MANIFEST_BLOB_UNKNOWN")
    missing_config = image_manifest(b"no such config", blobs[1:])
    _assert_error(await put(content=missing_config, headers=oci), 400, "MANIFEST_BLOB_UNKNOWN")
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_INDEX,
            "manifests": [_descriptor(b"no such manifest", mediatypes.OCI_MANIFEST)],
        }
    ).encode()
    _assert_error(
        await put(content=index, headers={"Content-Type": mediatypes.OCI_INDEX}), 400, "MANIFEST_BLOB_UNKNOWN"
    )
    # Blobs of another repository do not count.
    _assert_error(
        await seed.client.put("/v2/elsewhere/manifests/x", content=manifest, headers=oci), 400, "MANIFEST_BLOB_UNKNOWN"
    )
    # A digest reference that is not the body's digest.
    _assert_error(
        await seed.client.put(f"/v2/repo/manifests/{MISSING}", content=manifest, headers=oci), 400, "DIGEST_INVALID"
    )
    # Invalid tag and digest references.
    _assert_error(await seed.client.put("/v2/repo/manifests/-bad", content=manifest, headers=oci), 400, "TAG_INVALID")
    _assert_error(
        await seed.client.put("/v2/repo/manifests/sha256:abc", content=manifest, headers=oci), 400, "DIGEST_INVALID"
    )
    # Nothing of that was stored.
    _assert_error(await seed.client.get("/v2/repo/manifests/bad"), 404, "MANIFEST_UNKNOWN")
    assert (await seed.client.get("/v2/repo/tags/list")).json()["tags"] == ["good"]


async def test_subject_may_be_missing(seed: Seed) -> None:
    config = b"{}"
    await push_blob(seed.client, "repo", config)
    subject = {"mediaType": mediatypes.OCI_MANIFEST, "digest": MISSING, "size": 123}
    manifest = image_manifest(config, [], config_type="application/vnd.example.sig.config+json", subject=subject)
    r = await seed.client.put(
        f"/v2/repo/manifests/{digest_of(manifest)}", content=manifest, headers={"Content-Type": mediatypes.OCI_MANIFEST}
    )
    assert r.status_code == 201, r.text
    assert r.headers["oci-subject"] == MISSING
    r = await seed.client.get(f"/v2/repo/referrers/{MISSING}")
    assert [m["digest"] for m in r.json()["manifests"]] == [str(digest_of(manifest))]
    assert r.json()["manifests"][0]["artifactType"] == "application/vnd.example.sig.config+json"


# ---- tags and catalog ------------------------------------------------------------------


async def test_tags_list_pagination(seed: Seed) -> None:
    manifest, _, _ = await push_image(seed.client, "repo", "t00")
    tags = [f"t{i:02d}" for i in range(12)]
    for tag in tags[1:]:
        r = await seed.client.put(
            f"/v2/repo/manifests/{tag}", content=manifest, headers={"Content-Type": mediatypes.OCI_MANIFEST}
        )
        assert r.status_code == 201
    r = await seed.client.get("/v2/repo/tags/list")
    assert r.json() == {"name": "repo", "tags": tags}
    assert "link" not in r.headers

    seen: list[str] = []
    url: str | None = "/v2/repo/tags/list?n=5"
    pages = 0
    while url:
        r = await seed.client.get(url)
        assert r.status_code == 200
        page = r.json()["tags"]
        assert len(page) <= 5
        seen += page
        pages += 1
        link = r.headers.get("link")
        if link:
            assert link.endswith('>; rel="next"')
            url = link[1 : link.index(">")]
            assert url.startswith("/v2/repo/tags/list?")
        else:
            url = None
    assert (seen, pages) == (tags, 3)

    r = await seed.client.get("/v2/repo/tags/list", params={"n": 3, "last": "t05"})
    assert r.json()["tags"] == ["t06", "t07", "t08"]
    r = await seed.client.get("/v2/repo/tags/list", params={"last": "t10"})
    assert r.json()["tags"] == ["t11"]
    assert "link" not in r.headers
    r = await seed.client.get("/v2/repo/tags/list", params={"n": 0})
    assert (r.status_code, r.json()["tags"]) == (200, [])
    assert "link" not in r.headers
    # A huge n is capped, not allocated (CVE-2023-2253), and not an error.
    for huge in ("999999999", "1000000000000", "9" * 40):
        r = await seed.client.get("/v2/repo/tags/list", params={"n": huge})
        assert (r.status_code, r.json()["tags"]) == (200, tags), huge
    for bad in ("-1", "abc", "1.5", "", " 1", "0x10", "²", "\u0661"):
        r = await seed.client.get("/v2/repo/tags/list", params={"n": bad})
        _assert_error(r, 400, "PAGINATION_NUMBER_INVALID")
    _assert_error(await seed.client.get("/v2/unknown/tags/list"), 404, "NAME_UNKNOWN")


async def test_page_size_cap(nursery: trio.Nursery, tmp_path: Path) -> None:
    config_file = tmp_path / "seed.toml"
    config_file.write_text("[registry]\nmax_page_size = 4\n")
    config = load_config(config_file, listen="127.0.0.1:0", data=tmp_path / "data")
    info, _ = await nursery.start(partial(serve_seed, config))
    async with httpx.AsyncClient(base_url=info.url, trust_env=False) as client:
        manifest, _, _ = await push_image(client, "repo", "a")
        for tag in "bcdef":
            await client.put(
                f"/v2/repo/manifests/{tag}", content=manifest, headers={"Content-Type": mediatypes.OCI_MANIFEST}
            )
        r = await client.get("/v2/repo/tags/list", params={"n": 1000})
        assert r.json()["tags"] == ["a", "b", "c", "d"]
        assert r.headers["link"] == '</v2/repo/tags/list?n=4&last=d>; rel="next"'
        r = await client.get("/v2/repo/tags/list")
        assert r.json()["tags"] == ["a", "b", "c", "d"]


async def test_catalog(seed: Seed) -> None:
    assert (await seed.client.get("/v2/_catalog")).json() == {"repositories": []}
    names = ["alpha", "beta/one", "beta/one/nested", "gamma"]
    for name in names:
        await push_blob(seed.client, name, name.encode())
    r = await seed.client.get("/v2/_catalog")
    assert r.json() == {"repositories": names}
    r = await seed.client.get("/v2/_catalog", params={"n": 2})
    assert r.json()["repositories"] == ["alpha", "beta/one"]
    assert r.headers["link"] == '</v2/_catalog?n=2&last=beta%2Fone>; rel="next"'
    r = await seed.client.get("/v2/_catalog", params={"n": 2, "last": "beta/one"})
    assert r.json()["repositories"] == ["beta/one/nested", "gamma"]
    assert "link" not in r.headers
    assert (await seed.client.get("/v2/_catalog", params={"n": 0})).json()["repositories"] == []
    assert (await seed.client.get("/v2/_catalog", params={"n": "9" * 30})).json()["repositories"] == names
    _assert_error(await seed.client.get("/v2/_catalog", params={"n": "x"}), 400, "PAGINATION_NUMBER_INVALID")


# ---- referrers ---------------------------------------------------------------------------


async def test_referrers(seed: Seed) -> None:
    _, subject, _ = await push_image(seed.client, "repo", "app")
    subject_descriptor = {"mediaType": mediatypes.OCI_MANIFEST, "digest": subject, "size": 1}
    config = b"{}"
    await push_blob(seed.client, "repo", config)
    sbom = image_manifest(
        config,
        [],
        config_type="application/vnd.oci.empty.v1+json",
        artifactType="application/vnd.example.sbom",
        subject=subject_descriptor,
        annotations={"org.example.kind": "sbom"},
    )
    signature = image_manifest(config, [], config_type="application/vnd.example.signature", subject=subject_descriptor)
    for body in (sbom, signature):
        r = await seed.client.put(
            f"/v2/repo/manifests/{digest_of(body)}", content=body, headers={"Content-Type": mediatypes.OCI_MANIFEST}
        )
        assert r.status_code == 201
        assert r.headers["oci-subject"] == subject

    r = await seed.client.get(f"/v2/repo/referrers/{subject}")
    assert r.status_code == 200
    assert r.headers["content-type"] == mediatypes.OCI_INDEX
    assert "oci-filters-applied" not in r.headers
    index = r.json()
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == mediatypes.OCI_INDEX
    by_digest = {m["digest"]: m for m in index["manifests"]}
    assert by_digest == {
        str(digest_of(sbom)): {
            "mediaType": mediatypes.OCI_MANIFEST,
            "digest": str(digest_of(sbom)),
            "size": len(sbom),
            "artifactType": "application/vnd.example.sbom",
            "annotations": {"org.example.kind": "sbom"},
        },
        str(digest_of(signature)): {
            "mediaType": mediatypes.OCI_MANIFEST,
            "digest": str(digest_of(signature)),
            "size": len(signature),
            "artifactType": "application/vnd.example.signature",
        },
    }

    r = await seed.client.get(f"/v2/repo/referrers/{subject}", params={"artifactType": "application/vnd.example.sbom"})
    assert r.headers["oci-filters-applied"] == "artifactType"
    assert [m["digest"] for m in r.json()["manifests"]] == [str(digest_of(sbom))]
    r = await seed.client.get(f"/v2/repo/referrers/{subject}", params={"artifactType": "application/none"})
    assert r.headers["oci-filters-applied"] == "artifactType"
    assert r.json()["manifests"] == []

    # Unknown subject, or unknown repository: an empty index, not a 404.
    for path in (f"/v2/repo/referrers/{MISSING}", f"/v2/nobody/referrers/{subject}"):
        r = await seed.client.get(path)
        assert r.status_code == 200
        assert r.json() == {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX, "manifests": []}
    _assert_error(await seed.client.get("/v2/repo/referrers/latest"), 400, "DIGEST_INVALID")


# ---- deletes -----------------------------------------------------------------------------


async def test_delete_manifest_by_digest(seed: Seed) -> None:
    manifest, digest, _ = await push_image(seed.client, "repo", "one")
    await seed.client.put("/v2/repo/manifests/two", content=manifest, headers={"Content-Type": mediatypes.OCI_MANIFEST})
    other, other_digest, _ = await push_image(seed.client, "repo", "keep", seed_bytes=1)
    referrer = image_manifest(
        b"{}",
        [],
        config_type="application/vnd.example.x",
        subject={"mediaType": mediatypes.OCI_MANIFEST, "digest": other_digest, "size": len(other)},
    )
    await push_blob(seed.client, "repo", b"{}")
    await seed.client.put(
        f"/v2/repo/manifests/{digest_of(referrer)}", content=referrer, headers={"Content-Type": mediatypes.OCI_MANIFEST}
    )
    assert len((await seed.client.get(f"/v2/repo/referrers/{other_digest}")).json()["manifests"]) == 1

    r = await seed.client.delete(f"/v2/repo/manifests/{digest}")
    assert r.status_code == 202
    for reference in (digest, "one", "two"):
        _assert_error(await seed.client.get(f"/v2/repo/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
    assert (await seed.client.get("/v2/repo/tags/list")).json()["tags"] == ["keep"]
    _assert_error(await seed.client.delete(f"/v2/repo/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")

    # Deleting a referrer removes its entry from the subject's referrers list.
    r = await seed.client.delete(f"/v2/repo/manifests/{digest_of(referrer)}")
    assert r.status_code == 202
    assert (await seed.client.get(f"/v2/repo/referrers/{other_digest}")).json()["manifests"] == []
    assert (await seed.client.get("/v2/repo/manifests/keep")).content == other


async def test_delete_tag_and_blob(seed: Seed) -> None:
    manifest, digest, blobs = await push_image(seed.client, "repo", "tag1")
    r = await seed.client.delete("/v2/repo/manifests/tag1")
    assert r.status_code == 202
    _assert_error(await seed.client.get("/v2/repo/manifests/tag1"), 404, "MANIFEST_UNKNOWN")
    assert (await seed.client.get(f"/v2/repo/manifests/{digest}")).content == manifest
    _assert_error(await seed.client.delete("/v2/repo/manifests/tag1"), 404, "MANIFEST_UNKNOWN")
    _assert_error(await seed.client.delete("/v2/repo/manifests/.bad"), 400, "TAG_INVALID")

    layer = str(digest_of(blobs[1]))
    r = await seed.client.delete(f"/v2/repo/blobs/{layer}")
    assert r.status_code == 202
    _assert_error(await seed.client.get(f"/v2/repo/blobs/{layer}"), 404, "BLOB_UNKNOWN")
    r = await seed.client.head(f"/v2/repo/blobs/{layer}")
    assert r.status_code == 404
    _assert_error(await seed.client.delete(f"/v2/repo/blobs/{layer}"), 404, "BLOB_UNKNOWN")
    _assert_error(await seed.client.delete(f"/v2/repo/blobs/{MISSING}"), 404, "BLOB_UNKNOWN")
    _assert_error(await seed.client.delete("/v2/repo/blobs/sha256:zz"), 400, "DIGEST_INVALID")


async def test_deletes_disabled(nursery: trio.Nursery, tmp_path: Path) -> None:
    config_file = tmp_path / "seed.toml"
    config_file.write_text("[registry]\ndelete_enabled = false\n")
    config = load_config(config_file, listen="127.0.0.1:0", data=tmp_path / "data")
    info, _ = await nursery.start(partial(serve_seed, config))
    async with httpx.AsyncClient(base_url=info.url, trust_env=False) as client:
        _, digest, blobs = await push_image(client, "repo", "t")
        for path in (f"/v2/repo/manifests/{digest}", "/v2/repo/manifests/t", f"/v2/repo/blobs/{digest_of(blobs[0])}"):
            _assert_error(await client.delete(path), 405, "UNSUPPORTED")
        assert (await client.get("/v2/repo/manifests/t")).status_code == 200


# ---- input validation and path traversal ---------------------------------------------


async def test_invalid_names_digests_tags(seed: Seed) -> None:
    good = await push_blob(seed.client, "repo", b"x")
    cases = [
        ("GET", f"/v2/Upper/blobs/{good}", "NAME_INVALID"),
        ("GET", f"/v2/a__b___c/blobs/{good}", "NAME_INVALID"),
        ("GET", f"/v2/{'a' * 256}/blobs/{good}", "NAME_INVALID"),
        ("GET", "/v2/-x/tags/list", "NAME_INVALID"),
        ("GET", "/v2/a%20b/manifests/latest", "NAME_INVALID"),
        ("POST", "/v2/bad!/blobs/uploads/", "NAME_INVALID"),
        ("GET", "/v2/repo/blobs/sha256:1234", "DIGEST_INVALID"),
        ("GET", f"/v2/repo/blobs/{good.upper()}", "DIGEST_INVALID"),
        ("GET", f"/v2/repo/blobs/{good[7:]}", "DIGEST_INVALID"),
        ("HEAD", "/v2/repo/blobs/sha256:", "DIGEST_INVALID"),
        # GET/HEAD of a reference that is no tag nor digest: unknown (404), as the OCI
        # conformance suite expects; writes and deletes still say what is wrong (400).
        ("GET", "/v2/repo/manifests/sha256:xyz", "MANIFEST_UNKNOWN"),
        ("HEAD", "/v2/repo/manifests/sha256:xyz", "MANIFEST_UNKNOWN"),
        ("DELETE", "/v2/repo/manifests/sha256:xyz", "DIGEST_INVALID"),
        ("GET", "/v2/repo/referrers/notadigest", "DIGEST_INVALID"),
        ("GET", "/v2/repo/blobs/sha256:12/chunks", "DIGEST_INVALID"),
        ("PUT", "/v2/repo/blobs/uploads/0123456789abcdef0123456789abcdef?digest=bad", "BLOB_UPLOAD_UNKNOWN"),
        ("GET", "/v2/repo/manifests/.hidden", "MANIFEST_UNKNOWN"),
        ("GET", f"/v2/repo/manifests/{'t' * 129}", "MANIFEST_UNKNOWN"),
        ("DELETE", "/v2/repo/manifests/-x", "TAG_INVALID"),
        ("PUT", "/v2/repo/manifests/a+b", "TAG_INVALID"),
    ]
    for method, path, code in cases:
        r = await seed.client.request(method, path)
        status = 404 if code in ("BLOB_UPLOAD_UNKNOWN", "MANIFEST_UNKNOWN") else 400
        assert r.status_code == status, (method, path, r.status_code, r.text)
        if method != "HEAD":
            assert _error_code(r) == code, (method, path)
    r = await seed.client.post("/v2/repo/blobs/uploads/")
    _assert_error(
        await seed.client.put(r.headers["location"], params={"digest": "sha256:bad"}, content=b"x"),
        400,
        "DIGEST_INVALID",
    )


async def test_path_traversal_never_leaves_the_data_dir(seed: Seed, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "passwd").write_text("root:x:0:0")
    before = {p: p.stat().st_mtime_ns for p in _files_outside(tmp_path, seed.data)}
    digest = str(digest_of(b"root:x:0:0"))
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_MANIFEST,
            "config": _descriptor(b"{}", CONFIG_TYPE),
            "layers": [],
        }
    ).encode()
    targets = [
        ("GET", f"/v2/../../etc/passwd/blobs/{digest}"),
        ("GET", f"/v2/../../secret/blobs/{digest}"),
        ("GET", f"/v2/%2e%2e/%2e%2e/secret/blobs/{digest}"),
        ("GET", f"/v2/%2E%2E%2F%2E%2E%2Fsecret/blobs/{digest}"),
        ("GET", "/v2/repo/blobs/..%2F..%2F..%2Fsecret%2Fpasswd"),
        ("GET", "/v2/repo/blobs/sha256:..%2F..%2F..%2F..%2Fsecret%2Fpasswd"),
        ("GET", "/v2/repo/manifests/..%2F..%2F..%2Fsecret%2Fpasswd"),
        ("GET", "/v2/repo/blobs/uploads/..%2F..%2Fsecret"),
        ("GET", "/v2/repo/blobs/uploads/%2e%2e"),
        ("DELETE", "/v2/repo/blobs/uploads/%2e%2e"),
        ("GET", "/v2/repo/tags/list?last=../../secret"),
        ("GET", "/v2/repo/referrers/sha256:..%2F..%2Fx"),
        ("GET", f"/v2/repo/blobs/{digest}/chunks?size=..%2F..%2Fsecret"),
        ("GET", "/v2/%00/blobs/sha256:%00"),
        ("GET", "/v2/repo%00/manifests/latest"),
        ("GET", "/v2/..%5C..%5Csecret/manifests/latest"),
        ("POST", "/v2/../../secret/blobs/uploads/"),
        ("POST", f"/v2/repo/blobs/uploads/?mount={digest}&from=../../secret"),
        ("POST", "/v2/repo/blobs/uploads/?digest=sha256:..%2F..%2Fsecret%2Fpasswd"),
        ("PUT", "/v2/repo/manifests/..%2F..%2F..%2F..%2Fsecret%2Fowned"),
        ("PUT", "/v2/../../secret/manifests/owned"),
        ("PUT", "/v2/%2e%2e/%2e%2e/secret/manifests/owned"),
        ("DELETE", "/v2/../../secret/blobs/" + digest),
        ("DELETE", "/v2/repo/manifests/..%2F..%2Fsecret"),
    ]
    for method, target in targets:
        extra = [("Content-Type", mediatypes.OCI_MANIFEST)] if method == "PUT" else []
        status, headers, content = await raw_request(seed.info, method, target, extra, body if method == "PUT" else b"")
        assert status in (202, 400, 404, 405), (method, target, status, content)
        assert b"root:x" not in content
        if status >= 400:
            assert headers["content-type"] == "application/json"
            assert list(json.loads(content)) == ["errors"]
    after = {p: p.stat().st_mtime_ns for p in _files_outside(tmp_path, seed.data)}
    assert after == before
    assert (secret / "passwd").read_text() == "root:x:0:0"


# ---- chunk maps --------------------------------------------------------------------------


async def test_chunk_map_endpoint(seed: Seed) -> None:
    data = random.Random(6).randbytes(2 * DEFAULT_CHUNK_SIZE + 4321)
    digest = await push_blob(seed.client, "repo", data)
    r = await seed.client.get(f"/v2/repo/blobs/{digest}/chunks")
    assert r.status_code == 200
    assert r.headers["content-type"] == CHUNK_MAP_MEDIA_TYPE
    assert r.headers["docker-content-digest"] == digest
    chunk_map = ChunkMap.decode(r.content, expected_digest=Digest.parse(digest), expected_size=len(data))
    assert chunk_map.chunk_size == DEFAULT_CHUNK_SIZE
    assert len(chunk_map.hashes) == 3
    for index in range(3):
        offset, length = chunk_map.chunk_bounds(index)
        assert chunk_map.verify_chunk(index, data[offset : offset + length])
        assert chunk_map.hashes[index] == hashlib.sha256(data[offset : offset + length]).digest()

    # Another size is computed on demand (and cached).
    for _ in range(2):
        r = await seed.client.get(f"/v2/repo/blobs/{digest}/chunks", params={"size": 65536})
        assert r.status_code == 200
        small = ChunkMap.decode(r.content, expected_digest=Digest.parse(digest), expected_size=len(data))
        assert small.chunk_size == 65536
        assert len(small.hashes) == -(-len(data) // 65536)
        assert all(small.verify_chunk(i, data[i * 65536 : (i + 1) * 65536]) for i in range(len(small.hashes)))
    r = await seed.client.head(f"/v2/repo/blobs/{digest}/chunks")
    assert (r.status_code, r.content) == (200, b"")

    for bad in ("1000", "0", "abc", "-65536", str(2**40), "", "²"):
        r = await seed.client.get(f"/v2/repo/blobs/{digest}/chunks", params={"size": bad})
        assert r.status_code == 400, bad
        _error_code(r)
    _assert_error(await seed.client.get(f"/v2/repo/blobs/{MISSING}/chunks"), 404, "BLOB_UNKNOWN")
    _assert_error(await seed.client.get(f"/v2/other/blobs/{digest}/chunks"), 404, "BLOB_UNKNOWN")


async def test_chunk_map_in_the_size_p2pd_nodes_compute(seed: Seed) -> None:
    """``?largest=N``: the map in the chunk size every node derives from the blob's size
    (``chunk_size_for``), so a small blob comes in enough chunks to pipeline through a swarm."""
    data = random.Random(8).randbytes(2 * DEFAULT_CHUNK_SIZE + 4321)
    digest = await push_blob(seed.client, "repo", data)
    expected = chunk_size_for(len(data), DEFAULT_CHUNK_SIZE)
    assert expected < DEFAULT_CHUNK_SIZE  # a 2 MiB blob is cut finer than the configured size
    # Computed with the push: the nodes of a site all ask for it when they first pull the blob.
    stored = sorted(path.name for path in (seed.data / "chunkmaps").rglob(f"{Digest.parse(digest).encoded}.*"))
    assert stored == sorted(f"{Digest.parse(digest).encoded}.{size}" for size in (DEFAULT_CHUNK_SIZE, expected))
    for largest, size in ((DEFAULT_CHUNK_SIZE, expected), (MIN_CHUNK_SIZE, MIN_CHUNK_SIZE)):
        r = await seed.client.get(f"/v2/repo/blobs/{digest}/chunks", params={"largest": largest})
        assert r.status_code == 200
        chunk_map = ChunkMap.decode(r.content, expected_digest=Digest.parse(digest), expected_size=len(data))
        assert chunk_map.chunk_size == size
        assert all(chunk_map.verify_chunk(i, data[i * size : (i + 1) * size]) for i in range(len(chunk_map.hashes)))
    for bad in ("1000", "0", "abc", str(2**40), "", "²"):
        r = await seed.client.get(f"/v2/repo/blobs/{digest}/chunks", params={"largest": bad})
        assert r.status_code == 400, bad
        _error_code(r)
    _assert_error(await seed.client.get(f"/v2/repo/blobs/{MISSING}/chunks", params={"largest": DEFAULT_CHUNK_SIZE}),
                  404, "BLOB_UNKNOWN")
    _assert_error(await seed.client.get(f"/v2/other/blobs/{digest}/chunks", params={"largest": DEFAULT_CHUNK_SIZE}),
                  404, "BLOB_UNKNOWN")


def test_a_chunk_map_asked_for_by_many_at_once_is_computed_once(tmp_path: Path) -> None:
    storage = Storage(tmp_path / "data", chunk_size=DEFAULT_CHUNK_SIZE)
    data = random.Random(9).randbytes(3 * DEFAULT_CHUNK_SIZE)
    session = storage.create_upload("repo")
    session.data_path.write_bytes(data)
    digest = digest_of(data)
    storage.commit_upload(session, digest)
    # A size of which the push stored no map (it stores the configured and the adaptive ones).
    asked = 2 * MIN_CHUNK_SIZE
    assert asked not in (DEFAULT_CHUNK_SIZE, chunk_size_for(len(data), DEFAULT_CHUNK_SIZE))
    computed = []
    compute = storage._compute_chunk_map

    def counting(digest: Digest, chunk_size: int) -> ChunkMap:
        computed.append(chunk_size)
        time.sleep(0.2)  # long enough for every thread to ask before the map is stored
        return compute(digest, chunk_size)

    storage._compute_chunk_map = counting  # type: ignore[method-assign]
    answers: list[bytes] = []
    threads = [threading.Thread(target=lambda: answers.append(storage.chunk_map("repo", digest, asked)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert computed == [asked]
    assert len(answers) == 8 and len(set(answers)) == 1
    assert ChunkMap.decode(answers[0], expected_digest=digest).chunk_size == asked


async def test_chunk_map_of_chunked_and_empty_uploads(seed: Seed) -> None:
    data = random.Random(7).randbytes(DEFAULT_CHUNK_SIZE + 10)
    digest = str(digest_of(data))
    r = await seed.client.post("/v2/repo/blobs/uploads/")
    location = r.headers["location"]
    for start in range(0, len(data), 300_001):
        piece = data[start : start + 300_001]
        r = await seed.client.patch(
            location, content=piece, headers={"Content-Range": f"{start}-{start + len(piece) - 1}"}
        )
        assert r.status_code == 202
    assert (await seed.client.put(location, params={"digest": digest})).status_code == 201
    r = await seed.client.get(f"/v2/repo/blobs/{digest}/chunks")
    chunk_map = ChunkMap.decode(r.content, expected_digest=Digest.parse(digest), expected_size=len(data))
    assert chunk_map.verify_chunk(0, data[:DEFAULT_CHUNK_SIZE])
    assert chunk_map.verify_chunk(1, data[DEFAULT_CHUNK_SIZE:])

    empty = await push_blob(seed.client, "repo", b"")
    r = await seed.client.get(f"/v2/repo/blobs/{empty}/chunks")
    assert r.status_code == 200
    assert ChunkMap.decode(r.content, expected_size=0).hashes == ()
    raw = msgpack.unpackb(r.content)
    assert raw["digest"] == empty


# ---- metrics -----------------------------------------------------------------------------


async def test_metrics(seed: Seed) -> None:
    client = seed.client
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    for name in (
        "seed_http_requests_total",
        "seed_blob_bytes_sent_total",
        "seed_bytes_received_total",
        "seed_uploads_in_progress",
    ):
        assert name in r.text

    received_before = await _metric(client, "seed_bytes_received_total")
    data = random.Random(8).randbytes(100_000)
    assert await _metric(client, "seed_uploads_in_progress") == 0
    r = await client.post("/v2/repo/blobs/uploads/")
    location = r.headers["location"]
    assert await _metric(client, "seed_uploads_in_progress") == 1
    await client.patch(location, content=data[:40_000])
    assert await _metric(client, "seed_bytes_received_total") == received_before + 40_000
    digest = str(digest_of(data))
    await client.put(location, params={"digest": digest}, content=data[40_000:])
    assert await _metric(client, "seed_uploads_in_progress") == 0
    assert await _metric(client, "seed_bytes_received_total") == received_before + len(data)

    sent_before = await _metric(client, "seed_blob_bytes_sent_total")
    assert (await client.get(f"/v2/repo/blobs/{digest}")).content == data
    assert await _metric(client, "seed_blob_bytes_sent_total") == sent_before + len(data)
    r = await client.get(f"/v2/repo/blobs/{digest}", headers={"Range": "bytes=1000-1999"})
    assert len(r.content) == 1000
    assert await _metric(client, "seed_blob_bytes_sent_total") == sent_before + len(data) + 1000
    # HEAD, errors and other routes send no blob bytes.
    await client.head(f"/v2/repo/blobs/{digest}")
    await client.get(f"/v2/repo/blobs/{MISSING}")
    await client.get(f"/v2/repo/blobs/{digest}", headers={"Range": "bytes=999999-"})
    await client.get(f"/v2/repo/blobs/{digest}/chunks")
    assert await _metric(client, "seed_blob_bytes_sent_total") == sent_before + len(data) + 1000

    labels = {"method": "GET", "route": "blob", "status": "200"}
    assert await _metric(client, "seed_http_requests_total", **labels) == 1
    assert await _metric(client, "seed_http_requests_total", method="GET", route="blob", status="206") == 1
    assert await _metric(client, "seed_http_requests_total", method="GET", route="blob", status="404") == 1
    assert await _metric(client, "seed_http_requests_total", method="HEAD", route="blob", status="200") == 1
    assert await _metric(client, "seed_http_requests_total", method="PUT", route="upload", status="201") == 1
    assert await _metric(client, "seed_http_requests_total", method="GET", route="metrics", status="200") >= 5


# ---- restarts, purges, gc ----------------------------------------------------------------


async def test_upload_survives_restart(tmp_path: Path) -> None:
    data = random.Random(9).randbytes(DEFAULT_CHUNK_SIZE + 5000)
    digest = str(digest_of(data))
    config = load_config(None, listen="127.0.0.1:0", data=tmp_path / "data")

    async with trio.open_nursery() as nursery:
        info, _ = await nursery.start(partial(serve_seed, config))
        async with httpx.AsyncClient(base_url=info.url, trust_env=False) as client:
            r = await client.post("/v2/repo/blobs/uploads/")
            location = r.headers["location"]
            r = await client.patch(location, content=data[:700_000], headers={"Content-Range": "0-699999"})
            assert r.status_code == 202
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        info, _ = await nursery.start(partial(serve_seed, config))
        async with httpx.AsyncClient(base_url=info.url, trust_env=False) as client:
            assert await _metric(client, "seed_uploads_in_progress") == 1
            r = await client.get(location)
            assert (r.status_code, r.headers["range"]) == (204, "0-699999")
            r = await client.patch(location, content=data[600_000:700_000], headers={"Content-Range": "600000-699999"})
            assert r.status_code == 416
            r = await client.patch(
                location, content=data[700_000:], headers={"Content-Range": f"700000-{len(data) - 1}"}
            )
            assert r.status_code == 202
            r = await client.put(location, params={"digest": digest})
            assert r.status_code == 201, r.text
            assert (await client.get(f"/v2/repo/blobs/{digest}")).content == data
            r = await client.get(f"/v2/repo/blobs/{digest}/chunks")
            chunk_map = ChunkMap.decode(r.content, expected_digest=Digest.parse(digest), expected_size=len(data))
            assert chunk_map.verify_chunk(0, data[:DEFAULT_CHUNK_SIZE])
            assert chunk_map.verify_chunk(1, data[DEFAULT_CHUNK_SIZE:])
            assert await _metric(client, "seed_uploads_in_progress") == 0
        nursery.cancel_scope.cancel()


async def test_stale_uploads_are_purged(nursery: trio.Nursery, tmp_path: Path) -> None:
    config_file = tmp_path / "seed.toml"
    config_file.write_text("[storage]\nupload_max_age = 0.5\n")
    config = load_config(config_file, listen="127.0.0.1:0", data=tmp_path / "data")
    assert config.storage.upload_max_age == 0.5
    info, registry = await nursery.start(partial(serve_seed, config))
    async with httpx.AsyncClient(base_url=info.url, trust_env=False) as client:
        stale = (await client.post("/v2/repo/blobs/uploads/")).headers["location"]
        await client.patch(stale, content=b"some bytes")
        await trio.sleep(0.8)
        fresh = (await client.post("/v2/repo/blobs/uploads/")).headers["location"]
        assert await _metric(client, "seed_uploads_in_progress") == 2
        assert await registry.purge_stale_uploads() == 1
        _assert_error(await client.get(stale), 404, "BLOB_UPLOAD_UNKNOWN")
        assert (await client.get(fresh)).status_code == 204
        assert await _metric(client, "seed_uploads_in_progress") == 1
        assert await _metric(client, "seed_uploads_purged_total") == 1
        assert len(list((tmp_path / "data" / "uploads").iterdir())) == 1


async def test_gc(seed: Seed, capsys: pytest.CaptureFixture[str]) -> None:
    client = seed.client
    kept_manifest, kept_digest, kept_blobs = await push_image(client, "repo", "kept")
    _, dropped_digest, dropped_blobs = await push_image(client, "repo", "dropped", seed_bytes=7)
    orphan = await push_blob(client, "other", b"an orphan blob")
    await client.get(f"/v2/other/blobs/{orphan}/chunks")  # cache a chunk map to be collected too
    assert (await client.delete(f"/v2/repo/manifests/{dropped_digest}")).status_code == 202
    unreferenced = {orphan, dropped_digest, *(str(digest_of(b)) for b in dropped_blobs)}
    referenced = [kept_digest, *(str(digest_of(b)) for b in kept_blobs)]

    def run_gc(*extra: str) -> set[str]:
        capsys.readouterr()
        assert seed_main(["gc", "--data", str(seed.data), "--grace", "0", *extra]) == 0
        out = capsys.readouterr().out
        return {
            line.split()[-1]
            for line in out.splitlines()
            if line.startswith(("would remove sha256:", "removed sha256:"))
        }

    blob_files = {p for p in (seed.data / "blobs").rglob("*") if p.is_file()}
    assert await trio.to_thread.run_sync(run_gc, "--dry-run") == unreferenced
    assert {p for p in (seed.data / "blobs").rglob("*") if p.is_file()} == blob_files
    assert (await client.get(f"/v2/other/blobs/{orphan}")).status_code == 200

    assert await trio.to_thread.run_sync(run_gc) == unreferenced
    for digest in unreferenced:
        assert not (seed.data / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()
    assert not list((seed.data / "chunkmaps" / "sha256" / orphan[7:9]).glob(f"{orphan[7:]}.*"))
    _assert_error(await client.get(f"/v2/other/blobs/{orphan}"), 404, "BLOB_UNKNOWN")
    for digest, blob in zip(referenced[1:], kept_blobs, strict=True):
        assert (await client.get(f"/v2/repo/blobs/{digest}")).content == blob
    assert (await client.get("/v2/repo/manifests/kept")).content == kept_manifest
    # A second run finds nothing more to do.
    assert await trio.to_thread.run_sync(run_gc) == set()
