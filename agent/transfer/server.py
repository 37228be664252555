"""The receiving end of a transfer: the gRPC ``Transfer`` service of an agent.

Before a byte reaches ``zfs receive`` the receiver checks that the
certificate names the sender (unless the cluster runs insecure), then makes
the admission decisions of ``agent.replication.admission`` (the sender owns
the volume at the stated epoch, the copy here can take the stream without
losing anything). Only then does it issue a ticket for the data connection
(agent.transfer.data). The target is always this node's own dataset for the
volume, under its pool root. ``zfs receive`` never runs with force: a copy
written to after the check makes ZFS refuse the stream, and that copy is
kept aside too. A stream cut in half makes ``zfs receive`` fail, which
leaves the dataset's snapshots as they were; where ZFS has resumable receive
the part that arrived is kept, Holdings reports its token, and the sender's
next stream is the rest (``StreamHeader.resume_token``, admitted only while
the token here is the same) or a new stream, before which the part is
discarded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc

from agent import failpoints
from agent.replication import admission
from agent.store import VolumeStore
from agent.transfer.data import (
    DataConnection,
    DataListener,
    peer_host,
    pump,
    stream_bytes_received,
)
from agent.transfer.secure import FRAMES, SecureStream
from agent.zfs import SnapshotNotFound, ZFSError
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import VolumeSpec
from ferry.core.snapshots import SnapshotRef
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
        received: Callable[[], None] = lambda: None,
    ) -> None:
        """``received`` is called after each receive (the agent reports its copy anew)."""
        self._node = node
        self._holdings = holdings
        self._keyspace = keyspace
        self._data = data
        self._insecure = insecure
        self._require_encryption = require_encryption
        self._received = received

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
        if request.encrypted and request.encrypted_format != FRAMES:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{request.sender} sends encrypted streams in format "
                f"{request.encrypted_format}, {self._node} speaks only format {FRAMES}: run "
                "the same Ferry version on both agents",
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
                ticket=transfer_pb2.DataTicket(
                    token=ticket.token, port=self._data.port, encrypted_format=FRAMES
                )
            )
            try:
                connection = await ticket.connection()
            except TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no data connection for {volume} arrived on port {self._data.port} "
                    "in time; is it blocked by a firewall?",
                )
            received, held = await self._receive(request, spec.uid, connection, context)
        finally:
            if ticket is not None:
                self._data.discard(ticket)  # closes the connection it admitted
            self._holdings.receiving.discard(volume)
        reply = transfer_pb2.HoldingsReply(volume=volume, node=self._node, bytes_received=received)
        for ref in held:
            reply.snapshots.add(name=ref.name, guid=ref.guid)
        failpoints.reached("transfer.received")
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
        try:
            return await admission.authorize(self._node, header, self._keyspace)
        except admission.Refused as refused:
            await context.abort(_STATUS[refused.why], str(refused))

    async def _prepare_base(
        self, header: transfer_pb2.StreamHeader, context: grpc.aio.ServicerContext
    ) -> None:
        try:
            await admission.prepare_base(self._node, header, self._holdings)
        except admission.Refused as refused:
            await context.abort(_STATUS[refused.why], str(refused))

    async def _receive(
        self,
        header: transfer_pb2.StreamHeader,
        uid: str,
        connection: DataConnection,
        context: grpc.aio.ServicerContext,
    ) -> tuple[int, list[SnapshotRef]]:
        """Receive without force: ZFS itself refuses a copy modified since the base. Returns
        the bytes received and the snapshots the copy then holds."""
        volume = header.volume
        work = self._holdings.receive_stream(volume, header.to_snapshot).read_from
        log.info(
            "receiving: volume=%s from=%s to=%s sender=%s epoch=%d features=%s",
            volume,
            header.from_snapshot or "(full)",
            header.to_snapshot,
            header.sender,
            header.epoch,
            ",".join(header.stream_features) or "-",
        )
        started = time.monotonic()
        try:
            if isinstance(connection, SecureStream):
                await connection.receive(work)
                received = connection.relayed
            else:
                await pump(work, connection)
                received = stream_bytes_received(connection)
            streamed = time.monotonic() - started
        except (ZFSError, OSError) as error:
            reason = admission.refused_by_zfs(error, header.from_snapshot)
            if reason:
                # Written after the base, seen by ZFS only (no `written` here, or a writer
                # this agent does not know of): kept aside, the stream refused.
                try:
                    await admission.diverged(self._node, header, reason, self._holdings)
                except admission.Refused as refused:
                    await context.abort(_STATUS[refused.why], str(refused))
            log.warning(
                "receive failed, copy unchanged: volume=%s error=%s resumable=%s",
                volume,
                error,
                await self._holdings.resume_token(volume) is not None,
            )
            await context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"receive of {volume}@{header.to_snapshot} failed, copy left unchanged: {error}",
            )
        held = await self._holdings.snapshots(volume) or []
        guid = next((ref.guid for ref in held if ref.name == header.to_snapshot), None)
        if guid is None:
            raise SnapshotNotFound(self._holdings.snapshot_name(volume, header.to_snapshot))
        if header.to_guid and guid != header.to_guid:
            await context.abort(
                grpc.StatusCode.DATA_LOSS,
                f"received {volume}@{header.to_snapshot} has GUID {guid}, sender said "
                f"{header.to_guid}",
            )
        held = await self._holdings.after_receive(volume, uid, held)
        self._received()
        log.info(
            "received: volume=%s snapshot=%s bytes=%d stream_seconds=%.2f encrypted=%s",
            volume,
            header.to_snapshot,
            received,
            streamed,
            header.encrypted,
        )
        return received, held

    async def _reply(
        self, volume: str, context: grpc.aio.ServicerContext
    ) -> transfer_pb2.HoldingsReply:
        try:
            local = await self._holdings.snapshots(volume)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        token = await self._holdings.resume_token(volume)
        reply = transfer_pb2.HoldingsReply(
            volume=volume,
            node=self._node,
            resume_token=token or "",
            stream_features=sorted(self._holdings.stream_features()),
        )
        for ref in local or ():
            reply.snapshots.add(name=ref.name, guid=ref.guid)
        return reply


_STATUS = {
    admission.Refusal.NO_VOLUME: grpc.StatusCode.NOT_FOUND,
    admission.Refusal.NOT_OWNER: grpc.StatusCode.FAILED_PRECONDITION,
    admission.Refusal.TO_ITSELF: grpc.StatusCode.INVALID_ARGUMENT,
    admission.Refusal.NO_COPY: grpc.StatusCode.FAILED_PRECONDITION,
    admission.Refusal.WRITABLE: grpc.StatusCode.FAILED_PRECONDITION,
    admission.Refusal.DIVERGED: grpc.StatusCode.FAILED_PRECONDITION,
    admission.Refusal.NOT_RESUMABLE: grpc.StatusCode.FAILED_PRECONDITION,
}
"""The gRPC status a refusal ends the call with."""
