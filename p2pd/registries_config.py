"""``p2pd registries-config``: point podman and CRI-O at the local p2pd with a registries.conf drop-in.

podman, CRI-O, skopeo and buildah share containers/image, which reads ``/etc/containers/registries.conf``
and then every ``*.conf`` in ``/etc/containers/registries.conf.d`` in name order. This command writes one
drop-in (``50-p2pd.conf``) with a ``[[registry]]`` per registry whose first ``[[registry.mirror]]`` is p2pd.
When the mirror cannot serve an image (404, 5xx, connection refused) containers/image tries the next
mirror and finally the registry's own location.

The mirror's location names the upstream in its path (``127.0.0.1:5080/p2pd-ns/seed.local__5000``,
``p2pd.mirror_prefix``) because containers/image sends no ``ns=``; the agent reads the same prefix.

Rules/invariants:

* Only our file is written; it is owned whole by this tool (rewritten from scratch, marked by its first
  line). A file of that name without the mark is refused, never overwritten.
* A drop-in's ``[[registry]]`` replaces an earlier table with the same prefix as a whole
  (containers-registries.conf.d(5)). So the table of the files read before ours (the main file, drop-ins
  that sort first) is carried over: its location, ``insecure``, ``blocked``, unknown keys and its mirrors
  (after p2pd). ``mirror-by-digest-only = true`` there becomes ``pull-from-mirror = "digest-only"`` on
  those mirrors (same meaning), because the per-mirror setting p2pd needs is not allowed next to it.
* Same content → no write ("unchanged"). Writes are atomic (``p2pd.fsutil.write_atomic``).
* Everything up to :func:`plan_drop_in` is pure or read-only; :func:`apply_drop_in` is the only writer.

containers/image 5.23 (Debian 12's podman 4.3 and skopeo 1.9) facts this module relies on, verified with
the real podman by tests/test_p2pd_podman.py:

* ``pull-from-mirror = "all"`` makes tag and digest pulls both use the mirror (the key came with
  containers/image PR 1411 in 2022; 5.23 reads it). "all" is also the default when the key is absent,
  so older versions, which ignore unknown keys, behave the same: tag and digest pulls use the mirror
  unless the registry sets ``mirror-by-digest-only``.
* There is no catch-all prefix: ``*.example.com`` matches subdomains, but a mirror of a wildcard prefix
  receives the path without the host, so p2pd could not tell the registries apart. ``--all`` therefore
  writes one table per registry the agent's configuration names and reports the patterns it cannot cover.
* Mirrors are used for pulls only; pushes go to the registry.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import load_config
from .containerd_config import FileChange
from .errors import ConfigError
from .fsutil import write_atomic
from .mirror_prefix import namespace_component, prefix_path
from .tomlwrite import toml_key, toml_value

__all__ = [
    "DEFAULT_FILE_NAME",
    "OWNER_MARK",
    "DropInPlan",
    "Endpoint",
    "RegistryTable",
    "add_arguments",
    "apply_drop_in",
    "configured_namespaces",
    "merge_registry",
    "parse_endpoint",
    "parse_namespace",
    "plan_drop_in",
    "read_registry_tables",
    "render_drop_in",
    "run",
]

DEFAULT_FILE_NAME = "50-p2pd.conf"
OWNER_MARK = "# Written by 'p2pd registries-config'"
_PULL_FROM_MIRROR = "pull-from-mirror"
_DIGEST_ONLY = "mirror-by-digest-only"


@dataclass(frozen=True)
class Endpoint:
    """p2pd as containers/image reaches it: ``netloc`` (``127.0.0.1:5080``) and whether it is plain HTTP."""

    netloc: str
    insecure: bool

    def location(self, namespace: str) -> str:
        """The mirror location for ``namespace``: ``127.0.0.1:5080/p2pd-ns/seed.local__5000``."""
        return f"{self.netloc}/{prefix_path(namespace)}"


@dataclass(frozen=True)
class RegistryTable:
    """One ``[[registry]]``: ``settings`` are its keys but ``mirror`` (``prefix`` first), ``mirrors`` in order."""

    settings: Mapping[str, Any]
    mirrors: tuple[Mapping[str, Any], ...] = ()


# --------------------------------------------------------------------------- validation


def parse_endpoint(url: str) -> Endpoint:
    """``--endpoint``: ``http(s)://host:port`` without a path.

    Raises:
        ConfigError: not an http(s) URL, or it has a path, query or credentials.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--endpoint must be an http:// or https:// URL, got {url!r}")
    if parts.path.strip("/") or parts.query or parts.fragment or parts.username is not None:
        raise ConfigError(f"--endpoint takes scheme://host:port only (the tool adds the path), got {url!r}")
    return Endpoint(netloc=parts.netloc.lower(), insecure=parts.scheme == "http")


