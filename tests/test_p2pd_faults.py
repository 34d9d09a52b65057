"""p2pd under faults: a dead agent, a dead upstream, cut, corrupt, slow and stalled upstream
transfers, concurrent readers, a crash in the middle of a download, and requests it must refuse.

The faults come from ``tests.harness.faulty_proxy`` placed between p2pd and a real upstream
(the seed or docker-registry). Pulls are done by a private containerd where it matters, and
by raw httpx requests where the exact bytes on the wire are the point.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pd.daemon import Agent
from p2pd.errors import P2PDError, StoreError, UpstreamNotFound, UpstreamUnavailable, VerificationError
from p2pd.fetcher import HOLDBACK, Download, _is_swarm_fault, stream_download
from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE, chunk_size_for
from p2pd.oci.digest import Digest
from p2pd.store import BlobStore
from p2pd.swarm import engine
from tests.harness import skopeo
from tests.harness.containerd import PrivateContainerd
from tests.harness.faulty_proxy import ProxyFaults, serve_faulty_proxy
from tests.harness.images import MiB, OciLayout
from tests.harness.net import free_port
from tests.harness.p2pd_process import P2pdProcess
from tests.harness.reference_registry import ReferenceRegistry
from tests.harness.seed_process import SeedProcess
from tests.harness.verify import misnamed_blobs
from tests.p2pd_support import (
    NS,
    agent_config,
    agent_metric,
    blob_sizes,
    downloads_ended,
    get_blob_raw,
    pull,
    push_blob,
    random_bytes,
    seed_metric,
    start_agent,
    start_seed,
    write_hosts,
)
from tests.swarm_cluster import wait_until

REF = f"{NS}/lab/busybox:latest"


@pytest.fixture(params=["seed", "docker-registry"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A real upstream registry (subprocess): our seed, or docker-registry (no chunk maps)."""
    if request.param == "seed":
        with SeedProcess(tmp_path / "seed-data") as seed:
            yield seed.url
    else:
        with ReferenceRegistry(tmp_path / "reference-registry") as registry:
            yield registry.url


async def push_busybox(layout: OciLayout, registry_url: str) -> str:
    host = registry_url.removeprefix("http://")
    return await trio.to_thread.run_sync(skopeo.copy, layout.ref("busybox"), f"docker://{host}/lab/busybox:latest")


def blob_url(agent_url: str, digest: str, repository: str = "lab/blob") -> str:
    return f"{agent_url}/v2/{repository}/blobs/{digest}?ns={NS}"


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(30.0, connect=5.0))


# ---- containerd falls back or keeps pulling -----------------------------------------------


@pytest.mark.slow
@pytest.mark.root
async def test_pull_succeeds_via_server_when_p2pd_is_down(
    tmp_path: Path,
    busybox_layout: OciLayout,
    reference_registry: ReferenceRegistry,
    containerd: PrivateContainerd,
) -> None:
    pushed = await push_busybox(busybox_layout, reference_registry.url)
    async with trio.open_nursery() as nursery:
        agent = await start_agent(nursery, agent_config(tmp_path, reference_registry.url))
        endpoint = agent.info.url
        nursery.cancel_scope.cancel()
    async with client() as http:  # really down: connection refused
        with pytest.raises(httpx.ConnectError):
            await http.get(f"{endpoint}/v2/")
    hosts = write_hosts(tmp_path / "hosts", endpoint, reference_registry.url)
    await pull(containerd, REF, hosts)
    assert containerd.image_digest(REF) == pushed


