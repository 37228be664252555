"""The timing that keeps a volume to one writer when its owner loses etcd: one table of numbers.

An owner that cannot renew its etcd lease stops writes to every volume it
owns (the freeze) before the lease can expire; nobody may fail a volume
over before the lease expired. So by the time a failover can happen, the
old owner has stopped. docs/failover.md gives the argument; a unit test
checks the inequality below, so a change to one number that breaks it fails.

All durations are measured from the moment the agent *sent* its last
renewal that etcd confirmed: etcd cannot expire the lease earlier than
LEASE_TTL after that, by etcd's own clock.
"""

from __future__ import annotations

LEASE_TTL_SECONDS = 10
"""The agent's etcd lease; its node record, state and mount records live on it."""
RENEW_INTERVAL_SECONDS = LEASE_TTL_SECONDS / 3
"""How often the agent renews while renewals succeed."""
RENEW_TIMEOUT_SECONDS = RENEW_INTERVAL_SECONDS / 2
"""Each renewal attempt is cut off after this long (a cut link never answers)."""
RENEW_RETRY_SECONDS = 0.5
"""After a failed attempt the next comes this soon (at most, with back-off from 0.25 s)."""
FENCE_AFTER_SECONDS = 6.0
"""No confirmed renewal for this long: the agent freezes every volume it owns. Longer than
one renewal interval plus one attempt cut off, so one lost renewal alone freezes nothing."""
FREEZE_WINDOW_SECONDS = 2.0
"""How long the freeze may take. It is retried while a file is open for writing until
FREEZE_RETRY_SECONDS; then the agent kills the writers that keep it from freezing and
freezes once more."""
FREEZE_RETRY_SECONDS = 1.0
WATCHDOG_TICK_SECONDS = 0.25
"""How often the agent looks at its last renewal: the freeze starts this late at most."""
CLOCK_MARGIN_SECONDS = 1.0
"""What the agent's and etcd's clocks may disagree on over one lease TTL (rate, not offset:
both measure durations), with the scheduling delay of the watchdog's event loop."""
FENCING_BOUND_SECONDS = FENCE_AFTER_SECONDS + WATCHDOG_TICK_SECONDS + FREEZE_WINDOW_SECONDS
"""From the last confirmed renewal to every owned volume refusing writes, at the latest."""

MIN_FAILOVER_AFTER_SECONDS = float(LEASE_TTL_SECONDS)
"""``failover_after`` may not be shorter: the delay counts from when the owner's lease is
seen gone, and is a second margin on top of the lease (an etcd that revived the lease,
a clock that ran fast)."""
DEFAULT_FAILOVER_AFTER_SECONDS = 30.0

FAILOVER_MODES = ("manual", "auto")


def fencing_holds() -> bool:
    """The old owner has stopped writes before its lease can expire."""
    return FENCING_BOUND_SECONDS + CLOCK_MARGIN_SECONDS <= LEASE_TTL_SECONDS


def check_failover(mode: str, after: float) -> None:
    """ValueError, saying what is allowed, for a failover mode or delay that is not."""
    if mode not in FAILOVER_MODES:
        raise ValueError(f"invalid failover {mode!r}: use {' or '.join(FAILOVER_MODES)}")
    if not after >= MIN_FAILOVER_AFTER_SECONDS:
        raise ValueError(
            f"failover_after {after:g} s is shorter than the fencing bound: use at least "
            f"{MIN_FAILOVER_AFTER_SECONDS:g} s (the owner's lease TTL; docs/failover.md)"
        )
