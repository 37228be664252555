"""A transfer cut in half, on the ZFS that runs: where ZFS has resumable receive (kernel
OpenZFS) the next attempt sends only the rest of the cut stream, which lands exactly the
snapshot planned; where it has not (zfs-fuse) the next attempt sends a new stream in full.
A part the sender can no longer finish (its snapshot is gone: the plan changed) is
discarded by the receiver before the new stream.

Two agents' parts run in this process (tests/support/nodes.py) under their own roots of
one pool, streams going through the real Transfer service into ``zfs receive``. The cut
is the sender's stream ending after a given byte count, as a link cut mid-stream leaves
the receiver: ``zfs receive`` sees the stream end early. vagrant/vm-test.sh runs this
file in a kernel-OpenZFS guest (every ``test_zfs_*`` file).
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import zfs
from agent.replication.adapters import RemotePeer
from agent.replication.ports import ProgressCallback, SendStream
from agent.replication.sync import sync_to_peer
from agent.transfer.client import PeerClient, TransferFailed
from ferry.cluster.keyspace import Keyspace
from ferry.core.snapshots import SnapshotRef
from protos.ferry.v1 import transfer_pb2
from tests.support.files import write_random
from tests.support.nodes import Node, create_owned, running_nodes
from tests.support.pools import ScratchPool, scratch_pool

pytestmark = pytest.mark.integration

log = logging.getLogger(__name__)

MIB = 1 << 20
DATA_BYTES = 4 * MIB
CUT_AT = 3 * MIB


@pytest.fixture
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("rt") as made:
        yield made


@pytest.fixture
async def nodes(
    pool: ScratchPool, keyspace: Keyspace, tmp_path: Path
) -> AsyncIterator[dict[str, Node]]:
    async with running_nodes(pool, keyspace, ["rt-a", "rt-b"], tmp_path) as made:
        yield made


@pytest.fixture
async def peer(nodes: dict[str, Node]) -> AsyncIterator[CuttingPeer]:
    target = nodes["rt-b"]
    client = PeerClient(target.name, target.address, None, encrypt_streams=False)
    yield CuttingPeer(RemotePeer(client))
    await client.close()


@dataclass
class Cut:
    """A stream that ends after ``at`` bytes; ``whole`` is how long the stream was."""

    stream: SendStream
    at: int
    whole: int = 0

    def write_to(self, fd: int) -> None:
        with tempfile.TemporaryFile() as spool:
            self.stream.write_to(spool.fileno())
            self.whole = spool.tell()
            spool.seek(0)
            part = memoryview(spool.read(self.at))
            while part:
                part = part[os.write(fd, part) :]


class CuttingPeer:
    """The target as the owner reaches it; the next stream is cut after ``cut_at`` bytes."""

    def __init__(self, peer: RemotePeer) -> None:
        self._peer = peer
        self.cut_at: int | None = None
        self.cut: Cut | None = None
        self.node = peer.node

    async def holdings(self, volume: str) -> list[SnapshotRef]:
        return await self._peer.holdings(volume)

    async def resume_token(self, volume: str) -> str | None:
        return await self._peer.resume_token(volume)

    async def stream_features(self, volume: str) -> frozenset[str]:
        return await self._peer.stream_features(volume)

    async def send(
        self, header: transfer_pb2.StreamHeader, stream: SendStream, on_progress: ProgressCallback
    ) -> list[SnapshotRef]:
        if self.cut_at is not None:
            self.cut, self.cut_at = Cut(stream, self.cut_at), None
            stream = self.cut
        return await self._peer.send(header, stream, on_progress)


async def cut_transfer(owner: Node, peer: CuttingPeer, volume: str) -> Cut:
    """A first sync of ``volume`` whose stream is cut after CUT_AT bytes."""
    peer.cut_at = CUT_AT
    with pytest.raises(TransferFailed):
        await sync_to_peer(owner.store, peer, volume, epoch=1, sender=owner.name)
    assert peer.cut is not None and peer.cut.whole > CUT_AT, "the stream was not cut"
    return peer.cut


async def guids(node: Node, volume: str) -> dict[str, int]:
    return {ref.name: ref.guid for ref in await node.store.snapshots(volume) or []}


async def test_a_cut_transfer_continues_with_the_rest_and_lands_the_snapshot_planned(
    nodes: dict[str, Node], keyspace: Keyspace, peer: CuttingPeer
) -> None:
    owner, target = nodes["rt-a"], nodes["rt-b"]
    volume = f"rt-{secrets.token_hex(3)}"
    await create_owned(owner, keyspace, volume)
    write_random(owner.path(volume) / "first", DATA_BYTES)
    cut = await cut_transfer(owner, peer, volume)
    planned = next(iter(await guids(owner, volume)))
    # Written after the cut: the retry must still land the cut snapshot, then this on top.
    write_random(owner.path(volume) / "second", MIB)

    sent = await sync_to_peer(owner.store, peer, volume, epoch=1, sender=owner.name)

    log.warning(
        "cut transfer retried: backend=%s resumable=%s whole=%d cut_at=%d resumed=%d "
        "retry_total=%d",
        zfs.backend_name(),
        zfs.features().resumable_receive,
        cut.whole,
        cut.at,
        sent.resumed,
        sent.bytes_sent,
    )
    held = await guids(target, volume)
    assert held[sent.snapshot.name] == sent.snapshot.guid
    assert await target.store.resume_token(volume) is None
    if zfs.features().resumable_receive:
        assert 0 < sent.resumed < cut.whole - CUT_AT // 2
        assert held[planned] == (await guids(owner, volume))[planned]
        assert sent.base == planned
    else:
        # Nothing of the cut stream stayed: the retry sent a new stream of all the data.
        assert sent.resumed == 0 and sent.base is None
        assert sent.bytes_sent > DATA_BYTES


async def test_a_cut_stream_the_sender_can_no_longer_finish_is_discarded_for_a_new_one(
    nodes: dict[str, Node], keyspace: Keyspace, peer: CuttingPeer
) -> None:
    owner, target = nodes["rt-a"], nodes["rt-b"]
    volume = f"rt-{secrets.token_hex(3)}"
    await create_owned(owner, keyspace, volume)
    write_random(owner.path(volume) / "first", DATA_BYTES)
    await cut_transfer(owner, peer, volume)
    assert (await target.store.resume_token(volume) is not None) == (
        zfs.features().resumable_receive
    )
    # The plan changed: the cut stream's snapshot is gone on the sender.
    await owner.store.destroy_snapshots(volume, list(await guids(owner, volume)))

    sent = await sync_to_peer(owner.store, peer, volume, epoch=1, sender=owner.name)

    assert sent.resumed == 0 and sent.base is None
    assert (await guids(target, volume))[sent.snapshot.name] == sent.snapshot.guid
    assert await target.store.resume_token(volume) is None


async def test_the_rest_of_a_stream_the_receiver_does_not_hold_is_refused(
    nodes: dict[str, Node], keyspace: Keyspace, peer: CuttingPeer
) -> None:
    owner = nodes["rt-a"]
    volume = f"rt-{secrets.token_hex(3)}"
    await create_owned(owner, keyspace, volume)
    snapshot = await owner.store.take_snapshot(volume, 1)
    header = transfer_pb2.StreamHeader(
        volume=volume,
        to_snapshot=snapshot.name,
        to_guid=snapshot.guid,
        epoch=1,
        sender=owner.name,
        resume_token="1-0-0-0",
    )
    with pytest.raises(TransferFailed, match="no longer holds the cut stream"):
        await peer.send(header, owner.store.resume_stream("1-0-0-0"), lambda _: None)
