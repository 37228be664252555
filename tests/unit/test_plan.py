"""The convergence plan: what one node does for each volume, given etcd and its pool."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ferry.core.plan import (
    Activate,
    Actual,
    Claim,
    Create,
    Desired,
    Destroy,
    DriveMove,
    Fence,
    LocalVolume,
    Missing,
    Rejoin,
    SetAside,
    UnmountUnused,
    plan,
)
from ferry.core.records import Move, MovePhase, Owner, VolumeSpec

GIB = 1 << 30
UID = "c0ffee"


def spec(name: str = "pg", node: str = "a", deleted: bool = False, uid: str = UID) -> VolumeSpec:
    return VolumeSpec(
        name=name,
        size_bytes=GIB,
        compression="off",
        node=node,
        created_at=1.0,
        deleted=deleted,
        uid=uid,
    )


def move(source: str, target: str, phase: MovePhase = MovePhase.PENDING) -> Move:
    return Move(
        volume="pg", source=source, target=target, phase=phase, started_at=1.0, updated_at=1.0
    )


def writable(name: str = "pg", uid: str = UID, mounted: bool = False) -> LocalVolume:
    """The owner's activated copy: unmounted while nothing uses it."""
    return LocalVolume(name=name, snapshots=("ferry-1-1",), writable=True, mounted=mounted, uid=uid)


def replica(name: str = "pg", uid: str = UID) -> LocalVolume:
    return LocalVolume(name=name, snapshots=("ferry-1-1",), writable=False, mounted=False, uid=uid)


def test_a_new_volume_is_created_only_on_its_node() -> None:
    desired = Desired(node="a", volumes={"pg": spec(node="a")})
    assert plan(desired, Actual()) == [Create("pg", GIB, "off", UID)]
    elsewhere = Desired(node="b", volumes={"pg": spec(node="a")})
    assert plan(elsewhere, Actual()) == []


def test_a_dataset_created_before_a_crash_is_claimed_not_created_again() -> None:
    desired = Desired(node="a", volumes={"pg": spec()})
    assert plan(desired, Actual(volumes={"pg": writable()})) == [Claim("pg")]


def test_a_deleted_namesakes_leftover_is_set_aside_never_adopted() -> None:
    new = Desired(node="a", volumes={"pg": spec(uid="0a1b2c")})
    assert plan(new, Actual(volumes={"pg": writable()})) == [SetAside("pg")]
    owned_elsewhere = Desired(
        node="a", volumes={"pg": spec(node="b", uid="0a1b2c")}, owners={"pg": Owner("b", 1)}
    )
    assert plan(owned_elsewhere, Actual(volumes={"pg": replica()})) == [SetAside("pg")]
    from_before_uids = Desired(node="a", volumes={"pg": spec(uid="")})
    assert plan(from_before_uids, Actual(volumes={"pg": replica()})) == [Claim("pg")]


def test_a_copy_not_stamped_yet_is_taken_as_the_volumes() -> None:
    """An agent can die between a receive and its stamp; the copy must not be set aside,
    or an owner could be left with none."""
    owned_here = Desired(node="a", volumes={"pg": spec()}, owners={"pg": Owner("a", 2)})
    assert plan(owned_here, Actual(volumes={"pg": replica(uid="")})) == [Activate("pg", 2)]


def test_the_owner_activates_its_copy_and_then_rests() -> None:
    desired = Desired(node="b", volumes={"pg": spec(node="b")}, owners={"pg": Owner("b", 2)})
    assert plan(desired, Actual(volumes={"pg": replica()})) == [Activate("pg", 2)]
    assert plan(desired, Actual(volumes={"pg": writable()})) == []


def test_the_owners_copy_stays_mounted_while_used_and_is_unmounted_after() -> None:
    desired = Desired(node="b", volumes={"pg": spec(node="b")}, owners={"pg": Owner("b", 2)})
    mounted = {"pg": writable(mounted=True)}
    used = Actual(volumes=mounted, in_use=frozenset({"pg"}))
    assert plan(desired, used) == []
    assert plan(desired, Actual(volumes=mounted)) == [UnmountUnused("pg")]


def test_a_mounted_copy_with_a_move_away_is_left_to_the_move() -> None:
    """The handoff unmounts it; an unmount planned beside it would race the freeze."""
    desired = Desired(
        node="a",
        volumes={"pg": spec(node="a")},
        owners={"pg": Owner("a", 1)},
        moves={"pg": move("a", "b", MovePhase.PRECOPY)},
    )
    assert plan(desired, Actual(volumes={"pg": writable(mounted=True)})) == [DriveMove("pg")]
    driven = Actual(volumes={"pg": writable(mounted=True)}, running_moves=frozenset({"pg"}))
    assert plan(desired, driven) == []


