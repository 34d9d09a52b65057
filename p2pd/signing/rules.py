"""``[[signatures]]``: which repositories need signatures, from which keys, and what happens
without one.

Example (``seed.toml``, or ``p2pd.toml`` for enforcement at the node)::

    [[signatures]]
    repositories = ["prod/**"]
    keys = ["/etc/seed/keys/release.asc", "/etc/seed/keys/cosign.pub"]
    mode = "enforce"                           # or "warn": serve, but record the verdict
    signed_identity = "matchRepoDigestOrExact" # | "matchExact" | "matchRepository"
    registries = ["seed.example:5000"]         # optional: host names a signed reference may name

The first rule whose ``repositories`` match decides; no match: no signature policy. Relative
key paths are relative to the configuration file. Keys are read when the configuration is
loaded (and on reload), so a bad key file stops the seed from starting rather than from
serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pd.errors import ConfigError
from p2pd.globs import compile_glob, validate_glob
from p2pd.tomlconfig import build_section

from .keys import TrustedKeys, find_gpg_tool, load_trusted_keys
from .payload import IDENTITY_MODES

__all__ = ["MODES", "SignaturePolicy", "SignatureRule", "from_toml"]

MODES = ("enforce", "warn")


@dataclass(frozen=True)
class SignatureRule:
    """One ``[[signatures]]`` entry.

    Attributes:
        repositories: globs as in ``[[access]]`` (``*`` one component, ``**`` any depth).
        keys: the files of the trusted public keys, as configured.
        mode: ``enforce`` (a pull by tag without a valid signature is refused with 403) or
            ``warn`` (served; the verdict is recorded and reported).
        signed_identity: how the signed docker-reference must name the pulled image, with
            containers/image's names (see ``p2pd.signing.payload.identity_matches``).
        registries: when not empty, the registry hosts a signed reference may name.
        trusted: the loaded keys.
    """

    repositories: tuple[str, ...]
    keys: tuple[Path, ...]
    mode: str = "enforce"
    signed_identity: str = "matchRepoDigestOrExact"
    registries: tuple[str, ...] = ()
    trusted: TrustedKeys = field(default_factory=TrustedKeys, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.repositories:
            raise ValueError("repositories must name at least one pattern")
        for pattern in self.repositories:
            validate_glob(pattern)
        if not self.keys:
            raise ValueError("keys must name at least one trusted public key file")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.signed_identity not in IDENTITY_MODES:
            raise ValueError(f"signed_identity must be one of {', '.join(IDENTITY_MODES)}")

    def matches(self, repository: str) -> bool:
        return any(compile_glob(pattern).fullmatch(repository) for pattern in self.repositories)


@dataclass(frozen=True)
class SignaturePolicy:
    """All ``[[signatures]]`` rules, in configuration order."""

    rules: tuple[SignatureRule, ...] = ()

    def rule_for(self, repository: str) -> SignatureRule | None:
        return next((rule for rule in self.rules if rule.matches(repository)), None)


@dataclass(frozen=True)
class _RuleFields:
    # What build_section checks for types; the rule itself validates values.
    repositories: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    mode: str = "enforce"
    signed_identity: str = "matchRepoDigestOrExact"
    registries: tuple[str, ...] = ()


def from_toml(document: Mapping[str, Any], base_dir: Path | None = None) -> SignaturePolicy:
    """Reads ``[[signatures]]`` from a parsed TOML document and loads the keys it names.

    Args:
        document: the whole parsed configuration (other tables are ignored).
        base_dir: what relative key paths are relative to (the configuration file's directory).

    Raises:
        ConfigError: a wrong setting or value, or a key file that cannot be used.
    """
    tables = document.get("signatures", [])
    if not isinstance(tables, list):
        raise ConfigError("signatures must be an array of tables ([[signatures]])")
    rules = []
    for index, table in enumerate(tables):
        where = f"signatures[{index}]"
        values = build_section(_RuleFields, table, where)
        paths = tuple(_resolve(Path(key), base_dir) for key in values.keys)
        try:
            rule = SignatureRule(values.repositories, paths, values.mode, values.signed_identity, values.registries)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"[[{where}]]: {exc}") from exc
        trusted = load_trusted_keys(rule.keys)
        if trusted.openpgp:
            find_gpg_tool("gpgv")  # verification needs it: say so now, not at the first pull
        rules.append(SignatureRule(rule.repositories, rule.keys, rule.mode, rule.signed_identity, rule.registries,
                                   trusted))
    return SignaturePolicy(tuple(rules))


def _resolve(path: Path, base_dir: Path | None) -> Path:
    path = path.expanduser()
    if not path.is_absolute() and base_dir is not None:
        return base_dir / path
    return path
