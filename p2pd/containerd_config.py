"""``p2pd containerd-config``: point containerd at the local p2pd through ``hosts.toml`` files.

containerd (1.6+, ``config_path`` in the CRI registry section, or ``ctr --hosts-dir``) reads
``<hosts-dir>/<registry>/hosts.toml`` on every pull: it tries each ``[host."URL"]`` in file order, then
``server``. Putting p2pd first with ``capabilities = ["pull", "resolve"]`` makes it the mirror; when p2pd cannot
serve (404, 5xx, connection refused) containerd moves on to the next host and finally to ``server``.

Rules/invariants:

* Existing files are merged, never clobbered: ``server``, every other host and all their settings (``ca``,
  ``client``, ``skip_verify``, ``header``, ``capabilities``, ``override_path`` and keys we do not know) are kept.
  p2pd's entry is moved to the front and appears once. ``capabilities`` and ``dial_timeout`` of p2pd's entry are
  owned by this tool; its other settings are kept.
* ``server`` of an existing file is kept unless ``NS=UPSTREAM`` names one explicitly.
* A file is only rewritten when its parsed content differs from what we want, so running the tool twice changes
  nothing the second time and hand-written comments survive as long as nothing needs to change. Comments are
  lost when a file is rewritten (tomllib does not keep them); the backup ``hosts.toml.bak.<UTC time>`` has them.
* Everything up to :func:`plan_file` is pure (text in, text out); :func:`apply_change` is the only writer.

containerd 1.6.20 facts this module relies on (containerd ``remotes/docker/config/hosts.go``, verified with the
real binaries by tests/test_containerd_config.py):

* Hosts are ordered by the line of their ``[host."URL"]`` header, so every host gets an explicit header.
* ``_default/hosts.toml`` applies to every registry without its own directory. Without ``server`` the registry
  host itself is the last host (``docker.io`` → ``https://registry-1.docker.io``, others ``https://NAME``).
* ``host:port`` is looked up as ``<host>_<port>_`` first, then ``<host>:<port>``: an existing ``host_port_``
  directory wins, so we edit that one.
* A directory without ``hosts.toml`` configures the registry from Docker-style ``*.crt``/``*.cert``+``*.key``
  files; once ``hosts.toml`` exists they are ignored. New files therefore carry them over as ``ca``/``client``.
* ``dial_timeout`` is only understood by containerd 1.7+. 1.6 ignores unknown keys, so writing it is harmless
  there (a refused connection on loopback fails at once anyway).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError
from .fsutil import write_atomic
from .tomlwrite import toml_key, toml_value

__all__ = [
    "DEFAULT_DIAL_TIMEOUT",
    "DEFAULT_NAMESPACE",
    "MIRROR_CAPABILITIES",
    "FileChange",
    "HostsFile",
    "Target",
    "add_arguments",
    "apply_change",
    "default_server",
    "docker_cert_settings",
    "host_dir",
    "merge",
    "parse_hosts_toml",
    "parse_target",
    "plan_file",
    "render_hosts_toml",
    "run",
]

DEFAULT_NAMESPACE = "_default"
DEFAULT_DIAL_TIMEOUT = "200ms"  # what Spegel uses; only containerd 1.7+ applies it
MIRROR_CAPABILITIES = ("pull", "resolve")
_OWNED_KEYS = ("capabilities", "dial_timeout")  # keys of p2pd's own entry that this tool decides

_NAMESPACE_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)(:[0-9]{1,5})?$")
_GO_DURATION_RE = re.compile(r"^([0-9]+(\.[0-9]*)?(ns|us|µs|ms|s|m|h))+$")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class HostsFile:
    """The content of one ``hosts.toml``.

    Attributes:
        server: the upstream tried last; ``None`` means containerd's default for the registry name.
        settings: the other top-level keys (they configure ``server``: ``ca``, ``skip_verify``, ``header``, ...).
        hosts: ``(url, settings)`` of every ``[host."URL"]`` table, in the order containerd tries them.
    """

    server: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    hosts: tuple[tuple[str, Mapping[str, Any]], ...] = ()


@dataclass(frozen=True)
class Target:
    """One registry to configure: ``namespace`` is the directory name (``docker.io``, ``seed:5000``, ``_default``);
    ``upstream`` is the explicit ``server`` URL from ``NS=UPSTREAM`` (``None``: keep or derive it)."""

    namespace: str
    upstream: str | None = None


@dataclass(frozen=True)
class FileChange:
    """What :func:`plan_file` decided for one file; ``content`` is ``None`` when nothing changes."""

    path: Path
    existed: bool
    content: str | None
    rendered: str  # the file as it is (unchanged) or will be


# --------------------------------------------------------------------------- validation


def parse_target(value: str) -> Target:
    """``NS`` or ``NS=UPSTREAM`` from ``--registry``.

    Raises:
        ConfigError: the name is not a registry host (``name[:port]``) or the URL is not http(s).
    """
    namespace, sep, upstream = value.partition("=")
    namespace = namespace.strip()
    if namespace != DEFAULT_NAMESPACE and not _NAMESPACE_RE.match(namespace):
        raise ConfigError(f"--registry takes a registry host such as docker.io or seed.example:5000, got {value!r}")
    if not sep:
        return Target(namespace)
    return Target(namespace, _checked_url(upstream.strip(), "upstream"))


def _checked_url(url: str, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{what} must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


def _checked_duration(value: str) -> str:
    if value and not _GO_DURATION_RE.match(value):
        raise ConfigError(f"--dial-timeout takes a Go duration such as 200ms or 1s, got {value!r}")
    return value


def _same_url(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme.lower(), pa.netloc.lower(), pa.path.rstrip("/")) == (
        pb.scheme.lower(),
        pb.netloc.lower(),
        pb.path.rstrip("/"),
    )


def default_server(namespace: str) -> str | None:
    """The ``server`` written for a new file: what containerd would use for ``namespace`` anyway.

    ``docker.io`` is served by ``registry-1.docker.io``; ``_default`` has no single server (containerd uses the
    name from each image reference).
    """
    if namespace == DEFAULT_NAMESPACE:
        return None
    if namespace == "docker.io":
        return "https://registry-1.docker.io"
    return f"https://{namespace}"


# --------------------------------------------------------------------------- parse


def parse_hosts_toml(text: str) -> HostsFile:
    """Parses a ``hosts.toml`` into a :class:`HostsFile`, keeping every key and the order of the hosts.

    Raises:
        ConfigError: invalid TOML, or ``server``/``host`` of the wrong type.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}") from exc
    server = document.pop("server", None)
    if server is not None and not isinstance(server, str):
        raise ConfigError("'server' must be a string")
    hosts = document.pop("host", {})
    if not isinstance(hosts, dict) or not all(isinstance(v, dict) for v in hosts.values()):
        raise ConfigError("'host' must hold [host.\"URL\"] tables")
    # tomllib keeps tables in the order they first appear, which is the order containerd sorts them by.
    return HostsFile(server=server or None, settings=document, hosts=tuple(hosts.items()))


