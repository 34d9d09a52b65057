"""The seed's audit log (seed.audit): the secret guard, one conformance test for every sink,
tamper detection by ``verify`` (edit, delete, insert, reorder, removed files), rotation,
pruning, crash safety (a real child process killed with SIGKILL, a real write failure from
RLIMIT_FSIZE), the trio writer and its metrics, and the ``seed audit`` commands.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry

from seed.audit import (
    ACTIONS,
    GENESIS_HASH,
    LIVE_NAME,
    REDACTED,
    AuditEvent,
    AuditQuery,
    AuditRecord,
    AuditSink,
    AuditTrail,
    FileAuditLog,
    MemoryAuditLog,
    audit_directory,
    canonical,
    check_lines,
    format_time,
    iter_directory_records,
    make_event,
    open_audit,
    parse_time,
    record_from_line,
    rotated_name,
    verify_audit_log,
)
from seed.cli import main
from seed.config import AuditConfig, SeedConfig, StorageConfig
from seed.errors import AuditError
from seed.metrics import SeedMetrics

NOW = datetime(2025, 12, 3, 12, 0, 0, tzinfo=UTC)
SECRETS = ("hunter2", "s3cr3t-value", "Bearer abc.def.ghi", "Basic dXNlcjpwYXNz",
           "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl", "-----BEGIN PRIVATE KEY-----\nMIIE")


def _event(index: int, *, when: datetime = NOW, action: str = "manifest.push") -> AuditEvent:
    return make_event(action, {"actor": f"user{index % 3}", "actor_kind": "user", "source": "10.0.0.7",
                               "repository": f"team/app{index % 2}", "digest": f"sha256:{index:064x}"},
                      time=format_time(when + timedelta(seconds=index)))


def _build(directory: Path, count: int, *, rotate_bytes: int = 1 << 20, start: int = 0,
           when: datetime = NOW) -> None:
    with FileAuditLog(directory, rotate_bytes=rotate_bytes) as audit_log:
        for index in range(start, start + count):
            audit_log.append(_event(index, when=when))


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _rewrite(path: Path, lines: list[bytes]) -> None:
    os.chmod(path, 0o640)  # rotated files are read-only
    path.write_bytes(b"".join(lines))


def _all_stored_lines(directory: Path) -> list[bytes]:
    names = [*sorted(p.name for p in directory.glob("audit-*.log")), LIVE_NAME]
    return [line for name in names if (directory / name).exists() for line in _lines(directory / name)]


# -- events and the secret guard ---------------------------------------------------------------


def test_event_fields_refuse_unknown_and_secret_names() -> None:
    for name in ("password", "token", "authorization", "secret", "colour"):
        with pytest.raises(AuditError, match="unknown or reserved"):
            make_event("login.failure", {"actor": "alice", name: "hunter2"})
    with pytest.raises(AuditError, match="reserved"):
        make_event("login.failure", {"time": format_time(NOW)})
    with pytest.raises(AuditError, match="must be a string"):
        make_event("login.failure", {"actor": 7})
    with pytest.raises(AuditError, match="JSON"):
        make_event("login.failure", {"detail": {"when": NOW}})
    with pytest.raises(AuditError, match="finite"):
        make_event("login.failure", {"detail": {"ratio": float("nan")}})


def test_actions_are_an_open_set_of_dotted_names() -> None:
    assert {"login.success", "login.failure", "token.issued", "manifest.push", "tag.move", "manifest.delete",
            "tag.delete", "blob.delete", "access.denied", "robot.create", "robot.revoke",
            "config.reload"} <= set(ACTIONS)
    assert make_event("signature.verdict").action == "signature.verdict"  # a future action needs no change
    for bad in ("login", "Login.Success", "login success", "login..x", "", "a." + "x" * 70):
        with pytest.raises(AuditError, match="action"):
            make_event(bad)


def test_secrets_in_detail_are_redacted_and_never_reach_the_file(tmp_path: Path) -> None:
    detail = {"Password": SECRETS[0], "client_secret": SECRETS[1], "X-Registry-Auth-Token": "abc",
              "nested": {"Authorization": SECRETS[2], "list": [SECRETS[3], "fine"]},
              "header": SECRETS[2], "jwt": SECRETS[4], "key": SECRETS[5], "reason": "bad credentials"}
    event = make_event("login.failure", {"actor": "alice", "source": "10.0.0.1", "detail": detail})
    assert event.detail == {"Password": REDACTED, "client_secret": REDACTED, "X-Registry-Auth-Token": REDACTED,
                            "nested": {"Authorization": REDACTED, "list": [REDACTED, "fine"]},
                            "header": REDACTED, "jwt": REDACTED, "key": REDACTED, "reason": "bad credentials"}
    # Events built directly (not through make_event) are cleaned the same way.
    assert AuditEvent("login.failure", detail={"token": "abc"}).detail == {"token": REDACTED}
    directory = tmp_path / "audit"
    with FileAuditLog(directory) as audit_log:
        audit_log.append(event)
    stored = (directory / LIVE_NAME).read_bytes()
    for secret in SECRETS:
        assert secret.encode() not in stored
        assert json.dumps(secret).encode() not in stored
    assert b"bad credentials" in stored


def test_cleaning_is_idempotent_and_lines_stay_single_ascii_lines() -> None:
    event = make_event("login.failure", {
        "actor": "evil\n{\"action\":\"forged\"}\u2028" + "x" * 5000, "old_digest": None,
        "scopes": ["repository:a:pull"] * 300, "detail": {"tags": {"b", "a"}, "pair": (1, 2.5), "text": "y" * 5000}})
    assert len(event.actor) == 1024 and len(event.scopes) == 256 and event.detail["tags"] == ["a", "b"]
    assert "old_digest" not in event.to_dict()
    sink = MemoryAuditLog()
    record = sink.append(event)
    [line] = sink.lines()
    assert line.count(b"\n") == 1 and line.endswith(b"\n") and line.isascii()
    assert record_from_line(line[:-1]) == record  # read back equal: cleaning again changes nothing


def test_parse_time_accepts_iso_and_ages() -> None:
    assert parse_time("2025-12-01") == datetime(2025, 12, 1, tzinfo=UTC)
    assert parse_time("2025-12-01T10:00:00+01:00") == datetime(2025, 12, 1, 9, tzinfo=UTC)
    assert parse_time("2025-12-01T10:00:00Z") == datetime(2025, 12, 1, 10, tzinfo=UTC)
    assert parse_time("1h", now=NOW) == NOW - timedelta(hours=1)
    assert parse_time("7d", now=NOW) == NOW - timedelta(days=7)
    assert parse_time("30m", now=NOW) == NOW - timedelta(minutes=30)
    with pytest.raises(ValueError):
        parse_time("yesterday")


# -- one conformance test for every sink -------------------------------------------------------


@pytest.fixture(params=["memory", "file"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AuditSink]:
    made: AuditSink = MemoryAuditLog() if request.param == "memory" else FileAuditLog(tmp_path / "audit")
    yield made
    made.close()


def test_sink_conformance(sink: AuditSink) -> None:
    assert isinstance(sink, AuditSink)
    assert sink.head == (0, GENESIS_HASH)
    first = sink.append(_event(0))
    batch = sink.extend([_event(i) for i in range(1, 6)])
    assert sink.extend([]) == []
    records = [first, *batch]
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    assert list(sink.iter_records()) == records
    assert sink.head == (6, records[-1].hash)
    # The chain: each record is sealed over its content and the hash of the one before.
    prev = GENESIS_HASH
    for record in records:
        assert record.prev == prev
        body = {k: v for k, v in record.to_dict().items() if k != "hash"}
        assert hashlib.sha256(canonical(body)).hexdigest() == record.hash
        prev = record.hash
    assert check_lines(canonical(r.to_dict()) + b"\n" for r in records) is None

    assert [r.seq for r in sink.query(AuditQuery(actor="user1"))] == [2, 5]
    assert [r.seq for r in sink.query(AuditQuery(repository="team/app1"))] == [2, 4, 6]
    assert [r.seq for r in sink.query(AuditQuery(repository="team/*", actor="user0"))] == [1, 4]
    assert [r.seq for r in sink.query(AuditQuery(since=NOW + timedelta(seconds=4)))] == [5, 6]
    sink.append(make_event("login.success", {"actor": "alice"}, time=format_time(NOW)))
    assert [r.seq for r in sink.query(AuditQuery(action="login.*"))] == [7]
    assert [r.seq for r in sink.query(AuditQuery(action="manifest.push", actor="alice"))] == []


def test_sink_conformance_concurrent_appends_stay_one_chain(sink: AuditSink) -> None:
    def work(worker: int) -> None:
        for index in range(25):
            sink.append(_event(worker * 100 + index))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    records = list(sink.iter_records())
    assert [r.seq for r in records] == list(range(1, 101))
    assert all(b.prev == a.hash for a, b in itertools.pairwise(records))


def test_sink_conformance_closed_sink_refuses(sink: AuditSink) -> None:
    sink.append(_event(0))
    sink.close()
    with pytest.raises(AuditError):
        sink.append(_event(1))


# -- the file sink: reopen, lock, rotation -----------------------------------------------------


def test_reopen_continues_the_chain_and_one_writer_at_a_time(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    with FileAuditLog(directory) as audit_log:
        last = audit_log.extend([_event(i) for i in range(3)])[-1]
        with pytest.raises(AuditError, match="already open"):
            FileAuditLog(directory)
    with FileAuditLog(directory) as audit_log:
        assert audit_log.head == (3, last.hash)
        assert audit_log.append(_event(3)).prev == last.hash
    assert verify_audit_log(directory).records == 4
    assert oct((directory / LIVE_NAME).stat().st_mode & 0o777) == "0o640"


def test_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    _build(directory, 40, rotate_bytes=2000)
    rotated = sorted(p.name for p in directory.glob("audit-*.log"))
    assert len(rotated) >= 4 and rotated[0] == rotated_name(1)
    first_lines = [json.loads(_lines(directory / name)[0]) for name in rotated]
    assert [line["seq"] for line in first_lines] == [int(name[6:18]) for name in rotated]
    # The first line of each file chains to the last line of the file before.
    for before, after in zip(rotated, [*rotated[1:], LIVE_NAME], strict=True):
        assert json.loads(_lines(directory / after)[0])["prev"] == json.loads(_lines(directory / before)[-1])["hash"]
    assert all((directory / name).stat().st_mode & 0o777 == 0o440 for name in rotated)  # never written again
    report = verify_audit_log(directory)
    assert report.ok and report.records == 40 and report.files == (*rotated, LIVE_NAME)
    assert [r.seq for r in iter_directory_records(directory)] == list(range(1, 41))


def test_crash_between_rotation_rename_and_create(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    _build(directory, 5)
    # What a crash right after the rename leaves: rotated files and no live file.
    (directory / LIVE_NAME).rename(directory / rotated_name(1))
    with FileAuditLog(directory) as audit_log:
        assert audit_log.head[0] == 5
        assert audit_log.append(_event(5)).seq == 6
    assert verify_audit_log(directory).ok


def test_reads_see_each_record_once_while_a_writer_rotates(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    stop = threading.Event()

    with FileAuditLog(directory, rotate_bytes=1500) as audit_log:
        def write() -> None:
            index = 0
            while not stop.is_set():
                audit_log.append(_event(index))
                index += 1

        writer = threading.Thread(target=write)
        writer.start()
        try:
            deadline = time.monotonic() + 1.5
            checks = 0
            while time.monotonic() < deadline:
                report = verify_audit_log(directory)
                assert report.ok, report.problem
                seqs = [r.seq for r in audit_log.iter_records()]
                assert seqs == list(range(1, len(seqs) + 1))
                checks += 1
        finally:
            stop.set()
            writer.join(timeout=30)
    assert checks > 3 and len(list(directory.glob("audit-*.log"))) > 3


# -- verify: tampering is found at the right line ----------------------------------------------


def _forged(seq: int, prev: str) -> bytes:
    body = {**_event(99).to_dict(), "seq": seq, "prev": prev}
    return canonical({**body, "hash": hashlib.sha256(canonical(body)).hexdigest()}) + b"\n"


def _edit(lines: list[bytes]) -> list[bytes]:
    lines[4] = lines[4].replace(b'"actor":"user1"', b'"actor":"userX"')
    return lines


def _space(lines: list[bytes]) -> list[bytes]:
    lines[4] = lines[4].replace(b'{"action"', b'{ "action"')
    return lines


def _swap(lines: list[bytes]) -> list[bytes]:
    lines[5], lines[6] = lines[6], lines[5]
    return lines


LIVE_TAMPERING: dict[str, tuple[Callable[[list[bytes]], list[bytes]], int, str]] = {
    "edit": (_edit, 5, "does not match its hash"),
    "whitespace": (_space, 5, "not in canonical form"),
    "garbage": (lambda lines: [*lines[:2], b"hello\n", *lines[3:]], 3, "not a JSON record"),
    "delete": (lambda lines: lines[:3] + lines[4:], 4, "records 4..4 were deleted or moved"),
    "insert duplicate": (lambda lines: [*lines[:4], lines[1], *lines[4:]], 5, "reordered, duplicated"),
    "insert forged": (lambda lines: [*lines[:4], _forged(5, "ab" * 32), *lines[4:]], 5, "does not chain"),
    "reorder": (_swap, 6, "records 6..6 were deleted or moved"),
    "delete first": (lambda lines: lines[1:], 1, "no audit.pruned record declares"),
}


@pytest.mark.parametrize("case", list(LIVE_TAMPERING))
def test_verify_names_the_first_bad_line(tmp_path: Path, case: str) -> None:
    directory = tmp_path / "audit"
    _build(directory, 12)
    change, line, message = LIVE_TAMPERING[case]
    live = directory / LIVE_NAME
    _rewrite(live, change(_lines(live)))
    report = verify_audit_log(directory)
    assert not report.ok
    assert report.problem is not None
    assert (report.problem.file, report.problem.line) == (LIVE_NAME, line), report.problem
    assert message in report.problem.message
    assert report.records == max(0, line - 1)
    # The same lines checked as one sequence name the same line.
    bad = check_lines(_all_stored_lines(directory))
    assert bad is not None and bad[0] == line


def test_verify_cannot_see_a_cut_tail_from_the_files_alone(tmp_path: Path) -> None:
    """A documented limit: removing the newest records leaves a valid shorter chain; only a
    head kept elsewhere (verify's head line, the seed_audit_head_seq gauge) shows it."""
    directory = tmp_path / "audit"
    _build(directory, 12)
    before = verify_audit_log(directory)
    live = directory / LIVE_NAME
    _rewrite(live, _lines(live)[:9])
    after = verify_audit_log(directory)
    assert after.ok and after.head_seq == 9 < before.head_seq


def _rotated(directory: Path) -> list[Path]:
    return sorted(directory.glob("audit-*.log"))


def test_verify_finds_tampering_across_rotated_files(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    _build(pristine, 40, rotate_bytes=2000)
    names = [p.name for p in _rotated(pristine)]

    def tampered(change: Callable[[Path], object]) -> tuple[str, int, str]:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(pristine, copy)
        change(copy)
        report = verify_audit_log(copy)
        assert not report.ok and report.problem is not None
        return report.problem.file, report.problem.line, report.problem.message

    # A middle file deleted: the next file's first line no longer fits.
    file, line, message = tampered(lambda d: (d / names[1]).unlink())
    assert (file, line) == (names[2], 1) and "were deleted or moved" in message
    # The oldest file deleted by hand (not pruned): the start is not declared.
    file, line, message = tampered(lambda d: (d / names[0]).unlink())
    assert (file, line) == (names[1], 1) and "without `seed audit prune`" in message
    # A record edited inside a rotated file.
    file, line, message = tampered(lambda d: _rewrite(d / names[2], _edit(_lines(d / names[2]) + [b""] * 5)[:-5]))
    assert file == names[2] and "does not match its hash" in message
    # A rotated file cut mid-line: only the live file may end with an interrupted write.
    file, line, message = tampered(lambda d: _rewrite(d / names[1], [b"".join(_lines(d / names[1]))[:-10]]))
    assert file == names[1] and "only the live file" in message
    # A rotated file emptied.
    file, line, message = tampered(lambda d: _rewrite(d / names[2], []))
    assert (file, line) == (names[2], 1) and "empty" in message
    # A rotated file renamed to claim another start.
    seq = int(names[-1][6:18])
    file, line, message = tampered(lambda d: (d / names[-1]).rename(d / rotated_name(seq + 1)))
    assert file == rotated_name(seq + 1) and line == 1 and "renamed" in message


# -- crash safety -------------------------------------------------------------------------------


def test_torn_tail_is_reported_then_moved_aside_and_recorded(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    _build(directory, 6)
    live = directory / LIVE_NAME
    torn = _lines(live)[2][:37]  # the start of a record, as an interrupted write leaves it
    with live.open("ab") as handle:
        handle.write(torn)
    report = verify_audit_log(directory)
    assert report.ok and report.records == 6
    assert report.truncated_tail is not None
    assert (report.truncated_tail.file, report.truncated_tail.line) == (LIVE_NAME, 7)
    with FileAuditLog(directory) as audit_log:
        assert audit_log.head[0] == 7
        appended = audit_log.append(_event(6))
    records = list(iter_directory_records(directory))
    note = records[6]
    assert note.action == "audit.tail_truncated" and note.prev == report.head_hash
    assert note.event.detail["bytes"] == len(torn)
    assert note.event.detail["sha256"] == hashlib.sha256(torn).hexdigest()
    assert (directory / note.event.detail["saved_as"]).read_bytes() == torn
    assert appended.seq == 8 and appended.prev == note.hash
    after = verify_audit_log(directory)
    assert after.ok and after.truncated_tail is None and after.records == 8
    assert any("moved aside" in n for n in after.notes)


def test_open_refuses_to_chain_onto_a_forged_head(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    _build(directory, 4)
    live = directory / LIVE_NAME
    pristine = _lines(live)
    _rewrite(live, [*pristine[:-1], pristine[-1].replace(b'"actor":"user0"', b'"actor":"mallory"')])
    with pytest.raises(AuditError, match=r"newest audit record .* does not verify"):
        FileAuditLog(directory)
    _rewrite(live, pristine)
    with FileAuditLog(directory) as audit_log:  # the failed open let go of the lock
        assert audit_log.head[0] == 4


_APPENDER = r"""
import sys
from pathlib import Path
from seed.audit import FileAuditLog, make_event

audit_log = FileAuditLog(Path(sys.argv[1]), rotate_bytes=int(sys.argv[2]))
index = 0
while True:
    audit_log.extend([make_event("manifest.push", {"actor": "ci", "repository": "team/app",
                                                   "detail": {"n": index + i, "pad": "x" * 2000}})
                      for i in range(40)])
    index += 40
"""


def _wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        time.sleep(0.01)


def _rotated_at_least(directory: Path, count: int) -> bool:
    return directory.exists() and len(_rotated(directory)) >= count


def test_kill_9_while_appending_then_reopen_continues_the_chain(tmp_path: Path) -> None:
    """Three rounds on one directory: a child appends (and rotates) until SIGKILL; the log
    verifies up to its last complete line, and a reopen appends a record chained to it.

    SIGKILL lands in the middle of a write() only rarely (none in 35 tries here: the copy
    into the page cache is a small part of each loop), so round 1 also leaves what such a
    kill leaves, the start of a line, to check that the reopen repairs it and chains on.
    """
    directory = tmp_path / "audit"
    for round_number in range(3):
        wanted = (len(_rotated(directory)) if directory.exists() else 0) + 2
        child = subprocess.Popen([sys.executable, "-c", _APPENDER, str(directory), str(256 * 1024)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_for(partial(_rotated_at_least, directory, wanted), 30,
                      f"round {round_number}: the child to write and rotate")
            time.sleep(0.05 * round_number)
        finally:
            child.send_signal(signal.SIGKILL)
            _, stderr = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL, stderr.decode()
        if round_number == 1:
            with (directory / LIVE_NAME).open("ab") as handle:
                handle.write(b'{"action":"manifest.push","actor":"ci","detail":{"n":')

        report = verify_audit_log(directory)
        assert report.ok, report.problem
        assert report.records > 80 * (round_number + 1)
        if round_number == 1:
            assert report.truncated_tail is not None
        if report.truncated_tail is not None:
            assert report.truncated_tail.file == LIVE_NAME
        repaired = report.truncated_tail is not None
        with FileAuditLog(directory, rotate_bytes=256 * 1024) as audit_log:
            record = audit_log.append(_event(0))
        records = list(iter_directory_records(directory))
        assert records[-1] == record and record.seq == report.head_seq + 1 + repaired
        first_new = records[-2] if repaired else record
        assert first_new.prev == report.head_hash
        if repaired:
            assert first_new.action == "audit.tail_truncated"
        after = verify_audit_log(directory)
        assert after.ok and after.truncated_tail is None and after.head_seq == record.seq


_FULL_DISK = r"""
import resource, signal, sys
from pathlib import Path
from seed.audit import FileAuditLog, make_event
from seed.errors import AuditError

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
directory = Path(sys.argv[1])
audit_log = FileAuditLog(directory)
audit_log.append(make_event("login.success", {"actor": "a"}))
size = (directory / "audit.log").stat().st_size
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
try:
    audit_log.extend([make_event("manifest.push", {"actor": "b", "detail": {"pad": "x" * 600}})] * 3)
    print("no failure")
except AuditError as exc:
    print("failed", "File too large" in str(exc))
print("size kept", (directory / "audit.log").stat().st_size == size)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
print("next seq", audit_log.append(make_event("login.success", {"actor": "c"})).seq)
audit_log.close()
"""


def test_a_failed_write_keeps_nothing_and_the_chain_continues(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    result = subprocess.run([sys.executable, "-c", _FULL_DISK, str(directory)], capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().split("\n")[:3] == ["failed True", "size kept True", "next seq 2"]
    report = verify_audit_log(directory)
    assert report.ok and report.records == 2 and report.truncated_tail is None


# -- retention -----------------------------------------------------------------------------------


def _old_and_new(directory: Path, now: datetime = NOW) -> None:
    """30 records 40 days before ``now``, then 10 from ``now``, in files of about 6 records."""
    _build(directory, 30, rotate_bytes=2000, when=now - timedelta(days=40))
    _build(directory, 10, rotate_bytes=2000, start=30, when=now)


def test_prune_is_declared_in_the_chain_and_verify_accepts_it(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    _old_and_new(directory)
    files_before = sorted(p.name for p in directory.iterdir())
    with FileAuditLog(directory, rotate_bytes=2000) as audit_log:
        dry = audit_log.prune(NOW - timedelta(days=30), dry_run=True)
        assert sorted(p.name for p in directory.iterdir()) == files_before
        report = audit_log.prune(NOW - timedelta(days=30), actor="ops")
    assert dry.removed == report.removed and len(report.removed) >= 3
    assert report.first_seq is not None and report.records == report.first_seq - 1
    assert all(not (directory / name).exists() for name in report.removed)
    verified = verify_audit_log(directory)
    assert verified.ok, verified.problem
    assert verified.first_seq == report.first_seq and verified.head_seq == 41
    pruned = [r for r in iter_directory_records(directory) if r.action == "audit.pruned"]
    assert len(pruned) == 1 and pruned[0].event.detail["first_seq"] == report.first_seq
    assert pruned[0].event.actor == "ops" and pruned[0].event.detail["files"] == list(report.removed)

    # Removing one more old file by hand is not a prune: verify says so.
    oldest = _rotated(directory)[0]
    oldest.unlink()
    failed = verify_audit_log(directory)
    assert not failed.ok and failed.problem is not None
    assert failed.problem.line == 1 and "no audit.pruned record declares" in failed.problem.message


def test_an_interrupted_prune_keeps_more_history_and_still_verifies(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    _old_and_new(directory)
    saved = tmp_path / "saved"
    shutil.copytree(directory, saved)
    with FileAuditLog(directory, rotate_bytes=2000) as audit_log:
        report = audit_log.prune(NOW - timedelta(days=30))
    # A crash after the audit.pruned record, before the last removals: the newest files that
    # were to go are still there (removal goes oldest first).
    for name in report.removed[1:]:
        shutil.copy2(saved / name, directory / name)
    verified = verify_audit_log(directory)
    assert verified.ok, verified.problem
    assert verified.first_seq is not None and report.first_seq is not None
    assert verified.first_seq < report.first_seq
    # The next prune finishes the job.
    with FileAuditLog(directory, rotate_bytes=2000) as audit_log:
        again = audit_log.prune(NOW - timedelta(days=30))
    assert again.removed == report.removed[1:]
    assert verify_audit_log(directory).ok


def test_prune_refuses_a_log_that_does_not_verify(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    _old_and_new(directory)
    first = _rotated(directory)[0]
    _rewrite(first, _edit(_lines(first) + [b""] * 5)[:-5])
    with FileAuditLog(directory, rotate_bytes=2000) as audit_log, pytest.raises(AuditError, match="prune refused"):
        audit_log.prune(NOW)
    assert first.exists()


# -- the trio writer, the hook and the metrics ----------------------------------------------------


def _count(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


class _FailingSink(MemoryAuditLog):
    """The in-memory sink that fails its first ``failures`` writes, like a full disk would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def extend(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        if self.failures:
            self.failures -= 1
            raise AuditError("No space left on device (test)")
        return super().extend(events)


async def test_trail_writes_off_the_loop_and_counts_by_action(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    sink = FileAuditLog(tmp_path / "audit")
    trail = AuditTrail(sink, registry=registry, clock=lambda: NOW)
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.serve)
        # The seed's hooks call it with (action, fields), like seed.gate.AuditHook.
        trail("login.success", {"actor": "alice", "actor_kind": "user", "provider": "htpasswd",
                                "source": "10.0.0.1"})
        trail.record("access.denied", {"actor": "bob", "source": "10.0.0.2", "repository": "team/app",
                                       "detail": {"needs": "push"}})
        trail.record("access.denied", {"actor": "bob", "source": "10.0.0.2"})
        await trio.to_thread.run_sync(trail.record, "token.issued", {"actor": "alice", "scopes": ["x:y:pull"]})
        with trio.fail_after(10):
            await trail.flush()
        assert [r.action for r in sink.iter_records()] == ["login.success", "access.denied", "access.denied",
                                                           "token.issued"]
        nursery.cancel_scope.cancel()
    trail.close()
    assert _count(registry, "seed_audit_events_total", action="access.denied") == 2
    assert _count(registry, "seed_audit_events_total", action="login.success") == 1
    assert _count(registry, "seed_audit_head_seq") == 4
    assert verify_audit_log(tmp_path / "audit").ok
    assert next(iter(sink.iter_records())).time == format_time(NOW)


async def test_trail_refuses_bad_fields_at_the_call_site() -> None:
    trail = AuditTrail(MemoryAuditLog())
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.serve)
        with pytest.raises(AuditError, match="unknown or reserved"):
            trail.record("login.failure", {"actor": "alice", "password": "hunter2"})
        nursery.cancel_scope.cancel()


async def test_trail_writes_everything_queued_when_cancelled() -> None:
    sink = MemoryAuditLog()
    trail = AuditTrail(sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.serve)
        for index in range(50):
            trail.submit(_event(index))
        nursery.cancel_scope.cancel()
    assert [r.seq for r in sink.iter_records()] == list(range(1, 51))
    await trail.flush()


async def test_trail_retries_a_failing_sink_then_bounds_its_queue() -> None:
    registry = CollectorRegistry()
    sink = _FailingSink(failures=2)
    trail = AuditTrail(sink, registry=registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.serve)
        trail.submit(_event(0))
        with trio.fail_after(10):
            await trail.flush()
        assert len(list(sink.iter_records())) == 1
        assert _count(registry, "seed_audit_write_failures_total") == 2
        nursery.cancel_scope.cancel()

    stuck = _FailingSink(failures=1_000_000)
    trail = AuditTrail(stuck, registry=(registry := CollectorRegistry()), max_pending=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(trail.serve)
        for index in range(5):
            trail.submit(_event(index))
        assert _count(registry, "seed_audit_events_dropped_total") == 2
        assert _count(registry, "seed_audit_pending_events") == 3
        nursery.cancel_scope.cancel()
    assert _count(registry, "seed_audit_events_dropped_total") == 5  # the last attempt failed too
    with pytest.raises(AuditError, match="not written"):
        await trail.flush()


def test_trail_without_a_writer_task_writes_at_once() -> None:
    sink = MemoryAuditLog()
    trail = AuditTrail(sink)
    trail.record("robot.create", {"actor": "admin", "detail": {"robot": "robot$ci"}})
    assert [r.action for r in sink.iter_records()] == ["robot.create"]
    sink.close()
    with pytest.raises(AuditError):
        trail.record("robot.revoke", {"actor": "admin"})


def test_open_audit_follows_the_config(tmp_path: Path) -> None:
    metrics = SeedMetrics()
    config = SeedConfig(storage=StorageConfig(data=tmp_path), audit=AuditConfig(rotate_bytes=4096))
    trail = open_audit(config, metrics)
    try:
        assert isinstance(trail.sink, FileAuditLog) and trail.sink.directory == audit_directory(tmp_path)
        assert trail.sink.rotate_bytes == 4096
        trail.record("config.reload", {"actor_kind": "system"})
    finally:
        trail.close()
    assert b"seed_audit_events_total" in metrics.render()
    assert verify_audit_log(tmp_path / "audit").records == 1

    disabled = open_audit(SeedConfig(storage=StorageConfig(data=tmp_path / "off"), audit=AuditConfig(enabled=False)))
    disabled.record("config.reload", {"actor_kind": "system"})
    with pytest.raises(AuditError):
        disabled.record("config.reload", {"pass" + "word": "x"})
    assert not (tmp_path / "off").exists()


# -- the command line -----------------------------------------------------------------------------


def test_cli_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _build(tmp_path / "audit", 12)
    assert main(["audit", "verify", "--data", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "audit log OK: 12 record(s), seq 1..12" in out and "head: seq 12 hash " in out

    live = tmp_path / "audit" / LIVE_NAME
    with live.open("ab") as handle:
        handle.write(b'{"action":"login.su')
    assert main(["audit", "verify", "--data", str(tmp_path)]) == 0
    assert "truncated tail: audit.log line 13" in capsys.readouterr().out

    _rewrite(live, _edit(_lines(live)))
    assert main(["audit", "verify", "--data", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED verification: audit.log line 5: record does not match its hash" in out

    assert main(["audit", "verify", "--data", str(tmp_path / "nowhere")]) == 2
    assert "no audit log" in capsys.readouterr().err


def test_cli_query(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "audit"
    _build(directory, 6, when=NOW - timedelta(days=3))
    with FileAuditLog(directory) as audit_log:
        audit_log.append(make_event("login.failure", {"actor": "user1", "source": "10.0.0.9"}))
        audit_log.append(make_event("tag.move", {"actor": "user1", "repository": "team/app1", "reference": "v1",
                                                 "old_digest": "sha256:" + "a" * 64,
                                                 "new_digest": "sha256:" + "b" * 64}))

    def query(*flags: str) -> list[dict[str, Any]]:
        assert main(["audit", "query", "--data", str(tmp_path), *flags]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert [r["seq"] for r in query()] == list(range(1, 9))
    assert [r["seq"] for r in query("--actor", "user1")] == [2, 5, 7, 8]
    assert [r["seq"] for r in query("--repository", "team/app1")] == [2, 4, 6, 8]
    assert [r["seq"] for r in query("--action", "login.*")] == [7]
    assert [r["seq"] for r in query("--since", "1h")] == [7, 8]
    since = format_time(NOW - timedelta(days=3) + timedelta(seconds=4)).replace(".000000Z", "+00:00")
    assert [r["seq"] for r in query("--since", since, "--action", "manifest.push")] == [5, 6]
    move = query("--action", "tag.move", "--actor", "user1")[0]
    assert (move["old_digest"], move["new_digest"]) == ("sha256:" + "a" * 64, "sha256:" + "b" * 64)
    with pytest.raises(SystemExit):
        main(["audit", "query", "--data", str(tmp_path), "--since", "last tuesday"])


def test_cli_prune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "audit"
    _old_and_new(directory, datetime.now(UTC))  # --before 30d is counted from the real clock
    with FileAuditLog(directory):
        assert main(["audit", "prune", "--data", str(tmp_path), "--before", "30d"]) == 2
        assert "already open" in capsys.readouterr().err
    assert main(["audit", "prune", "--data", str(tmp_path), "--before", "30d", "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out
    assert main(["audit", "prune", "--data", str(tmp_path), "--before", "30d"]) == 0
    out = capsys.readouterr().out
    assert "removed audit-000000000001.log" in out and "history now starts at seq" in out
    assert main(["audit", "verify", "--data", str(tmp_path)]) == 0
    assert [r["actor"] for r in map(json.loads, _all_stored_lines(directory)) if r["action"] == "audit.pruned"] == [
        f"cli:uid={os.getuid()}"]
