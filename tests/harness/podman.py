"""Debian's ``podman`` with all of its state in a temp dir: storage (vfs), run root, registries
configuration, credentials and signature policy. Nothing under /etc, /var or ~ is written.

registries.conf drop-ins: containers/image reads ``/etc/containers/registries.conf.d`` and then
``$HOME/.config/containers/registries.conf.d`` even when ``CONTAINERS_REGISTRIES_CONF`` names the main
file, and has no variable for the drop-in directory. ``HOME`` is therefore the work dir, and
``drop_in_dir`` is where a test puts its drop-ins (``p2pd registries-config --dir``).

Usage::

    with Podman(tmp_path / "podman") as podman:
        podman.login("127.0.0.1:5000", "alice", "pw")
        podman.run_ok("pull", "127.0.0.1:5000/team/app:v1")
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from .net import assert_loopback
from .tools import clean_env, require_root, require_tool, run

__all__ = ["Podman"]

_ACCEPT_ANYTHING = {"default": [{"type": "insecureAcceptAnything"}]}


class Podman:
    """One podman "machine" in ``workdir``.

    Args:
        workdir: where storage and configuration live (removed by ``close`` if we made it).
        insecure_registries: ``HOST:PORT`` registries reached over plain HTTP.
        policy: the signature policy (``policy.json`` content); default accepts anything.
        mirrors: ``{registry: mirror}`` entries for ``registries.conf`` (pull through a mirror).
    """

    def __init__(self, workdir: Path | None = None, *, insecure_registries: tuple[str, ...] = (),
                 policy: dict[str, object] | None = None, mirrors: dict[str, str] | None = None) -> None:
        self._own = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="podman-"))
        self.insecure_registries = insecure_registries
        self.mirrors = mirrors or {}
        self.policy = policy or _ACCEPT_ANYTHING
        self._binary = ""
        self._runroot: Path | None = None

    @property
    def registries_conf(self) -> Path:
        """The main registries.conf (``write_registries``), read before the drop-ins."""
        return self.workdir / "registries.conf"

    @property
    def drop_in_dir(self) -> Path:
        """The drop-in directory podman reads after the main file (see the module docstring)."""
        return self.workdir / ".config" / "containers" / "registries.conf.d"

    def __enter__(self) -> Podman:
        require_root()  # rootless podman needs subuid ranges a test machine may not have
        self._binary = require_tool("podman")
        for name in ("root", "tmp"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        self.drop_in_dir.mkdir(parents=True, exist_ok=True)
        # podman refuses a run root longer than 50 characters: keep it short, outside workdir.
        self._runroot = Path(tempfile.mkdtemp(prefix="pdr", dir="/tmp"))
        self.write_registries()
        (self.workdir / "policy.json").write_text(json.dumps(self.policy))
        (self.workdir / "auth.json").write_text("{}")
        (self.workdir / "containers.conf").write_text('[engine]\nevents_logger = "file"\ncgroup_manager = "cgroupfs"\n')
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def write_registries(self) -> None:
        lines = ['unqualified-search-registries = []']
        for registry in sorted({*self.insecure_registries, *self.mirrors}):
            assert_loopback(registry)
            lines += ["", "[[registry]]", f'location = "{registry}"',
                      f"insecure = {'true' if registry in self.insecure_registries else 'false'}"]
            if registry in self.mirrors:
                assert_loopback(self.mirrors[registry])
                lines += ["[[registry.mirror]]", f'location = "{self.mirrors[registry]}"', "insecure = true"]
        self.registries_conf.write_text("\n".join(lines) + "\n")

    @property
    def env(self) -> dict[str, str]:
        return clean_env({
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "HOME": str(self.workdir),
            "REGISTRY_AUTH_FILE": str(self.workdir / "auth.json"),
            "CONTAINERS_CONF": str(self.workdir / "containers.conf"),
            "TMPDIR": str(self.workdir / "tmp"),
            "DOCKER_CONFIG": str(self.workdir),
        })

    def command(self, *args: str) -> list[str]:
        return [self._binary, "--root", str(self.workdir / "root"), "--runroot", str(self._runroot),
                "--storage-driver", "vfs", *args]

    def run(self, *args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess[bytes]:
        """``podman ARGS`` (global storage flags added); ``pull``/``push`` get the test's policy."""
        if args and args[0] in ("pull", "push"):
            args = (args[0], "--signature-policy", str(self.workdir / "policy.json"), *args[1:])
        return run(self.command(*args), timeout=timeout, check=check, env=self.env)

    def run_ok(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return self.run(*args, timeout=timeout, check=True)

    def login(self, registry: str, username: str, password: str) -> subprocess.CompletedProcess[bytes]:
        """``podman login`` with the password on stdin (never on the command line)."""
        assert_loopback(registry)
        return run(self.command("login", "--tls-verify=false", "--username", username, "--password-stdin", registry),
                   timeout=60, check=False, env=self.env, input=password.encode())

    def close(self) -> None:
        if self._binary:
            # vfs layers are plain directories; nothing stays mounted, but be thorough.
            run(self.command("rm", "-af"), timeout=60, check=False, env=self.env)
        if self._runroot is not None:
            shutil.rmtree(self._runroot, ignore_errors=True)
            self._runroot = None
        if self._own:
            shutil.rmtree(self.workdir, ignore_errors=True)
