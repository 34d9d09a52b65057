"""Builds the seed's identity stack from the configuration (part of the composition root).

The order of identity providers is ``[auth] providers`` when given, else robots, htpasswd,
then each ``[[auth.ldap]]`` in the order written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import AuthConfig
from ..errors import ConfigError
from .authenticator import Authenticator, AuthEvent
from .htpasswd import HtpasswdProvider
from .identity import IdentityProvider
from .ldap import LdapProvider
from .robots import FileRobotStore, RobotProvider, RobotStore
from .throttle import LoginThrottle
from .tokens import KeyDirectory, TokenAuthority, TrustedIssuer, load_public_keys

__all__ = ["IdentityStack", "build_identity", "key_directory", "robot_store_path"]


@dataclass
class IdentityStack:
    authenticator: Authenticator
    authority: TokenAuthority
    robots: RobotStore
    htpasswd: HtpasswdProvider | None


def robot_store_path(data: Path) -> Path:
    return data / "auth" / "robots.json"


def key_directory(data: Path, auth: AuthConfig) -> KeyDirectory:
    return KeyDirectory(data / "auth" / "keys", [Path(p) for p in auth.token.extra_public_keys])


def build_identity(auth: AuthConfig, data: Path, on_event: AuthEvent,
                   clock: Callable[[], float] | None = None) -> IdentityStack:
    """Providers, token authority, throttle and the authenticator for ``[auth]``."""
    robots = FileRobotStore(robot_store_path(data))
    available: dict[str, IdentityProvider] = {"robots": RobotProvider(robots)}
    htpasswd = None
    if auth.htpasswd is not None:
        htpasswd = HtpasswdProvider(auth.htpasswd)
        available["htpasswd"] = htpasswd
    for ldap_config in auth.ldap:
        available[f"ldap:{ldap_config.name}"] = LdapProvider(ldap_config)
    order = auth.providers or tuple(available)
    for name in order:
        if name not in available:
            raise ConfigError(f"auth.providers names {name!r}, which is not configured")
    trusted = [TrustedIssuer(name=i.name, issuer=i.issuer, audience=i.audience,
                             keys=load_public_keys(i.jwks_file or i.public_key_file),  # type: ignore[arg-type]
                             groups_claim=i.groups_claim) for i in auth.issuers]
    extra = {} if clock is None else {"clock": clock}
    authority = TokenAuthority(key_directory(data, auth), issuer=auth.token.issuer, service=auth.service,
                               expiry=auth.token.expiry, refresh_expiry=auth.token.refresh_expiry,
                               trusted=trusted, **extra)
    throttle = LoginThrottle(auth.throttle)
    authenticator = Authenticator([available[name] for name in order], authority, throttle, robots, on_event)
    return IdentityStack(authenticator, authority, robots, htpasswd)