def docker_cert_settings(file_names: Sequence[str]) -> dict[str, Any]:
    """``ca``/``client`` equivalent to the Docker-style certificate files containerd reads without hosts.toml.

    Args:
        file_names: names of the regular files in the registry's directory.

    Returns:
        ``{"ca": [...*.crt], "client": [[X.cert, X.key], ...]}`` with relative names (containerd resolves them
        against the directory), or fewer keys when there are no such files. A ``.cert`` without a ``.key`` is
        written as a plain string (containerd then reads the key from the same file); mixing both forms in one
        array is avoided because TOML parsers before 1.0 reject mixed arrays.
    """
    names = set(file_names)
    settings: dict[str, Any] = {}
    ca = sorted(n for n in names if n.endswith(".crt"))
    if ca:
        settings["ca"] = ca
    certs = sorted(n for n in names if n.endswith(".cert"))
    pairs = [[c, c[: -len(".cert")] + ".key"] for c in certs if c[: -len(".cert")] + ".key" in names]
    singles = [c for c in certs if c[: -len(".cert")] + ".key" not in names]
    if pairs:
        settings["client"] = pairs
    elif singles:
        settings["client"] = singles
    return settings


# --------------------------------------------------------------------------- merge


def merge(
    existing: HostsFile | None,
    target: Target,
    endpoint: str,
    *,
    dial_timeout: str = DEFAULT_DIAL_TIMEOUT,
    inherited_settings: Mapping[str, Any] | None = None,
) -> HostsFile:
    """The file we want for ``target``: ``existing`` (if any) with p2pd's ``endpoint`` as the first host.

    Args:
        existing: the parsed current file, or ``None`` when there is none.
        target: the registry, with an optional explicit upstream that replaces ``server``.
        endpoint: p2pd's URL, e.g. ``http://127.0.0.1:5080``.
        dial_timeout: Go duration for p2pd's entry; ``""`` leaves it out.
        inherited_settings: top-level settings for a new file (see :func:`docker_cert_settings`).

    Raises:
        ConfigError: ``endpoint`` is also the file's ``server`` (the fallback would go nowhere).
    """
    if existing is None:
        server = target.upstream or default_server(target.namespace)
        settings: dict[str, Any] = dict(inherited_settings or {})
        old_hosts: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    else:
        server = target.upstream or existing.server
        settings = dict(existing.settings)
        old_hosts = existing.hosts
    if server is not None and _same_url(server, endpoint):
        raise ConfigError(f"{target.namespace}: the p2pd endpoint {endpoint} is also the upstream server")

    ours: dict[str, Any] = {"capabilities": list(MIRROR_CAPABILITIES)}
    if dial_timeout:
        ours["dial_timeout"] = dial_timeout
    others: list[tuple[str, Mapping[str, Any]]] = []
    kept_from_ours: dict[str, Any] = {}
    for url, host_settings in old_hosts:
        if _same_url(url, endpoint):
            for key, value in host_settings.items():  # e.g. a header the operator added for p2pd
                if key not in _OWNED_KEYS:
                    kept_from_ours.setdefault(key, value)
        else:
            others.append((url, host_settings))
    ours.update(kept_from_ours)
    return HostsFile(server=server, settings=settings, hosts=((endpoint, ours), *others))


