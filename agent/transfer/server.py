"""The receiving end of a transfer: the gRPC ``Transfer`` service of an agent.

Before a byte reaches ``zfs receive`` the receiver checks, in this order:
the certificate names the sender (unless the cluster runs insecure), the
sender owns the volume at the stated epoch in etcd, this node does not own
it (a writable copy is never overwritten), the volume is not deleted, and
the copy holds nothing after the stream's base (no newer snapshot, no byte
written since; otherwise it is kept aside under the pool's aside root and
the sender asked for a full stream). Only then does it issue a ticket for
the data connection (agent.transfer.data). The target is always this node's
own dataset for the volume, under its pool root. ``zfs receive`` never runs
with force: a copy written to after the check makes ZFS refuse the stream,
and that copy is kept aside too. A stream cut in half makes ``zfs receive``
fail, which leaves the dataset as it was.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from agent import zfs
from agent.store import VolumeStore
from agent.transfer.data import (
    DataConnection,
    DataListener,
    peer_host,
    pump,
    stream_bytes_received,
)
from agent.transfer.secure import SecureStream
from agent.zfs import ZFSError
from ferry.cluster.events import EventLog
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import EventKind, VolumeSpec
from ferry.security.tls import peer_identity
from protos.ferry.v1 import transfer_pb2, transfer_pb2_grpc

log = logging.getLogger(__name__)


class TransferService(transfer_pb2_grpc.TransferServicer):
    """Accepts snapshot streams from the owner of a volume into this node's copy."""

    def __init__(
        self,
        node: str,
        holdings: VolumeStore,
        keyspace: Keyspace,
        data: DataListener,
        insecure: bool,
        require_encryption: bool,
    ) -> None:
        self._node = node
        self._holdings = holdings
        self._keyspace = keyspace
        self._data = data
        self._insecure = insecure
        self._require_encryption = require_encryption
        self._events = EventLog(keyspace, node)

    async def Holdings(
        self, request: transfer_pb2.HoldingsRequest, context: grpc.aio.ServicerContext
    ) -> transfer_pb2.HoldingsReply:
        await self._authenticate(context, claimed=None)
        return await self._reply(request.volume, context)

    async def Receive(
        self, request: transfer_pb2.StreamHeader, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[transfer_pb2.ReceiveReply]:
        volume = request.volume
        await self._authenticate(context, claimed=request.sender)
        spec = await self._authorize(request, context)
        if self._require_encryption and not request.encrypted:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self._node} accepts only encrypted streams; start the agent of "
                f"{request.sender} without --insecure-plain-streams",
            )
        if volume in self._holdings.receiving:
            await context.abort(
                grpc.StatusCode.ABORTED,
                f"a transfer into volume {volume} is already running on {self._node}; retry later",
            )
        self._holdings.receiving.add(volume)
        ticket = None
        try:
            await self._prepare_base(request, context)
            try:
                ticket = self._data.expect(
                    peer_host(context.peer()), request.sender, request.encrypted
                )
            except ValueError as error:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self._node}: {error}")
            yield transfer_pb2.ReceiveReply(
                ticket=transfer_pb2.DataTicket(token=ticket.token, port=self._data.port)
            )
            try:
                connection = await ticket.connection()
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no data connection for {volume} arrived on port {self._data.port} "
                    "in time; is it blocked by a firewall?",
                )
            received = await self._receive(request, spec.uid, connection, context)
        finally:
            if ticket is not None:
                self._data.discard(ticket)  # closes the connection it admitted
            self._holdings.receiving.discard(volume)
        reply = await self._reply(volume, context)
        reply.bytes_received = received
        yield transfer_pb2.ReceiveReply(done=reply)

    async def _authenticate(self, context: grpc.aio.ServicerContext, claimed: str | None) -> None:
        """A stream's claimed sender is the name in the caller's certificate.

        The certificate's kind was checked at the server's door
        (``ferry.security.gate``): Holdings and Receive take node certificates only.
        """
        if self._insecure:
            return
        identity = peer_identity(context)
        if identity is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        if claimed is not None and identity != claimed:
            log.warning("transfer refused: certificate=%s claims sender=%s", identity, claimed)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate names {identity!r} but the stream claims sender {claimed!r}",
            )

    async def _authorize(
        self, header: transfer_pb2.StreamHeader, context: grpc.aio.ServicerContext
    ) -> VolumeSpec:
        """The volume's spec, if the header's sender owns it at the header's epoch."""
        volume = header.volume
        spec = await self._keyspace.get_volume(volume)
        if spec is None or spec.value.deleted:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"volume {volume} does not exist")
        assert spec is not None
        owner = await self._keyspace.get_owner(volume)
        if owner is None or (owner.value.node, owner.value.epoch) != (header.sender, header.epoch):
            held = "nobody" if owner is None else f"{owner.value.node} at epoch {owner.value.epoch}"
            log.warning(
                "transfer refused: volume=%s sender=%s epoch=%d owner=%s",
                volume,
                header.sender,
                header.epoch,
                held,
            )
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{header.sender} is not the owner of {volume} at epoch {header.epoch} "
                f"(etcd says {held})",
            )
        if header.sender == self._node:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a node does not send to itself")
        return spec.value

    async def _prepare_base(
        self, header: transfer_pb2.StreamHeader, context: grpc.aio.ServicerContext
    ) -> None:
        """Make sure the local copy can take this stream without losing anything.

        A copy that holds anything after the stream's base (a newer snapshot,
        bytes written since) is kept aside, never rolled back; the sender then
        finds no copy here and sends a full stream.
        """
        volume = header.volume
        local = await self._holdings.snapshots(volume)
        if local is None:
            if header.from_snapshot:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"{self._node} holds no copy of {volume}; send a full stream",
                )
            return
        if await self._holdings.is_writable(volume):
            log.warning(
                "transfer refused, the copy here is writable: volume=%s sender=%s",
                volume,
                header.sender,
            )
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self._node} holds a writable copy of {volume}; it must be fenced first",
            )
        if not header.from_snapshot:
            reason = "a full stream came for a copy that already exists"
        else:
            reason = await self._holdings.divergence(volume, header.from_snapshot)
        if reason:
            await self._diverged(header, reason, context)

    async def _diverged(
        self, header: transfer_pb2.StreamHeader, reason: str, context: grpc.aio.ServicerContext
    ) -> None:
        """Keep the copy aside; an incremental stream is then refused (a full one goes on)."""
        volume = header.volume
        aside = await self._holdings.keep_aside(volume, header.epoch, reason)
        await self._events.record(
            volume,
            EventKind.DIVERGED_KEPT,
            f"kept aside as {aside} on {self._node}: {reason} (stream from {header.sender})",
        )
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
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self._node}'s copy of {volume} {reason}; kept aside as {aside} "
                f"('ferryctl volume aside list {volume}'); send a full stream",
            )

    async def _receive(
        self,
        header: transfer_pb2.StreamHeader,
        uid: str,
        connection: DataConnection,
        context: grpc.aio.ServicerContext,
    ) -> int:
        """Receive without force: ZFS itself refuses a copy modified since the base."""
        volume = header.volume
        work = self._holdings.receive_stream(volume, header.to_snapshot).read_from
        log.info(
            "receiving: volume=%s from=%s to=%s sender=%s epoch=%d",
            volume,
            header.from_snapshot or "(full)",
            header.to_snapshot,
            header.sender,
            header.epoch,
        )
        try:
            if isinstance(connection, SecureStream):
                await connection.receive(work)
                received = connection.relayed
            else:
                await pump(work, connection)
                received = stream_bytes_received(connection)
        except (ZFSError, OSError) as error:
            if header.from_snapshot and isinstance(
                error, zfs.DestinationModified | zfs.StreamMismatch
            ):
                # Written after the base, seen by ZFS only (no `written` here, or a writer
                # this agent does not know of): kept aside, the stream refused.
                await self._diverged(header, _refusal_reason(error, header.from_snapshot), context)
            log.warning("receive failed, copy unchanged: volume=%s error=%s", volume, error)
            await context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"receive of {volume}@{header.to_snapshot} failed, copy left unchanged: {error}",
            )
        guid = await self._holdings.guid(volume, header.to_snapshot)
        if header.to_guid and guid != header.to_guid:
            await context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"received {volume}@{header.to_snapshot} has GUID {guid}, sender said "
                f"{header.to_guid}",
            )
        await self._holdings.after_receive(volume, uid)
        log.info("received: volume=%s snapshot=%s bytes=%d", volume, header.to_snapshot, received)
        return received

    async def _reply(
        self, volume: str, context: grpc.aio.ServicerContext
    ) -> transfer_pb2.HoldingsReply:
        try:
            local = await self._holdings.snapshots(volume)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        reply = transfer_pb2.HoldingsReply(volume=volume, node=self._node)
        for ref in local or ():
            reply.snapshots.add(name=ref.name, guid=ref.guid)
        return reply


def _refusal_reason(error: ZFSError, base: str) -> str:
    """What ZFS's refusal of an incremental receive without force says about the copy."""
    if isinstance(error, zfs.DestinationModified):
        return f"was written to after {base} (ZFS: modified since that snapshot)"
    return f"does not continue from {base} (ZFS: its newest snapshot is not the stream's base)"
