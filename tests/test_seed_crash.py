"""kill -9 of the seed process: whatever the moment, a restart on the same data directory shows
either the old state or the new one, never a partial blob or manifest, and pushes work again.

The seed runs as a real subprocess (``SeedProcess``) and is killed with SIGKILL. The page cache
survives a process kill, so these tests check atomicity (temporary file + rename, verify before
rename), not fsync durability.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import trio

from tests.harness import skopeo
from tests.harness.images import MT_OCI_CONFIG, MT_OCI_LAYER_TAR, MT_OCI_MANIFEST, MiB, OciLayout
from tests.harness.seed_process import SeedProcess
from tests.harness.tools import ToolError
from tests.harness.verify import misnamed_blobs, pull_and_verify

T = TypeVar("T")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _wait_for(condition: Callable[[], T], deadline_s: float, what: str) -> T:
    """Polls ``condition`` until it returns something truthy; fails after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(0.005)


def _upload_sizes(data_dir: Path) -> dict[str, int]:
    """Bytes on disk of every upload session (``uploads/<id>/data``)."""
    sizes = {}
    for directory in (data_dir / "uploads").iterdir():
        try:
            sizes[directory.name] = (directory / "data").stat().st_size
        except FileNotFoundError:
            continue
    return sizes


def _blob_intact(seed: SeedProcess) -> None:
    """Every file under blobs/ hashes to its name: no partial or corrupt blob was left."""
    assert misnamed_blobs(seed.data_dir / "blobs" / "sha256") == []


def _open_streaming_upload(
    seed: SeedProcess, flow: str, repo: str, blob: Path, digest: str, send: int
) -> tuple[socket.socket, str | None]:
    """Starts uploading ``blob`` with its full Content-Length but sends only ``send`` bytes.

    Flows: ``patch`` (skopeo/docker: POST, then the blob in one PATCH), ``put`` (containerd:
    POST, then the blob in the PUT), ``single-post`` (``POST ?digest=`` with the blob).
    Returns the socket, still open, and the session location (None for single-post).
    """
    quoted = digest.replace(":", "%3A")
    location = None
    if flow == "single-post":
        method, target = "POST", f"/v2/{repo}/blobs/uploads/?digest={quoted}"
    else:
        resp = httpx.post(f"{seed.url}/v2/{repo}/blobs/uploads/", trust_env=False)
        assert resp.status_code == 202
        location = resp.headers["location"]
        method, target = ("PATCH", location) if flow == "patch" else ("PUT", f"{location}?digest={quoted}")
    sock = socket.create_connection(("127.0.0.1", seed.port), timeout=10)
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {seed.host}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {blob.stat().st_size}\r\n\r\n"
    )
    sock.sendall(head.encode())
    with blob.open("rb") as f:
        remaining = send
        while remaining:
            piece = f.read(min(MiB, remaining))
            sock.sendall(piece)
            remaining -= len(piece)
    return sock, location


