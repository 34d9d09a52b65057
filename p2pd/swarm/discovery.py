"""Where peers come from: mDNS (zeroconf), static ``--peer`` addresses and periodic DNS lookups.

Every source sends :class:`Sighting` values into one memory channel, read by membership (the
single owner of the peer table). A sighting is a hint, not a credential: membership confirms a
node with an authenticated hello before it trusts the node id.

Rules/invariants:
- This is the only module that imports zeroconf. Zeroconf runs its own threads (an asyncio loop
  thread, and one thread per ServiceBrowser that runs our callback). They enter trio only through
  ``trio.from_thread.run_sync(send_nowait, ...)``, dropping the event if trio is behind or gone,
  and every blocking zeroconf call goes through ``trio.to_thread.run_sync``: the trio thread never
  blocks on zeroconf.
- mDNS is bound to exactly one IPv4 interface address, never to "all interfaces", which would
  multicast onto every network the host is attached to.
- Everything read from the network is validated (:func:`sighting_from_txt`). A malformed,
  incompatible or spoofed answer is dropped; it never raises.
- Sources never give up on their own: a failed DNS lookup is retried in the next round, and an
  mDNS registration conflict is logged while browsing goes on.
- For each mDNS service, sightings leave in the order of the events that caused them (one outbox
  channel, filled synchronously with the state change), so a goodbye is never overtaken by the
  sighting it withdraws.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import trio
from zeroconf import Error as ZeroconfError
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Sighting",
    "run_dns",
    "run_mdns",
    "run_static",
    "sighting_from_txt",
]

log = logging.getLogger("p2pd.swarm.discovery")

SERVICE_TYPE = "_p2pd._tcp.local."
PROTOCOL_VERSION = "1"

# Node ids and site labels are single DNS labels: they become mDNS instance and host names.
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,62}")
_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")

_MDNS_TTL = 120  # s; for all our records. The RFC 6762 default of 75 min for the PTR record would
# keep a crashed node (one that sent no goodbye) in every browser's cache for that long.
_MDNS_RESOLVE_MS = 3000  # ms; get_service_info gives up after this (zeroconf's unit)
_MDNS_RESOLVERS = 4  # concurrent get_service_info calls
_MDNS_MAX_SERVICES = 1024  # services tracked at once (resolved or waiting); a flood is dropped
_MDNS_EVENT_BUFFER = 256  # browser events waiting for trio; more are dropped
_MDNS_OUTBOX = 4 * _MDNS_MAX_SERVICES  # sightings waiting for the consumer; more are dropped
_MDNS_SHUTDOWN = 5.0  # s; goodbyes (3 x 125 ms) plus closing the sockets and threads
_DNS_ROUND_LIMIT = 10.0  # s; a lookup that takes longer keeps the name's previous addresses

_Change = Literal["added", "updated", "removed"]
_CHANGES: dict[ServiceStateChange, _Change] = {
    ServiceStateChange.Added: "added",
    ServiceStateChange.Updated: "updated",
    ServiceStateChange.Removed: "removed",
}
# What resolving a service yields: its TXT properties and its IPv4 addresses.
_Resolved = tuple[dict[bytes, bytes | None], list[str]]


@dataclass(frozen=True, slots=True)
class Sighting:
    """One source's news about one peer endpoint."""

    source: str  # "mdns" | "static" | "dns"
    address: str  # "host:port" of a peer endpoint
    node_id: str | None  # known from mDNS TXT, else None (membership learns it with an authenticated hello)
    site: str | None
    gone: bool = False  # the source says this address went away (mDNS goodbye, DNS record gone)


# -- Pure helpers ---------------------------------------------------------------------------------


def _txt_text(properties: dict[bytes, bytes | None], key: bytes) -> str | None:
    value = properties.get(key)
    if not isinstance(value, bytes):
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def _usable_ipv4(text: str) -> ipaddress.IPv4Address | None:
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        return None
    return ip


