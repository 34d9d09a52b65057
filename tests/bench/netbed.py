"""A private network of Linux network namespaces with shaped links, for swarm benchmarks.

::

    <run>-seed  10.88.0.2  eth0 --tbf seed rate-- s0 -+
    <run>-n1    10.88.0.11 eth0 --tbf node rate-- n1 -+-- bridge br0 in namespace <run>-sw
    ...                                               |
    <run>-nN    10.88.0.1N eth0 --tbf node rate-- nN -+

``<run>`` is ``p2pbed-<6 hex>``, unique per run. Every link is shaped in both directions with
``tc tbf``: the host's egress on its ``eth0`` (its uplink) and the switch port's egress toward
the host (its downlink); see :class:`LinkRates` for rates and queue lengths.

Nothing is created in the root namespace: the bridge lives in the switch namespace, each veth
pair is created there and one end moved into the host namespace, and 10.88.0.0/24 exists only
inside these namespaces (no default route, no path out). Each host has ``lo`` up and a
224.0.0.0/4 route on ``eth0``, so mDNS stays on the private bridge.

Processes run inside a host with ``ip netns exec`` (:meth:`Netbed.start_in`, :meth:`Netbed.run_in`);
every process started through the testbed is stopped on exit, then whatever is still inside one
of its namespaces is killed, and the namespaces are deleted (which removes the veths and the
bridge). The testbed is a context manager and always tears down, also on an exception or
KeyboardInterrupt; :func:`install_signal_handlers` turns SIGTERM/SIGHUP into an exception so
``finally`` blocks run. A run killed with SIGKILL leaves its namespaces behind: the owner file
``/run/p2pbed/<id>.json`` (pid + start time of the owning process) lets :func:`cleanup_stale`
delete them, and only them, on the next run.

Kernel notes: tbf is built into this kernel, netem is not (no delay or loss emulation). The
neighbour (ARP) table is shared by all namespaces, so the hosts of a site get permanent entries
for each other (see :meth:`Netbed._pin_neighbours`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from tests.harness.tools import clean_env, stop_process

log = logging.getLogger("tests.bench.netbed")

PREFIX = "p2pbed"
OWNER_DIR = Path("/run/p2pbed")
SUBNET = "10.88.0"
SEED_IP = f"{SUBNET}.2"
FIRST_NODE_HOST = 11  # node i (1-based) is 10.88.0.(10 + i)
MAX_NODES = 200
_NS_RE = re.compile(rf"^{PREFIX}-([0-9a-f]{{6}})-(sw|seed|n\d+)$")
_CMD_TIMEOUT = 20.0
_SHORT_PARENT = "/tmp"  # for unix sockets, whose paths must stay under ~108 bytes


class NetbedError(Exception):
    """The testbed could not be built or a command inside it failed."""


@dataclass(frozen=True)
class LinkRates:
    """Shaped rates in Mbit/s (10**6 bit/s, tc's ``mbit``) and queue lengths (tbf ``latency``, ms).

    The seed's link is a WAN uplink with a deep queue (100 ms by default, as on a typical
    bloated uplink); node links are LAN switch ports with a short one (25 ms).
    """

    seed_up: float  # seed -> switch (what the seed can send)
    node_up: float  # node -> switch
    node_down: float  # switch -> node
    seed_down: float | None = None  # switch -> seed; default: seed_up (a symmetric thin link)
    seed_queue_ms: float = 100.0
    node_queue_ms: float = 25.0

    @property
    def seed_down_rate(self) -> float:
        return self.seed_up if self.seed_down is None else self.seed_down


_HOST_CC = Path("/proc/sys/net/ipv4/tcp_congestion_control")
_ALLOWED_CC = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")


def host_congestion_control() -> str:
    """The host's default TCP congestion control (what a namespace created now starts with)."""
    try:
        return _HOST_CC.read_text().strip()
    except OSError:
        return "unknown"