def _file_pieces(path: Path, offset: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(offset)
        while piece := f.read(MiB):
            yield piece


def _big_layer(layout: OciLayout) -> tuple[str, int, Path]:
    layer = layout.manifest("big")["layers"][-1]
    assert layer["size"] >= 50 * MiB
    return layer["digest"], layer["size"], layout.blob_path(layer["digest"])


def _push_and_verify_big(seed: SeedProcess, layout: OciLayout, dest: Path) -> None:
    ref = f"{seed.repo_url('lab/big')}:latest"
    assert skopeo.copy(layout.ref("big"), ref) == layout.manifest_digest("big")
    pull_and_verify(ref, layout, "big", dest)
    _blob_intact(seed)


@pytest.mark.slow
@pytest.mark.parametrize("flow", ["patch", "put", "single-post"])
def test_kill9_during_blob_upload(flow: str, seed_process: SeedProcess, big_layout: OciLayout, tmp_path: Path) -> None:
    digest, size, blob = _big_layer(big_layout)
    seed = seed_process
    sock, location = _open_streaming_upload(seed, flow, "lab/big", blob, digest, send=24 * MiB)
    try:
        _wait_for(
            lambda: max(_upload_sizes(seed.data_dir).values(), default=0) >= 16 * MiB,
            20,
            "16 MiB of the layer on the seed's disk",
        )
        assert seed.metric("seed_bytes_received_total") >= 16 * MiB
        seed.kill9()
    finally:
        sock.close()

    # On disk: a partial upload session, and nothing under blobs/ for the digest.
    ((upload_id, on_disk),) = [(k, v) for k, v in _upload_sizes(seed.data_dir).items() if v]
    assert 16 * MiB <= on_disk <= 24 * MiB < size
    assert not (seed.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()

    seed.restart()
    with httpx.Client(base_url=seed.url, trust_env=False, timeout=30) as http:
        assert http.head(f"/v2/lab/big/blobs/{digest}").status_code == 404
        assert http.get(f"/v2/lab/big/blobs/{digest}").status_code == 404
        _blob_intact(seed)
        if location is not None:
            # The session survived with what reached the disk; the client resumes where it says.
            assert location.endswith(upload_id)
            status = http.get(location)
            assert status.status_code == 204 and status.headers["range"] == f"0-{on_disk - 1}"
            resp = http.patch(
                location,
                content=_file_pieces(blob, on_disk),
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(size - on_disk),
                    "Content-Range": f"{on_disk}-{size - 1}",
                },
            )
            assert resp.status_code == 202 and resp.headers["range"] == f"0-{size - 1}"
            # The in-memory hash died with the process: the seed re-reads the file to verify it.
            resp = http.put(httpx.URL(location).copy_add_param("digest", digest))
            assert resp.status_code == 201, resp.text
            assert int(http.head(f"/v2/lab/big/blobs/{digest}").headers["content-length"]) == size
    _push_and_verify_big(seed, big_layout, tmp_path / "pulled")


class _ThrottledRelay:
    """A loopback TCP relay that forwards client bytes at most ``rate`` bytes/s (replies unthrottled).

    Slows a real client's push down enough to kill the server in the middle of it.
    """

    def __init__(self, target_port: int, rate: float) -> None:
        self.target_port = target_port
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            for src, dst, rate in ((client, upstream, self.rate), (upstream, client, 0.0)):
                thread = threading.Thread(target=self._pump, args=(src, dst, rate), daemon=True)
                thread.start()
                self._threads.append(thread)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rate: float) -> None:
        started, moved = time.monotonic(), 0
        try:
            while data := src.recv(64 * 1024):
                dst.sendall(data)
                moved += len(data)
                if rate:
                    time.sleep(max(0.0, moved / rate - (time.monotonic() - started)))
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (src, dst):  # one side died: the other must see it too
                sock.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for sock in self._sockets:
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> _ThrottledRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.mark.slow
def test_kill9_during_skopeo_push(seed_process: SeedProcess, big_layout: OciLayout, tmp_path: Path) -> None:
    digest, size, _ = _big_layer(big_layout)
    seed = seed_process
    with _ThrottledRelay(seed.port, rate=16 * MiB) as relay, ThreadPoolExecutor(1) as pool:
        push = pool.submit(
            skopeo.copy, big_layout.ref("big"), f"docker://127.0.0.1:{relay.port}/lab/big:latest", timeout=60
        )
        _wait_for(
            lambda: max(_upload_sizes(seed.data_dir).values(), default=0) >= 8 * MiB,
            30,
            "8 MiB of skopeo's upload on the seed's disk",
        )
        seed.kill9()
        with pytest.raises(ToolError):
            push.result(timeout=60)
    assert 8 * MiB <= max(_upload_sizes(seed.data_dir).values()) < size

    seed.restart()
    with httpx.Client(base_url=seed.url, trust_env=False, timeout=30) as http:
        assert http.head(f"/v2/lab/big/blobs/{digest}").status_code == 404
        assert http.get("/v2/lab/big/manifests/latest").status_code == 404
    _blob_intact(seed)
    _push_and_verify_big(seed, big_layout, tmp_path / "pulled")


# ---- manifests: many concurrent writes, SIGKILL at a random moment ---------------------------

_STRESS_REPO = "lab/stress"
_MANIFEST_WORKERS = 8
_BLOB_WORKERS = 2


class _StressLog:
    """What the writers sent, and what the seed confirmed (201), across kill iterations."""

    def __init__(self) -> None:
        self.manifests: dict[str, bytes] = {}  # digest -> bytes, for every manifest PUT started
        self.tag_history: dict[str, set[str]] = {}  # tag -> digests PUT under that tag
        self.confirmed_manifests: set[str] = set()
        self.confirmed_tags: set[str] = set()
        self.blobs: dict[str, bytes] = {}
        self.confirmed_blobs: set[str] = set()
        self.busy = trio.Event()  # set once len(confirmed_manifests) reaches busy_at
        self.busy_at = 0


