"""A receive never destroys data: a copy that diverged is kept aside, listed, and dropped
only on request; and the receiver's own refusals.

Two or three agents' parts run in this process (tests/support/nodes.py), each
under its own root of one real zfs-fuse pool, with real etcd and streams
through the real Transfer service into ``zfs receive``. The late writer is
what issue 9 met: a container's bind mount that kept writing into the old
owner's copy after the agent had stopped its own mount (emulated here by
mounting the stopped copy writable behind the agent's back).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent import zfs
from agent.asides import AsideLedger
from agent.replication.adapters import PoolStore, RemotePeer
from agent.replication.record import MoveAbandoned
from agent.replication.source import MoveDriver
from agent.transfer.client import PeerClient, TransferFailed
from ferry.cluster.keyspace import Keyspace
from ferry.core.plan import Activate
from ferry.core.records import Move, MovePhase, Owner
from protos.ferry.v1 import transfer_pb2
from tests.support.asides import aside_datasets, listed, read_aside
from tests.support.etcd import ControlServer, ferryctl
from tests.support.nodes import Node, append_lines, create_owned, move, running_nodes
from tests.support.pools import ScratchPool, scratch_pool

pytestmark = pytest.mark.integration

LATE_LINES = 170


@pytest.fixture
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("dv") as made:
        yield made


@pytest.fixture
async def nodes(
    pool: ScratchPool, keyspace: Keyspace, tmp_path: Path
) -> AsyncIterator[dict[str, Node]]:
    async with running_nodes(pool, keyspace, ["dv-a", "dv-b", "dv-c"], tmp_path) as made:
        yield made


@pytest.fixture
def volume() -> str:
    return f"dv-{secrets.token_hex(3)}"


def write_behind_the_agents_back(node: Node, volume: str, lines: int) -> list[str]:
    """Append acknowledged lines to ``node``'s stopped copy, without a snapshot."""
    node.root.set_readonly(volume, False)
    node.root.mount(volume, node.path(volume))
    written = append_lines(node.path(volume) / "late.log", lines, f"late on {node.name}")
    node.root.unmount(volume)
    node.root.set_readonly(volume, True)
    return written


def ignore(_sent: int) -> None:
    """Progress of a send, of no interest here."""


async def test_late_writes_without_a_snapshot_are_kept_aside_on_a_move_back(
    nodes: dict[str, Node],
    keyspace: Keyspace,
    control: ControlServer,
    volume: str,
    tmp_path: Path,
) -> None:
    a, b = nodes["dv-a"], nodes["dv-b"]
    await create_owned(a, keyspace, volume)
    append_lines(a.path(volume) / "base.log", 10, "before the move")
    assert await move(keyspace, a, b, volume) == 2
    late = write_behind_the_agents_back(a, volume, LATE_LINES)
    on_b = append_lines(b.path(volume) / "b.log", 5, "on b")

    assert await move(keyspace, b, a, volume) == 3, "the move back completes by itself"

    assert (a.path(volume) / "b.log").read_text().splitlines() == on_b
    assert not (a.path(volume) / "late.log").exists(), "the new copy is the volume's history"
    kept = aside_datasets(a)
    assert len(kept) == 1, f"the diverged copy is kept aside, not rolled back: {kept}"
    assert read_aside(a, kept[0], "late.log", tmp_path / "aside").splitlines() == late

    await AsideLedger(a.name, keyspace, a.store).converge(await keyspace.new_lease(60))
    (copy,) = await listed(control, volume)
    assert (copy["node"], copy["dataset"], copy["epoch"]) == ("dv-a", kept[0].decode(), 2)
    assert int(str(copy["used_bytes"])) > 0 and copy["kept_at"]
    assert "modified" in str(copy["reason"]) or "written" in str(copy["reason"])
    move_record = await keyspace.get_move(volume)
    assert move_record is not None and move_record.value.phase == MovePhase.DONE


async def test_a_newer_snapshot_on_the_old_copy_is_kept_aside_on_a_move_back(
    nodes: dict[str, Node],
    keyspace: Keyspace,
    control: ControlServer,
    volume: str,
    tmp_path: Path,
) -> None:
    a, b = nodes["dv-a"], nodes["dv-b"]
    await create_owned(a, keyspace, volume)
    assert await move(keyspace, a, b, volume) == 2
    late = write_behind_the_agents_back(a, volume, LATE_LINES)
    await a.store.fence(volume)  # what an agent does when it finds a copy it no longer owns

    assert await move(keyspace, b, a, volume) == 3

    (kept,) = aside_datasets(a)
    assert read_aside(a, kept, "late.log", tmp_path / "aside").splitlines() == late
    await AsideLedger(a.name, keyspace, a.store).converge(await keyspace.new_lease(60))
    (copy,) = await listed(control, volume)
    assert copy["dataset"] == kept.decode()
    assert "newer than" in str(copy["reason"]) and "fenced-" in str(copy["reason"])


