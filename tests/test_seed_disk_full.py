"""A push that fills the disk answers 507 and gives the space back at once (the session is cut
back to its last acknowledged offset), so the next push fits — on a real, small tmpfs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from p2pd.oci.digest import digest_of
from seed.config import load_config
from seed.registry import serve_seed
from tests.harness.tools import require_root

pytestmark = [pytest.mark.root]
MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    require_root()
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def _used(path: Path) -> int:
    stat = os.statvfs(path)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


async def test_disk_full_push_gives_the_space_back(small_disk: Path, nursery: trio.Nursery) -> None:
    config = load_config(None, listen="127.0.0.1:0", data=small_disk / "data")
    info, registry = await nursery.start(partial(serve_seed, config))
    async with httpx.AsyncClient(base_url=info.url, trust_env=False, timeout=30) as client:
        r = await client.post("/v2/repo/blobs/uploads/")
        location = r.headers["location"]
        first = os.urandom(1 * MiB)
        r = await client.patch(location, content=first, headers={"Content-Range": f"0-{len(first) - 1}"})
        assert r.status_code == 202
        before = _used(small_disk)
        # 20 MiB into an 8 MiB disk: 507, and the bytes of this request are gone again.
        huge = os.urandom(20 * MiB)
        end = len(first) + len(huge) - 1
        r = await client.patch(location, content=huge, headers={"Content-Range": f"{len(first)}-{end}"})
        assert r.status_code == 507
        assert r.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert _used(small_disk) <= before + 64 * 1024
        # The session still holds what was acknowledged, and can go on.
        r = await client.get(location)
        assert r.status_code == 204 and r.headers["range"] == f"0-{len(first) - 1}"
        rest = os.urandom(MiB)
        r = await client.put(location, params={"digest": str(digest_of(first + rest))}, content=rest)
        assert r.status_code == 201, r.text
        # And another push fits, which would fail if the failed bytes still filled the disk.
        other = os.urandom(4 * MiB)
        r = await client.post("/v2/repo/blobs/uploads/", params={"digest": str(digest_of(other))}, content=other)
        assert r.status_code == 201, r.text
    assert registry.metrics is not None
