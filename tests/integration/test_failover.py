"""Failover on real etcd and zfs-fuse: the transaction's rules, the CLI's refusals and loss
message, and an old owner that comes back keeping its late writes aside as a replica.

The agents' parts run in this process (tests/support/nodes.py), under their own
roots of one real pool; node and state records are written as agents write
them, on leases, so "down" is a lease that was revoked.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest

from agent import zfs
from agent.asides import AsideLedger
from ferry.cluster.keyspace import Keyspace
from ferry.core.plan import Activate, Fence, Rejoin
from ferry.core.records import Move, MovePhase, NodeInfo, NodeSeen, NodeState, Owner
from tests.support.asides import aside_datasets, listed, read_aside
from tests.support.etcd import ControlServer, ferryctl
from tests.support.nodes import Node, append_lines, create_owned, move, running_nodes
from tests.support.pools import ScratchPool, scratch_pool

pytestmark = pytest.mark.integration


@pytest.fixture
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("fo") as made:
        yield made


@pytest.fixture
async def nodes(
    pool: ScratchPool, keyspace: Keyspace, tmp_path: Path
) -> AsyncIterator[dict[str, Node]]:
    async with running_nodes(pool, keyspace, ["fo-a", "fo-b"], tmp_path) as made:
        yield made


@pytest.fixture
def volume() -> str:
    return f"fo-{secrets.token_hex(3)}"


async def register(keyspace: Keyspace, node: Node) -> aetcd.Lease:
    """The node record an agent keeps on its lease; revoke the lease to take the node down."""
    lease = await keyspace.new_lease(60)
    info = NodeInfo(
        name=node.name, address=node.address, pool="fo", free_bytes=1 << 30, version="test"
    )
    assert await keyspace.claim_node(info, lease) is None
    return lease


async def report(keyspace: Keyspace, node: Node, volume: str, lease: aetcd.Lease) -> NodeState:
    """What the node's agent reports holding, as agent.service does."""
    snapshots = tuple(ref.name for ref in await node.store.snapshots(volume) or ())
    state = NodeState(
        node=node.name,
        volume=volume,
        snapshots=snapshots,
        newest_snapshot_at=await node.store.snapshot_time(volume, snapshots[-1]),
    )
    await keyspace.put_state(state, lease)
    return state


async def test_a_failover_waits_for_the_owners_lease_then_says_what_is_lost(
    nodes: dict[str, Node], keyspace: Keyspace, control: ControlServer, volume: str
) -> None:
    a, b = nodes["fo-a"], nodes["fo-b"]
    await create_owned(b, keyspace, volume)
    assert await move(keyspace, b, a, volume) == 2  # b keeps a read-only copy
    a_lease, b_lease = await register(keyspace, a), await register(keyspace, b)
    state = await report(keyspace, b, volume, b_lease)
    env = control.ferryctl_env()

    refused = await ferryctl(env, "volume", "failover", volume)
    assert refused.code != 0 and f"owner {a.name} is live" in refused.stderr
    assert f"ferryctl volume move {volume}" in refused.stderr

    await keyspace.put_seen(NodeSeen(a.name, state.newest_snapshot_at + 14))
    await a_lease.revoke()
    done = await ferryctl(env, "volume", "failover", volume)
    assert done.code == 0, done.stderr
    taken = time.strftime("%H:%M:%S UTC", time.gmtime(state.newest_snapshot_at))
    assert f"writes on {a.name} after {taken} (14 s before it was lost)" in done.stdout
    owner = await keyspace.get_owner(volume)
    assert owner is not None and owner.value == Owner(b.name, 3)
    spec = await keyspace.get_volume(volume)
    assert spec is not None and spec.value.node == b.name
    listed = await ferryctl(env, "events", "--volume", volume, "-o", "json")
    assert listed.code == 0, listed.stderr
    failed_over = [e for e in json.loads(listed.stdout) if e["kind"] == "failed_over"]
    assert len(failed_over) == 1 and f"{a.name} -> {b.name}" in failed_over[0]["detail"]
    assert f"writes on {a.name} after {taken}" in failed_over[0]["detail"]

    again = await ferryctl(env, "volume", "failover", volume, "--to", a.name)
    assert again.code != 0 and f"owner {b.name} is live" in again.stderr
    await b_lease.revoke()


