"""One suite for the replication ports: the real ones on zfs-fuse and etcd, and the fakes.

Each test runs twice: on ``PoolStore``/``RemotePeer``/``Keyspace`` (two agents' parts in
this process, ``tests.support.nodes``, streams through the real Transfer service into
``zfs receive``) and on the in-memory fakes of ``tests.support.replication`` that the unit
tests of the move protocol use. What the unit tests take for granted of the fakes is
checked here against the real thing.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.replication.adapters import PoolStore, RemotePeer
from agent.replication.ports import LocalStore, Peer
from agent.replication.sync import NoCommonSnapshot, sync_to_peer
from agent.transfer.client import PeerClient, TransferFailed
from agent.usage import unmount_unused
from agent.zfs.volumes import FilesystemBusy
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import Move, Owner, VolumeSpec
from tests.support.nodes import running_nodes
from tests.support.pools import ScratchPool, pool_fixture
from tests.support.replication import FakePeer, FakeRecords, FakeStore

pytestmark = pytest.mark.integration

A, B = "rp-a", "rp-b"
SIZE = 16 << 20

pool = pool_fixture("rp", scope="module")


@dataclass
class RealWorld:
    stores: dict[str, LocalStore]
    peer: Peer
    records: Keyspace
    paths: dict[str, Path]
    pools: dict[str, PoolStore]

    async def create_owned(self, volume: str) -> VolumeSpec:
        spec = VolumeSpec(name=volume, size_bytes=SIZE, node=A)
        await self.records.create_volume(spec)
        assert await self.records.claim_owner(volume, A)
        await self.pools[A].store.create(volume, SIZE, "off", "")
        await self.stores[A].activate(spec)
        await self.mount(A, volume)
        return spec

    async def mount(self, node: str, volume: str) -> None:
        """As a container's Mount does."""
        await self.pools[node].store.ensure_mounted(volume)

    async def unmount(self, node: str, volume: str) -> None:
        """As the last Unmount does."""
        pool = self.pools[node]
        assert await unmount_unused(volume, pool.mounts, pool.store) == []

    async def mounted(self, node: str, volume: str) -> bool:
        return volume in await self.pools[node].store.mounted_here()

    def write(self, node: str, volume: str, data: bytes) -> bool:
        try:
            with (self.paths[node] / volume / "data").open("ab") as out:
                out.write(data)
            return True
        except OSError:
            return False

    @contextmanager
    def open_for_writing(self, node: str, volume: str) -> Iterator[None]:
        """Another process holds a file open for writing (the agent does not count itself)."""
        script = 'exec 3>>"$1"; echo open; exec sleep 60'
        path = self.paths[node] / volume / "open"
        with subprocess.Popen(
            ["sh", "-c", script, "sh", str(path)], stdout=subprocess.PIPE, text=True
        ) as holder:
            try:
                assert holder.stdout is not None and holder.stdout.readline() == "open\n"
                yield
            finally:
                holder.kill()


@dataclass
class FakeWorld:
    stores: dict[str, FakeStore]
    peer: FakePeer
    records: FakeRecords

    async def create_owned(self, volume: str) -> VolumeSpec:
        spec = VolumeSpec(name=volume, size_bytes=SIZE, node=A)
        await self.records.create_volume(spec)
        assert await self.records.claim_owner(volume, A)
        self.stores[A].create(volume)
        return spec

    async def mount(self, node: str, volume: str) -> None:
        self.stores[node].mount(volume)

    async def unmount(self, node: str, volume: str) -> None:
        self.stores[node].unmount(volume)

    async def mounted(self, node: str, volume: str) -> bool:
        return self.stores[node].copies[volume].mounted

    def write(self, node: str, volume: str, data: bytes) -> bool:
        return self.stores[node].write(volume, data)

    @contextmanager
    def open_for_writing(self, node: str, volume: str) -> Iterator[None]:
        with self.stores[node].open_for_writing(volume):
            yield


@pytest.fixture(params=["real", "fake"])
async def world(
    request: pytest.FixtureRequest, keyspace: Keyspace, tmp_path: Path
) -> AsyncIterator[RealWorld | FakeWorld]:
    if request.param == "fake":
        records = FakeRecords()
        fakes = {A: FakeStore(A), B: FakeStore(B)}
        yield FakeWorld(dict(fakes), FakePeer(B, fakes[B], records), records)
        return
    scratch: ScratchPool = request.getfixturevalue("pool")
    async with running_nodes(scratch, keyspace, [A, B], tmp_path) as nodes:
        pools = {n: PoolStore(node.store, node.mounts) for n, node in nodes.items()}
        client = PeerClient(B, nodes[B].address, None, encrypt_streams=False)
        try:
            yield RealWorld(
                dict(pools),
                RemotePeer(client),
                keyspace,
                {n: node.mount_root for n, node in nodes.items()},
                pools,
            )
        finally:
            await client.close()


@pytest.fixture
def volume() -> str:
    return f"rp-{secrets.token_hex(3)}"


Worlds = RealWorld | FakeWorld


async def _held(world: Worlds, node: str, volume: str) -> list[str]:
    return [ref.name for ref in await world.stores[node].snapshots(volume) or []]


