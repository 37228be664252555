"""The receiver's admission of a stream: the decisions made before a byte reaches
``zfs receive`` (the sockets and the stream itself are ``agent.transfer``'s).

In this order: the volume exists, the header's sender owns it at the header's
epoch in etcd, the sender is not this node; then the copy here can take the
stream without losing anything: it is not writable (a writable copy is never
overwritten), and it holds nothing after the stream's base (no newer
snapshot, no byte written since). A copy that does hold more is kept aside,
never rolled back; an incremental stream is then refused and the sender
sends a full one. The rest of a cut stream (a resumable receive) continues
only the very stream the copy holds part of.
"""

from __future__ import annotations

import logging
from enum import Enum

from agent import zfs
from agent.replication.ports import MoveRecords, ReceivingStore
from agent.zfs import ZFSError
from ferry.core.records import VolumeSpec
from protos.ferry.v1 import transfer_pb2

log = logging.getLogger(__name__)


class Refusal(Enum):
    NO_VOLUME = "no such volume"
    NOT_OWNER = "sender is not the owner"
    TO_ITSELF = "sender is this node"
    NO_COPY = "no copy to continue"
    WRITABLE = "copy here is writable"
    DIVERGED = "copy here diverged"
    NOT_RESUMABLE = "no such cut stream here"


class Refused(Exception):
    """The stream is not admitted; ``why`` says which rule, the message what to do."""

    def __init__(self, why: Refusal, message: str) -> None:
        super().__init__(message)
        self.why = why


async def authorize(
    node: str, header: transfer_pb2.StreamHeader, records: MoveRecords
) -> VolumeSpec:
    """The volume's spec, if the header's sender owns it at the header's epoch."""
    volume = header.volume
    spec = await records.get_volume(volume)
    if spec is None or spec.value.deleted:
        raise Refused(Refusal.NO_VOLUME, f"volume {volume} does not exist")
    owner = await records.get_owner(volume)
    if owner is None or (owner.value.node, owner.value.epoch) != (header.sender, header.epoch):
        held = "nobody" if owner is None else f"{owner.value.node} at epoch {owner.value.epoch}"
        log.warning(
            "transfer refused: volume=%s sender=%s epoch=%d owner=%s",
            volume,
            header.sender,
            header.epoch,
            held,
        )
        raise Refused(
            Refusal.NOT_OWNER,
            f"{header.sender} is not the owner of {volume} at epoch {header.epoch} "
            f"(etcd says {held})",
        )
    if header.sender == node:
        raise Refused(Refusal.TO_ITSELF, "a node does not send to itself")
    return spec.value


async def prepare_base(node: str, header: transfer_pb2.StreamHeader, store: ReceivingStore) -> None:
    """Make sure the local copy can take this stream without losing anything.

    The rest of a cut stream is admitted only while this copy's resume token is
    the one the sender resumes: the token names the snapshot the rest lands and
    its base, and ZFS checks both. A new stream means the sender planned another
    one (the cut stream's snapshot is gone there, a cancelled move, another
    base): the part a cut left is discarded first, so the new stream and the
    checks below see the copy at its newest complete snapshot.
    """
    volume = header.volume
    token = await store.resume_token(volume)
    if header.resume_token:
        if header.resume_token != token:
            raise Refused(
                Refusal.NOT_RESUMABLE,
                f"{node} no longer holds the cut stream of {volume}@{header.to_snapshot} that "
                "the sender resumes; ask its holdings again and send a new stream",
            )
        await _refuse_if_writable(node, header, store)
        return
    if token is not None:
        log.info(
            "discarding a cut receive for a new stream: volume=%s from=%s to=%s sender=%s",
            volume,
            header.from_snapshot or "(full)",
            header.to_snapshot,
            header.sender,
        )
        await store.abort_receive(volume)
    local = await store.snapshots(volume)
    if local is None:
        if header.from_snapshot:
            raise Refused(Refusal.NO_COPY, f"{node} holds no copy of {volume}; send a full stream")
        return
    await _refuse_if_writable(node, header, store)
    if not header.from_snapshot:
        reason = "a full stream came for a copy that already exists"
    else:
        reason = await store.divergence(volume, header.from_snapshot)
    if reason:
        await diverged(node, header, reason, store)


async def _refuse_if_writable(
    node: str, header: transfer_pb2.StreamHeader, store: ReceivingStore
) -> None:
    """A writable copy is never overwritten."""
    if await store.is_writable(header.volume):
        log.warning(
            "transfer refused, the copy here is writable: volume=%s sender=%s",
            header.volume,
            header.sender,
        )
        raise Refused(
            Refusal.WRITABLE,
            f"{node} holds a writable copy of {header.volume}; it must be fenced first",
        )


async def diverged(
    node: str, header: transfer_pb2.StreamHeader, reason: str, store: ReceivingStore
) -> None:
    """Keep the copy aside; an incremental stream is then refused (a full one goes on)."""
    volume = header.volume
    aside = await store.keep_aside(volume, header.epoch, reason)
    log.warning(
        "copy diverged from the stream, kept aside: volume=%s from=%s reason=%s aside=%s "
        "sender=%s epoch=%d",
        volume,
        header.from_snapshot or "(full)",
        reason,
        aside,
        header.sender,
        header.epoch,
    )
    if header.from_snapshot:
        raise Refused(
            Refusal.DIVERGED,
            f"{node}'s copy of {volume} {reason}; kept aside as {aside} "
            f"('ferryctl volume aside list {volume}'); send a full stream",
        )


def refused_by_zfs(error: ZFSError | OSError, base: str) -> str:
    """What ZFS's refusal of an incremental receive without force says about the copy, or ""
    when the failure says nothing about it (a cut stream: the copy is as it was)."""
    if not base:
        return ""
    if isinstance(error, zfs.DestinationModified):
        return f"was written to after {base} (ZFS: modified since that snapshot)"
    if isinstance(error, zfs.StreamMismatch):
        return f"does not continue from {base} (ZFS: its newest snapshot is not the stream's base)"
    return ""