@pytest.mark.parametrize("phase", [MovePhase.HANDOFF, MovePhase.ACTIVATING])
def test_a_move_into_a_writable_copy_not_marked_done_is_activated_again(phase: MovePhase) -> None:
    """The target's agent died between making its copy writable and writing done."""
    desired = Desired(
        node="b",
        volumes={"pg": spec(node="b")},
        owners={"pg": Owner("b", 2)},
        moves={"pg": move("a", "b", phase)},
    )
    assert plan(desired, Actual(volumes={"pg": writable()})) == [Activate("pg", 2)]
    ended = replace(desired, moves={"pg": move("a", "b", MovePhase.DONE)})
    assert plan(ended, Actual(volumes={"pg": writable()})) == []


def test_a_writable_copy_on_a_node_that_lost_ownership_is_fenced() -> None:
    """Mounted or not: an unmounted activated copy may hold writes the new owner lacks,
    and would take writes again at its next mount."""
    desired = Desired(node="a", volumes={"pg": spec(node="b")}, owners={"pg": Owner("b", 2)})
    assert plan(desired, Actual(volumes={"pg": writable()})) == [Fence("pg")]
    assert plan(desired, Actual(volumes={"pg": writable(mounted=True)})) == [Fence("pg")]
    assert plan(desired, Actual(volumes={"pg": replica()})) == []


def test_an_old_owner_fenced_or_frozen_after_a_failover_rejoins_as_a_replica() -> None:
    desired = Desired(node="a", volumes={"pg": spec(node="b")}, owners={"pg": Owner("b", 2)})
    fenced = replace(replica(), snapshots=("ferry-1-1", "fenced-1700000000"))
    frozen = replace(writable(mounted=True), writable=False)  # read-only by the self-fence
    assert plan(desired, Actual(volumes={"pg": fenced})) == [Rejoin("pg")]
    assert plan(desired, Actual(volumes={"pg": frozen})) == [Rejoin("pg")]
    owned = Desired(node="a", volumes={"pg": spec(node="a")}, owners={"pg": Owner("a", 1)})
    assert plan(owned, Actual(volumes={"pg": frozen})) == [Activate("pg", 1)]


def test_a_source_whose_handoff_swapped_ownership_is_left_to_its_move_driver() -> None:
    """Between the swap and the driver's unmount the source's copy is frozen and mounted,
    like an old owner's after a failover; a pass planned then must not set it aside."""
    desired = Desired(
        node="a",
        volumes={"pg": spec(node="b")},
        owners={"pg": Owner("b", 2)},
        moves={"pg": move("a", "b")},
    )
    frozen = replace(writable(), writable=False)
    handing_off = Actual(volumes={"pg": frozen}, running_moves=frozenset({"pg"}))
    assert plan(desired, handing_off) == []


def test_the_owner_drives_a_move_away_once() -> None:
    desired = Desired(
        node="a",
        volumes={"pg": spec(node="b")},
        owners={"pg": Owner("a", 1)},
        moves={"pg": move("a", "b")},
    )
    local = Actual(volumes={"pg": writable()})
    assert plan(desired, local) == [DriveMove("pg")]
    running = Actual(volumes={"pg": writable()}, running_moves=frozenset({"pg"}))
    assert plan(desired, running) == []


def test_a_failed_move_leaves_the_owner_serving() -> None:
    desired = Desired(
        node="a",
        volumes={"pg": spec(node="b")},
        owners={"pg": Owner("a", 1)},
        moves={"pg": move("a", "b", MovePhase.FAILED)},
    )
    assert plan(desired, Actual(volumes={"pg": replica()})) == [Activate("pg", 1)]


def test_an_owner_without_data_reports_and_never_creates_an_empty_copy() -> None:
    desired = Desired(node="b", volumes={"pg": spec(node="b")}, owners={"pg": Owner("b", 2)})
    assert plan(desired, Actual()) == [Missing("pg")]


def test_deleted_volumes_are_destroyed_and_left_to_control_to_purge() -> None:
    desired = Desired(node="a", volumes={"pg": spec(deleted=True)}, owners={"pg": Owner("a", 1)})
    assert plan(desired, Actual(volumes={"pg": replica()})) == [Destroy("pg")]
    mounted = writable(mounted=True)
    assert plan(desired, Actual(volumes={"pg": mounted})) == [Fence("pg"), Destroy("pg")]
    assert plan(desired, Actual(volumes={"pg": writable()})) == [Destroy("pg")]
    assert plan(desired, Actual()) == []


def test_datasets_without_desired_state_are_left_alone() -> None:
    assert plan(Desired(node="a"), Actual(volumes={"orphan": writable("orphan")})) == []


def test_a_create_that_failed_for_good_is_not_planned_again() -> None:
    failed = replace(spec(node="a"), create_error="NoSpace: out of space")
    assert plan(Desired(node="a", volumes={"pg": failed}), Actual()) == []


def test_a_volume_with_an_unreadable_record_is_left_alone_and_the_others_converge() -> None:
    desired = Desired(
        node="a",
        volumes={"pg": spec(node="a"), "web": spec(name="web", node="a")},
        unreadable=frozenset({"pg"}),
    )
    assert plan(desired, Actual()) == [Create("web", GIB, "off", UID)]