# --------------------------------------------------------------------------- render


def _render_table(path: list[str], table: Mapping[str, Any], lines: list[str]) -> None:
    """``[path]`` with its plain keys, then its sub-tables as ``[path.key]`` (how containerd's docs write them)."""
    if path:
        if len(path) == 1 and lines:
            lines.append("")
        lines.append("[" + ".".join(toml_key(p) for p in path) + "]")
    indent = "  " if path else ""
    for key, value in table.items():
        if not isinstance(value, Mapping):
            lines.append(f"{indent}{toml_key(key)} = {toml_value(value)}")
    for key, value in table.items():
        if isinstance(value, Mapping):
            _render_table([*path, key], value, lines)


def render_hosts_toml(hosts_file: HostsFile, namespace: str) -> str:
    """The TOML text of ``hosts_file``; ``parse_hosts_toml(render_hosts_toml(f, ns)) == f``."""
    scope = "every registry without its own directory" if namespace == DEFAULT_NAMESPACE else namespace
    last = "server" if hosts_file.server is not None else "the registry named in the image reference"
    lines = [
        f"# Pulls from {scope}: containerd tries each [host] in order, then {last}.",
        "# p2pd comes first and answers 404 when it cannot serve, so containerd falls back to the next host.",
        "# Written by 'p2pd containerd-config'; rerun it rather than editing p2pd's entry by hand.",
    ]
    top: dict[str, Any] = {}
    if hosts_file.server is not None:
        top["server"] = hosts_file.server
    top.update(hosts_file.settings)
    if top:
        body: list[str] = []
        _render_table([], top, body)
        lines.append("")
        lines.extend(body)
    for url, settings in hosts_file.hosts:
        lines.append("")
        _render_table(["host", url], settings, lines)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plan (reads, never writes)


def host_dir(hosts_dir: Path, namespace: str) -> Path:
    """The directory containerd reads for ``namespace``: ``host_port_`` wins over ``host:port`` if it exists."""
    host, sep, port = namespace.rpartition(":")
    if sep and host and not namespace.endswith("]"):
        alternative = hosts_dir / f"{host}_{port}_"
        if alternative.is_dir():
            return alternative
    return hosts_dir / namespace


def plan_file(
    hosts_dir: Path,
    target: Target,
    endpoint: str,
    *,
    dial_timeout: str = DEFAULT_DIAL_TIMEOUT,
) -> FileChange:
    """Reads the current ``hosts.toml`` for ``target`` (if any) and works out the new content.

    Raises:
        ConfigError: the existing file cannot be parsed, or the request makes no sense (see :func:`merge`).
        OSError: the existing file or directory cannot be read.
    """
    directory = host_dir(hosts_dir, target.namespace)
    path = directory / "hosts.toml"
    text = path.read_text(encoding="utf-8") if path.exists() else None
    existing: HostsFile | None = None
    inherited: dict[str, Any] = {}
    if text:  # containerd treats an empty file like a missing one
        try:
            existing = parse_hosts_toml(text)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    elif directory.is_dir():
        inherited = docker_cert_settings([p.name for p in directory.iterdir() if p.is_file()])
    wanted = merge(existing, target, endpoint, dial_timeout=dial_timeout, inherited_settings=inherited)
    if existing is not None and wanted == existing:
        assert text is not None
        return FileChange(path=path, existed=True, content=None, rendered=text)
    rendered = render_hosts_toml(wanted, target.namespace)
    return FileChange(path=path, existed=text is not None, content=rendered, rendered=rendered)


