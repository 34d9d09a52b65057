"""systemd's ``sd_notify`` protocol: one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``.

The caller reads the environment (``os.environ.get("NOTIFY_SOCKET")``) and passes the value in, so this module
stays free of process-wide state. Without a socket (not started by systemd, or ``Type=`` is not ``notify``)
every call is a no-op that returns ``False``.

Protocol (sd_notify(3)): the socket is an ``AF_UNIX`` ``SOCK_DGRAM`` socket; a path starting with ``@`` names the
abstract namespace (the ``@`` becomes a NUL byte). Each message is sent as one datagram, newline-separated
assignments such as ``READY=1\\nSTATUS=listening on 127.0.0.1:5080``. Sending is synchronous and never blocks for
long: a datagram to a local socket either fits in the receiver's queue or fails at once (``MSG_DONTWAIT``).
"""

from __future__ import annotations

import socket

__all__ = ["notify"]


def _address(socket_path: str) -> str | bytes:
    if socket_path.startswith("@"):
        return b"\0" + socket_path[1:].encode()
    return socket_path


def notify(message: str, socket_path: str | None) -> bool:
    """Send ``message`` (e.g. ``"READY=1\\nSTATUS=serving"``) to the service manager.

    Args:
        message: newline-separated ``KEY=VALUE`` assignments.
        socket_path: the value of ``$NOTIFY_SOCKET``: a filesystem path, ``@name`` for the abstract namespace,
            or ``None``/``""`` when there is no service manager to notify.

    Returns:
        ``True`` if the datagram was sent; ``False`` if there is no socket or sending failed. Failing to notify
        never stops the service: systemd then reports the start as timed out, which is the visible symptom.
    """
    if not socket_path:
        return False
    if not socket_path.startswith(("/", "@")):
        return False  # sd_notify(3) accepts only absolute paths and abstract names (vsock is not supported here)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), socket.MSG_DONTWAIT, _address(socket_path))
    except OSError:
        return False
    return True
