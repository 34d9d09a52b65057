"""Helpers shared by the seed's and the agent's configuration loaders (no I/O but reading
the one TOML file named on the command line)."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["build_section", "parse_listen", "read_toml"]


def read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"listen address must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_section(cls: type, table: Any, where: str) -> Any:
    """Builds dataclass ``cls`` from a TOML table, checking names and value types.

    Field types are read from the (string) annotations: bool, int, float, str, Path,
    ``tuple[str, ...]`` and their ``| None`` forms.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name: str(f.type) for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        annotation = known.get(key)
        if annotation is None:
            raise ConfigError(f"unknown setting {where}.{key}")
        if value is None:
            pass
        elif "Path" in annotation:
            if not isinstance(value, str):
                raise ConfigError(f"{where}.{key} must be a path string")
            value = Path(value)
        elif annotation.startswith("bool"):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.{key} must be true or false")
        elif annotation.startswith(("int", "float")):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{where}.{key} must be a number")
            value = float(value) if annotation.startswith("float") else int(value)
        elif annotation.startswith("tuple"):
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.{key} must be a list of strings")
            value = tuple(value)
        elif annotation.startswith("str") and not isinstance(value, str):
            raise ConfigError(f"{where}.{key} must be a string")
        values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{where}]: {exc}") from exc