def parse_namespace(value: str) -> str:
    """``--registry``: a registry host (``docker.io``, ``seed.example:5000``) in normal form.

    Raises:
        ConfigError: not a host[:port], an IPv6 address (no mirror path can name it), or ``NS=URL``
            (the upstream URL belongs in the agent's configuration, not in registries.conf).
    """
    if "=" in value:
        raise ConfigError(f"--registry takes a registry host only, got {value!r}; the agent's [[upstream]] "
                          "entry (or --upstream NS=URL) says where p2pd fetches it from")
    host, sep, port = value.strip().lower().partition(":")
    namespace = host.rstrip(".") + sep + port  # the agent drops a trailing dot of the host too
    try:
        namespace_component(namespace)
    except ValueError as exc:
        raise ConfigError(f"--registry: {exc}") from None
    return namespace


def configured_namespaces(config_path: Path) -> tuple[list[str], list[str]]:
    """``--all``: the registries the agent's configuration serves by name.

    Returns:
        ``(namespaces, skipped)``: every ``[[upstream]]`` namespace and exact ``allow_registries``
        name; ``skipped`` are entries registries.conf cannot route through p2pd (wildcard patterns,
        IPv6 addresses), each with the reason.

    Raises:
        ConfigError: the configuration cannot be read.
    """
    config = load_config(config_path)
    namespaces: list[str] = []
    skipped: list[str] = []
    candidates = [u.namespace for u in config.upstreams] + list(config.allow_registries)
    for name in candidates:
        if "*" in name:
            skipped.append(f"{name}: registries.conf has no mirror that keeps the host of a wildcard prefix")
            continue
        try:
            namespace = parse_namespace(name)
        except ConfigError as exc:
            skipped.append(f"{name}: {exc}")
            continue
        if namespace not in namespaces:
            namespaces.append(namespace)
    return namespaces, skipped


# --------------------------------------------------------------------------- read


