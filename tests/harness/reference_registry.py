"""A throwaway CNCF distribution registry (Debian ``docker-registry`` 2.8) on 127.0.0.1."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from .net import free_port, wait_http_ok
from .tools import require_tool, start_process, stop_process, tail

_START_ATTEMPTS = 3


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``extra`` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class ReferenceRegistry:
    """``docker-registry serve CONFIG`` with filesystem storage under ``workdir``.

    No auth, deletes enabled, listening on ``127.0.0.1:PORT`` (a free port). The config is
    written as JSON (valid YAML). ``extra_config`` is deep-merged over the defaults, e.g.
    ``{"log": {"level": "debug"}}``; ``http.addr`` must stay on loopback.

    Use as a context manager (or call start()/stop()). Attributes after start:
    ``url`` ("http://127.0.0.1:PORT"), ``host`` ("127.0.0.1:PORT"), ``port``,
    ``log_path`` (registry stdout/stderr), ``data_dir``, ``config_path``, ``proc``.
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        extra_config: dict[str, Any] | None = None,
        startup_timeout: float = 15.0,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="registry-"))
        self.extra_config = extra_config or {}
        self.startup_timeout = startup_timeout
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.port = 0
        self.proc: Any = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def config(self, port: int) -> dict[str, Any]:
        base: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "fields": {"service": "registry"}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
                "cache": {"blobdescriptor": "inmemory"},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{port}", "headers": {"X-Content-Type-Options": ["nosniff"]}},
        }
        cfg = deep_merge(base, self.extra_config)
        addr = str(cfg["http"]["addr"])
        if not addr.startswith("127."):
            raise ValueError(f"registry must listen on loopback, got http.addr={addr!r}")
        return cfg

    def start(self) -> ReferenceRegistry:
        binary = require_tool("docker-registry")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        last_error: Exception | None = None
        for _ in range(_START_ATTEMPTS):  # free_port() can race with other processes
            self.port = free_port()
            self.config_path.write_text(json.dumps(self.config(self.port), indent=2))
            # REGISTRY_* env vars override config keys: drop inherited ones so only our config applies.
            self.proc = start_process(
                [binary, "serve", self.config_path], log_path=self.log_path, unset_prefixes=("REGISTRY_",)
            )
            try:
                wait_http_ok(
                    f"{self.url}/v2/",
                    self.startup_timeout,
                    alive=lambda: self.proc is not None and self.proc.poll() is None,
                )
                return self
            except (TimeoutError, RuntimeError) as exc:
                last_error = exc
                stop_process(self.proc)
                self.proc = None
                if "address already in use" not in tail(self.log_path):
                    break
        raise RuntimeError(f"docker-registry did not start: {last_error}\n--- {self.log_path}:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ReferenceRegistry:
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

    def repo_url(self, repo: str) -> str:
        """``docker://127.0.0.1:PORT/REPO`` reference prefix for skopeo."""
        return f"docker://{self.host}/{repo}"

    def __repr__(self) -> str:
        return f"ReferenceRegistry(url={self.url!r}, workdir={str(self.workdir)!r})"
