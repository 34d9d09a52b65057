"""Audit events of command-line tools while the seed holds the log: queued in DATA/audit/inbox,
moved into the chain by the seed, never twice, never lost (seed/audit/_inbox.py)."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import trio

from seed.audit import (
    FileAuditLog,
    MemoryAuditLog,
    audit_directory,
    ingest_inbox,
    pending_inbox,
    record_offline,
    verify_audit_log,
)
from seed.cli import main as seed_main
from seed.config import load_config
from seed.registry import serve_seed


def test_appends_directly_when_no_seed_runs(tmp_path: Path) -> None:
    assert record_offline(tmp_path, "robot.create", {"actor": "ops", "detail": {"robot": "robot$ci"}},
                          rotate_bytes=1 << 20) == "appended"
    assert verify_audit_log(audit_directory(tmp_path)).ok


def test_queues_while_the_log_is_held_and_ingests_once(tmp_path: Path) -> None:
    directory = audit_directory(tmp_path)
    held = FileAuditLog(directory)
    try:
        assert record_offline(tmp_path, "robot.revoke", {"actor": "ops", "detail": {"robot": "robot$ci"}},
                              rotate_bytes=1 << 20) == "queued"
        (queued,) = pending_inbox(directory)
        keep = tmp_path / "copy.json"
        shutil.copy(queued, keep)
        assert ingest_inbox(held, directory) == 1
        assert pending_inbox(directory) == []
        # A crash after the append but before the delete leaves the file: it is not appended again.
        shutil.copy(keep, directory / "inbox" / queued.name)
        assert ingest_inbox(held, directory) == 0
        assert [r.action for r in held.iter_records()] == ["robot.revoke"]
    finally:
        held.close()
    assert verify_audit_log(directory).ok


def test_malformed_inbox_files_are_quarantined_and_recorded(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "00000000000000000001-bad.json").write_text("{not json")
    (inbox / "00000000000000000002-bad.json").write_text(json.dumps({"action": "robot.create"}))  # no time
    sink = MemoryAuditLog()
    assert ingest_inbox(sink, tmp_path) == 2
    assert [r.action for r in sink.iter_records()] == ["audit.inbox_rejected"] * 2
    assert sorted(p.name for p in (inbox / "rejected").iterdir()) == ["00000000000000000001-bad.json",
                                                                     "00000000000000000002-bad.json"]


async def test_robot_cli_beside_a_running_seed_reaches_the_chain(tmp_path: Path, nursery: trio.Nursery) -> None:
    data = tmp_path / "data"
    config = load_config(None, listen="127.0.0.1:0", data=data)
    await nursery.start(partial(serve_seed, config))
    assert await trio.to_thread.run_sync(seed_main, ["robot", "create", "ci", "--access", "team/*:pull",
                                                      "--data", str(data)]) == 0
    directory = audit_directory(data)
    with trio.fail_after(15):
        while pending_inbox(directory):
            await trio.sleep(0.1)
    records = [json.loads(line) for line in (directory / "audit.log").read_text().splitlines()]
    assert [r["action"] for r in records if r["action"].startswith("robot.")] == ["robot.create"]
    assert "secret" not in json.dumps(records).lower()
