"""The fencing numbers keep one writer, and a volume's failover delay cannot undercut them."""

from __future__ import annotations

import pytest

from ferry.core import fencing
from ferry.core.records import VolumeSpec


@pytest.mark.parametrize(
    "ttl",
    [
        fencing.MIN_LEASE_TTL_SECONDS,
        fencing.DEFAULT_LEASE_TTL_SECONDS,
        30,
        fencing.MAX_LEASE_TTL_SECONDS,
    ],
)
def test_the_owner_freezes_before_its_lease_can_expire(ttl: int) -> None:
    timing = fencing.FencingTiming(fencing.check_lease_ttl(ttl))
    assert timing.holds()
    # An attempt cut off, then the retry (its back-off has 20 % jitter) sent before the freeze.
    one_lost = timing.renew_interval + timing.renew_timeout + 1.2 * timing.renew_retry
    assert one_lost <= timing.fence_after, "one lost renewal alone freezes nothing"
    assert timing.freeze_retry < timing.freeze_window


def test_the_default_timing_is_the_documented_one() -> None:
    timing = fencing.DEFAULT_TIMING
    assert (timing.lease_ttl, timing.fence_after, timing.fencing_bound) == (10, 6.0, 8.25)


@pytest.mark.parametrize("ttl", [0, 4, 601])
def test_a_lease_ttl_out_of_range_is_refused_with_the_range(ttl: int) -> None:
    with pytest.raises(ValueError, match="give 5 to 600 seconds"):
        fencing.check_lease_ttl(ttl)


def test_a_volume_fails_over_by_hand_after_30_s_unless_its_spec_says_otherwise() -> None:
    spec = VolumeSpec(name="pg", size_bytes=1 << 30, node="host1")
    assert (spec.failover, spec.failover_after) == ("manual", 30.0)
    assert VolumeSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("mode", "after", "said"),
    [("sometimes", 30.0, "use manual or auto"), ("auto", 5.0, "shorter than the fencing bound")],
)
def test_a_failover_setting_that_is_not_allowed_is_refused(
    mode: str, after: float, said: str
) -> None:
    with pytest.raises(ValueError, match=said):
        VolumeSpec(name="pg", size_bytes=1 << 30, node="host1", failover=mode, failover_after=after)
