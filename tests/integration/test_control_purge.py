"""ferry-control purges a deleted volume's records once no live node holds a copy, on real
etcd: nodes have no write right on ``volumes/``, so the last holder cannot do it."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from ferry.cluster.keyspace import Keyspace
from ferry.core.records import NodeInfo, NodeState, Owner, VolumeSpec
from tests.support.etcd import ControlServer, register_node

pytestmark = pytest.mark.integration

PURGE_WITHIN_SECONDS = 10.0


async def eventually_gone(keyspace: Keyspace, name: str) -> float:
    started = time.monotonic()
    while await keyspace.get_volume(name) is not None:
        assert time.monotonic() - started < PURGE_WITHIN_SECONDS, f"{name} was not purged"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_a_deleted_volume_is_purged_once_its_last_copy_is_gone(
    control: ControlServer, keyspace: Keyspace
) -> None:
    name, node = f"pu-{secrets.token_hex(3)}", f"pu-n{secrets.token_hex(2)}"
    kept = f"{name}-kept"
    lease = await register_node(keyspace, NodeInfo(node, "127.0.0.1:1", "p", 1, "t"), 60)
    for volume in (name, kept):
        await keyspace.create_volume(VolumeSpec(name=volume, size_bytes=1 << 20, node=node))
        assert await keyspace.claim_owner(volume, node)
    await keyspace.put_state(NodeState(node, name, ("ferry-1-1",)), lease)
    spec = await keyspace.get_volume(name)
    assert spec is not None
    deleted = VolumeSpec(**{**spec.value.__dict__, "deleted": True})
    assert await keyspace.update_volume(deleted, spec.revision)

    await asyncio.sleep(3)
    assert await keyspace.get_volume(name) is not None, "purged while a node holds a copy"

    await keyspace.delete_state(node, name)
    await eventually_gone(keyspace, name)
    assert await keyspace.get_owner(name) is None, "the owner went with the spec"
    still = await keyspace.get_volume(kept)
    assert still is not None and not still.value.deleted, "a live volume is never purged"
    owner = await keyspace.get_owner(kept)
    assert owner is not None and owner.value == Owner(node, 1)
