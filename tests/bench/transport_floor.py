"""The CPU floor of moving chunks between two Python processes over TLS, without the product.

What ``make bench-chunk-cpu`` compares each row with: a sender and a receiver (two processes, so
each one's CPU is its own) on one long-lived TLS connection (the agents' peer certificates, TLS
1.3), the receiver asking for chunks with 8-byte frames (two asks in flight) and the sender
answering each with an 8-byte length and the chunk, read with ``os.pread`` from a file. No HTTP,
no authentication, no swarm: the sender is trio's ``SSLStream`` as the agents' peer server is;
the receiver one thread reading straight into a buffer of the chunk's size with ``recv_into`` (one
TLS record a call), hashing it, writing it with ``pwrite`` and waking a trio event loop once per
chunk, as the agents' chunk wire does. A case may pace the sender (``SO_MAX_PACING_RATE``), as the
agents' ``upload_rate`` does. It is the design the CPU goal's "one long-lived connection per pair
of peers" would start from (docs/benchmarks.md, thirty-sixth session): its CPU per MiB is what
such a transport costs before anything else a node does.

``python -m tests.bench.transport_floor CHUNK_BYTES BLOB_BYTES PACED_BYTES_PER_S`` prints the
two numbers as JSON; ``measure`` runs it from another program.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import trio

from p2pd.httpd._server import _SocketPace
from p2pd.swarm.tls import PeerTls
from tests.harness.net import free_port

__all__ = ["measure"]

_ASKS_IN_FLIGHT = 2
_FRAME = struct.Struct("!Q")
_TIMEOUT = 120.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tls(key_file: Path, role: str, directory: Path) -> PeerTls:
    """This process's peer certificate, derived from the cluster key as an agent's is."""
    return PeerTls.derived(key_file.read_bytes(), role, directory / role)


async def _send(port: int, blob: Path, chunk: int, rate: int, key_file: Path) -> None:
    """Answers one connection's asks, then prints its CPU seconds from the first ask to the end."""
    context = _tls(key_file, "sender", blob.parent).server()
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print("ready", flush=True)
    stream = await listeners[0].accept()
    for listener in listeners:
        await listener.aclose()
    if rate:
        _SocketPace(stream.socket)(rate)  # as the agents' peer server paces an answer
    tls = trio.SSLStream(stream, context, server_side=True)
    await tls.do_handshake()
    fd = os.open(blob, os.O_RDONLY)
    began: float | None = None
    pending = b""
    while True:
        try:
            data = await tls.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            break
        began = _cpu_seconds() if began is None else began
        pending += data
        while len(pending) >= _FRAME.size:
            (index,) = _FRAME.unpack_from(pending)
            pending = pending[_FRAME.size:]
            body = os.pread(fd, chunk, index * chunk)
            await tls.send_all(_FRAME.pack(len(body)) + body)
    os.close(fd)
    print(json.dumps({"cpu_s": _cpu_seconds() - (began or _cpu_seconds())}), flush=True)


def _read_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if not n:
            raise EOFError(f"connection closed after {got} of {len(view)} bytes")
        got += n


def _read_chunks(sock: socket.socket, count: int, chunk: int, out: int, token: trio.lowlevel.TrioToken,
                 on_chunk: Callable[[bytes], None]) -> None:
    asked = 0
    for _ in range(min(_ASKS_IN_FLIGHT, count)):
        sock.sendall(_FRAME.pack(asked))
        asked += 1
    head = bytearray(_FRAME.size)
    for index in range(count):
        _read_exactly(sock, memoryview(head))
        (length,) = _FRAME.unpack(head)
        body = bytearray(length)
        _read_exactly(sock, memoryview(body))
        digest = hashlib.sha256(body).digest()
        os.pwrite(out, body, index * chunk)
        if asked < count:
            sock.sendall(_FRAME.pack(asked))
            asked += 1
        token.run_sync_soon(on_chunk, digest)


async def _receive(port: int, count: int, chunk: int, key_file: Path, out_path: Path) -> None:
    """Takes ``count`` chunks, then prints its CPU seconds from the first ask to the last chunk."""
    context = _tls(key_file, "receiver", out_path.parent).client()
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=_TIMEOUT), server_hostname=None)
    out = os.open(out_path, os.O_RDWR | os.O_CREAT, 0o600)
    received = 0
    done = trio.Event()

    def on_chunk(_digest: bytes) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    began = _cpu_seconds()
    reader = threading.Thread(target=_read_chunks, daemon=True,
                              args=(sock, count, chunk, out, trio.lowlevel.current_trio_token(), on_chunk))
    reader.start()
    with trio.fail_after(_TIMEOUT):
        await done.wait()
    print(json.dumps({"cpu_s": _cpu_seconds() - began}), flush=True)
    sock.close()
    os.close(out)


def measure(chunk: int, size: int, rate: int) -> dict[str, float]:
    """Moves a random blob of ``size`` bytes in ``chunk``-byte chunks from a sender paced at ``rate``
    bytes/s (0: not paced); returns each side's CPU in ms per MiB of the blob."""
    with tempfile.TemporaryDirectory(prefix="transport-floor-") as tmp:
        directory = Path(tmp)
        key_file = directory / "cluster.key"
        key_file.write_bytes(os.urandom(32))
        blob = directory / "blob"
        with blob.open("wb") as out:
            for start in range(0, size, 1 << 22):
                out.write(os.urandom(min(1 << 22, size - start)))
        port = free_port()
        command = [sys.executable, "-m", "tests.bench.transport_floor"]
        with subprocess.Popen([*command, "send", str(port), str(blob), str(chunk), str(rate), str(key_file)],
                              stdout=subprocess.PIPE, text=True) as sender:
            try:
                assert sender.stdout is not None
                if sender.stdout.readline().strip() != "ready":
                    raise RuntimeError("the sender did not start")
                count = -(-size // chunk)
                receiver = subprocess.run([*command, "receive", str(port), str(count), str(chunk),
                                           str(key_file), str(directory / "received")],
                                          capture_output=True, text=True, timeout=_TIMEOUT, check=True)
                sent, _ = sender.communicate(timeout=_TIMEOUT)
            finally:
                if sender.poll() is None:  # the receiver failed: the sender may wait for it forever
                    sender.kill()
        if not filecmp.cmp(blob, directory / "received", shallow=False):
            raise RuntimeError("the received blob differs from the sent one")
    mib = size / (1 << 20)
    return {"receiver_ms_per_mib": round(json.loads(receiver.stdout)["cpu_s"] * 1000 / mib, 1),
            "sender_ms_per_mib": round(json.loads(sent.splitlines()[-1])["cpu_s"] * 1000 / mib, 1)}


def main(argv: list[str]) -> int:
    role, *args = argv
    if role == "send":
        port, blob, chunk, rate, key_file = args
        trio.run(_send, int(port), Path(blob), int(chunk), int(rate), Path(key_file))
    elif role == "receive":
        port, count, chunk, key_file, out = args
        trio.run(_receive, int(port), int(count), int(chunk), Path(key_file), Path(out))
    else:
        print(json.dumps(measure(int(role), int(args[0]), int(args[1]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
