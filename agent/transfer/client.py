"""The sending end of a transfer: gRPC channels to peer agents."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable

import grpc

from agent.snapshots import SnapshotRef
from agent.transfer.options import CHANNEL_OPTIONS
from control.tls import TlsFiles
from protos.ferry.v1 import transfer_pb2, transfer_pb2_grpc

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int], None]
HOLDINGS_TIMEOUT_SECONDS = 30.0


class TransferFailed(Exception):
    """A transfer to a peer failed; the peer's copy is as it was before."""


class PeerClient:
    """One peer agent's Transfer service."""

    def __init__(self, node: str, address: str, tls: TlsFiles | None) -> None:
        self.node = node
        self.address = address
        if tls is None:
            self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", node)]
            self._channel = grpc.aio.secure_channel(
                address, tls.channel_credentials(), options=options
            )
        self._stub = transfer_pb2_grpc.TransferStub(self._channel)

    async def holdings(self, volume: str) -> list[SnapshotRef]:
        """The peer's snapshots of ``volume``, oldest first."""
        try:
            reply = await self._stub.Holdings(
                transfer_pb2.HoldingsRequest(volume=volume), timeout=HOLDINGS_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            raise TransferFailed(f"{self.node} ({self.address}): {error.details()}") from error
        return [SnapshotRef(s.name, s.guid) for s in reply.snapshots]

    async def send(
        self,
        header: transfer_pb2.StreamHeader,
        chunks: AsyncIterable[bytes],
        on_progress: ProgressCallback,
    ) -> list[SnapshotRef]:
        """Stream a snapshot to the peer; returns what it holds afterwards."""

        async def requests() -> AsyncIterator[transfer_pb2.ReceiveRequest]:
            yield transfer_pb2.ReceiveRequest(header=header)
            sent = 0
            async for chunk in chunks:
                yield transfer_pb2.ReceiveRequest(data=chunk)
                sent += len(chunk)
                on_progress(sent)

        started = time.monotonic()
        try:
            reply = await self._stub.Receive(requests())
        except grpc.aio.AioRpcError as error:
            raise TransferFailed(f"{self.node} ({self.address}): {error.details()}") from error
        log.info(
            "sent: volume=%s to=%s snapshot=%s bytes=%d seconds=%.2f",
            header.volume,
            self.node,
            header.to_snapshot,
            reply.bytes_received,
            time.monotonic() - started,
        )
        return [SnapshotRef(s.name, s.guid) for s in reply.snapshots]

    async def close(self) -> None:
        await self._channel.close(grace=None)
