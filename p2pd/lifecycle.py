"""Process lifecycle shared by the ``seed`` and ``p2pd`` commands: SIGTERM/SIGINT start a
graceful shutdown, and systemd (``Type=notify``) hears about it."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

from .sdnotify import notify

__all__ = ["reload_on_signal", "shutdown_on_signals"]

log = logging.getLogger("p2pd.lifecycle")


async def shutdown_on_signals(shutdown: trio.Event, notify_socket: str | None, *,
                              task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Sets ``shutdown`` at the first SIGTERM or SIGINT and tells systemd ``STOPPING=1``.

    Start it with ``nursery.start`` before the service, so a signal that arrives during
    start-up is not lost.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            notify("STOPPING=1\nSTATUS=shutting down", notify_socket)
            shutdown.set()
            return


async def reload_on_signal(reload: Callable[[], Awaitable[None]], *, signum: int = signal.SIGHUP,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Calls ``reload`` at every SIGHUP (``systemctl reload``), one at a time, until cancelled.

    A reload that fails is logged and the service keeps running with what it had: a bad
    configuration file must never take a running registry down.
    """
    with trio.open_signal_receiver(signum) as signals:
        task_status.started()
        async for _ in signals:
            log.info("received %s, reloading", signal.Signals(signum).name)
            try:
                await reload()
            except Exception:
                log.exception("reload failed; still running with the previous configuration")
