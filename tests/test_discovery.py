"""Discovery sources: TXT validation, the mDNS event tracker, static peers, DNS, and real mDNS.

Zeroconf is never instantiated in this (root network namespace) process. The real mDNS test
runs tests/mdns_node.py under ``unshare -n``, in a namespace that has only loopback.
"""

from __future__ import annotations

import ast
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import p2pd
from p2pd.swarm import discovery
from p2pd.swarm.discovery import (
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Sighting,
    run_dns,
    run_mdns,
    run_static,
    sighting_from_txt,
)
from tests.harness import tools

HELPER = Path(__file__).with_name("mdns_node.py")
ROOT = Path(p2pd.__file__).parent.parent


def txt(**values: str | bytes | None) -> dict[bytes, bytes | None]:
    base: dict[str, str | bytes | None] = {"node": "node-b", "port": "7002", "v": PROTOCOL_VERSION, "site": "rack-1"}
    base.update(values)
    return {k.encode(): v.encode() if isinstance(v, str) else v for k, v in base.items()}


def without(key: str) -> dict[bytes, bytes | None]:
    properties = txt()
    del properties[key.encode()]
    return properties


# -- sighting_from_txt ----------------------------------------------------------------------------


def test_txt_valid() -> None:
    assert sighting_from_txt(txt(extra="ignored"), "127.0.0.1", "node-a") == Sighting(
        source="mdns", address="127.0.0.1:7002", node_id="node-b", site="rack-1"
    )
    assert sighting_from_txt(txt(node="N" + "x" * 62, port="65535"), "10.0.0.1", "a") is not None


@pytest.mark.parametrize(
    "properties",
    [
        txt(v="2"),
        txt(v=""),
        without("v"),
        txt(node="node.b"),  # dots: not a DNS label
        txt(node="-node"),
        txt(node=""),
        txt(node="x" * 64),
        txt(node=b"n\xc3\xb6de"),  # non-ASCII
        txt(node=b"\xff\xfe"),  # not even UTF-8
        txt(node=None),  # key without a value
        without("node"),
        txt(node="node-a"),  # our own announcement
        txt(site="a b"),
        txt(site="a.b"),
        without("site"),
        without("port"),
        txt(port="0"),
        txt(port="65536"),
        txt(port="080"),
        txt(port="+80"),
        txt(port=" 80"),
        txt(port="80\n"),
        txt(port="٣"),  # a non-ASCII digit
        txt(port="999999999999999999999"),
    ],
    ids=lambda p: repr(p)[:60],
)
def test_txt_invalid(properties: dict[bytes, bytes | None]) -> None:
    assert sighting_from_txt(properties, "127.0.0.1", "node-a") is None


@pytest.mark.parametrize(
    "address",
    ["::1", "0.0.0.0", "224.0.0.251", "255.255.255.255", "localhost", "1.2.3", "010.0.0.1", "127.0.0.1:80", ""],
)
def test_txt_address_must_be_unicast_ipv4(address: str) -> None:
    assert sighting_from_txt(txt(), address, "node-a") is None


@given(
    st.dictionaries(
        st.sampled_from([b"node", b"port", b"v", b"site", b"x", b""]),
        st.one_of(st.none(), st.binary(max_size=70), st.sampled_from([b"1", b"node-1", b"80"])),
    ),
    st.text(max_size=20),
)
def test_txt_never_raises(properties: dict[bytes, bytes | None], address: str) -> None:
    result = sighting_from_txt(properties, address, "me")
    if result is not None:
        assert result.node_id != "me" and result.source == "mdns"


def test_instance_name_must_be_the_node_id() -> None:
    name = f"node-b.{SERVICE_TYPE}"
    assert discovery._sighting_from_resolved(name, (txt(), ["127.0.0.1"]), "node-a") is not None
    assert discovery._sighting_from_resolved(name.upper(), (txt(), ["127.0.0.1"]), "node-a") is not None
    assert discovery._sighting_from_resolved(f"evil.{SERVICE_TYPE}", (txt(), ["127.0.0.1"]), "node-a") is None
    assert discovery._sighting_from_resolved("node-b._other._tcp.local.", (txt(), ["127.0.0.1"]), "node-a") is None
    # The first usable address wins; no address, no sighting.
    found = discovery._sighting_from_resolved(name, (txt(), ["0.0.0.0", "10.1.1.1", "10.2.2.2"]), "node-a")
    assert found is not None and found.address == "10.1.1.1:7002"
    assert discovery._sighting_from_resolved(name, (txt(), []), "node-a") is None


