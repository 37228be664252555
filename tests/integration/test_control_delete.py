"""Deleting a volume while a container mounts it, on real etcd: the mount wins unless forced."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from control.operations import Conflict, OperationError, VolumeOps
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import MountRecord, NodeInfo, VolumeSpec
from tests.support.etcd import EtcdServer, register_node

pytestmark = pytest.mark.integration


@pytest.fixture
async def keyspace(etcd: EtcdServer, request: pytest.FixtureRequest) -> AsyncIterator[Keyspace]:
    client = etcd.client()
    try:
        yield Keyspace(client, prefix=f"/ct-delete/{request.node.name}")
    finally:
        await client.close()


class MountsDuringDelete(Keyspace):
    """A keyspace where a container mounts the volume right after control looked for mounts."""

    lease: object = None

    async def list_mounts(self, volume: str) -> list[MountRecord]:
        found = await super().list_mounts(volume)
        if not found:
            await self.put_mount(MountRecord(volume, "ct-n1", ("c1",)), self.lease)
        return found


async def stored(keyspace: Keyspace, name: str) -> VolumeSpec:
    found = await keyspace.get_volume(name)
    assert found is not None
    return found.value


async def test_unmounted_update_needs_no_mount_of_that_volume(keyspace: Keyspace) -> None:
    await keyspace.create_volume(VolumeSpec(name="pg", size_bytes=1, node="ct-n1"))
    await keyspace.create_volume(VolumeSpec(name="pg2", size_bytes=1, node="ct-n1"))
    lease = await register_node(keyspace, NodeInfo("ct-n1", "127.0.0.1:1", "p", 1, "t"), 60)
    await keyspace.put_mount(MountRecord("pg2", "ct-n1", ("c1",)), lease)
    current = await keyspace.get_volume("pg")
    assert current is not None
    deleted = VolumeSpec(name="pg", size_bytes=1, node="ct-n1", deleted=True)
    assert await keyspace.update_volume_if_unmounted(deleted, current.revision)
    assert (await stored(keyspace, "pg")).deleted

    other = await keyspace.get_volume("pg2")
    assert other is not None
    gone = VolumeSpec(name="pg2", size_bytes=1, node="ct-n1", deleted=True)
    assert not await keyspace.update_volume_if_unmounted(gone, other.revision)
    assert not (await stored(keyspace, "pg2")).deleted
    await keyspace.delete_mount("pg2", "ct-n1")
    assert not await keyspace.update_volume_if_unmounted(gone, other.revision - 1)
    assert await keyspace.update_volume_if_unmounted(gone, other.revision)


async def test_a_mount_that_appears_during_a_delete_wins(
    etcd: EtcdServer, request: pytest.FixtureRequest
) -> None:
    client = etcd.client()
    keyspace = MountsDuringDelete(client, prefix=f"/ct-delete/{request.node.name}")
    try:
        keyspace.lease = await register_node(
            keyspace, NodeInfo("ct-n1", "127.0.0.1:1", "p", 1 << 40, "t"), 60
        )
        ops = VolumeOps(keyspace)
        await ops.create("db", "1G", node="ct-n1")
        with pytest.raises(OperationError, match=r"mounted on ct-n1.*--force") as refused:
            await ops.delete("db")
        assert not isinstance(refused.value, Conflict)
        assert not (await stored(keyspace, "db")).deleted
        await ops.delete("db", force=True)
        assert (await stored(keyspace, "db")).deleted
    finally:
        await client.close()
