"""Peer metadata messages (msgpack): what a node tells a digest's coordinator, and the reply.

Decoding checks every field's type and bounds, so a peer with the cluster key still cannot
crash a node with a malformed message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from p2pd.oci.digest import Digest

__all__ = [
    "MAX_DISPUTED",
    "MAX_MESSAGE_BYTES",
    "MAX_RANGES",
    "Announce",
    "BudgetAsk",
    "BudgetGrant",
    "MessageError",
    "PeerInfo",
    "RangeLease",
    "Reply",
    "decode",
    "encode",
]

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_HOLDERS = 256  # holders returned per reply
MAX_DISPUTED = 16  # nodes one announcement may dispute
MAX_RANGES = 64  # range leases of one site listed in a reply
_MAX_TEXT = 255


class MessageError(Exception):
    """A peer message is malformed."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    node: str
    address: str  # host:port of the peer endpoint
    site: str
    complete: bool
    have: bytes | None  # bitmap of chunks when not complete


@dataclass(frozen=True, slots=True)
class Announce:
    """A node's state for one digest; ``want_lease`` asks for the site's upstream lease."""

    digest: Digest
    node: str
    address: str
    site: str
    size: int | None
    chunk_size: int
    complete: bool
    have: bytes | None
    want_lease: bool = False
    gone: bool = False  # the node no longer has (or wants) the blob
    leased: bool = False  # the node fetches from the upstream under a lease it was granted
    # Nodes that answered "not here" for chunks they claimed to hold (a stale or false claim):
    # the coordinator stops trusting their claims for a while (p2pd.swarm.coordinator).
    disputed: tuple[str, ...] = ()
    # The range leases the node holds (first, last inclusive): a coordinator that took over with
    # no state gives a holder back the range it is fetching, not another one.
    ranges: tuple[tuple[int, int], ...] = ()
    # Sent by a coordinator that has no state for the digest to the member ranked next (which
    # coordinated it before this one joined): "tell me what you know, and grant no more ranges"
    # (p2pd.swarm.coordinator, "hand-off").
    handoff: bool = False
    # The site's range leases the node learned from its coordinator's last reply. A backup that
    # takes the digest over with no state (its predecessor unreachable, perhaps only from some
    # nodes) learns from them which ranges are being fetched, instead of granting them again.
    lessees: tuple[RangeLease, ...] = ()
    # The upstream answered the node's range request with the whole blob (it ignores Range):
    # the coordinator makes the site's split of the blob one range (p2pd.swarm.coordinator).
    whole_blob: bool = False
    # Bytes the node's upstream fetches of the blob have received so far (verified or not): a
    # range holder on a thin link whose chunk takes longer than a lease TTL to arrive is still
    # making progress (p2pd.swarm.coordinator).
    upstream_bytes: int = 0
    # The node reads replies in the compact form (``Reply.compact``): every node of this version
    # says so; a coordinator answers an announcement without it in maps, as older nodes read them.
    compact: bool = False


@dataclass(frozen=True, slots=True)
class RangeLease:
    """A node of the site fetches chunks ``first..last`` (inclusive) from the upstream."""

    node: str
    address: str
    first: int
    last: int


@dataclass(frozen=True, slots=True)
class Reply:
    holders: tuple[PeerInfo, ...]
    lease_holder: str | None  # node id holding the site's first unfinished range (older nodes: the lease)
    lease_address: str | None
    granted: bool  # the asking node holds at least one range lease
    lease_ttl: float
    ranges: tuple[tuple[int, int], ...] = ()  # the asking node's ranges (first, last), inclusive
    lessees: tuple[RangeLease, ...] = ()  # every live range lease of the asking node's site
    # How the holders and lessees go on the wire: each an array instead of a map, a holder
    # without its site when it is the asker's (``site``). Half the bytes (3.5 KB -> 1.8 KB for a
    # reply of the N = 32 testbed): a coordinator answers every downloader of a blob several
    # times a second with up to MAX_HOLDERS holders, and its 3.3 KB replies took 23 % of a
    # 3 Mbit/s uplink (docs/benchmarks.md). Only to an asker that announced ``Announce.compact``.
    compact: bool = False
    site: str | None = None


@dataclass(frozen=True, slots=True)
class BudgetAsk:
    """A node of ``site`` asks the site's keeper for a share of its upstream budget (``want``), or
    gives its share back; ``cap`` is the asker's configured ``site_upstream_rate`` (bytes/s)."""

    node: str
    site: str
    cap: int
    want: bool


