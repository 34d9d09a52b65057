"""The seed registry as a real subprocess (``python -m seed serve``), for kill -9 and client tests.

Unlike an in-process ``serve_seed`` this can be killed with SIGKILL at any moment and
restarted on the same data directory and port, like a real crash. Like the rest of the
harness it does not import ``seed``: it only runs it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType

import httpx

from .net import free_port, wait_http_ok
from .tools import start_process, stop_process, tail

_START_ATTEMPTS = 3
_SAMPLE_RE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class SeedProcess:
    """``python -m seed serve --listen 127.0.0.1:PORT --data DATA_DIR`` in its own process group.

    Args:
        data_dir: the seed's data directory (created by the seed if missing).
        port: the port to listen on; a free one is picked when None. Restarts keep the port.
        config_path: optional TOML configuration file (``--config``).
        log_level: the seed's ``--log-level``; DEBUG logs one line per request.
        log_path: where stdout and stderr go (appended across restarts); default
            ``<data_dir>.log`` next to the data directory.
        startup_timeout: seconds to wait for ``GET /v2/`` to answer 200.

    Use as a context manager (or ``start()``/``stop()``). Attributes: ``url``
    ("http://127.0.0.1:PORT"), ``host`` ("127.0.0.1:PORT"), ``port``, ``data_dir``, ``proc``
    (the running ``Popen``, None when stopped) and ``log_path``.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        config_path: str | Path | None = None,
        log_level: str = "DEBUG",
        log_path: str | Path | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self._fixed_port = port is not None
        self.port = port or 0
        self.config_path = Path(config_path) if config_path is not None else None
        self.log_level = log_level
        self.log_path = Path(log_path) if log_path is not None else self.data_dir.with_name(self.data_dir.name + ".log")
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def repo_url(self, repo: str) -> str:
        """``docker://127.0.0.1:PORT/REPO`` reference prefix for skopeo."""
        return f"docker://{self.host}/{repo}"

    def _argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "seed",
            "--log-level",
            self.log_level,
            "serve",
            "--listen",
            self.host,
            "--data",
            str(self.data_dir),
        ]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        return argv

    def start(self) -> SeedProcess:
        """Starts the seed and waits until ``GET /v2/`` answers 200."""
        if self.proc is not None:
            raise RuntimeError("seed is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        last_error: Exception | None = None
        for _ in range(_START_ATTEMPTS):
            if not self.port:
                self.port = free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = start_process(self._argv(), log_path=self.log_path)
            try:
                wait_http_ok(f"{self.url}/v2/", self.startup_timeout, alive=self.is_running)
                return self
            except (TimeoutError, RuntimeError) as exc:
                last_error = exc
                stop_process(self.proc)
                self.proc = None
                if self._fixed_port or "address already in use" not in self._log_since(log_offset).lower():
                    break
                self.port = 0  # free_port() raced with another process: pick another one
        raise RuntimeError(f"seed did not start: {last_error}\n--- {self.log_path}:\n{tail(self.log_path)}")

    def _log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

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
        """SIGKILL the seed (a crash: no cleanup, no flush) and reap it; returns the exit code."""
        if self.proc is None:
            raise RuntimeError("seed is not running")
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=10)

    def restart(self) -> SeedProcess:
        """Stops the seed if it is running (gracefully), then starts it on the same port and data."""
        self.stop()
        return self.start()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The parsed ``/metrics`` samples: ``{(name, frozenset(labels.items())): value}``."""
        text = httpx.get(f"{self.url}/metrics", trust_env=False, timeout=5).text
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for line in text.splitlines():
            match = _SAMPLE_RE.match(line)
            if match is None or line.startswith("#"):
                continue
            labels = frozenset(_LABEL_RE.findall(match.group("labels") or ""))
            samples[(match.group("name"), labels)] = float(match.group("value"))
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (0.0 if absent), e.g. ``metric("seed_bytes_received_total")``."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def log_text(self) -> str:
        """Everything the seed printed so far (all runs)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> SeedProcess:
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
        return f"SeedProcess(url={self.url!r}, data_dir={str(self.data_dir)!r}, running={self.is_running()})"
