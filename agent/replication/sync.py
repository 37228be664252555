"""Keep one peer current: the step pre-copy, the handoff and standing replicas share."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent import failpoints
from agent.replication.ports import Peer, SendStream, SnapshotSource
from agent.transfer.client import TransferFailed
from ferry.core.snapshots import SnapshotRef, prunable, stream_base, unsent
from protos.ferry.v1 import transfer_pb2

log = logging.getLogger(__name__)

SyncProgress = Callable[[str, int, int], None]
"""Called with (the snapshot being sent, bytes the peer has taken so far, the stream's
estimated size or 0): once before the first byte, then as the stream goes, and last with
its final count, whether it ended well or not. The rest of a cut stream is reported as
its own stream (its snapshot, its bytes)."""


class NoCommonSnapshot(TransferFailed):
    """The peer holds no snapshot in common with this copy, and a full stream was not allowed."""


@dataclass(frozen=True)
class Sent:
    """What one sync did: the snapshot the peer now holds, the base it was sent from (None: a
    full stream; ``from_bookmark``: this copy's bookmark of it), the stream's ``features``,
    and the bytes the peer took (of ``estimated``, 0 when unknown), of which ``resumed``
    were the rest of a stream an earlier attempt was cut in (0: none resumed)."""

    snapshot: SnapshotRef
    base: str | None
    bytes_sent: int
    estimated: int
    resumed: int = 0
    from_bookmark: bool = False
    features: tuple[str, ...] = ()


async def sync_to_peer(
    store: SnapshotSource,
    peer: Peer,
    volume: str,
    *,
    epoch: int,
    sender: str,
    remote: Sequence[SnapshotRef] | None = None,
    keep: Sequence[str] = (),
    full_allowed: bool = True,
    on_progress: SyncProgress | None = None,
) -> Sent:
    """Snapshot ``volume`` now and send that snapshot to ``peer``, incremental from the newest
    snapshot both hold with the same GUID, here as a snapshot or, once that is destroyed, as
    its bookmark (a full stream when there is none, unless ``full_allowed`` is false: then
    NoCommonSnapshot, nothing sent or kept). The stream is compressed and carries large
    blocks where both ZFSes can (``stream_features``); a plain one otherwise.
    ``sender`` and ``epoch`` are this node and its owner epoch, which the peer checks
    against etcd; ``remote`` is what the peer holds if the caller has just asked it.
    Snapshots other peers still need as their base go in ``keep``: they are neither
    destroyed as leftovers of failed sends nor pruned, and their bookmarks stay. Once the
    peer reports the new snapshot, this copy bookmarks it (where ZFS has bookmarks) and
    drops the bookmarks no peer needs any more. Both ends of the stream are held for
    its duration. A stream an earlier attempt was cut in, of which the peer kept a part, is
    first finished where both ZFSes can (only the rest is sent; a full one only if
    ``full_allowed``). Raises TransferFailed when the peer refuses, the stream breaks, or
    the peer does not report the snapshot afterwards (the peer's copy as it was, unless the
    stream arrived whole before its reply was lost: the next ``holdings`` tell; or the
    part of a cut stream where ZFS resumes); returns what was sent otherwise."""
    if remote is None:
        remote = await peer.holdings(volume)
    resumed = await _finish_cut_stream(
        store, peer, volume, epoch, sender, remote, full_allowed, on_progress
    )
    if resumed is not None:
        remote, resumed_bytes = resumed
    else:
        resumed_bytes = 0
    snapshot = await store.take_snapshot(volume, epoch)
    local = await store.snapshots(volume) or []
    bookmarks = await store.bookmarks(volume)
    base = stream_base(local, remote, bookmarks)
    if base is None and not full_allowed:
        # Taken and dropped rather than listed first: a handoff calls this frozen.
        await store.destroy_snapshots(volume, [snapshot.name])
        raise NoCommonSnapshot(
            f"{peer.node} holds no snapshot of {volume} in common with {sender}; "
            "it needs a full stream"
        )
    leftovers = unsent(local, remote, epoch, snapshot.name, bookmarks)
    await store.destroy_snapshots(volume, [name for name in leftovers if name not in keep])
    features = await _stream_features(store, peer, volume)
    estimated = await store.send_space(volume, snapshot.name, base, features)
    header = transfer_pb2.StreamHeader(
        volume=volume,
        from_snapshot=base.name if base else "",
        to_snapshot=snapshot.name,
        to_guid=snapshot.guid,
        epoch=epoch,
        sender=sender,
        estimated_bytes=estimated,
        stream_features=features,
    )
    stream = store.send_stream(volume, snapshot.name, base, features)
    from_bookmark = base is not None and base.bookmark
    _, taken = await _send_one(store, peer, header, stream, on_progress, from_bookmark)
    await store.keep_bookmark(volume, snapshot.name)
    await store.destroy_bookmarks(volume, [ref.name for ref in bookmarks if ref.name not in keep])
    kept_base = base.name if base and not base.bookmark else ""
    await store.destroy_snapshots(
        volume,
        prunable([ref.name for ref in local], keep=[snapshot.name, kept_base, *keep]),
    )
    return Sent(
        snapshot=snapshot,
        base=base.name if base else None,
        bytes_sent=resumed_bytes + taken,
        estimated=estimated,
        resumed=resumed_bytes,
        from_bookmark=from_bookmark,
        features=tuple(features),
    )


async def _stream_features(store: SnapshotSource, peer: Peer, volume: str) -> list[str]:
    """What both ZFSes have of the negotiated stream features (sorted). A sender that has
    none (zfs-fuse) does not ask; a peer that does not say gets a plain stream."""
    ours = store.stream_features()
    if not ours:
        return []
    return sorted(ours & await peer.stream_features(volume))


async def _finish_cut_stream(
    store: SnapshotSource,
    peer: Peer,
    volume: str,
    epoch: int,
    sender: str,
    remote: Sequence[SnapshotRef],
    full_allowed: bool,
    on_progress: SyncProgress | None,
) -> tuple[list[SnapshotRef], int] | None:
    """If an earlier stream to ``peer`` was cut and the peer kept what arrived (resumable
    receive), send only the rest; returns what the peer then holds and the bytes it took.

    The rest lands exactly the snapshot the cut stream was planned to land: ZFS
    names it in the peer's token by GUID, and this copy must still hold it and
    its base (``cut_stream``), which the peer must hold too. Otherwise the plan
    changed (the snapshot pruned, a cancelled move's, a base the peer lost):
    nothing is resumed, and the new stream that follows makes the peer discard
    the part (``admission.prepare_base``). None when nothing was resumed.
    A sender that cannot resume does not ask (one call fewer, in the handoff
    too); its new stream has the peer discard any part all the same.
    """
    if not store.can_resume():
        return None
    token = await peer.resume_token(volume)
    if token is None:
        return None
    cut = await store.cut_stream(volume, token)
    if cut is not None and cut.base is None and not full_allowed:
        # The rest of a full stream is no final delta: pre-copy finishes it, writable.
        return None
    if cut is None or (cut.base is not None and cut.base not in remote):
        log.info(
            "cut stream not resumable, sending a new one: volume=%s peer=%s",
            volume,
            peer.node,
        )
        return None
    header = transfer_pb2.StreamHeader(
        volume=volume,
        from_snapshot=cut.base.name if cut.base else "",
        to_snapshot=cut.snapshot.name,
        to_guid=cut.snapshot.guid,
        epoch=epoch,
        sender=sender,
        estimated_bytes=cut.left,
        resume_token=token,
    )
    held, taken = await _send_one(store, peer, header, store.resume_stream(token), on_progress)
    log.info(
        "cut stream resumed: volume=%s peer=%s snapshot=%s bytes=%d",
        volume,
        peer.node,
        cut.snapshot.name,
        taken,
    )
    return held, taken


async def _send_one(
    store: SnapshotSource,
    peer: Peer,
    header: transfer_pb2.StreamHeader,
    stream: SendStream,
    on_progress: SyncProgress | None,
    from_bookmark: bool = False,
) -> tuple[list[SnapshotRef], int]:
    """Send one stream with its snapshot and base held from pruning (a bookmark, the base
    ``from_bookmark``, cannot be held, nor destroyed by a prune); returns what the peer then
    holds and the bytes it took. TransferFailed unless the peer reports the snapshot (by
    name and GUID) afterwards."""
    taken = 0

    def progress(sent: int) -> None:
        nonlocal taken
        taken = sent
        if on_progress is not None:
            on_progress(header.to_snapshot, sent, header.estimated_bytes)

    progress(0)
    base = "" if from_bookmark else header.from_snapshot
    names = [name for name in (base, header.to_snapshot) if name]
    async with store.held(header.volume, names):
        held = await peer.send(header, stream, progress)
        failpoints.reached("transfer.sent")
    if SnapshotRef(header.to_snapshot, header.to_guid) not in held:
        raise TransferFailed(
            f"{peer.node} does not report {header.volume}@{header.to_snapshot} after send"
        )
    return held, taken
