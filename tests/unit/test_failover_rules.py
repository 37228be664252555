"""Which copy a failover promotes, when it is refused, and what it says is lost."""

from __future__ import annotations

import calendar

import pytest

from ferry.core.failover import Candidate, FailoverRefused, choose, loss
from ferry.core.records import NodeState

NOON = calendar.timegm((2026, 1, 2, 12, 0, 3, 0, 0, 0))


def copy(node: str, *snapshots: str, at: float = NOON) -> NodeState:
    return NodeState(node=node, volume="pg", snapshots=snapshots, newest_snapshot_at=at)


COPIES = [
    copy("host2", "ferry-1-4", "ferry-1-5"),
    copy("host3", "ferry-1-4", "ferry-1-6", "fenced-1700000000"),
    copy("host4"),
]


def test_the_copy_with_the_newest_snapshot_is_promoted() -> None:
    chosen = choose("pg", "host1", False, COPIES)
    assert (chosen.node, chosen.snapshot) == ("host3", "ferry-1-6")


def test_a_named_copy_is_promoted_even_if_another_is_newer() -> None:
    assert choose("pg", "host1", False, COPIES, to="host2").snapshot == "ferry-1-5"


def test_a_failover_is_refused_while_the_owner_is_live_and_says_to_move() -> None:
    with pytest.raises(FailoverRefused, match=r"owner host1 is live.*volume move pg"):
        choose("pg", "host1", True, COPIES)


@pytest.mark.parametrize(
    ("copies", "to", "said"),
    [
        (COPIES, "host4", "node host4 holds no copy of pg with a snapshot"),
        (COPIES, "host9", r"live copies: host2, host3"),
        ([copy("host4")], "", "no live node holds a copy of pg"),
        ([copy("host1", "ferry-1-9")], "", "no live node holds a copy"),
    ],
)
def test_a_failover_with_no_copy_to_promote_is_refused(
    copies: list[NodeState], to: str, said: str
) -> None:
    with pytest.raises(FailoverRefused, match=said):
        choose("pg", "host1", False, copies, to)


def test_the_loss_is_the_owners_writes_after_the_promoted_snapshot() -> None:
    chosen = Candidate("host2", "ferry-1-5", NOON)
    assert loss("host1", chosen, NOON + 14) == (
        "writes on host1 after 12:00:03 UTC (14 s before it was lost) are not in this copy"
    )
    assert loss("host1", chosen, 0.0) == "writes on host1 after 12:00:03 UTC are not in this copy"
