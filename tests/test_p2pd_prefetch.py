"""``p2pd prefetch`` and POST /p2pd/v1/prefetch: a two-platform index built offline, pushed to a
seed with ``skopeo copy --all``, prefetched by an agent for one platform; pins with an expiry;
re-running skips what is cached; the API is loopback-only and bounded."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import httpx
import pytest
import trio

from p2pd.cli import main
from p2pd.httpd import Headers, Request
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from p2pd.prefetch import MAX_IMAGES, PREFETCH_PATH, parse_image, prefetch_api
from tests.harness import skopeo
from tests.harness.images import write_layout_index
from tests.p2pd_support import NS, agent_config, start_agent, start_seed

AMD64_LAYER = os.urandom(300_000)
ARM64_LAYER = os.urandom(200_000)
SHARED_LAYER = b"shared layer, both platforms"


async def _push_index(tmp_path: Path, seed_url: str) -> dict[str, str]:
    layout = tmp_path / "layout"
    _, manifests = write_layout_index(layout, {"linux/amd64": [SHARED_LAYER, AMD64_LAYER],
                                               "linux/arm64/v8": [SHARED_LAYER, ARM64_LAYER]}, tag="multi")
    host = seed_url.removeprefix("http://")
    await trio.to_thread.run_sync(lambda: skopeo.copy(f"oci:{layout}:multi", f"docker://{host}/lab/app:multi",
                                                      extra_args=["--all"], preserve_digests=True))
    return manifests


async def _prefetch(url: str, body: dict[str, object]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60, trust_env=False) as client:
        return await client.post(url + PREFETCH_PATH, json=body)


async def test_prefetch_resolves_the_index_pins_and_resumes(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        seed_url, _ = await start_seed(nursery, tmp_path / "seed")
        manifests = await _push_index(tmp_path, seed_url)
        agent = await start_agent(nursery, agent_config(tmp_path, seed_url))
        image = f"{NS}/lab/app:multi"

        response = await _prefetch(agent.info.url, {"images": [image], "platform": "linux/arm64",
                                                     "pin_seconds": 3600})
        assert response.status_code == 200, response.text
        (report,) = response.json()["images"]
        assert report["status"] == "done", report
        assert report["manifest"] == manifests["linux/arm64/v8"] and report["platform"] == "linux/arm64/v8"
        assert report["blobs"] == 3 and report["bytes_fetched"] == report["bytes_total"] > len(ARM64_LAYER)
        store = agent.store
        arm_digest = Digest.parse("sha256:" + hashlib.sha256(ARM64_LAYER).hexdigest())
        amd_digest = Digest.parse("sha256:" + hashlib.sha256(AMD64_LAYER).hexdigest())
        assert store.size(arm_digest) == len(ARM64_LAYER) and store.size(amd_digest) is None
        pinned = {entry.digest for entry in store.entries() if entry.pinned}
        assert arm_digest in pinned and Digest.parse(manifests["linux/arm64/v8"]) in pinned

        # Re-running (after an interruption, or twice by mistake) fetches nothing again.
        again = (await _prefetch(agent.info.url, {"images": [image], "platform": "linux/arm64"})).json()["images"][0]
        assert again["status"] == "done" and again["bytes_fetched"] == 0
        assert again["bytes_cached"] == report["bytes_total"]

        # The pins end with their expiry; the blobs stay, now subject to the cache limit. A pin the
        # operator made before ('p2pd cache pin') is not the prefetch's to release.
        operator_pinned = Digest.parse(f"sha256:{hashlib.sha256(SHARED_LAYER).hexdigest()}")
        assert agent.prefetcher is not None
        released = agent.prefetcher.release_expired(now=time.time() + 7200)
        assert released == 5  # the index, the arm64 manifest, its config and its two layers
        assert not any(entry.pinned for entry in store.entries())
        store.pin(operator_pinned)
        repinned = (await _prefetch(agent.info.url, {"images": [image], "platform": "linux/arm64",
                                                      "pin_seconds": 60})).json()["images"][0]
        assert repinned["status"] == "done"
        assert agent.prefetcher.release_expired(now=time.time() + 120) == 4
        assert [entry.digest for entry in store.entries() if entry.pinned] == [operator_pinned]
        store.unpin(operator_pinned)
        assert store.size(arm_digest) == len(ARM64_LAYER)

        # The CLI: this node's own platform by default, a summary table, exit 0.
        endpoint = agent.info.url
        code = await trio.to_thread.run_sync(lambda: main(["prefetch", image, "--endpoint", endpoint,
                                                           "--pin-for", "0"]))
        assert code == 0

        # A platform the index lacks: the report says why, nothing is served as a 500.
        missing = (await _prefetch(agent.info.url, {"images": [image], "platform": "linux/s390x"})).json()
        assert missing["images"][0]["status"] == "failed" and "linux/s390x" in missing["images"][0]["error"]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("body", [
    b"not json", b"[]", json.dumps({"images": []}).encode(),
    json.dumps({"images": ["x"] * (MAX_IMAGES + 1)}).encode(),
    json.dumps({"images": ["UPPER/Case"]}).encode(),
    json.dumps({"images": ["a:b"], "platform": "linux"}).encode(),
    json.dumps({"images": ["a:b"], "pin_seconds": -1}).encode(),
])
async def test_prefetch_requests_are_bounded(tmp_path: Path, body: bytes) -> None:
    async with trio.open_nursery() as nursery:
        agent = await start_agent(nursery, agent_config(tmp_path, "http://127.0.0.1:9"))
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.post(agent.info.url + PREFETCH_PATH, content=body)
        assert response.status_code == 400, response.text
        nursery.cancel_scope.cancel()


async def test_prefetch_is_refused_to_remote_clients() -> None:
    async def never(request: Request) -> object:
        raise AssertionError("not reached")

    handler = prefetch_api(None, never)  # type: ignore[arg-type]  # refused before the prefetcher is used
    request = Request("POST", PREFETCH_PATH, PREFETCH_PATH, {}, Headers([]), None,  # type: ignore[arg-type]
                      ("10.1.2.3", 40000), "1.1")
    with pytest.raises(OCIError) as caught:
        await handler(request)
    assert caught.value.status == 403


def test_image_references() -> None:
    assert parse_image("seed.local:5000/lab/app:1.0") == parse_image("seed.local:5000/lab/app:1.0")
    ref = parse_image("seed.local:5000/lab/app:1.0")
    assert (ref.namespace, ref.name, ref.reference) == ("seed.local:5000", "lab/app", "1.0")
    assert parse_image("lab/app").reference == "latest" and parse_image("lab/app").namespace is None
    digest = "sha256:" + "a" * 64
    assert parse_image(f"localhost:5000/app@{digest}").reference == digest
    for bad in ("", "x" * 600, "Lab/App", "app@sha256:zz"):
        with pytest.raises(ValueError):
            parse_image(bad)
