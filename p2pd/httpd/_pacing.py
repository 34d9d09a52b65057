"""One egress rate shared by the responses in progress, kept by the kernel.

Each response that takes part has its connection paced (``Request.pace``: Linux
``SO_MAX_PACING_RATE``) at the rate ÷ the responses in progress, and every other one's pace is
re-divided as responses start and end. Paced, a server's packets leave evenly, at most the rate
in all, instead of a congestion window at a time: the short queue of the link it sends over
does not overflow, and the flows that share it each get their part instead of a few starving
in retransmission timeouts.

A response's share ends when its ``end`` is called: callers pass it as ``Response.on_close`` with
``drained_close`` set, so the server calls it once the response's last bytes have left the
socket's send queue, not when they are queued (a 64 KiB answer is queued whole at once: agents
whose ``upload_rate`` was half their link used 0.85 of it; docs/benchmarks.md, twentieth session).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

__all__ = ["SharedPacing"]

Pace = Callable[[int], None]


class SharedPacing:
    """``rate`` bytes/s shared equally by the paced responses in progress (0: no pacing). ``rate``
    may change (a reload): responses that start from then on get the new one, and those in
    progress are re-divided at the next start or end."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._paced: dict[int, Pace] = {}
        self._tokens = itertools.count()

    def start(self, pace: Pace | None) -> Callable[[], None] | None:
        """Paces a response's connection (``Request.pace``) at its share; returns what ends its
        share, or None when nothing is paced (no rate, or no socket to pace).

        An ended response's connection keeps its last share: its last bytes may still be in the
        socket's buffer, and they leave at that rate, not at once.
        """
        if self.rate <= 0 or pace is None:
            return None
        token = next(self._tokens)
        self._paced[token] = pace
        self._repace()

        def end() -> None:
            if self._paced.pop(token, None) is not None:
                self._repace()

        return end

    def _repace(self) -> None:
        if self._paced:
            # A rate set to 0 (a reload) lifts the pace of the responses still in progress.
            share = max(1, self.rate // len(self._paced)) if self.rate > 0 else 0
            for pace in self._paced.values():
                pace(share)