async def test_a_first_sync_is_full_and_the_next_continues_it(world: Worlds, volume: str) -> None:
    await world.create_owned(volume)
    assert world.write(A, volume, b"first\n")
    first = await sync_to_peer(world.stores[A], world.peer, volume, epoch=1, sender=A)
    assert first.base is None and first.bytes_sent > 0
    assert world.write(A, volume, b"second\n")
    second = await sync_to_peer(world.stores[A], world.peer, volume, epoch=1, sender=A)
    assert second.base == first.snapshot.name
    assert second.snapshot in await world.peer.holdings(volume)
    assert not await world.stores[B].is_writable(volume), "a received copy stays read-only"
    assert not world.write(B, volume, b"on the replica\n")


async def test_a_stream_from_a_sender_not_owning_the_volume_is_refused(
    world: Worlds, volume: str
) -> None:
    await world.create_owned(volume)
    with pytest.raises(TransferFailed, match="is not the owner"):
        await sync_to_peer(world.stores[A], world.peer, volume, epoch=2, sender=A)
    assert await world.peer.holdings(volume) == []


async def test_a_copy_written_after_its_base_is_kept_aside_and_the_stream_refused(
    world: Worlds, volume: str
) -> None:
    spec = await world.create_owned(volume)
    await sync_to_peer(world.stores[A], world.peer, volume, epoch=1, sender=A)
    target = world.stores[B]
    await target.activate(spec)
    await world.mount(B, volume)
    assert world.write(B, volume, b"written on the replica\n")
    await target.stop_writes(volume)
    with pytest.raises(TransferFailed, match="kept aside"):
        await sync_to_peer(world.stores[A], world.peer, volume, epoch=1, sender=A)
    assert await world.peer.holdings(volume) == [], "the diverged copy was moved aside"
    again = await sync_to_peer(world.stores[A], world.peer, volume, epoch=1, sender=A)
    assert again.base is None


async def test_a_writable_copy_is_never_overwritten(world: Worlds, volume: str) -> None:
    spec = await world.create_owned(volume)
    await sync_to_peer(world.stores[A], world.peer, volume, epoch=1, sender=A)
    await world.stores[B].activate(spec)
    with pytest.raises(TransferFailed, match="must be fenced first"):
        await sync_to_peer(world.stores[A], world.peer, volume, epoch=1, sender=A)
    assert await world.stores[B].is_writable(volume)


async def test_no_common_snapshot_and_no_full_stream_allowed_takes_nothing(
    world: Worlds, volume: str
) -> None:
    await world.create_owned(volume)
    with pytest.raises(NoCommonSnapshot):
        await sync_to_peer(
            world.stores[A], world.peer, volume, epoch=1, sender=A, full_allowed=False
        )
    assert await _held(world, A, volume) == []


async def test_freeze_stops_writes_thaw_gives_them_back_stop_ends_them(
    world: Worlds, volume: str
) -> None:
    await world.create_owned(volume)
    store = world.stores[A]
    assert world.write(A, volume, b"before\n")
    await store.freeze(volume)
    assert not world.write(A, volume, b"frozen\n")
    assert not await store.is_writable(volume)
    await store.thaw(volume)
    assert world.write(A, volume, b"thawed\n")
    assert await store.is_writable(volume)
    await store.stop_writes(volume)
    assert not await store.is_writable(volume)
    assert not world.write(A, volume, b"stopped\n")
    await store.freeze(volume)  # a stopped copy: nothing to freeze
    await store.thaw(volume)
    assert not await store.is_writable(volume)


async def test_an_unused_copy_unmounted_stays_writable_and_syncs_without_a_mount(
    world: Worlds, volume: str
) -> None:
    await world.create_owned(volume)
    store = world.stores[A]
    assert world.write(A, volume, b"before the unmount\n")
    await world.unmount(A, volume)
    assert not await world.mounted(A, volume)
    assert await store.is_writable(volume), "activated: it takes writes at its next mount"
    assert not world.write(A, volume, b"unmounted\n")
    assert await store.in_use(volume) == []
    await store.freeze(volume)  # no writer to stop
    synced = await sync_to_peer(store, world.peer, volume, epoch=1, sender=A)
    assert synced.bytes_sent > 0
    assert await _held(world, B, volume) == await _held(world, A, volume) != []
    assert not await world.mounted(A, volume), "snapshots and sends need no mount"
    await store.thaw(volume)
    await world.mount(A, volume)
    assert world.write(A, volume, b"after the mount\n")


async def test_a_file_open_for_writing_refuses_the_freeze_and_is_in_use(
    world: Worlds, volume: str
) -> None:
    await world.create_owned(volume)
    store = world.stores[A]
    assert await store.in_use(volume) == []
    with world.open_for_writing(A, volume):
        assert await store.in_use(volume) != []
        with pytest.raises(FilesystemBusy):
            await store.freeze(volume)
        assert world.write(A, volume, b"still writable\n")
    assert await store.in_use(volume) == []


async def test_the_swap_happens_only_while_the_move_record_is_as_read(
    world: Worlds, volume: str
) -> None:
    await world.create_owned(volume)
    records = world.records
    assert await records.put_move(Move(volume=volume, source=A, target=B), None)
    assert not await records.put_move(Move(volume=volume, source=A, target=B), None)
    read = await records.get_move(volume)
    assert read is not None
    assert await records.put_move(read.value, read.revision)
    assert not await records.put_move(read.value, read.revision), "a stale revision loses"
    current = await records.get_move(volume)
    assert current is not None
    assert not await records.transfer_owner(volume, Owner(A, 1), B, move_revision=read.revision)
    assert not await records.transfer_owner(volume, Owner(A, 2), B, current.revision)
    assert await records.transfer_owner(volume, Owner(A, 1), B, move_revision=current.revision)
    owner = await records.get_owner(volume)
    assert owner is not None and owner.value == Owner(B, 2)
