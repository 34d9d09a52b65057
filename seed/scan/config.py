"""Configuration of the scanner (``[scan]``, ``[scan.limits]``) and the pull policy (``[[scanning]]``).

Example ``seed.toml``::

    [scan]
    enabled = true
    queue_size = 1000          # images waiting for a scan; pushes beyond it are not queued
    workers = 1                # scans running at once (each in its own process)
    cpu_share = 0.5            # fraction of one core each worker may use (duty cycle)
    priority = "idle"          # of the scan processes: idle (CPU nothing else wants) | low | normal
    database_poll_interval = 60.0  # seconds between checks for a database imported by `seed vulndb import`

    [scan.limits]
    max_layer_size = 8589934592        # compressed bytes of one layer
    max_uncompressed_size = 34359738368
    max_ratio = 100.0                  # uncompressed/compressed, beyond ratio_floor bytes
    max_entries = 1000000
    max_path_length = 4096

    [[scanning]]
    repositories = ["prod/**"]
    block_severity = "critical"        # refuse pulls by tag of images with findings at or above
    unscanned = "deny"                 # while the scan of an image is pending
    allow = [
        { id = "CVE-2024-0001", expires = 2026-12-31, reason = "not reachable" },
        "GHSA-xxxx-yyyy-zzzz",         # accepted without expiry
    ]

The first ``[[scanning]]`` rule whose ``repositories`` match decides; no match: no policy.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from p2pd.errors import ConfigError
from p2pd.tomlconfig import build_section
from seed.access import compile_glob, validate_glob

__all__ = [
    "SEVERITIES",
    "AcceptedRisk",
    "LayerLimits",
    "ScanConfig",
    "ScanSettings",
    "ScanningRule",
    "from_toml",
    "severity_rank",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# In increasing order. "unknown" (an advisory without any score) ranks below "low", so a
# policy never blocks on a severity nobody assessed; the findings still show it.
SEVERITIES = ("unknown", "none", "low", "medium", "high", "critical")


def severity_rank(severity: str) -> int:
    """Position of ``severity`` in ``SEVERITIES``; unknown words rank as "unknown"."""
    try:
        return SEVERITIES.index(severity)
    except ValueError:
        return 0


@dataclass(frozen=True)
class LayerLimits:
    """Bounds on the work one layer may cause. Exceeding one is reported, never followed."""

    max_layer_size: int = 8 * GiB  # compressed bytes
    max_uncompressed_size: int = 32 * GiB
    max_ratio: float = 100.0  # uncompressed / compressed bytes, checked beyond ratio_floor
    ratio_floor: int = 256 * MiB  # uncompressed bytes allowed whatever the ratio
    max_entries: int = 1_000_000
    max_path_length: int = 4096  # bytes of an entry's path or link target
    max_header_size: int = 1 * MiB  # one pax header or GNU long name record
    max_file_size: int = 64 * MiB  # one package database file kept in memory
    max_binary_size: int = 1 * GiB  # ELF files larger than this are not probed for Go build info
    max_captured_bytes: int = 512 * MiB  # all package database files of one image together
    max_symlink_hops: int = 40  # as Linux's MAXSYMLINKS

    def __post_init__(self) -> None:
        for name in ("max_layer_size", "max_uncompressed_size", "max_entries", "max_path_length",
                     "max_header_size", "max_file_size", "max_binary_size", "max_captured_bytes",
                     "max_symlink_hops"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_ratio < 1 or self.ratio_floor < 0:
            raise ValueError("max_ratio must be >= 1 and ratio_floor >= 0")


@dataclass(frozen=True)
class ScanConfig:
    """``[scan]``: the background scanner."""

    enabled: bool = True
    scan_on_push: bool = True
    queue_size: int = 1000
    workers: int = 1
    cpu_share: float = 0.5  # fraction of one core a worker may use; 1.0 = no pauses
    # CPU priority of the scan processes: "idle" (Linux SCHED_IDLE: only CPU time nothing else
    # wants, so serving always goes first), "low" (nice 10) or "normal" (the seed's own).
    priority: str = "idle"
    database_poll_interval: float = 60.0  # seconds between checks for a newly imported database
    limits: LayerLimits = field(default_factory=LayerLimits)

    def __post_init__(self) -> None:
        if self.queue_size < 1 or self.workers < 1:
            raise ValueError("queue_size and workers must be at least 1")
        if not 0.01 <= self.cpu_share <= 1.0:
            raise ValueError("cpu_share must be between 0.01 and 1.0")
        if self.priority not in ("idle", "low", "normal"):
            raise ValueError("priority must be 'idle', 'low' or 'normal'")
        if self.database_poll_interval <= 0:
            raise ValueError("database_poll_interval must be positive")


@dataclass(frozen=True)
class AcceptedRisk:
    """An advisory id (or alias) accepted for a repository, until ``expires`` (inclusive)."""

    id: str
    expires: datetime.date | None = None
    reason: str = ""

    def active(self, today: datetime.date) -> bool:
        return self.expires is None or today <= self.expires


_POLICY_CHOICES = ("allow", "deny")


@dataclass(frozen=True)
class ScanningRule:
    """``[[scanning]]``: the pull policy of the repositories matching ``repositories``.

    Attributes:
        repositories: globs as in ``[[access]]`` (``*`` one component, ``**`` any depth).
        block_severity: pulls by tag of images with a finding at or above it are refused;
            None never blocks.
        allow: accepted risks, matched against a finding's id and its aliases.
        unscanned: "allow" or "deny" pulls of images whose scan is pending or never ran.
        incomplete: "allow" or "deny" pulls of images whose scan hit a broken or hostile
            layer (its packages could not all be read, so its findings may be incomplete).
    """

    repositories: tuple[str, ...]
    block_severity: str | None = None
    allow: tuple[AcceptedRisk, ...] = ()
    unscanned: str = "allow"
    incomplete: str = "deny"

    def __post_init__(self) -> None:
        if not self.repositories:
            raise ValueError("repositories must name at least one pattern")
        for pattern in self.repositories:
            validate_glob(pattern)
        if self.block_severity is not None and self.block_severity not in SEVERITIES[2:]:
            raise ValueError(f"block_severity must be one of {', '.join(SEVERITIES[2:])}")
        if self.unscanned not in _POLICY_CHOICES or self.incomplete not in _POLICY_CHOICES:
            raise ValueError("unscanned and incomplete must be 'allow' or 'deny'")

    def matches(self, repository: str) -> bool:
        return any(compile_glob(pattern).fullmatch(repository) for pattern in self.repositories)

    def accepted(self, advisory_ids: tuple[str, ...], today: datetime.date) -> bool:
        """Whether one of an advisory's ids (its id and aliases) is an active accepted risk."""
        return any(risk.id in advisory_ids and risk.active(today) for risk in self.allow)