# -- The mDNS tracker (browser events -> sightings), with a fake resolver --------------------------


class FakeZone:
    """What the fake resolver answers: instance -> (TXT, addresses); a gate can hold answers back."""

    def __init__(self) -> None:
        self.records: dict[str, Any] = {}
        self.gates: dict[str, trio.Event] = {}
        self.calls: list[str] = []

    def set(self, instance: str, address: str = "127.0.0.1", **values: str | bytes | None) -> None:
        self.records[instance] = (txt(node=instance, **values), [address])

    async def resolve(self, name: str) -> Any:
        instance = name.split(".")[0]
        self.calls.append(instance)
        if instance in self.gates:
            await self.gates[instance].wait()
        record = self.records.get(instance)
        if isinstance(record, Exception):
            raise record
        return record


def name(instance: str) -> str:
    return f"{instance}.{SERVICE_TYPE}"


class TrackerRig:
    def __init__(self, nursery: trio.Nursery, **kwargs: Any) -> None:
        self.zone = FakeZone()
        self.events_send, events_recv = trio.open_memory_channel[Any](100)
        send, self.recv = trio.open_memory_channel[Sighting](100)
        tracker = discovery._ServiceTracker(self.zone.resolve, send, own_node="node-a", **kwargs)
        nursery.start_soon(tracker.run, events_recv)

    async def event(self, change: str, instance: str) -> None:
        await self.events_send.send((change, name(instance)))
        await trio.testing.wait_all_tasks_blocked()

    def drain(self) -> list[tuple[str | None, str, bool]]:
        out: list[tuple[str | None, str, bool]] = []
        while True:
            try:
                s = self.recv.receive_nowait()
            except trio.WouldBlock:
                return out
            out.append((s.node_id, s.address, s.gone))


@pytest.fixture
def rig(nursery: trio.Nursery) -> Iterator[TrackerRig]:
    yield TrackerRig(nursery)
    nursery.cancel_scope.cancel()


async def test_tracker_added_updated_removed(rig: TrackerRig) -> None:
    rig.zone.set("node-b", "10.0.0.2")
    await rig.event("added", "node-b")
    assert rig.drain() == [("node-b", "10.0.0.2:7002", False)]
    await rig.event("updated", "node-b")  # same records: nothing new
    assert rig.drain() == []
    rig.zone.set("node-b", "10.0.0.3")  # moved: withdraw the old address first
    await rig.event("updated", "node-b")
    assert rig.drain() == [("node-b", "10.0.0.2:7002", True), ("node-b", "10.0.0.3:7002", False)]
    rig.zone.set("node-b", "10.0.0.3", site="rack-9")  # same address, new site
    await rig.event("updated", "node-b")
    assert rig.drain() == [("node-b", "10.0.0.3:7002", False)]
    await rig.event("removed", "node-b")
    assert rig.drain() == [("node-b", "10.0.0.3:7002", True)]
    await rig.event("removed", "node-b")  # unknown now: nothing
    assert rig.drain() == []


async def test_tracker_ignores_own_and_invalid(rig: TrackerRig) -> None:
    rig.zone.set("node-a")
    rig.zone.set("node-c", v="2")
    rig.zone.set("node-d", port="0")
    for instance in ("node-a", "node-c", "node-d", "node-e"):  # node-e: resolution finds nothing
        await rig.event("added", instance)
    assert rig.drain() == []
    assert "node-a" not in rig.zone.calls  # our own instance is not even resolved
    await rig.event("removed", "node-c")
    assert rig.drain() == []


async def test_tracker_update_to_incompatible_version_withdraws(rig: TrackerRig) -> None:
    rig.zone.set("node-b")
    await rig.event("added", "node-b")
    rig.zone.set("node-b", v="2")
    await rig.event("updated", "node-b")
    assert rig.drain() == [("node-b", "127.0.0.1:7002", False), ("node-b", "127.0.0.1:7002", True)]


