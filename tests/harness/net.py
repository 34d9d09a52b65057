"""Loopback networking helpers: free ports, bounded HTTP readiness polling, loopback guards."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Collection
from urllib.parse import urlsplit

import httpx

LOOPBACK_NAMES = frozenset({"localhost"})


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (the OS picks it).

    There is an unavoidable race between closing the probe socket and the caller binding the
    port; callers that start servers should retry on "address already in use".
    """
    assert_loopback(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def is_loopback(host: str) -> bool:
    """True if ``host`` (a name or IP, without port) is a loopback address."""
    host = host.strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_hostport(hostport: str) -> tuple[str, int | None]:
    """Split ``"host:port"`` / ``"[::1]:port"`` / ``"host"`` into ``(host, port)``."""
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    host, sep, port = hostport.rpartition(":")
    if not sep:
        return hostport, None
    return host, int(port)


def assert_loopback(host_or_url: str) -> None:
    """Raise ValueError unless ``host_or_url`` (host, host:port or URL) points at loopback.

    The harness must never send traffic anywhere but 127.0.0.0/8.
    """
    host = (urlsplit(host_or_url).hostname or "") if "://" in host_or_url else split_hostport(host_or_url)[0]
    if not is_loopback(host):
        raise ValueError(f"refusing non-loopback address {host_or_url!r} (tests talk to 127.0.0.0/8 only)")


def wait_http_ok(
    url: str,
    deadline_s: float,
    *,
    interval_s: float = 0.05,
    alive: Callable[[], bool] | None = None,
    ready_statuses: Collection[int] = (200,),
    verify: ssl.SSLContext | bool = True,
) -> httpx.Response:
    """Poll ``GET url`` until it answers 200 (or one of ``ready_statuses``), for at most ``deadline_s`` seconds.

    ``alive`` (optional) is checked before each attempt; if it returns False the wait stops
    early (e.g. the server process exited). Raises TimeoutError with the last error otherwise.
    Proxy environment variables are ignored (``trust_env=False``).
    """
    assert_loopback(url)
    end = time.monotonic() + deadline_s
    max_attempts = max(1, int(deadline_s / interval_s) + 1)
    last: str = "no attempt made"
    with httpx.Client(trust_env=False, timeout=min(2.0, max(0.1, deadline_s)), verify=verify) as client:
        for _ in range(max_attempts):
            if alive is not None and not alive():
                raise RuntimeError(f"server died while waiting for {url} (last: {last})")
            try:
                resp = client.get(url)
                if resp.status_code in ready_statuses:
                    return resp
                last = f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= end:
                break
            time.sleep(min(interval_s, max(0.0, end - time.monotonic())))
    raise TimeoutError(f"{url} not ready after {deadline_s}s (last: {last})")
