"""The bench client's own measures (``tests/bench/nsworker.py``), against a registry on loopback
that sends a blob slowly: what the swarm bench reports as a client's longest wait must be a
stretch without a byte, not the time a client-side buffer took to fill."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.bench.nsworker import Pull

_REPO = "bench/slow"
_PIECE = 8 * 1024
_PIECE_GAP = 0.02  # seconds between pieces: the blob below takes ~0.8 s and never pauses longer
_LAYER = bytes(range(256)) * (320 * 4)  # 320 KiB


def _digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


_CONFIG = b'{"architecture":"amd64","os":"linux"}'
_BLOBS = {_digest(_CONFIG): _CONFIG, _digest(_LAYER): _LAYER}
_MANIFEST = json.dumps({
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _digest(_CONFIG),
               "size": len(_CONFIG)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": _digest(_LAYER),
                "size": len(_LAYER)}],
}).encode()


class _SlowRegistry(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _manifest(self, with_body: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
        self.send_header("Docker-Content-Digest", _digest(_MANIFEST))
        self.send_header("Content-Length", str(len(_MANIFEST)))
        self.end_headers()
        if with_body:
            self.wfile.write(_MANIFEST)

    def do_HEAD(self) -> None:  # http.server names the handlers
        self._manifest(with_body=False)

    def do_GET(self) -> None:
        if "/manifests/" in self.path:
            self._manifest(with_body=True)
            return
        body = _BLOBS.get(self.path.rsplit("/", 1)[-1])
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for offset in range(0, len(body), _PIECE):
            self.wfile.write(body[offset:offset + _PIECE])
            self.wfile.flush()
            time.sleep(_PIECE_GAP)


@pytest.fixture
def slow_registry() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowRegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_clients_longest_wait_is_a_stretch_without_a_byte(slow_registry: str) -> None:
    with httpx.Client(trust_env=False, timeout=httpx.Timeout(10.0)) as client:
        pull = Pull(client, [{"url": slow_registry}], _REPO, "v1", None, time.monotonic() + 30)
        assert pull.run(), pull.errors
    layer = next(blob for blob in pull.blobs if blob["size"] == len(_LAYER))
    assert layer["ok"] and layer["seconds"] >= 30 * _PIECE_GAP
    # A piece every 20 ms: no stretch near the ~0.6 s that 256 KiB of them take (what the
    # client reported when it read the body in 256 KiB pieces).
    assert layer["longest_wait_s"] < 0.3, layer
    assert 0 <= layer["longest_wait_at_byte"] < len(_LAYER) and 0 < layer["longest_wait_ended_s"] <= layer["seconds"]
