"""The agent's BlobStore (eviction, pins, readers, tags, partial downloads, crash leftovers)
and the ``p2pd cache ls|gc|pin|unpin`` command line that works on the same directory."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

import p2pd.store
from p2pd.cli import main
from p2pd.oci.digest import Digest, digest_of
from p2pd.store import BlobStore, TagRecord


class FakeClock:
    """Stands in for the ``time`` module inside p2pd.store: every call is one second later."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def time(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(p2pd.store, "time", SimpleNamespace(time=fake.time))
    return fake


def put(store: BlobStore, text: str, size: int = 1000) -> Digest:
    data = text.encode().ljust(size, b".")
    digest = digest_of(data)
    store.put_bytes(digest, data)
    return digest


def write_partial(store: BlobStore, data: bytes) -> Digest:
    digest = digest_of(data)
    fd, existing = store.open_partial(digest)
    try:
        assert existing == 0
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)
    return digest


# ---- eviction ---------------------------------------------------------------------------


def test_evicts_least_recently_used_down_to_max_bytes(tmp_path: Path, clock: FakeClock) -> None:
    store = BlobStore(tmp_path, max_bytes=3000)
    a, b, c = put(store, "a"), put(store, "b"), put(store, "c")
    assert store.total_bytes == 3000 and store.evict() == []
    fd, size = store.open_blob(a)  # a read makes ``a`` the most recently used
    os.close(fd)
    assert size == 1000

    d = put(store, "d")  # over the limit: the least recently used (b) goes
    assert store.size(b) is None and not store.blob_path(b).exists()
    assert [store.size(x) for x in (a, c, d)] == [1000, 1000, 1000]
    assert store.total_bytes == 3000
    assert [e.digest for e in store.entries()] == [d, a, c]

    assert store.evict(1000) == [c, a]
    assert [e.digest for e in store.entries()] == [d]
    assert sorted(p.name for p in (tmp_path / "blobs" / "sha256").rglob("*") if p.is_file()) == [d.encoded]


def test_store_rescans_blobs_after_restart(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=10_000)
    a, b = put(store, "a", 100), put(store, "b", 200)
    again = BlobStore(tmp_path, max_bytes=10_000)
    assert again.size(a) == 100 and again.size(b) == 200 and again.total_bytes == 300
    assert again.read_small(a, 1000) == store.read_small(a, 1000)


def test_pinned_blobs_are_never_evicted(tmp_path: Path, clock: FakeClock) -> None:
    configured = digest_of(b"c".ljust(1000, b"."))
    store = BlobStore(tmp_path, max_bytes=10_000, pinned=(str(configured),))
    assert put(store, "c") == configured
    pinned, loose = put(store, "p"), put(store, "l")
    store.pin(pinned)
    assert store.evict(0) == [loose]
    assert store.size(configured) == store.size(pinned) == 1000
    assert store.total_bytes == 2000  # over the limit, but nothing else may go
    assert {e.digest for e in store.entries() if e.pinned} == {configured, pinned}

    assert store.unpin(pinned) is True
    assert store.unpin(configured) is False  # pins from the configuration stay
    assert store.evict(0) == [pinned]
    assert store.size(configured) == 1000


def test_blobs_being_read_are_never_evicted(tmp_path: Path, clock: FakeClock) -> None:
    store = BlobStore(tmp_path, max_bytes=10_000)
    busy, idle = put(store, "busy"), put(store, "idle")
    with store.reading(busy), store.reading(busy):
        fd, _ = store.open_blob(busy)
        try:
            assert store.evict(0) == [idle]
            assert [e.in_use for e in store.entries()] == [True]
        finally:
            os.close(fd)
    assert [e.in_use for e in store.entries()] == [False]
    assert store.evict(0) == [busy]


