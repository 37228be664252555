"""Replicas as pure rules: where they go, what pruning keeps for them, how often the
owner sends, what the convergence plan starts, and the spec's own checks."""

from __future__ import annotations

import pytest

from ferry.core.placement import Candidate, after_move, place_replicas
from ferry.core.plan import (
    Activate,
    Actual,
    Desired,
    LocalVolume,
    Replicate,
    UnmountUnused,
    plan,
)
from ferry.core.records import Move, Owner, VolumeSpec, parse_duration
from ferry.core.snapshots import prunable_with_replicas, replication_interval

GIB = 1 << 30
NODES = [Candidate("a", 50 * GIB), Candidate("b", 30 * GIB), Candidate("c", 40 * GIB)]


def test_replicas_go_to_the_roomiest_nodes_but_never_the_owners() -> None:
    assert place_replicas(1, "a", (), NODES, GIB) == ("c",)
    assert place_replicas(2, "a", (), NODES, GIB) == ("c", "b")
    assert place_replicas(1, "c", (), NODES, GIB) == ("a",)


def test_a_node_without_room_for_the_volume_takes_no_replica() -> None:
    assert place_replicas(2, "a", (), NODES, 35 * GIB) == ("c",)


def test_too_few_nodes_places_what_it_can() -> None:
    assert place_replicas(3, "a", (), NODES, GIB) == ("c", "b")


def test_placed_replicas_stay_where_they_are_and_fewer_drop_the_last() -> None:
    assert place_replicas(2, "a", ("b", "c"), NODES, GIB) == ("b", "c")
    assert place_replicas(1, "a", ("b", "c"), NODES, GIB) == ("b",)
    # The owner's node is never a replica, even if a record still lists it.
    assert place_replicas(1, "a", ("a",), NODES, GIB) == ("c",)


def test_a_replica_down_is_kept_until_expired_then_replaced_if_another_node_can() -> None:
    live = [c for c in NODES if c.name != "b"]
    four = [*NODES, Candidate("d", 10 * GIB)]
    assert place_replicas(1, "a", ("b",), live, GIB) == ("b",)
    assert place_replicas(1, "a", ("b",), live, GIB, expired={"b"}) == ("c",)
    # Nothing else can take it: the replica stays placed on the node that is down.
    assert place_replicas(2, "a", ("b", "c"), live, GIB, expired={"b"}) == ("b", "c")
    live_four = [c for c in four if c.name != "b"]
    assert place_replicas(2, "a", ("b", "c"), live_four, GIB, expired={"b"}) == ("d", "c")


def test_a_move_to_a_replica_swaps_roles_with_the_old_owner() -> None:
    assert after_move(("b", "c"), source="a", target="b") == ("a", "c")
    assert after_move(("b", "c"), source="a", target="d") == ("b", "c")


def test_pruning_keeps_each_replicas_base_and_nothing_between() -> None:
    snaps = [f"ferry-1-{n}" for n in range(1, 9)]
    # Replica b is at 7 (current), replica c far behind at 2; 7 and 8 are the newest.
    assert prunable_with_replicas(snaps, bases=["ferry-1-7", "ferry-1-2"]) == [
        "ferry-1-1",
        "ferry-1-3",
        "ferry-1-4",
        "ferry-1-5",
        "ferry-1-6",
    ]
    assert prunable_with_replicas(["manual", "ferry-1-1"], bases=[]) == []


def test_the_owner_sends_three_times_per_rpo() -> None:
    assert replication_interval(15) == 5
    assert replication_interval(2) == 1


@pytest.mark.parametrize(("text", "seconds"), [("15s", 15), ("5m", 300), ("1h", 3600), (90, 90)])
def test_durations(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5s", "15x", "1.5m"])
def test_bad_durations_say_what_to_use(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_spec_refuses_replicas_without_rpo_and_more_nodes_than_wanted() -> None:
    with pytest.raises(ValueError, match="no rpo"):
        VolumeSpec(name="pg", size_bytes=GIB, node="a", replicas=1)
    with pytest.raises(ValueError, match="replica nodes"):
        VolumeSpec(
            name="pg",
            size_bytes=GIB,
            node="a",
            replicas=1,
            rpo_seconds=15,
            replica_nodes=("b", "c"),
        )
    stored = VolumeSpec(
        name="pg", size_bytes=GIB, node="a", replicas=1, rpo_seconds=15, replica_nodes=("b",)
    )
    assert VolumeSpec.from_json(stored.to_json()) == stored


def _desired(spec: VolumeSpec, moves: dict[str, Move] | None = None) -> Desired:
    return Desired(
        node="a",
        volumes={"pg": spec},
        owners={"pg": Owner(node="a", epoch=1)},
        moves=moves or {},
    )


def test_the_owner_replicates_once_active_and_not_during_a_move() -> None:
    spec = VolumeSpec(
        name="pg", size_bytes=GIB, node="a", replicas=1, rpo_seconds=15, replica_nodes=("b",)
    )
    active = LocalVolume("pg", writable=True)
    inactive = LocalVolume("pg")
    assert plan(_desired(spec), Actual(volumes={"pg": active})) == [Replicate("pg")]
    unused = LocalVolume("pg", writable=True, mounted=True)
    assert plan(_desired(spec), Actual(volumes={"pg": unused})) == [
        UnmountUnused("pg"),
        Replicate("pg"),
    ]
    assert plan(_desired(spec), Actual(volumes={"pg": inactive})) == [Activate("pg", 1)]
    running = Actual(volumes={"pg": active}, replicating=frozenset({"pg"}))
    assert plan(_desired(spec), running) == []
    moving = {"pg": Move(volume="pg", source="a", target="b")}
    assert Replicate("pg") not in plan(_desired(spec, moving), Actual(volumes={"pg": active}))
    plain = VolumeSpec(name="pg", size_bytes=GIB, node="a")
    assert plan(_desired(plain), Actual(volumes={"pg": active})) == []
