"""What ``p2pd status`` shows: the agent's ``/debug/status`` document as rich tables.

A pure function of the status dict (no I/O, no clock), so the table can be tested from a
literal document and the command stays a thin fetch-and-print. The document comes from a
running agent, possibly of another version: every field is read defensively and a missing
one is left out rather than failing the whole view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

__all__ = ["format_bytes", "render_status"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_DIGEST_SHOWN = 19  # "sha256:" + 12 hex digits: unique enough on one screen, like `ctr` and `docker` print
_BAR_WIDTH = 20


def format_bytes(value: float) -> str:
    """``1536`` → ``1.5 KiB``; binary units like the sizes operators configure (``--cache-max-bytes 20G``)."""
    amount = float(value)
    for unit in _UNITS:
        if abs(amount) < 1024 or unit == _UNITS[-1]:
            return f"{int(amount)} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _short(digest: Any) -> str:
    return str(digest)[:_DIGEST_SHOWN]


def _peer_state(peer: Mapping[str, Any]) -> Text:
    if peer.get("banned"):
        return Text("banned", style="bold red")
    if peer.get("suspended"):
        return Text("suspended", style="yellow")
    return Text("live", style="green")


def _summary(status: Mapping[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    ready = status.get("ready")
    grid.add_row("agent", Text("ready", style="green") if ready else Text("starting", style="yellow"))
    node = status.get("node")
    if isinstance(node, Mapping):
        grid.add_row("node", f"{node.get('id', '?')}  site {node.get('site', '?')}  peers reach it at "
                             f"{node.get('address', '?')}")
    else:
        grid.add_row("node", "peer-to-peer off (no --peer-listen)")
    used, limit = _number(status.get("cache_bytes")), _number(status.get("cache_max_bytes"))
    cache = Text(format_bytes(used))
    if limit:
        cache.append(f" of {format_bytes(limit)} ({100 * used / limit:.0f}%)")
    if "cache_blobs" in status:
        cache.append(f", {int(_number(status['cache_blobs']))} blobs")
    grid.add_row("cache", cache)
    return grid


def _bytes_table(status: Mapping[str, Any]) -> Table:
    table = Table(title="bytes by source", title_justify="left")
    table.add_column("direction")
    table.add_column("source or client")
    table.add_column("bytes", justify="right")
    fetched = status.get("fetched_bytes")
    sources = fetched if isinstance(fetched, Mapping) else {}
    for source in sorted(sources):
        table.add_row("fetched", str(source), format_bytes(_number(sources[source])))
    if not sources:
        table.add_row("fetched", "(nothing yet)", format_bytes(0))
    table.add_row("served", "containerd", format_bytes(_number(status.get("served_bytes"))))
    if "peer_served_bytes" in status:
        table.add_row("served", "peers", format_bytes(_number(status["peer_served_bytes"])))
    return table


def _sites_table(status: Mapping[str, Any], peers: list[Mapping[str, Any]]) -> Table:
    """Nodes per site, this node included: where the swarm can find each blob once per site."""
    counts: dict[str, list[int]] = {}  # site -> [live, known]
    node = status.get("node")
    if isinstance(node, Mapping):
        counts[str(node.get("site", "?"))] = [1, 1]
    for peer in peers:
        entry = counts.setdefault(str(peer.get("site", "?")), [0, 0])
        entry[1] += 1
        if not peer.get("banned") and not peer.get("suspended"):
            entry[0] += 1
    table = Table(title="sites", title_justify="left")
    table.add_column("site")
    table.add_column("live nodes", justify="right")
    table.add_column("known nodes", justify="right")
    own_site = str(node.get("site")) if isinstance(node, Mapping) else None
    for site in sorted(counts):
        live, known = counts[site]
        table.add_row(site + (" (this node)" if site == own_site else ""), str(live), str(known))
    return table


def _peers_table(peers: list[Mapping[str, Any]]) -> Table:
    table = Table(title=f"{len(peers)} peers", title_justify="left")
    for column in ("id", "address", "site", "state", "found by"):
        table.add_column(column)
    table.add_column("failures", justify="right")
    for peer in sorted(peers, key=lambda p: (str(p.get("site", "")), str(p.get("id", "")))):
        sources = peer.get("sources")
        found = ", ".join(map(str, sources)) if isinstance(sources, list | tuple) else str(sources or "")
        table.add_row(str(peer.get("id", "?")), str(peer.get("address", "?")), str(peer.get("site", "?")),
                      _peer_state(peer), found, str(int(_number(peer.get("failures")))))
    return table


def _progress(done: float, total: float) -> ProgressBar | Text:
    if total <= 0:
        return Text("size unknown", style="dim")
    return ProgressBar(total=total, completed=min(done, total), width=_BAR_WIDTH)


def _transfers_table(downloads: Iterable[Mapping[str, Any]], transfers: Iterable[Mapping[str, Any]]) -> Table:
    """One row per blob in flight: the fetcher's download (bytes written) joined with the swarm's
    transfer of the same digest (chunks held, where the bytes came from, who holds the lease)."""
    by_digest: dict[str, dict[str, Any]] = {}
    for item in downloads:
        by_digest.setdefault(str(item.get("digest")), {})["download"] = item
    for item in transfers:
        by_digest.setdefault(str(item.get("digest")), {})["transfer"] = item
    table = Table(title=f"{len(by_digest)} transfers in flight", title_justify="left")
    table.add_column("blob", no_wrap=True, min_width=_DIGEST_SHOWN)
    table.add_column("progress", no_wrap=True)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("chunks", justify="right")
    table.add_column("from peers", justify="right")
    table.add_column("from upstream", justify="right")
    table.add_column("upstream lease")
    for digest in sorted(by_digest):
        download: Mapping[str, Any] = by_digest[digest].get("download", {})
        transfer: Mapping[str, Any] = by_digest[digest].get("transfer", {})
        size = _number(download.get("size") or transfer.get("size"))
        chunks, have = int(_number(transfer.get("chunks"))), int(_number(transfer.get("have")))
        # Without a local reader (a transfer fetched for peers) the chunk count is the progress.
        by_chunks = size * have / chunks if chunks else 0.0
        done = _number(download.get("written")) if download else by_chunks
        peer_bytes = transfer.get("peer_bytes")
        from_peers = sum(_number(v) for v in peer_bytes.values()) if isinstance(peer_bytes, Mapping) else 0.0
        if not transfer:
            lease = "-"
        elif transfer.get("leased"):
            lease = "this node"
        else:
            lease = str(transfer.get("lessee") or "none")
        table.add_row(
            _short(digest),
            _progress(done, size),
            f"{format_bytes(done)} / {format_bytes(size)} ({100 * done / size:.0f}%)" if size else format_bytes(done),
            f"{have}/{chunks}" if transfer else "-",
            format_bytes(from_peers) if transfer else "-",
            format_bytes(_number(transfer.get("upstream_bytes"))) if transfer else "-",
            lease,
        )
    return table


def render_status(status: Mapping[str, Any]) -> RenderableType:
    """The status document (``MirrorFront.status()``) as one renderable for ``Console.print``."""
    parts: list[RenderableType] = [_summary(status), _bytes_table(status)]
    peers = _mappings(status.get("peers"))
    if isinstance(status.get("node"), Mapping):
        parts.append(_sites_table(status, peers))
        parts.append(_peers_table(peers))
    downloads, transfers = _mappings(status.get("downloads")), _mappings(status.get("transfers"))
    parts.append(_transfers_table(downloads, transfers) if downloads or transfers
                 else Text("no transfers in flight", style="dim"))
    return Group(*parts)
