"""The real implementations of the replication ports: this node's pool, a peer agent over
gRPC, and etcd (``ferry.cluster.keyspace.Keyspace`` is the ``MoveRecords`` port as it is)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import cast

from agent.replication.ports import ProgressCallback, SendStream
from agent.store import VolumeStore
from agent.transfer.client import PeerClient
from agent.usage import DockerMounts
from agent.zfs.streams import OutgoingStream
from ferry.core.records import VolumeSpec
from ferry.core.snapshots import Base, CutStream, SnapshotRef
from protos.ferry.v1 import transfer_pb2


class PoolStore:
    """This node's pool (``VolumeStore``) and Docker's mounts of it (``DockerMounts``)."""

    def __init__(self, store: VolumeStore, mounts: DockerMounts) -> None:
        self.store = store
        self.mounts = mounts

    async def snapshots(self, volume: str) -> list[SnapshotRef] | None:
        return await self.store.snapshots(volume)

    async def take_snapshot(self, volume: str, epoch: int) -> SnapshotRef:
        return await self.store.take_snapshot(volume, epoch)

    async def destroy_snapshots(self, volume: str, shorts: Sequence[str]) -> None:
        await self.store.destroy_snapshots(volume, shorts)

    async def send_space(
        self, volume: str, short: str, base: Base | None, flags: Sequence[str] = ()
    ) -> int:
        return await self.store.send_space(volume, short, base, flags)

    def send_stream(
        self, volume: str, short: str, base: Base | None, flags: Sequence[str] = ()
    ) -> SendStream:
        return self.store.send_stream(volume, short, base, flags)

    def stream_features(self) -> frozenset[str]:
        return self.store.stream_features()

    async def bookmarks(self, volume: str) -> list[SnapshotRef]:
        return await self.store.bookmarks(volume)

    async def keep_bookmark(self, volume: str, short: str) -> None:
        await self.store.keep_bookmark(volume, short)

    async def destroy_bookmarks(self, volume: str, shorts: Sequence[str]) -> None:
        await self.store.destroy_bookmarks(volume, shorts)

    def can_resume(self) -> bool:
        return self.store.can_resume()

    async def cut_stream(self, volume: str, token: str) -> CutStream | None:
        return await self.store.cut_stream(volume, token)

    def resume_stream(self, token: str) -> SendStream:
        return self.store.resume_stream(token)

    async def resume_token(self, volume: str) -> str | None:
        return await self.store.resume_token(volume)

    async def abort_receive(self, volume: str) -> None:
        await self.store.abort_receive(volume)

    def held(self, volume: str, shorts: Sequence[str]) -> AbstractAsyncContextManager[None]:
        return self.store.held(volume, shorts)

    async def freeze(self, volume: str) -> None:
        await self.store.freeze(volume)

    async def thaw(self, volume: str) -> None:
        await self.store.thaw(volume)

    async def stop_writes(self, volume: str) -> None:
        await self.store.stop_writes(volume)

    async def in_use(self, volume: str) -> list[str]:
        users = await self.store.users([volume])
        return self.mounts.in_use(volume, users[volume])

    @contextmanager
    def closed_to_mounts(self, volume: str) -> Iterator[None]:
        self.mounts.begin_handoff(volume)
        try:
            yield
        finally:
            self.mounts.end_handoff(volume)

    def commands_running(self, volume: str) -> list[str]:
        return self.store.commands_running(volume)

    async def is_writable(self, volume: str) -> bool:
        return await self.store.is_writable(volume)

    async def divergence(self, volume: str, base: str) -> str:
        return await self.store.divergence(volume, base)

    async def keep_aside(self, volume: str, epoch: int, reason: str) -> str:
        return await self.store.keep_aside(volume, epoch, reason)

    async def activate(self, spec: VolumeSpec) -> None:
        await self.store.activate(spec)


class RemotePeer:
    """A peer agent's Transfer service (``PeerClient``)."""

    def __init__(self, client: PeerClient) -> None:
        self.client = client

    @property
    def node(self) -> str:
        return self.client.node

    async def holdings(self, volume: str) -> list[SnapshotRef]:
        return await self.client.holdings(volume)

    async def send(
        self,
        header: transfer_pb2.StreamHeader,
        stream: SendStream,
        on_progress: ProgressCallback,
    ) -> list[SnapshotRef]:
        # The pool's streams: PoolStore.send_stream and resume_stream make them.
        return await self.client.send(header, cast(OutgoingStream, stream), on_progress)

    async def resume_token(self, volume: str) -> str | None:
        return await self.client.resume_token(volume)

    async def stream_features(self, volume: str) -> frozenset[str]:
        return await self.client.stream_features(volume)
