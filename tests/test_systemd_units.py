"""systemd units (systemd-analyze verify/security) and the sd_notify readiness protocol."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pd.sdnotify import notify
from tests.harness.tools import require_tool, run, start_process, stop_process, tail

UNITS_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = {"p2pd.service": "/usr/local/bin/p2pd", "seed.service": "/usr/local/bin/seed"}
# systemd-analyze security's exposure score, 0.0 (locked down) to 10.0; both units score 1.6 with systemd 252.
MAX_EXPOSURE = 2.5


@pytest.fixture
def installed_units(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this venv's console scripts (verify checks the binary exists)."""
    scripts = Path(sys.executable).parent
    for name, binary in UNITS.items():
        text = (UNITS_DIR / name).read_text()
        assert f"ExecStart={binary} " in text, f"{name}: ExecStart must use {binary} (docs/operations.md)"
        (tmp_path / name).write_text(text.replace(binary, str(scripts / Path(binary).name)))
        assert (scripts / Path(binary).name).exists()
    return tmp_path


def _directives(name: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (UNITS_DIR / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_units_verify_cleanly(installed_units: Path) -> None:
    tool = require_tool("systemd-analyze")
    paths = [installed_units / name for name in UNITS]
    result = run([tool, "verify", "--man=no", *paths], timeout=60, check=False)
    # verify exits 0 on unknown keys and bad values; it only warns on stderr, so any output is a failure.
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), (
        result.stdout.decode() + result.stderr.decode()
    )


def test_verify_catches_mistakes(installed_units: Path) -> None:
    """Guards the test above: a typo must show up in verify's output."""
    tool = require_tool("systemd-analyze")
    broken = installed_units / "broken.service"
    broken.write_text((installed_units / "seed.service").read_text().replace("RestartSec=", "RestartSecs="))
    result = run([tool, "verify", "--man=no", broken], timeout=60, check=False)
    assert b"RestartSecs" in result.stderr


@pytest.mark.parametrize("name", sorted(UNITS))
def test_units_are_hardened(installed_units: Path, name: str) -> None:
    tool = require_tool("systemd-analyze")
    result = run([tool, "security", "--offline=yes", "--no-pager", installed_units / name], timeout=60, check=False)
    out = result.stdout.decode()
    summary = out.strip().splitlines()[-1]
    assert f"Overall exposure level for {name}:" in summary, out + result.stderr.decode()
    assert float(summary.split(":")[1].split()[0]) <= MAX_EXPOSURE, summary


@pytest.mark.parametrize("name", sorted(UNITS))
def test_unit_essentials(name: str) -> None:
    d = _directives(name)
    assert d["Type"] == ["notify"]
    assert d["Restart"] == ["on-failure"] and d["RestartSec"]
    assert d["DynamicUser"] == ["yes"] and d["CapabilityBoundingSet"] == [""]
    assert d["ProtectSystem"] == ["strict"] and d["StateDirectory"] == [name.removesuffix(".service")]
    assert f"--data /var/lib/{name.removesuffix('.service')}" in d["ExecStart"][0]
    assert f"--config /etc/{name.removesuffix('.service')}/{name.removesuffix('.service')}.toml" in d["ExecStart"][0]
    # p2pd's mDNS discovery (zeroconf) enumerates interfaces through netlink; the seed needs no more than IP.
    families = "AF_UNIX AF_INET AF_INET6" + (" AF_NETLINK" if name == "p2pd.service" else "")
    assert d["RestrictAddressFamilies"] == [families]


def test_p2pd_starts_before_containerd_without_requiring_it() -> None:
    d = _directives("p2pd.service")
    assert "containerd.service" in " ".join(d["Before"])
    for key in ("Requires", "BindsTo", "Requisite", "PartOf", "After"):
        assert "containerd.service" not in " ".join(d.get(key, [])), key


# --------------------------------------------------------------------------- sd_notify


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's ``NOTIFY_SOCKET`` (short path: sun_path is ~108 bytes)."""
    directory = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        sock.settimeout(20)
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def _messages(sock: socket.socket) -> Iterator[dict[str, str]]:
    while True:
        data = sock.recv(4096).decode()
        yield dict(line.split("=", 1) for line in data.splitlines() if line)


def test_notify_path_and_abstract(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    assert notify("READY=1\nSTATUS=hello", path)
    assert sock.recv(100) == b"READY=1\nSTATUS=hello"

    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with abstract:
        name = f"p2pd-test-{os.getpid()}"
        abstract.bind(b"\0" + name.encode())
        assert notify("STOPPING=1", "@" + name)
        assert abstract.recv(100) == b"STOPPING=1"


def test_notify_without_a_manager_is_a_no_op(tmp_path: Path) -> None:
    assert notify("READY=1", None) is False
    assert notify("READY=1", "") is False
    assert notify("READY=1", "relative/path") is False
    assert notify("READY=1", str(tmp_path / "nobody-listens")) is False


def test_seed_serve_notifies_ready_and_stopping(tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    log_path = tmp_path / "seed.log"
    proc = start_process(
        [sys.executable, "-m", "seed", "serve", "--listen", "127.0.0.1:0", "--data", tmp_path / "data"],
        log_path=log_path,
        env={"NOTIFY_SOCKET": path},
    )
    try:
        messages = _messages(sock)
        try:
            ready = next(messages)
        except TimeoutError:
            pytest.fail(f"no READY=1 from the seed\n{tail(log_path)}")
        assert ready["READY"] == "1" and ready["STATUS"].startswith("serving on http://127.0.0.1:"), ready
        proc.send_signal(signal.SIGTERM)
        assert next(messages)["STOPPING"] == "1"
        assert proc.wait(timeout=20) == 0, tail(log_path)
    finally:
        stop_process(proc)
