"""Finding and running external tools with bounded time and guaranteed cleanup."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

log = logging.getLogger("tests.harness")

# Proxy settings must never route test traffic off the machine.
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "ftp_proxy", "grpc_proxy")

_OUTPUT_LIMIT = 8000


def _unavailable(message: str) -> None:
    """Skip the test, or fail it when running in CI (``CI=true``) where everything must be present."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI=true: missing prerequisites are errors)", pytrace=False)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Return the absolute path of executable ``name``.

    If it is missing: ``pytest.fail`` when env ``CI == "true"``, else ``pytest.skip``.
    Also searches /usr/sbin and /sbin, which are not always on a non-root PATH.
    """
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        _unavailable(f"required tool {name!r} not found on PATH (install it, e.g. with apt-get)")
        raise AssertionError("unreachable")  # pytest.skip/fail raise
    return path


def require_root() -> None:
    """containerd/runc/overlayfs need root: skip (or fail with CI=true) otherwise."""
    if os.geteuid() != 0:
        _unavailable("test needs root (containerd, runc, overlay mounts)")


def clean_env(env: Mapping[str, str] | None = None, *, unset_prefixes: Sequence[str] = ()) -> dict[str, str]:
    """Environment for child tools: ``env`` over os.environ, with proxies removed.

    NO_PROXY covers loopback so no tool ever sends loopback traffic through a proxy.
    Inherited variables starting with one of ``unset_prefixes`` are dropped (``env`` is kept).
    """
    merged = {k: v for k, v in os.environ.items() if not any(k.startswith(p) for p in unset_prefixes)}
    if env:
        merged.update(env)
    for var in _PROXY_VARS:
        merged.pop(var, None)
        merged.pop(var.upper(), None)
    merged["NO_PROXY"] = merged["no_proxy"] = "127.0.0.0/8,localhost,::1"
    return merged


def _clip(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if len(text) > _OUTPUT_LIMIT:
        return f"...[{len(text) - _OUTPUT_LIMIT} chars cut]...\n" + text[-_OUTPUT_LIMIT:]
    return text


class ToolError(subprocess.CalledProcessError):
    """CalledProcessError whose str() includes the (clipped) output, so pytest shows it."""

    def __str__(self) -> str:
        return (
            f"command failed (exit {self.returncode}): {shlex.join(map(str, self.cmd))}\n"
            f"--- stdout:\n{_clip(self.stdout)}\n--- stderr:\n{_clip(self.stderr)}"
        )


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cmd`` to completion within ``timeout`` seconds, capturing stdout/stderr (bytes).

    ``env`` is merged over the current environment (proxies removed, see clean_env).
    On non-zero exit (with ``check``) or timeout the command and its output are logged and
    ToolError / subprocess.TimeoutExpired is raised. The child is killed on timeout.
    """
    argv = [os.fspath(c) for c in cmd]
    log.debug("run: %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout,
            env=clean_env(env),
            cwd=cwd,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        log.error(
            "timeout after %ss: %s\n--- stdout:\n%s\n--- stderr:\n%s",
            timeout,
            shlex.join(argv),
            _clip(exc.stdout),
            _clip(exc.stderr),
        )
        raise
    if proc.returncode != 0:
        level = logging.ERROR if check else logging.DEBUG
        log.log(
            level,
            "exit %s: %s\n--- stdout:\n%s\n--- stderr:\n%s",
            proc.returncode,
            shlex.join(argv),
            _clip(proc.stdout),
            _clip(proc.stderr),
        )
        if check:
            raise ToolError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc


def start_process(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    log_path: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    unset_prefixes: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start a long-running ``cmd`` in its own process group, stdout+stderr appended to ``log_path``.

    ``unset_prefixes``: inherited env variables to drop (e.g. ``("REGISTRY_",)``).
    The caller must call stop_process() on it in a finally block.
    """
    argv = [os.fspath(c) for c in cmd]
    log.debug("start: %s (log %s)", shlex.join(argv), log_path)
    logf: IO[Any] = open(log_path, "ab")  # noqa: SIM115 - closed right after Popen (child keeps its fd)
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=clean_env(env, unset_prefixes=unset_prefixes),
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        logf.close()


def stop_process(proc: subprocess.Popen[Any], *, timeout: float = 10.0) -> int | None:
    """Terminate ``proc`` (SIGTERM), wait up to ``timeout`` s, then SIGKILL its process group.

    Safe to call on an already exited process. Returns the exit code (None if it never died).
    The group is only signalled while its leader is still unreaped, so the id cannot be reused.
    """
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.terminate()
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %s ignored SIGTERM for %ss; killing its process group", proc.pid, timeout)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_process() made it a group leader
    except (ProcessLookupError, PermissionError):
        proc.kill()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.error("pid %s did not die after SIGKILL", proc.pid)
        return None


def tail(path: str | os.PathLike[str], limit: int = 4000) -> str:
    """Last ``limit`` characters of a (log) file, or "" if it does not exist."""
    p = Path(path)
    if not p.exists():
        return ""
    with p.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        return f.read().decode("utf-8", "replace")
