"""Compressed and large-block streams, negotiated, on the ZFS that runs: where both ends are
kernel OpenZFS a volume of 1 MiB records, compressed, replicates with `zfs send -c -L` (its
stream smaller than the data it carries) and reads back identical, blocks as large as the
source's; on zfs-fuse the stream is plain, as before.

Two agents' parts in this process, as in test_zfs_resumable_transfer.py; vagrant/vm-test.sh
runs this file in a kernel-OpenZFS guest. On fakes: tests/unit/test_stream_features.py.
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
TEXT = b"ferry moves volumes between hosts\n" * (8 * MIB // 34)


@pytest.fixture
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("sf") as made:
        yield made


@pytest.fixture
async def nodes(
    pool: ScratchPool, keyspace: Keyspace, tmp_path: Path
) -> AsyncIterator[dict[str, Node]]:
    async with running_nodes(pool, keyspace, ["sf-a", "sf-b"], tmp_path) as made:
        yield made


@pytest.fixture
async def peer(nodes: dict[str, Node]) -> AsyncIterator[RemotePeer]:
    target = nodes["sf-b"]
    client = PeerClient(target.name, target.address, None, encrypt_streams=False)
    yield RemotePeer(client)
    await client.close()


async def test_a_compressed_large_block_volume_replicates_and_reads_back_identical(
    nodes: dict[str, Node], keyspace: Keyspace, peer: RemotePeer, tmp_path: Path
) -> None:
    owner, target = nodes["sf-a"], nodes["sf-b"]
    volume = f"sf-{secrets.token_hex(3)}"
    await create_owned(owner, keyspace, volume)
    kernel = {"compress", "large_blocks"} <= zfs.features().send_flags
    owner.root.set_property(volume, "compression", "gzip")
    if kernel:
        owner.root.set_property(volume, "recordsize", "1M")
    source = owner.path(volume)
    (source / "text").write_bytes(TEXT)
    write_random(source / "random", 2 * MIB)
    written = len(TEXT) + 2 * MIB

    sent = await sync_to_peer(owner.store, peer, volume, epoch=1, sender=owner.name)

    log.warning(
        "replicated: backend=%s features=%s written=%d stream=%d",
        zfs.backend_name(),
        ",".join(sent.features) or "-",
        written,
        sent.bytes_sent,
    )
    where = tmp_path / "check"
    await asyncio.to_thread(target.root.mount, volume, where)
    assert tree_digest(where) == tree_digest(source)
    if kernel:
        assert sent.features == ("compress", "large_blocks")
        assert sent.bytes_sent < written / 2, "blocks travel compressed"
        assert (where / "random").stat().st_blksize == (source / "random").stat().st_blksize
    else:
        assert sent.features == ()
        assert sent.bytes_sent > written, "a plain stream carries the data uncompressed"