def sighting_from_txt(properties: dict[bytes, bytes | None], address: str, own_node: str) -> Sighting | None:
    """The sighting an mDNS service describes, or None if it is not a usable p2pd peer.

    Args:
        properties: the service's TXT record as zeroconf parses it (``ServiceInfo.properties``).
            Expected keys: ``node`` (node id), ``port`` (peer port), ``v`` (must equal
            PROTOCOL_VERSION) and ``site``; other keys are ignored.
        address: the IPv4 address the service resolved to (its A record).
        own_node: our node id; our own announcement is not a peer.

    Returns:
        A Sighting with source "mdns" and address ``"<ipv4>:<port>"``, or None when the version
        differs, a value is missing or malformed (node id and site: 1-63 letters, digits and
        '-', starting with a letter or digit; port: 1-65535), the address is not a usable
        IPv4 unicast address, or the service is our own. Never raises.
    """
    ip = _usable_ipv4(address)
    if ip is None or _txt_text(properties, b"v") != PROTOCOL_VERSION:
        return None
    node = _txt_text(properties, b"node")
    site = _txt_text(properties, b"site")
    port = _txt_text(properties, b"port")
    if node is None or not _LABEL_RE.fullmatch(node) or node == own_node:
        return None
    if site is None or not _LABEL_RE.fullmatch(site):
        return None
    if port is None or not _PORT_RE.fullmatch(port) or int(port) > 65535:
        return None
    return Sighting(source="mdns", address=f"{ip}:{port}", node_id=node, site=site)


def _instance(name: str) -> str | None:
    """The instance label of a ``<instance>._p2pd._tcp.local.`` name (may contain dots)."""
    suffix = "." + SERVICE_TYPE
    if len(name) <= len(suffix) or not name.lower().endswith(suffix):
        return None
    return name[: -len(suffix)]


def _sighting_from_resolved(name: str, resolved: _Resolved, own_node: str) -> Sighting | None:
    """Like sighting_from_txt, and the instance name must be the node id it announces.

    Nodes register under their node id, so a service that claims another node's id under a
    different instance name is spoofed (or broken) and is dropped.
    """
    properties, addresses = resolved
    for address in addresses:
        sighting = sighting_from_txt(properties, address, own_node)
        if sighting is None:
            continue
        instance = _instance(name)
        if instance is None or sighting.node_id is None or instance.lower() != sighting.node_id.lower():
            return None
        return sighting
    return None


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_dns_name(value: str, default_port: int) -> tuple[str, int]:
    """``NAME``, ``NAME:PORT``, ``[V6]`` or ``[V6]:PORT`` (a bare IPv6 literal has no port)."""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"peer DNS name must be NAME or NAME:PORT, got {value!r}")
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, ""
    if not host or (port_text and not (port_text.isdigit() and 1 <= int(port_text) <= 65535)):
        raise ValueError(f"peer DNS name must be NAME or NAME:PORT, got {value!r}")
    return host, int(port_text) if port_text else default_port


def _split_advertised(address: str, interface: str) -> tuple[str, int]:
    """The IPv4 host and port we announce; an unspecified host (0.0.0.0) means ``interface``."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"mDNS needs the advertised address as IPV4:PORT, got {address!r}")
    if host in ("", "0.0.0.0"):
        host = interface
    if _usable_ipv4(host) is None:
        raise ValueError(f"mDNS can only announce an IPv4 address, got {address!r}")
    return host, int(port_text)


# -- Static peers and DNS -------------------------------------------------------------------------


async def run_static(
    peers: Sequence[str],
    send: trio.MemorySendChannel[Sighting],
    *,
    interval: float = 60.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send a sighting of every static peer now and again every ``interval`` seconds.

    The repetition lets membership probe again a static peer it gave up on. Runs until
    cancelled (and does nothing but wait if ``peers`` is empty).

    Args:
        peers: ``HOST:PORT`` peer endpoints, as given with ``--peer`` (already validated).
        send: where sightings go.
        interval: seconds between rounds.
    """
    task_status.started()
    if not peers:
        await trio.sleep_forever()
    while True:
        for peer in peers:
            await send.send(Sighting(source="static", address=peer, node_id=None, site=None))
        await trio.sleep(interval)


