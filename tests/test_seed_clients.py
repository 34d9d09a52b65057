"""The seed against real clients: skopeo pushes and pulls, containerd pulls and runs, the CNCF
reference registry (docker-registry) consumes what the seed serves, and a small Python client
drives the upload flows skopeo does not use (chunked PATCH with Content-Range, containerd's
POST + PUT, single-request POST).

What skopeo 1.9.3 sends for each blob (measured with the seed's DEBUG access log): ``HEAD`` the
blob (twice for layers), ``POST /blobs/uploads/`` (202), one ``PATCH`` carrying the whole blob
with ``Content-Length`` and no ``Content-Range``, then ``PUT ?digest=`` with an empty body.
Copies between repositories of one registry try a cross-repository mount first
(``POST ?mount=&from=``). Every request has ``Connection: close``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import skopeo
from tests.harness.containerd import PrivateContainerd, write_hosts_toml
from tests.harness.images import MT_OCI_MANIFEST, MiB, OciLayout
from tests.harness.reference_registry import ReferenceRegistry
from tests.harness.seed_process import SeedProcess
from tests.harness.verify import file_digest, image_digests, misnamed_blobs, pull_and_verify

_ACCESS_LOG_RE = re.compile(
    r"seed\.registry: (?P<method>[A-Z]+) (?P<target>\S+) (?P<status>\d{3}) "
    r"in=(?P<received>\d+) out=(?P<sent>\d+) range=(?P<range>\S+)"
)


def _access_log(seed: SeedProcess) -> list[dict[str, str]]:
    """The seed's DEBUG access-log lines, parsed."""
    return [m.groupdict() for m in _ACCESS_LOG_RE.finditer(seed.log_text())]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class PushClient:
    """A minimal OCI push client for the upload flows skopeo does not use.

    Every step checks the status and headers the distribution spec requires of the registry.
    """

    def __init__(self, client: httpx.Client, repo: str) -> None:
        self.client = client
        self.repo = repo

    def start(self) -> str:
        """``POST /blobs/uploads/``: opens an upload session, returns its location."""
        resp = self.client.post(f"/v2/{self.repo}/blobs/uploads/")
        assert resp.status_code == 202, resp.text
        assert resp.headers["range"] == "0-0"
        assert resp.headers["docker-upload-uuid"]
        return resp.headers["location"]

    def patch(self, location: str, chunk: bytes, start: int) -> str:
        """One chunk at ``start`` with ``Content-Range``; returns the next location."""
        resp = self.client.patch(
            location,
            content=chunk,
            headers={"Content-Type": "application/octet-stream", "Content-Range": f"{start}-{start + len(chunk) - 1}"},
        )
        assert resp.status_code == 202, resp.text
        assert resp.headers["range"] == f"0-{start + len(chunk) - 1}"
        return resp.headers["location"]

    def finish(self, location: str, digest: str, chunk: bytes = b"", start: int | None = None) -> None:
        """``PUT ?digest=`` with an optional last chunk."""
        headers = {"Content-Type": "application/octet-stream"}
        if chunk and start is not None:
            headers["Content-Range"] = f"{start}-{start + len(chunk) - 1}"
        # httpx's params= would replace the location's own query (docker-registry keeps state there).
        url = httpx.URL(location).copy_add_param("digest", digest)
        resp = self.client.put(url, content=chunk, headers=headers)
        assert resp.status_code == 201, resp.text
        assert resp.headers["docker-content-digest"] == digest
        assert resp.headers["location"].endswith(f"/v2/{self.repo}/blobs/{digest}")

    def push_chunked(self, data: bytes, chunk_size: int) -> str:
        """POST, one PATCH per chunk but the last, last chunk in the PUT (docker/OCI chunked flow)."""
        digest = _sha256(data)
        location = self.start()
        offset = 0
        while len(data) - offset > chunk_size:
            location = self.patch(location, data[offset : offset + chunk_size], offset)
            offset += chunk_size
        self.finish(location, digest, data[offset:], offset)
        return digest

    def push_post_put(self, data: bytes) -> str:
        """POST, then the whole blob in the PUT (containerd's push flow)."""
        digest = _sha256(data)
        self.finish(self.start(), digest, data)
        return digest

    def push_single_post(self, data: bytes) -> str:
        """``POST ?digest=`` with the whole blob: one request (OCI single-request upload)."""
        digest = _sha256(data)
        resp = self.client.post(
            f"/v2/{self.repo}/blobs/uploads/",
            params={"digest": digest},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert resp.status_code == 201, resp.text
        assert resp.headers["docker-content-digest"] == digest
        return digest

    def put_manifest(self, reference: str, body: bytes, media_type: str = MT_OCI_MANIFEST) -> str:
        resp = self.client.put(
            f"/v2/{self.repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type}
        )
        assert resp.status_code == 201, resp.text
        assert resp.headers["docker-content-digest"] == _sha256(body)
        return _sha256(body)


@pytest.fixture
def http(seed_process: SeedProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=seed_process.url, trust_env=False, timeout=30) as client:
        yield client


def _push_layout_with_python(
    client: httpx.Client, repo: str, tag: str, layout: OciLayout, src_tag: str, flows: list[str]
) -> str:
    """Pushes ``layout:src_tag`` blob by blob, each with the next flow of ``flows`` (cycled)."""
    pusher = PushClient(client, repo)
    for i, digest in enumerate(image_digests(layout, src_tag)):
        data = layout.blob_path(digest).read_bytes()
        flow = flows[i % len(flows)]
        if flow == "chunked":
            pushed = pusher.push_chunked(data, chunk_size=256 * 1024)
        elif flow == "post-put":
            pushed = pusher.push_post_put(data)
        else:
            pushed = pusher.push_single_post(data)
        assert pushed == digest
        head = client.head(f"/v2/{repo}/blobs/{digest}")
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    manifest = layout.blob_path(layout.manifest_digest(src_tag)).read_bytes()
    return pusher.put_manifest(tag, manifest)


def test_skopeo_push_flow_and_pull_back(seed_process: SeedProcess, busybox_layout: OciLayout, tmp_path: Path) -> None:
    pushed = skopeo.copy(busybox_layout.ref("busybox"), f"{seed_process.repo_url('lab/busybox')}:latest")
    assert pushed == busybox_layout.manifest_digest("busybox")
    assert skopeo.inspect_digest(f"{seed_process.repo_url('lab/busybox')}:latest") == pushed
    pull_and_verify(f"{seed_process.repo_url('lab/busybox')}:latest", busybox_layout, "busybox", tmp_path / "pulled")

    # The flow skopeo used for each blob, from the seed's access log: a session opened by POST,
    # one PATCH with the whole blob and no Content-Range, an empty PUT with the digest.
    log = _access_log(seed_process)
    for digest in image_digests(busybox_layout, "busybox"):
        size = busybox_layout.blob_path(digest).stat().st_size
        put = next(e for e in log if e["method"] == "PUT" and digest.replace(":", "%3A") in e["target"])
        session = put["target"].split("?", 1)[0]
        steps = [
            (e["method"], e["status"], e["received"], e["range"])
            for e in log
            if e["target"].split("?", 1)[0] == session
        ]
        assert steps == [("PATCH", "202", str(size), "-"), ("PUT", "201", "0", "-")]
    # Two sessions, no single-POST upload. (Mount attempts, which skopeo makes when its blob-info
    # cache knows another repository of this registry holding the blob, are left out.)
    posts = [(e["target"], e["status"]) for e in log if e["method"] == "POST" and "mount=" not in e["target"]]
    assert posts == [("/v2/lab/busybox/blobs/uploads/", "202")] * 2
    assert seed_process.metric("seed_http_requests_total", method="PATCH", route="upload", status="202") == 2


def test_skopeo_copy_between_repositories_mounts(
    seed_process: SeedProcess, busybox_layout: OciLayout, tmp_path: Path
) -> None:
    skopeo.copy(busybox_layout.ref("busybox"), f"{seed_process.repo_url('lab/busybox')}:latest")
    copied = skopeo.copy(
        f"{seed_process.repo_url('lab/busybox')}:latest", f"{seed_process.repo_url('team/tools/busybox')}:v1"
    )
    assert copied == busybox_layout.manifest_digest("busybox")
    # The layer came by cross-repository mount (201 to the POST), not by a second upload.
    assert seed_process.metric("seed_http_requests_total", method="POST", route="upload", status="201") >= 1
    pull_and_verify(f"{seed_process.repo_url('team/tools/busybox')}:v1", busybox_layout, "busybox", tmp_path / "pulled")
    catalog = httpx.get(f"{seed_process.url}/v2/_catalog", trust_env=False).json()
    assert catalog == {"repositories": ["lab/busybox", "team/tools/busybox"]}


@pytest.mark.slow
def test_skopeo_big_image_push_pull(seed_process: SeedProcess, big_layout: OciLayout, tmp_path: Path) -> None:
    ref = f"{seed_process.repo_url('lab/big')}:latest"
    assert skopeo.copy(big_layout.ref("big"), ref) == big_layout.manifest_digest("big")
    big_layer = big_layout.manifest("big")["layers"][-1]
    assert big_layer["size"] >= 50 * MiB
    assert seed_process.metric("seed_bytes_received_total") >= big_layer["size"]
    pull_and_verify(ref, big_layout, "big", tmp_path / "pulled")
    assert seed_process.metric("seed_blob_bytes_sent_total") >= big_layer["size"]
    assert misnamed_blobs(seed_process.data_dir / "blobs" / "sha256") == []


def test_reference_registry_to_seed(
    seed_process: SeedProcess, reference_registry: ReferenceRegistry, busybox_layout: OciLayout, tmp_path: Path
) -> None:
    src = f"{reference_registry.repo_url('lab/busybox')}:latest"
    skopeo.copy(busybox_layout.ref("busybox"), src)
    dst = f"{seed_process.repo_url('mirror/busybox')}:latest"
    assert skopeo.copy(src, dst) == busybox_layout.manifest_digest("busybox")
    assert skopeo.inspect_raw(dst) == skopeo.inspect_raw(src)
    pull_and_verify(dst, busybox_layout, "busybox", tmp_path / "pulled")


def test_seed_to_reference_registry(
    seed_process: SeedProcess, reference_registry: ReferenceRegistry, busybox_layout: OciLayout, tmp_path: Path
) -> None:
    """What the seed serves is consumable by the reference implementation, byte for byte."""
    src = f"{seed_process.repo_url('lab/busybox')}:latest"
    skopeo.copy(busybox_layout.ref("busybox"), src)
    dst = f"{reference_registry.repo_url('copied/busybox')}:latest"
    assert skopeo.copy(src, dst) == busybox_layout.manifest_digest("busybox")
    assert skopeo.inspect_digest(dst) == busybox_layout.manifest_digest("busybox")
    pull_and_verify(dst, busybox_layout, "busybox", tmp_path / "pulled")
    for digest in image_digests(busybox_layout, "busybox"):  # the reference registry stored the same bytes
        stored = reference_registry.data_dir.glob(f"docker/registry/v2/blobs/sha256/*/{digest[7:]}/data")
        assert [file_digest(path) for path in stored] == [digest]


def test_chunked_upload_resume_and_errors(seed_process: SeedProcess, http: httpx.Client) -> None:
    """What a chunked client (docker, containerd on resume) relies on: Range, 416, status, cancel."""
    data = bytes(range(256)) * 4096  # 1 MiB
    digest = _sha256(data)
    pusher = PushClient(http, "lab/chunked")
    location = pusher.patch(pusher.start(), data[:300_000], 0)

    # A chunk that does not start where the upload ends: 416 with the current Range.
    resp = http.patch(
        location,
        content=data[300_001:400_000],
        headers={"Content-Range": "300001-399999", "Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 416
    assert resp.headers["range"] == "0-299999" and resp.headers["location"] == location
    assert resp.json()["errors"][0]["code"] == "RANGE_INVALID"
    # Content-Range and Content-Length disagree: rejected, nothing appended.
    resp = http.patch(
        location,
        content=data[300_000:300_010],
        headers={"Content-Range": "300000-300019", "Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == 400
    # The client asks where to resume, and resumes there.
    status = http.get(location)
    assert status.status_code == 204 and status.headers["range"] == "0-299999"
    location = pusher.patch(location, data[300_000:700_000], 300_000)
    pusher.finish(location, digest, data[700_000:], 700_000)
    assert http.get(f"/v2/lab/chunked/blobs/{digest}").content == data
    assert http.get(location).status_code == 404  # the session is gone once committed

    # A wrong digest on close: 400 DIGEST_INVALID, the session is deleted, nothing is stored.
    location = pusher.patch(pusher.start(), data[:1000], 0)
    wrong = _sha256(b"something else")
    resp = http.put(httpx.URL(location).copy_add_param("digest", wrong))
    assert resp.status_code == 400 and resp.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert http.get(location).status_code == 404
    assert http.head(f"/v2/lab/chunked/blobs/{wrong}").status_code == 404
    # DELETE cancels a session.
    location = pusher.start()
    assert http.delete(location).status_code == 204
    assert http.get(location).status_code == 404
    assert list((seed_process.data_dir / "uploads").iterdir()) == []


@pytest.mark.parametrize("registry", ["seed", "reference"])
def test_python_upload_flows_pulled_by_skopeo(
    registry: str, request: pytest.FixtureRequest, busybox_layout: OciLayout, tmp_path: Path
) -> None:
    """Chunked, POST+PUT and single-POST pushes give an image skopeo pulls back intact.

    The same client runs against docker-registry, which proves the client follows the protocol
    (docker-registry 2.8 has no single-request POST, so it gets the two other flows).
    """
    fixture = {"seed": "seed_process", "reference": "reference_registry"}[registry]
    server: SeedProcess | ReferenceRegistry = request.getfixturevalue(fixture)
    flows = ["chunked", "post-put", "single-post"] if registry == "seed" else ["chunked", "post-put"]
    with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as client:
        pushed = _push_layout_with_python(client, "lab/python", "v1", busybox_layout, "busybox", flows)
        # The same blobs again with the flows swapped (config chunked, layer by the other flow).
        _push_layout_with_python(client, "lab/python2", "v1", busybox_layout, "busybox", flows[::-1])
    assert pushed == busybox_layout.manifest_digest("busybox")
    for repo in ("lab/python", "lab/python2"):
        pull_and_verify(f"docker://{server.host}/{repo}:v1", busybox_layout, "busybox", tmp_path / repo)


@pytest.mark.root
def test_containerd_pulls_python_chunked_push(
    seed_process: SeedProcess,
    http: httpx.Client,
    busybox_layout: OciLayout,
    containerd: PrivateContainerd,
    tmp_path: Path,
) -> None:
    """An image pushed in Content-Range chunks is pulled by containerd (hosts.toml) and runs."""
    pushed = _push_layout_with_python(http, "lab/chunked", "latest", busybox_layout, "busybox", ["chunked"])
    hosts = tmp_path / "hosts"
    # containerd 1.6.20 rejects a hosts.toml without any [host] table ("invalid `host` tree"),
    # so the seed is listed as the mirror as well as the server.
    write_hosts_toml(hosts, "seed.local:5000", seed_process.url, [seed_process.url])
    ref = "seed.local:5000/lab/chunked:latest"
    containerd.pull(ref, hosts_dir=hosts, timeout=60)
    assert containerd.image_digest(ref) == pushed
    assert set(image_digests(busybox_layout, "busybox")) <= set(containerd.content_digests())
    assert containerd.unpack_check(ref) == "run"


@pytest.mark.slow
@pytest.mark.root
def test_containerd_pulls_big_image(
    seed_process: SeedProcess, big_layout: OciLayout, containerd: PrivateContainerd
) -> None:
    pushed = skopeo.copy(big_layout.ref("big"), f"{seed_process.repo_url('lab/big')}:latest")
    ref = f"{seed_process.host}/lab/big:latest"
    containerd.pull(ref, plain_http=True, timeout=120)
    assert containerd.image_digest(ref) == pushed == big_layout.manifest_digest("big")
    assert set(image_digests(big_layout, "big")) <= set(containerd.content_digests())
    assert containerd.unpack_check(ref) == "run"
    out = containerd.run_container(ref, "/bin/sh", "-c", "wc -c < /data/big.bin").stdout
    assert int(out) == 50 * MiB
