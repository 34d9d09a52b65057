"""The p2pd agent as a real subprocess (``python -m p2pd serve``), for kill -9 and restart tests.

Like ``SeedProcess`` it only runs the agent, it does not import it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

from .process import ManagedProcess

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


class P2pdProcess(ManagedProcess):
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

    name = "p2pd"

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

    def _ready_url(self) -> str:
        return f"{self.url}/readyz"

    def metrics(self) -> Samples:
        return parse_metrics(httpx.get(f"{self.url}/metrics", trust_env=False, timeout=5).text)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (0.0 if absent)."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def __repr__(self) -> str:
        return f"P2pdProcess(url={self.url!r}, data_dir={str(self.data_dir)!r}, running={self.is_running()})"
