"""``make demo``: a seed on loopback, an image built offline and pushed with skopeo,
pulled back, and a report of what crossed the wire.

Run: ``.venv/bin/python -m tests.demo``. Needs skopeo, umoci and busybox-static
(``make demo`` installs them when run as root). Everything lives in a temp dir and every
process is stopped on exit.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.harness import images, skopeo
from tests.harness.net import free_port, wait_http_ok
from tests.harness.tools import start_process, stop_process


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="p2pd-demo-") as tmp:
        work = Path(tmp)
        port = free_port()
        seed_url = f"http://127.0.0.1:{port}"
        print(f"1. starting the seed registry on {seed_url} (data in {work / 'seed'})")
        seed = start_process([sys.executable, "-m", "seed", "serve", "--listen", f"127.0.0.1:{port}",
                              "--data", str(work / "seed")], log_path=work / "seed.log")
        try:
            wait_http_ok(f"{seed_url}/v2/", 20)
            print("2. building an image offline (umoci + busybox-static + a 20 MiB random layer)")
            layout = images.build_busybox_layout(work / "image")
            images.add_random_layer(layout, "busybox", "demo", 20)
            ref = f"docker://127.0.0.1:{port}/demo/app:v1"
            started = time.monotonic()
            pushed = skopeo.copy(layout.ref("demo"), ref)
            print(f"3. pushed with skopeo in {time.monotonic() - started:.2f}s: {pushed}")
            started = time.monotonic()
            skopeo.copy(ref, f"oci:{work / 'pulled'}:v1")
            pulled = skopeo.inspect_digest(f"oci:{work / 'pulled'}:v1")
            print(f"4. pulled back with skopeo in {time.monotonic() - started:.2f}s: {pulled}")
            status = "identical" if pulled == pushed else "DIFFERENT"
            print(f"   manifest digests are {status}")
            metrics = httpx.get(f"{seed_url}/metrics").text
            manifest = layout.manifest("demo")
            image_bytes = sum(d["size"] for d in [manifest["config"], *manifest["layers"]])
            print("5. where the bytes came from:")
            print(f"   image blobs:              {image_bytes / 2**20:8.2f} MiB")
            print(f"   seed received (push):     {_metric(metrics, 'seed_bytes_received_total') / 2**20:8.2f} MiB")
            print(f"   seed sent (blob GETs):    {_metric(metrics, 'seed_blob_bytes_sent_total') / 2**20:8.2f} MiB")
            print(f"   catalog: {httpx.get(f'{seed_url}/v2/_catalog').json()['repositories']}")
            return 0 if pulled == pushed else 1
        finally:
            stop_process(seed)


if __name__ == "__main__":
    sys.exit(main())