async def test_tracker_keeps_known_peer_when_resolution_times_out(rig: TrackerRig) -> None:
    rig.zone.set("node-b")
    await rig.event("added", "node-b")
    del rig.zone.records["node-b"]  # get_service_info returns None
    await rig.event("updated", "node-b")
    assert rig.drain() == [("node-b", "127.0.0.1:7002", False)]


async def test_tracker_resolver_errors_are_contained(rig: TrackerRig) -> None:
    rig.zone.records["node-b"] = ValueError("hostile packet")
    await rig.event("added", "node-b")
    rig.zone.set("node-c")
    await rig.event("added", "node-c")
    assert rig.drain() == [("node-c", "127.0.0.1:7002", False)]


async def test_tracker_goodbye_during_resolution_wins(rig: TrackerRig) -> None:
    rig.zone.set("node-b")
    rig.zone.gates["node-b"] = gate = trio.Event()
    await rig.event("added", "node-b")
    await rig.event("removed", "node-b")
    gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert rig.drain() == []  # the stale answer is discarded


async def test_tracker_update_during_resolution_resolves_again(rig: TrackerRig) -> None:
    rig.zone.set("node-b", "10.0.0.2")
    rig.zone.gates["node-b"] = gate = trio.Event()
    await rig.event("added", "node-b")
    rig.zone.set("node-b", "10.0.0.9")
    await rig.event("updated", "node-b")  # queued again while the first lookup waits
    gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert rig.drain() == [("node-b", "10.0.0.9:7002", False)]
    assert rig.zone.calls.count("node-b") == 2


async def test_tracker_bounds_tracked_services(nursery: trio.Nursery) -> None:
    rig = TrackerRig(nursery, max_services=2)
    for instance in ("node-b", "node-c", "node-d"):
        rig.zone.gates[instance] = trio.Event()  # all stay unresolved
        rig.zone.set(instance)
        await rig.event("added", instance)
    assert sorted(rig.zone.calls) == ["node-b", "node-c"]  # node-d was dropped
    for gate in rig.zone.gates.values():
        gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert {s[0] for s in rig.drain()} == {"node-b", "node-c"}
    await rig.event("added", "node-d")  # still full (of valid peers)
    assert rig.drain() == []
    await rig.event("removed", "node-b")
    await rig.event("added", "node-d")
    assert rig.drain() == [("node-b", "127.0.0.1:7002", True), ("node-d", "127.0.0.1:7002", False)]
    nursery.cancel_scope.cancel()


# -- run_mdns argument checks (no zeroconf instance is ever created here) --------------------------


@pytest.fixture
def no_zeroconf(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Zeroconf() must never run in the test process (root network namespace)")

    monkeypatch.setattr(discovery, "Zeroconf", refuse)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"node_id": "node.a"},
        {"node_id": ""},
        {"site": "a b"},
        {"interface": "0.0.0.0"},
        {"interface": "eth0"},
        {"interface": "::1"},
        {"interface": "224.0.0.251"},
        {"address": "node-a.example:7000"},
        {"address": "127.0.0.1"},
        {"address": "127.0.0.1:0"},
        {"address": "[::1]:7000"},
    ],
)
async def test_run_mdns_rejects_bad_arguments(no_zeroconf: None, kwargs: dict[str, str]) -> None:
    send, _ = trio.open_memory_channel[Sighting](1)
    args = {"node_id": "node-a", "site": "s", "address": "127.0.0.1:7000", "interface": "127.0.0.1", **kwargs}
    with trio.fail_after(1), pytest.raises(ValueError):
        await run_mdns(
            send=send, node_id=args["node_id"], site=args["site"], address=args["address"], interface=args["interface"]
        )


def test_advertised_unspecified_host_means_the_interface() -> None:
    assert discovery._split_advertised("0.0.0.0:7000", "10.0.0.5") == ("10.0.0.5", 7000)
    assert discovery._split_advertised(":7000", "10.0.0.5") == ("10.0.0.5", 7000)
    assert discovery._split_advertised("10.0.0.6:7000", "10.0.0.5") == ("10.0.0.6", 7000)


# -- run_static -----------------------------------------------------------------------------------


