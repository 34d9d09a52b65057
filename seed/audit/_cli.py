"""``seed audit verify | query | prune``: the audit log from the command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from p2pd.progress import show_progress

from ..errors import AuditError
from ._chain import canonical
from ._event import parse_time
from ._file import DEFAULT_ROTATE_BYTES, FileAuditLog, iter_directory_records
from ._layout import INBOX_DIR, audit_directory, list_inbox
from ._sink import AuditQuery
from ._verify import verify_audit_log

__all__ = ["add_audit_parser", "run_audit_command"]


def add_audit_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``audit`` with its subcommands to the ``seed`` parser's subcommands."""
    audit = commands.add_parser("audit", help="verify, search or prune the audit log (DATA/audit)")
    actions = audit.add_subparsers(dest="audit_command", required=True)
    verify = actions.add_parser("verify", help="check the hash chain; exit 1 naming the first bad line")
    query = actions.add_parser("query", help="print matching events as JSON lines, oldest first")
    query.add_argument("--actor", help="exact actor name")
    query.add_argument("--repository", help="repository name or glob (team-a/*)")
    query.add_argument("--action", help="action or glob (login.*)")
    query.add_argument("--since", type=_time_argument, help="ISO-8601 time (UTC if no offset) or an age: 30m, 1h, 7d")
    prune = actions.add_parser("prune", help="remove rotated files older than --before, recorded in the chain "
                                             "(the seed must be stopped)")
    prune.add_argument("--before", type=_time_argument, required=True,
                       help="ISO-8601 time or an age (90d): files whose newest record is older go")
    prune.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    for parser in (verify, query, prune):
        parser.add_argument("--data", type=Path, help="data directory (the log is in DATA/audit)")
        parser.add_argument("--config", type=Path, help="TOML configuration file")


def run_audit_command(args: argparse.Namespace, data: Path, *, rotate_bytes: int = DEFAULT_ROTATE_BYTES) -> int:
    """Runs ``seed audit <command>`` on the log of data directory ``data``; returns the exit code
    (0 fine, 1 the log does not verify, 2 the log cannot be read or used)."""
    directory = audit_directory(data)
    try:
        if args.audit_command == "verify":
            return _verify(directory)
        if args.audit_command == "query":
            return _query(directory, AuditQuery(actor=args.actor, repository=args.repository, action=args.action,
                                                since=args.since))
        return _prune(directory, args, rotate_bytes)
    except AuditError as exc:
        print(f"seed audit: {exc}", file=sys.stderr)
        return 2


def _time_argument(text: str) -> object:
    try:
        return parse_time(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time or an age like 1h or 7d: {text!r}") from None


def _verify(directory: Path) -> int:
    with show_progress("verifying the audit log", unit="bytes") as progress:
        report = verify_audit_log(directory, progress)
    for note in report.notes:
        print(f"note: {note}")
    if report.truncated_tail is not None:
        print(f"note: truncated tail: {report.truncated_tail}")
    if not report.ok:
        print(f"audit log FAILED verification: {report.problem}")
        print(f"{report.records} record(s) verified before it (up to seq {report.head_seq})")
        return 1
    if report.first_seq is None:
        print(f"audit log OK: empty ({directory})")
    else:
        print(f"audit log OK: {report.records} record(s), seq {report.first_seq}..{report.head_seq} "
              f"in {len(report.files)} file(s)")
        print(f"head: seq {report.head_seq} hash {report.head_hash}")
    return 0


def _query(directory: Path, query: AuditQuery) -> int:
    if not directory.is_dir():
        raise AuditError(f"no audit log at {directory}")
    try:
        for record in iter_directory_records(directory):
            if query.matches(record):
                sys.stdout.write(canonical(record.to_dict()).decode("ascii") + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # `seed audit query | head`: the reader has what it wanted.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    pending = len(list_inbox(directory))
    if pending:
        print(f"note: {pending} event(s) of command-line tools wait in {directory / INBOX_DIR} and are not "
              "shown: the running seed moves them into the log within seconds", file=sys.stderr)
    return 0


def _prune(directory: Path, args: argparse.Namespace, rotate_bytes: int) -> int:
    if not directory.is_dir():
        raise AuditError(f"no audit log at {directory}")
    with FileAuditLog(directory, rotate_bytes=rotate_bytes) as audit_log:
        report = audit_log.prune(args.before, actor=f"cli:uid={os.getuid()}", dry_run=args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    for name in report.removed:
        print(f"{verb} {name}")
    if report.first_seq is None:
        print("nothing to prune")
    else:
        print(f"{verb} {len(report.removed)} file(s), {report.records} record(s); "
              f"history {'would start' if report.dry_run else 'now starts'} at seq {report.first_seq}")
    return 0
