"""Data connections that have not shown a ticket yet: a cap per peer address, and a summary log.

Anyone who reaches the data port can open connections, and each one holds a
descriptor until it shows its token or TOKEN_READ_SECONDS pass. Without a
cap one address could hold thousands open; with a log line per connection
500 idle connections wrote 500 WARNING lines and drowned what mattered. So
a peer address gets at most PER_PEER connections awaiting admission (more
are closed at once), the data port at most TOTAL, and what was turned
away is logged as one line: at the first drop after a quiet interval, then
at most once per SUMMARY_SECONDS.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from agent import metrics

log = logging.getLogger(__name__)

PER_PEER = 16
TOTAL = 256
SUMMARY_SECONDS = 60.0
SHOWN_PEERS = 5


class Unadmitted:
    """Counts connections awaiting admission per peer, and the ones turned away."""

    def __init__(
        self,
        per_peer: int = PER_PEER,
        total: int = TOTAL,
        interval: float = SUMMARY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_peer = per_peer
        self._total = total
        self._interval = interval
        self._clock = clock
        self._waiting: Counter[str] = Counter()
        self._dropped: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()
        self._last_summary = -interval

    def enter(self, peer: str) -> bool:
        """Room for one more connection from ``peer``; False (and counted) when it has none."""
        if self._waiting[peer] >= self._per_peer or self._waiting.total() >= self._total:
            self.drop(peer, "over_cap")
            return False
        self._waiting[peer] += 1
        return True

    def leave(self, peer: str) -> None:
        """A connection from ``peer`` was admitted or dropped."""
        self._waiting[peer] -= 1
        if self._waiting[peer] <= 0:
            del self._waiting[peer]

    def drop(self, peer: str, reason: str) -> None:
        """A connection from ``peer`` was closed before admission, for ``reason``."""
        self._dropped[peer] += 1
        self._reasons[reason] += 1
        metrics.DATA_REFUSED.labels(reason).inc()
        if self._clock() - self._last_summary >= self._interval:
            self.summarize()

    def summarize(self) -> None:
        """One line for everything dropped since the last one (nothing when nothing was)."""
        if not self._dropped:
            return
        self._last_summary = self._clock()
        peers = ",".join(
            f"{peer}={count}" for peer, count in self._dropped.most_common(SHOWN_PEERS)
        )
        if len(self._dropped) > SHOWN_PEERS:
            peers += f",+{len(self._dropped) - SHOWN_PEERS} more"
        reasons = ",".join(f"{reason}={count}" for reason, count in sorted(self._reasons.items()))
        log.warning(
            "data port: connections closed before admission: count=%d peers=%s reasons=%s "
            "waiting=%d next_summary_in=%.0fs; agents connect only with a ticket, so other "
            "peers are probing the port: allow it only between agents (docs/deploy.md)",
            self._dropped.total(),
            peers,
            reasons,
            self._waiting.total(),
            self._interval,
        )
        self._dropped.clear()
        self._reasons.clear()
