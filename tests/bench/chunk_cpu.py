"""``python -m tests.bench.chunk_cpu``: an agent's CPU per MiB when it takes a blob from one peer.

Two agents (subprocesses, static peers, cluster key, peer TLS) and a seed on loopback, no
shaping. ``a0`` pulls the blob first (from the seed); then ``a1`` pulls it, and takes every
chunk from ``a0`` (a complete copy in its site: no upstream lease). Measured over ``a1``'s
pull, from ``/proc``: the receiver's CPU (whole process, and its event-loop thread alone) and
the sender's, per MiB of the blob. The cases vary the chunk size (``[swarm] chunk_size``, the
largest a blob is cut in) and the blob size, so the chunk count goes from 64 to 2,048: work
done per chunk shows as CPU per MiB that grows as chunks get smaller, and work done per chunk
*per chunk of the blob* (a scan of every chunk each time one arrives) as CPU per MiB that grows
with the blob at a fixed chunk size. A case may pace the sender (``[swarm] upload_rate``: the
kernel spreads its packets at that rate, ``SO_MAX_PACING_RATE``) so the chunks arrive as over a
slow link, a few packets at a time, as they do in the swarm testbed; unpaced, each 16 KiB TLS
record is there whole when the receiver reads it. Each case also measures the *transport floor*
(``tests.bench.transport_floor``): the same chunks between two bare processes on one TLS
connection with no HTTP and no swarm — what the agents' per-chunk work is to be compared with.

The run happens in a private network namespace (``unshare --net``, root) whose loopback has a
1500-byte MTU (``--link-mtu``), as a real link has: on the host's loopback (MTU 64 KiB) a whole
chunk leaves in one packet, and a paced sender's rate shows only as the gap after it (the rows
then measure the loopback's pacing, not a slow link's: a 64 KiB row at 4 Mbit/s took 8.7 s where
the rate allows 16.8). ``--link-mtu 0``, or no root, runs on the host's loopback and says so.

Writes the section between ``<!-- bench-chunk-cpu:start -->`` and ``<!-- bench-chunk-cpu:end -->``
of ``--out`` and the raw numbers as JSON (``docs/bench/chunk_cpu.json``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

import p2pd.cli
from tests.bench import transport_floor
from tests.bench.common import MIB, loadavg, machine_basics, recut, report_header, run_and_publish
from tests.swarm_cluster import Cluster, pull_blob, push_blob, write_swarm_config

MARK_START = "<!-- bench-chunk-cpu:start -->"
MARK_END = "<!-- bench-chunk-cpu:end -->"
SECTION_TITLE = "## An agent's CPU per chunk, from one peer on loopback (make bench-chunk-cpu)"
REPOSITORY = "bench/cpu"
# Set (to the MTU) in the private network namespace the benchmark re-runs itself in.
_PRIVATE_LOOPBACK_ENV = "P2PD_BENCH_PRIVATE_LOOPBACK_MTU"
DEFAULT_LINK_MTU = 1500
# chunk KiB : blob MiB [: sender Mbit/s]. A blob is cut in a row's chunks only if it is big enough
# (chunk_size_for): 128 KiB from 16 MiB, 1 MiB from 512 MiB.
DEFAULT_CASES = "64:8,128:64,128:256,1024:512,1024:1024,64:8:4,128:16:4"


def _cpu_seconds(pid: int, thread: int | None = None) -> float:
    path = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(root: Path, key_file: Path, chunk_kib: int, blob_mib: float, paced_mbit: float,
             base: int) -> dict[str, Any]:
    pacing = {"upload_rate": int(paced_mbit * 1e6 / 8)} if paced_mbit else {}
    config = write_swarm_config(root / f"swarm-{base}.toml", chunk_size=chunk_kib * 1024, **pacing)
    size = int(blob_mib * MIB)
    with Cluster(root / f"cluster-{base}", key_file=key_file, count=2, base=base, config=config) as cluster:
        data = os.urandom(size)
        digest = push_blob(cluster.seed.url, REPOSITORY, data)
        del data
        cluster.wait_members()
        holder, receiver = cluster.agents
        assert trio.run(pull_blob, holder, REPOSITORY, digest) == digest
        time.sleep(0.5)  # the holder's announcement of its complete copy
        assert holder.proc is not None and receiver.proc is not None
        sender_pid, receiver_pid = holder.proc.pid, receiver.proc.pid
        before = (_cpu_seconds(sender_pid), _cpu_seconds(receiver_pid), _cpu_seconds(receiver_pid, receiver_pid))
        started = time.monotonic()
        assert trio.run(pull_blob, receiver, REPOSITORY, digest) == digest
        wall = time.monotonic() - started
        time.sleep(0.3)  # the receiver's final digest check and commit are part of the pull
        after = (_cpu_seconds(sender_pid), _cpu_seconds(receiver_pid), _cpu_seconds(receiver_pid, receiver_pid))
        from_peer = receiver.metric("p2pd_fetched_bytes_total", source="peer")
    mib = size / MIB
    chunk = chunk_kib * 1024
    floor = transport_floor.measure(chunk, size, pacing.get("upload_rate", 0))
    return {"chunk_kib": chunk_kib, "blob_mib": blob_mib, "paced_mbit": paced_mbit, "chunks": -(-size // chunk),
            "floor_receiver_ms_per_mib": floor["receiver_ms_per_mib"],
            "floor_sender_ms_per_mib": floor["sender_ms_per_mib"],
            "wall_s": round(wall, 3),
            "sender_ms_per_mib": round((after[0] - before[0]) * 1000 / mib, 1),
            "receiver_ms_per_mib": round((after[1] - before[1]) * 1000 / mib, 1),
            "receiver_loop_ms_per_mib": round((after[2] - before[2]) * 1000 / mib, 1),
            "from_peer_mib": round(from_peer / MIB, 2)}


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    report = report_header("chunk_cpu", args.argv)
    report["machine"] = machine_basics()
    report["load_before"] = loadavg()
    cases = [_case(case) for case in args.cases.split(",")]
    report["parameters"] = {"cases": args.cases, "repeat": args.repeat}
    private_mtu = os.environ.get(_PRIVATE_LOOPBACK_ENV)
    report["private_loopback"] = private_mtu is not None
    report["loopback_mtu"] = int(private_mtu) if private_mtu is not None else _host_loopback_mtu()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-chunk-cpu-") as tmp:
        root = Path(tmp)
        key_file = root / "cluster.key"
        p2pd.cli.main(["keygen", "--out", str(key_file)])
        base = 180
        for repetition in range(args.repeat):
            for chunk_kib, blob_mib, paced_mbit in cases:
                result = _measure(root, key_file, chunk_kib, blob_mib, paced_mbit, base)
                base += 2
                result["repetition"] = repetition
                log(f"{chunk_kib} KiB chunks, {blob_mib:g} MiB, paced at {paced_mbit:g} Mbit/s: {result}")
                runs.append(result)
    summary = []
    for case in cases:
        mine = [r for r in runs if (r["chunk_kib"], r["blob_mib"], r["paced_mbit"]) == case]
        row = {key: mine[0][key] for key in ("chunk_kib", "blob_mib", "paced_mbit", "chunks")}
        for key in ("wall_s", "sender_ms_per_mib", "receiver_ms_per_mib", "receiver_loop_ms_per_mib",
                    "floor_receiver_ms_per_mib", "floor_sender_ms_per_mib"):
            row[key] = round(statistics.median(r[key] for r in mine), 3 if key == "wall_s" else 1)
        row["from_peer_mib"] = mine[-1]["from_peer_mib"]
        summary.append(row)
    report["summary"], report["runs"] = summary, runs
    report["load_after"] = loadavg()
    return report


def _case(text: str) -> tuple[int, float, float]:
    """``chunk KiB:blob MiB[:sender Mbit/s]`` (no rate: unpaced). The blob must be large enough to
    be cut in chunks of that size (``recut``), since the chunk size is the agents' largest and
    smaller blobs get smaller chunks."""
    fields = text.split(":")
    chunk_kib, blob_mib = int(fields[0]), float(fields[1])
    problem = recut(int(blob_mib * MIB), chunk_kib * 1024)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return chunk_kib, blob_mib, float(fields[2]) if len(fields) > 2 else 0.0


def _checked_cases(text: str) -> str:
    for case in text.split(","):
        _case(case)
    return text


def _host_loopback_mtu() -> int | None:
    # /sys shows the namespace it was mounted in (the host's), not one entered with unshare.
    try:
        return int(Path("/sys/class/net/lo/mtu").read_text())
    except (OSError, ValueError):
        return None


def _in_private_loopback(argv: list[str], mtu: int, log: Callable[[str], None]) -> int | None:
    """Runs this benchmark again in a network namespace of its own whose loopback has ``mtu``
    (its exit status), or None when it cannot (not root, no ``unshare`` or ``ip``): the caller
    then runs on the host's loopback."""
    unshare = shutil.which("unshare")
    ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    if os.geteuid() != 0 or unshare is None or ip is None:
        log(f"not root, or no unshare/ip: on the host's loopback (MTU {_host_loopback_mtu()}), not at MTU {mtu}")
        return None
    command = [unshare, "--net", "--", "sh", "-c", f'"$0" link set lo mtu {mtu} up && shift && exec "$@"', ip,
               "--", sys.executable, "-m", "tests.bench.chunk_cpu", *argv]
    return subprocess.run(command, env={**os.environ, _PRIVATE_LOOPBACK_ENV: str(mtu)}, check=False).returncode