def read_registry_tables(text: str) -> list[dict[str, Any]]:
    """The ``[[registry]]`` tables of a registries.conf (other keys are not ours to read).

    Raises:
        ConfigError: invalid TOML, or ``registry`` is not an array of tables.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}") from exc
    tables = document.get("registry", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("'registry' must hold [[registry]] tables")
    return tables


def _prefix(table: Mapping[str, Any]) -> str | None:
    prefix = table.get("prefix") or table.get("location")  # a missing prefix defaults to the location
    return prefix.lower() if isinstance(prefix, str) else None


def _effective_tables(sources: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """The ``[[registry]]`` tables after reading ``sources`` in order (a later prefix replaces an earlier one)."""
    tables: dict[str, dict[str, Any]] = {}
    for path in sources:
        try:
            found = read_registry_tables(path.read_text(encoding="utf-8"))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        for table in found:
            prefix = _prefix(table)
            if prefix is not None:
                tables[prefix] = table
    return tables


# --------------------------------------------------------------------------- merge and render


def _same_location(a: object, b: str) -> bool:
    return isinstance(a, str) and a.rstrip("/").lower() == b.lower()


def merge_registry(namespace: str, endpoint: Endpoint, existing: Mapping[str, Any] | None) -> RegistryTable:
    """The table we want for ``namespace``: ``existing`` (from the files read before ours) with p2pd first.

    Raises:
        ConfigError: the existing table's location is p2pd itself (the fallback would go nowhere).
    """
    existing = dict(existing or {})
    ours = endpoint.location(namespace)
    location = existing.get("location") or namespace
    if _same_location(location, ours) or str(location).lower().startswith(endpoint.netloc + "/"):
        raise ConfigError(f"{namespace}: its location is the p2pd endpoint itself")
    settings: dict[str, Any] = {"prefix": namespace, "location": location}
    settings.update((k, v) for k, v in existing.items() if k not in ("prefix", "location", "mirror", _DIGEST_ONLY))
    digest_only = existing.get(_DIGEST_ONLY) is True
    others: list[Mapping[str, Any]] = []
    mirrors = existing.get("mirror", [])
    for mirror in mirrors if isinstance(mirrors, list) else []:
        if not isinstance(mirror, dict) or _same_location(mirror.get("location"), ours):
            continue
        if digest_only and _PULL_FROM_MIRROR not in mirror:
            mirror = {**mirror, _PULL_FROM_MIRROR: "digest-only"}
        others.append(mirror)
    own: dict[str, Any] = {"location": ours}
    if endpoint.insecure:
        own["insecure"] = True  # plain HTTP to the agent; the registry's own setting is kept above
    own[_PULL_FROM_MIRROR] = "all"
    return RegistryTable(settings=settings, mirrors=(own, *others))


def _table_lines(header: str, table: Mapping[str, Any]) -> list[str]:
    return [header, *(f"{toml_key(key)} = {toml_value(value)}" for key, value in table.items())]


def render_drop_in(tables: Sequence[RegistryTable]) -> str:
    """The drop-in's text; ``read_registry_tables`` reads back what was merged."""
    lines = [
        OWNER_MARK + "; rerun it rather than editing this file (it is rewritten whole).",
        "# Pulls of each registry below try p2pd first and fall back to the next mirror, then the registry.",
        '# pull-from-mirror = "all": tag and digest pulls both use p2pd (also the default without the key).',
    ]
    for table in tables:
        lines.append("")
        lines.extend(_table_lines("[[registry]]", table.settings))
        for mirror in table.mirrors:
            lines.extend(_table_lines("[[registry.mirror]]", mirror))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plan (reads, never writes)


@dataclass(frozen=True)
class DropInPlan:
    """What :func:`plan_drop_in` decided: the file change and warnings for the operator."""

    change: FileChange
    warnings: tuple[str, ...] = ()


def plan_drop_in(directory: Path, main_config: Path, namespaces: Sequence[str], endpoint: Endpoint,
                 *, file_name: str = DEFAULT_FILE_NAME) -> DropInPlan:
    """Reads the configuration that applies before our file and works out the drop-in.

    Args:
        directory: the drop-in directory (``/etc/containers/registries.conf.d``).
        main_config: the main file read before every drop-in (``/etc/containers/registries.conf``).
        namespaces: the registries to route through p2pd, in normal form.
        endpoint: p2pd's address.
        file_name: our file in ``directory``.

    Raises:
        ConfigError: an existing file cannot be parsed, our file name is taken by a file we did not
            write, or a registry's location is p2pd itself.
        OSError: a file cannot be read.
    """
    path = directory / file_name
    current = path.read_text(encoding="utf-8") if path.exists() else None
    if current is not None and current.strip() and not current.startswith(OWNER_MARK):
        raise ConfigError(f"{path} exists and was not written by p2pd registries-config; "
                          "choose another --file-name or move it away")
    drop_ins = sorted(p for p in directory.glob("*.conf") if p.is_file()) if directory.is_dir() else []
    before = [main_config] if main_config.is_file() else []
    before += [p for p in drop_ins if p.name < file_name]
    earlier = _effective_tables(before)
    warnings: list[str] = []
    for later in (p for p in drop_ins if p.name > file_name):
        overriding = _effective_tables([later])
        warnings += [f"{later} is read after {file_name}: its [[registry]] for {namespace} replaces p2pd's"
                     for namespace in namespaces if namespace in overriding]
    tables = [merge_registry(namespace, endpoint, earlier.get(namespace)) for namespace in namespaces]
    rendered = render_drop_in(tables)
    if current == rendered:
        return DropInPlan(FileChange(path=path, existed=True, content=None, rendered=rendered), tuple(warnings))
    return DropInPlan(FileChange(path=path, existed=current is not None, content=rendered, rendered=rendered),
                      tuple(warnings))


