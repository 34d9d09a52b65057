"""A private containerd (own config, root, state and socket; not the system service), driven by ``ctr``.

Measured on this machine (Debian 12, containerd 1.6.20, runc 1.1.5, kernel 6.x, root, no systemd):
the CRI plugin is disabled (no kubelet/CNI); the overlayfs snapshotter works on the ext4 root
(``native`` works too and is the fallback for filesystems without overlay support).
``ctr run --rm`` really starts containers through containerd-shim-runc-v2 + runc; see
unpack_check() for the fallback when running containers is impossible.

Global paths containerd 1.6 still uses: shim sockets in /run/containerd/s/<sha256> (the hash
covers our state dir, so no clash with other instances). The runc root and the ctr IO FIFOs are
put under our short socket dir instead of /run/containerd (``--runc-root``, ``--fifo-dir``).

With ``ctr``, registry HTTP is done by the ctr process itself, not by the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
import uuid
from collections.abc import Sequence
from pathlib import Path

from .net import assert_loopback
from .process import ManagedProcess
from .tools import log, require_root, require_tool, run, start_process, tail

_DISABLED_PLUGINS = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
]


def _toml_str(value: str | os.PathLike[str]) -> str:
    return json.dumps(os.fspath(value))  # a JSON string is a valid TOML basic string


def write_hosts_toml(
    hosts_dir: str | Path,
    registry_host: str,
    server_url: str,
    mirrors: Sequence[str],
    *,
    capabilities: Sequence[str] = ("pull", "resolve"),
    extra_host_config: str = "",
) -> Path:
    """Write ``HOSTS_DIR/<registry_host>/hosts.toml`` for ``ctr images pull --hosts-dir``.

    ``registry_host`` is the name as written in image references (``seed.local:5000``,
    ``127.0.0.1:5000`` or ``_default`` for every registry without its own file);
    ``server_url`` the upstream tried last (``http://127.0.0.1:PORT``); ``mirrors`` are
    URLs tried first, in order, each with ``capabilities``. ``extra_host_config`` is
    appended verbatim inside every ``[host."..."]`` table (e.g. ``dial_timeout = "200ms"``).
    All URLs must be loopback. Returns the file path.
    """
    assert_loopback(server_url)
    lines = [
        f"# pulls of {registry_host}/... try the mirrors first, then the server",
        f"server = {_toml_str(server_url)}",
        "",
    ]
    caps = ", ".join(_toml_str(c) for c in capabilities)
    for url in mirrors:
        assert_loopback(url)
        lines.append(f"[host.{_toml_str(url)}]")
        lines.append(f"  capabilities = [{caps}]")
        if extra_host_config:
            lines.extend("  " + line.strip() for line in extra_host_config.strip().splitlines())
        lines.append("")
    path = Path(hosts_dir) / registry_host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _ref_host(ref: str) -> str:
    if "/" not in ref:
        raise ValueError(f"image reference {ref!r} has no registry host (would mean docker.io)")
    return ref.split("/", 1)[0]


def _check_pull_target(ref: str, hosts_dir: str | Path | None) -> None:
    """Only loopback may be contacted: the ref's host, or every URL in the hosts.toml used for it."""
    host = _ref_host(ref)
    if hosts_dir is None:
        assert_loopback(host)
        return
    hd = Path(hosts_dir)
    for candidate in (hd / host / "hosts.toml", hd / "_default" / "hosts.toml"):
        if candidate.exists():
            cfg = tomllib.loads(candidate.read_text())
            if "server" in cfg:
                assert_loopback(str(cfg["server"]))
            else:
                assert_loopback(host)  # no server: containerd falls back to the ref's host
            for url in cfg.get("host", {}):
                assert_loopback(url)
            return
    assert_loopback(host)  # no hosts.toml applies: containerd talks to the ref's host directly


def _mounts_under(prefixes: Sequence[Path]) -> list[str]:
    out: list[str] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            mnt = fields[4].replace("\\040", " ")
            if any(mnt == str(p) or mnt.startswith(str(p) + "/") for p in prefixes):
                out.append(mnt)
    return sorted(out, key=len, reverse=True)  # deepest first


def _pids_with_arg(binary_name: str, arg: str) -> list[int]:
    """Pids of processes whose argv[0] ends with ``binary_name`` and whose argv contains ``arg``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].decode(errors="replace").endswith(binary_name) and arg.encode() in argv:
            pids.append(int(entry.name))
    return pids


class PrivateContainerd(ManagedProcess):
    """``containerd --config FILE`` with root/state under ``workdir`` and its socket under /tmp/ctdXXXX.

    Context manager (or start()/stop()). After start: ``address`` (grpc socket), ``root``,
    ``state``, ``config_path``, ``log_path``, ``proc``. ``namespace`` is the default for the
    ctr helpers (each helper also takes ``namespace=``). Requires root.
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        snapshotter: str = "overlayfs",
        namespace: str = "test",
        startup_timeout: float = 20.0,
        log_level: str = "info",
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="containerd-"))
        self.snapshotter = snapshotter
        self.namespace = namespace
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.config_path = self.workdir / "containerd.toml"
        self.log_path = self.workdir / "containerd.log"
        self.sockdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._ctr = ""

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        if self.sockdir is None:
            raise RuntimeError("containerd not started")
        return str(self.sockdir / "c.sock")

    def _config(self) -> str:
        assert self.sockdir is not None
        return "\n".join(
            [
                "version = 2",
                f"root = {_toml_str(self.root)}",
                f"state = {_toml_str(self.state)}",
                "# CRI off: driven with ctr only (no kubelet, no CNI)",
                f"disabled_plugins = [{', '.join(_toml_str(p) for p in _DISABLED_PLUGINS)}]",
                "[grpc]",
                f"  address = {_toml_str(self.address)}",
                "[ttrpc]",
                f"  address = {_toml_str(self.address + '.ttrpc')}",
                "[debug]",
                '  address = ""',
                f"  level = {_toml_str(self.log_level)}",
                "[metrics]",
                '  address = ""',
                '[plugins."io.containerd.internal.v1.opt"]',
                f"  path = {_toml_str(self.workdir / 'opt')}",
                "",
            ]
        )

    def start(self) -> PrivateContainerd:
        require_root()
        binary = require_tool("containerd")
        self._ctr = require_tool("ctr")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        self.state.mkdir(exist_ok=True)
        # unix socket paths are limited to ~108 bytes: keep them short, outside pytest's tmp_path
        self.sockdir = Path(tempfile.mkdtemp(prefix="ctd", dir="/tmp"))
        self.config_path.write_text(self._config())
        self.proc = start_process([binary, "--config", self.config_path], log_path=self.log_path)
        end = time.monotonic() + self.startup_timeout
        for _ in range(int(self.startup_timeout / 0.1) + 1):
            if self.proc.poll() is not None:
                break
            if Path(self.address).exists():
                probe = run([self._ctr, "--address", self.address, "version"], timeout=5, check=False)
                if probe.returncode == 0:
                    return self
            if time.monotonic() > end:
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"containerd did not come up within {self.startup_timeout}s "
            f"(exit={self.proc.poll()})\n--- {self.log_path}:\n{tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Kill leftover tasks, stop containerd (TERM, then KILL), unmount leftovers, remove dirs."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self._kill_all_tasks()
                except Exception as exc:
                    log.warning("cleaning containerd tasks failed: %s", exc)
        finally:
            super().stop()
            self._kill_leftover_shims()
            for mnt in _mounts_under([p for p in (self.root, self.state, self.sockdir) if p is not None]):
                run(["umount", "-l", mnt], timeout=10, check=False)
            if self.sockdir is not None:
                shutil.rmtree(self.sockdir, ignore_errors=True)
                self.sockdir = None
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill_all_tasks(self) -> None:
        for ns in self.namespaces():
            for task in self.ctr("tasks", "ls", "-q", namespace=ns, timeout=10).stdout.decode().split():
                self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, namespace=ns, timeout=10, check=False)
                self.ctr("tasks", "rm", "-f", task, namespace=ns, timeout=10, check=False)
            for cid in self.ctr("containers", "ls", "-q", namespace=ns, timeout=10).stdout.decode().split():
                self.ctr("containers", "rm", cid, namespace=ns, timeout=10, check=False)

    def _kill_leftover_shims(self) -> None:
        """Shims outlive containerd by design; kill only those started by this instance."""
        if self.sockdir is None:
            return
        for pid in _pids_with_arg("containerd-shim-runc-v2", self.address):
            log.warning("killing leftover shim pid %s of %s", pid, self.address)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    # ------------------------------------------------------------------ ctr

    def ctr(
        self,
        *args: str | os.PathLike[str],
        namespace: str | None = None,
        timeout: float = 60,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``ctr --address SOCK -n NAMESPACE ARGS...``."""
        if not self._ctr:
            raise RuntimeError("containerd not started")
        return run(
            [self._ctr, "--address", self.address, "--namespace", namespace or self.namespace, *args],
            timeout=timeout,
            check=check,
            env=env,
        )

    def pull(
        self,
        ref: str,
        *,
        hosts_dir: str | Path | None = None,
        plain_http: bool = False,
        namespace: str | None = None,
        timeout: float = 300,
        check: bool = True,
        extra_args: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[bytes]:
        """``ctr images pull`` (fetch + unpack into the snapshotter) of ``ref``.

        Without ``hosts_dir`` the ref's registry must be loopback; with it, every URL in the
        applicable hosts.toml must be. containerd has no pull timeout: ``timeout`` kills ctr.
        """
        _check_pull_target(ref, hosts_dir)
        args: list[str] = ["images", "pull", "--snapshotter", self.snapshotter]
        if plain_http:
            args.append("--plain-http")
        if hosts_dir is not None:
            args += ["--hosts-dir", os.fspath(hosts_dir)]
        return self.ctr(*args, *extra_args, ref, namespace=namespace, timeout=timeout, check=check)

    def namespaces(self) -> list[str]:
        return self.ctr("namespaces", "ls", "-q", timeout=30).stdout.decode().split()

    def images(self, *, namespace: str | None = None) -> list[str]:
        """Image names in ``namespace``."""
        return self.ctr("images", "ls", "-q", namespace=namespace, timeout=30).stdout.decode().split()

    def image_digest(self, ref: str, *, namespace: str | None = None) -> str:
        """Target (manifest or index) digest that containerd recorded for ``ref``."""
        out = self.ctr("images", "ls", namespace=namespace, timeout=30).stdout.decode().splitlines()
        for line in out[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return next(f for f in fields if f.startswith("sha256:"))
        raise KeyError(f"{ref} not in containerd images: {out}")

    def content_digests(self, *, namespace: str | None = None) -> list[str]:
        """Digests of the blobs in the content store visible in ``namespace``."""
        return self.ctr("content", "ls", "-q", namespace=namespace, timeout=30).stdout.decode().split()

    def remove_all(self) -> None:
        """Remove every container, image and blob in every namespace, so the next pull is cold."""
        self._kill_all_tasks()
        for ns in self.namespaces():
            for ref in self.ctr("images", "ls", "-q", namespace=ns, timeout=30).stdout.decode().split():
                self.ctr("images", "rm", "--sync", ref, namespace=ns, timeout=60)
            for digest in self.content_digests(namespace=ns):
                self.ctr("content", "rm", digest, namespace=ns, timeout=30, check=False)

    def run_container(
        self, ref: str, *argv: str, namespace: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """``ctr run --rm REF <random id> ARGV...``; stdout is captured."""
        assert self.sockdir is not None
        cid = "t" + uuid.uuid4().hex[:12]
        return self.ctr(
            "run",
            "--rm",
            "--snapshotter",
            self.snapshotter,
            "--runc-root",
            self.sockdir / "runc",
            "--fifo-dir",
            self.sockdir / "fifo",
            ref,
            cid,
            *argv,
            namespace=namespace,
            timeout=timeout,
        )

    def unpack_check(self, ref: str, *, namespace: str | None = None, timeout: float = 60) -> str:
        """Prove ``ref`` (already pulled) is complete, unpacks and runs; returns how it was proven.

        1. ``ctr images check`` must report the image ``complete``.
        2. ``ctr run --rm REF ID /bin/sh -c 'echo ok'`` must print ``ok`` -> returns "run".
           This works here (root, runc 1.1.5, cgroup v2).
        3. If running a container fails (e.g. a sandbox without cgroups or namespaces), fall back
           to ``ctr images mount`` of the unpacked snapshot + ``chroot MNT /bin/sh -c 'echo ok'``
           -> returns "mount" (only the runtime, not the image, is then left unproven).
        """
        out = self.ctr("images", "check", namespace=namespace, timeout=timeout).stdout.decode()
        line = next((row for row in out.splitlines()[1:] if row.split()[:1] == [ref]), "")
        if "complete" not in line:
            raise AssertionError(f"image {ref} not complete in containerd:\n{out}")
        try:
            res = self.run_container(ref, "/bin/sh", "-c", "echo ok", namespace=namespace, timeout=timeout)
            if res.stdout.decode().strip() == "ok":
                return "run"
            log.warning("ctr run printed %r, trying mount fallback", res.stdout)
        except Exception as exc:
            log.warning("ctr run failed (%s); trying mount fallback", exc)
        return self._mount_check(ref, namespace=namespace, timeout=timeout)

    def _mount_check(self, ref: str, *, namespace: str | None, timeout: float) -> str:
        target = Path(tempfile.mkdtemp(prefix="mnt-", dir=self.workdir))
        try:
            self.ctr(
                "images",
                "mount",
                "--snapshotter",
                self.snapshotter,
                ref,
                target,
                namespace=namespace,
                timeout=timeout,
            )
            try:
                res = run(["chroot", target, "/bin/sh", "-c", "echo ok"], timeout=timeout)
                if res.stdout.decode().strip() != "ok":
                    raise AssertionError(f"chroot into {ref} printed {res.stdout!r}")
            finally:
                self.ctr("images", "unmount", target, namespace=namespace, timeout=timeout, check=False)
        finally:
            if not _mounts_under([target]):
                shutil.rmtree(target, ignore_errors=True)
        return "mount"

    def __repr__(self) -> str:
        return f"PrivateContainerd(address={self.address if self.sockdir else None!r}, workdir={str(self.workdir)!r})"
