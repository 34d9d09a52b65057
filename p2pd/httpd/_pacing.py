"""One egress rate shared by the responses in progress, kept by the kernel.

Each response that takes part has its connection paced (``Request.pace``: Linux
``SO_MAX_PACING_RATE``) at the rate ÷ the responses in progress, and every other one's pace is
re-divided as responses start and end. Paced, a server's packets leave evenly, at most the rate
in all, instead of a congestion window at a time: the short queue of the link it sends over
does not overflow, and the flows that share it each get their part instead of a few starving
in retransmission timeouts.

A response ends when its last byte is in the socket's buffer, not on the wire: a small one (a
64 KiB chunk) may be all there at once. Its connection keeps its share until those bytes have
left (the pace's ``unsent()``, Linux ``SIOCOUTQNSD``, at its share), so a response that starts
meanwhile does not get the whole rate on top of them (a paced 64 KiB-chunk pull ran at twice
its ``upload_rate`` without this; docs/benchmarks.md, nineteenth session).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

__all__ = ["SharedPacing"]

Pace = Callable[[int], None]


class SharedPacing:
    """``rate`` bytes/s shared equally by the paced responses in progress (0: no pacing). ``rate``
    may change (a reload): responses that start from then on get the new one, and those in
    progress are re-divided at the next start or end."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        # token -> (pace, until): until is None while the response is in progress, else when its
        # connection's last unsent bytes will have left at its share (then it is dropped).
        self._paced: dict[int, tuple[Pace, float | None]] = {}
        self._share = 0
        self._tokens = itertools.count()

    def start(self, pace: Pace | None) -> Callable[[], None] | None:
        """Paces a response's connection (``Request.pace``) at its share; returns what ends its
        share, or None when nothing is paced (no rate, or no socket to pace).

        An ended response's connection keeps its share while its last bytes are still in the
        socket's buffer (a pace with ``unsent()``; without it, it ends at once), and its pace stays
        set: they leave at that rate, not at once.
        """
        if self.rate <= 0 or pace is None:
            return None
        token = next(self._tokens)
        self._paced[token] = (pace, None)
        self._repace()

        def end() -> None:
            entry = self._paced.get(token)
            if entry is None or entry[1] is not None:
                return
            unsent = _unsent(pace)
            if unsent > 0 and self._share > 0:
                self._paced[token] = (pace, time.monotonic() + unsent / self._share)
            else:
                del self._paced[token]
            self._repace()

        return end

    def _repace(self) -> None:
        now = time.monotonic()
        for token in [t for t, (_pace, until) in self._paced.items() if until is not None and until <= now]:
            del self._paced[token]  # its last bytes have left: it keeps its last pace until it is used again
        if self._paced:
            # A rate set to 0 (a reload) lifts the pace of the responses still in progress.
            share = self._share = max(1, self.rate // len(self._paced)) if self.rate > 0 else 0
            for pace, _until in self._paced.values():
                pace(share)


def _unsent(pace: Pace) -> int:
    """Bytes the pace's connection has not sent yet (0 when it cannot tell)."""
    unsent = getattr(pace, "unsent", None)
    return unsent() if callable(unsent) else 0
