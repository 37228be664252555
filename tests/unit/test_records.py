"""Records refuse invalid values at construction and survive a JSON round trip."""

from __future__ import annotations

import json

import pytest

from ferry.core.records import (
    SCHEMA_VERSION,
    AsideCopy,
    AsideDrop,
    MountRecord,
    Move,
    MovePhase,
    NodeInfo,
    NodeState,
    Owner,
    VolumeSpec,
    parse_size,
    to_dict,
    validate_volume_name,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1 << 20),
        (4096, 4096),
        ("512M", 512 << 20),
        ("10G", 10 << 30),
        ("10g", 10 << 30),
        ("1.5GiB", 3 << 29),
        ("2T", 2 << 40),
        ("64K", 64 << 10),
    ],
)
def test_parse_size_reads_bytes_and_binary_units(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "ten", "10X", "-1G", "0", "0M", 0, -5, "1 G B"])
def test_parse_size_refuses_what_is_not_a_positive_size(text: str | int) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize("name", ["pg", "pg-data_1.v2", "9lives", "a" * 64])
def test_docker_volume_names_are_valid(name: str) -> None:
    assert validate_volume_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "_pg", ".pg", "-pg", "pg/data", "pg@snap", "pg data", "pg:1", "a" * 65, "pé"]
)
def test_names_docker_or_zfs_refuse_are_a_value_error_naming_the_rule(name: str) -> None:
    with pytest.raises(ValueError, match=r"invalid volume name .*\[A-Za-z0-9_.-\]"):
        validate_volume_name(name)


def test_volume_spec_refuses_bad_names_sizes_and_nodes() -> None:
    with pytest.raises(ValueError, match="invalid volume name"):
        VolumeSpec(name="bad/name", size_bytes=1, node="n1")
    with pytest.raises(ValueError, match="invalid volume name"):
        VolumeSpec(name="-dash", size_bytes=1, node="n1")
    with pytest.raises(ValueError, match="invalid node name"):
        VolumeSpec(name="pg", size_bytes=1, node="Node_1")
    with pytest.raises(ValueError, match="invalid size"):
        VolumeSpec(name="pg", size_bytes=0, node="n1")
    with pytest.raises(ValueError, match="invalid compression 'n1'"):
        VolumeSpec(name="pg", size_bytes=1, node="off", compression="n1")
    with pytest.raises(ValueError, match="invalid volume uid"):
        VolumeSpec(name="pg", size_bytes=1, node="n1", uid="../x")


def test_volume_spec_fields_are_named_so_node_and_compression_cannot_swap() -> None:
    with pytest.raises(TypeError):
        VolumeSpec("pg", 1, "n1")  # type: ignore[call-arg]


def test_owner_epoch_starts_at_one() -> None:
    with pytest.raises(ValueError, match="epoch"):
        Owner("n1", 0)


def test_node_address_needs_a_port() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        NodeInfo(name="n1", address="10.0.0.1", pool="tank", free_bytes=1, version="0.1")


def test_move_needs_two_different_nodes() -> None:
    with pytest.raises(ValueError, match="two different nodes"):
        Move(volume="pg", source="n1", target="n1")


def test_move_refuses_an_unknown_phase() -> None:
    with pytest.raises(ValueError):
        Move(volume="pg", source="n1", target="n2", phase="teleporting")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "record",
    [
        VolumeSpec(name="pg", size_bytes=10 << 30, node="n1", compression="lzjb", uid="c0ffee"),
        Owner("n2", 7),
        NodeInfo(name="n1", address="10.0.0.1:7071", pool="tank", free_bytes=5, version="0.1"),
        NodeState(node="n1", volume="pg", snapshots=("ferry-1-1", "ferry-1-2"), mounted=True),
        Move(volume="pg", source="n1", target="n2", phase=MovePhase.PRECOPY, bytes_sent=9),
        MountRecord(volume="pg", node="n1", ids=("abc", "def")),
    ],
    ids=lambda r: type(r).__name__,
)
def test_json_round_trip_gives_an_equal_record(record: object) -> None:
    raw = record.to_json()  # type: ignore[attr-defined]
    assert json.loads(raw)["v"] == SCHEMA_VERSION
    assert type(record).from_json(raw) == record  # type: ignore[attr-defined]


def test_move_phase_is_stored_as_its_name() -> None:
    move = Move(volume="pg", source="n1", target="n2", phase=MovePhase.HANDOFF)
    assert to_dict(move)["phase"] == "handoff"
    assert Move.from_json(move.to_json()).phase is MovePhase.HANDOFF


def test_a_record_from_a_newer_schema_is_refused_with_what_to_do() -> None:
    raw = json.loads(Owner("n1", 1).to_json())
    raw["v"] = SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="upgrade Ferry"):
        Owner.from_json(json.dumps(raw))


def test_a_record_without_a_schema_version_is_refused() -> None:
    with pytest.raises(ValueError, match="schema version None"):
        Owner.from_json('{"node": "n1", "epoch": 1}')


def test_fields_unknown_to_this_version_are_ignored() -> None:
    raw = json.loads(Owner("n1", 3).to_json())
    raw["added_later"] = "x"
    assert Owner.from_json(json.dumps(raw)) == Owner("n1", 3)


def test_stored_records_are_checked_when_read() -> None:
    raw = json.loads(Owner("n1", 1).to_json())
    raw["epoch"] = 0
    with pytest.raises(ValueError, match="epoch"):
        Owner.from_json(json.dumps(raw))


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"[1, 2]", "not a JSON object"),
        (json.dumps({"v": SCHEMA_VERSION, "node": "a"}).encode(), "does not fit its schema"),
        (json.dumps({"v": SCHEMA_VERSION, "node": "a", "epoch": "x"}).encode(), "schema"),
    ],
)
def test_every_undecodable_record_is_a_value_error_saying_why(raw: bytes, why: str) -> None:
    """Listings skip a record on ValueError; anything else would stop them all."""
    with pytest.raises(ValueError, match=why):
        Owner.from_json(raw)


def test_a_copy_kept_aside_names_a_dataset_under_an_aside_root() -> None:
    aside = AsideCopy(
        node="n1", volume="db", dataset="tank/ferry-aside/db-e3-20260101T000000Z", kept_at=1.0
    )
    assert aside.leaf == "db-e3-20260101T000000Z"
    assert AsideCopy.from_json(aside.to_json()) == aside
    drop = AsideDrop(node="n1", volume="db", dataset=aside.dataset)
    assert drop.leaf == aside.leaf
    for dataset in (
        "tank/ferry/db",
        "tank/ferry-aside",
        "tank/ferry-aside/db@s",
        "-x/ferry-aside/a",
    ):
        with pytest.raises(ValueError):
            AsideCopy(node="n1", volume="db", dataset=dataset, kept_at=1.0)
        with pytest.raises(ValueError):
            AsideDrop(node="n1", volume="db", dataset=dataset)