async def test_a_copy_kept_aside_goes_only_when_an_operator_drops_it(
    nodes: dict[str, Node], keyspace: Keyspace, control: ControlServer, volume: str
) -> None:
    a = nodes["dv-a"]
    await create_owned(a, keyspace, volume)
    await a.store.stop_writes(volume)
    aside = await a.store.keep_aside(volume, 4, "test")
    ledger = AsideLedger(a.name, keyspace, a.store)
    lease = await keyspace.new_lease(60)
    await ledger.converge(lease)
    env = control.ferryctl_env()

    wrong = await ferryctl(env, "volume", "aside", "drop", volume, aside + "x", "--node", a.name)
    assert wrong.code != 0 and "reports no copy" in wrong.stderr and aside in wrong.stderr
    listing = await ferryctl(env, "volume", "aside", "list", volume)
    assert listing.code == 0 and aside in listing.stdout

    dropped = await ferryctl(env, "volume", "aside", "drop", volume, aside, "--node", a.name)
    assert dropped.code == 0, dropped.stderr
    assert (await listed(control, volume))[0]["drop_requested"] is True
    assert zfs.lzc_exists(aside), "control only records the request"
    await ledger.converge(lease)
    assert not zfs.lzc_exists(aside)
    assert await listed(control, volume) == []
    assert await keyspace.list_drops(a.name) == []


async def test_the_receiver_refuses_a_stream_into_its_own_writable_copy(
    nodes: dict[str, Node], keyspace: Keyspace, volume: str
) -> None:
    """Two writable copies (b not fenced yet): b's is never overwritten, not even set aside."""
    a, b = nodes["dv-a"], nodes["dv-b"]
    await create_owned(a, keyspace, volume)
    spec = await keyspace.get_volume(volume)
    assert spec is not None
    await b.store.create(volume, spec.value.size_bytes, "off", spec.value.uid)
    await b.store.activate(spec.value)
    await b.store.ensure_mounted(volume)
    mine = append_lines(b.path(volume) / "b.log", 3, "b's own")
    snapshot = await a.store.take_snapshot(volume, 1)
    header = transfer_pb2.StreamHeader(
        volume=volume, to_snapshot=snapshot.name, to_guid=snapshot.guid, epoch=1, sender=a.name
    )
    peer = PeerClient(b.name, b.address, None, encrypt_streams=False)
    try:
        with pytest.raises(TransferFailed, match=r"holds a writable copy .* must be fenced first"):
            await peer.send(header, a.store.send_stream(volume, snapshot.name, None), ignore)
    finally:
        await peer.close()
    assert await b.store.is_writable(volume)
    assert (b.path(volume) / "b.log").read_text().splitlines() == mine
    assert aside_datasets(b) == []


async def test_activation_waits_for_the_final_snapshot_of_the_handoff(
    nodes: dict[str, Node], keyspace: Keyspace, volume: str
) -> None:
    """The new owner holds an older snapshot only: it does not make that copy writable."""
    a, b = nodes["dv-a"], nodes["dv-b"]
    await create_owned(a, keyspace, volume)
    assert await move(keyspace, a, b, volume) == 2
    move_record = await keyspace.get_move(volume)
    assert move_record is not None
    await b.store.stop_writes(volume)
    later = Move(
        volume=volume,
        source=b.name,
        target=a.name,
        phase=MovePhase.ACTIVATING,
        final_snapshot="ferry-2-99",
    )
    assert await keyspace.put_move(later, move_record.revision)
    assert await keyspace.transfer_owner(volume, Owner(b.name, 2), a.name)

    await a.executor.apply(Activate(volume, 3))

    assert not await a.store.is_writable(volume)
    assert not (a.path(volume)).is_mount()
    still = await keyspace.get_move(volume)
    assert still is not None and still.value.phase == MovePhase.ACTIVATING


class SwapLostToFailover(Keyspace):
    """etcd as it is, with a failover to dv-c landing just before the handoff's swap."""

    async def transfer_owner(
        self, name: str, expected: Owner, new_node: str, move_revision: int | None = None
    ) -> bool:
        assert await super().transfer_owner(name, expected, "dv-c")
        return await super().transfer_owner(name, expected, new_node, move_revision)


async def test_a_refused_ownership_swap_abandons_the_move_and_keeps_the_copy_stopped(
    nodes: dict[str, Node], keyspace: Keyspace, volume: str
) -> None:
    a, b = nodes["dv-a"], nodes["dv-b"]
    await create_owned(a, keyspace, volume)
    written = append_lines(a.path(volume) / "a.log", 5, "before the handoff")
    assert await keyspace.put_move(Move(volume=volume, source=a.name, target=b.name), None)

    async def connect(node: str) -> RemotePeer:
        return RemotePeer(PeerClient(node, nodes[node].address, None, encrypt_streams=False))

    local = PoolStore(a.store, a.mounts)
    driver = MoveDriver(a.name, SwapLostToFailover(keyspace.client), local, connect)
    with pytest.raises(MoveAbandoned, match=r"ownership of .* changed during the handoff"):
        await driver.run(volume)

    owner = await keyspace.get_owner(volume)
    assert owner is not None and owner.value == Owner("dv-c", 2)
    assert not await a.store.is_writable(volume), "a copy whose swap was tried stays stopped"
    assert not a.path(volume).is_mount()
    a.root.mount(volume, a.path(volume))
    assert (a.path(volume) / "a.log").read_text().splitlines() == written