async def _lookup(host: str, port: int) -> frozenset[str]:
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return frozenset(
        _join_host_port(str(sockaddr[0]), int(sockaddr[1]))
        for family, _, _, _, sockaddr in infos
        if family in (trio.socket.AF_INET, trio.socket.AF_INET6)
    )


async def run_dns(
    names: Sequence[str],
    default_port: int,
    send: trio.MemorySendChannel[Sighting],
    *,
    interval: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Resolve DNS names every ``interval`` seconds and report the addresses that come and go.

    Each name (e.g. a Kubernetes headless service) is looked up for TCP over IPv4 and IPv6.
    A new address is sent as a sighting, and an address no name resolves to any more is sent
    with ``gone=True``. A lookup that fails or takes longer than the round's time limit is
    logged and retried next round; meanwhile the name keeps its previous addresses (a resolver
    hiccup must not make the whole swarm look gone). Runs until cancelled.

    Args:
        names: ``NAME`` or ``NAME:PORT`` (``[V6]:PORT`` for literals); NAME alone uses
            ``default_port``.
        default_port: the peer port for names given without one.
        send: where sightings go.
        interval: seconds from the start of one round to the start of the next.

    Raises:
        ValueError: a name is malformed (before anything is resolved).
    """
    targets = sorted({_split_dns_name(name, default_port) for name in names})
    resolved: dict[tuple[str, int], frozenset[str]] = {}  # from each target's last good lookup
    failing: set[tuple[str, int]] = set()
    announced: set[str] = set()

    async def lookup(target: tuple[str, int], results: dict[tuple[str, int], frozenset[str]]) -> None:
        try:
            results[target] = await _lookup(*target)
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            level = logging.DEBUG if target in failing else logging.WARNING
            log.log(level, "peer DNS lookup of %s failed, retrying in %ss: %s", target[0], interval, exc)
            failing.add(target)

    task_status.started()
    if not targets:
        await trio.sleep_forever()
    while True:
        next_round = trio.current_time() + interval
        results: dict[tuple[str, int], frozenset[str]] = {}
        with trio.move_on_after(_DNS_ROUND_LIMIT):
            async with trio.open_nursery() as nursery:
                for target in targets:
                    nursery.start_soon(lookup, target, results)
        for target in targets:
            if target not in results and target not in failing:
                log.warning(
                    "peer DNS lookup of %s took over %ss, retrying in %ss", target[0], _DNS_ROUND_LIMIT, interval
                )
                failing.add(target)
        for target in results:
            if target in failing:
                log.info("peer DNS lookup of %s works again", target[0])
                failing.discard(target)
        resolved.update(results)
        current = set[str]().union(*resolved.values())
        for address in sorted(current - announced):
            await send.send(Sighting(source="dns", address=address, node_id=None, site=None))
        for address in sorted(announced - current):
            await send.send(Sighting(source="dns", address=address, node_id=None, site=None, gone=True))
        announced = current
        await trio.sleep_until(next_round)


# -- mDNS -----------------------------------------------------------------------------------------


class _ServiceTracker:
    """The trio side of run_mdns: browser events in, sightings out.

    State (touched only by trio tasks, never by zeroconf threads):
    - ``_generation``: services announced and not yet dropped, each with the number of the
      latest event about it. A resolution started before a newer event is discarded.
    - ``_known``: the sighting last sent for each service (what a goodbye withdraws).
    Names are keyed lower-case (DNS names are case-insensitive).
    """

    def __init__(
        self,
        resolve: Callable[[str], Awaitable[_Resolved | None]],
        send: trio.MemorySendChannel[Sighting],
        *,
        own_node: str,
        max_services: int = _MDNS_MAX_SERVICES,
        resolvers: int = _MDNS_RESOLVERS,
    ) -> None:
        self._resolve = resolve
        self._send = send
        self._own_node = own_node
        self._max_services = max_services
        self._resolvers = resolvers
        self._counter = itertools.count()
        self._generation: dict[str, int] = {}
        self._known: dict[str, Sighting] = {}
        self._queued: set[str] = set()
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[Sighting](_MDNS_OUTBOX)
        self._names_send, self._names_recv = trio.open_memory_channel[str](max_services)

    async def run(self, events: trio.MemoryReceiveChannel[tuple[_Change, str]]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forward)
            for _ in range(self._resolvers):
                nursery.start_soon(self._resolve_names)
            async for change, name in events:
                self._on_event(change, name)
            nursery.cancel_scope.cancel()

    async def _forward(self) -> None:
        async for sighting in self._outbox_recv:
            await self._send.send(sighting)

    def _emit(self, sighting: Sighting) -> None:
        try:
            self._outbox_send.send_nowait(sighting)
        except trio.WouldBlock:
            log.warning("mDNS sightings are not being consumed; dropped %s", sighting)

    def _on_event(self, change: _Change, name: str) -> None:
        key = name.lower()
        instance = _instance(name)
        if instance is None or instance.lower() == self._own_node.lower():
            return
        if change == "removed":
            self._generation.pop(key, None)
            previous = self._known.pop(key, None)
            if previous is not None:
                self._emit(replace(previous, gone=True))
            return
        if key not in self._generation and len(self._generation) >= self._max_services:
            log.warning("tracking %d mDNS services already; ignoring %r", self._max_services, name)
            return
        self._generation[key] = next(self._counter)
        if key in self._queued:
            return  # the queued resolution will see the newest records
        try:
            self._names_send.send_nowait(name)
        except trio.WouldBlock:
            log.warning("too many mDNS services waiting to be resolved; ignoring %r", name)
            return
        self._queued.add(key)

    async def _resolve_names(self) -> None:
        async for name in self._names_recv:
            key = name.lower()
            self._queued.discard(key)
            generation = self._generation.get(key)
            if generation is None:
                continue  # removed while it waited
            try:
                resolved = await self._resolve(name)
            except Exception as exc:  # a hostile packet must not take discovery down
                log.warning("resolving mDNS service %r failed: %r", name, exc)
                resolved = None
            if self._generation.get(key) != generation:
                continue  # a newer event re-queued it, or it was removed
            self._on_resolved(key, name, resolved)

    def _on_resolved(self, key: str, name: str, resolved: _Resolved | None) -> None:
        previous = self._known.get(key)
        sighting = None if resolved is None else _sighting_from_resolved(name, resolved, self._own_node)
        if sighting is None:
            if resolved is None and previous is not None:
                return  # no answer in time: keep what we knew until a goodbye or an update
            if resolved is not None:
                log.debug("ignoring mDNS service %r: not a compatible p2pd peer (%r)", name, resolved)
            if previous is not None:
                self._emit(replace(previous, gone=True))
            self._known.pop(key, None)
            self._generation.pop(key, None)  # an update re-adds it; a flood cannot pin slots
            return
        if sighting == previous:
            return
        if previous is not None and previous.address != sighting.address:
            self._emit(replace(previous, gone=True))
        self._known[key] = sighting
        self._emit(sighting)


def _shutdown(zc: Zeroconf, browser: ServiceBrowser | None) -> None:
    """Stop browsing, send goodbyes and close zeroconf (blocking: runs in a worker thread)."""
    steps: list[tuple[str, Callable[[], None]]] = []
    if browser is not None:
        steps.append(("stop the mDNS browser", browser.cancel))
    steps += [("send mDNS goodbyes", zc.unregister_all_services), ("close zeroconf", zc.close)]
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # keep shutting down whatever failed
            log.warning("could not %s: %r", what, exc)


async def run_mdns(
    *,
    node_id: str,
    site: str,
    address: str,
    interface: str,
    send: trio.MemorySendChannel[Sighting],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Announce this node with mDNS on one interface and report the p2pd peers seen there.

    Registers ``<node_id>._p2pd._tcp.local.`` (TXT ``node``, ``port``, ``v``, ``site``) and
    browses the same type. Services from other nodes become sightings with their node id and
    site; incompatible (other ``v``), malformed or spoofed ones are ignored; a goodbye (or
    expiry) becomes ``gone=True``. ``task_status.started()`` is called once the service is
    registered and the browser runs. Runs until cancelled; then it sends goodbyes and closes
    zeroconf, shielded but bounded in time.

    Args:
        node_id: our node id (a DNS label: no dots).
        site: our site label.
        address: ``IPV4:PORT`` peers use to reach us; host 0.0.0.0 means ``interface``.
        interface: the IPv4 address of the only interface mDNS may use.
        send: where sightings go.

    Raises:
        ValueError: an argument is malformed (before any socket is opened).
        OSError: zeroconf cannot open its sockets on ``interface``.

    Resource handling:
        Zeroconf's threads (its event loop and the browser) are stopped on every exit path.
        A registration conflict (another node claims our name) is logged, and browsing goes on.
    """
    if not _LABEL_RE.fullmatch(node_id) or not _LABEL_RE.fullmatch(site):
        raise ValueError("node id and site must be 1-63 letters, digits and '-'")
    if _usable_ipv4(interface) is None:
        raise ValueError(f"mDNS interface must be the IPv4 address of one interface, got {interface!r}")
    host, port = _split_advertised(address, interface)
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{node_id}.{SERVICE_TYPE}",
        port=port,
        properties={"node": node_id, "port": str(port), "v": PROTOCOL_VERSION, "site": site},
        server=f"{node_id}.local.",
        host_ttl=_MDNS_TTL,
        other_ttl=_MDNS_TTL,
        parsed_addresses=[host],
    )

    # Without a running asyncio loop in the calling thread, Zeroconf starts its own loop thread.
    zc = await trio.to_thread.run_sync(lambda: Zeroconf(interfaces=[interface], ip_version=IPVersion.V4Only))
    browser: ServiceBrowser | None = None
    events_send, events_recv = trio.open_memory_channel[tuple[_Change, str]](_MDNS_EVENT_BUFFER)
    try:
        token = trio.lowlevel.current_trio_token()

        def on_change(zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            # Runs on the browser's thread. Waits until trio has taken the event, never blocks trio.
            change = _CHANGES.get(state_change)
            if change is None:
                return
            try:
                trio.from_thread.run_sync(events_send.send_nowait, (change, name), trio_token=token)
            except trio.WouldBlock:
                log.warning("mDNS events arrive faster than they are handled; dropped %s %r", change, name)
            except (trio.RunFinishedError, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # shutting down

        async def resolve(name: str) -> _Resolved | None:
            def get() -> _Resolved | None:
                found = zc.get_service_info(SERVICE_TYPE, name, _MDNS_RESOLVE_MS)
                return None if found is None else (dict(found.properties), found.parsed_addresses(IPVersion.V4Only))

            return await trio.to_thread.run_sync(get, abandon_on_cancel=True)

        tracker = _ServiceTracker(resolve, send, own_node=node_id)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tracker.run, events_recv)
            browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
            try:
                # Probing and announcing take about 1.5 s.
                await trio.to_thread.run_sync(zc.register_service, info, abandon_on_cancel=True)
            except ZeroconfError as exc:
                log.error("cannot announce %s with mDNS (is the node id used twice?): %r", info.name, exc)
            else:
                log.info("announced %s at %s:%d on %s", info.name, host, port, interface)
            task_status.started()
    finally:
        events_recv.close()  # the browser thread's last events are dropped quietly
        with trio.move_on_after(_MDNS_SHUTDOWN) as cleanup:
            cleanup.shield = True
            await trio.to_thread.run_sync(_shutdown, zc, browser, abandon_on_cancel=True)
        if cleanup.cancelled_caught:
            log.warning("zeroconf did not shut down within %ss; left it to finish in the background", _MDNS_SHUTDOWN)