# --------------------------------------------------------------------------- write


def apply_drop_in(change: FileChange) -> bool:
    """Writes the drop-in (atomically, mode 0644); returns whether anything was written."""
    if change.content is None:
        return False
    write_atomic(change.path, change.content.encode("utf-8"), mode=0o644)
    return True


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``registries-config`` options to ``parser`` (a subcommand parser)."""
    parser.add_argument("--dir", type=Path, required=True,
                        help="the drop-in directory, e.g. /etc/containers/registries.conf.d")
    parser.add_argument("--endpoint", required=True,
                        help="p2pd's URL as podman/CRI-O reach it, e.g. http://127.0.0.1:5080")
    parser.add_argument("--registry", action="append", default=[], metavar="NS",
                        help="registry host to route through p2pd (docker.io, seed.example:5000); repeatable")
    parser.add_argument("--all", action="store_true",
                        help="every registry named in the agent's configuration (--config): [[upstream]] "
                             "namespaces and exact allow_registries names (registries.conf has no catch-all)")
    parser.add_argument("--config", type=Path, help="the agent's TOML configuration, for --all")
    parser.add_argument("--registries-conf", type=Path,
                        help="the main file read before the drop-ins (default: registries.conf next to --dir)")
    parser.add_argument("--file-name", default=DEFAULT_FILE_NAME,
                        help=f"name of the drop-in in --dir (default {DEFAULT_FILE_NAME})")
    parser.add_argument("--dry-run", action="store_true", help="print the file that would be written; write nothing")


def _namespaces(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    namespaces = [parse_namespace(value) for value in args.registry]
    skipped: list[str] = []
    if args.all:
        if args.config is None:
            raise ConfigError("--all reads the registries from the agent's configuration: give --config FILE")
        configured, skipped = configured_namespaces(args.config)
        namespaces += [n for n in configured if n not in namespaces]
    if not namespaces:
        raise ConfigError("give at least one --registry NS, or --all --config FILE naming some registries")
    if len(set(namespaces)) != len(namespaces):
        raise ConfigError("a registry is given twice")
    return namespaces, skipped


def _checked_file_name(name: str) -> str:
    if "/" in name or name.startswith(".") or not name.endswith(".conf"):
        raise ConfigError(f"--file-name must be a plain name ending in .conf (others are not read), got {name!r}")
    return name


def run(args: argparse.Namespace) -> int:
    """Runs ``p2pd registries-config``. Returns 0 on success, 2 for bad arguments or files, 1 for I/O errors."""
    try:
        endpoint = parse_endpoint(args.endpoint)
        file_name = _checked_file_name(args.file_name)
        namespaces, skipped = _namespaces(args)
        main_config = args.registries_conf or args.dir.with_name("registries.conf")
        plan = plan_drop_in(args.dir, main_config, namespaces, endpoint, file_name=file_name)
    except ConfigError as exc:
        print(f"p2pd registries-config: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"p2pd registries-config: {exc}", file=sys.stderr)
        return 1
    for note in (*skipped, *plan.warnings):
        print(f"p2pd registries-config: warning: {note}", file=sys.stderr)

    change = plan.change
    if args.dry_run:
        state = "unchanged" if change.content is None else "would update" if change.existed else "would create"
        print(f"# ===== {change.path} ({state})")
        print(change.rendered, end="")
        return 0
    try:
        written = apply_drop_in(change)
    except OSError as exc:
        print(f"p2pd registries-config: {exc}", file=sys.stderr)
        return 1
    print(f"{'updated' if change.existed else 'created'} {change.path}" if written else f"unchanged {change.path}")
    return 0
