"""``python -m tests.bench.swarm_trace DIR``: where a swarm pull's time went, request by request.

Reads the agents' logs (text or ``--log-format json`` lines) of a ``make bench-swarm`` run kept
with ``--keep --agent-log-level DEBUG`` (``DIR``: the run's testbed directory, ``p2pbed-*``, or a
parent holding one) and, with ``--json`` (the run's raw results), the nodes' link use second by
second. Every chunk request an agent makes is one DEBUG line (``p2pd.swarm``: which node, how
it found the chunk there — a copy it *claimed*, its *range holder*'s arrival, a node of its
*relay tree* — what came of it, how long it took), and every 404 a peer service answers another
(``p2pd.swarm.service``: why the chunk was not there). Printed, for the blob with the most requests:

- the link use of the range holders (the nodes others asked as one) and of the other nodes, per
  second: a node whose downlink is not full while the seed sends is a node that falls behind for
  good when node links are no faster than the seed's;
- the chunk requests in flight per node, per route and by whether they delivered the chunk;
- the 404 answers by reason over time;
- when each node verified its last chunk of the blob.

This is what the twenty-ninth and thirtieth sessions rebuilt by hand each time (docs/benchmarks.md,
*The weak regime*).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A text line (``--log-format text``, the default): its time, level, and the rest ("logger: message").
_TEXT_LINE = re.compile(r"(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<level>[A-Z]+) (?P<rest>.*)$")
REQUEST_MESSAGE = re.compile(
    r"p2pd\.swarm: chunk (?P<index>\d+) of (?P<digest>\S+) from (?P<source>\S+) "
    r"\((?P<route>[^)]+)\): (?P<outcome>.+) after (?P<seconds>[\d.]+) s$")
REFUSAL_MESSAGE = re.compile(
    r"p2pd\.swarm\.service: (?P<asker>\S+) asked for chunk (?P<index>\d+) of (?P<digest>\S+): "
    r"not here, (?P<reason>.+)$")
_LOG_NAME = re.compile(r"p2pd-\d+-(?P<node>n\d+)\.log$")
ROUTES = ("claimed", "range holder", "relay tree")


@dataclass(frozen=True)
class Request:
    """One chunk request a node made, from its DEBUG line (times in seconds since the epoch)."""

    node: str
    digest: str
    index: int
    source: str
    route: str
    outcome: str
    start: float
    end: float

    @property
    def delivered(self) -> bool:
        return self.outcome == "verified"


@dataclass(frozen=True)
class Refusal:
    """A 404 a node's peer service answered for a chunk, and why."""

    node: str
    asker: str
    digest: str
    index: int
    reason: str
    at: float


def _debug_record(line: str) -> tuple[float, str] | None:
    """A DEBUG line's time (seconds since the epoch) and "logger: message", from either log format
    (``--log-format text`` or ``json``); None for any other line."""
    if line.startswith("{"):
        try:
            document = json.loads(line)
            if not isinstance(document, dict) or document.get("level") != "DEBUG":
                return None
            at = datetime.datetime.fromisoformat(document["time"]).timestamp()
        except (ValueError, KeyError, TypeError):
            return None
        return at, f"{document.get('logger')}: {document.get('message')}"
    match = _TEXT_LINE.match(line)
    if match is None or match["level"] != "DEBUG":
        return None
    # The text format's time is local, without a zone, like the agent that wrote it (same machine).
    return datetime.datetime.strptime(match["stamp"], "%Y-%m-%d %H:%M:%S,%f").timestamp(), match["rest"]


def parse_log(node: str, lines: Iterable[str]) -> tuple[list[Request], list[Refusal]]:
    """The chunk requests and 404 answers in one agent's log, text or JSON lines (other lines are
    skipped)."""
    requests: list[Request] = []
    refusals: list[Refusal] = []
    for line in lines:
        record = _debug_record(line.rstrip("\n"))
        if record is None:
            continue
        at, message = record
        if (match := REQUEST_MESSAGE.match(message)) is not None:
            requests.append(Request(node, match["digest"], int(match["index"]), match["source"], match["route"],
                                    match["outcome"], at - float(match["seconds"]), at))
        elif (match := REFUSAL_MESSAGE.match(message)) is not None:
            reason = match["reason"]
            if reason.startswith("its relays here are all taken"):
                reason = "its relays here are all taken: sent to a receiver"  # one bucket, whoever was named
            refusals.append(Refusal(node, match["asker"], match["digest"], int(match["index"]), reason, at))
    return requests, refusals


def read_bed(directory: Path) -> tuple[list[Request], list[Refusal]]:
    """Every agent log under ``directory`` (``p2pd-<generation>-n<i>.log``; a node restarted in
    the run, as in the churn scenario, counts as one node)."""
    logs = sorted(directory.rglob("p2pd-*-n*.log"))
    if not logs:
        raise SystemExit(f"{directory}: no agent logs (p2pd-*-n*.log); was the run kept (--keep)?")
    requests: list[Request] = []
    refusals: list[Refusal] = []
    for path in logs:
        match = _LOG_NAME.search(path.name)
        if match is None:
            continue
        with path.open(errors="replace") as handle:
            got, refused = parse_log(match["node"], handle)
        requests += got
        refusals += refused
    return requests, refusals


def in_flight(requests: Sequence[Request], nodes: int, start: float, end: float) -> dict[tuple[str, bool], float]:
    """Chunk requests in flight per node between ``start`` and ``end``, by route and whether the
    request delivered the chunk (the mean over the span)."""
    span = end - start
    counts: defaultdict[tuple[str, bool], float] = defaultdict(float)
    for request in requests:
        overlap = min(request.end, end) - max(request.start, start)
        if overlap > 0:
            counts[(request.route, request.delivered)] += overlap / span
    return {key: value / max(1, nodes) for key, value in counts.items()}