def node_ip(index: int, site: int = 0) -> str:
    """Address of node ``index`` (1-based) in site ``site`` (0-based; site k is 10.88.k.0/24)."""
    return f"{site_subnet(site)}.{FIRST_NODE_HOST - 1 + index}"


def site_subnet(site: int) -> str:
    return SUBNET if site == 0 else f"{SUBNET.rsplit('.', 1)[0]}.{site}"


def seed_ip(site: int = 0) -> str:
    """The seed's address on site ``site``'s link."""
    return f"{site_subnet(site)}.2"


def _ip() -> str:
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin") or "ip"


def _tc() -> str:
    return shutil.which("tc") or shutil.which("tc", path="/usr/sbin:/sbin") or "tc"


def _run(argv: Sequence[str], *, timeout: float = _CMD_TIMEOUT, check: bool = True,
         env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=clean_env(env),
                          stdin=subprocess.DEVNULL, check=False)
    if check and proc.returncode != 0:
        raise NetbedError(f"{' '.join(argv)} -> exit {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    out = _run([_ip(), "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    out = _run([_ip(), "netns", "pids", ns], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): with the pid, identifies a process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()[19]


def _kill_namespace_pids(ns: str) -> int:
    """SIGKILL every process still inside namespace ``ns`` (all started by this testbed); returns the count."""
    pids = [p for p in namespace_pids(ns) if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) not in ("Z", "X", None)]
        time.sleep(0.05)
    return len(pids)


def _state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()[0]


def _delete_run(run_id: str, namespaces: Sequence[str], *, remove_workdir: bool = True) -> None:
    """Kill what is left in the run's namespaces, delete them, remove the run's owner file and work dir."""
    owner = OWNER_DIR / f"{run_id}.json"
    workdir: str | None = None
    with contextlib.suppress(OSError, ValueError):
        workdir = json.loads(owner.read_text()).get("workdir")
    # Hosts first, the switch last (deleting it removes the bridge and the switch ends of the veths).
    for ns in sorted(namespaces, key=lambda n: n.endswith("-sw")):
        left = _kill_namespace_pids(ns)
        if left:
            log.warning("%d processes in %s did not die", left, ns)
        _run([_ip(), "netns", "del", ns], check=False)
    if remove_workdir and workdir and Path(workdir).name.startswith(f"{PREFIX}-{run_id}"):
        shutil.rmtree(workdir, ignore_errors=True)
    for short in Path(_SHORT_PARENT).glob(f"{PREFIX}-{run_id}.sock-*"):
        shutil.rmtree(short, ignore_errors=True)
    owner.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        OWNER_DIR.rmdir()  # only if no other run is alive


def _write_owner(run_id: str, workdir: Path) -> None:
    record = json.dumps({"pid": os.getpid(), "start_time": _start_time(os.getpid()), "workdir": str(workdir)})
    for attempt in range(3):  # another run may remove the (empty) directory in between
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        try:
            (OWNER_DIR / f"{run_id}.json").write_text(record)
            return
        except FileNotFoundError:
            if attempt == 2:
                raise


def cleanup_stale() -> list[str]:
    """Deletes the namespaces (and work dirs) of testbed runs whose owning process is gone.

    A run is stale when its owner file is missing or names a process that no longer exists (pid
    and start time). Namespaces of a live run (e.g. a concurrent test) are left alone. Returns
    the run ids removed.
    """
    runs: dict[str, list[str]] = {}
    for ns in list_namespaces():
        match = _NS_RE.match(ns)
        if match:
            runs.setdefault(match.group(1), []).append(ns)
    # Owner files whose namespaces are all gone (a crash between the two) are stale too.
    if OWNER_DIR.is_dir():
        for owner in OWNER_DIR.glob("*.json"):
            runs.setdefault(owner.stem, [])
    removed = []
    for run_id, namespaces in runs.items():
        if _owner_alive(run_id):
            continue
        log.warning("removing stale testbed run %s (%s)", run_id, ", ".join(namespaces) or "no namespaces")
        _delete_run(run_id, namespaces)
        removed.append(run_id)
    return removed