async def test_the_transaction_compares_the_owner_the_lost_lease_and_the_new_node(
    nodes: dict[str, Node], keyspace: Keyspace, volume: str
) -> None:
    a, b = nodes["fo-a"], nodes["fo-b"]
    await create_owned(a, keyspace, volume)
    running = Move(volume=volume, source=a.name, target=b.name, phase=MovePhase.PRECOPY)
    assert await keyspace.put_move(running, None)
    a_lease = await register(keyspace, a)

    async def attempt(expected: Owner | None = None) -> bool:
        spec, owner = await keyspace.get_volume(volume), await keyspace.get_owner(volume)
        move_record = await keyspace.get_move(volume)
        assert spec is not None and owner is not None
        if expected is not None:
            owner = type(owner)(expected, owner.revision)
        ended = Move(volume=volume, source=a.name, target=b.name, phase=MovePhase.FAILED)
        return await keyspace.fail_over(spec, owner, b.name, move_record, ended)

    assert not await attempt(), "the owner's lease is live"
    await a_lease.revoke()
    assert not await attempt(), "the new node is not registered"
    b_lease = await register(keyspace, b)
    assert not await attempt(Owner(a.name, 7)), "the owner record is not as read"
    assert await attempt()
    owner = await keyspace.get_owner(volume)
    assert owner is not None and owner.value == Owner(b.name, 2)
    ended = await keyspace.get_move(volume)
    assert ended is not None and ended.value.phase == MovePhase.FAILED
    await b_lease.revoke()


async def test_an_old_owner_keeps_its_late_writes_aside_and_rejoins_from_the_common_snapshot(
    nodes: dict[str, Node],
    keyspace: Keyspace,
    control: ControlServer,
    volume: str,
    tmp_path: Path,
) -> None:
    a, b = nodes["fo-a"], nodes["fo-b"]
    await create_owned(b, keyspace, volume)
    assert await move(keyspace, b, a, volume) == 2
    common = (await b.store.snapshots(volume) or [])[-1]
    late = append_lines(a.path(volume) / "late.log", 20, "late on a")
    b_lease = await register(keyspace, b)
    spec, owner = await keyspace.get_volume(volume), await keyspace.get_owner(volume)
    assert spec is not None and owner is not None
    assert await keyspace.fail_over(spec, owner, b.name, await keyspace.get_move(volume))
    await b.executor.apply(Activate(volume, 3))
    assert await b.store.is_writable(volume)

    # a comes back: its copy is writable, another node owns the volume.
    await a.executor.apply(Fence(volume))
    await a.executor.apply(Rejoin(volume))

    assert [ref.name for ref in await a.store.snapshots(volume) or []][-1] == common.name
    assert (await a.store.snapshots(volume) or [])[-1].guid == common.guid
    assert not await a.store.is_writable(volume)
    (kept,) = aside_datasets(a)
    assert read_aside(a, kept, "late.log", tmp_path / "aside").splitlines() == late
    await AsideLedger(a.name, keyspace, a.store).converge(b_lease)
    (listed_copy,) = await listed(control, volume)
    assert listed_copy["dataset"] == kept.decode() and listed_copy["node"] == a.name

    # A replica again: the next stream from the owner continues from the common snapshot.
    await b.store.ensure_mounted(volume)  # a container on b uses it
    after = append_lines(b.path(volume) / "new.log", 5, "on b")
    assert await move(keyspace, b, a, volume) == 4
    assert (a.path(volume) / "new.log").read_text().splitlines() == after
    assert not (a.path(volume) / "late.log").exists()
    assert zfs.lzc_exists(kept)
    await b_lease.revoke()
