"""The fencing numbers keep one writer, and a volume's failover delay cannot undercut them."""

from __future__ import annotations

import pytest

from ferry.core import fencing
from ferry.core.records import VolumeSpec


def test_the_owner_freezes_before_its_lease_can_expire() -> None:
    assert fencing.fencing_holds()
    # An attempt cut off, then the retry (its back-off has 20 % jitter) sent before the freeze.
    one_lost = (
        fencing.RENEW_INTERVAL_SECONDS
        + fencing.RENEW_TIMEOUT_SECONDS
        + 1.2 * fencing.RENEW_RETRY_SECONDS
    )
    assert one_lost <= fencing.FENCE_AFTER_SECONDS, "one lost renewal alone freezes nothing"
    assert fencing.FREEZE_RETRY_SECONDS < fencing.FREEZE_WINDOW_SECONDS


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
