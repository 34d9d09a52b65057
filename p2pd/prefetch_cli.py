"""``p2pd prefetch IMAGE...``: asks the local agent to fetch images into its cache."""

from __future__ import annotations

import argparse
import re
import sys

import httpx
import trio
from rich.console import Console
from rich.table import Table

from .oci.platform import Platform
from .prefetch import MAX_IMAGES, MAX_PIN_SECONDS, PREFETCH_PATH, PREHEAT_PATH, parse_image
from .progress import show_progress

__all__ = ["add_arguments", "add_preheat_arguments", "parse_duration", "run", "run_preheat"]

_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d`` in seconds (at most 30 days)."""
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 30m, 2h)")
    seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    if seconds > MAX_PIN_SECONDS:
        raise argparse.ArgumentTypeError("at most 30 days")
    return seconds


def _platform(text: str) -> str:
    try:
        return str(Platform.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="[registry/]name[:tag][@digest]")
    parser.add_argument("--platform", type=_platform, help="os/arch[/variant] for multi-arch images "
                        "(default: the agent's own platform)")
    parser.add_argument("--endpoint", default="http://127.0.0.1:5080", help="the agent's --listen URL (loopback)")
    parser.add_argument("--pin-for", type=parse_duration, default=2 * 3600.0, metavar="DURATION",
                        help="keep the image from eviction this long (default 2h; 0: subject to the cache "
                             "limit at once)")


async def _prefetch_all(args: argparse.Namespace) -> list[dict[str, object]]:
    reports: list[dict[str, object]] = []
    url = args.endpoint.rstrip("/") + PREFETCH_PATH
    with show_progress("prefetch", label="images") as progress:
        progress.start(len(args.images))
        # No overall timeout: a large image takes as long as it takes; the agent bounds each fetch.
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None), trust_env=False) as client:

            async def one(image: str) -> None:
                body: dict[str, object] = {"images": [image], "pin_seconds": args.pin_for}
                if args.platform:
                    body["platform"] = args.platform
                try:
                    response = await client.post(url, json=body)
                    response.raise_for_status()
                    reports.extend(response.json()["images"])
                except (httpx.HTTPError, ValueError, KeyError) as exc:
                    reports.append({"image": image, "status": "failed", "error": str(exc)[:300]})
                progress.advance()

            async with trio.open_nursery() as nursery:
                for image in args.images:
                    nursery.start_soon(one, image)
    return sorted(reports, key=lambda r: args.images.index(str(r["image"])) if r["image"] in args.images else 0)


def summary_table(reports: list[dict[str, object]]) -> Table:
    table = Table(title="prefetch")
    for column in ("image", "platform", "blobs", "MiB", "cached MiB", "fetched MiB", "seconds", "status"):
        table.add_column(column, justify="left" if column in ("image", "platform", "status") else "right")
    for r in reports:
        mib = [f"{float(str(r.get(k) or 0)) / 2**20:.1f}" for k in ("bytes_total", "bytes_cached", "bytes_fetched")]
        status = str(r.get("status", "?")) + (f": {r['error']}" if r.get("error") else "")
        table.add_row(str(r.get("image", "")), str(r.get("platform", "")), str(r.get("blobs", "")), *mib,
                      str(r.get("seconds", "")), status)
    return table


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=160)


def run_checks(args: argparse.Namespace) -> int:
    """2 when the images are too many or malformed (said on stderr), else 0."""
    if len(args.images) > MAX_IMAGES:
        print(f"p2pd: at most {MAX_IMAGES} images at a time", file=sys.stderr)
        return 2
    for image in args.images:
        try:
            parse_image(image)
        except ValueError as exc:
            print(f"p2pd: {image[:200]}: {exc}", file=sys.stderr)
            return 2
    return 0


def run(args: argparse.Namespace) -> int:
    code = run_checks(args)
    if code:
        return code
    reports = trio.run(_prefetch_all, args)
    _console().print(summary_table(reports))
    return 0 if all(r.get("status") == "done" for r in reports) else 1


def add_preheat_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.add_argument("--site", help="only the members of this site (default: every live member)")


def _members(endpoint: str, site: str | None) -> list[tuple[str, str]]:
    """(node id, site) of this agent and its live peers, from its status document."""
    response = httpx.get(endpoint.rstrip("/") + "/debug/status", timeout=10, trust_env=False)
    response.raise_for_status()
    status = response.json()
    node = status.get("node")
    if not isinstance(node, dict):
        raise ValueError("the agent runs without the swarm (--peer-listen): use 'p2pd prefetch'")
    members = [(str(node["id"]), str(node["site"]))]
    members += [(str(p["id"]), str(p["site"])) for p in status.get("peers", [])
                if not p.get("suspended") and not p.get("banned")]
    return [m for m in members if site is None or m[1] == site]


async def _preheat_all(args: argparse.Namespace, members: list[tuple[str, str]]) -> list[dict[str, object]]:
    url = args.endpoint.rstrip("/") + PREHEAT_PATH
    results: list[dict[str, object]] = []
    limiter = trio.CapacityLimiter(16)
    with show_progress("preheat", label="nodes") as progress:
        progress.start(len(members))
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None), trust_env=False) as client:

            async def one(node_id: str, site: str) -> None:
                # One request per member: the progress moves as each member finishes.
                body: dict[str, object] = {"images": args.images, "pin_seconds": args.pin_for, "nodes": [node_id]}
                if args.platform:
                    body["platform"] = args.platform
                async with limiter:
                    try:
                        response = await client.post(url, json=body)
                        response.raise_for_status()
                        results.extend(response.json()["nodes"])
                    except (httpx.HTTPError, ValueError, KeyError) as exc:
                        results.append({"node": node_id, "site": site, "status": "failed", "error": str(exc)[:300]})
                progress.advance()

            async with trio.open_nursery() as nursery:
                for node_id, site in members:
                    nursery.start_soon(one, node_id, site)
    return sorted(results, key=lambda r: str(r.get("node")))


def preheat_table(results: list[dict[str, object]]) -> Table:
    table = Table(title="preheat")
    for column in ("node", "site", "MiB fetched", "from peers MiB", "from upstream MiB", "seconds", "status"):
        table.add_column(column, justify="left" if column in ("node", "site", "status") else "right")
    for r in results:
        sources = r.get("from") if isinstance(r.get("from"), dict) else {}
        assert isinstance(sources, dict)
        mib = [f"{float(str(value or 0)) / 2**20:.1f}"
               for value in (r.get("bytes"), sources.get("peer"), sources.get("upstream"))]
        status = str(r.get("status", "?")) + (f": {r['error']}" if r.get("error") else "")
        table.add_row(str(r.get("node", "")), str(r.get("site", "")), *mib, str(r.get("seconds", "")), status)
    return table


def run_preheat(args: argparse.Namespace) -> int:
    code = run_checks(args)
    if code:
        return code
    try:
        members = _members(args.endpoint, args.site)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        print(f"p2pd: cannot list the members from {args.endpoint}: {exc}", file=sys.stderr)
        return 1
    if not members:
        print("p2pd: no live member matches", file=sys.stderr)
        return 1
    results = trio.run(_preheat_all, args, members)
    _console().print(preheat_table(results))
    return 0 if all(r.get("status") == "done" for r in results) else 1
