"""The keyspace on a real etcd: every write that depends on a read is a compare-and-swap."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from ferry.cluster.keyspace import AlreadyExists, Change, Keyspace, Kind, NodeChanged
from ferry.core.records import (
    AsideCopy,
    AsideDrop,
    Move,
    MovePhase,
    NodeInfo,
    NodeState,
    Owner,
    VolumeSpec,
)
from tests.support.etcd import register_node

pytestmark = pytest.mark.integration


@pytest.fixture
def keyspace(private_keyspace: Keyspace) -> Keyspace:
    return private_keyspace


def _spec(name: str = "pg", node: str = "n1") -> VolumeSpec:
    return VolumeSpec(name=name, size_bytes=1 << 30, node=node)


async def test_create_volume_twice_is_already_exists(keyspace: Keyspace) -> None:
    await keyspace.create_volume(_spec())
    with pytest.raises(AlreadyExists, match="volume pg already exists"):
        await keyspace.create_volume(_spec(node="n2"))
    stored = await keyspace.get_volume("pg")
    assert stored is not None and stored.value.node == "n1"


async def test_create_volume_needs_the_node_record_as_it_was_read(keyspace: Keyspace) -> None:
    info = NodeInfo(name="n1", address="127.0.0.1:1", pool="p", free_bytes=1 << 40, version="t")
    lease = await register_node(keyspace, info, 30)
    read = await keyspace.get_node("n1")
    assert read is not None
    await keyspace.update_node(replace(info, free_bytes=1 << 20), lease)
    with pytest.raises(NodeChanged, match="node n1 changed or went down while creating pg"):
        await keyspace.create_volume(_spec(), read.revision)
    assert await keyspace.get_volume("pg") is None
    fresh = await keyspace.get_node("n1")
    assert fresh is not None and fresh.value.free_bytes == 1 << 20
    await keyspace.create_volume(_spec(), fresh.revision)
    await lease.revoke()
    with pytest.raises(NodeChanged):
        await keyspace.create_volume(_spec("pg2"), fresh.revision)
    with pytest.raises(AlreadyExists, match="volume pg already exists"):
        await keyspace.create_volume(_spec(), fresh.revision)


async def test_update_volume_fails_when_someone_changed_it_since_the_read(
    keyspace: Keyspace,
) -> None:
    await keyspace.create_volume(_spec())
    read = await keyspace.get_volume("pg")
    assert read is not None
    assert await keyspace.update_volume(replace(read.value, node="n2"), read.revision)
    assert not await keyspace.update_volume(replace(read.value, node="n3"), read.revision)
    final = await keyspace.get_volume("pg")
    assert final is not None and final.value.node == "n2"


async def test_claim_owner_succeeds_once_only(keyspace: Keyspace) -> None:
    results = await asyncio.gather(*(keyspace.claim_owner("pg", f"n{i}") for i in range(5)))
    assert sorted(results) == [False, False, False, False, True]
    owner = await keyspace.get_owner("pg")
    assert owner is not None and owner.value.epoch == 1
    assert owner.value.node == f"n{results.index(True)}"


async def test_transfer_owner_only_from_the_expected_owner_and_epoch(keyspace: Keyspace) -> None:
    assert await keyspace.claim_owner("pg", "n1")
    assert not await keyspace.transfer_owner("pg", Owner("n2", 1), "n3")
    assert not await keyspace.transfer_owner("pg", Owner("n1", 2), "n3")
    assert await keyspace.transfer_owner("pg", Owner("n1", 1), "n2")
    assert not await keyspace.transfer_owner("pg", Owner("n1", 1), "n3")
    owner = await keyspace.get_owner("pg")
    assert owner is not None and owner.value == Owner("n2", 2)


async def test_put_move_compares_the_revision(keyspace: Keyspace) -> None:
    move = Move(volume="pg", source="n1", target="n2")
    assert await keyspace.put_move(move, None)
    assert not await keyspace.put_move(move, None)
    read = await keyspace.get_move("pg")
    assert read is not None
    advanced = replace(move, phase=MovePhase.PRECOPY, bytes_sent=10)
    assert await keyspace.put_move(advanced, read.revision)
    assert not await keyspace.put_move(replace(move, phase=MovePhase.FAILED), read.revision)
    final = await keyspace.get_move("pg")
    assert final is not None and final.value.phase is MovePhase.PRECOPY
    assert not await keyspace.delete_move("pg", read.revision), "stale revision deletes nothing"
    assert await keyspace.delete_move("pg", final.revision)
    assert await keyspace.get_move("pg") is None


async def test_the_owner_swap_of_a_move_fails_once_its_record_changed(keyspace: Keyspace) -> None:
    assert await keyspace.claim_owner("pg", "n1")
    assert await keyspace.put_move(Move(volume="pg", source="n1", target="n2"), None)
    written = await keyspace.get_move("pg")
    assert written is not None
    cancelled = replace(written.value, phase=MovePhase.FAILED, error="cancelled")
    assert await keyspace.put_move(cancelled, written.revision)
    assert not await keyspace.transfer_owner("pg", Owner("n1", 1), "n2", written.revision)
    owner = await keyspace.get_owner("pg")
    assert owner is not None and owner.value == Owner("n1", 1)


async def test_request_move_writes_placement_and_move_together_or_neither(
    keyspace: Keyspace,
) -> None:
    await keyspace.create_volume(_spec())
    assert await keyspace.claim_owner("pg", "n1")
    spec, owner = await keyspace.get_volume("pg"), await keyspace.get_owner("pg")
    assert spec is not None and owner is not None
    to_n2 = Move(volume="pg", source="n1", target="n2")
    assert await keyspace.update_volume(replace(spec.value, size_bytes=2 << 30), spec.revision)
    assert not await keyspace.request_move(spec, owner, to_n2, None), "the spec changed"
    assert not await keyspace.request_move(
        (await keyspace.get_volume("pg")) or spec, owner, to_n2, 1
    ), "no previous move at that revision"
    unchanged = await keyspace.get_volume("pg")
    assert unchanged is not None and unchanged.value.node == "n1"
    assert await keyspace.get_move("pg") is None

    assert await keyspace.request_move(unchanged, owner, to_n2, None)
    placed, move = await keyspace.get_volume("pg"), await keyspace.get_move("pg")
    assert placed is not None and placed.value.node == "n2"
    assert move is not None and move.value == to_n2
    assert await keyspace.transfer_owner("pg", owner.value, "n2")
    to_n3 = Move(volume="pg", source="n1", target="n3")
    assert not await keyspace.request_move(placed, owner, to_n3, move.revision), "owner moved"


async def test_purge_removes_spec_owner_and_move_so_the_name_is_free_again(
    keyspace: Keyspace,
) -> None:
    await keyspace.create_volume(replace(_spec(), deleted=True))
    assert await keyspace.claim_owner("pg", "n1")
    assert await keyspace.put_move(Move(volume="pg", source="n1", target="n2"), None)
    assert await keyspace.purge_volume("pg")
    assert await keyspace.get_volume("pg") is None
    assert await keyspace.get_owner("pg") is None
    assert await keyspace.get_move("pg") is None
    await keyspace.create_volume(_spec(node="n2"))
    assert await keyspace.claim_owner("pg", "n2")
    assert not await keyspace.purge_volume("pg"), "a late purge removed the new volume"
    assert await keyspace.get_volume("pg") is not None
    assert await keyspace.get_owner("pg") is not None


async def test_node_state_is_read_per_node_and_goes_with_the_lease(keyspace: Keyspace) -> None:
    lease = await keyspace.client.lease(30)
    state = NodeState(node="n1", volume="pg", snapshots=("s1", "s2"), used_bytes=5, writable=True)
    await keyspace.put_state(state, lease)
    await keyspace.put_state(replace(state, node="n2", writable=False), lease)
    assert await keyspace.get_state("n1", "pg") == state
    assert await keyspace.get_state("n3", "pg") is None
    assert {s.node for s in await keyspace.list_state("pg")} == {"n1", "n2"}
    await lease.revoke()
    assert await keyspace.list_state("pg") == []


async def test_delete_owner_frees_the_claim(keyspace: Keyspace) -> None:
    assert await keyspace.claim_owner("pg", "n1")
    await keyspace.delete_owner("pg")
    assert await keyspace.get_owner("pg") is None
    assert await keyspace.claim_owner("pg", "n2")


async def test_a_node_disappears_when_its_lease_expires(keyspace: Keyspace) -> None:
    info = NodeInfo(name="n1", address="127.0.0.1:1", pool="p", free_bytes=1, version="t")
    lease = await register_node(keyspace, info, 2)
    assert [n.value for n in await keyspace.list_nodes()] == [info]
    assert await keyspace.refresh_lease(lease) > 0
    deadline = asyncio.get_running_loop().time() + 8
    while await keyspace.get_node("n1") is not None:
        assert asyncio.get_running_loop().time() < deadline, "node outlived its 2 s lease"
        await asyncio.sleep(0.2)
    assert await keyspace.list_nodes() == []


async def test_watch_sees_volume_and_owner_changes(keyspace: Keyspace) -> None:
    seen: list[Change] = []

    async def follow() -> None:
        async for change in keyspace.watch(Kind.VOLUMES, Kind.OWNERS):
            seen.append(change)
            if len(seen) == 3:
                return

    watcher = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    await keyspace.create_volume(replace(_spec(), deleted=True))
    await keyspace.put_move(Move(volume="pg", source="n1", target="n2"), None)
    assert await keyspace.claim_owner("pg", "n1")
    assert await keyspace.purge_volume("pg")
    await asyncio.wait_for(watcher, timeout=10)
    assert [(c.kind, c.name, c.deleted) for c in seen] == [
        ("volumes", "pg", False),
        ("owners", "pg", False),
        ("volumes", "pg", True),
    ]


async def test_copies_kept_aside_go_with_the_lease_and_a_drop_is_asked_once(
    keyspace: Keyspace,
) -> None:
    dataset = "tank/ferry-aside/db-e2-20260101T000000Z"
    aside = AsideCopy(node="ks-n1", volume="db", dataset=dataset, kept_at=1.0, epoch=2)
    other = replace(aside, node="ks-n2")
    lease = await keyspace.new_lease(2)
    await keyspace.put_aside(aside, lease)
    await keyspace.put_aside(other, await keyspace.new_lease(60))
    assert await keyspace.list_asides("ks-n1") == [aside]
    assert sorted(a.node for a in await keyspace.list_asides()) == ["ks-n1", "ks-n2"]

    drop = AsideDrop(node="ks-n1", volume="db", dataset=dataset)
    assert await keyspace.request_drop(drop)
    assert not await keyspace.request_drop(drop), "asked once, until the agent is done"
    assert await keyspace.list_drops("ks-n1") == [drop]
    assert await keyspace.list_drops("ks-n2") == []
    await keyspace.delete_drop("ks-n1", drop.leaf)
    assert await keyspace.list_drops() == []

    await lease.revoke()
    assert await keyspace.list_asides() == [other], "a dead node's copies leave the list"
    await keyspace.delete_aside("ks-n2", other.leaf)
    assert await keyspace.list_asides() == []
