"""The seed's tamper-evident audit log: one append-only, hash-chained JSON line per
security-relevant event (logins, tokens, pushes, tag moves, deletes, denials, robots, reloads).

Wiring (composition root)::

    trail = await trio.to_thread.run_sync(open_audit, config, metrics)   # FileAuditLog in DATA/audit,
                                                              # seed_audit_events_total{action} in metrics
    await nursery.start(trail.serve)                          # the writer task (fsync off the loop)
    gate = Gate(..., audit=trail)                             # the trail is the AuditHook (trail.record)
    ...
    trail.close()                                             # after the nursery is done

A record (one line, canonical JSON: sorted keys, compact, ASCII)::

    {"action":"tag.move","actor":"alice","actor_kind":"user","hash":"<hex>","new_digest":"sha256:...",
     "old_digest":"sha256:...","prev":"<hex of the record before>","reference":"latest",
     "repository":"team/app","seq":42,"source":"10.0.0.7","time":"2025-12-03T05:44:00.123456Z"}

Where things are: ``_event`` (the values and the secret guard), ``_chain`` (canonical JSON,
sealing, checking: pure), ``_sink`` (the ``AuditSink`` seam and the in-memory fake),
``_layout`` (the files of ``DATA/audit``), ``_file`` (the file sink: locking, crash repair,
rotation, pruning), ``_verify`` (what an auditor can rely on), ``_inbox`` (events of
command-line tools such as ``seed robot create``, queued in ``DATA/audit/inbox`` while the seed
holds the log: ``record_offline``), ``_trail`` (the hook and the writer task), ``_cli``
(``seed audit verify | query | prune``).
"""

from ..errors import AuditError as AuditError
from ._chain import GENESIS_HASH as GENESIS_HASH
from ._chain import canonical as canonical
from ._chain import check_lines as check_lines
from ._chain import record_from_line as record_from_line
from ._cli import add_audit_parser as add_audit_parser
from ._cli import run_audit_command as run_audit_command
from ._event import ACTIONS as ACTIONS
from ._event import REDACTED as REDACTED
from ._event import AuditEvent as AuditEvent
from ._event import AuditRecord as AuditRecord
from ._event import format_time as format_time
from ._event import make_event as make_event
from ._event import parse_time as parse_time
from ._file import DEFAULT_ROTATE_BYTES as DEFAULT_ROTATE_BYTES
from ._file import AuditLogInUse as AuditLogInUse
from ._file import FileAuditLog as FileAuditLog
from ._file import PruneReport as PruneReport
from ._file import iter_directory_records as iter_directory_records
from ._inbox import AuditInbox as AuditInbox
from ._inbox import record_offline as record_offline
from ._layout import LIVE_NAME as LIVE_NAME
from ._layout import audit_directory as audit_directory
from ._layout import rotated_name as rotated_name
from ._sink import AuditQuery as AuditQuery
from ._sink import AuditSink as AuditSink
from ._sink import MemoryAuditLog as MemoryAuditLog
from ._trail import AuditMetrics as AuditMetrics
from ._trail import AuditTrail as AuditTrail
from ._trail import open_audit as open_audit
from ._verify import VerifyProblem as VerifyProblem
from ._verify import VerifyReport as VerifyReport
from ._verify import verify_audit_log as verify_audit_log

__all__ = [
    "ACTIONS",
    "DEFAULT_ROTATE_BYTES",
    "GENESIS_HASH",
    "LIVE_NAME",
    "REDACTED",
    "AuditError",
    "AuditEvent",
    "AuditInbox",
    "AuditLogInUse",
    "AuditMetrics",
    "AuditQuery",
    "AuditRecord",
    "AuditSink",
    "AuditTrail",
    "FileAuditLog",
    "MemoryAuditLog",
    "PruneReport",
    "VerifyProblem",
    "VerifyReport",
    "add_audit_parser",
    "audit_directory",
    "canonical",
    "check_lines",
    "format_time",
    "iter_directory_records",
    "make_event",
    "open_audit",
    "parse_time",
    "record_from_line",
    "record_offline",
    "rotated_name",
    "run_audit_command",
    "verify_audit_log",
]