@dataclass(frozen=True)
class ScanSettings:
    """Everything the scanner reads from the seed's TOML file."""

    scan: ScanConfig = field(default_factory=ScanConfig)
    rules: tuple[ScanningRule, ...] = ()

    def rule_for(self, repository: str) -> ScanningRule | None:
        return next((rule for rule in self.rules if rule.matches(repository)), None)


def _accepted_risk(value: Any, where: str) -> AcceptedRisk:
    if isinstance(value, str):
        return AcceptedRisk(value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be an advisory id or a table {{ id = ..., expires = ... }}")
    unknown = set(value) - {"id", "expires", "reason"}
    if unknown:
        raise ConfigError(f"unknown setting {where}.{sorted(unknown)[0]}")
    advisory, expires, reason = value.get("id"), value.get("expires"), value.get("reason", "")
    if not isinstance(advisory, str) or not advisory:
        raise ConfigError(f"{where}.id must be an advisory id")
    if isinstance(expires, datetime.datetime):
        expires = expires.date()
    elif isinstance(expires, str):
        try:
            expires = datetime.date.fromisoformat(expires)
        except ValueError as exc:
            raise ConfigError(f"{where}.expires must be a date (YYYY-MM-DD)") from exc
    elif expires is not None and not isinstance(expires, datetime.date):
        raise ConfigError(f"{where}.expires must be a date (YYYY-MM-DD)")
    if not isinstance(reason, str):
        raise ConfigError(f"{where}.reason must be a string")
    return AcceptedRisk(advisory, expires, reason)


def _rule(table: Any, where: str) -> ScanningRule:
    if not isinstance(table, Mapping):
        raise ConfigError(f"[[{where}]] must be a table")
    values = dict(table)
    allow = values.pop("allow", [])
    if not isinstance(allow, list):
        raise ConfigError(f"{where}.allow must be a list")
    rule: ScanningRule = build_section(_RuleFields, values, where).to_rule(
        tuple(_accepted_risk(item, f"{where}.allow[{i}]") for i, item in enumerate(allow)), where)
    return rule


@dataclass(frozen=True)
class _RuleFields:
    # The scalar fields of a rule, checked by build_section; allow is parsed separately.
    repositories: tuple[str, ...] = ()
    block_severity: str | None = None
    unscanned: str = "allow"
    incomplete: str = "deny"

    def to_rule(self, allow: tuple[AcceptedRisk, ...], where: str) -> ScanningRule:
        try:
            return ScanningRule(self.repositories, self.block_severity, allow, self.unscanned, self.incomplete)
        except ValueError as exc:
            raise ConfigError(f"[[{where}]]: {exc}") from exc


def from_toml(document: Mapping[str, Any]) -> ScanSettings:
    """Reads ``[scan]``, ``[scan.limits]`` and ``[[scanning]]`` from a parsed TOML document.

    Other tables are ignored (they belong to the rest of the seed's configuration).

    Raises:
        ConfigError: an unknown setting, a value of the wrong type, or an invalid rule.
    """
    table = dict(document.get("scan", {}) or {})
    if not isinstance(document.get("scan", {}), Mapping):
        raise ConfigError("[scan] must be a table")
    limits = build_section(LayerLimits, table.pop("limits", {}), "scan.limits")
    scan = build_section(ScanConfig, table, "scan")
    try:
        scan = replace(scan, limits=limits)
    except ValueError as exc:
        raise ConfigError(f"[scan]: {exc}") from exc
    rules_table = document.get("scanning", [])
    if not isinstance(rules_table, list):
        raise ConfigError("scanning must be an array of tables ([[scanning]])")
    rules = tuple(_rule(item, f"scanning[{i}]") for i, item in enumerate(rules_table))
    return ScanSettings(scan, rules)
