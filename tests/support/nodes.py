"""Agents' parts in this process, on a real pool and a real etcd, without their loops.

A ``Node`` is what one agent runs: a ``VolumeStore`` under a root of its own
in the test's pool, its Transfer service (gRPC and data connection) on
loopback, a ``MoveDriver`` and an ``Executor``. No convergence loop runs:
a test applies the steps it is about (a move, an activation) and sees what
each did, with streams going through the real service into ``zfs receive``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from agent.executor import Executor
from agent.replicas import Replicator
from agent.replication.activation import Activation
from agent.replication.adapters import PoolStore, RemotePeer
from agent.replication.source import MoveDriver
from agent.store import VolumeStore
from agent.transfer.client import PeerClient
from agent.transfer.data import DataListener
from agent.transfer.options import SERVER_OPTIONS
from agent.transfer.server import TransferService
from agent.usage import DockerMounts
from agent.zfs.volumes import PoolRoot
from ferry.cluster.keyspace import Keyspace
from ferry.core.plan import Activate, Create, DriveMove
from ferry.core.records import Move, VolumeSpec
from protos.ferry.v1 import transfer_pb2_grpc
from tests.support.pools import ScratchPool

VOLUME_BYTES = 64 << 20
MOVE_SECONDS = 120.0


@dataclass(frozen=True)
class Node:
    """One agent's parts; its datasets live under ``<pool>/<name>``."""

    name: str
    root: PoolRoot
    store: VolumeStore
    mount_root: Path
    address: str
    mounts: DockerMounts
    driver: MoveDriver
    executor: Executor

    def path(self, volume: str) -> Path:
        return self.store.mountpoint(volume)


async def _no_control(create: Create, why: str) -> None:
    raise AssertionError(f"create of {create.volume} failed ({why}); these nodes have no control")


@asynccontextmanager
async def running_nodes(
    pool: ScratchPool, keyspace: Keyspace, names: Sequence[str], workdir: Path
) -> AsyncIterator[dict[str, Node]]:
    """Nodes ``names``, each serving transfers on loopback; all stopped on exit."""
    peers: dict[str, PeerClient] = {}

    async def connect(node: str) -> RemotePeer:
        return RemotePeer(peers[node])

    nodes: dict[str, Node] = {}
    servers: list[grpc.aio.Server] = []
    listeners: list[DataListener] = []
    try:
        for name in names:
            root = PoolRoot(pool.name, root=name)
            store = VolumeStore(root, workdir / name)
            await store.ensure_root()
            data = DataListener("127.0.0.1", 0, None)
            await data.start()
            listeners.append(data)
            # The agent's keepalive settings: without them a stream longer than the client's
            # ping interval (a slow guest) ends in "too many pings".
            server = grpc.aio.server(options=SERVER_OPTIONS)
            transfer_pb2_grpc.add_TransferServicer_to_server(
                TransferService(
                    name, store, keyspace, data, insecure=True, require_encryption=False
                ),
                server,
            )
            address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
            await server.start()
            servers.append(server)
            peers[name] = PeerClient(name, address, None, encrypt_streams=False)
            mounts = DockerMounts(workdir / f"{name}-docker-mounts.json")
            local = PoolStore(store, mounts)
            driver = MoveDriver(name, keyspace, local, connect)
            activation = Activation(name, keyspace, local)
            replicator = Replicator(name, keyspace, store, connect)
            executor = Executor(
                name,
                keyspace,
                store,
                driver,
                activation,
                lambda: None,
                replicator,
                _no_control,
                connect,
                mounts,
            )
            nodes[name] = Node(name, root, store, workdir / name, address, mounts, driver, executor)
        yield nodes
    finally:
        for node in nodes.values():
            await node.executor.close()
            # Unmounted, the pool is not "busy" for its destroy right after the test.
            for volume in await asyncio.to_thread(node.root.volumes):
                await asyncio.to_thread(node.root.unmount, volume)
        for server in servers:
            await server.stop(grace=None)
        for data in listeners:
            await data.close()
        for peer in peers.values():
            await peer.close()


async def create_owned(node: Node, keyspace: Keyspace, name: str) -> VolumeSpec:
    """A new volume owned (epoch 1), writable and mounted (as a Mount does) on ``node``."""
    spec = VolumeSpec(name=name, size_bytes=VOLUME_BYTES, node=node.name, uid=os.urandom(8).hex())
    await keyspace.create_volume(spec)
    await node.store.create(name, spec.size_bytes, spec.compression, spec.uid)
    assert await keyspace.claim_owner(name, node.name)
    await node.store.activate(spec)
    await node.store.ensure_mounted(name)
    return spec


async def move(keyspace: Keyspace, source: Node, target: Node, name: str) -> int:
    """Move ``name`` as the agents do: the source's driver (retrying as the executor does)
    until the target owns it, then the target's activation and a container's Mount there;
    returns the new epoch."""
    previous = await keyspace.get_move(name)
    record = Move(volume=name, source=source.name, target=target.name, started_at=time.time())
    assert await keyspace.put_move(record, previous.revision if previous else None)
    deadline = time.monotonic() + MOVE_SECONDS
    while (owner := await keyspace.get_owner(name)) is None or owner.value.node != target.name:
        assert time.monotonic() < deadline, f"{name} did not reach {target.name} in time"
        if name not in source.executor.running_moves:
            # As convergence does: a driver that paused (a mount seen in the handoff, say
            # a container starting elsewhere on this machine) is started again.
            await source.executor.apply(DriveMove(name))
        await asyncio.sleep(0.2)
    await target.executor.apply(Activate(name, owner.value.epoch))
    await target.store.ensure_mounted(name)
    while name in source.executor.running_moves:
        assert time.monotonic() < deadline, f"the driver of {name} on {source.name} did not end"
        await asyncio.sleep(0.1)
    return owner.value.epoch


def append_lines(path: Path, count: int, tag: str) -> list[str]:
    """Append ``count`` numbered lines, each fsynced, as a database commits them."""
    lines = [f"{tag} {n}" for n in range(count)]
    with path.open("a") as log:
        for line in lines:
            log.write(line + "\n")
            log.flush()
            os.fsync(log.fileno())
    return lines
