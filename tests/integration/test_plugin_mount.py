"""A Docker Mount that fails half-way leaves no mount ID and no mount record, and says why.

Real pool, real etcd; the plugin as the agent serves it. The record's write
fails the way it does when the agent's lease is gone (etcd refuses a put on
an unknown lease).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from agent.plugin import PluginError, VolumePlugin
from agent.store import VolumeStore
from agent.usage import DockerMounts
from agent.zfs.volumes import PoolRoot
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import VolumeSpec
from tests.support.pools import scratch_pool

pytestmark = pytest.mark.integration

SIZE = 64 << 20


class NoControl:
    """The volume is owned here already: the plugin never asks control for anything."""

    async def create_volume(
        self, name: str, size: str, compression: str, node: str, replication: Mapping[str, str]
    ) -> None:
        raise AssertionError("not called")

    async def delete_volume(self, name: str) -> None:
        raise AssertionError("not called")

    async def move_volume(self, name: str, node: str) -> None:
        raise AssertionError("not called")


@pytest.fixture
async def owned(
    private_keyspace: Keyspace, tmp_path: Path
) -> AsyncIterator[tuple[str, VolumeStore]]:
    with scratch_pool("pm") as pool:
        store = VolumeStore(PoolRoot(pool.name), tmp_path / "mnt")
        await store.ensure_root()
        name = f"pm-{secrets.token_hex(3)}"
        spec = VolumeSpec(name=name, size_bytes=SIZE, node="pm-a")
        await store.create(name, SIZE, "off", "")
        await store.activate(spec)
        await private_keyspace.create_volume(spec)
        assert await private_keyspace.claim_owner(name, "pm-a")
        yield name, store
        await store.destroy(name)


async def test_a_mount_whose_record_cannot_be_written_leaves_nothing_behind(
    private_keyspace: Keyspace, owned: tuple[str, VolumeStore], tmp_path: Path
) -> None:
    name, store = owned
    gone = await private_keyspace.new_lease(5)
    await gone.revoke()
    mounts = DockerMounts(tmp_path / "state" / "docker-mounts.json")
    plugin = VolumePlugin(
        node="pm-a",
        keyspace=private_keyspace,
        store=store,
        control=NoControl(),
        lease=lambda: gone,
        mounts=mounts,
    )
    plugin.ready = True
    with pytest.raises(PluginError, match=f"volume {name} could not be mounted on pm-a"):
        await plugin.mount(name, "container-1")
    assert mounts.ids(name) == ()
    after_restart = DockerMounts(tmp_path / "state" / "docker-mounts.json")
    await after_restart.load()
    assert after_restart.ids(name) == (), "the ID is not on disk either"
    assert await private_keyspace.list_mounts(name) == []
    assert await plugin.path(name) == ""
