"""``seed`` command line: ``serve``, ``gc``, ``robot``, ``keys``, ``audit``, ``vulndb``/``scan``, ``webhooks``."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import trio

from p2pd.lifecycle import reload_on_signal, shutdown_on_signals
from p2pd.logformat import add_logging_arguments, configure_logging
from p2pd.progress import show_progress
from p2pd.sdnotify import notify

from .audit import AuditError, add_audit_parser, record_offline, run_audit_command
from .auth.keys_cli import add_keys_parser, run_keys_command
from .auth.robots import add_robot_parser, run_robot_cli
from .auth.setup import robot_store_path
from .config import ConfigError, SeedConfig, load_config
from .events import add_webhooks_parser, run_webhooks_command
from .registry import serve_seed
from .scan.cli import SCAN_COMMANDS, add_scan_parsers, run_scan_command
from .storage import Storage

__all__ = ["main"]

log = logging.getLogger("seed")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seed", description="The p2pd seed: a complete OCI registry.")
    add_logging_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the registry")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:5000)")
    serve.add_argument("--data", type=Path, help="data directory")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--upload-rate", type=int, metavar="BYTES_PER_S",
                       help="bytes/s the blob downloads in progress share, each paced at its part (server.upload_rate)")
    serve.add_argument("--congestion-control", metavar="NAME",
                       help="TCP congestion control of the connections it accepts ('' for the host's default; "
                            "server.congestion_control)")
    serve.add_argument("--open", action="store_true",
                       help="serve without access control even on a non-loopback address (anyone can push)")

    gc = commands.add_parser("gc", help="remove blobs that no manifest references")
    gc.add_argument("--data", type=Path, help="data directory")
    gc.add_argument("--config", type=Path, help="TOML configuration file")
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    gc.add_argument("--grace", type=float, help="keep unreferenced blobs younger than this many seconds")
    add_robot_parser(commands)
    add_keys_parser(commands)
    add_audit_parser(commands)
    add_scan_parsers(commands)
    add_webhooks_parser(commands)
    return parser


async def _serve(config: SeedConfig, notify_socket: str | None = None, overrides: dict[str, Any] | None = None) -> None:
    """Runs the seed until SIGTERM/SIGINT; tells systemd (``Type=notify``) when it is ready and when it stops.

    SIGHUP re-reads the configuration (``overrides``: the command-line values) and applies it.
    """
    overrides = overrides or {}
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(shutdown_on_signals, shutdown, notify_socket)
        info, registry = await nursery.start(partial(serve_seed, config, shutdown=shutdown))

        async def reload() -> None:
            # The certificate first and on its own: a renewal must not wait for a valid rule file.
            await registry.reload_tls()
            # The same file and flags as at start; only what can change at run time is applied.
            fresh = await trio.to_thread.run_sync(partial(load_config, config.source, **overrides))
            await registry.reload(fresh)
            log.info("configuration reloaded from %s", config.source)

        reloading = trio.CancelScope()

        async def reload_until_shutdown(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with reloading:
                await reload_on_signal(reload, task_status=task_status)

        await nursery.start(reload_until_shutdown)
        log.info("seed listening on %s, data in %s", info.url, config.storage.data)
        print(f"seed listening on {info.url}", flush=True)
        notify(f"READY=1\nSTATUS=serving on {info.url}", notify_socket)
        await shutdown.wait()
        reloading.cancel()  # the registry finishes its graceful shutdown on its own
    log.info("seed stopped")


def _gc(config: SeedConfig, dry_run: bool, grace: float | None) -> int:
    storage = Storage(config.storage.data, chunk_size=config.storage.chunk_size, clean_tmp=False)
    with show_progress("sweeping blobs", label="blob directories") as progress:
        report = storage.collect_garbage(dry_run=dry_run, grace=config.storage.gc_grace if grace is None else grace,
                                         progress=progress)
    verb = "would remove" if dry_run else "removed"
    for digest in report.removed_blobs:
        print(f"{verb} {digest}")
    print(f"{verb} {len(report.removed_blobs)} blobs ({report.removed_bytes} bytes), kept {report.kept_blobs}")
    if report.removed_signatures:
        print(f"{verb} the signatures of {report.removed_signatures} manifests that are gone")
    return 0


def _operator() -> str:
    """The OS user running this command, for the audit log."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        return f"uid={os.getuid()}"


def _audit_offline(config: SeedConfig, failures: list[str], action: str, fields: Mapping[str, Any]) -> None:
    """Audit events of maintenance commands: into the log, or its inbox while the seed runs.

    The command's change is already on disk when this runs: a failure is reported (and makes
    the exit status 1) without hiding what was done, e.g. a new robot's secret.
    """
    if not config.audit.enabled:
        return
    try:
        # The robot fields (robot, access, expires_at, description) are not AuditEvent fields.
        record_offline(config.storage.data, action, {"actor": _operator(), "actor_kind": "operator",
                                                     "detail": dict(fields)}, rotate_bytes=config.audit.rotate_bytes)
    except AuditError as exc:
        log.error("the %s event could not be recorded in the audit log: %s", action, exc)
        failures.append(action)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        if args.command == "serve":
            overrides = {"listen": args.listen, "data": args.data, "open": args.open, "serving": True,
                         "upload_rate": args.upload_rate, "congestion_control": args.congestion_control}
            config = load_config(args.config, **overrides)
            try:
                trio.run(_serve, config, os.environ.get("NOTIFY_SOCKET"), overrides)
            except* ConfigError as group:
                # A refusal at start-up (a certificate or htpasswd file that does not load) leaves
                # the nursery as a group: report it like any other configuration error.
                first: BaseException = group
                while isinstance(first, BaseExceptionGroup):  # nurseries inside nurseries nest groups
                    first = first.exceptions[0]
                raise first from None
            return 0
        if args.command in SCAN_COMMANDS:
            return run_scan_command(args)  # reads [storage] and [scan] itself: works beside a running seed
        config = load_config(args.config, data=args.data)
        if args.command == "robot":
            unrecorded: list[str] = []
            status = run_robot_cli(args, robot_store_path(config.storage.data),
                                   on_event=partial(_audit_offline, config, unrecorded))
            if unrecorded:
                print(f"seed: done, but not recorded in the audit log: {', '.join(unrecorded)}", file=sys.stderr)
                return status or 1
            return status
        if args.command == "keys":
            return run_keys_command(args, config)
        if args.command == "audit":
            return run_audit_command(args, config.storage.data, rotate_bytes=config.audit.rotate_bytes)
        if args.command == "webhooks":
            return run_webhooks_command(args, config.storage.data, config.webhooks)
        return _gc(config, args.dry_run, args.grace)
    except ConfigError as exc:
        print(f"seed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
