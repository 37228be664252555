"""The timing that keeps a volume to one writer when its owner loses etcd: one table of numbers.

An owner that cannot renew its etcd lease stops writes to every volume it
owns (the freeze) before the lease can expire; nobody may fail a volume
over before the lease expired. So by the time a failover can happen, the
old owner has stopped. docs/failover.md gives the argument; a unit test
checks the inequality of ``FencingTiming.holds``, for every lease TTL.

All durations are measured from the moment the agent *sent* its last
renewal that etcd confirmed: etcd cannot expire the lease earlier than the
lease TTL after that, by etcd's own clock.

Every duration is a fixed share of the lease TTL (``--lease-ttl``), so a
slow host (a VM under emulation) raises one number and the inequality
still holds: raising the TTL alone, with a fixed freeze delay, would be
safe, but lowering it would not.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_LEASE_TTL_SECONDS = 10
MIN_LEASE_TTL_SECONDS = 5
"""Shorter, and one etcd round trip under load is a noticeable share of the renewal."""
MAX_LEASE_TTL_SECONDS = 600


@dataclass(frozen=True)
class FencingTiming:
    """The self-fence's numbers for one lease TTL; the comments give them at 10 s."""

    lease_ttl: int = DEFAULT_LEASE_TTL_SECONDS
    """The agent's etcd lease; its node record, state and mount records live on it."""

    @property
    def renew_interval(self) -> float:
        """How often the agent renews while renewals succeed (3.33 s)."""
        return self.lease_ttl / 3

    @property
    def renew_timeout(self) -> float:
        """Each renewal attempt is cut off after this long: a cut link never answers (1.67 s)."""
        return self.renew_interval / 2

    @property
    def renew_retry(self) -> float:
        """After a failed attempt the next comes this soon at most, backing off from half
        of it (0.5 s)."""
        return self.lease_ttl * 0.05

    @property
    def fence_after(self) -> float:
        """No confirmed renewal for this long: the agent freezes every volume it owns (6 s).
        Longer than one renewal interval plus one attempt cut off, so one lost renewal
        alone freezes nothing."""
        return self.lease_ttl * 0.6

    @property
    def freeze_window(self) -> float:
        """How long the freeze may take (2 s). It is retried while a file is open for
        writing until ``freeze_retry``; then the agent kills the writers that keep it
        from freezing and freezes once more."""
        return self.lease_ttl * 0.2

    @property
    def freeze_retry(self) -> float:
        return self.lease_ttl * 0.1

    @property
    def watchdog_tick(self) -> float:
        """How often the agent looks at its last renewal: the freeze starts this late at
        most (0.25 s)."""
        return self.lease_ttl * 0.025

    @property
    def clock_margin(self) -> float:
        """What the agent's and etcd's clocks may disagree on over one lease TTL (rate, not
        offset: both measure durations), with the scheduling delay of the watchdog's event
        loop (1 s)."""
        return self.lease_ttl * 0.1

    @property
    def fencing_bound(self) -> float:
        """From the last confirmed renewal to every owned volume refusing writes, at the
        latest (8.25 s)."""
        return self.fence_after + self.watchdog_tick + self.freeze_window

    def holds(self) -> bool:
        """The old owner has stopped writes before its lease can expire."""
        return self.fencing_bound + self.clock_margin <= self.lease_ttl


DEFAULT_TIMING = FencingTiming()


def check_lease_ttl(seconds: int) -> int:
    """``seconds`` when it is a lease TTL the agent may run with; ValueError saying the range."""
    if not MIN_LEASE_TTL_SECONDS <= seconds <= MAX_LEASE_TTL_SECONDS:
        raise ValueError(
            f"--lease-ttl {seconds}: give {MIN_LEASE_TTL_SECONDS} to {MAX_LEASE_TTL_SECONDS} "
            f"seconds (default {DEFAULT_LEASE_TTL_SECONDS}; raise it only on hosts too slow "
            "to renew in time)"
        )
    return seconds


MIN_FAILOVER_AFTER_SECONDS = float(DEFAULT_LEASE_TTL_SECONDS)
"""``failover_after`` may not be shorter. The delay counts from when the owner's lease is
seen gone, which by itself guarantees the owner froze (whatever its TTL): this is a second
margin on top of the lease (an etcd that revived the lease, a clock that ran fast)."""
DEFAULT_FAILOVER_AFTER_SECONDS = 30.0

FAILOVER_MODES = ("manual", "auto")


def check_failover(mode: str, after: float) -> None:
    """ValueError, saying what is allowed, for a failover mode or delay that is not."""
    if mode not in FAILOVER_MODES:
        raise ValueError(f"invalid failover {mode!r}: use {' or '.join(FAILOVER_MODES)}")
    if not after >= MIN_FAILOVER_AFTER_SECONDS:
        raise ValueError(
            f"failover_after {after:g} s is shorter than the fencing bound: use at least "
            f"{MIN_FAILOVER_AFTER_SECONDS:g} s (the default lease TTL; docs/failover.md)"
        )
