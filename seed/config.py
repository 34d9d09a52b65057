"""The seed's configuration: one frozen dataclass tree, loaded once from TOML and flags.

Example ``seed.toml``::

    [server]
    listen = "0.0.0.0:5000"
    idle_timeout = 75.0
    use_sendfile = true    # false: send blobs with pread + send instead of os.sendfile

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

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from p2pd.errors import ConfigError
from p2pd.httpd import ServerLimits
from p2pd.oci.chunkmap import DEFAULT_CHUNK_SIZE, validate_chunk_size
from p2pd.oci.errors import OCIError
from p2pd.tomlconfig import build_section, parse_listen, read_toml

__all__ = ["ConfigError", "RegistryConfig", "SeedConfig", "ServerConfig", "StorageConfig", "load_config",
           "parse_listen"]


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


def load_config(path: Path | None = None, **overrides: Any) -> SeedConfig:
    """Reads the TOML file (if any), then applies command-line overrides.

    Overrides: ``listen`` ("HOST:PORT"), ``data`` (path).
    """
    document = read_toml(path)
    unknown = set(document) - {"server", "storage", "registry"}
    if unknown:
        raise ConfigError(f"unknown sections: {', '.join(sorted(unknown))}")
    server_table = dict(document.get("server", {}))
    listen = overrides.get("listen") or server_table.pop("listen", None)
    limits = build_section(ServerLimits, {k: v for k, v in server_table.items() if k in _LIMIT_KEYS}, "server")
    rest = {k: v for k, v in server_table.items() if k not in _LIMIT_KEYS}
    if rest:
        raise ConfigError(f"unknown setting server.{sorted(rest)[0]}")
    server = ServerConfig(limits=limits)
    if listen:
        host, port = parse_listen(listen)
        server = replace(server, host=host, port=port)
    storage = build_section(StorageConfig, document.get("storage", {}), "storage")
    if overrides.get("data"):
        storage = replace(storage, data=Path(overrides["data"]))
    try:
        validate_chunk_size(storage.chunk_size)
    except OCIError as exc:
        raise ConfigError(f"storage.chunk_size: {exc.message}") from exc
    registry = build_section(RegistryConfig, document.get("registry", {}), "registry")
    if registry.max_page_size < 1:
        raise ConfigError("registry.max_page_size must be positive")
    return SeedConfig(server=server, storage=storage, registry=registry)


_LIMIT_KEYS = {f.name for f in fields(ServerLimits)}
