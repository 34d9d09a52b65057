"""The private seed with the clients people use: skopeo (``--creds``/``--dest-creds``), podman
(``login``, push, pull), ``ctr images pull --user``, and containerd pulling through p2pd whose
upstream (the seed) requires credentials. Every client talks to a real ``seed serve`` process
with an htpasswd file made by Debian's ``htpasswd`` and a robot made by ``seed robot create``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from p2pd.config import load_config as load_agent_config
from tests.harness import skopeo
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import OciLayout
from tests.harness.podman import Podman
from tests.harness.seed_process import SeedProcess
from tests.harness.tools import ToolError, run
from tests.p2pd_support import NS, start_agent, write_hosts
from tests.test_seed_auth_api import make_htpasswd

USERS = {"alice": "alice-Secret-1", "bob": "bob-Secret-2", "mallory": "mallory-Secret-3"}


@pytest.fixture
def private_seed(tmp_path: Path) -> Iterator[SeedProcess]:
    """alice: admin of team/**; bob: pull on team/**; mallory: nothing; robot ci: pull+push on team/*."""
    htpasswd = tmp_path / "htpasswd"
    make_htpasswd(htpasswd, USERS)
    config = tmp_path / "seed.toml"
    config.write_text(f"""
[auth]
htpasswd = "{htpasswd}"
service = "seed.test"

[[access]]
repositories = ["team/**"]
users = ["alice"]
role = "admin"

[[access]]
repositories = ["team/**"]
users = ["bob"]
role = "pull"
""")
    with SeedProcess(tmp_path / "seed-data", config_path=config, log_level="INFO") as seed:
        yield seed


def create_robot(seed: SeedProcess, access: str) -> tuple[str, str]:
    """``seed robot create`` (the real CLI); returns (login name, secret)."""
    out = run([sys.executable, "-m", "seed", "robot", "create", "ci", "--access", access, "--expires", "1d",
               "--data", str(seed.data_dir)], timeout=60).stdout.decode()
    login = re.search(r"(robot\$ci)", out)
    secret = re.search(r"secret\S*:\s*(\S+)", out, re.IGNORECASE)
    assert login and secret, out
    return login.group(1), secret.group(1)


def audit_actions(seed: SeedProcess, actor: str) -> list[str]:
    """The actions of ``actor`` in the seed's audit log (``seed audit query``, the real CLI)."""
    query = subprocess.run([sys.executable, "-m", "seed", "audit", "query", "--data", str(seed.data_dir),
                            "--actor", actor], capture_output=True, timeout=60, text=True)
    assert query.returncode == 0, query.stderr
    return [json.loads(line)["action"] for line in query.stdout.splitlines() if line.startswith("{")]


def _skopeo_fails(*args: str) -> str:
    with pytest.raises(ToolError) as failure:
        skopeo.copy(*args[:2], extra_args=list(args[2:]), timeout=120)  # type: ignore[arg-type]
    return str(failure.value)


def test_skopeo_with_credentials(private_seed: SeedProcess, busybox_layout: OciLayout, tmp_path: Path) -> None:
    src, dst = busybox_layout.ref("busybox"), f"docker://{private_seed.host}/team/busybox:v1"
    pushed = skopeo.copy(src, dst, extra_args=["--dest-creds", f"alice:{USERS['alice']}"])
    # Anonymous and pull-only callers cannot push; someone without rights learns nothing more.
    anonymous = _skopeo_fails(src, f"docker://{private_seed.host}/team/other:v1").lower()
    assert "unauthorized" in anonymous or "denied" in anonymous
    message = _skopeo_fails(src, f"docker://{private_seed.host}/team/busybox:v2", "--dest-creds",
                            f"bob:{USERS['bob']}")
    assert "denied" in message.lower() or "unauthorized" in message.lower()
    # bob pulls (token flow: 401 challenge → GET /token with Basic → Bearer).
    out = tmp_path / "pulled"
    assert skopeo.copy(dst, f"dir:{out}", extra_args=["--src-creds", f"bob:{USERS['bob']}"]) == pushed
    for creds in ([], ["--src-creds", f"mallory:{USERS['mallory']}"], ["--src-creds", "bob:wrong"]):
        _skopeo_fails(dst, f"dir:{tmp_path / 'nope'}", *creds)


def test_robot_account_pushes_from_ci(private_seed: SeedProcess, busybox_layout: OciLayout) -> None:
    login, secret = create_robot(private_seed, "team/*:pull,push")
    src = busybox_layout.ref("busybox")
    skopeo.copy(src, f"docker://{private_seed.host}/team/ci-built:1", extra_args=["--dest-creds", f"{login}:{secret}"])
    # Its grant is team/* (one level): team/a/b is outside it.
    _skopeo_fails(src, f"docker://{private_seed.host}/team/a/b:1", "--dest-creds", f"{login}:{secret}")
    # Revoked: refused at once, without restarting the seed.
    run([sys.executable, "-m", "seed", "robot", "revoke", "ci", "--data", str(private_seed.data_dir)], timeout=60)
    _skopeo_fails(src, f"docker://{private_seed.host}/team/ci-built:2", "--dest-creds", f"{login}:{secret}")
    # Both changes reach the running seed's audit chain (through its inbox), the secret never.
    import getpass
    import time

    for _ in range(100):  # bounded: 10 s
        if {"robot.create", "robot.revoke"} <= set(audit_actions(private_seed, getpass.getuser())):
            break
        time.sleep(0.1)
    assert {"robot.create", "robot.revoke"} <= set(audit_actions(private_seed, getpass.getuser()))
    assert secret not in (private_seed.data_dir / "audit" / "audit.log").read_text()


def test_podman_login_push_pull(private_seed: SeedProcess, busybox_layout: OciLayout, tmp_path: Path) -> None:
    skopeo.copy(busybox_layout.ref("busybox"), f"docker://{private_seed.host}/team/busybox:v1",
                extra_args=["--dest-creds", f"alice:{USERS['alice']}"])
    image = f"{private_seed.host}/team/busybox:v1"
    copy = f"{private_seed.host}/team/copy:v1"
    with Podman(tmp_path / "podman", insecure_registries=(private_seed.host,)) as podman:
        assert podman.login(private_seed.host, "bob", "wrong").returncode != 0
        assert podman.run("pull", image).returncode != 0  # anonymous: private
        assert podman.login(private_seed.host, "bob", USERS["bob"]).returncode == 0
        podman.run_ok("pull", image)
        podman.run_ok("tag", image, copy)
        assert podman.run("push", copy).returncode != 0  # bob may only pull
        assert podman.login(private_seed.host, "alice", USERS["alice"]).returncode == 0
        podman.run_ok("push", copy)
        auth = json.loads((podman.workdir / "auth.json").read_text())
        assert private_seed.host in auth["auths"]
    skopeo.copy(f"docker://{copy}", f"dir:{tmp_path / 'check'}", extra_args=["--src-creds", f"bob:{USERS['bob']}"])


@pytest.mark.root
def test_ctr_pull_with_user(private_seed: SeedProcess, busybox_layout: OciLayout,
                            containerd: PrivateContainerd) -> None:
    pushed = skopeo.copy(busybox_layout.ref("busybox"), f"docker://{private_seed.host}/team/busybox:v1",
                         extra_args=["--dest-creds", f"alice:{USERS['alice']}"])
    ref = f"{private_seed.host}/team/busybox:v1"
    failed = containerd.pull(ref, plain_http=True, timeout=60, check=False)
    assert failed.returncode != 0
    failed = containerd.pull(ref, plain_http=True, timeout=60, check=False, extra_args=["--user", "bob:wrong"])
    assert failed.returncode != 0
    containerd.pull(ref, plain_http=True, timeout=60, extra_args=["--user", f"bob:{USERS['bob']}"])
    assert containerd.image_digest(ref) == pushed
    # containerd logged in at the token service (OAuth2 password grant), as the audit log shows.
    assert {"login.failure", "login.success", "token.issued"} <= set(audit_actions(private_seed, "bob"))


@pytest.mark.root
async def test_containerd_through_p2pd_with_a_private_seed(
    private_seed: SeedProcess, busybox_layout: OciLayout, containerd: PrivateContainerd,
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    pushed = await trio.to_thread.run_sync(partial(
        skopeo.copy, busybox_layout.ref("busybox"), f"docker://{private_seed.host}/team/busybox:v1",
        extra_args=["--dest-creds", f"alice:{USERS['alice']}"]))
    # The operator gives the agent a pull-only robot for its own fetches, and explicitly lets
    # local clients without credentials use it (else each client's own token is checked:
    # tests/test_p2pd_private.py).
    login, secret = await trio.to_thread.run_sync(create_robot, private_seed, "team/**:pull")
    password_file = tmp_path / "robot.password"
    password_file.write_text(secret)
    agent_toml = tmp_path / "agent.toml"
    agent_toml.write_text(f'[[upstream]]\nnamespace = "{NS}"\nurl = "{private_seed.url}"\n'
                          f'username = "{login}"\npassword_file = "{password_file}"\nanonymous_pull = true\n')
    config = load_agent_config(agent_toml, listen="127.0.0.1:0", data=tmp_path / "agent")
    agent = await start_agent(nursery, config)
    hosts = write_hosts(tmp_path / "hosts", agent.info.url, private_seed.url)
    ref = f"{NS}/team/busybox:v1"
    # The client logs in with its own credentials (the agent passes the seed's challenge on and
    # checks the client's token); the agent fetches with its robot.
    await trio.to_thread.run_sync(partial(containerd.pull, ref, hosts_dir=hosts, timeout=60,
                                          extra_args=["--user", f"bob:{USERS['bob']}"]))
    assert containerd.image_digest(ref) == pushed
    assert agent.metrics.registry.get_sample_value("p2pd_served_bytes_total") or 0 > 0
    # The robot's secret is in no log line of either program.
    assert secret not in private_seed.log_text()


def test_audit_log_records_the_session(private_seed: SeedProcess, busybox_layout: OciLayout) -> None:
    skopeo.copy(busybox_layout.ref("busybox"), f"docker://{private_seed.host}/team/busybox:v1",
                extra_args=["--dest-creds", f"alice:{USERS['alice']}"])
    with pytest.raises(ToolError):
        skopeo.copy(busybox_layout.ref("busybox"), f"docker://{private_seed.host}/team/busybox:v2",
                    extra_args=["--dest-creds", "alice:wrong-password"])
    verify = subprocess.run([sys.executable, "-m", "seed", "audit", "verify", "--data", str(private_seed.data_dir)],
                            capture_output=True, timeout=60, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    actions = audit_actions(private_seed, "alice")
    assert {"login.success", "token.issued", "manifest.push", "tag.move", "login.failure"} <= set(actions)
    assert "wrong-password" not in (private_seed.data_dir / "audit").joinpath("audit.log").read_text()
    assert USERS["alice"] not in private_seed.log_text()


def test_sighup_reloads_rules_and_keeps_serving(private_seed: SeedProcess, busybox_layout: OciLayout,
                                                tmp_path: Path) -> None:
    import signal
    import time

    import httpx

    skopeo.copy(busybox_layout.ref("busybox"), f"docker://{private_seed.host}/team/busybox:v1",
                extra_args=["--dest-creds", f"alice:{USERS['alice']}"])
    url = f"{private_seed.url}/v2/team/busybox/tags/list"
    mallory = ("mallory", USERS["mallory"])
    with httpx.Client(trust_env=False, timeout=10) as client:
        assert client.get(url, auth=mallory).status_code == 403
        # A keep-alive connection opened before the reload keeps working across it.
        keep = httpx.Client(trust_env=False, timeout=10, auth=("bob", USERS["bob"]))
        assert keep.get(url).status_code == 200
        config = private_seed.config_path
        assert config is not None
        original = config.read_text()
        config.write_text(original + '\n[[access]]\nrepositories = ["team/**"]\nusers = ["mallory"]\nrole = "pull"\n')
        assert private_seed.proc is not None
        private_seed.proc.send_signal(signal.SIGHUP)
        for _ in range(100):  # bounded: 10 s
            if client.get(url, auth=mallory).status_code == 200:
                break
            time.sleep(0.1)
        assert client.get(url, auth=mallory).status_code == 200
        assert keep.get(url).status_code == 200
        # A broken file: the seed logs it and keeps the rules it has.
        config.write_text(original + "\n[[access]]\nrole = 'superuser'\n")
        private_seed.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if "reload failed" in private_seed.log_text():
                break
            time.sleep(0.1)
        assert "reload failed" in private_seed.log_text()
        assert client.get(url, auth=mallory).status_code == 200
        keep.close()
    assert private_seed.is_running()
    assert "config.reload" in audit_actions(private_seed, "")
