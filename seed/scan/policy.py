"""The pull policy of ``[[scanning]]`` rules: may an image be pulled, given its scan? Pure.

The registry asks ``decide_pull`` for pulls by tag (a pull by digest names exact content
the client already chose, and is not refused by scan results). The decision names the
advisories that block, for the 403 ``DENIED`` error.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from .config import ScanningRule, ScanSettings, severity_rank
from .scanner import ScanReport

__all__ = ["PullDecision", "decide_pull"]

_MAX_NAMED = 20  # advisories named in one refusal


@dataclass(frozen=True)
class PullDecision:
    allowed: bool
    reason: str = ""
    advisories: tuple[str, ...] = ()
    rule: ScanningRule | None = None


def decide_pull(rules: ScanSettings | Sequence[ScanningRule], repository: str, report: ScanReport | None, *,
                today: datetime.date) -> PullDecision:
    """Whether the first rule matching ``repository`` lets the scanned image be pulled.

    Args:
        rules: the ``[[scanning]]`` rules, in configuration order.
        repository: the repository pulled from.
        report: the image's stored scan, or None while it is pending or was never scanned.
        today: the date accepted risks expire against.
    """
    rule_list = rules.rules if isinstance(rules, ScanSettings) else tuple(rules)
    rule = next((candidate for candidate in rule_list if candidate.matches(repository)), None)
    if rule is None:
        return PullDecision(True)
    if report is None or report.status == "unmatched":
        if rule.unscanned == "deny":
            return PullDecision(False, "the image has not been scanned yet", rule=rule)
        return PullDecision(True, "not scanned yet", rule=rule)
    if report.status == "incomplete" and rule.incomplete == "deny":
        return PullDecision(False, "the image's scan is incomplete: some layers could not be read", rule=rule)
    if rule.block_severity is None:
        return PullDecision(True, rule=rule)
    threshold = severity_rank(rule.block_severity)
    blocking: list[str] = []
    for _platform, finding in report.findings:
        if severity_rank(finding.severity) >= threshold and not rule.accepted(finding.ids, today) \
                and finding.id not in blocking:
            blocking.append(finding.id)
    if blocking:
        named = tuple(sorted(blocking)[:_MAX_NAMED])
        more = f" and {len(blocking) - len(named)} more" if len(blocking) > len(named) else ""
        return PullDecision(False, f"vulnerabilities at or above {rule.block_severity}: {', '.join(named)}{more}",
                            named, rule)
    return PullDecision(True, rule=rule)
