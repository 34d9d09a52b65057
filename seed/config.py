"""The seed's configuration: one frozen dataclass tree, loaded once from TOML and flags.

Example ``seed.toml``::

    [server]
    listen = "0.0.0.0:5000"
    idle_timeout = 75.0

    [storage]
    data = "/var/lib/seed"
    chunk_size = 1048576
    upload_max_age = 86400
    max_blob_size = 107374182400

    [registry]
    delete_enabled = true
    max_page_size = 1000
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from p2pd.httpd import ServerLimits
from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE, validate_chunk_size
from p2pd.oci.errors import OCIError

__all__ = ["ConfigError", "RegistryConfig", "SeedConfig", "ServerConfig", "StorageConfig", "load_config",
           "parse_listen"]


class ConfigError(Exception):
    """The configuration file or flags are invalid."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5000
    limits: ServerLimits = field(default_factory=ServerLimits)


@dataclass(frozen=True)
class StorageConfig:
    data: Path = Path("/var/lib/seed")
    chunk_size: int = DEFAULT_CHUNK_SIZE
    upload_max_age: float = 24 * 3600.0  # seconds an idle upload session is kept
    purge_interval: float = 3600.0  # seconds between purges of stale uploads
    max_blob_size: int = 100 * 1024**3
    gc_grace: float = 3600.0  # seconds an unreferenced blob is kept by GC


@dataclass(frozen=True)
class RegistryConfig:
    delete_enabled: bool = True
    max_page_size: int = 1000  # cap on tags/catalog ?n= (CVE-2023-2253)


@dataclass(frozen=True)
class SeedConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen address must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise ConfigError(f"unknown setting {where}.{key}")
        default = getattr(cls(), key)
        if isinstance(default, Path):
            value = Path(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key} must be true or false")
        elif isinstance(default, int | float) and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise ConfigError(f"{where}.{key} must be a number")
        values[key] = type(default)(value) if isinstance(default, int | float) else value
    return cls(**values)


def load_config(path: Path | None = None, **overrides: Any) -> SeedConfig:
    """Reads the TOML file (if any), then applies command-line overrides.

    Overrides: ``listen`` ("HOST:PORT"), ``data`` (path).
    """
    document: dict[str, Any] = {}
    if path is not None:
        try:
            document = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
    unknown = set(document) - {"server", "storage", "registry"}
    if unknown:
        raise ConfigError(f"unknown sections: {', '.join(sorted(unknown))}")
    server_table = dict(document.get("server", {}))
    listen = overrides.get("listen") or server_table.pop("listen", None)
    limits = _build(ServerLimits, {k: v for k, v in server_table.items() if k in _LIMIT_KEYS}, "server")
    rest = {k: v for k, v in server_table.items() if k not in _LIMIT_KEYS}
    if rest:
        raise ConfigError(f"unknown setting server.{sorted(rest)[0]}")
    server = ServerConfig(limits=limits)
    if listen:
        host, port = parse_listen(listen)
        server = replace(server, host=host, port=port)
    storage = _build(StorageConfig, document.get("storage", {}), "storage")
    if overrides.get("data"):
        storage = replace(storage, data=Path(overrides["data"]))
    try:
        validate_chunk_size(storage.chunk_size)
    except OCIError as exc:
        raise ConfigError(f"storage.chunk_size: {exc.message}") from exc
    registry = _build(RegistryConfig, document.get("registry", {}), "registry")
    if registry.max_page_size < 1:
        raise ConfigError("registry.max_page_size must be positive")
    return SeedConfig(server=server, storage=storage, registry=registry)


_LIMIT_KEYS = {f.name for f in fields(ServerLimits)}