def _stress_manifest(base: dict[str, object], iteration: int, worker: int, n: int) -> bytes:
    manifest = dict(
        base, annotations={"iteration": str(iteration), "writer": str(worker), "n": str(n), "nonce": uuid.uuid4().hex}
    )
    return json.dumps(manifest, separators=(",", ":")).encode()


async def _manifest_writer(url: str, base: dict[str, object], log: _StressLog, iteration: int, worker: int) -> None:
    """PUTs unique manifests until the seed dies: by tag (own and shared tags) and by digest."""
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as client:
        for n in range(1_000_000):
            body = _stress_manifest(base, iteration, worker, n)
            digest = _sha256(body)
            tag = None if n % 4 == 3 else ("shared" if n % 3 == 0 else f"w{worker}-{n % 2}")
            log.manifests[digest] = body
            if tag is not None:
                log.tag_history.setdefault(tag, set()).add(digest)
            try:
                resp = await client.put(
                    f"/v2/{_STRESS_REPO}/manifests/{tag or digest}",
                    content=body,
                    headers={"Content-Type": MT_OCI_MANIFEST},
                )
            except httpx.TransportError:
                return  # killed
            assert resp.status_code == 201, resp.text
            log.confirmed_manifests.add(digest)
            if len(log.confirmed_manifests) >= log.busy_at:
                log.busy.set()
            if tag is not None:
                log.confirmed_tags.add(tag)


async def _blob_writer(url: str, log: _StressLog, rng: random.Random) -> None:
    """Single-request blob uploads until the seed dies (commit = rename, then link)."""
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=10) as client:
        while True:
            data = rng.randbytes(64 * 1024)
            digest = _sha256(data)
            log.blobs[digest] = data
            try:
                resp = await client.post(f"/v2/{_STRESS_REPO}/blobs/uploads/", params={"digest": digest}, content=data)
            except httpx.TransportError:
                return
            assert resp.status_code == 201, resp.text
            log.confirmed_blobs.add(digest)


def _tmp_leftovers(data_dir: Path) -> list[bytes]:
    """Contents of the files a crash left in tmp/ (each was being written when the seed died)."""
    leftovers = []
    for path in (data_dir / "tmp").iterdir():
        try:
            leftovers.append(path.read_bytes())
        except OSError:
            continue
    return leftovers


async def _check_after_restart(
    client: httpx.AsyncClient,
    seed: SeedProcess,
    log: _StressLog,
    leftovers: list[bytes],
    iteration: int,
    since: tuple[int, int],
) -> dict[str, int]:
    """Checks the invariants after a kill and restart; returns what the tmp/ leftovers were.

    Manifests and blobs sent before ``since`` (counts) were checked after earlier kills.
    """
    assert list((seed.data_dir / "tmp").iterdir()) == []  # cleaned at startup
    _blob_intact(seed)

    # Every tag resolves to a complete manifest that was PUT under that tag; confirmed tags survive.
    tags = (await client.get(f"/v2/{_STRESS_REPO}/tags/list")).json()["tags"]
    assert log.confirmed_tags <= set(tags)
    resolved: dict[str, str] = {}
    for tag in tags:
        resp = await client.get(f"/v2/{_STRESS_REPO}/manifests/{tag}", headers={"Accept": MT_OCI_MANIFEST})
        assert resp.status_code == 200
        digest = resp.headers["docker-content-digest"]
        assert _sha256(resp.content) == digest and digest in log.tag_history[tag]
        assert resp.content == log.manifests[digest]
        resolved[tag] = digest

    # Every manifest ever sent is either absent or served complete; every confirmed one is there.
    async def check_manifest(digest: str, body: bytes) -> None:
        resp = await client.get(f"/v2/{_STRESS_REPO}/manifests/{digest}", headers={"Accept": MT_OCI_MANIFEST})
        assert resp.status_code in (200, 404)
        if resp.status_code == 200:
            assert resp.content == body
        else:
            assert digest not in log.confirmed_manifests

    async def check_blob(digest: str, data: bytes) -> None:
        resp = await client.get(f"/v2/{_STRESS_REPO}/blobs/{digest}")
        assert resp.status_code in (200, 404)
        if resp.status_code == 200:
            assert resp.content == data
        else:
            assert digest not in log.confirmed_blobs

    limiter = trio.CapacityLimiter(8)

    async def limited(check: Callable[[str, bytes], object], digest: str, body: bytes) -> None:
        async with limiter:
            await check(digest, body)  # type: ignore[misc]

    async with trio.open_nursery() as nursery:
        for digest, body in list(log.manifests.items())[since[0] :]:
            nursery.start_soon(limited, check_manifest, digest, body)
        for digest, data in list(log.blobs.items())[since[1] :]:
            nursery.start_soon(limited, check_blob, digest, data)

    # Files left in tmp/ were never renamed into place: none of them is visible through the API.
    by_body = {body: digest for digest, body in log.manifests.items()}
    kinds = {"manifest": 0, "tag": 0, "other": 0}
    for content in leftovers:
        if content in by_body:  # a manifest body that was being written
            kinds["manifest"] += 1
            resp = await client.get(f"/v2/{_STRESS_REPO}/manifests/{by_body[content]}")
            assert resp.status_code == 404
        elif content.decode(errors="replace") in log.manifests:  # a tag file that was being written
            kinds["tag"] += 1
            assert content.decode() not in resolved.values()
        else:  # revision metadata, repository links, or a file cut short
            kinds["other"] += 1

    # Pushes still work.
    data = f"after crash {iteration}".encode()
    resp = await client.post(f"/v2/{_STRESS_REPO}/blobs/uploads/", params={"digest": _sha256(data)}, content=data)
    assert resp.status_code == 201
    body = _stress_manifest(json.loads(next(iter(log.manifests.values()))), iteration, -1, 0)
    resp = await client.put(
        f"/v2/{_STRESS_REPO}/manifests/after-{iteration}", content=body, headers={"Content-Type": MT_OCI_MANIFEST}
    )
    assert resp.status_code == 201
    log.manifests[_sha256(body)] = body
    log.tag_history[f"after-{iteration}"] = {_sha256(body)}
    log.confirmed_manifests.add(_sha256(body))
    log.confirmed_tags.add(f"after-{iteration}")
    return kinds
    assert (await client.get(f"/v2/{_STRESS_REPO}/manifests/after-{iteration}")).content == body


