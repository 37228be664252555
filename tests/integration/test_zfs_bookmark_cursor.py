"""Bookmarks as the replication cursor, on the ZFS that runs: where ZFS has bookmarks (kernel
OpenZFS) a sync after the source destroyed the snapshot the target holds is still
incremental, from the source's bookmark of it; where it has not (zfs-fuse) that sync is a
full stream, and the target's copy, which cannot take one, is kept aside. Either way the
data reads back identical, and the bookmarks go with the volume.

Two agents' parts run in this process (tests/support/nodes.py) under their own roots of one
pool, streams going through the real Transfer service into ``zfs receive``, as in
test_zfs_resumable_transfer.py. vagrant/vm-test.sh runs this file in a kernel-OpenZFS guest.
On fakes: tests/unit/test_bookmark_cursor.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent import zfs
from agent.replication.adapters import RemotePeer
from agent.replication.sync import sync_to_peer
from agent.transfer.client import PeerClient
from ferry.cluster.keyspace import Keyspace
from tests.support.files import tree_digest, write_random
from tests.support.nodes import Node, create_owned, running_nodes
from tests.support.pools import ScratchPool, scratch_pool

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

MIB = 1 << 20
DATA_BYTES = 4 * MIB
DELTA_BYTES = MIB // 4


@pytest.fixture
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("bk") as made:
        yield made


@pytest.fixture
async def nodes(
    pool: ScratchPool, keyspace: Keyspace, tmp_path: Path
) -> AsyncIterator[dict[str, Node]]:
    async with running_nodes(pool, keyspace, ["bk-a", "bk-b"], tmp_path) as made:
        yield made


@pytest.fixture
async def peer(nodes: dict[str, Node]) -> AsyncIterator[RemotePeer]:
    target = nodes["bk-b"]
    client = PeerClient(target.name, target.address, None, encrypt_streams=False)
    yield RemotePeer(client)
    await client.close()


async def read_back(node: Node, volume: str, where: Path) -> dict[str, str]:
    """The files of ``node``'s copy, mounted (read-only, as a copy stays) at ``where``."""
    await asyncio.to_thread(node.root.mount, volume, where)
    return tree_digest(where)


async def test_a_sync_after_the_source_destroyed_the_common_snapshot_starts_from_its_bookmark(
    nodes: dict[str, Node], keyspace: Keyspace, peer: RemotePeer, tmp_path: Path
) -> None:
    owner, target = nodes["bk-a"], nodes["bk-b"]
    volume = f"bk-{secrets.token_hex(3)}"
    await create_owned(owner, keyspace, volume)
    write_random(owner.path(volume) / "first", DATA_BYTES)
    first = await sync_to_peer(owner.store, peer, volume, epoch=1, sender=owner.name)
    # Retention on the source: every snapshot goes, the one the target holds too.
    held = [ref.name for ref in await owner.store.snapshots(volume) or []]
    await owner.store.destroy_snapshots(volume, held)
    assert await owner.store.snapshots(volume) == []
    write_random(owner.path(volume) / "second", DELTA_BYTES)

    sent = await sync_to_peer(owner.store, peer, volume, epoch=1, sender=owner.name)

    log.warning(
        "sync after the base was destroyed: backend=%s bookmarks=%s first=%d second=%d "
        "from_bookmark=%s",
        zfs.backend_name(),
        zfs.features().bookmarks,
        first.bytes_sent,
        sent.bytes_sent,
        sent.from_bookmark,
    )
    asides = await target.store.asides()
    if zfs.features().bookmarks:
        assert (sent.base, sent.from_bookmark) == (first.snapshot.name, True)
        assert sent.bytes_sent < first.bytes_sent / 4, "an incremental stream, not a full one"
        assert asides == []
        marks = [ref.name for ref in await owner.store.bookmarks(volume)]
        assert marks == [sent.snapshot.name], "one bookmark: the target's newest snapshot"
    else:
        assert (sent.base, sent.from_bookmark) == (None, False)
        assert sent.bytes_sent > DATA_BYTES
        assert [aside.volume for aside in asides] == [volume]
        assert await owner.store.bookmarks(volume) == []
    assert await read_back(target, volume, tmp_path / "check") == tree_digest(owner.path(volume))

    await owner.store.destroy(volume)
    assert not zfs.lzc_exists(owner.root.dataset(volume)), "destroyed with its bookmark"