def _owner_alive(run_id: str) -> bool:
    try:
        owner = json.loads((OWNER_DIR / f"{run_id}.json").read_text())
        pid, started = int(owner["pid"]), str(owner["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return _start_time(pid) == started


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived (raised so that cleanup runs)."""


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGHUP raise, and SIGINT raise KeyboardInterrupt even when the process was
    started with it ignored (a background job of a script), so teardown runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(f"received {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


class Netbed:
    """One seed host and ``nodes`` node hosts on a private bridge, links shaped with tbf.

    With ``sites`` > 1 the nodes are split into that many sites of equal size, each on its own
    bridge (``br<k>``, subnet 10.88.k.0/24, so mDNS never crosses sites) with its own link to
    the seed (the seed has one interface per site, ``eth<k>`` = 10.88.k.2, switch port
    ``s<k>``, shaped at ``seed_up``/``seed_down`` each: every site's uplink). Sites reach each
    other only through nothing: no routing between subnets.

    Args:
        nodes: number of node hosts (1..200).
        rates: the shaped link rates.
        sites: number of sites (``nodes`` must divide evenly).
        workdir: parent directory for the run's files (default: the system temp dir); the run
            uses ``<workdir>/p2pbed-<id>-XXXX`` and removes it on exit (``keep_files`` keeps it).

    Attributes after start: ``run_id``, ``sw``, ``seed`` (namespace names), ``nodes`` (list of
    node namespace names, index 0 is node 1), ``seed_ip``, ``node_ips``, ``dir`` (the run's files).
    """

    def __init__(self, nodes: int, rates: LinkRates, *, workdir: str | Path | None = None,
                 keep_files: bool = False, sites: int = 1, congestion_control: str | None = None) -> None:
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be between 1 and {MAX_NODES}")
        if not 1 <= sites <= 8 or nodes % sites:
            raise ValueError("sites must be 1..8 and divide the node count")
        self.count = nodes
        self.sites = sites
        self.rates = rates
        self.run_id = secrets.token_hex(3)
        base = f"{PREFIX}-{self.run_id}"
        self.sw = f"{base}-sw"
        self.seed = f"{base}-seed"
        self.nodes = [f"{base}-n{i}" for i in range(1, nodes + 1)]
        self.seed_ip = SEED_IP
        self.seed_ips = [seed_ip(k) for k in range(sites)]
        self.node_ips = [node_ip(i, self.site_of(i)) for i in range(1, nodes + 1)]
        self._parent = Path(workdir) if workdir is not None else None
        self.keep_files = keep_files
        self.dir = Path()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._created: list[str] = []
        self._started = False
        # TCP congestion control of every namespace; None: the host's default, which new
        # namespaces inherit. Another one must be in the host's allowed list (a global
        # sysctl): it is added for the run and the list restored at stop.
        self.congestion_control = congestion_control
        self._allowed_before: str | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    @property
    def namespaces(self) -> list[str]:
        return [self.sw, self.seed, *self.nodes]

    def site_of(self, index: int) -> int:
        """The site (0-based) of node ``index`` (1-based)."""
        return (index - 1) // (self.count // self.sites)

    def ports(self) -> dict[str, str]:
        """Switch port name (in the switch namespace) -> host namespace (the seed has one per site)."""
        seed_ports = {f"s{k}": self.seed for k in range(self.sites)}
        return {**seed_ports, **{f"n{i}": ns for i, ns in enumerate(self.nodes, 1)}}

    def start(self) -> Netbed:
        if self._started:
            raise RuntimeError("testbed already started")
        self._started = True
        if self._parent is not None:
            self._parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.run_id}-", dir=self._parent))
        _write_owner(self.run_id, self.dir)
        if self.congestion_control is not None:
            allowed = _ALLOWED_CC.read_text().split()
            if self.congestion_control not in allowed:
                self._allowed_before = " ".join(allowed)
                _ALLOWED_CC.write_text(" ".join([*allowed, self.congestion_control]))
        ip = _ip()
        self._add_ns(self.sw)
        sw = [ip, "-n", self.sw]
        _run([*sw, "link", "set", "lo", "up"])
        for k in range(self.sites):
            _run([*sw, "link", "add", f"br{k}", "type", "bridge", "mcast_snooping", "0"])
            _run([*sw, "link", "set", f"br{k}", "up"])
        rates = self.rates
        # (switch port, bridge, host ns, host device, address, up, down, queue)
        hosts = [(f"s{k}", k, self.seed, f"eth{k}", self.seed_ips[k], rates.seed_up, rates.seed_down_rate,
                  rates.seed_queue_ms) for k in range(self.sites)]
        hosts += [(f"n{i}", self.site_of(i), ns, "eth0", self.node_ips[i - 1], rates.node_up, rates.node_down,
                   rates.node_queue_ms) for i, ns in enumerate(self.nodes, 1)]
        for port, site, ns, dev, address, up, down, queue_ms in hosts:
            if ns not in self._created:
                self._add_ns(ns)
                _run([ip, "-n", ns, "link", "set", "lo", "up"])
            host = [ip, "-n", ns]
            _run([*sw, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns])
            _run([*sw, "link", "set", port, "master", f"br{site}", "up"])
            _run([*host, "addr", "add", f"{address}/24", "dev", dev])
            _run([*host, "link", "set", dev, "up"])
            if dev == "eth0":
                _run([*host, "route", "add", "224.0.0.0/4", "dev", dev])  # multicast (mDNS) on the bridge
            self.shape(ns, dev, up, queue_ms)  # the host's uplink
            self.shape(self.sw, port, down, queue_ms)  # the host's downlink
        self._pin_neighbours()
        return self

    def _pin_neighbours(self) -> None:
        """Permanent ARP entries between the hosts of each site (the seed's interface included).

        The kernel keeps one neighbour table for all namespaces, and its limit
        (``net.ipv4.neigh.default.gc_thresh3``, 1024 by default) counts the dynamic entries of
        every namespace together: 32 fully meshed nodes need 32 * 33, new entries then fail and a
        node's SYNs wait unsent until they time out ("neighbor table overflow" in dmesg; it made
        every N = 32 cell of ``bench-swarm`` fail pulls). Real hosts each have their own table.
        Permanent entries are not counted, so the testbed pins them instead of raising a
        host-wide limit.
        """
        ip = _ip()
        for site in range(self.sites):
            hosts = [(self.seed, f"eth{site}", self.seed_ips[site])]
            hosts += [(ns, "eth0", address) for i, (ns, address) in enumerate(zip(self.nodes, self.node_ips,
                                                                                   strict=True), 1)
                      if self.site_of(i) == site]
            macs = [json.loads(_run([ip, "-n", ns, "-j", "link", "show", "dev", dev]).stdout)[0]["address"]
                    for ns, dev, _ in hosts]
            for ns, dev, address in hosts:
                batch = self.dir / f"neigh-{ns}-{dev}.batch"
                batch.write_text("".join(f"neigh replace {other} lladdr {mac} dev {dev} nud permanent\n"
                                         for (_, _, other), mac in zip(hosts, macs, strict=True) if other != address))
                _run([ip, "-n", ns, "-batch", str(batch)])

    def _add_ns(self, ns: str) -> None:
        _run([_ip(), "netns", "add", ns])
        self._created.append(ns)
        if self.congestion_control is not None:
            # /proc/sys/net is the reading process's namespace's (no procps needed for sysctl).
            _run([_ip(), "netns", "exec", ns, "sh", "-c", f'echo "$1" > {_HOST_CC}', "sh", self.congestion_control])

    @staticmethod
    def shape(ns: str, dev: str, mbit: float, queue_ms: float) -> None:
        """tbf on ``dev``'s egress in ``ns``: ``mbit`` Mbit/s, burst ≥ 64 KiB (≥ 4 ms of traffic), a queue
        of ``queue_ms`` (packets that would wait longer are dropped)."""
        burst = max(64 * 1024, int(mbit * 1e6 / 8 * 0.004))
        _run([_tc(), "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit:g}mbit",
              "burst", str(burst), "latency", f"{queue_ms:g}ms"])

    def stop(self) -> None:
        """Stops every process, deletes every namespace and the run's files. Idempotent.

        SIGINT, SIGTERM, SIGHUP and SIGALRM are held back until the teardown is done (when called
        from the main thread), so a second Ctrl-C or a deadline cannot cut it short.
        """
        with _signals_deferred():
            self._stop()

    def _stop(self) -> None:
        errors: list[str] = []
        for proc in reversed(self._procs):
            try:
                stop_process(proc, timeout=5)
            except Exception as exc:  # keep tearing down
                errors.append(f"stopping pid {proc.pid}: {exc}")
        self._procs.clear()
        if self._created:
            _delete_run(self.run_id, list(self._created), remove_workdir=not self.keep_files)
            self._created.clear()
        else:
            (OWNER_DIR / f"{self.run_id}.json").unlink(missing_ok=True)
        if self.dir != Path() and not self.keep_files:
            shutil.rmtree(self.dir, ignore_errors=True)
        left = [ns for ns in list_namespaces() if ns.startswith(f"{PREFIX}-{self.run_id}-")]
        if left:
            errors.append(f"namespaces left: {left}")
        if self._allowed_before is not None:
            try:
                _ALLOWED_CC.write_text(self._allowed_before)
                self._allowed_before = None
            except OSError as exc:
                errors.append(f"restoring {_ALLOWED_CC}: {exc}")
        if errors:
            log.error("testbed teardown: %s", "; ".join(errors))

    def __enter__(self) -> Netbed:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def short_dir(self) -> Path:
        """A new directory with a short path (for unix sockets), removed with the testbed."""
        return Path(tempfile.mkdtemp(prefix=f"{PREFIX}-{self.run_id}.sock-", dir=_SHORT_PARENT))

    # ---- processes ------------------------------------------------------------------------

    def exec_argv(self, ns: str, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not a namespace of this testbed")
        return [_ip(), "netns", "exec", ns, *(os.fspath(a) for a in argv)]

    def run_in(self, ns: str, argv: Sequence[str | os.PathLike[str]], *, timeout: float = _CMD_TIMEOUT,
               check: bool = True, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` inside ``ns`` to completion (bounded by ``timeout``; env merged over ours)."""
        return _run(self.exec_argv(ns, argv), timeout=timeout, check=check, env=env)

    def start_in(self, ns: str, argv: Sequence[str | os.PathLike[str]], *, log_path: str | os.PathLike[str],
                 env: Mapping[str, str] | None = None, stdin_pipe: bool = False, stdout_pipe: bool = False,
                 unset_prefixes: Sequence[str] = ()) -> subprocess.Popen[bytes]:
        """Starts a long-running process inside ``ns`` (own session; stopped by :meth:`stop`).

        ``ip netns exec`` execs the command, so the returned pid is the command's own. Output
        goes to ``log_path`` (stderr always; stdout unless ``stdout_pipe``).
        """
        full = self.exec_argv(ns, argv)
        log.debug("start in %s: %s", ns, " ".join(full))
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(full, stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE if stdout_pipe else logf, stderr=logf,
                                    env=clean_env(env, unset_prefixes=unset_prefixes), start_new_session=True)
        self._procs.append(proc)
        return proc

    def stop_proc(self, proc: subprocess.Popen[bytes], *, timeout: float = 10.0) -> int | None:
        """Stops one process started with :meth:`start_in` before the testbed ends."""
        code = stop_process(proc, timeout=timeout)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)
        return code

    # ---- observation ----------------------------------------------------------------------

    def link_bytes(self, ports: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, int]]:
        """Bytes through every switch port: ``{host ns: {"up": host->switch, "down": switch->host}}``.

        Counted at the switch end of each veth (L2 frames, headers included); from ``ports`` (a
        ``port_bytes()`` reading) when given, else from a new reading.
        """
        result: dict[str, dict[str, int]] = {}
        for port, counts in (self.port_bytes() if ports is None else ports).items():
            total = result.setdefault(self.ports()[port], {"up": 0, "down": 0})
            total["up"] += counts["up"]
            total["down"] += counts["down"]
        return result

    def port_bytes(self) -> dict[str, dict[str, int]]:
        """The same per switch port (``s<k>``: the seed's link to site k, ``n<i>``: node i)."""
        data: list[dict[str, Any]] = json.loads(_run([_ip(), "-n", self.sw, "-s", "-j", "link", "show"]).stdout)
        ports = self.ports()
        result = {}
        for link in data:
            name = link.get("ifname")
            if name in ports:
                stats = link.get("stats64", {})
                result[name] = {"up": int(stats["rx"]["bytes"]), "down": int(stats["tx"]["bytes"])}
        return result

    def qdisc_drops(self) -> dict[str, int]:
        """Packets dropped by each host's uplink tbf (its queue overflowed)."""
        drops = {}
        devices = [(self.seed, f"eth{k}") for k in range(self.sites)] + [(ns, "eth0") for ns in self.nodes]
        for ns, dev in devices:
            out = _run([_tc(), "-n", ns, "-s", "-j", "qdisc", "show", "dev", dev], check=False).stdout
            with contextlib.suppress(ValueError):
                drops[ns] = drops.get(ns, 0) + sum(int(q.get("drops", 0)) for q in json.loads(out or "[]")
                                                   if q.get("kind") == "tbf")
        return drops


class NsWorker:
    """A ``tests.bench.nsworker`` process inside one namespace of ``bed``; :meth:`call` runs one command.

    The worker's stdout carries only the answers; its stderr goes to ``<bed.dir>/worker-<ns>.log``.
    """

    def __init__(self, bed: Netbed, ns: str) -> None:
        self.ns = ns
        root = Path(__file__).resolve().parents[2]  # the tree holding the ``tests`` package
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        self.proc = bed.start_in(ns, [sys.executable, "-m", "tests.bench.nsworker"],
                                 log_path=bed.dir / f"worker-{ns}.log", env=env, stdin_pipe=True, stdout_pipe=True)
        self._answers: queue.Queue[bytes] = queue.Queue()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, name=f"worker-{ns}", daemon=True).start()
        self.pid = int(self.call("ping", timeout=30)["pid"])

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._answers.put(line)
        self._answers.put(b"")  # EOF: the worker exited

    def call(self, op: str, *, timeout: float, **args: Any) -> dict[str, Any]:
        """Sends one command and waits at most ``timeout`` seconds for its answer."""
        assert self.proc.stdin is not None
        with self._lock:
            try:
                self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError) as exc:
                raise NetbedError(f"worker in {self.ns} is gone ({exc})") from None
            try:
                line = self._answers.get(timeout=timeout)
            except queue.Empty:
                raise NetbedError(f"worker in {self.ns}: no answer to {op!r} within {timeout:g} s") from None
        if not line:
            raise NetbedError(f"worker in {self.ns} exited (code {self.proc.poll()})")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise NetbedError(f"worker in {self.ns}: {op} failed: {answer.get('error')}")
        result: dict[str, Any] = answer["result"]
        return result

    def get(self, url: str, *, timeout: float = 5.0) -> dict[str, Any]:
        # The worker answers within ``timeout`` unless the machine starves it: 32 agents starting
        # at once (each compiling its modules) kept a worker from answering for over 7 s.
        return self.call("get", timeout=timeout + 30, url=url, timeout_s=timeout)


@contextlib.contextmanager
def netbed(nodes: int, rates: LinkRates, **kwargs: Any) -> Iterator[Netbed]:
    """``with netbed(3, LinkRates(...)) as bed:`` — the same as ``with Netbed(...)``."""
    with Netbed(nodes, rates, **kwargs) as bed:
        yield bed
