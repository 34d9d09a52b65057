"""Robot accounts: one conformance test for every RobotStore, the file store's sharing between
processes, the identity provider, the access/duration parsers and ``seed robot``."""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from seed.auth.identity import Grant, IdentityProvider, Principal
from seed.auth.robots import (
    FileRobotStore,
    MemoryRobotStore,
    RobotExists,
    RobotProvider,
    RobotStore,
    RobotStoreError,
    add_robot_parser,
    format_access,
    parse_access_spec,
    parse_duration,
    robot_table,
    run_robot_cli,
)
from seed.errors import ConfigError, ProviderUnavailable
from tests.harness.tools import require_root, run

PULL = (Grant("team/*", frozenset({"pull"})),)
PUSH = (Grant("team/**", frozenset({"pull", "push"})), Grant("base/*", frozenset({"pull"})))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, action: str, fields: Mapping[str, Any]) -> None:
        self.seen.append((action, dict(fields)))


@pytest.fixture(params=["memory", "file"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Builds a store of the parametrized kind: ``make_store(clock=..., on_event=...)``."""

    def make(**kwargs: Any) -> RobotStore:
        if request.param == "memory":
            return MemoryRobotStore(**kwargs)
        return FileRobotStore(tmp_path / "data" / "auth" / "robots.json", **kwargs)

    yield make


def test_store_conformance(make_store: Any) -> None:
    clock, events = FakeClock(), Events()
    store: RobotStore = make_store(clock=clock, on_event=events)
    assert isinstance(store, RobotStore)
    assert store.list() == [] and store.get("ci") is None and store.verify("ci", "x") is None

    record, secret = store.create("ci", PUSH, clock.now + 3600, description="pipeline")
    assert (record.name, record.login_name, record.grants) == ("ci", "robot$ci", PUSH)
    assert (record.created_at, record.expires_at, record.revoked_at) == (clock.now, clock.now + 3600, None)
    assert record.description == "pipeline" and record.usable(clock.now)
    assert len(secret) == 43  # token_urlsafe(32): 256 random bits
    assert store.verify("ci", secret) == record
    assert store.verify("ci", secret + "x") is None
    assert store.verify("ci", "") is None
    assert store.verify("other", secret) is None
    assert store.get("ci") == record

    other, other_secret = store.create("a-deploy", PULL, None)
    assert other_secret != secret and other.expires_at is None
    assert [r.name for r in store.list()] == ["a-deploy", "ci"]
    assert store.verify("a-deploy", secret) is None

    with pytest.raises(RobotExists):
        store.create("ci", PULL, None)
    for bad in [lambda: store.create("CI", PULL, None), lambda: store.create("-x", PULL, None),
                lambda: store.create("x" * 65, PULL, None), lambda: store.create("robot$x", PULL, None),
                lambda: store.create("new", (), None),
                lambda: store.create("new", (Grant("team/?", frozenset({"pull"})),), None),
                lambda: store.create("new", (Grant("team/*", frozenset({"write"})),), None),
                lambda: store.create("new", PULL, clock.now - 1),
                lambda: store.create("new", PULL, None, description="line\nbreak")]:
        with pytest.raises(ConfigError):
            bad()
    assert store.get("new") is None

    clock.now += 3600  # the expiry instant
    assert store.verify("ci", secret) is None
    assert store.get("ci") is not None and store.get("ci").status(clock.now) == "expired"  # type: ignore[union-attr]
    assert store.verify("a-deploy", other_secret) == other

    clock.now += 10
    assert store.revoke("a-deploy") is True
    assert store.revoke("a-deploy") is False
    assert store.revoke("nobody") is False
    assert store.verify("a-deploy", other_secret) is None
    revoked = store.get("a-deploy")
    assert revoked is not None and revoked.revoked_at == clock.now and not revoked.usable(clock.now)
    with pytest.raises(RobotExists, match="revoked"):
        store.create("a-deploy", PULL, None)  # a revoked name is never reused

    assert events.seen == [
        ("robot.create", {"robot": "robot$ci", "access": "team/**:pull,push;base/*:pull",
                          "expires_at": 1_800_000_000.0 + 3600, "description": "pipeline"}),
        ("robot.create", {"robot": "robot$a-deploy", "access": "team/*:pull", "expires_at": None,
                          "description": ""}),
        ("robot.revoke", {"robot": "robot$a-deploy"}),
    ]
    assert secret not in repr(events.seen) and secret not in repr(store.list())


def test_concurrent_verify_and_create(make_store: Any) -> None:
    store: RobotStore = make_store()
    _, secret = store.create("base", PULL, None)
    failures: list[str] = []

    def verify() -> None:
        for _ in range(200):
            if store.verify("base", secret) is None:
                failures.append("verify failed while others were created")

    threads = [threading.Thread(target=verify) for _ in range(3)]
    for thread in threads:
        thread.start()
    for i in range(20):
        store.create(f"r{i}", PULL, None)
    for thread in threads:
        thread.join(timeout=30)
    assert not failures
    assert len(store.list()) == 21


# ----------------------------------------------------------------------------- the file store


def test_file_is_private_and_holds_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "auth" / "robots.json"
    store = FileRobotStore(path)
    assert not path.exists()  # created by the first change only
    _, secret = store.create("ci", PUSH, None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert secret not in text
    document = json.loads(text)
    assert document["version"] == 1
    assert len(document["robots"][0]["secret_sha256"]) == 64
    assert document["robots"][0]["grants"] == [{"pattern": "team/**", "actions": ["pull", "push"]},
                                               {"pattern": "base/*", "actions": ["pull"]}]
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_file_store_persists(tmp_path: Path) -> None:
    path = tmp_path / "robots.json"
    record, secret = FileRobotStore(path).create("ci", PUSH, 2_000_000_000.0, description="nightly")
    reopened = FileRobotStore(path)
    assert reopened.list() == [record]
    assert reopened.verify("ci", secret) == record


def test_revoke_by_another_process_takes_effect_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "data" / "auth" / "robots.json"
    server = FileRobotStore(path)
    _, secret = FileRobotStore(path).create("ci", PULL, None)  # as `seed robot create` would
    assert server.verify("ci", secret) is not None  # the server sees it without a restart
    # A real second process (the CLI), changing the file under the server's cached view.
    code = ("import sys; from pathlib import Path; from seed.auth.robots import FileRobotStore; "
            "sys.exit(0 if FileRobotStore(Path(sys.argv[1])).revoke('ci') else 1)")
    run([sys.executable, "-c", code, str(path)], timeout=60, cwd=Path(__file__).parent.parent)
    assert server.verify("ci", secret) is None
    assert server.get("ci") is not None and server.get("ci").revoked_at is not None  # type: ignore[union-attr]


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    # Each thread has its own store (own descriptors and flock), as separate processes would.
    path = tmp_path / "robots.json"
    errors: list[BaseException] = []

    def create(i: int) -> None:
        try:
            store = FileRobotStore(path)
            for j in range(5):
                store.create(f"w{i}-{j}", PULL, None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(FileRobotStore(path).list()) == 30


def test_writer_waits_for_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "robots.json"
    store = FileRobotStore(path)
    store.create("first", PULL, None)
    fd = os.open(path.with_name("robots.json.lock"), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another writer is in the middle of a change
    released = threading.Event()

    def release() -> None:
        time.sleep(0.3)
        released.set()
        os.close(fd)

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        store.create("second", PULL, None)
        assert released.is_set()  # it did not write while the lock was held
    finally:
        releaser.join(timeout=10)
    assert [r.name for r in FileRobotStore(path).list()] == ["first", "second"]


def test_corrupt_store_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "robots.json"
    store = FileRobotStore(path)
    _, secret = store.create("ci", PULL, None)
    provider = RobotProvider(store)
    assert provider.authenticate("robot$ci", secret) is not None
    original = path.read_bytes()
    for corrupt in [b"{not json", b'{"version": 2, "robots": []}', b'{"version": 1, "robots": [{"name": "X"}]}',
                    original.replace(b'"pull"', b'"write"')]:
        path.write_bytes(corrupt)
        with pytest.raises(RobotStoreError, match="corrupt"):
            store.verify("ci", secret)
        with pytest.raises(ProviderUnavailable):
            provider.authenticate("robot$ci", secret)
        with pytest.raises(RobotStoreError):
            FileRobotStore(path)
    path.write_bytes(original)
    assert provider.authenticate("robot$ci", secret) is not None


def test_root_gives_files_to_the_data_directory_owner(tmp_path: Path) -> None:
    require_root()
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 65534, 65534)  # the server's user owns its data directory
    path = data / "auth" / "robots.json"
    FileRobotStore(path).create("ci", PULL, None)
    for created in (path.parent, path, path.with_name("robots.json.lock")):
        st = created.stat()
        assert (st.st_uid, st.st_gid) == (65534, 65534), created


# ----------------------------------------------------------------------------- the provider


def test_robot_provider() -> None:
    store = MemoryRobotStore()
    _, secret = store.create("ci", PUSH, None)
    provider = RobotProvider(store)
    assert isinstance(provider, IdentityProvider) and provider.name == "robot"
    assert provider.authenticate("robot$ci", secret) == Principal(kind="robot", name="robot$ci", provider="robot",
                                                                  grants=PUSH)
    assert provider.authenticate("ci", secret) is None  # robots log in with the prefix only
    assert provider.authenticate("robot$ci", "wrong") is None
    assert provider.authenticate("robot$CI", secret) is None
    assert provider.authenticate("robot$", secret) is None
    assert provider.authenticate("alice", "pw") is None
    store.revoke("ci")
    assert provider.authenticate("robot$ci", secret) is None


# ----------------------------------------------------------------------------- parsers


def test_parse_access_spec() -> None:
    assert parse_access_spec("team/*:pull,push") == (Grant("team/*", frozenset({"pull", "push"})),)
    assert parse_access_spec(["team/**:pull; base/*:pull", "team/**:delete", " x:admin ;"]) == (
        Grant("team/**", frozenset({"pull", "delete"})), Grant("base/*", frozenset({"pull"})),
        Grant("x", frozenset({"admin"})))
    grants = parse_access_spec("a/*:push,pull;b:admin")
    assert format_access(grants) == "a/*:pull,push;b:admin"
    assert parse_access_spec(format_access(grants)) == grants


@pytest.mark.parametrize("spec", ["", ";", "team/*", "team/*:", ":pull", "team/*:pull,write", "team/?:pull",
                                  "team/[ab]:pull", "team name:pull", "a:b:pull", "***:pull", "Ä:pull"])
def test_parse_access_spec_refuses(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_access_spec(spec)


def test_parse_access_spec_bounded() -> None:
    with pytest.raises(ConfigError, match="at most"):
        parse_access_spec(";".join(f"r{i}:pull" for i in range(65)))


def test_parse_duration() -> None:
    assert parse_duration("90d") == 90 * 86400
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("30m") == 1800
    assert parse_duration("45s") == 45
    assert parse_duration("2w") == 14 * 86400
    assert parse_duration("1d12h") == 36 * 3600
    assert parse_duration(" Never ") is None
    for bad in ["", "0d", "90", "d", "1.5d", "1y", "-1d", "90d ago", "101000d"]:
        with pytest.raises(ConfigError):
            parse_duration(bad)


# ----------------------------------------------------------------------------- seed robot ...


def _cli(argv: list[str], store: Path, clock: FakeClock, events: Events | None = None) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="seed")
    add_robot_parser(parser.add_subparsers(dest="command", required=True))
    out = io.StringIO()
    status = run_robot_cli(parser.parse_args(argv), store, out=out, clock=clock, on_event=events)
    return status, out.getvalue()


def test_cli_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, clock, events = tmp_path / "auth" / "robots.json", FakeClock(), Events()
    status, out = _cli(["robot", "create", "ci", "--access", "team/*:pull,push", "--access", "base/**:pull",
                        "--expires", "90d", "--description", "nightly build"], path, clock, events)
    assert status == 0
    lines = dict(line.split(":", 1) for line in out.splitlines() if line[:1].islower() and ":" in line)
    secret = lines["secret"].strip()
    assert lines["login"].strip() == "robot$ci"
    assert lines["expires"].strip() == "2027-04-15 08:00Z"  # 90 days after the fake clock
    assert RobotProvider(FileRobotStore(path)).authenticate("robot$ci", secret) is not None
    assert events.seen[0][0] == "robot.create"

    status, out = _cli(["robot", "create", "deploy", "--access", "prod/*:pull", "--expires", "never"], path, clock)
    assert status == 0
    status, out = _cli(["robot", "create", "ci", "--access", "x:pull"], path, clock)
    assert status == 1 and "already exists" in capsys.readouterr().err

    status, out = _cli(["robot", "list"], path, clock)
    assert status == 0
    header, first, second = out.splitlines()
    assert header.split() == ["NAME", "STATUS", "EXPIRES", "CREATED", "ACCESS", "DESCRIPTION"]
    assert first.split()[:2] == ["robot$ci", "active"]
    assert first.endswith("team/*:pull,push;base/**:pull  nightly build")
    assert second.split()[:3] == ["robot$deploy", "active", "never"]
    assert secret not in out

    status, out = _cli(["robot", "revoke", "robot$ci"], path, clock, events)
    assert (status, out.strip()) == (0, "revoked robot$ci")
    assert events.seen[-1] == ("robot.revoke", {"robot": "robot$ci"})
    status, _ = _cli(["robot", "revoke", "ci"], path, clock)
    assert status == 1 and "already revoked" in capsys.readouterr().err
    status, _ = _cli(["robot", "revoke", "ghost"], path, clock)
    assert status == 1 and "does not exist" in capsys.readouterr().err
    assert "revoked" in _cli(["robot", "list"], path, clock)[1].splitlines()[1]


def test_cli_invalid_input_is_a_config_error(tmp_path: Path) -> None:
    path, clock = tmp_path / "robots.json", FakeClock()
    for argv in (["robot", "create", "Bad Name", "--access", "x:pull"],
                 ["robot", "create", "ok", "--access", "x:fly"],
                 ["robot", "create", "ok", "--access", "x:pull", "--expires", "soon"]):
        with pytest.raises(ConfigError):
            _cli(argv, path, clock)
    assert not path.exists()


def test_robot_table_marks_expired() -> None:
    store, clock = MemoryRobotStore(clock=FakeClock()), FakeClock()
    store.create("old", PULL, clock.now + 60)
    clock.now += 61
    assert robot_table(store.list(), clock.now)[1].split()[:2] == ["robot$old", "expired"]


def test_seed_command_line(tmp_path: Path) -> None:
    """The installed entry point: ``seed robot create/list/revoke --data DIR``, as an operator runs it."""
    data = tmp_path / "data"
    seed = [sys.executable, "-m", "seed"]
    cwd = Path(__file__).parent.parent
    created = run([*seed, "robot", "create", "ci", "--access", "team/*:pull", "--data", str(data)],
                  timeout=60, cwd=cwd)
    secret = next(line.split()[1] for line in created.stdout.decode().splitlines() if line.startswith("secret:"))
    store = FileRobotStore(data / "auth" / "robots.json")
    assert store.verify("ci", secret) is not None
    listed = run([*seed, "robot", "list", "--data", str(data)], timeout=60, cwd=cwd).stdout.decode()
    assert "robot$ci" in listed and secret not in listed
    run([*seed, "robot", "revoke", "ci", "--data", str(data)], timeout=60, cwd=cwd)
    assert store.verify("ci", secret) is None
    refused = run([*seed, "robot", "create", "x", "--access", "team/?:pull", "--data", str(data)],
                  timeout=60, cwd=cwd, check=False)
    assert refused.returncode == 2 and b"invalid repository pattern" in refused.stderr