@dataclass(frozen=True, slots=True)
class BudgetGrant:
    """A rate (bytes/s) the asking node may fetch from the upstream for ``ttl`` seconds."""

    rate: int
    ttl: float


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise MessageError(f"{name} must be a short string")
    return value


def _optional_bytes(value: Any, name: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, bytes) or len(value) > MAX_MESSAGE_BYTES // 8:
        raise MessageError(f"{name} must be bytes")
    return value


def _peer(value: Any) -> PeerInfo:
    if not isinstance(value, dict):
        raise MessageError("holder must be a map")
    complete = value.get("complete")
    if not isinstance(complete, bool):
        raise MessageError("complete must be a boolean")
    return PeerInfo(_text(value.get("node"), "node"), _text(value.get("address"), "address"),
                    _text(value.get("site"), "site"), complete, _optional_bytes(value.get("have"), "have"))


def _chunk_range(first: Any, last: Any) -> tuple[int, int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (first, last)) or not 0 <= first <= last:
        raise MessageError("a range is two chunk indexes, first <= last")
    return first, last


def _ranges(value: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or len(value) > MAX_RANGES:
        raise MessageError(f"ranges must be a list of at most {MAX_RANGES}")
    if not all(isinstance(item, list) and len(item) == 2 for item in value):
        raise MessageError("a range is [first, last]")
    return tuple(_chunk_range(first, last) for first, last in value)


def _lessees(value: Any, *, compact: bool = False) -> tuple[RangeLease, ...]:
    if not isinstance(value, list) or len(value) > MAX_RANGES:
        raise MessageError(f"lessees must be a list of at most {MAX_RANGES}")
    leases = []
    for item in value:
        if compact:
            if not isinstance(item, list) or len(item) != 4:
                raise MessageError("a compact lessee is [node, address, first, last]")
            node, address, first, last = item
        elif isinstance(item, dict):
            node, address, first, last = item.get("node"), item.get("address"), item.get("first"), item.get("last")
        else:
            raise MessageError("a lessee must be a map")
        first, last = _chunk_range(first, last)
        leases.append(RangeLease(_text(node, "node"), _text(address, "address"), first, last))
    return tuple(leases)


def _count(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
        raise MessageError(f"{name} must be a non-negative integer")
    return value


Message = Announce | Reply | BudgetAsk | BudgetGrant


def encode(message: Message) -> bytes:
    if isinstance(message, BudgetAsk):
        return msgpack.packb({"t": "budget", "node": message.node, "site": message.site, "cap": message.cap,
                              "want": message.want})
    if isinstance(message, BudgetGrant):
        return msgpack.packb({"t": "grant", "rate": message.rate, "ttl": message.ttl})
    if isinstance(message, Announce):
        body: dict[str, Any] = {
            "t": "announce", "digest": str(message.digest), "node": message.node, "address": message.address,
            "site": message.site, "size": message.size, "chunk_size": message.chunk_size,
            "complete": message.complete, "have": message.have, "want_lease": message.want_lease,
            "gone": message.gone, "leased": message.leased,
        }
        if message.disputed:
            body["disputed"] = list(message.disputed)
        if message.ranges:
            body["ranges"] = [[first, last] for first, last in message.ranges]
        if message.handoff:
            body["handoff"] = True
        if message.lessees:
            body["lessees"] = _encode_lessees(message.lessees)
        if message.whole_blob:
            body["whole_blob"] = True
        if message.upstream_bytes:
            body["upstream_bytes"] = message.upstream_bytes
        if message.compact:
            body["compact"] = True
    else:
        body = {
            "t": "reply", "holders": _encode_holders(message),
            "lease_holder": message.lease_holder, "lease_address": message.lease_address,
            "granted": message.granted, "lease_ttl": message.lease_ttl,
        }
        if message.compact:
            if message.site is None:
                raise ValueError("a compact reply names the asker's site")
            body["compact"], body["site"] = True, message.site
        if message.ranges:
            body["ranges"] = [[first, last] for first, last in message.ranges]
        if message.lessees:
            body["lessees"] = _encode_lessees(message.lessees, compact=message.compact)
    return msgpack.packb(body)


def _encode_holders(reply: Reply) -> list[Any]:
    if reply.compact:
        return [[p.node, p.address, None if p.site == reply.site else p.site, p.complete, p.have]
                for p in reply.holders]
    return [{"node": p.node, "address": p.address, "site": p.site, "complete": p.complete, "have": p.have}
            for p in reply.holders]


def _compact_peer(value: Any, site: str) -> PeerInfo:
    if not isinstance(value, list) or len(value) != 5:
        raise MessageError("a compact holder is [node, address, site, complete, have]")
    node, address, its_site, complete, have = value
    if not isinstance(complete, bool):
        raise MessageError("complete must be a boolean")
    return PeerInfo(_text(node, "node"), _text(address, "address"),
                    site if its_site is None else _text(its_site, "site"), complete, _optional_bytes(have, "have"))


def _encode_lessees(lessees: tuple[RangeLease, ...], *, compact: bool = False) -> list[Any]:
    if compact:
        return [[lease.node, lease.address, lease.first, lease.last] for lease in lessees]
    return [{"node": lease.node, "address": lease.address, "first": lease.first, "last": lease.last}
            for lease in lessees]


def decode(data: bytes) -> Message:
    """Parses and validates one message; raises MessageError."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError("message too large")
    try:
        obj = msgpack.unpackb(data, max_array_len=MAX_HOLDERS, max_map_len=32, max_str_len=_MAX_TEXT * 4,
                              max_bin_len=MAX_MESSAGE_BYTES // 8)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MessageError("not msgpack") from exc
    if not isinstance(obj, dict):
        raise MessageError("message must be a map")
    kind = obj.get("t")
    if kind == "announce":
        size, chunk_size = obj.get("size"), obj.get("chunk_size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise MessageError("size must be a non-negative integer")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise MessageError("chunk_size must be a positive integer")
        flags = [obj.get(k, False)
                 for k in ("complete", "want_lease", "gone", "leased", "handoff", "whole_blob", "compact")]
        if not all(isinstance(flag, bool) for flag in flags):
            raise MessageError("flags must be booleans")
        try:
            digest = Digest.parse(_text(obj.get("digest"), "digest"))
        except Exception as exc:
            raise MessageError("invalid digest") from exc
        upstream_bytes = obj.get("upstream_bytes", 0)
        if not isinstance(upstream_bytes, int) or isinstance(upstream_bytes, bool) or not 0 <= upstream_bytes < 2**63:
            raise MessageError("upstream_bytes must be a non-negative integer")
        disputed = obj.get("disputed", [])
        if not isinstance(disputed, list) or len(disputed) > MAX_DISPUTED:
            raise MessageError(f"disputed must be a list of at most {MAX_DISPUTED} node ids")
        return Announce(digest, _text(obj.get("node"), "node"), _text(obj.get("address"), "address"),
                        _text(obj.get("site"), "site"), size, chunk_size, flags[0],
                        _optional_bytes(obj.get("have"), "have"), flags[1], flags[2], flags[3],
                        tuple(_text(node, "disputed node") for node in disputed), _ranges(obj.get("ranges", [])),
                        flags[4], _lessees(obj.get("lessees", [])), flags[5], upstream_bytes, flags[6])
    if kind == "reply":
        holders = obj.get("holders")
        if not isinstance(holders, list):
            raise MessageError("holders must be a list")
        lease_holder, lease_address = obj.get("lease_holder"), obj.get("lease_address")
        granted, ttl = obj.get("granted"), obj.get("lease_ttl")
        if not isinstance(granted, bool) or not isinstance(ttl, int | float) or isinstance(ttl, bool):
            raise MessageError("bad lease fields")
        compact = obj.get("compact", False)
        if not isinstance(compact, bool):
            raise MessageError("compact must be a boolean")
        site = _text(obj.get("site"), "site") if compact else None
        peers = tuple(_peer(h) for h in holders) if site is None else tuple(_compact_peer(h, site) for h in holders)
        return Reply(peers,
                     None if lease_holder is None else _text(lease_holder, "lease_holder"),
                     None if lease_address is None else _text(lease_address, "lease_address"),
                     granted, float(ttl), _ranges(obj.get("ranges", [])),
                     _lessees(obj.get("lessees", []), compact=compact), compact, site)
    if kind == "budget":
        want = obj.get("want")
        if not isinstance(want, bool):
            raise MessageError("want must be a boolean")
        return BudgetAsk(_text(obj.get("node"), "node"), _text(obj.get("site"), "site"), _count(obj.get("cap"), "cap"),
                         want)
    if kind == "grant":
        ttl = obj.get("ttl")
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl <= 3600:
            raise MessageError("ttl must be a positive number of seconds")
        return BudgetGrant(_count(obj.get("rate"), "rate"), float(ttl))
    raise MessageError("unknown message type")