async def test_kill9_during_manifest_writes(seed_process: SeedProcess) -> None:
    seed = seed_process
    rng_seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(rng_seed)
    print(f"random seed {rng_seed}")
    log = _StressLog()
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    layer = rng.randbytes(4096)
    async with httpx.AsyncClient(base_url=seed.url, trust_env=False, timeout=10) as client:
        for data in (config, layer):
            resp = await client.post(
                f"/v2/{_STRESS_REPO}/blobs/uploads/", params={"digest": _sha256(data)}, content=data
            )
            assert resp.status_code == 201
    base: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": _sha256(config), "size": len(config)},
        "layers": [{"mediaType": MT_OCI_LAYER_TAR, "digest": _sha256(layer), "size": len(layer)}],
    }

    caught_in_tmp = {"manifest": 0, "tag": 0, "other": 0}
    for iteration in range(5):
        sent_before, blobs_before = len(log.manifests), len(log.blobs)
        log.busy, log.busy_at = trio.Event(), len(log.confirmed_manifests) + 4 * _MANIFEST_WORKERS
        async with trio.open_nursery() as nursery:
            for worker in range(_MANIFEST_WORKERS):
                nursery.start_soon(_manifest_writer, seed.url, base, log, iteration, worker)
            for _ in range(_BLOB_WORKERS):
                nursery.start_soon(_blob_writer, seed.url, log, random.Random(rng.random()))
            # Kill at a random moment once the writers are in full swing (writes confirmed).
            with trio.fail_after(20):
                await log.busy.wait()
            await trio.sleep(rng.uniform(0.0, 1.2))
            await trio.to_thread.run_sync(seed.kill9)
        leftovers = _tmp_leftovers(seed.data_dir)
        await trio.to_thread.run_sync(seed.restart)
        async with httpx.AsyncClient(base_url=seed.url, trust_env=False, timeout=30) as client:
            kinds = await _check_after_restart(client, seed, log, leftovers, iteration, (sent_before, blobs_before))
        for kind, count in kinds.items():
            caught_in_tmp[kind] += count
    print(
        f"{len(log.manifests)} manifests and {len(log.blobs)} blobs sent, "
        f"{len(log.confirmed_manifests)} and {len(log.confirmed_blobs)} confirmed; "
        f"files caught in tmp/ by the kills: {caught_in_tmp}"
    )


# ---- leftovers of crashes at startup ----------------------------------------------------------


