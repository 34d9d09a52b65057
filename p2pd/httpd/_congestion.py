"""The TCP congestion control of a server's connections (Linux ``TCP_CONGESTION``).

Set on the listening sockets, so every accepted connection starts with it (the kernel copies a
listener's choice to its children). It governs what the server *sends*: for a server whose
answers are bulk bytes (blob downloads, chunks between nodes) it decides how those flows share a
link's queue with each other. Why the agent's peer port uses ``reno`` by default:
docs/architecture.md, "Congestion control on the peer port".
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterable
from typing import Protocol

__all__ = ["check_congestion_control", "set_congestion_control"]

log = logging.getLogger("p2pd.httpd")

# Linux names an algorithm in at most 15 characters (TCP_CA_NAME_MAX = 16 with the NUL).
_NAME = re.compile(r"[a-z0-9_]{1,15}")
_TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", None)


class _Settable(Protocol):
    def setsockopt(self, level: int, option: int, value: bytes, /) -> None: ...


def check_congestion_control(name: str) -> str:
    """``name`` if it can name a Linux congestion control algorithm ("" = the host's default);
    ValueError otherwise. Whether this kernel has it and lets us use it is known only when it is
    set (``set_congestion_control``)."""
    if name and not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a congestion control algorithm's name (e.g. reno, cubic, bbr; "
                         "\"\" for the host's default)")
    return name


def set_congestion_control(sockets: Iterable[_Settable], name: str) -> str | None:
    """Sets ``name`` on each of ``sockets``; returns None, or why the kernel refused it (the
    sockets it refused keep the host's default, and a warning says how many: a missing algorithm
    must not keep a server down). "" leaves them alone."""
    if not name:
        return None
    if _TCP_CONGESTION is None:
        missing = "this platform has no TCP_CONGESTION"
        log.warning("congestion control %s not set: %s; connections use the system's default", name, missing)
        return missing
    reason: str | None = None
    refused = tried = 0
    for sock in sockets:
        tried += 1
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_CONGESTION, name.encode())
        except OSError as exc:
            # ENOENT: not built or loaded; EPERM: not in net.ipv4.tcp_allowed_congestion_control
            # and the process lacks CAP_NET_ADMIN. The other listeners (another address family)
            # are still tried.
            refused += 1
            reason = exc.strerror or str(exc)
    if reason is not None:
        log.warning("congestion control %s refused by the kernel (%s) on %d of %d listening sockets; their "
                    "connections use the host's default (net.ipv4.tcp_congestion_control)", name, reason,
                    refused, tried)
    return reason
