"""A cancelled move stays cancelled, and a retry keeps the last error (issue 9, items 5 and 8).

The source's move driver runs on a real pool and etcd; the target is the fake
peer (held to the real one by tests/integration/test_replication_ports.py)
that answers ``holdings`` (running a hook: what happens meanwhile elsewhere)
and fails every stream it admits, the way a target without room does.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from agent.replication.adapters import PoolStore
from agent.replication.ports import Peer
from agent.replication.record import MoveAbandoned
from agent.replication.source import MoveDriver
from agent.store import VolumeStore
from agent.transfer.client import TransferFailed
from agent.usage import DockerMounts
from agent.zfs.volumes import PoolRoot
from control.operations import VolumeOps
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import Move, MovePhase, Owner, VolumeSpec
from ferry.core.snapshots import SnapshotRef
from tests.support.pools import ScratchPool, scratch_pool
from tests.support.replication import FakePeer, FakeStore

pytestmark = pytest.mark.integration

SIZE = 16 << 20
SOURCE, TARGET = "mv-src", "mv-dst"


class TargetWithoutRoom(FakePeer):
    """The fake peer (it admits streams by the real rules) with a full pool: it answers
    ``holdings`` after running ``meanwhile``, and every stream it admits fails."""

    def __init__(
        self, keyspace: Keyspace, meanwhile: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        super().__init__(TARGET, FakeStore(TARGET), keyspace)
        self.meanwhile = meanwhile
        self.receive_fails = "No space left on device"

    async def holdings(self, volume: str) -> list[SnapshotRef]:
        if self.meanwhile is not None:
            await self.meanwhile()
        return await super().holdings(volume)


@pytest.fixture
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("mvcancel") as made:
        yield made


@pytest.fixture
async def source(
    pool: ScratchPool, keyspace: Keyspace, tmp_path: Path
) -> AsyncIterator[tuple[str, VolumeStore]]:
    """A volume owned and mounted writable on the source, with a move to TARGET requested;
    neither node is registered (both down, as far as control can tell)."""
    name = f"mv-{secrets.token_hex(3)}"
    store = VolumeStore(PoolRoot(pool.name), tmp_path / "mnt")
    await store.ensure_root()
    spec = VolumeSpec(name=name, size_bytes=SIZE, node=TARGET)
    await store.create(name, SIZE, "off", "")
    await store.activate(spec)
    await store.ensure_mounted(name)
    await keyspace.create_volume(spec)
    assert await keyspace.claim_owner(name, SOURCE)
    assert await keyspace.put_move(Move(volume=name, source=SOURCE, target=TARGET), None)
    yield name, store
    await store.stop_writes(name)


def driver(
    keyspace: Keyspace, store: VolumeStore, target: TargetWithoutRoom, where: Path
) -> MoveDriver:
    async def connect(_node: str) -> Peer:
        return target

    local = PoolStore(store, DockerMounts(where / "docker-mounts.json"))
    return MoveDriver(SOURCE, keyspace, local, connect)


async def test_a_retry_after_a_cancel_with_the_source_down_does_not_resume_the_move(
    keyspace: Keyspace, source: tuple[str, VolumeStore], tmp_path: Path
) -> None:
    name, store = source
    target = TargetWithoutRoom(keyspace)
    mover = driver(keyspace, store, target, tmp_path)
    with pytest.raises(TransferFailed):
        await mover.run(name)
    snapshots = await store.snapshots(name)

    cancelled = await VolumeOps(keyspace).move(name, SOURCE)
    assert cancelled is not None and cancelled.phase == MovePhase.FAILED

    await mover.run(name)  # the executor's retry after its back-off
    move = await keyspace.get_move(name)
    assert move is not None
    assert (move.value.phase, move.value.error) == (
        MovePhase.FAILED,
        f"cancelled: moved back to {SOURCE} by request",
    )
    assert len(target.streams) == 1, "no stream after the cancel"
    assert await store.snapshots(name) == snapshots, "no snapshot after the cancel"
    owner = await keyspace.get_owner(name)
    assert owner is not None and owner.value == Owner(SOURCE, 1)
    spec = await keyspace.get_volume(name)
    assert spec is not None and spec.value.node == SOURCE


async def test_a_cancel_during_the_handoff_stops_it_before_the_freeze(
    keyspace: Keyspace, source: tuple[str, VolumeStore], tmp_path: Path
) -> None:
    name, store = source
    pending = await keyspace.get_move(name)
    assert pending is not None
    handoff = Move(volume=name, source=SOURCE, target=TARGET, phase=MovePhase.HANDOFF)
    assert await keyspace.put_move(
        Move(**{**handoff.__dict__, "started_at": pending.value.started_at}), pending.revision
    )

    async def cancel() -> None:
        await VolumeOps(keyspace).move(name, SOURCE)

    target = TargetWithoutRoom(keyspace, meanwhile=cancel)
    with pytest.raises(MoveAbandoned, match="ended"):
        await driver(keyspace, store, target, tmp_path).run(name)
    assert await store.snapshots(name) == [], "never frozen: no final snapshot was taken"
    assert target.streams == []
    assert await store.is_writable(name)


async def test_a_retry_keeps_the_last_error_visible_until_a_sync_succeeds(
    keyspace: Keyspace, source: tuple[str, VolumeStore], tmp_path: Path
) -> None:
    name, store = source
    seen: list[str] = []

    async def read_the_error() -> None:
        move = await keyspace.get_move(name)
        assert move is not None
        seen.append(move.value.error)

    target = TargetWithoutRoom(keyspace, meanwhile=read_the_error)
    mover = driver(keyspace, store, target, tmp_path)
    for _ in range(2):
        with pytest.raises(TransferFailed):
            await mover.run(name)
    assert seen == ["", f"{TARGET} (fake): No space left on device"], (
        "the second attempt still showed the first one's error"
    )
    move = await keyspace.get_move(name)
    assert move is not None and move.value.attempt == 2
    held = [ref.name for ref in await store.snapshots(name) or []]
    assert len(held) == 1, f"each retry replaced the unsent snapshot, not added one: {held}"
