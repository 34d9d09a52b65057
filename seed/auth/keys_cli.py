"""``seed keys list | rotate | retire KID``: the token signing keys in ``DATA/auth/keys``.

A running seed reads the directory again on SIGHUP. Rotate, reload, wait one token lifetime
(``auth.token.expiry``; ``refresh_expiry`` for refresh tokens), then retire the old key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import SeedConfig
from ..errors import ConfigError
from .setup import key_directory

__all__ = ["add_keys_parser", "run_keys_command"]


def add_keys_parser(commands: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", type=Path, help="data directory")
    common.add_argument("--config", type=Path, help="TOML configuration file")
    keys = commands.add_parser("keys", help="token signing keys: list, rotate, retire")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    actions.add_parser("list", parents=[common], help="key ids, files, which one signs")
    actions.add_parser("rotate", parents=[common], help="create a new key that signs from now on (then SIGHUP)")
    retire = actions.add_parser("retire", parents=[common], help="remove an old key: its tokens stop verifying")
    retire.add_argument("kid", help="key id from `seed keys list` (one that starts with '-' goes after '--')")


def run_keys_command(args: argparse.Namespace, config: SeedConfig) -> int:
    keys = key_directory(config.storage.data, config.auth)
    if args.keys_command == "rotate":
        print(f"new signing key {keys.rotate()}; send SIGHUP to a running seed")
        return 0
    if args.keys_command == "retire":
        try:
            if not keys.retire(args.kid):
                print(f"seed: no key {args.kid}")
                return 1
        except ConfigError as exc:
            print(f"seed: {exc}")
            return 1
        print(f"retired {args.kid}; send SIGHUP to a running seed")
        return 0
    for kid, path, signs in keys.describe():
        print(f"{kid}  {'signs ' if signs else 'verify'}  {path.name}")
    return 0
