"""The sending end of a transfer: gRPC channels to peer agents."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable

import grpc

from agent.transfer import data
from agent.transfer.data import host_of
from agent.transfer.options import CHANNEL_OPTIONS
from agent.transfer.secure import FRAMES, SecureStream, stream_context
from agent.zfs import ZFSError
from agent.zfs.streams import OutgoingStream
from ferry.core.snapshots import SnapshotRef
from ferry.security.tls import TlsFiles
from protos.ferry.v1 import transfer_pb2, transfer_pb2_grpc

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int], None]
ReceiveCall = grpc.aio.UnaryStreamCall[transfer_pb2.StreamHeader, transfer_pb2.ReceiveReply]
HOLDINGS_TIMEOUT_SECONDS = 30.0
PROGRESS_POLL_SECONDS = 0.5
REASON_WAIT_SECONDS = 10.0


class TransferFailed(Exception):
    """A transfer to a peer failed; the peer's copy is as it was before, unless the stream
    had arrived whole before the failure (a lost reply): the peer's holdings tell."""


class PeerClient:
    """One peer agent's Transfer service."""

    def __init__(
        self, node: str, address: str, tls: TlsFiles | None, encrypt_streams: bool
    ) -> None:
        self.node = node
        self.address = address
        self._ssl = None
        if encrypt_streams:
            if tls is None:
                raise ValueError("encrypted streams need TLS files; the agent runs --insecure")
            self._ssl = stream_context(tls.ssl_context(ssl.Purpose.SERVER_AUTH))
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
        reply = await self._holdings(volume)
        return [SnapshotRef(s.name, s.guid) for s in reply.snapshots]

    async def resume_token(self, volume: str) -> str | None:
        """The token of a cut stream of ``volume`` the peer can take the rest of, or None."""
        return (await self._holdings(volume)).resume_token or None

    async def stream_features(self, volume: str) -> frozenset[str]:
        """What the peer's ZFS receives beyond a plain stream; empty from an older agent."""
        return frozenset((await self._holdings(volume)).stream_features)

    async def _holdings(self, volume: str) -> transfer_pb2.HoldingsReply:
        try:
            return await self._stub.Holdings(
                transfer_pb2.HoldingsRequest(volume=volume), timeout=HOLDINGS_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            raise TransferFailed(f"{self.node} ({self.address}): {error.details()}") from error

    async def send(
        self,
        header: transfer_pb2.StreamHeader,
        source: OutgoingStream,
        on_progress: ProgressCallback,
    ) -> list[SnapshotRef]:
        """Stream ``source`` to the peer over a data connection; returns what the peer then holds.

        ``on_progress`` gets the bytes sent as the stream goes, and a last count when it ends,
        whether it failed or not. On a failure TransferFailed carries the peer's explanation
        when it gave one; the peer's copy is as it was unless the stream had arrived whole
        before the failure (a lost reply): its ``holdings`` tell.
        """
        started = time.monotonic()
        stated = transfer_pb2.StreamHeader()
        stated.CopyFrom(header)
        stated.encrypted = self._ssl is not None
        stated.encrypted_format = FRAMES if stated.encrypted else 0
        call = self._stub.Receive(stated)
        replies = aiter(call)
        host = host_of(self.address)
        try:
            ticket = (await self._expect(replies, "ticket")).ticket
            if self._ssl is None:
                with await data.connect(host, ticket.port, ticket.token) as sock:
                    try:
                        await self._stream_plain(call, sock, source, on_progress)
                        done = (await self._expect(replies, "done")).done
                    finally:
                        # Failed or not, the last count: up to PROGRESS_POLL_SECONDS newer
                        # than the poll's, a whole stream if it arrived before the failure.
                        on_progress(data.stream_bytes_acked(sock))
            else:
                if ticket.encrypted_format != FRAMES:
                    raise TransferFailed(
                        f"{self.node} takes encrypted streams in format "
                        f"{ticket.encrypted_format}, this agent speaks only format {FRAMES}: "
                        "run the same Ferry version on both agents"
                    )
                stream = await data.connect_tls(
                    host, ticket.port, ticket.token, self._ssl, self.node
                )
                try:
                    await self._stream_encrypted(call, stream, source, on_progress)
                    done = (await self._expect(replies, "done")).done
                finally:
                    on_progress(stream.relayed)
                    stream.close()
        except grpc.aio.AioRpcError as error:
            raise TransferFailed(f"{self.node} ({self.address}): {error.details()}") from error
        except OSError as error:
            raise TransferFailed(
                f"data connection to {self.node} ({host}) failed: {error}; the data port "
                "(--data-port, gRPC port + 1 by default) must be open between agents"
            ) from error
        finally:
            call.cancel()
        on_progress(done.bytes_received)
        log.info(
            "sent: volume=%s to=%s snapshot=%s bytes=%d seconds=%.2f encrypted=%s",
            header.volume,
            self.node,
            header.to_snapshot,
            done.bytes_received,
            time.monotonic() - started,
            stated.encrypted,
        )
        return [SnapshotRef(s.name, s.guid) for s in done.snapshots]

    async def _stream_plain(
        self,
        call: ReceiveCall,
        sock: socket.socket,
        source: OutgoingStream,
        on_progress: ProgressCallback,
    ) -> None:
        """``zfs send`` writes into the socket itself; progress is what the peer acknowledged."""
        reporter = asyncio.create_task(_report(lambda: data.stream_bytes_acked(sock), on_progress))
        try:
            await data.pump(source.write_to, sock)
            sock.shutdown(socket.SHUT_WR)
        except ZFSError as error:
            data.cut(sock)
            raise await self._failed(call, error) from error
        finally:
            reporter.cancel()

    async def _stream_encrypted(
        self,
        call: ReceiveCall,
        stream: SecureStream,
        source: OutgoingStream,
        on_progress: ProgressCallback,
    ) -> None:
        """``zfs send`` writes into a pipe; a relay thread encrypts it onto the connection."""
        reporter = asyncio.create_task(_report(lambda: stream.relayed, on_progress))
        try:
            await stream.send(source.write_to)
        except ZFSError as error:
            raise await self._failed(call, error) from error
        finally:
            reporter.cancel()

    async def _failed(self, call: ReceiveCall, error: ZFSError) -> TransferFailed:
        """Often the peer stopped reading first; then its reason is the one worth telling."""
        reason = await _reason(call)
        said = f"; {self.node} says: {reason}" if reason else ""
        return TransferFailed(f"send to {self.node} failed: {error}{said}")

    async def _expect(
        self, replies: AsyncIterator[transfer_pb2.ReceiveReply], part: str
    ) -> transfer_pb2.ReceiveReply:
        reply = await anext(replies, None)
        if reply is None or reply.WhichOneof("part") != part:
            raise TransferFailed(f"{self.node} ({self.address}) ended the call without the {part}")
        return reply

    async def close(self) -> None:
        await self._channel.close(grace=None)


async def _report(count: Callable[[], int], on_progress: ProgressCallback) -> None:
    while True:
        await asyncio.sleep(PROGRESS_POLL_SECONDS)
        on_progress(count())


async def _reason(call: ReceiveCall) -> str | None:
    """The peer's error for a call it ended, if it says so soon."""
    try:
        code = await asyncio.wait_for(call.code(), REASON_WAIT_SECONDS)
    except TimeoutError:
        return None
    return None if code == grpc.StatusCode.OK else await call.details()
