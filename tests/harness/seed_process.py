"""The seed registry as a real subprocess (``python -m seed serve``), for kill -9 and client tests.

Unlike an in-process ``serve_seed`` this can be killed with SIGKILL at any moment and
restarted on the same data directory and port, like a real crash. Like the rest of the
harness it does not import ``seed``: it only runs it.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import httpx

from .p2pd_process import Samples, parse_metrics
from .process import ManagedProcess


class SeedProcess(ManagedProcess):
    """``python -m seed serve --listen 127.0.0.1:PORT --data DATA_DIR`` in its own process group.

    Args:
        data_dir: the seed's data directory (created by the seed if missing).
        port: the port to listen on; a free one is picked when None. Restarts keep the port.
        config_path: optional TOML configuration file (``--config``).
        log_level: the seed's ``--log-level``; DEBUG logs one line per request.
        log_path: where stdout and stderr go (appended across restarts); default
            ``<data_dir>.log`` next to the data directory.
        startup_timeout: seconds to wait for ``GET /healthz`` to answer 200.
        ca_file: the CA that signed the seed's certificate, when its configuration has ``[tls]``
            (``url`` is then ``https://...``).

    Use as a context manager (or ``start()``/``stop()``). Attributes: ``url``
    ("http://127.0.0.1:PORT"), ``host`` ("127.0.0.1:PORT"), ``port``, ``data_dir``, ``proc``
    (the running ``Popen``, None when stopped) and ``log_path``.
    """

    name = "seed"

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        config_path: str | Path | None = None,
        log_level: str = "DEBUG",
        log_path: str | Path | None = None,
        startup_timeout: float = 20.0,
        ca_file: str | Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        # With ca_file the seed serves HTTPS (its configuration has [tls]); clients trust ca_file.
        self.ca_file = Path(ca_file) if ca_file is not None else None
        if self.ca_file is not None:
            self.ready_verify = ssl.create_default_context(cafile=str(self.ca_file))
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
        return f"{'https' if self.ca_file is not None else 'http'}://{self.host}"

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

    def _ready_url(self) -> str:
        # /healthz, not /v2/: a seed with access control answers /v2/ with 401.
        return f"{self.url}/healthz"

    def metrics(self) -> Samples:
        """The parsed ``/metrics`` samples: ``{(name, frozenset(labels.items())): value}``."""
        return parse_metrics(httpx.get(f"{self.url}/metrics", trust_env=False, timeout=5,
                                       verify=self.ready_verify).text)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (0.0 if absent), e.g. ``metric("seed_bytes_received_total")``."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def __repr__(self) -> str:
        return f"SeedProcess(url={self.url!r}, data_dir={str(self.data_dir)!r}, running={self.is_running()})"
