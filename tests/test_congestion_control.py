"""The TCP congestion control of the connections a server accepts: the agent's peer port uses
reno unless told otherwise (docs/architecture.md, "Congestion control on the peer port"), the seed
the host's default unless ``server.congestion_control`` says. Read back from the kernel with
``ss`` (what the accepted socket really uses), on loopback."""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

import p2pd.cli
import seed.cli
from p2pd.config import load_config
from p2pd.errors import ConfigError
from p2pd.httpd import Request, Response, check_congestion_control, serve_http
from p2pd.httpd._congestion import set_congestion_control
from p2pd.swarm.auth import generate_key
from seed.config import load_config as load_seed_config
from seed.registry import serve_seed
from tests.p2pd_support import start_agent
from tests.swarm_cluster import wait_until

pytestmark = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")


def host_default() -> str:
    return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()


def not_the_default() -> str:
    """An algorithm this process may set that the host does not use by default: reno is always
    there; where it is the default, any other the kernel has (as root, any may be set)."""
    if host_default() != "reno":
        return "reno"
    available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    others = [name for name in available if name != "reno"]
    if not others:
        pytest.skip("the kernel has only reno")
    return others[0]


def accepted_congestion(port: int) -> list[str]:
    """The congestion control of each established connection whose local port is ``port`` (the
    server's side), as the kernel reports it."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    lines = [line.split() for line in out.splitlines()]
    # Each socket is a line with its addresses, then a tab-indented line of details that starts
    # with the algorithm's name.
    return [words[0] for words in lines[1::2] if words]


async def answer(request: Request) -> Response:
    return Response(200, [], b"ok")


async def congestion_of_a_connection(port: int, path: str = "/") -> list[str]:
    """Makes a request and, while its keep-alive connection is open, reads the algorithm back."""
    async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
        assert (await client.get(f"http://127.0.0.1:{port}{path}")).status_code in (200, 401)
        return accepted_congestion(port)


async def test_a_server_sets_the_congestion_control_of_what_it_accepts(nursery: trio.Nursery) -> None:
    chosen = not_the_default()
    info = await nursery.start(partial(serve_http, answer, "127.0.0.1", 0, congestion_control=chosen))
    assert await congestion_of_a_connection(info.port) == [chosen]
    default = await nursery.start(partial(serve_http, answer, "127.0.0.1", 0))
    assert await congestion_of_a_connection(default.port) == [host_default()]


async def test_an_algorithm_the_kernel_refuses_leaves_the_default_and_says_so(
        nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="p2pd.httpd"):
        info = await nursery.start(partial(serve_http, answer, "127.0.0.1", 0, congestion_control="nosuchalgo"))
    assert await congestion_of_a_connection(info.port) == [host_default()]
    assert any("nosuchalgo" in r.getMessage() and "host's default" in r.getMessage() for r in caplog.records)


def test_a_refusal_on_one_listener_does_not_skip_the_others(caplog: pytest.LogCaptureFixture) -> None:
    """Several listeners (IPv4 and IPv6): each is tried, and the warning counts the refusals."""
    class Listener:
        def __init__(self, refuse: bool) -> None:
            self.refuse = refuse
            self.set: list[bytes] = []

        def setsockopt(self, level: int, option: int, value: bytes, /) -> None:
            if self.refuse:
                raise OSError(errno.EPERM, "Operation not permitted")
            self.set.append(value)

    listeners = [Listener(False), Listener(True), Listener(False)]
    with caplog.at_level(logging.WARNING, logger="p2pd.httpd"):
        assert set_congestion_control(listeners, "reno") == "Operation not permitted"
    assert [listener.set for listener in listeners] == [[b"reno"], [], [b"reno"]]
    assert any("1 of 3" in r.getMessage() for r in caplog.records)
    assert set_congestion_control(listeners[:1], "reno") is None and set_congestion_control(listeners, "") is None


def test_names_that_cannot_be_an_algorithm_are_refused() -> None:
    for good in ("", "reno", "cubic", "bbr", "dctcp", "htcp_2"):
        assert check_congestion_control(good) == good
    for bad in ("Reno", "re no", "a" * 16, "bbr;", "../x"):
        with pytest.raises(ValueError, match="congestion control"):
            check_congestion_control(bad)


def test_the_agent_setting_defaults_to_reno_and_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config(None).swarm.peer_congestion_control == "reno"
    (tmp_path / "a.toml").write_text('[swarm]\npeer_congestion_control = ""\n')
    assert load_config(tmp_path / "a.toml").swarm.peer_congestion_control == ""
    (tmp_path / "b.toml").write_text('[swarm]\npeer_congestion_control = "BBR!"\n')
    with pytest.raises(ConfigError, match=r"swarm\.peer_congestion_control"):
        load_config(tmp_path / "b.toml")
    # The command line reaches the same setting.
    seen: list[str] = []
    monkeypatch.setattr(p2pd.cli.trio, "run", lambda _serve, config: seen.append(config.swarm.peer_congestion_control))
    assert p2pd.cli.main(["serve", "--default-upstream", "http://127.0.0.1:9", "--peer-congestion-control", "cubic",
                          "--data", str(tmp_path / "d")]) == 0
    assert seen == ["cubic"]


def test_the_seed_setting_defaults_to_the_host_and_is_checked(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_seed_config(None).server.congestion_control == ""
    (tmp_path / "s.toml").write_text('[server]\ncongestion_control = "cubic"\n')
    assert load_seed_config(tmp_path / "s.toml").server.congestion_control == "cubic"
    assert load_seed_config(tmp_path / "s.toml", congestion_control="reno").server.congestion_control == "reno"
    for bad in ('"Cubic"', "3"):
        (tmp_path / "bad.toml").write_text(f"[server]\ncongestion_control = {bad}\n")
        with pytest.raises(ConfigError, match=r"server\.congestion_control"):
            load_seed_config(tmp_path / "bad.toml")
    seen: list[str] = []
    monkeypatch.setattr(seed.cli.trio, "run",
                        lambda _serve, config, *rest: seen.append(config.server.congestion_control))
    assert seed.cli.main(["serve", "--data", str(tmp_path / "d"), "--congestion-control", "reno"]) == 0
    assert seen == ["reno"]


async def test_the_agent_peer_port_and_the_seed_use_their_settings(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "cluster.key").write_text(generate_key())
    config_file = tmp_path / "agent.toml"
    config_file.write_text(f'default_upstream = "http://127.0.0.1:9"\n[swarm]\npeer_listen = "127.0.0.1:0"\n'
                           f'mdns = false\nnode_id = "n1"\ncluster_key_file = "{tmp_path / "cluster.key"}"\n')
    agent = await start_agent(nursery, load_config(config_file, listen="127.0.0.1:0", data=tmp_path / "n1"))
    assert agent.swarm is not None
    peer_port = agent.swarm.peer_info.port
    # A TCP connection is enough: the algorithm is the accepted socket's before any TLS.
    peer = await trio.open_tcp_stream("127.0.0.1", peer_port)
    try:
        with trio.fail_after(5):
            await wait_until(lambda: accepted_congestion(peer_port))
        assert accepted_congestion(peer_port) == ["reno"]
    finally:
        await peer.aclose()
    # The agent's own registry port (containerd's, on loopback) keeps the host's default.
    assert await congestion_of_a_connection(agent.info.port, "/v2/") == [host_default()]

    chosen = not_the_default()
    seed_config = load_seed_config(None, listen="127.0.0.1:0", data=tmp_path / "seed", congestion_control=chosen)
    info, _registry = await nursery.start(partial(serve_seed, seed_config))
    assert await congestion_of_a_connection(info.port, "/v2/") == [chosen]