def test_pins_written_by_another_instance_are_honoured(tmp_path: Path, clock: FakeClock) -> None:
    daemon = BlobStore(tmp_path, max_bytes=10_000)  # the running agent
    a, b, c = put(daemon, "a"), put(daemon, "b"), put(daemon, "c")
    assert daemon.evict() == []  # the daemon has looked at pins.json (there is none yet)

    BlobStore(tmp_path, max_bytes=10_000).pin(a)  # ``p2pd cache pin`` in another process
    cli = BlobStore(tmp_path, max_bytes=10_000)
    other_cli = BlobStore(tmp_path, max_bytes=10_000)  # started before ``cli`` pins b
    cli.pin(b)
    other_cli.pin(c)  # must not drop the pin ``cli`` just wrote
    assert set(json.loads((tmp_path / "pins.json").read_text())) == {str(a), str(b), str(c)}

    assert daemon.evict(0) == []
    assert {e.digest for e in daemon.entries() if e.pinned} == {a, b, c}

    assert BlobStore(tmp_path, max_bytes=10_000).unpin(b) is True
    assert daemon.evict(0) == [b]
    assert daemon.size(a) == daemon.size(c) == 1000


def test_unreadable_pins_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pins.json").write_text("{not json")
    with pytest.raises(p2pd.store.StoreError, match=r"pins\.json"):
        BlobStore(tmp_path, max_bytes=1)


def test_put_bytes_refuses_content_that_does_not_match(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=10_000)
    with pytest.raises(p2pd.store.StoreError):
        store.put_bytes(digest_of(b"right"), b"wrong")
    assert store.total_bytes == 0 and list((tmp_path / "blobs" / "sha256").iterdir()) == []


# ---- tags -------------------------------------------------------------------------------


def test_tags_are_saved_and_loaded(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=10_000)
    record = TagRecord(
        "seed.local:5000",
        "lab/busybox",
        "latest",
        digest_of(b"manifest"),
        "application/vnd.oci.image.manifest.v1+json",
        8,
        1_700_000_000.5,
    )
    store.save_tag(record)
    assert BlobStore(tmp_path, max_bytes=10_000).load_tag("seed.local:5000", "lab/busybox", "latest") == record
    # The namespace is part of the key: the same name on another registry is another tag.
    assert store.load_tag("docker.io", "lab/busybox", "latest") is None
    assert store.load_tag("seed.local:5000", "lab/busybox", "other") is None

    newer = replace(record, digest=digest_of(b"manifest 2"), size=10, checked=1_700_000_100.0)
    store.save_tag(newer)
    assert store.load_tag("seed.local:5000", "lab/busybox", "latest") == newer
    store.forget_tag("seed.local:5000", "lab/busybox", "latest")
    assert store.load_tag("seed.local:5000", "lab/busybox", "latest") is None
    store.forget_tag("seed.local:5000", "lab/busybox", "latest")  # forgetting twice is fine


def test_unreadable_tag_record_is_ignored(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=10_000)
    record = TagRecord("ns", "repo", "v1", digest_of(b"m"), "application/json", 1, 1.0)
    store.save_tag(record)
    (path,) = (tmp_path / "tags").iterdir()
    path.write_text('{"digest": "not a digest"}')
    assert store.load_tag("ns", "repo", "v1") is None


# ---- partial downloads and crash leftovers ------------------------------------------------


def test_partials_are_listed_and_stale_ones_removed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=10_000)
    fresh = write_partial(store, b"fresh bytes")
    stale = write_partial(store, b"stale")
    (tmp_path / "downloads" / "junk.partial").write_bytes(b"not ours")
    old = time.time() - 7200
    os.utime(store.partial_path(stale), (old, old))
    assert sorted(store.list_partials(), key=str) == sorted([(fresh, 11), (stale, 5)], key=str)
    fd, existing = store.open_partial(fresh)  # reopening finds what is there (resume)
    os.close(fd)
    assert existing == 11

    assert store.discard_stale_partials(3600) == [stale]
    assert store.list_partials() == [(fresh, 11)]
    store.discard_partial(fresh)
    store.discard_partial(fresh)
    assert store.list_partials() == []
    assert store.total_bytes == 0  # partial downloads are never complete blobs


