"""Property tests: whatever a client sends, the seed answers with a valid response, never a 500.

The seed runs in a background thread with its own ``trio.run`` (hypothesis drives plain
synchronous tests); requests go over raw sockets through an h11 client so that targets such
as ``/v2/../x`` reach the server unnormalised.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from p2pd.httpd import ServerInfo
from p2pd.oci import mediatypes
from p2pd.oci.digest import digest_of
from seed.config import load_config
from seed.registry import serve_seed

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONFIG = b'{"architecture":"amd64","os":"linux"}'
LAYER = bytes(range(256)) * 8  # 2048 bytes
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": str(digest_of(CONFIG)),
            "size": len(CONFIG),
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": str(digest_of(LAYER)), "size": len(LAYER)}
        ],
    }
).encode()


@dataclass
class RunningSeed:
    info: ServerInfo
    data: Path
    uploads: list[str]
    thread: threading.Thread


@pytest.fixture(scope="module")
def running_seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSeed]:
    data = tmp_path_factory.mktemp("seed-properties") / "data"
    config = load_config(None, listen="127.0.0.1:0", data=data)
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        shutdown = trio.Event()
        state["token"] = trio.lowlevel.current_trio_token()
        state["shutdown"] = shutdown
        async with trio.open_nursery() as nursery:
            state["info"], _ = await nursery.start(partial(serve_seed, config, shutdown=shutdown))
            ready.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:
            state["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, name="seed-under-test", daemon=True)
    thread.start()
    assert ready.wait(15), "seed did not start"
    assert "error" not in state, state.get("error")
    info: ServerInfo = state["info"]
    try:
        uploads = _populate(info)
        yield RunningSeed(info, data, uploads, thread)
        assert thread.is_alive(), f"the seed died: {state.get('error')!r}"
    finally:
        trio.from_thread.run_sync(state["shutdown"].set, trio_token=state["token"])
        thread.join(15)
    assert not thread.is_alive(), "the seed did not stop"
    assert "error" not in state, state["error"]


def _populate(info: ServerInfo) -> list[str]:
    """Known content, so random requests sometimes hit real blobs, tags and uploads."""
    uploads = []
    with httpx.Client(base_url=info.url, trust_env=False, timeout=10) as client:
        for name in ("library/app", "a"):
            for blob in (CONFIG, LAYER):
                r = client.post(f"/v2/{name}/blobs/uploads/", params={"digest": str(digest_of(blob))}, content=blob)
                assert r.status_code == 201
            r = client.put(
                f"/v2/{name}/manifests/latest", content=MANIFEST, headers={"Content-Type": mediatypes.OCI_MANIFEST}
            )
            assert r.status_code == 201
            for _ in range(3):
                r = client.post(f"/v2/{name}/blobs/uploads/")
                assert r.status_code == 202
                uploads.append(r.headers["location"].rsplit("/", 1)[1])
    return uploads


# ---- a raw client --------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def _send(info: ServerInfo, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
    conn = h11.Connection(h11.CLIENT)
    all_headers = [
        (b"Host", b"seed"),
        (b"Connection", b"close"),
        (b"Content-Length", str(len(body)).encode()),
        *headers,
    ]
    try:
        out = conn.send(h11.Request(method=method, target=target, headers=all_headers))
    except h11.LocalProtocolError:
        assume(False)  # not something an HTTP client can send
        raise
    out += conn.send(h11.Data(data=body)) if body else b""
    out += conn.send(h11.EndOfMessage())
    with socket.create_connection((info.host, info.port), timeout=15) as sock:
        # The server may answer and close before reading everything: read its answer anyway.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(out)
        status, response_headers, content = 0, {}, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                content += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, response_headers, bytes(content))
            else:
                raise AssertionError(f"unexpected event {event!r} for {method!r} {target!r}")


def _check(answer: Answer, method: bytes) -> None:
    assert answer.status < 500, answer
    assert answer.status >= 200, answer
    if answer.status >= 400 and method != b"HEAD":
        assert answer.headers.get("content-type") == "application/json", answer
        document = json.loads(answer.body)
        assert isinstance(document, dict)
        assert list(document) == ["errors"]
        assert isinstance(document["errors"], list)
        assert len(document["errors"]) >= 1
        for entry in document["errors"]:
            assert isinstance(entry["code"], str)
            assert entry["code"].isupper()
            assert isinstance(entry["message"], str)
    if method == b"HEAD" or answer.status in (204, 304):
        assert answer.body == b""
    if answer.status == 416:
        assert "content-range" in answer.headers or "range" in answer.headers
    if answer.status == 405:
        assert answer.headers.get("allow")


# ---- strategies ----------------------------------------------------------------------

KNOWN_DIGESTS = [str(digest_of(CONFIG)), str(digest_of(LAYER)), str(digest_of(MANIFEST))]

hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
digests = st.one_of(
    st.sampled_from(KNOWN_DIGESTS),
    hex64.map(lambda h: f"sha256:{h}"),
    st.text(alphabet="0123456789abcdefABCDEF", min_size=0, max_size=130).map(lambda h: f"sha256:{h}"),
    st.text(alphabet="0123456789abcdef", min_size=128, max_size=128).map(lambda h: f"sha512:{h}"),
    st.sampled_from(["md5:d41d8cd98f00b204e9800998ecf8427e", "sha256:", ":", "sha256::", "sha256+x:ab"]),
)

special_segments = st.sampled_from(
    [
        "..",
        ".",
        "%2e%2e",
        "%2E%2E",
        "..%2f..",
        "%2f",
        "%00",
        "%ff",
        "%c3%28",
        "%",
        "%zz",
        "_catalog",
        "blobs",
        "manifests",
        "uploads",
        "tags",
        "list",
        "referrers",
        "chunks",
        "library",
        "app",
        "a",
        "library/app",
        "",
        "__",
        "a__b",
        "A",
        "-",
        "sha256",
        "latest",
        "v2",
        "%20",
        "~",
        "a" * 300,
        "é",
        "\u2603",
        "\U0001f600",
    ]
)
text_segments = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20).map(
    lambda s: urllib.parse.quote(s, safe="")
)
ascii_segments = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/?#"), max_size=20)
percent_bytes = st.integers(0, 255).map(lambda b: f"%{b:02X}")  # often not UTF-8 once decoded
segments = st.one_of(
    special_segments,
    digests,
    text_segments,
    ascii_segments,
    st.lists(st.one_of(percent_bytes, st.sampled_from("az09._-")), min_size=1, max_size=6).map("".join),
)

names = st.one_of(
    st.sampled_from(["library/app", "a", "nope", "a/b/c"]), st.lists(segments, min_size=1, max_size=4).map("/".join)
)
references = st.one_of(st.sampled_from(["latest", "v1", ".bad", "a" * 129]), digests, segments)

structured_paths = st.one_of(
    st.builds(lambda n, d: f"/v2/{n}/blobs/{d}", names, digests),
    st.builds(lambda n, d: f"/v2/{n}/blobs/{d}/chunks", names, digests),
    st.builds(lambda n, r: f"/v2/{n}/manifests/{r}", names, references),
    st.builds(lambda n: f"/v2/{n}/tags/list", names),
    st.builds(lambda n, d: f"/v2/{n}/referrers/{d}", names, digests),
    st.builds(lambda n: f"/v2/{n}/blobs/uploads/", names),
    st.builds(lambda n, u: f"/v2/{n}/blobs/uploads/{u}", names, segments),
    st.just("/v2/_catalog"),
    st.just("/v2/"),
    st.lists(segments, max_size=8).map(lambda parts: "/v2/" + "/".join(parts)),
    st.lists(segments, max_size=4).map(lambda parts: "/" + "/".join(parts)),
)
raw_paths = st.tuples(
    st.sampled_from(["/", "/v2/", "/v2/library/app/", "/v2/a/blobs/", "/v2/a/manifests/"]),
    st.lists(st.one_of(st.characters(min_codepoint=0x21, max_codepoint=0x7E), percent_bytes), max_size=80),
).map(lambda parts: parts[0] + "".join(parts[1]))

# Characters for which str.isdigit() is true (superscripts, other scripts) but int() may fail.
unicode_digits = st.text(
    st.one_of(st.characters(categories=["Nd"]), st.characters(categories=["No"])), min_size=1, max_size=4
)
numbers = st.one_of(
    st.integers(-10, 10**30).map(str),
    st.sampled_from(["0", "1", "65536", "1048576", "-1", "", "0x10", "1e3", " 1", "9" * 5000]),
    unicode_digits,
    st.tuples(st.integers(0, 99).map(str), unicode_digits).map("".join),
)
query_values = st.one_of(digests, segments, numbers, st.sampled_from(["library/app", "a", "../a"]))
query_keys = st.sampled_from(["digest", "n", "last", "mount", "from", "size", "artifactType", "x"])
queries = st.one_of(
    st.just(""),
    st.lists(st.tuples(query_keys, query_values), max_size=4).map(
        lambda pairs: "?" + "&".join(f"{k}={urllib.parse.quote(v, safe=':/')}" for k, v in pairs)
    ),
    ascii_segments.map(lambda s: "?" + s),
)

methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"]),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-", min_size=1, max_size=10),
)

header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=60
).map(str.strip)
range_values = st.one_of(
    st.builds(
        lambda a, b: f"bytes={a}-{b}",
        st.one_of(st.just(""), st.integers(0, 5000).map(str)),
        st.one_of(st.just(""), st.integers(0, 5000).map(str)),
    ),
    st.sampled_from(["bytes=0-1,5-6", "bytes=-0", "bytes=99999999999999999999-", "bytes=", "bits=0-1"]),
    header_text,
)
content_range_values = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 5000), st.integers(0, 5000)),
    st.builds(lambda a, b: f"bytes {a}-{b}/*", st.integers(0, 5000), st.integers(0, 5000)),
    st.sampled_from(["0-0", "0-18446744073709551615", "9999999999999999999-99999999999999999999"]),
    header_text,
)
content_types = st.one_of(
    st.sampled_from(sorted(mediatypes.MANIFEST_TYPES)),
    st.sampled_from(["application/json", "application/octet-stream", "", ";", "a/b; x=y"]),
    header_text,
)
extra_headers = st.fixed_dictionaries(
    {},
    optional={
        "Range": range_values,
        "Content-Range": content_range_values,
        "Content-Type": content_types,
        "Accept": st.one_of(st.just(mediatypes.MANIFEST_ACCEPT), header_text),
    },
)

manifest_bodies = st.one_of(
    st.just(MANIFEST),
    st.binary(max_size=300),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
        lambda children: st.one_of(
            st.lists(children, max_size=3), st.dictionaries(st.text(max_size=10), children, max_size=3)
        ),
        max_leaves=10,
    ).map(lambda doc: json.dumps(doc).encode()),
    st.fixed_dictionaries(
        {
            "schemaVersion": st.sampled_from([2, 1, "2"]),
            "mediaType": st.one_of(st.sampled_from(sorted(mediatypes.MANIFEST_TYPES)), st.text(max_size=10)),
            "config": st.fixed_dictionaries(
                {"mediaType": st.text(max_size=10), "digest": digests, "size": st.integers(-5, 10**20)}
            ),
            "layers": st.lists(
                st.fixed_dictionaries(
                    {"mediaType": st.text(max_size=5), "digest": digests, "size": st.integers(-1, 3000)}
                ),
                max_size=3,
            ),
        },
        optional={
            "manifests": st.lists(st.just({}), max_size=2),
            "subject": st.fixed_dictionaries(
                {"mediaType": st.just(mediatypes.OCI_MANIFEST), "digest": digests, "size": st.integers(0, 10)}
            ),
        },
    ).map(lambda doc: json.dumps(doc).encode()),
)


_VISIBLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


def _encode_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]


# ---- properties ----------------------------------------------------------------------


@SETTINGS
@given(
    method=methods,
    path=structured_paths,
    query=queries,
    headers=extra_headers,
    body=st.one_of(st.just(b""), st.binary(max_size=200), manifest_bodies),
)
def test_structured_requests_never_fail(
    running_seed: RunningSeed, method: str, path: str, query: str, headers: dict[str, str], body: bytes
) -> None:
    # Non-ASCII segments travel percent-encoded as UTF-8, like a real client sends them.
    target = urllib.parse.quote(path + query, safe=_VISIBLE_ASCII).encode("ascii")
    answer = _send(running_seed.info, method.encode(), target, _encode_headers(headers), body)
    _check(answer, method.encode())


@SETTINGS
@given(method=methods, path=raw_paths, headers=extra_headers, body=st.binary(max_size=100))
def test_raw_targets_never_fail(
    running_seed: RunningSeed, method: str, path: str, headers: dict[str, str], body: bytes
) -> None:
    answer = _send(running_seed.info, method.encode(), path.encode(), _encode_headers(headers), body)
    _check(answer, method.encode())


ENDPOINTS = [
    ("GET", "/v2/_catalog"),
    ("GET", "/v2/library/app/tags/list"),
    ("GET", "/v2/nope/tags/list"),
    ("GET", f"/v2/library/app/blobs/{KNOWN_DIGESTS[1]}/chunks"),
    ("HEAD", f"/v2/a/blobs/{KNOWN_DIGESTS[0]}/chunks"),
    ("GET", f"/v2/library/app/referrers/{KNOWN_DIGESTS[2]}"),
    ("GET", f"/v2/library/app/blobs/{KNOWN_DIGESTS[1]}"),
    ("GET", "/v2/library/app/manifests/latest"),
    ("POST", "/v2/library/app/blobs/uploads/"),
    ("DELETE", "/v2/a/manifests/nothing-here"),
]


@SETTINGS
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    params=st.fixed_dictionaries(
        {},
        optional={
            "n": numbers,
            "last": query_values,
            "size": numbers,
            "digest": digests,
            "mount": digests,
            "from": names,
            "artifactType": query_values,
        },
    ),
    headers=extra_headers,
)
@example(  # Regressions found by this test: str.isdigit() accepted "²", then int() failed (500).
    endpoint=ENDPOINTS[1], params={"n": "²"}, headers={}
)
@example(endpoint=ENDPOINTS[3], params={"size": "፩"}, headers={})
def test_query_parameters_never_fail(
    running_seed: RunningSeed, endpoint: tuple[str, str], params: dict[str, str], headers: dict[str, str]
) -> None:
    method, path = endpoint
    target = (path + "?" + urllib.parse.urlencode(params)).encode("ascii")
    answer = _send(running_seed.info, method.encode(), target, _encode_headers(headers), b"")
    _check(answer, method.encode())


@SETTINGS
@given(
    upload=st.integers(0, 5),
    method=st.sampled_from(["PATCH", "PUT", "GET", "DELETE"]),
    query=queries,
    headers=extra_headers,
    body=st.binary(max_size=3000),
)
def test_upload_sessions_never_fail(
    running_seed: RunningSeed, upload: int, method: str, query: str, headers: dict[str, str], body: bytes
) -> None:
    upload_id = running_seed.uploads[upload]
    name = "library/app" if upload < 3 else "a"
    target = f"/v2/{name}/blobs/uploads/{upload_id}{query}".encode()
    answer = _send(running_seed.info, method.encode(), target, _encode_headers(headers), body)
    _check(answer, method.encode())


@SETTINGS
@given(
    name=st.sampled_from(["library/app", "a"]),
    reference=st.one_of(st.sampled_from(["latest", "other", str(digest_of(MANIFEST))]), references),
    content_type=content_types,
    body=manifest_bodies,
)
def test_manifest_pushes_never_fail(
    running_seed: RunningSeed, name: str, reference: str, content_type: str, body: bytes
) -> None:
    target = f"/v2/{name}/manifests/{reference}".encode()
    answer = _send(running_seed.info, b"PUT", target, [(b"Content-Type", content_type.encode("latin-1"))], body)
    _check(answer, b"PUT")
    if answer.status == 201:
        assert answer.headers["docker-content-digest"] == str(digest_of(body))


def test_nothing_escaped_the_data_dir(running_seed: RunningSeed) -> None:
    # Runs after the properties above (file order): every file is under the known layout.
    top = {p.name for p in running_seed.data.iterdir()}
    assert top <= {"blobs", "chunkmaps", "repositories", "uploads", "tmp", "audit", "auth", "scan"}
    for path in (running_seed.data / "repositories").rglob("*"):
        relative = path.relative_to(running_seed.data / "repositories")
        assert ".." not in relative.parts
    siblings = {p.name for p in running_seed.data.parent.iterdir()}
    assert siblings == {running_seed.data.name}