async def test_run_static_repeats(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    send, recv = trio.open_memory_channel[Sighting](10)
    await nursery.start(run_static, ["10.0.0.1:7000", "peer.example:7000"], send)
    start = trio.current_time()
    got = [await recv.receive() for _ in range(4)]
    assert [s.address for s in got] == ["10.0.0.1:7000", "peer.example:7000"] * 2
    assert all(s.source == "static" and s.node_id is None and not s.gone for s in got)
    assert trio.current_time() - start == pytest.approx(60.0)
    nursery.cancel_scope.cancel()


async def test_run_static_small_interval_real_clock(nursery: trio.Nursery) -> None:
    send, recv = trio.open_memory_channel[Sighting](10)
    await nursery.start(
        lambda task_status: run_static(["127.0.0.1:7000"], send, interval=0.05, task_status=task_status)
    )
    with trio.fail_after(5):
        got = [await recv.receive() for _ in range(3)]
    assert {s.address for s in got} == {"127.0.0.1:7000"}
    nursery.cancel_scope.cancel()


async def test_run_static_without_peers_just_waits(autojump_clock: trio.testing.MockClock) -> None:
    send, recv = trio.open_memory_channel[Sighting](10)
    with trio.move_on_after(1000):
        await run_static([], send)
    with pytest.raises(trio.WouldBlock):
        recv.receive_nowait()


# -- run_dns --------------------------------------------------------------------------------------


async def test_run_dns_localhost(nursery: trio.Nursery) -> None:
    # localhost resolves without a network; ::1 too where /etc/hosts lists it.
    send, recv = trio.open_memory_channel[Sighting](10)
    await nursery.start(
        lambda task_status: run_dns(
            ["localhost", "localhost:7010", "127.0.0.2"], 7000, send, interval=0.2, task_status=task_status
        )
    )
    expected = {"127.0.0.1:7000", "127.0.0.1:7010", "127.0.0.2:7000"}
    got: list[Sighting] = []
    with trio.fail_after(5):
        while not expected <= {s.address for s in got}:
            got.append(await recv.receive())
    with trio.move_on_after(0.7):  # more rounds: nothing new, nothing gone
        while True:
            got.append(await recv.receive())
    assert all(s.source == "dns" and not s.gone and s.node_id is None for s in got)
    assert {s.address for s in got} <= expected | {"[::1]:7000", "[::1]:7010"}
    assert len(got) == len({s.address for s in got})  # each address announced once
    nursery.cancel_scope.cancel()


class ScriptedResolver(trio.abc.HostnameResolver):
    """Answers for ``peers.test`` from a list: an address list per call, or an exception."""

    def __init__(self, script: list[list[str] | Exception]) -> None:
        self.script = script
        self.calls = 0

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> Any:
        answer = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(port, int | bytes | str)
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, int(port), 0, 0) if ":" in a else (a, int(port)),
            )
            for a in answer
        ]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> tuple[str, str]:
        raise NotImplementedError


def scripted(script: list[list[str] | Exception]) -> ScriptedResolver:
    """Install a scripted resolver for the current trio run (the setting dies with the run)."""
    resolver = ScriptedResolver(script)
    trio.socket.set_custom_hostname_resolver(resolver)
    return resolver