def test_commit_partial_makes_a_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=10_000)
    data = b"x" * 5000
    digest = write_partial(store, data)
    fd, _ = store.open_partial(digest)
    try:
        store.commit_partial(digest, fd, len(data))
    finally:
        os.close(fd)
    assert store.list_partials() == []
    assert store.size(digest) == 5000 and store.blob_path(digest).read_bytes() == data


def test_crash_leftovers_in_tmp_are_removed_at_start(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=10_000)
    digest = put(store, "kept")
    for name in ("0123abcd.tmp", "half-written-pins.tmp"):
        (tmp_path / "tmp" / name).write_bytes(b"partial write before a crash")
    again = BlobStore(tmp_path, max_bytes=10_000)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert again.size(digest) == 1000


# ---- the command line ----------------------------------------------------------------------


def test_cli_cache_ls_pin_unpin_gc(tmp_path: Path, capsys: pytest.CaptureFixture[str], clock: FakeClock) -> None:
    data = tmp_path / "data"
    store = BlobStore(data, max_bytes=10_000)
    old, new = put(store, "old"), put(store, "new")
    partial = write_partial(store, b"abc")
    base = ["cache", "--data", str(data)]

    assert main([*base, "ls"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(str(new)) and out[1].startswith(str(old))  # most recently used first
    assert "pinned" not in out[0] + out[1]
    assert out[2].startswith(str(partial)) and out[2].endswith("(partial download)")
    assert out[3] == "2 blobs, 2000 bytes (limit 21474836480)"

    assert main([*base, "pin", str(old)]) == 0
    assert capsys.readouterr().out == f"pinned {old}\n"
    missing = digest_of(b"not cached")
    assert main([*base, "pin", str(missing)]) == 0
    assert "not cached yet" in capsys.readouterr().out
    assert main([*base, "ls"]) == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[:2]}
    assert listed[str(old)].endswith("pinned") and not listed[str(new)].endswith("pinned")
    assert store.evict(0) == [new]  # the running store honours the CLI's pin
    store.max_bytes = 10_000

    assert main([*base, "unpin", str(missing)]) == 0
    assert main([*base, "unpin", str(missing)]) == 1
    assert "is not pinned" in capsys.readouterr().err
    assert main([*base, "pin", "sha256:nothex"]) == 2
    assert "invalid digest" in capsys.readouterr().err

    old_partial = clock.now - 7200  # p2pd.store reads the fake clock
    os.utime(BlobStore(data, max_bytes=1).partial_path(partial), (old_partial, old_partial))
    assert main([*base, "gc", "--max-bytes", "0", "--partials-older-than", "3600"]) == 0
    out = capsys.readouterr().out
    assert f"removed partial {partial}" in out
    assert "evicted 0 blobs and 1 partial downloads; 1000 bytes left" in out  # ``old`` is pinned
    assert main([*base, "unpin", str(old)]) == 0
    assert main([*base, "gc", "--max-bytes", "0"]) == 0
    assert f"evicted {old}" in capsys.readouterr().out
    assert BlobStore(data, max_bytes=1).entries() == []


def test_cli_config_pins_cannot_be_unpinned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    store = BlobStore(data, max_bytes=10_000)
    digest = put(store, "configured")
    config = tmp_path / "p2pd.toml"
    config.write_text(f'data = "{data}"\n[cache]\nmax_bytes = 1\npinned = ["{digest}"]\n')
    assert main(["cache", "--config", str(config), "ls"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("pinned") and out[-1] == "1 blobs, 1000 bytes (limit 1)"
    assert main(["cache", "--config", str(config), "gc"]) == 0
    assert "evicted 0 blobs" in capsys.readouterr().out
    assert main(["cache", "--config", str(config), "unpin", str(digest)]) == 1
    assert "pins in the config file stay" in capsys.readouterr().err
    assert BlobStore(data, max_bytes=1).size(digest) == 1000
