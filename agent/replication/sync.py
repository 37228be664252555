"""Keep one peer current: the step pre-copy, the handoff and standing replicas share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent import failpoints
from agent.replication.ports import Peer, SnapshotSource
from agent.transfer.client import TransferFailed
from ferry.core.snapshots import SnapshotRef, newest_common, prunable, unsent
from protos.ferry.v1 import transfer_pb2

SyncProgress = Callable[[str, int, int], None]
"""Called with (the snapshot being sent, bytes the peer has taken so far, the stream's
estimated size or 0): once before the first byte, then as the stream goes, and last with
its final count, whether it ended well or not."""


class NoCommonSnapshot(TransferFailed):
    """The peer holds no snapshot in common with this copy, and a full stream was not allowed."""


@dataclass(frozen=True)
class Sent:
    """What one sync did: the snapshot the peer now holds, the base it was sent from (None: a
    full stream), and the bytes the peer took (of ``estimated``, 0 when unknown)."""

    snapshot: SnapshotRef
    base: str | None
    bytes_sent: int
    estimated: int


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
    snapshot both hold with the same GUID (a full stream when there is none, unless
    ``full_allowed`` is false: then NoCommonSnapshot, nothing sent or kept).
    ``sender`` and ``epoch`` are this node and its owner epoch, which the peer checks
    against etcd; ``remote`` is what the peer holds if the caller has just asked it.
    Snapshots other peers still need as their base go in ``keep``: they are neither
    destroyed as leftovers of failed sends nor pruned. Both ends of the stream are held for
    its duration. Raises TransferFailed when the peer refuses, the stream breaks, or the
    peer does not report the snapshot afterwards (the peer's copy as it was, unless the
    stream arrived whole before its reply was lost: the next ``holdings`` tell); returns
    what was sent otherwise."""
    if remote is None:
        remote = await peer.holdings(volume)
    snapshot = await store.take_snapshot(volume, epoch)
    local = await store.snapshots(volume) or []
    base = newest_common(local, remote)
    if base is None and not full_allowed:
        # Taken and dropped rather than listed first: a handoff calls this frozen.
        await store.destroy_snapshots(volume, [snapshot.name])
        raise NoCommonSnapshot(
            f"{peer.node} holds no snapshot of {volume} in common with {sender}; "
            "it needs a full stream"
        )
    leftovers = [name for name in unsent(local, remote, epoch, snapshot.name) if name not in keep]
    await store.destroy_snapshots(volume, leftovers)
    estimated = await store.send_space(volume, snapshot.name, base)
    header = transfer_pb2.StreamHeader(
        volume=volume,
        from_snapshot=base or "",
        to_snapshot=snapshot.name,
        to_guid=snapshot.guid,
        epoch=epoch,
        sender=sender,
        estimated_bytes=estimated,
    )
    taken = 0

    def progress(sent: int) -> None:
        nonlocal taken
        taken = sent
        if on_progress is not None:
            on_progress(snapshot.name, sent, estimated)

    progress(0)
    async with store.held(volume, [name for name in (base, snapshot.name) if name]):
        held = await peer.send(header, store.send_stream(volume, snapshot.name, base), progress)
        failpoints.reached("transfer.sent")
    if snapshot not in held:
        raise TransferFailed(f"{peer.node} does not report {volume}@{snapshot.name} after send")
    await store.destroy_snapshots(
        volume,
        prunable([ref.name for ref in local], keep=[snapshot.name, base or "", *keep]),
    )
    return Sent(snapshot=snapshot, base=base, bytes_sent=taken, estimated=estimated)