def test_startup_cleans_tmp_and_purges_stale_uploads(seed_process: SeedProcess) -> None:
    seed = seed_process
    data = seed.data_dir
    with httpx.Client(base_url=seed.url, trust_env=False, timeout=10) as http:
        location = http.post("/v2/lab/live/blobs/uploads/").headers["location"]
        resp = http.patch(location, content=b"x" * 1000, headers={"Content-Range": "0-999"})
        assert resp.status_code == 202
    seed.kill9()

    # What crashes leave behind: files being written in tmp/, an upload directory whose
    # state.json was never written (old and recent), a session idle for days.
    (data / "tmp" / f"{uuid.uuid4().hex}.tmp").write_bytes(b'{"schemaVersion": 2, "conf')
    (data / "tmp" / "subdir").mkdir()
    (data / "tmp" / "subdir" / "file").write_bytes(b"x")
    old = time.time() - 3 * 24 * 3600

    def session_dir(state: dict[str, object] | None, mtime: float | None) -> Path:
        directory = data / "uploads" / uuid.uuid4().hex
        directory.mkdir()
        (directory / "data").write_bytes(b"partial")
        if state is not None:
            (directory / "state.json").write_text(json.dumps(state))
        if mtime is not None:
            for path in (directory / "data", directory):
                os.utime(path, (mtime, mtime))
        return directory

    half_written_old = session_dir(None, old)
    half_written_new = session_dir(None, None)
    stale = session_dir({"name": "lab/stale", "created": old}, old)

    seed.restart()
    assert list((data / "tmp").iterdir()) == []
    _wait_for(lambda: not half_written_old.exists() and not stale.exists(), 10, "the stale-upload purge")
    assert half_written_new.exists()  # younger than storage.upload_max_age: kept for now
    assert seed.metric("seed_uploads_purged_total") == 2
    with httpx.Client(base_url=seed.url, trust_env=False, timeout=10) as http:
        assert http.get(f"/v2/lab/stale/blobs/uploads/{stale.name}").status_code == 404
        assert http.get(f"/v2/lab/live/blobs/uploads/{half_written_new.name}").status_code == 404
        # The live session survived the crash and completes.
        status = http.get(location)
        assert status.status_code == 204 and status.headers["range"] == "0-999"
        digest = _sha256(b"x" * 1000)
        resp = http.put(httpx.URL(location).copy_add_param("digest", digest))
        assert resp.status_code == 201
        assert http.get(f"/v2/lab/live/blobs/{digest}").content == b"x" * 1000


def test_session_left_by_a_crash_during_commit(seed_process: SeedProcess) -> None:
    """A kill between commit's rename (upload data -> blob) and the repository link.

    The moment is too short to hit with a signal, so the test recreates the on-disk state the
    kill leaves: the session directory without its data file, and an unlinked verified blob.
    A client that retries its PUT must get 404 BLOB_UPLOAD_UNKNOWN (start over), not a 500.
    """
    seed = seed_process
    data = os.urandom(300_000)
    digest = _sha256(data)
    with httpx.Client(base_url=seed.url, trust_env=False, timeout=10) as http:
        location = http.post("/v2/lab/commit/blobs/uploads/").headers["location"]
        assert http.patch(location, content=data).status_code == 202
        seed.kill9()
        session = seed.data_dir / "uploads" / location.rsplit("/", 1)[1]
        target = seed.data_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(session / "data", target)

        seed.restart()
        assert http.head(f"/v2/lab/commit/blobs/{digest}").status_code == 404  # not linked: invisible
        for resp in (
            http.get(location),
            http.put(httpx.URL(location).copy_add_param("digest", digest)),
            http.patch(location, content=data[:10], headers={"Content-Range": "0-9"}),
        ):
            assert resp.status_code == 404, resp.text
            assert resp.json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
        # Starting over works, and reuses the verified blob already in place.
        resp = http.post("/v2/lab/commit/blobs/uploads/", params={"digest": digest}, content=data)
        assert resp.status_code == 201
        assert http.get(f"/v2/lab/commit/blobs/{digest}").content == data
    _blob_intact(seed)


def test_upload_listing_tolerates_sessions_vanishing(tmp_path: Path) -> None:
    """Found by the stress test above: a blob upload answered 500 after committing, because the
    uploads gauge lists every session and another session's directory vanished meanwhile (its
    own commit removed it). Listing must skip a session that disappears while it is listed.
    """
    from seed.storage import Storage

    storage = Storage(tmp_path / "data", chunk_size=1024 * 1024)
    sessions = [storage.create_upload("lab/a") for _ in range(4)]
    (sessions[0].directory / "state.json").unlink()  # a crash leftover among them
    listing = storage.list_uploads()
    first = next(listing)
    for session in sessions:
        if session.id != first.id:
            storage.cancel_upload(session)  # committed or cancelled by other requests meanwhile
    assert list(listing) == []