@pytest.mark.slow
@pytest.mark.root
async def test_stale_tag_when_upstream_is_down(
    tmp_path: Path,
    busybox_layout: OciLayout,
    reference_registry: ReferenceRegistry,
    containerd: PrivateContainerd,
    nursery: trio.Nursery,
) -> None:
    pushed = await push_busybox(busybox_layout, reference_registry.url)
    # tag_ttl = 0: every pull asks the upstream what the tag points to.
    agent = await start_agent(nursery, agent_config(tmp_path, reference_registry.url, cache={"tag_ttl": 0}))
    hosts = write_hosts(tmp_path / "hosts", agent.info.url, reference_registry.url)
    await pull(containerd, REF, hosts)
    assert agent_metric(agent, "p2pd_stale_tag_answers_total") == 0

    await trio.to_thread.run_sync(reference_registry.stop)  # upstream and containerd's server are gone
    await trio.to_thread.run_sync(containerd.remove_all)
    await pull(containerd, REF, hosts)
    assert containerd.image_digest(REF) == pushed
    assert agent_metric(agent, "p2pd_stale_tag_answers_total") >= 1
    assert await trio.to_thread.run_sync(containerd.unpack_check, REF) in ("run", "mount")

    # A tag p2pd has never seen cannot be answered: a fast 404, and the pull fails cleanly.
    async with client() as http:
        started = time.monotonic()
        response = await http.get(f"{agent.info.url}/v2/lab/other/manifests/latest?ns={NS}")
        assert time.monotonic() - started < 2.0
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    started = time.monotonic()
    result = await pull(containerd, f"{NS}/lab/other:latest", hosts, check=False)
    assert result.returncode != 0
    assert time.monotonic() - started < 20


