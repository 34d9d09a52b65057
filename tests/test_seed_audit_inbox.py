"""Audit events of command-line tools (``seed robot create|revoke``) while the seed holds the log:
queued in DATA/audit/inbox, moved into the chain by the seed, in order, never twice, never lost
(seed/audit/_inbox.py, the inbox part of seed/audit/_trail.py, the wiring in seed/cli.py)."""

from __future__ import annotations

import getpass
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from seed.audit import (
    AuditInbox,
    AuditRecord,
    AuditTrail,
    FileAuditLog,
    MemoryAuditLog,
    audit_directory,
    iter_directory_records,
    make_event,
    open_audit,
    record_offline,
    verify_audit_log,
)
from seed.cli import main as seed_main
from seed.config import load_config
from seed.registry import serve_seed
from tests.harness.seed_process import SeedProcess
from tests.harness.tools import run

ROTATE = 1 << 20
OPERATOR = getpass.getuser()


def _records(data: Path) -> list[AuditRecord]:
    return list(iter_directory_records(audit_directory(data)))


def _robots(data: Path) -> list[tuple[str, str]]:
    """(action, detail.robot) of the robot records, oldest first."""
    return [(r.action, r.event.detail["robot"]) for r in _records(data) if r.action.startswith("robot.")]


def _query(capsys: pytest.CaptureFixture[str], data: Path, action: str) -> list[dict[str, Any]]:
    """``seed audit query --action ACTION`` (the real CLI entry point), parsed."""
    capsys.readouterr()
    assert seed_main(["audit", "query", "--action", action, "--data", str(data)]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _queue_while_held(data: Path, *robots: str) -> list[Path]:
    """Queues one robot.create per name while a writer holds the log, as beside a running seed."""
    with FileAuditLog(audit_directory(data)):
        for robot in robots:
            assert record_offline(data, "robot.create", {"actor": "ops", "actor_kind": "operator",
                                                          "detail": {"robot": robot}}, rotate_bytes=ROTATE) == "queued"
    return AuditInbox(audit_directory(data)).pending()


# ---- no seed running: straight into the chain -------------------------------------------------


def test_robot_cli_without_a_seed_appends_directly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert seed_main(["robot", "create", "ci", "--access", "team/*:pull,push", "--expires", "1d",
                      "--description", "CI pipeline", "--data", str(tmp_path)]) == 0
    secret = capsys.readouterr().out.split("secret:")[1].split()[0]
    assert seed_main(["robot", "revoke", "ci", "--data", str(tmp_path)]) == 0
    assert not AuditInbox(audit_directory(tmp_path)).pending()
    (created,) = _query(capsys, tmp_path, "robot.create")
    assert created["actor"] == OPERATOR and created["actor_kind"] == "operator"
    assert "repository" not in created  # a robot is not a repository
    detail = created["detail"]
    assert (detail["robot"], detail["access"], detail["description"]) == ("robot$ci", "team/*:pull,push",
                                                                          "CI pipeline")
    assert isinstance(detail["expires_at"], float) and len(detail["inbox_id"]) == 32
    (revoked,) = _query(capsys, tmp_path, "robot.revoke")
    assert revoked["detail"]["robot"] == "robot$ci"
    log_text = (audit_directory(tmp_path) / "audit.log").read_text()
    assert secret not in log_text
    report = verify_audit_log(audit_directory(tmp_path))
    assert report.ok and report.records == 2 and report.inbox_pending == 0 and report.notes == ()


def test_robot_cli_records_nothing_when_audit_is_disabled(tmp_path: Path) -> None:
    config = tmp_path / "seed.toml"
    config.write_text("[audit]\nenabled = false\n")
    assert seed_main(["robot", "create", "ci", "--access", "team/*:pull", "--config", str(config),
                      "--data", str(tmp_path / "data")]) == 0
    assert not audit_directory(tmp_path / "data").exists()


def test_direct_append_moves_older_queued_events_in_first(tmp_path: Path) -> None:
    _queue_while_held(tmp_path, "robot$a", "robot$b")
    assert record_offline(tmp_path, "robot.create", {"detail": {"robot": "robot$c"}}, rotate_bytes=ROTATE) == "appended"
    assert _robots(tmp_path) == [("robot.create", "robot$a"), ("robot.create", "robot$b"),
                                 ("robot.create", "robot$c")]
    assert AuditInbox(audit_directory(tmp_path)).pending() == []
    assert verify_audit_log(audit_directory(tmp_path)).ok


def test_record_offline_refuses_bad_fields_and_the_logs_own_actions(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="unknown or reserved fields"):
        record_offline(tmp_path, "robot.create", {"robot": "robot$ci"}, rotate_bytes=ROTATE)
    with pytest.raises(Exception, match="belongs to the audit log"):
        record_offline(tmp_path, "audit.pruned", {"detail": {"first_seq": 5}}, rotate_bytes=ROTATE)


# ---- the seed holds the log: the inbox ---------------------------------------------------------


def test_queued_file_is_private_sortable_and_verify_reports_it(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    directory = audit_directory(tmp_path)
    (queued,) = _queue_while_held(tmp_path, "robot$ci")
    assert queued.parent == directory / "inbox"
    assert queued.stat().st_mode & 0o777 == 0o600
    stamp, inbox_id = queued.stem.split("-")
    assert len(stamp) == 20 and stamp.isdigit()
    document = json.loads(queued.read_bytes())
    assert document["detail"] == {"robot": "robot$ci", "inbox_id": inbox_id}
    # Not in the chain yet: verify passes, and says what is waiting.
    report = verify_audit_log(directory)
    assert report.ok and report.records == 0 and report.inbox_pending == 1
    assert any("wait in inbox/" in note for note in report.notes)
    capsys.readouterr()
    assert seed_main(["audit", "verify", "--data", str(tmp_path)]) == 0
    assert "1 event(s) of command-line tools wait in inbox/" in capsys.readouterr().out
    assert seed_main(["audit", "query", "--data", str(tmp_path)]) == 0
    assert "1 event(s) of command-line tools wait" in capsys.readouterr().err


def test_ingest_appends_in_order_in_bounded_rounds(tmp_path: Path) -> None:
    names = [f"robot$r{i}" for i in range(7)]
    _queue_while_held(tmp_path, *names)
    directory = audit_directory(tmp_path)
    inbox = AuditInbox(directory, batch=3)
    with FileAuditLog(directory) as sink:
        assert len(inbox.ingest(sink)) == 3
        assert len(inbox.pending()) == 4
        assert len(inbox.ingest_all(sink)) == 4
        assert inbox.ingest(sink) == []
    assert _robots(tmp_path) == [("robot.create", name) for name in names]
    assert verify_audit_log(directory).ok


@pytest.mark.parametrize("fresh_process", [False, True], ids=["same-process", "after-restart"])
def test_crash_between_append_and_delete_does_not_duplicate(tmp_path: Path, fresh_process: bool) -> None:
    (queued,) = _queue_while_held(tmp_path, "robot$ci")
    kept = tmp_path / "kept.json"
    shutil.copy(queued, kept)
    directory = audit_directory(tmp_path)
    inbox = AuditInbox(directory)
    with FileAuditLog(directory, rotate_bytes=600) as sink:
        assert [r.action for r in inbox.ingest(sink)] == ["robot.create"]
        assert inbox.pending() == []
        # The state a crash right after the durable append leaves: the file is still there.
        shutil.copy(kept, queued)
        # Enough records after it that it sits in a rotated file, not the live one.
        for i in range(6):  # one write each: the log rotates before a write
            sink.extend([make_event("login.success", {"actor": f"user{i}"})])
        if fresh_process:
            sink.close()
            sink = FileAuditLog(directory, rotate_bytes=600)
            inbox = AuditInbox(directory)
        assert len(list(directory.glob("audit-*.log"))) >= 1
        assert inbox.ingest(sink) == []
        sink.close()
    assert inbox.pending() == []
    assert _robots(tmp_path) == [("robot.create", "robot$ci")]
    assert verify_audit_log(directory).ok


def test_malformed_inbox_files_are_rejected_recorded_and_kept(tmp_path: Path) -> None:
    directory = audit_directory(tmp_path)
    (good,) = _queue_while_held(tmp_path, "robot$ok")
    inbox = directory / "inbox"
    valid = json.loads(good.read_bytes())
    bad = {
        "00000000000000000001-notjson.json": b"{not json",
        "00000000000000000002-notime.json": json.dumps({"action": "robot.create"}).encode(),
        "00000000000000000003-field.json": json.dumps({**valid, "password": "hunter2"}).encode(),
        "00000000000000000004-ownaction.json": json.dumps({**valid, "action": "audit.pruned"}).encode(),
        "00000000000000000005-noid.json": json.dumps({**valid, "detail": {"robot": "robot$x"}}).encode(),
        "00000000000000000006-huge.json": b" " * (64 * 1024 + 1),
        "00000000000000000007-array.json": b"[]",
    }
    for name, content in bad.items():
        (inbox / name).write_bytes(content)
    os.mkfifo(inbox / "00000000000000000008-fifo.json")  # must not block the writer
    (inbox / "00000000000000000009-link.json").symlink_to(good)
    with FileAuditLog(directory) as sink:
        records = AuditInbox(directory).ingest(sink)
    assert [r.action for r in records] == ["audit.inbox_rejected"] * 9 + ["robot.create"]
    reasons = {r.event.detail["file"]: r.event.detail["reason"] for r in records[:-1]}
    assert reasons["00000000000000000001-notjson.json"] == "is not JSON"
    assert "unknown or reserved fields ['password']" in reasons["00000000000000000003-field.json"]
    assert "belongs to the audit log" in reasons["00000000000000000004-ownaction.json"]
    assert "inbox_id" in reasons["00000000000000000005-noid.json"]
    assert "larger than" in reasons["00000000000000000006-huge.json"]
    assert "regular file" in reasons["00000000000000000008-fifo.json"]
    assert "hunter2" not in (directory / "audit.log").read_text()
    assert sorted(p.name for p in (inbox / "rejected").iterdir()) == sorted(reasons)
    assert AuditInbox(directory).pending() == []
    report = verify_audit_log(directory)
    assert report.ok and any("9 malformed inbox file(s)" in note for note in report.notes)
    # Recorded, then a crash before the move: recorded once, still moved aside.
    shutil.copy(inbox / "rejected" / "00000000000000000001-notjson.json", inbox)
    with FileAuditLog(directory) as sink:
        assert AuditInbox(directory).ingest(sink) == []
    assert AuditInbox(directory).pending() == []


# ---- the seed moves queued events in -----------------------------------------------------------


def test_open_audit_moves_queued_events_in_first(tmp_path: Path) -> None:
    _queue_while_held(tmp_path, "robot$a", "robot$b")
    config = load_config(None, data=tmp_path)
    trail = open_audit(config)
    try:
        trail.record("config.reload", {"actor_kind": "system"})
    finally:
        trail.close()
    assert [r.action for r in _records(tmp_path)] == ["robot.create", "robot.create", "config.reload"]
    assert trail.metrics.events.labels("robot.create")._value.get() == 2
    assert verify_audit_log(audit_directory(tmp_path)).ok


def test_open_audit_waits_for_a_command_that_holds_the_lock(tmp_path: Path) -> None:
    held = FileAuditLog(audit_directory(tmp_path))
    releaser = threading.Timer(0.3, held.close)
    releaser.start()
    try:
        open_audit(load_config(None, data=tmp_path)).close()
    finally:
        releaser.cancel()
        held.close()


async def test_writer_task_moves_queued_events_in_while_serving(tmp_path: Path, nursery: trio.Nursery) -> None:
    directory = tmp_path / "audit"
    inbox = AuditInbox(directory)
    sink = MemoryAuditLog()
    inbox.queue(make_event("robot.create", {"detail": {"robot": "robot$early", "inbox_id": "a" * 32}}))
    trail = AuditTrail(sink, inbox=inbox)
    await nursery.start(trail.serve)
    trail.record("login.success", {"actor": "alice"})
    await trail.flush()
    inbox.queue(make_event("robot.revoke", {"detail": {"robot": "robot$late", "inbox_id": "b" * 32}}))
    with trio.fail_after(10):  # looked at every second
        while inbox.pending():  # noqa: ASYNC110 - the writer changes the files in a worker thread
            await trio.sleep(0.05)
    assert [r.action for r in sink.iter_records()] == ["robot.create", "login.success", "robot.revoke"]


async def test_robot_cli_beside_an_in_process_seed(tmp_path: Path, nursery: trio.Nursery,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    config = load_config(None, listen="127.0.0.1:0", data=data)
    _, registry = await nursery.start(partial(serve_seed, config))
    # The seed holds the log: the event goes to the inbox.
    assert await trio.to_thread.run_sync(partial(record_offline, data, "robot.revoke", {
        "detail": {"robot": "robot$old"}}, rotate_bytes=ROTATE)) == "queued"
    assert await trio.to_thread.run_sync(seed_main, ["robot", "create", "ci", "--access", "team/*:pull",
                                                      "--data", str(data)]) == 0
    secret = capsys.readouterr().out.split("secret:")[1].split()[0]
    with trio.fail_after(15):
        while not (created := await trio.to_thread.run_sync(_query, capsys, data, "robot.create")):  # noqa: ASYNC110
            await trio.sleep(0.1)  # the seed's writer moves it in from a worker thread
    (record,) = created
    assert (record["actor"], record["actor_kind"], record["detail"]["robot"]) == (OPERATOR, "operator", "robot$ci")
    assert [r["detail"]["robot"] for r in await trio.to_thread.run_sync(_query, capsys, data, "robot.revoke")] == [
        "robot$old"]
    assert secret not in (audit_directory(data) / "audit.log").read_text()
    report = await trio.to_thread.run_sync(verify_audit_log, audit_directory(data))
    assert report.ok and report.inbox_pending == 0
    registry_metrics = registry.metrics.registry
    # Counted once the writer's worker thread has returned the records, which is just after
    # they are in the file the query above read (CI, 12-04: read in between, None).
    with trio.fail_after(15):
        while registry_metrics.get_sample_value("seed_audit_events_total", {"action": "robot.create"}) is None:  # noqa: ASYNC110
            await trio.sleep(0.05)  # a prometheus counter has nothing to wait on
    assert registry_metrics.get_sample_value("seed_audit_events_total", {"action": "robot.create"}) == 1


@pytest.fixture
def seed_process(tmp_path: Path) -> Iterator[SeedProcess]:
    with SeedProcess(tmp_path / "seed-data", log_level="INFO") as seed:
        yield seed


def test_robot_cli_process_beside_a_seed_process(seed_process: SeedProcess) -> None:
    data = str(seed_process.data_dir)
    run([sys.executable, "-m", "seed", "robot", "create", "ci", "--access", "team/*:pull", "--data", data], timeout=60)
    for _ in range(150):  # bounded: 15 s
        if _robots(seed_process.data_dir):
            break
        time.sleep(0.1)
    assert _robots(seed_process.data_dir) == [("robot.create", "robot$ci")]
    verified = run([sys.executable, "-m", "seed", "audit", "verify", "--data", data], timeout=60)
    assert b"audit log OK" in verified.stdout and b"wait in inbox" not in verified.stdout
    assert seed_process.metric("seed_audit_events_total", action="robot.create") == 1