async def test_run_dns_failures_are_retried_and_keep_addresses(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    no_such_name = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    resolver = scripted(
        [
            no_such_name,  # round 1: fails, no crash
            ["10.0.0.1", "10.0.0.2"],  # round 2: both new
            ["10.0.0.2", "fd00::3"],  # round 3: .1 gone, v6 new
            OSError("resolver unreachable"),  # round 4: keep what we had
            ["fd00::3"],  # round 5: .2 gone
        ]
    )
    send, recv = trio.open_memory_channel[Sighting](10)
    await nursery.start(
        lambda task_status: run_dns(["peers.test:7700"], 7000, send, interval=30, task_status=task_status)
    )
    start = trio.current_time()

    async def next_round() -> list[tuple[str, bool]]:
        await trio.sleep(30)
        await trio.testing.wait_all_tasks_blocked()
        out: list[tuple[str, bool]] = []
        while True:
            try:
                s = recv.receive_nowait()
            except trio.WouldBlock:
                return out
            assert s.source == "dns" and s.node_id is None
            out.append((s.address, s.gone))

    await trio.testing.wait_all_tasks_blocked()
    assert resolver.calls == 1
    assert await next_round() == [("10.0.0.1:7700", False), ("10.0.0.2:7700", False)]
    assert await next_round() == [("[fd00::3]:7700", False), ("10.0.0.1:7700", True)]
    assert await next_round() == []
    assert await next_round() == [("10.0.0.2:7700", True)]
    assert resolver.calls == 5
    assert trio.current_time() - start == pytest.approx(120)
    nursery.cancel_scope.cancel()


async def test_run_dns_address_shared_by_two_names_stays(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # Both names get the same scripted answers, and "peers.test" stops resolving to .1 in round 2
    # while the literal still does: .1 must not be reported gone.
    scripted([["10.0.0.1"], ["10.0.0.2"]])
    send, recv = trio.open_memory_channel[Sighting](10)
    await nursery.start(
        lambda task_status: run_dns(["peers.test", "10.0.0.1"], 7000, send, interval=30, task_status=task_status)
    )
    await trio.sleep(45)
    got = []
    while True:
        try:
            got.append(recv.receive_nowait())
        except trio.WouldBlock:
            break
    assert [(s.address, s.gone) for s in got] == [("10.0.0.1:7000", False), ("10.0.0.2:7000", False)]
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize("bad", ["peers.test:0", "peers.test:http", ":7000", "[::1", "[::1]x", "peers.test:99999"])
async def test_run_dns_rejects_malformed_names(bad: str) -> None:
    send, _ = trio.open_memory_channel[Sighting](1)
    with trio.fail_after(1), pytest.raises(ValueError):
        await run_dns([bad], 7000, send, interval=1)


def test_split_dns_name() -> None:
    assert discovery._split_dns_name("p2pd.ns.svc", 7000) == ("p2pd.ns.svc", 7000)
    assert discovery._split_dns_name("p2pd.ns.svc:7100", 7000) == ("p2pd.ns.svc", 7100)
    assert discovery._split_dns_name("[fd00::1]:7100", 7000) == ("fd00::1", 7100)
    assert discovery._split_dns_name("[fd00::1]", 7000) == ("fd00::1", 7000)
    assert discovery._split_dns_name("fd00::1", 7000) == ("fd00::1", 7000)


# -- Layering -------------------------------------------------------------------------------------


def test_discovery_is_the_only_zeroconf_importer() -> None:
    importers = set()
    for package in ("p2pd", "seed"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                modules = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom) and not node.level
                    else []
                )
                if any(m.split(".")[0] == "zeroconf" for m in modules):
                    importers.add(path.relative_to(ROOT).as_posix())
    assert importers == {"p2pd/swarm/discovery.py"}


# -- Real mDNS, in a private network namespace ----------------------------------------------------


@pytest.mark.root
def test_mdns_two_nodes_in_private_namespace() -> None:
    unshare = tools.require_tool("unshare")
    tools.require_tool("ip")
    tools.require_root()
    proc = tools.run([unshare, "--net", sys.executable, HELPER], timeout=30, cwd=ROOT)
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    seen: dict[str, list[dict[str, Any]]] = result["sightings"]

    def live(node: str) -> set[tuple[str, str, str]]:
        return {(s["node_id"], s["site"], s["address"]) for s in seen[node] if not s["gone"]}

    assert all(s["source"] == "mdns" for sightings in seen.values() for s in sightings)
    # Each sees the other (and the spoofer's one valid service), never itself or a spoof.
    assert live("node-a") == {("node-b", "site-2", "127.0.0.1:7002"), ("canary", "site-3", "127.0.0.1:7003")}
    assert live("node-b") == {("node-a", "site-1", "127.0.0.1:7001"), ("canary", "site-3", "127.0.0.1:7003")}
    # node-b's goodbye reached node-a as the last thing node-a heard.
    assert seen["node-a"][-1] == {**seen["node-a"][-1], "node_id": "node-b", "address": "127.0.0.1:7002", "gone": True}
    assert not any(s["gone"] for s in seen["node-b"])
    assert result["timings"]["goodbye_after_cancel"] < 5
