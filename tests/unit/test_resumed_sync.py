"""A stream cut in half, on fakes of both ZFSes: with resumable receive (kernel OpenZFS) the
next sync sends only the rest, which lands the snapshot planned; a part the sender can no
longer finish is discarded before a new stream; without it (zfs-fuse) a cut changes nothing
and the next sync sends everything again. The same on real kernel OpenZFS:
tests/integration/test_zfs_resumable_transfer.py (in the guest of vagrant/vm-test.sh)."""

from __future__ import annotations

import pytest

from agent.replication.source import MoveDriver
from agent.replication.sync import NoCommonSnapshot, sync_to_peer
from agent.transfer.client import TransferFailed
from ferry.core.phases import MovePhase
from ferry.core.records import Move, VolumeSpec
from tests.support.replication import FakePeer, FakeRecords, FakeStore

VOLUME = "vol"
A, B = "node-a", "node-b"
DATA = b"x" * 1000
CUT = 600


async def _nodes(resumable: bool) -> tuple[FakeRecords, FakeStore, FakePeer]:
    records = FakeRecords()
    await records.create_volume(VolumeSpec(name=VOLUME, size_bytes=1 << 30, node=A))
    assert await records.claim_owner(VOLUME, A)
    source = FakeStore(A, resumable=resumable)
    source.create(VOLUME)
    assert source.write(VOLUME, DATA)
    return records, source, FakePeer(B, FakeStore(B, resumable=resumable), records)


async def _cut(source: FakeStore, peer: FakePeer) -> None:
    peer.cut_after = CUT
    with pytest.raises(TransferFailed, match="cut"):
        await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)


async def test_a_cut_stream_continues_with_the_rest_into_the_snapshot_planned() -> None:
    _, source, peer = await _nodes(resumable=True)
    await _cut(source, peer)
    planned = (await source.snapshots(VOLUME) or [])[0]
    assert source.write(VOLUME, b"written after the cut\n")

    sent = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)

    assert sent.resumed == len(DATA) - CUT
    assert sent.bytes_sent == sent.resumed + len(b"written after the cut\n")
    assert sent.base == planned.name
    assert planned in await peer.holdings(VOLUME)
    assert peer.store.data(VOLUME) == source.data(VOLUME)
    assert [bool(h.resume_token) for h in peer.streams] == [False, True, False]
    assert await peer.resume_token(VOLUME) is None


async def test_without_resumable_receive_a_cut_changes_nothing_and_all_is_sent_again() -> None:
    _, source, peer = await _nodes(resumable=False)
    await _cut(source, peer)
    assert await peer.resume_token(VOLUME) is None

    sent = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)

    assert (sent.resumed, sent.base, sent.bytes_sent) == (0, None, len(DATA))
    assert peer.store.data(VOLUME) == source.data(VOLUME)


async def test_a_part_the_sender_can_no_longer_finish_is_discarded_for_a_new_stream() -> None:
    _, source, peer = await _nodes(resumable=True)
    await _cut(source, peer)
    # The plan changed: the cut stream's snapshot is gone here.
    await source.destroy_snapshots(
        VOLUME, [ref.name for ref in await source.snapshots(VOLUME) or []]
    )

    sent = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)

    assert (sent.resumed, sent.base, sent.bytes_sent) == (0, None, len(DATA))
    assert [bool(h.resume_token) for h in peer.streams] == [False, False]
    assert await peer.resume_token(VOLUME) is None
    assert peer.store.data(VOLUME) == source.data(VOLUME)


async def test_a_cut_incremental_resumes_but_a_cut_full_stream_waits_when_full_is_refused() -> None:
    """The handoff's final sync (writes stopped) finishes a cut delta, never a full stream."""
    _, source, peer = await _nodes(resumable=True)
    await _cut(source, peer)
    with pytest.raises(NoCommonSnapshot):
        await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A, full_allowed=False)
    assert await peer.resume_token(VOLUME) is not None, "kept for pre-copy to finish"

    await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)
    assert source.write(VOLUME, b"a delta\n")
    peer.cut_after = 3
    with pytest.raises(TransferFailed):
        await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)
    sent = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A, full_allowed=False)
    assert sent.resumed == len(b"a delta\n") - 3
    assert peer.store.data(VOLUME) == source.data(VOLUME)


async def test_a_move_cut_in_pre_copy_continues_on_its_next_attempt() -> None:
    records, source, peer = await _nodes(resumable=True)
    assert await records.put_move(Move(volume=VOLUME, source=A, target=B, started_at=0.0), None)

    async def connect(node: str) -> FakePeer:
        return peer

    driver = MoveDriver(A, records, source, connect)
    peer.cut_after = CUT
    with pytest.raises(TransferFailed):
        await driver.run(VOLUME)
    await driver.run(VOLUME)

    move = await records.get_move(VOLUME)
    assert move is not None and move.value.phase == MovePhase.ACTIVATING
    resumed = [h for h in peer.streams if h.resume_token]
    assert len(resumed) == 1 and resumed[0].to_snapshot == peer.streams[0].to_snapshot
    assert peer.store.data(VOLUME) == source.data(VOLUME)


async def test_a_sender_that_cannot_resume_has_the_peer_discard_its_part() -> None:
    """A zfs-fuse owner and a kernel-OpenZFS replica: the part stays until the new stream."""
    records, source, _ = await _nodes(resumable=False)
    peer = FakePeer(B, FakeStore(B, resumable=True), records)
    await _cut(source, peer)
    assert await peer.resume_token(VOLUME) is not None

    sent = await sync_to_peer(source, peer, VOLUME, epoch=1, sender=A)

    assert (sent.resumed, sent.base, sent.bytes_sent) == (0, None, len(DATA))
    assert await peer.resume_token(VOLUME) is None
    assert peer.store.data(VOLUME) == source.data(VOLUME)
