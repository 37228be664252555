"""Bookmarks as the replication cursor, on fakes of both ZFSes: where ZFS has bookmarks
(kernel OpenZFS) the sender bookmarks each snapshot a peer confirmed, so once that snapshot
is destroyed here the next stream is still incremental, from the bookmark; without them
(zfs-fuse) it is a full stream, as before. The same on real kernel OpenZFS:
tests/integration/test_zfs_bookmark_cursor.py (in the guest of vagrant/vm-test.sh)."""

from __future__ import annotations

from agent.replication.sync import sync_to_peer
from ferry.core.records import VolumeSpec
from tests.support.replication import FakePeer, FakeRecords, FakeStore

VOLUME = "vol"
A, B, C = "node-a", "node-b", "node-c"
DATA = b"x" * 1000
DELTA = b"y" * 10


async def _nodes(kernel: bool) -> tuple[FakeRecords, FakeStore, FakePeer]:
    records = FakeRecords()
    await records.create_volume(VolumeSpec(name=VOLUME, size_bytes=1 << 30, node=A))
    assert await records.claim_owner(VOLUME, A)
    source = FakeStore(A, resumable=kernel, has_bookmarks=kernel)
    source.create(VOLUME)
    assert source.write(VOLUME, DATA)
    target = FakeStore(B, resumable=kernel, has_bookmarks=kernel)
    return records, source, FakePeer(B, target, records)


async def _names(store: FakeStore) -> list[str]:
    return [ref.name for ref in await store.snapshots(VOLUME) or []]


async def test_a_destroyed_base_is_sent_from_its_bookmark_incrementally() -> None:
    _, source, peer = await _nodes(kernel=True)
    first = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)
    # Retention on the source: the snapshot the peer holds is gone here.
    await source.destroy_snapshots(VOLUME, await _names(source))
    assert source.write(VOLUME, DELTA)

    sent = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)

    assert (sent.base, sent.from_bookmark) == (first.snapshot.name, True)
    assert sent.bytes_sent == len(DELTA)
    assert peer.streams[-1].from_snapshot == first.snapshot.name
    assert peer.store.data(VOLUME) == DATA + DELTA
    assert peer.store.asides == []
    assert [ref.name for ref in await source.bookmarks(VOLUME)] == [sent.snapshot.name]


async def test_without_bookmarks_a_destroyed_base_means_a_full_stream() -> None:
    _, source, peer = await _nodes(kernel=False)
    await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)
    await source.destroy_snapshots(VOLUME, await _names(source))
    assert source.write(VOLUME, DELTA)

    sent = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)

    assert (sent.base, sent.from_bookmark) == (None, False)
    assert sent.bytes_sent == len(DATA + DELTA)
    # A full stream cannot go into the peer's copy: that copy was kept aside.
    assert len(peer.store.asides) == 1
    assert await source.bookmarks(VOLUME) == []


async def test_a_snapshot_is_preferred_to_its_bookmark() -> None:
    _, source, peer = await _nodes(kernel=True)
    first = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)
    assert source.write(VOLUME, DELTA)

    sent = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)

    assert (sent.base, sent.from_bookmark) == (first.snapshot.name, False)
    assert source.holds == {}, "the holds of the stream were released"


async def test_bookmarks_stay_one_per_peer_and_another_peers_base_is_kept() -> None:
    records, source, peer_b = await _nodes(kernel=True)
    peer_c = FakePeer(C, FakeStore(C, resumable=True, has_bookmarks=True), records)
    to_c = await sync_to_peer(source, peer_c, VOLUME, epoch=1, sender=A)
    for n in range(5):
        assert source.write(VOLUME, b"%d" % n)
        last = await sync_to_peer(
            source, peer_b, VOLUME, epoch=1, sender=A, keep=[to_c.snapshot.name]
        )

    marks = [ref.name for ref in await source.bookmarks(VOLUME)]
    assert marks == [to_c.snapshot.name, last.snapshot.name]