# ---- upstream transfers cut short -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.root
async def test_truncating_upstream_is_resumed_with_range(
    tmp_path: Path,
    busybox_layout: OciLayout,
    registry_url: str,
    containerd: PrivateContainerd,
    nursery: trio.Nursery,
) -> None:
    pushed = await push_busybox(busybox_layout, registry_url)
    sizes = blob_sizes(busybox_layout, "busybox")
    cut = 300_000
    assert max(sizes.values()) > 2 * cut  # the layer needs several resumes
    proxy = await nursery.start(serve_faulty_proxy, registry_url, ProxyFaults(truncate_after=cut))
    agent = await start_agent(nursery, agent_config(tmp_path, proxy.url))
    hosts = write_hosts(tmp_path / "hosts", agent.info.url, registry_url)
    await pull(containerd, REF, hosts)
    assert containerd.image_digest(REF) == pushed
    image_bytes = sum(sizes.values())
    assert agent_metric(agent, "p2pd_served_bytes_total") >= image_bytes
    # Resumed where it broke off: every byte crossed once, nothing was fetched from zero again.
    assert agent_metric(agent, "p2pd_fetched_bytes_total", source="upstream") == image_bytes
    for digest, size in sizes.items():
        gets = proxy.blob_gets(digest)
        assert proxy.blob_bytes(digest) == size
        assert len(gets) == -(-size // cut)
        assert gets[0].range is None
        assert [g.range for g in gets[1:]] == [f"bytes={n * cut}-" for n in range(1, len(gets))]
    assert await trio.to_thread.run_sync(containerd.unpack_check, REF) in ("run", "mount")


async def test_an_upstream_that_ignores_range_is_resumed_from_its_first_byte_and_counted(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """The real seed behind a proxy that drops the Range header (as some proxies and old
    registries do), and cuts the first answer short: the agent's resume is answered with the
    whole blob, whose start it reads and drops; the blob is whole and verified, the upstream
    bytes it kept are the blob once, and the answer that ignored the Range is counted
    (``p2pd_upstream_range_ignored_total``) and logged once."""
    seed_url, _ = await start_seed(nursery, tmp_path / "seed")
    data = random_bytes(2 * MiB)
    digest = await trio.to_thread.run_sync(push_blob, seed_url, "lab/blob", data)
    cut = 600_000
    proxy = await nursery.start(serve_faulty_proxy, seed_url, ProxyFaults(truncate_after=cut, ignore_range=True))
    agent = await start_agent(nursery, agent_config(tmp_path, proxy.url))

    async def cut_once() -> None:
        # Only the first answer is cut: the resume then comes whole (from the blob's first byte).
        await wait_until(lambda: any(get.body_bytes >= cut for get in proxy.blob_gets(digest)), interval=0.005)
        proxy.faults.truncate_after = None

    nursery.start_soon(cut_once)
    async with client() as http:
        with trio.fail_after(30):
            status, _length, received, complete = await get_blob_raw(http, blob_url(agent.info.url, digest))
    assert (status, complete, "sha256:" + hashlib.sha256(received).hexdigest()) == (200, True, digest)
    gets = proxy.blob_gets(digest)
    assert gets[0].range is None and all(get.range is not None and get.range.startswith("bytes=")
                                         for get in gets[1:]), [g.range for g in gets]
    # The whole blob came again for the resume: its start crossed twice, and was dropped.
    assert proxy.blob_bytes(digest) >= len(data) + cut
    assert agent_metric(agent, "p2pd_fetched_bytes_total", source="upstream") == len(data)
    assert agent_metric(agent, "p2pd_upstream_range_ignored_total") == len(gets) - 1 >= 1


# ---- upstream sending wrong bytes ---------------------------------------------------------------


@pytest.mark.parametrize("upstream", ["seed-with-chunk-map", "docker-registry"])
async def test_corrupt_upstream_never_yields_a_complete_wrong_blob(
    tmp_path: Path,
    upstream: str,
    nursery: trio.Nursery,
) -> None:
    if upstream == "seed-with-chunk-map":
        registry_url, _ = await start_seed(nursery, tmp_path / "seed")
        registry = None
    else:
        registry = await trio.to_thread.run_sync(ReferenceRegistry, tmp_path / "reference-registry")
        await trio.to_thread.run_sync(registry.start)
        registry_url = registry.url
    try:
        data = random_bytes(3 * MiB + 12345)
        digest = await trio.to_thread.run_sync(push_blob, registry_url, "lab/blob", data)
        proxy = await nursery.start(serve_faulty_proxy, registry_url, ProxyFaults(corrupt=True))
        agent = await start_agent(nursery, agent_config(tmp_path, proxy.url))
        async with client() as http:
            with trio.fail_after(20):
                status, length, received, complete = await get_blob_raw(http, blob_url(agent.info.url, digest))
        assert not (status == 200 and complete), "a complete blob that fails its digest was served"
        if status == 200:
            assert length == len(data) and len(received) < len(data)
        if upstream == "seed-with-chunk-map":
            assert [r.route for r in proxy.requests[:2]] == ["chunks", "blob"]
            # Only chunks that verified were released: everything received is right.
            assert received == data[: len(received)]
            assert len(received) <= len(data) // 2
        else:
            # Without a chunk map the last HOLDBACK bytes wait for the whole-digest check.
            assert len(received) <= len(data) - HOLDBACK
        for _ in range(100):  # the download task records the failure right after the stream ends
            if agent_metric(agent, "p2pd_verification_failures_total", source="upstream"):
                break
            await trio.sleep(0.05)
        assert agent_metric(agent, "p2pd_verification_failures_total", source="upstream") == 1
        assert agent.store.size(Digest.parse(digest)) is None
        assert agent.store.list_partials() == []
        assert misnamed_blobs(agent.store.root / "blobs" / "sha256") == []
    finally:
        if registry is not None:
            await trio.to_thread.run_sync(registry.stop)


@pytest.mark.slow
@pytest.mark.root
async def test_pull_with_corrupt_upstream_falls_back_to_the_good_server(
    tmp_path: Path,
    busybox_layout: OciLayout,
    registry_url: str,
    containerd: PrivateContainerd,
    nursery: trio.Nursery,
) -> None:
    pushed = await push_busybox(busybox_layout, registry_url)
    proxy = await nursery.start(serve_faulty_proxy, registry_url, ProxyFaults(corrupt=True))
    agent = await start_agent(nursery, agent_config(tmp_path, proxy.url))
    hosts = write_hosts(tmp_path / "hosts", agent.info.url, registry_url)  # server: the good upstream
    started = time.monotonic()
    # containerd retries p2pd after the cut stream; p2pd then answers 404 for the failed blob
    # (fetch.failure_hold), so containerd takes it from `server` and the pull succeeds.
    await pull(containerd, REF, hosts)
    assert time.monotonic() - started < 30
    assert agent_metric(agent, "p2pd_verification_failures_total", source="upstream") >= 1
    assert containerd.image_digest(REF) == pushed
    assert await trio.to_thread.run_sync(containerd.unpack_check, REF) in ("run", "mount")
    assert misnamed_blobs(agent.store.root / "blobs" / "sha256") == []


# ---- single flight ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_maps", [True, False], ids=["chunk-map", "no-chunk-map"])
async def test_concurrent_readers_share_one_upstream_fetch(
    tmp_path: Path,
    chunk_maps: bool,
    nursery: trio.Nursery,
) -> None:
    seed_url, seed = await start_seed(nursery, tmp_path / "seed")
    data = random_bytes(12 * MiB)
    digest = await trio.to_thread.run_sync(push_blob, seed_url, "lab/blob", data)
    rate = 16 * MiB  # bytes per second: the upstream transfer takes about 0.75 s
    proxy = await nursery.start(serve_faulty_proxy, seed_url, ProxyFaults(rate=rate, chunk_maps=chunk_maps))
    agent = await start_agent(nursery, agent_config(tmp_path, proxy.url))
    readers = 20
    first_byte: list[float] = []
    finished: list[float] = []
    bodies: list[str] = []

    async def read(http: httpx.AsyncClient) -> None:
        hasher = hashlib.sha256()
        first: float | None = None
        async with http.stream("GET", blob_url(agent.info.url, digest)) as response:
            assert response.status_code == 200
            assert response.headers["content-length"] == str(len(data))
            async for piece in response.aiter_raw():
                if first is None and piece:
                    first = trio.current_time() - started
                hasher.update(piece)
        assert first is not None
        first_byte.append(first)
        finished.append(trio.current_time() - started)
        bodies.append("sha256:" + hasher.hexdigest())

    async with client() as http:
        started = trio.current_time()
        with trio.fail_after(30):
            async with trio.open_nursery() as readers_nursery:
                for _ in range(readers):
                    readers_nursery.start_soon(read, http)
    assert bodies == [digest] * readers
    # One download served everyone.
    assert len(proxy.blob_gets(digest)) == 1
    assert proxy.blob_bytes(digest) == len(data)
    assert agent_metric(agent, "p2pd_upstream_fetches_total") == 1
    assert agent_metric(agent, "p2pd_fetched_bytes_total", source="upstream") == len(data)
    assert seed_metric(seed, "seed_blob_bytes_sent_total") == len(data)
    # Bytes were streamed as they were verified, not after the whole blob had arrived.
    download_time = len(data) / rate
    assert min(finished) >= 0.9 * download_time
    # Relative, not a wall-clock target: every reader had bytes well before the first finished.
    assert max(first_byte) < 0.6 * min(finished), (first_byte, finished)


# ---- a defect in the swarm path --------------------------------------------------------------------


async def _swarm_agent_alone(tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, *,
                             chunk_maps: bool) -> tuple[bytes, str, Any, Agent]:
    """An 8 MiB blob on an in-process seed behind a proxy (16 MiB/s; chunk maps shown or not) and
    an in-process agent with the swarm on and no peers."""
    seed_url, _ = await start_seed(nursery, tmp_path / "seed")
    data = random_bytes(8 * MiB)
    digest = await trio.to_thread.run_sync(push_blob, seed_url, "lab/blob", data)
    proxy = await nursery.start(serve_faulty_proxy, seed_url, ProxyFaults(rate=16 * MiB, chunk_maps=chunk_maps))
    monkeypatch.setattr(engine, "_JOIN_GRACE", 0.0)  # a node alone: no wait for peers
    agent = await start_agent(nursery, agent_config(
        tmp_path, proxy.url,
        swarm={"peer_listen": f"127.0.0.1:{free_port()}", "mdns": False, "insecure_peers": True, "peer_tls": False}))
    return data, digest, proxy, agent


async def _pulled_whole(agent: Agent, digest: str, size: int) -> None:
    """One GET of the blob through the agent: all of it, right, on one stream."""
    async with client() as http:
        with trio.fail_after(30):
            status, length, received, complete = await get_blob_raw(http, blob_url(agent.info.url, digest))
    assert (status, length, complete) == (200, size, True)
    assert "sha256:" + hashlib.sha256(received).hexdigest() == digest


@pytest.mark.parametrize("chunk_maps", [True, False], ids=["chunk-map", "no-chunk-map"])
async def test_a_defect_in_the_swarm_path_mid_pull_falls_back_to_the_upstream_and_the_stream_goes_on(
    tmp_path: Path,
    chunk_maps: bool,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception nobody meant to raise (here: landing a chunk from the upstream, once half the
    blob is here) ends the swarm's part; the blob comes from the upstream alone, from the bytes
    already released on, and the client's one stream ends with the right blob."""
    data, digest, proxy, agent = await _swarm_agent_alone(tmp_path, nursery, monkeypatch, chunk_maps=chunk_maps)
    released_at_fault: list[int] = []
    land = engine.Swarm._land_upstream_chunk

    async def land_then_break(swarm: engine.Swarm, transfer: engine.SwarmTransfer, arrival: engine.Arrival) -> None:
        if transfer.have.cardinality() >= transfer.count // 2:
            released_at_fault.append(agent.fetcher.in_flight[Digest.parse(digest)].released)
            raise RuntimeError("an injected defect")
        await land(swarm, transfer, arrival)

    monkeypatch.setattr(engine.Swarm, "_land_upstream_chunk", land_then_break)
    gone: list[Digest] = []
    announce_gone = engine.Swarm.announce_gone

    async def told_gone(swarm: engine.Swarm, blob: Digest) -> None:
        gone.append(blob)
        await announce_gone(swarm, blob)

    monkeypatch.setattr(engine.Swarm, "announce_gone", told_gone)
    await _pulled_whole(agent, digest, len(data))
    with trio.fail_after(10):
        await downloads_ended(agent)
    assert released_at_fault and released_at_fault[0] > 0  # the client's stream was under way
    assert agent_metric(agent, "p2pd_swarm_fallbacks_total") == 1
    assert gone == [Digest.parse(digest)]  # its range leases released at once, not left to expire
    # Logged as the defect it is, with its traceback.
    assert [r.levelname for r in caplog.records if r.name == "p2pd.fetcher"] == ["ERROR"]
    assert "RuntimeError: an injected defect" in caplog.text
    assert agent.store.blob_path(Digest.parse(digest)).exists()
    # The plain path went on from the released bytes: not the whole blob again.
    assert proxy.blob_bytes(digest) < 2 * len(data)


async def test_a_defect_after_the_blob_is_complete_costs_no_second_fetch(
    tmp_path: Path,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A defect in telling the swarm about a blob already verified and stored is logged, and the
    blob is neither fetched again nor failed."""
    data, digest, proxy, agent = await _swarm_agent_alone(tmp_path, nursery, monkeypatch, chunk_maps=True)

    async def broken(swarm: engine.Swarm, blob: Digest, size: int) -> None:
        raise RuntimeError("an injected defect")

    monkeypatch.setattr(engine.Swarm, "announce_complete", broken)
    await _pulled_whole(agent, digest, len(data))
    with trio.fail_after(10):
        await downloads_ended(agent)
    assert proxy.blob_bytes(digest) == len(data)  # one copy: no fallback fetch
    assert agent_metric(agent, "p2pd_swarm_fallbacks_total") == 0
    assert "RuntimeError: an injected defect" in caplog.text
    assert not agent.fetcher.failed_recently(Digest.parse(digest))


def test_only_the_swarms_own_defects_fall_back_to_the_upstream_alone() -> None:
    """The upstream's, the store's and a bad blob's failures would meet the plain path too (and a
    cut or a 404 already sends containerd to its next host); anything else is a defect."""
    not_ours = [UpstreamNotFound("gone"), UpstreamUnavailable("503"), StoreError("disk full"),
                VerificationError("bad"), trio.TooSlowError()]
    assert [_is_swarm_fault(exc) for exc in not_ours] == [False] * len(not_ours)
    assert not _is_swarm_fault(ExceptionGroup("nursery", [UpstreamNotFound("gone"), StoreError("full")]))
    assert _is_swarm_fault(AttributeError("'NoneType' object has no attribute 'settimeout'"))
    assert _is_swarm_fault(ExceptionGroup("nursery", [UpstreamNotFound("gone"), KeyError(3)]))
    assert _is_swarm_fault(ExceptionGroup("outer", [ExceptionGroup("inner", [AssertionError()])]))


# ---- crash in the middle of a download ---------------------------------------------------------


@pytest.mark.slow
async def test_restart_resumes_the_partial_download(tmp_path: Path, nursery: trio.Nursery) -> None:
    seed_url, _ = await start_seed(nursery, tmp_path / "seed")
    data = random_bytes(16 * MiB)
    digest = await trio.to_thread.run_sync(push_blob, seed_url, "lab/blob", data)
    proxy = await nursery.start(serve_faulty_proxy, seed_url, ProxyFaults(rate=8 * MiB))
    agent_data = tmp_path / "agent"
    partial_file = agent_data / "downloads" / f"{digest.replace(':', '-')}.partial"
    blobs_dir = agent_data / "blobs" / "sha256"
    url_path = f"/v2/lab/blob/blobs/{digest}?ns={NS}"
    agent = P2pdProcess(agent_data, [f"{NS}={proxy.url}"])
    try:
        await trio.to_thread.run_sync(agent.start)

        async def doomed_reader() -> None:
            with pytest.raises(httpx.HTTPError):  # the agent dies under it
                async with client() as http:
                    await get_blob_raw(http, agent.url + url_path)
                    raise httpx.ReadError("the body was complete although the agent was killed")

        nursery.start_soon(doomed_reader)
        with trio.fail_after(15):
            while not partial_file.exists() or partial_file.stat().st_size < len(data) // 2:
                assert misnamed_blobs(blobs_dir) == []
                await trio.sleep(0.02)
        await trio.to_thread.run_sync(agent.kill9)
        kept = partial_file.stat().st_size
        assert len(data) // 2 <= kept < len(data)
        assert misnamed_blobs(blobs_dir) == []
        gets_before_crash = len(proxy.blob_gets(digest))

        proxy.faults.rate = None
        await trio.to_thread.run_sync(agent.start)
        async with client() as http:
            with trio.fail_after(20):
                status, _, body, complete = await get_blob_raw(http, agent.url + url_path)
        assert status == 200 and complete and body == data
        # With the seed's chunk map the last chunk is released before the whole-digest check
        # and the commit (rename into blobs/) that follow it.
        blob_file = blobs_dir / digest[7:9] / digest[7:]
        with trio.fail_after(10):
            while partial_file.exists() or not blob_file.exists():  # noqa: ASYNC110 - another process
                await trio.sleep(0.02)
        assert misnamed_blobs(blobs_dir) == []
        # The restarted agent asked only for what the partial file did not hold (whole
        # verified chunks are kept: at most one chunk is fetched again).
        resumed = proxy.blob_gets(digest)[gets_before_crash:]
        assert len(resumed) == 1
        assert resumed[0].range is not None
        offset = int(resumed[0].range.removeprefix("bytes=").removesuffix("-"))
        assert kept - MiB < offset <= kept
        assert resumed[0].body_bytes == len(data) - offset
        fetched = await trio.to_thread.run_sync(partial(agent.metric, "p2pd_fetched_bytes_total", source="upstream"))
        assert fetched == len(data) - offset
    finally:
        await trio.to_thread.run_sync(agent.stop)


# ---- watchdogs ---------------------------------------------------------------------------------


async def test_stalled_upstream_stream_is_cut(tmp_path: Path, nursery: trio.Nursery) -> None:
    seed_url, _ = await start_seed(nursery, tmp_path / "seed")
    data = random_bytes(4 * MiB)
    digest = await trio.to_thread.run_sync(push_blob, seed_url, "lab/blob", data)
    # The stream stops inside a chunk (a 4 MiB blob is cut into chunk_size_for's 128 KiB chunks).
    chunk = chunk_size_for(len(data), DEFAULT_CHUNK_SIZE)
    proxy = await nursery.start(serve_faulty_proxy, seed_url, ProxyFaults(stall_after=MiB + MiB // 2 + chunk // 2))
    stall_timeout = 1.0
    agent = await start_agent(nursery, agent_config(tmp_path, proxy.url, fetch={"stall_timeout": stall_timeout}))
    received = 0
    last_byte = 0.0
    async with client() as http:
        started = trio.current_time()
        with trio.fail_after(10):
            async with http.stream("GET", blob_url(agent.info.url, digest)) as response:
                assert response.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError):
                    async for piece in response.aiter_raw():
                        received += len(piece)
                        last_byte = trio.current_time()
        ended = trio.current_time()
    assert received == MiB + MiB // 2  # the chunks verified; the one the stall cut never completed
    # The watchdog starts when p2pd hands over its last byte, a little before the client reads it.
    assert stall_timeout * 0.5 <= ended - last_byte <= stall_timeout + 2.0, (last_byte - started, ended - started)
    assert agent_metric(agent, "p2pd_stalled_streams_total") == 1


async def test_silent_upstream_gives_a_fast_404(tmp_path: Path, nursery: trio.Nursery) -> None:
    seed_url, _ = await start_seed(nursery, tmp_path / "seed")
    digest = await trio.to_thread.run_sync(push_blob, seed_url, "lab/blob", random_bytes(64 * 1024))
    proxy = await nursery.start(serve_faulty_proxy, seed_url, ProxyFaults(hang=True))
    first_byte_timeout = 1.0
    agent = await start_agent(
        nursery, agent_config(tmp_path, proxy.url, fetch={"first_byte_timeout": first_byte_timeout})
    )
    async with client() as http:
        started = time.monotonic()
        with trio.fail_after(10):
            response = await http.get(blob_url(agent.info.url, digest))
        elapsed = time.monotonic() - started
    assert response.status_code == 404
    assert response.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert first_byte_timeout * 0.9 <= elapsed <= first_byte_timeout + 2.0


def _push_image(registry_url: str, repository: str, tag: str, layer: bytes) -> str:
    """A config and one layer, and an OCI image manifest naming them under ``tag``; the layer's digest."""
    config = b"{}"
    config_digest = push_blob(registry_url, repository, config)
    layer_digest = push_blob(registry_url, repository, layer)
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                           "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                            "size": len(layer)}]}
    with httpx.Client(base_url=registry_url, trust_env=False, timeout=30) as http:
        answer = http.put(f"/v2/{repository}/manifests/{tag}", content=json.dumps(manifest).encode(),
                          headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        assert answer.status_code == 201, answer.text
    return layer_digest


async def test_a_blob_whose_size_comes_late_is_answered_with_its_manifests_size(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    # The upstream says nothing about the blob for longer than first_byte_timeout (a congested
    # uplink). The manifest this agent served gave the blob's size: the client gets it and the
    # bytes as they come, not a 404 that would send it to the registry for a copy of its own.
    seed_url, _ = await start_seed(nursery, tmp_path / "seed")
    layer = random_bytes(256 * 1024)
    layer_digest = await trio.to_thread.run_sync(_push_image, seed_url, "lab/blob", "v1", layer)
    faults = ProxyFaults()
    proxy = await nursery.start(serve_faulty_proxy, seed_url, faults)
    agent = await start_agent(nursery, agent_config(tmp_path, proxy.url, fetch={"first_byte_timeout": 1.0}))

    async def answer_again_soon() -> None:
        await trio.sleep(0.5)  # before the blob request's first_byte_timeout: its GET is answered
        faults.hang = False

    async with client() as http:
        manifest = await http.get(f"{agent.info.url}/v2/lab/blob/manifests/v1?ns={NS}",
                                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        assert manifest.status_code == 200
        faults.hang = True  # the chunk-map request hangs until first_byte_timeout
        nursery.start_soon(answer_again_soon)
        with trio.fail_after(20):
            status, length, body, complete = await get_blob_raw(http, blob_url(agent.info.url, layer_digest))
        assert (status, length, complete) == (200, len(layer), True) and body == layer
        # A blob no manifest served here named is still a fast 404 (test_silent_upstream_gives_a_fast_404).
        faults.hang = True
        other = await trio.to_thread.run_sync(push_blob, seed_url, "lab/blob", random_bytes(1000))
        with trio.fail_after(10):
            assert (await http.get(blob_url(agent.info.url, other))).status_code == 404


async def test_a_stream_asked_for_more_than_the_blob_has_ends(tmp_path: Path) -> None:
    # Answered with a manifest's size that the download then contradicts: the stream ends at
    # once (the client retries, then falls back), it does not wait for bytes that never come.
    download = Download(Digest.parse("sha256:" + "ab" * 32), NS, "lab/blob", size=10, released=10)
    with pytest.raises(P2PDError, match="fewer than asked"):
        with trio.fail_after(2):
            async for _ in stream_download(download, BlobStore(tmp_path, max_bytes=MiB), 0, 19, 60.0):
                pass


async def test_a_stream_waiting_for_bytes_tells_how_long_its_reader_has_waited(tmp_path: Path) -> None:
    # The swarm rescues the chunk a reader needs once it has waited too long (Swarm._rescue_reader):
    # the wait is the reader's since its last byte, and ends with the stream.
    store = BlobStore(tmp_path, max_bytes=MiB)
    digest = Digest.parse("sha256:" + "cd" * 32)
    fd, _ = store.open_partial(digest)
    os.pwrite(fd, b"x" * 20, 0)
    download = Download(digest, NS, "lab/blob", size=20, released=10)
    assert download.reader_wait() == 0.0
    got: list[int] = []

    async def read() -> None:
        async for piece in stream_download(download, store, 0, 19, 60.0):
            got.append(piece.length)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.sleep(0.3)
        assert got == [10] and 0.2 < download.reader_wait() < 5.0  # waiting for bytes 10..19
        download._release(20)
    assert got == [10, 10] and download.reader_wait() == 0.0
    os.close(fd)


# ---- requests a read-only mirror refuses ---------------------------------------------------------

_SOME_DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/lab/x/blobs/uploads/"),
        ("PATCH", "/v2/lab/x/blobs/uploads/0f1e2d"),
        ("PUT", "/v2/lab/x/blobs/uploads/0f1e2d?digest=" + _SOME_DIGEST),
        ("PUT", "/v2/lab/x/manifests/latest"),
        ("DELETE", "/v2/lab/x/manifests/" + _SOME_DIGEST),
        ("DELETE", "/v2/lab/x/blobs/" + _SOME_DIGEST),
    ],
)
async def test_write_methods_are_refused(tmp_path: Path, method: str, path: str, nursery: trio.Nursery) -> None:
    agent = await start_agent(nursery, agent_config(tmp_path, "http://127.0.0.1:9"))
    async with client() as http:
        started = time.monotonic()
        response = await http.request(
            method, agent.info.url + path, content=b'{"x": 1}', headers={"Content-Type": "application/json"}
        )
        assert time.monotonic() - started < 1.0
    assert response.status_code == 405
    assert response.headers["content-type"] == "application/json"
    assert response.headers["allow"] == "GET, HEAD"
    assert response.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert agent_metric(agent, "p2pd_upstream_fetches_total") == 0


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/Lab/X/manifests/latest", "NAME_INVALID"),
        ("/v2/lab/x/manifests/-latest", "TAG_INVALID"),
        ("/v2/lab/x/blobs/sha256:abc", "DIGEST_INVALID"),
        ("/v2/lab/x/blobs/sha256:" + "AB" * 32, "DIGEST_INVALID"),
        ("/v2/lab/x/manifests/sha256:" + "z" * 64, "DIGEST_INVALID"),
        ("/v2/lab/x/blobs/md5:" + "ab" * 16, "UNSUPPORTED"),
        ("/v2/lab/%2e%2e/blobs/" + _SOME_DIGEST, "NAME_INVALID"),
        (f"/v2/lab/x/blobs/{_SOME_DIGEST}?ns=evil.example/path", "NAME_INVALID"),
        ("/v2/lab/x/manifests/latest?ns=user@evil.example", "NAME_INVALID"),
    ],
)
async def test_invalid_names_and_digests_are_400(
    tmp_path: Path,
    path: str,
    code: str,
    nursery: trio.Nursery,
) -> None:
    agent = await start_agent(nursery, agent_config(tmp_path, "http://127.0.0.1:9"))
    async with client() as http:
        response = await http.get(agent.info.url + path)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.content)["errors"][0]["code"] == code
    assert agent_metric(agent, "p2pd_upstream_fetches_total") == 0
