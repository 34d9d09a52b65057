"""The p2pd agent as a real subprocess (``python -m p2pd serve``), for kill -9 and restart tests.

Like ``SeedProcess`` it only runs the agent, it does not import it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

from .net import free_port, wait_http_ok
from .tools import start_process, stop_process, tail

_START_ATTEMPTS = 3
_SAMPLE_RE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text exposition → ``{(name, frozenset(labels.items())): value}``."""
    samples: Samples = {}
    for line in text.splitlines():
        match = _SAMPLE_RE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = frozenset(_LABEL_RE.findall(match.group("labels") or ""))
        samples[(match.group("name"), labels)] = float(match.group("value"))
    return samples


class P2pdProcess:
    """``python -m p2pd serve --listen 127.0.0.1:PORT --data DATA --upstream NS=URL ... [--config FILE]``.

    Args:
        data_dir: the agent's data directory.
        upstreams: ``NS=URL`` values for ``--upstream``.
        config_path: optional TOML file (``--config``).
        port: fixed port; a free one is picked when None. Restarts keep the port.
        log_path: stdout and stderr (appended across restarts); default ``<data_dir>.log``.

    Context manager (or ``start()``/``stop()``); ``kill9()`` crashes it, ``start()`` again
    restarts it on the same data directory and port.
    """

    def __init__(
        self,
        data_dir: str | Path,
        upstreams: Sequence[str],
        *,
        config_path: str | Path | None = None,
        port: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.upstreams = list(upstreams)
        self.config_path = Path(config_path) if config_path is not None else None
        self._fixed_port = port is not None
        self.port = port or 0
        self.log_path = Path(log_path) if log_path is not None else self.data_dir.with_name(self.data_dir.name + ".log")
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "p2pd",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data",
            str(self.data_dir),
        ]
        for upstream in self.upstreams:
            argv += ["--upstream", upstream]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        return argv

    def start(self) -> P2pdProcess:
        """Starts the agent and waits until ``/readyz`` answers 200."""
        if self.proc is not None:
            raise RuntimeError("p2pd is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        last_error: Exception | None = None
        for _ in range(_START_ATTEMPTS):
            if not self.port:
                self.port = free_port()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = start_process(self._argv(), log_path=self.log_path)
            try:
                wait_http_ok(f"{self.url}/readyz", self.startup_timeout, alive=self.is_running)
                return self
            except (TimeoutError, RuntimeError) as exc:
                last_error = exc
                stop_process(self.proc)
                self.proc = None
                with self.log_path.open("rb") as f:
                    f.seek(offset)
                    since = f.read().decode("utf-8", "replace").lower()
                if self._fixed_port or "address already in use" not in since:
                    break
                self.port = 0
        raise RuntimeError(f"p2pd did not start: {last_error}\n--- {self.log_path}:\n{tail(self.log_path)}")

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        """Graceful stop (SIGTERM, then SIGKILL after a timeout); returns the exit code."""
        if self.proc is None:
            return None
        try:
            return stop_process(self.proc)
        finally:
            self.proc = None

    def kill9(self) -> int:
        """SIGKILL the agent (a crash) and reap it; returns the exit code."""
        if self.proc is None:
            raise RuntimeError("p2pd is not running")
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=10)

    def metrics(self) -> Samples:
        return parse_metrics(httpx.get(f"{self.url}/metrics", trust_env=False, timeout=5).text)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (0.0 if absent)."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> P2pdProcess:
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

    def __repr__(self) -> str:
        return f"P2pdProcess(url={self.url!r}, data_dir={str(self.data_dir)!r}, running={self.is_running()})"
