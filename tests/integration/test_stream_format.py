"""A sender that announces an encrypted stream format this receiver does not speak is refused
at once, with a reason naming the sender and what to do, and nothing is received; a sender
handed a ticket in a format it does not speak sends nothing.

Agents of two versions must not wait on each other on a data connection that neither
understands: the refusal comes on the gRPC call, before a ticket is issued.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from agent.store import VolumeStore
from agent.transfer.client import PeerClient, TransferFailed
from agent.transfer.data import DataListener
from agent.transfer.options import SERVER_OPTIONS
from agent.transfer.secure import FRAMES, stream_context
from agent.transfer.server import TransferService
from agent.zfs.streams import SnapshotStream
from agent.zfs.volumes import PoolRoot
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import VolumeSpec
from ferry.security.gate import KindGate
from protos.ferry.v1 import transfer_pb2, transfer_pb2_grpc
from tests.support.etcd import ClusterCerts
from tests.support.pools import ScratchPool, pool_fixture

pytestmark = pytest.mark.integration

SENDER, RECEIVER = "sf-sender", "sf-receiver"
pool = pool_fixture("sf", scope="module")


@dataclass
class Receiver:
    store: VolumeStore
    data: DataListener
    address: str


@pytest.fixture
async def receiver(
    pool: ScratchPool, keyspace: Keyspace, certs: ClusterCerts, tmp_path: Path
) -> AsyncIterator[Receiver]:
    """The receiving agent's Transfer service on mutual TLS, as the agent serves it."""
    files = certs.issue("node", RECEIVER)
    store = VolumeStore(PoolRoot(pool.name, root=RECEIVER), tmp_path / RECEIVER)
    await store.ensure_root()
    data = DataListener(
        "127.0.0.1", 0, lambda: stream_context(files.ssl_context(ssl.Purpose.CLIENT_AUTH))
    )
    await data.start()
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[KindGate(insecure=False)])
    transfer_pb2_grpc.add_TransferServicer_to_server(
        TransferService(RECEIVER, store, keyspace, data, insecure=False, require_encryption=True),
        server,
    )
    port = server.add_secure_port("127.0.0.1:0", files.server_credentials())
    await server.start()
    try:
        yield Receiver(store, data, f"127.0.0.1:{port}")
    finally:
        await server.stop(grace=None)
        await data.close()


async def test_an_unknown_encrypted_format_is_refused_before_any_ticket_and_nothing_is_received(
    receiver: Receiver, keyspace: Keyspace, certs: ClusterCerts
) -> None:
    volume = f"sf-{secrets.token_hex(3)}"
    await keyspace.create_volume(VolumeSpec(name=volume, size_bytes=16 << 20, node=SENDER))
    assert await keyspace.claim_owner(volume, SENDER)
    channel = grpc.aio.secure_channel(
        receiver.address,
        certs.issue("node", SENDER).channel_credentials(),
        options=[("grpc.ssl_target_name_override", RECEIVER)],
    )
    header = transfer_pb2.StreamHeader(
        volume=volume,
        to_snapshot="ferry-1-1",
        epoch=1,
        sender=SENDER,
        encrypted=True,
        encrypted_format=FRAMES + 1,
    )
    replies = []
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for reply in transfer_pb2_grpc.TransferStub(channel).Receive(header):
                replies.append(reply)
    finally:
        await channel.close(grace=None)

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == (
        f"{SENDER} sends encrypted streams in format {FRAMES + 1}, {RECEIVER} speaks only "
        f"format {FRAMES}: run the same Ferry version on both agents"
    )
    assert replies == [], "a ticket was issued for a stream the receiver cannot read"
    assert await receiver.store.snapshots(volume) is None, "something was received"
    assert volume not in receiver.store.receiving


class NewerReceiver(transfer_pb2_grpc.TransferServicer):
    """A receiver of another version: its ticket names a stream format this agent lacks."""

    def __init__(self, port: int) -> None:
        self._port = port

    async def Receive(
        self, request: transfer_pb2.StreamHeader, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[transfer_pb2.ReceiveReply]:
        yield transfer_pb2.ReceiveReply(
            ticket=transfer_pb2.DataTicket(
                token=bytes(32), port=self._port, encrypted_format=FRAMES + 1
            )
        )
        await asyncio.Event().wait()  # until the sender cancels the call


async def test_a_ticket_in_an_unknown_format_ends_the_send_before_any_byte_leaves(
    certs: ClusterCerts,
) -> None:
    files = certs.issue("node", RECEIVER)
    with socket.create_server(("127.0.0.1", 0)) as data_port:
        data_port.setblocking(False)
        server = grpc.aio.server()
        transfer_pb2_grpc.add_TransferServicer_to_server(
            NewerReceiver(data_port.getsockname()[1]), server
        )
        port = server.add_secure_port("127.0.0.1:0", files.server_credentials())
        await server.start()
        sender = PeerClient(
            RECEIVER, f"127.0.0.1:{port}", certs.issue("node", SENDER), encrypt_streams=True
        )
        header = transfer_pb2.StreamHeader(
            volume="sf-any", to_snapshot="ferry-1-1", epoch=1, sender=SENDER
        )
        try:
            with pytest.raises(TransferFailed) as refused:
                await sender.send(
                    header, SnapshotStream(b"sf-none/v@ferry-1-1", None), lambda sent: None
                )
        finally:
            await sender.close()
            await server.stop(grace=None)
        assert str(refused.value) == (
            f"{RECEIVER} takes encrypted streams in format {FRAMES + 1}, this agent speaks "
            f"only format {FRAMES}: run the same Ferry version on both agents"
        )
        with pytest.raises(BlockingIOError):
            data_port.accept()  # no data connection was opened