def render_section(report: dict[str, Any]) -> str:
    machine = report["machine"]
    mtu = report.get("loopback_mtu")
    if report.get("private_loopback"):
        where = f"on the loopback of a private network namespace with a {mtu}-byte MTU (a real link's packet size)"
    else:
        where = f"on the host's loopback (MTU {mtu}: a 64 KiB chunk may leave as one packet)"
    lines = [SECTION_TITLE, "",
             f"- Date: {report['date']}",
             f"- Command: `{report['command']}`",
             f"- Machine: {machine.get('nproc')} CPUs, Python {machine.get('python')}; load "
             f"{report['load_before']} before, {report['load_after']} after",
             f"- Setup: a seed and two agents {where} (static peers, cluster key, peer TLS), no shaping. The first "
             "agent pulls the blob from the seed; the second then takes every chunk from it. CPU from `/proc` over "
             "the second pull: the receiver's whole process, its event-loop thread alone, and the sender's process, "
             f"per MiB of the blob. Medians of {report['parameters']['repeat']}. *Sender paced*: its `upload_rate` "
             "(the kernel spreads its packets at that rate, so chunks arrive a few packets at a time, as over a slow "
             "link). *Transport floor*: the same chunks, blob and pacing between two bare Python processes on one "
             "long-lived TLS connection with 8-byte frames (`tests/bench/transport_floor.py`: no HTTP, no "
             "authentication, no swarm; the sender trio's `SSLStream` as the agents' peer server is, the receiver "
             "one thread reading into the chunk's buffer, hashing and writing it, one event-loop wake-up per "
             "chunk, as the agents' chunk wire does), measured right after the agents' pull: what any chunk "
             "transport in Python costs here, receiver / sender.", "",
             "| chunk | blob | sender paced | chunks | pull | receiver CPU | of which its event loop | sender CPU "
             "| from the peer | transport floor (receiver / sender) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["summary"]:
        paced = f"{row['paced_mbit']:g} Mbit/s" if row["paced_mbit"] else "no"
        lines.append(f"| {row['chunk_kib']} KiB | {row['blob_mib']:g} MiB | {paced} | {row['chunks']} | "
                     f"{row['wall_s']:.2f} s | "
                     f"{row['receiver_ms_per_mib']} ms/MiB | {row['receiver_loop_ms_per_mib']} ms/MiB | "
                     f"{row['sender_ms_per_mib']} ms/MiB | {row['from_peer_mib']:g} MiB | "
                     f"{row['floor_receiver_ms_per_mib']} / {row['floor_sender_ms_per_mib']} ms/MiB |")
    lines += ["", "Raw numbers: [`bench/chunk_cpu.json`](bench/chunk_cpu.json).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, log: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, type=_checked_cases,
                        help="chunk KiB:blob MiB[:sender Mbit/s], comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--link-mtu", type=int, default=DEFAULT_LINK_MTU, metavar="BYTES",
                        help="run in a private network namespace whose loopback has this MTU (root; 0: the host's "
                             "loopback as it is)")
    known, _rest = parser.parse_known_args(argv)
    if known.link_mtu > 0 and os.environ.get(_PRIVATE_LOOPBACK_ENV) != str(known.link_mtu):
        status = _in_private_loopback(list(argv) if argv is not None else sys.argv[1:], known.link_mtu, log)
        if status is not None:
            return status
    return run_and_publish(parser, argv, run, render_section, log, name="chunk_cpu", mark_start=MARK_START,
                           mark_end=MARK_END)


if __name__ == "__main__":
    raise SystemExit(main())
