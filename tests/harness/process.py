"""``ManagedProcess``: the start/stop/restart lifecycle shared by the harness's subprocess wrappers."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

from .net import free_port, wait_http_ok
from .tools import start_process, stop_process, tail


class ManagedProcess:
    """A long-running subprocess on ``127.0.0.1:port`` that is ready once an HTTP URL answers 200.

    Subclasses set ``name``, ``log_path``, ``startup_timeout`` (and ``port``/``_fixed_port``)
    and implement ``_ready_url()`` and either ``_argv()`` or ``_launch()`` (start the process once,
    on ``self.port``).
    ``start()`` retries on a fresh port when a picked free port was taken meanwhile (unless the
    port is fixed); ``stop()`` is SIGTERM then SIGKILL (``tools.stop_process``). Context manager.
    """

    name = "process"
    start_attempts = 3
    stop_timeout = 10.0
    proc: subprocess.Popen[bytes] | None = None
    port = 0
    _fixed_port = False
    log_path: Path
    startup_timeout: float

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _launch(self) -> subprocess.Popen[bytes]:
        return start_process(self._argv(), log_path=self.log_path)

    # Statuses of the ready URL that mean "started" (a registry with auth answers 401).
    ready_statuses: tuple[int, ...] = (200,)
    # How the readiness probe checks a TLS certificate (an SSLContext with the test CA).
    ready_verify: ssl.SSLContext | bool = True

    def _ready_url(self) -> str:
        raise NotImplementedError

    def start(self) -> Self:
        """Starts the process and waits until ``_ready_url()`` answers 200."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        last_error: Exception | None = None
        for _ in range(self.start_attempts):
            if not self.port:
                self.port = free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = self._launch()
            try:
                wait_http_ok(self._ready_url(), self.startup_timeout, alive=self.is_running,
                             ready_statuses=self.ready_statuses, verify=self.ready_verify)
                return self
            except (TimeoutError, RuntimeError) as exc:
                last_error = exc
                self._stop_proc()
                if self._fixed_port or "address already in use" not in self._log_since(log_offset).lower():
                    break
                self.port = 0  # free_port() raced with another process: pick another one
        raise RuntimeError(f"{self.name} did not start: {last_error}\n--- {self.log_path}:\n{tail(self.log_path)}")

    def _log_since(self, offset: int) -> str:
        if not self.log_path.exists():
            return ""
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _stop_proc(self) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        return stop_process(proc, timeout=self.stop_timeout)

    def stop(self) -> int | None:
        """Graceful stop (SIGTERM, then SIGKILL after a timeout); returns the exit code."""
        return self._stop_proc()

    def kill9(self) -> int:
        """SIGKILL the process (a crash: no cleanup, no flush) and reap it; returns the exit code."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=10)

    def restart(self) -> Self:
        """Stops the process if it is running (gracefully), then starts it again."""
        self.stop()
        return self.start()

    def log_text(self) -> str:
        """Everything the process printed so far (all runs)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