# --------------------------------------------------------------------------- write


def _backup_path(path: Path, now: dt.datetime) -> Path:
    stamp = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    candidate = path.with_name(f"{path.name}.bak.{stamp}")
    counter = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak.{stamp}.{counter}")
        counter += 1
    return candidate


def apply_change(change: FileChange, *, now: dt.datetime | None = None) -> Path | None:
    """Writes ``change`` (backing up the old file first); returns the backup path, if one was made."""
    if change.content is None:
        return None
    backup = None
    mode = 0o644
    if change.path.exists():
        mode = change.path.stat().st_mode & 0o7777
        backup = _backup_path(change.path, now or dt.datetime.now(dt.UTC))
        write_atomic(backup, change.path.read_bytes(), mode=mode)
    write_atomic(change.path, change.content.encode("utf-8"), mode=mode)
    return backup


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``containerd-config`` options to ``parser`` (a subcommand parser)."""
    parser.add_argument(
        "--hosts-dir",
        type=Path,
        required=True,
        help="containerd's hosts directory (config_path), e.g. /etc/containerd/certs.d",
    )
    parser.add_argument(
        "--endpoint", required=True, help="p2pd's URL as containerd reaches it, e.g. http://127.0.0.1:5080"
    )
    parser.add_argument(
        "--registry",
        action="append",
        default=[],
        metavar="NS[=UPSTREAM]",
        help="registry host to route through p2pd (docker.io, seed.example:5000); "
        "=UPSTREAM sets its server URL (default https://NS, docker.io: https://registry-1.docker.io); repeatable",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="also write _default/hosts.toml, used for every registry without its own directory",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the files that would be written; write nothing")
    parser.add_argument(
        "--dial-timeout",
        default=DEFAULT_DIAL_TIMEOUT,
        help=f"dial_timeout of p2pd's entry (containerd 1.7+; 1.6 ignores it); '' leaves it out "
        f"(default {DEFAULT_DIAL_TIMEOUT})",
    )


def _targets(registries: Sequence[str], all_registries: bool) -> list[Target]:
    targets = [parse_target(value) for value in registries]
    if all_registries:
        targets.append(Target(DEFAULT_NAMESPACE))
    if not targets:
        raise ConfigError("give at least one --registry NS[=UPSTREAM] or --all")
    seen: set[str] = set()
    for target in targets:
        if target.namespace in seen:
            raise ConfigError(f"registry {target.namespace} given twice")
        seen.add(target.namespace)
    return targets


def run(args: argparse.Namespace) -> int:
    """Runs ``p2pd containerd-config``. Returns 0 on success, 2 for bad arguments or files, 1 for I/O errors.

    Every file is planned before any is written, so a bad existing file leaves all of them untouched.
    """
    try:
        endpoint = _checked_url(args.endpoint, "--endpoint")
        dial_timeout = _checked_duration(args.dial_timeout)
        targets = _targets(args.registry, args.all)
        changes = [plan_file(args.hosts_dir, t, endpoint, dial_timeout=dial_timeout) for t in targets]
    except ConfigError as exc:
        print(f"p2pd containerd-config: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"p2pd containerd-config: {exc}", file=sys.stderr)
        return 1

    if args.dry_run:
        for change in changes:
            state = "unchanged" if change.content is None else "would update" if change.existed else "would create"
            print(f"# ===== {change.path} ({state})")
            print(change.rendered, end="" if change.rendered.endswith("\n") else "\n")
            print()
        return 0

    now = dt.datetime.now(dt.UTC)
    try:
        for change in changes:
            if change.content is None:
                print(f"unchanged {change.path}")
                continue
            backup = apply_change(change, now=now)
            print(f"updated {change.path} (backup {backup})" if backup else f"created {change.path}")
    except OSError as exc:
        print(f"p2pd containerd-config: {exc}", file=sys.stderr)
        return 1
    return 0
