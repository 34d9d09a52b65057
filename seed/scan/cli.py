"""``seed vulndb import|status`` and ``seed scan``: the scanner from the command line.

These read the TOML file themselves (``[storage] data``, ``[scan]``) so they work beside a
running seed: ``seed vulndb import`` replaces the database atomically and the running
seed notices it on its next database check and re-matches the affected reports.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

from p2pd.errors import ConfigError
from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE
from p2pd.oci.digest import Digest
from p2pd.oci.errors import OCIError
from p2pd.oci.grammar import is_valid_name
from p2pd.progress import show_progress
from p2pd.tomlconfig import read_toml
from seed.storage import Storage

from .config import SEVERITIES, from_toml, severity_rank
from .errors import ScanError, VulnDBError
from .scanner import ScanReport, scan_image
from .vulndb import VulnDatabase, import_database

__all__ = ["SCAN_COMMANDS", "add_scan_parsers", "parse_reference", "run_scan_command"]

SCAN_COMMANDS = frozenset({"vulndb", "scan"})
_DEFAULT_DATA = Path("/var/lib/seed")
_PROGRESS_THRESHOLD = 32 * 1024 * 1024  # compressed bytes: smaller scans finish before a bar helps


def add_scan_parsers(commands: Any) -> None:
    """Adds ``vulndb`` and ``scan`` to the ``seed`` subcommands."""
    vulndb = commands.add_parser("vulndb", help="the offline vulnerability database")
    actions = vulndb.add_subparsers(dest="vulndb_command", required=True)
    importer = actions.add_parser("import", help="import OSV advisories (a directory of JSON files or a zip)")
    importer.add_argument("path", type=Path, help="directory of OSV JSON files, or a zip such as OSV's all.zip")
    importer.add_argument("--strict", action="store_true", help="fail on the first invalid record")
    status = actions.add_parser("status", help="what is loaded and how old it is")
    status.add_argument("--format", choices=("table", "json"), default="table")
    for sub in (importer, status):
        sub.add_argument("--data", type=Path, help="data directory")
        sub.add_argument("--config", type=Path, help="TOML configuration file")

    scan = commands.add_parser("scan", help="scan an image stored in the seed's data directory")
    scan.add_argument("reference", help="repo:tag or repo@sha256:...")
    scan.add_argument("--data", type=Path, help="data directory")
    scan.add_argument("--config", type=Path, help="TOML configuration file")
    scan.add_argument("--format", choices=("table", "json"), default="table")
    scan.add_argument("--fail-on", choices=SEVERITIES[2:], help="exit 3 if a finding is at or above this severity")
    scan.add_argument("--no-progress", action="store_true", help="no progress bar")
    scan.add_argument("--url", help="ask a running seed (https://seed.example:5000) instead of reading --data")
    scan.add_argument("--user", help="login for --url; the password is read from stdin (or SEED_PASSWORD)")
    scan.add_argument("--ca-file", type=Path, help="CA certificate that signed the seed's certificate (--url)")
    scan.add_argument("--wait", type=float, default=300.0, help="with --url: seconds to wait for a pending scan")


def parse_reference(reference: str) -> tuple[str, str]:
    """``repo@sha256:...`` → (repo, digest); ``repo:tag`` → (repo, tag); ``repo`` → (repo, "latest").

    Raises:
        ValueError: the repository name or the digest is invalid.
    """
    if "@" in reference:
        name, _, digest = reference.partition("@")
        Digest.parse(digest)
        target = digest
    else:
        name, colon, tag = reference.rpartition(":")
        if not colon or "/" in tag:
            name, target = reference, "latest"
        else:
            target = tag
    if not is_valid_name(name):
        raise ValueError(f"invalid repository name {name!r}")
    return name, target


def run_scan_command(args: argparse.Namespace) -> int:
    """Runs ``seed vulndb ...`` or ``seed scan ...``; returns the exit code."""
    try:
        document = read_toml(args.config)
        settings = from_toml(document)
        storage_table = document.get("storage", {}) if isinstance(document.get("storage"), dict) else {}
        data = args.data or Path(storage_table.get("data", _DEFAULT_DATA))
        if args.command == "vulndb" and args.vulndb_command == "import":
            return _import(data, args.path, args.strict)
        if args.command == "vulndb":
            return _status(data, args.format)
        if args.url:
            return _scan_remote(args)
        chunk_size = int(storage_table.get("chunk_size", DEFAULT_CHUNK_SIZE))
        return _scan(data, chunk_size, args, settings.scan.limits)
    except ConfigError as exc:
        print(f"seed: {exc}", file=sys.stderr)
        return 2
    except (ScanError, OCIError, ValueError) as exc:
        print(f"seed: {exc}", file=sys.stderr)
        return 1


def _import(data: Path, source: Path, strict: bool) -> int:
    started = time.monotonic()
    try:
        with show_progress(f"importing {source.name}", label="files") as progress:
            result = import_database(data, source, strict=strict, progress=progress)
    except VulnDBError as exc:
        print(f"seed vulndb import: {exc} (the previous database, if any, stays in use)", file=sys.stderr)
        return 1
    print(f"imported {result.advisories} advisories from {source} in {time.monotonic() - started:.1f}s "
          f"({result.withdrawn} withdrawn skipped, {result.invalid} invalid skipped)")
    for example in result.invalid_examples:
        print(f"  invalid: {example}")
    for ecosystem, count in sorted(result.per_ecosystem.items()):
        print(f"  {ecosystem}: {count}")
    if result.changed_packages is not None:
        print(f"{len(result.changed_packages)} packages have new or changed advisories since the previous import")
    return 0


def _human_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} seconds"
    if seconds < 7200:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} hours"
    return f"{seconds / 86400:.0f} days"


def _status(data: Path, output: str) -> int:
    try:
        status = VulnDatabase.for_data_dir(data).status()
    except VulnDBError as exc:
        print(f"seed vulndb status: {exc}", file=sys.stderr)
        return 1
    if output == "json":
        print(json.dumps(status.to_json(), indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    imported = datetime.datetime.fromtimestamp(status.imported_at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    console.print(f"database   {status.path}")
    console.print(f"imported   {imported} ({_human_age(status.age())} ago) from {status.source}")
    console.print(f"advisories {status.advisories} ({status.withdrawn} withdrawn and {status.invalid} invalid "
                  "records skipped)")
    table = Table("ecosystem", "advisories")
    for ecosystem, count in sorted(status.per_ecosystem.items()):
        table.add_row(ecosystem, str(count))
    console.print(table)
    return 0


def _scan(data: Path, chunk_size: int, args: argparse.Namespace, limits: Any) -> int:
    repository, target = parse_reference(args.reference)
    storage = Storage(data, chunk_size=chunk_size, clean_tmp=False)
    digest = storage.resolve(repository, target)
    database = VulnDatabase.for_data_dir(data)
    total = _layer_bytes(storage, repository, digest)
    if not args.no_progress and total >= _PROGRESS_THRESHOLD:
        with show_progress(f"scanning {repository}@{str(digest)[:19]}", unit="bytes") as progress:
            progress.start(total)
            report = scan_image(storage, repository, digest, database=database if database.exists() else None,
                                limits=limits, progress=progress.advance)
    else:
        report = scan_image(storage, repository, digest, database=database if database.exists() else None,
                            limits=limits)
    if args.format == "json":
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        _print_table(report)
    if args.fail_on and any(severity_rank(f.severity) >= severity_rank(args.fail_on) for _, f in report.findings):
        return 3
    return 0


def _scan_remote(args: argparse.Namespace) -> int:
    """``seed scan --url``: the report of a running seed (``GET /v2/<name>/scan/<ref>``), waiting
    (bounded by ``--wait``) while its scan is pending. The password never goes on the command line."""
    import os

    import httpx
    from rich.console import Console

    repository, target = parse_reference(args.reference)
    auth = None
    if args.user:
        password = os.environ.get("SEED_PASSWORD")
        if password is None:
            password = sys.stdin.readline().rstrip("\n")
        auth = (args.user, password)
    verify: Any = True
    if args.ca_file is not None:
        import ssl

        verify = ssl.create_default_context(cafile=str(args.ca_file))
    url = f"{args.url.rstrip('/')}/v2/{repository}/scan/{target}"
    console = Console(stderr=True)
    deadline = time.monotonic() + args.wait
    with httpx.Client(auth=auth, verify=verify, timeout=30, follow_redirects=False) as client, \
            console.status(f"waiting for the scan of {repository}:{target}", spinner="dots") as status:
        while True:
            try:
                response = client.get(url)
            except httpx.HTTPError as exc:
                raise ScanError(f"cannot reach {args.url}: {exc}") from None
            if response.status_code == 200:
                break
            if response.status_code != 202:
                raise ScanError(f"{url}: HTTP {response.status_code} {response.text[:300]}")
            if time.monotonic() > deadline:
                raise ScanError(f"the scan of {repository}:{target} is still {response.json().get('state')} "
                                f"after {args.wait:.0f}s")
            status.update(f"scan of {repository}:{target}: {response.json().get('state', 'pending')}")
            time.sleep(1.0)
    try:
        report = ScanReport.from_json(response.json())
    except (ValueError, KeyError, TypeError) as exc:
        raise ScanError(f"{url}: not a scan report ({exc})") from None
    if args.format == "json":
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        _print_table(report)
    if args.fail_on and any(severity_rank(f.severity) >= severity_rank(args.fail_on) for _, f in report.findings):
        return 3
    return 0


def _layer_bytes(storage: Storage, repository: str, digest: Digest) -> int:
    """Compressed bytes of all layers of a manifest (and of an index's platforms)."""
    total = 0
    pending: list[Digest] = [digest]
    seen: set[Digest] = set()
    while pending and len(seen) < 256:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            _stored, body = storage.get_manifest(repository, str(current))
            document = json.loads(body)
        except (OCIError, ValueError):
            continue
        if not isinstance(document, dict):
            continue
        for layer in document.get("layers", []) or []:
            if isinstance(layer, dict) and isinstance(layer.get("size"), int):
                total += layer["size"]
        for entry in document.get("manifests", []) or []:
            if isinstance(entry, dict):
                try:
                    pending.append(Digest.parse(str(entry.get("digest"))))
                except OCIError:
                    continue
    return total


_SEVERITY_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan", "none": "dim",
                   "unknown": "dim"}