def summarize(requests: Sequence[Request], refusals: Sequence[Refusal], link_use: dict[str, Any] | None = None,
              *, bin_s: float = 2.0) -> dict[str, Any]:
    """The numbers printed (and tested) for the blob with the most requests."""
    if not requests:
        raise ValueError("no chunk requests in the logs (were the agents run with --agent-log-level DEBUG?)")
    digest = Counter(request.digest for request in requests).most_common(1)[0][0]
    mine = [request for request in requests if request.digest == digest]
    zero = min(request.start for request in mine)
    finish = max(request.end for request in mine)
    holders = sorted({request.source for request in mine if request.route == "range holder"})
    nodes = sorted({request.node for request in mine})
    groups = {"range holders": [n for n in nodes if n in holders], "others": [n for n in nodes if n not in holders]}
    bins: list[dict[str, Any]] = []
    at = 0.0
    while zero + at < finish:
        row: dict[str, Any] = {"from_s": at}
        for name, members in groups.items():
            chosen = [request for request in mine if request.node in members]
            flight = in_flight(chosen, len(members), zero + at, zero + at + bin_s)
            row[name] = {f"{route}, {'delivered' if delivered else 'not'}": round(value, 2)
                         for (route, delivered), value in sorted(flight.items())}
        reasons = Counter(refusal.reason for refusal in refusals
                          if refusal.digest == digest and zero + at <= refusal.at < zero + at + bin_s)
        row["404s"] = dict(reasons.most_common())
        bins.append(row)
        at += bin_s
    last: defaultdict[str, float] = defaultdict(float)
    for request in mine:
        if request.delivered:
            last[request.node] = max(last[request.node], request.end - zero)
    outcomes = Counter((request.route, request.outcome.split(",")[0].split(":")[0]) for request in mine)
    summary: dict[str, Any] = {
        "digest": digest, "requests": len(mine), "nodes": len(nodes), "range_holders": len(holders),
        "outcomes": {f"{route}: {outcome}": count for (route, outcome), count in sorted(outcomes.items())},
        "bins": bins,
        "last_chunk_s": {"min": round(min(last.values()), 2), "median": round(statistics.median(last.values()), 2),
                         "max": round(max(last.values()), 2)} if last else None,
    }
    if link_use is not None:
        summary["link_use"] = _group_link_use(link_use, groups)
    return summary


def _group_link_use(link_use: dict[str, Any], groups: dict[str, list[str]]) -> dict[str, list[list[float]]]:
    """Per group, per second: [downlink, uplink] use, the mean of its nodes (bench link_use)."""
    by_node: dict[str, list[list[float]]] = link_use.get("nodes_by_second", {})
    out: dict[str, list[list[float]]] = {}
    for name, members in groups.items():
        series = [by_node[node] for node in members if node in by_node]
        if not series:
            continue
        seconds = min(len(values) for values in series)
        out[name] = [[round(statistics.fmean(values[i][0] for values in series), 2),
                      round(statistics.fmean(values[i][1] for values in series), 2)] for i in range(seconds)]
    return out


def render(summary: dict[str, Any]) -> str:
    lines = [f"blob {summary['digest']}: {summary['requests']} chunk requests by {summary['nodes']} nodes, "
             f"{summary['range_holders']} range holders"]
    if summary.get("last_chunk_s"):
        last = summary["last_chunk_s"]
        lines.append(f"last chunk verified at {last['min']}-{last['max']} s (median {last['median']}), "
                     "from the first request")
    lines.append("outcomes: " + "; ".join(f"{key} {value}" for key, value in summary["outcomes"].items()))
    for name, series in summary.get("link_use", {}).items():
        lines.append(f"link use, {name} (down/up per second): " + " ".join(f"{d:.2f}/{u:.2f}" for d, u in series))
    lines.append("chunk requests in flight per node (route, delivered or not) and 404s, per bin:")
    for row in summary["bins"]:
        parts = []
        for name in ("range holders", "others"):
            if row.get(name):
                parts.append(f"{name}: " + ", ".join(f"{key} {value}" for key, value in row[name].items()))
        if row["404s"]:
            parts.append("404s: " + ", ".join(f"{reason} {count}" for reason, count in row["404s"].items()))
        lines.append(f"  {row['from_s']:5.1f} s  " + " | ".join(parts))
    return "\n".join(lines)


def _link_use(path: Path, scenario: str | None) -> dict[str, Any]:
    report = json.loads(path.read_text())
    for result in report.get("results", []):
        if scenario is None or result["scenario"]["key"] == scenario:
            p2pd = result.get("methods", {}).get("p2pd")
            if p2pd is not None and "link_use" in p2pd:
                return dict(p2pd["link_use"])
    raise SystemExit(f"{path}: no p2pd link use{f' for {scenario}' if scenario else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.swarm_trace", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="the kept run's testbed directory (or a parent of it)")
    parser.add_argument("--json", type=Path, help="the run's raw results (per-node link use)")
    parser.add_argument("--scenario", help="the scenario key in --json (default: the first with p2pd)")
    parser.add_argument("--bin", type=float, default=2.0, help="seconds per row (default %(default)s)")
    args = parser.parse_args(argv)
    requests, refusals = read_bed(args.directory)
    link_use = _link_use(args.json, args.scenario) if args.json else None
    try:
        summary = summarize(requests, refusals, link_use, bin_s=args.bin)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(render(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
