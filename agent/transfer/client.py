"""The sending end of a transfer: gRPC channels to peer agents."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable

import grpc

from agent.snapshots import SnapshotRef
from agent.transfer import data
from agent.transfer.data import host_of
from agent.transfer.options import CHANNEL_OPTIONS
from agent.zfs import ZFSError
from control.tls import TlsFiles
from protos.ferry.v1 import transfer_pb2, transfer_pb2_grpc

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int], None]
# Blocking: writes a whole snapshot stream into the descriptor it is given.
StreamWriter = Callable[[int], None]
ReceiveCall = grpc.aio.UnaryStreamCall[transfer_pb2.StreamHeader, transfer_pb2.ReceiveReply]
HOLDINGS_TIMEOUT_SECONDS = 30.0
PROGRESS_POLL_SECONDS = 0.5
REASON_WAIT_SECONDS = 10.0


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
        self, header: transfer_pb2.StreamHeader, stream: StreamWriter, on_progress: ProgressCallback
    ) -> list[SnapshotRef]:
        """Have ``stream`` write the snapshot into a data connection to the peer.

        Returns what the peer holds afterwards. On any failure the peer's copy
        is as it was, and TransferFailed carries the peer's explanation when
        it gave one.
        """
        started = time.monotonic()
        call = self._stub.Receive(header)
        replies = aiter(call)
        try:
            ticket = await self._expect(replies, "ticket")
            with await data.connect(
                host_of(self.address), ticket.ticket.port, ticket.ticket.token
            ) as sock:
                await self._stream(call, sock, stream, on_progress)
                done = (await self._expect(replies, "done")).done
        except grpc.aio.AioRpcError as error:
            raise TransferFailed(f"{self.node} ({self.address}): {error.details()}") from error
        except OSError as error:
            raise TransferFailed(
                f"data connection to {self.node} ({host_of(self.address)}): {error}"
            ) from error
        finally:
            call.cancel()
        on_progress(done.bytes_received)
        log.info(
            "sent: volume=%s to=%s snapshot=%s bytes=%d seconds=%.2f",
            header.volume,
            self.node,
            header.to_snapshot,
            done.bytes_received,
            time.monotonic() - started,
        )
        return [SnapshotRef(s.name, s.guid) for s in done.snapshots]

    async def _stream(
        self,
        call: ReceiveCall,
        sock: socket.socket,
        stream: StreamWriter,
        on_progress: ProgressCallback,
    ) -> None:
        reporter = asyncio.create_task(_report_acked(sock, on_progress))
        try:
            await data.pump(stream, sock)
            sock.shutdown(socket.SHUT_WR)
        except ZFSError as error:
            # Often the peer stopped reading first; then its reason is the one worth telling.
            data.cut(sock)
            reason = await _reason(call)
            said = f"; {self.node} says: {reason}" if reason else ""
            raise TransferFailed(f"send to {self.node} failed: {error}{said}") from error
        finally:
            reporter.cancel()

    async def _expect(
        self, replies: AsyncIterator[transfer_pb2.ReceiveReply], part: str
    ) -> transfer_pb2.ReceiveReply:
        reply = await anext(replies, None)
        if reply is None or reply.WhichOneof("part") != part:
            raise TransferFailed(f"{self.node} ({self.address}) ended the call without the {part}")
        return reply

    async def close(self) -> None:
        await self._channel.close(grace=None)


async def _report_acked(sock: socket.socket, on_progress: ProgressCallback) -> None:
    while True:
        await asyncio.sleep(PROGRESS_POLL_SECONDS)
        on_progress(data.stream_bytes_acked(sock))


async def _reason(call: ReceiveCall) -> str | None:
    """The peer's error for a call it ended, if it says so soon."""
    try:
        code = await asyncio.wait_for(call.code(), REASON_WAIT_SECONDS)
    except TimeoutError:
        return None
    return None if code == grpc.StatusCode.OK else await call.details()
