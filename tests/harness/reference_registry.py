"""A throwaway CNCF distribution registry (Debian ``docker-registry`` 2.8) on 127.0.0.1."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .process import ManagedProcess
from .tools import require_tool, start_process


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``extra`` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class ReferenceRegistry(ManagedProcess):
    """``docker-registry serve CONFIG`` with filesystem storage under ``workdir``.

    No auth, deletes enabled, listening on ``127.0.0.1:PORT`` (a free port). The config is
    written as JSON (valid YAML). ``extra_config`` is deep-merged over the defaults, e.g.
    ``{"log": {"level": "debug"}}``; ``http.addr`` must stay on loopback.

    Use as a context manager (or call start()/stop()). Attributes after start:
    ``url`` ("http://127.0.0.1:PORT"), ``host`` ("127.0.0.1:PORT"), ``port``,
    ``log_path`` (registry stdout/stderr), ``data_dir``, ``config_path``, ``proc``.
    """

    name = "docker-registry"

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
        if "auth" in self.extra_config:
            self.ready_statuses = (200, 401)  # with auth on, /v2/ answers 401 with a challenge
        self.startup_timeout = startup_timeout
        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "config.yml"
        self.log_path = self.workdir / "registry.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._binary = ""

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
        self._binary = require_tool("docker-registry")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = 0  # a fresh free port on every start
        return super().start()

    def _launch(self) -> subprocess.Popen[bytes]:
        self.config_path.write_text(json.dumps(self.config(self.port), indent=2))
        # REGISTRY_* env vars override config keys: drop inherited ones so only our config applies.
        return start_process(
            [self._binary, "serve", self.config_path], log_path=self.log_path, unset_prefixes=("REGISTRY_",)
        )

    def _ready_url(self) -> str:
        return f"{self.url}/v2/"

    def stop(self) -> None:
        super().stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def repo_url(self, repo: str) -> str:
        """``docker://127.0.0.1:PORT/REPO`` reference prefix for skopeo."""
        return f"docker://{self.host}/{repo}"

    def __repr__(self) -> str:
        return f"ReferenceRegistry(url={self.url!r}, workdir={str(self.workdir)!r})"