def _print_table(report: ScanReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped or redirected: whole ids and versions, no ellipses
    console.print(f"[bold]{report.repository}@{report.digest}[/] — {report.status}, scanned in "
                  f"{report.duration:.2f}s")
    for platform in report.platforms:
        distro = f"{platform.distro.pretty_name or platform.distro.id}" if platform.distro else "unknown distribution"
        console.print(f"  {platform.platform or 'image'} {platform.manifest_digest[:19]}: {distro}, "
                      f"{len(platform.packages)} packages, {len(platform.findings)} findings")
    if report.database is not None:
        imported = datetime.datetime.fromtimestamp(report.database["imported_at"], datetime.UTC)
        console.print(f"  database imported {imported:%Y-%m-%d %H:%M} UTC ({report.database['advisories']} advisories)")
    for note in report.notes:
        console.print(f"  [dim]{note}[/]")
    counts = report.severity_counts()
    console.print("  " + ", ".join(f"{severity}: {counts[severity]}" for severity in reversed(SEVERITIES)))
    multi = len(report.platforms) > 1
    if report.findings:
        columns = ["severity", "id", "package", "installed", "fixed", "layer"] + (["platform"] if multi else [])
        table = Table(*columns)
        for platform, finding in report.findings:
            row = [f"[{_SEVERITY_STYLE.get(finding.severity, '')}]{finding.severity}[/]", finding.id,
                   finding.package, finding.installed_version, finding.fixed_version or "-",
                   finding.layer.partition(":")[2][:12]]
            table.add_row(*row, *([platform.platform or "-"] if multi else []))
        console.print(table)
    if report.problems:
        problems = Table("problem", "layer", "path", "detail")
        for problem in report.problems:
            problems.add_row(problem.kind + (" (layer rejected)" if problem.fatal else ""),
                             (problem.layer or "-").partition(":")[2][:12] or "-", problem.path or "-",
                             problem.message)
        console.print(problems)
