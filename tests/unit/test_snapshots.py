"""Ferry snapshot names, the common base between two copies, and pruning."""

from ferry.core.snapshots import (
    Base,
    SnapshotRef,
    newest_common,
    next_name,
    parse,
    prunable,
    stream_base,
    unsent,
)


def test_names_round_trip_and_foreign_names_are_ignored() -> None:
    assert str(parse("ferry-3-12")) == "ferry-3-12"
    assert parse("ferry-3-12") is not None and parse("ferry-3-12").seq == 12  # type: ignore[union-attr]
    for foreign in ("manual", "ferry-3", "ferry-a-1", "ferry-1-2-3", "xferry-1-2"):
        assert parse(foreign) is None


def test_sequence_keeps_growing_across_epochs() -> None:
    assert next_name([], epoch=1) == "ferry-1-1"
    assert next_name(["ferry-1-1", "manual", "ferry-1-7"], epoch=2) == "ferry-2-8"
    assert next_name(["ferry-4-9", "ferry-5-3"], epoch=5) == "ferry-5-10"


def test_common_base_is_decided_by_guid_not_name() -> None:
    local = [
        SnapshotRef("ferry-1-1", 11),
        SnapshotRef("ferry-1-2", 12),
        SnapshotRef("ferry-2-3", 23),
    ]
    remote_same = [SnapshotRef("ferry-1-1", 11), SnapshotRef("ferry-1-2", 12)]
    assert newest_common(local, remote_same) == "ferry-1-2"
    diverged = [SnapshotRef("ferry-1-1", 11), SnapshotRef("ferry-1-2", 99)]
    assert newest_common(local, diverged) == "ferry-1-1"
    assert newest_common(local, []) is None
    assert newest_common([], remote_same) is None


def test_pruning_keeps_the_newest_and_every_base_a_peer_needs() -> None:
    snaps = ["ferry-1-1", "manual", "ferry-1-2", "ferry-1-3", "ferry-1-4", "ferry-1-5"]
    assert prunable(snaps, keep=[]) == ["ferry-1-1", "ferry-1-2", "ferry-1-3"]
    assert prunable(snaps, keep=["ferry-1-2"]) == ["ferry-1-1"]
    assert prunable(snaps, keep=["ferry-1-1"]) == []
    assert prunable(["ferry-1-1"], keep=[]) == []


def test_what_failed_sends_left_is_dropped_and_nothing_a_stream_needs() -> None:
    local = [
        SnapshotRef("ferry-1-1", 11),
        SnapshotRef("ferry-2-2", 22),
        SnapshotRef("fenced-1700000000", 5),
        SnapshotRef("ferry-2-3", 23),
        SnapshotRef("ferry-2-4", 24),
    ]
    remote = [SnapshotRef("ferry-2-2", 22)]
    assert unsent(local, remote, epoch=2, newest="ferry-2-4") == ["ferry-2-3"]
    assert unsent(local, [], epoch=2, newest="ferry-2-4") == ["ferry-2-2", "ferry-2-3"]
    assert unsent(local, [], epoch=3, newest="ferry-2-4") == [], "older epochs are not its own"
    assert unsent(local, [SnapshotRef("ferry-2-4", 24)], epoch=2, newest="ferry-2-4") == []


def test_a_bookmark_stands_for_its_destroyed_snapshot_by_guid() -> None:
    remote = [SnapshotRef("ferry-1-1", 11), SnapshotRef("ferry-1-2", 12)]
    marks = [SnapshotRef("ferry-1-1", 11), SnapshotRef("ferry-1-2", 12)]
    assert stream_base([SnapshotRef("ferry-1-2", 12)], remote, marks) == Base("ferry-1-2")
    assert stream_base([], remote, marks) == Base("ferry-1-2", bookmark=True)
    # The peer takes a stream only from its newest: a newer bookmark beats an older snapshot.
    assert stream_base([SnapshotRef("ferry-1-1", 11)], remote, marks) == Base(
        "ferry-1-2", bookmark=True
    )
    assert stream_base([], remote, [SnapshotRef("ferry-1-2", 99)]) is None
    assert stream_base([], [], marks) is None


def test_leftovers_of_failed_sends_are_found_after_a_bookmark_base() -> None:
    local = [
        SnapshotRef("ferry-2-1", 21),
        SnapshotRef("ferry-2-3", 23),
        SnapshotRef("ferry-2-4", 24),
    ]
    remote = [SnapshotRef("ferry-2-2", 22)]
    marks = [SnapshotRef("ferry-2-2", 22)]
    assert unsent(local, remote, epoch=2, newest="ferry-2-4", bookmarks=marks) == ["ferry-2-3"]
