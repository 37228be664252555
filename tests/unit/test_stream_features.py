"""Compressed and large-block streams, negotiated: the receiver says in Holdings what its ZFS
receives beyond a plain stream, and the sender uses what both have. An agent that says
nothing, or a ZFS without the flags (zfs-fuse), gets a plain stream. The same on real
kernel OpenZFS: tests/integration/test_zfs_stream_features.py (vagrant/vm-test.sh)."""

from __future__ import annotations

import pytest

from agent.replication.sync import sync_to_peer
from ferry.core.records import VolumeSpec
from tests.support.replication import FakePeer, FakeRecords, FakeStore

VOLUME = "vol"
A, B = "node-a", "node-b"
KERNEL = frozenset({"compress", "large_blocks"})


async def _nodes(sends: frozenset[str], receives: frozenset[str]) -> tuple[FakeStore, FakePeer]:
    records = FakeRecords()
    await records.create_volume(VolumeSpec(name=VOLUME, size_bytes=1 << 30, node=A))
    assert await records.claim_owner(VOLUME, A)
    source = FakeStore(A, features=sends)
    source.create(VOLUME)
    assert source.write(VOLUME, b"x" * 100)
    return source, FakePeer(B, FakeStore(B, features=receives), records)


@pytest.mark.parametrize(
    ("sends", "receives", "used"),
    [
        (KERNEL, KERNEL, ("compress", "large_blocks")),
        (KERNEL, frozenset({"compress"}), ("compress",)),
        (frozenset({"compress"}), KERNEL, ("compress",)),
        (KERNEL, frozenset(), ()),
        (frozenset(), KERNEL, ()),
    ],
)
async def test_the_stream_uses_what_both_ends_have(
    sends: frozenset[str], receives: frozenset[str], used: tuple[str, ...]
) -> None:
    source, peer = await _nodes(sends, receives)

    sent = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)

    assert sent.features == used
    assert tuple(peer.streams[-1].stream_features) == used
    assert peer.store.data(VOLUME) == source.data(VOLUME)


async def test_an_agent_that_says_nothing_gets_a_plain_stream() -> None:
    source, peer = await _nodes(KERNEL, KERNEL)
    peer.states_features = False

    sent = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)

    assert sent.features == ()
    assert list(peer.streams[-1].stream_features) == []


async def test_a_sender_without_the_flags_does_not_ask() -> None:
    source, peer = await _nodes(frozenset(), KERNEL)

    await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)

    assert peer.feature_questions == 0, "a zfs-fuse sender makes no call more than before"
