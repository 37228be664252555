"""Standing replicas on a real pool and etcd: the owner's loop keeps them current, holds
each one's base so a lagging replica continues incrementally, prunes the rest, releases
the hold of a replica dropped, and a move to a replica's node sends only the last delta.

Three agents' parts run in this process (tests/support/nodes.py), each under its own
root of one zfs-fuse pool, streams going through the real Transfer service.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent import zfs
from agent.replicas import Replicator
from agent.replication.adapters import RemotePeer
from agent.transfer.client import PeerClient, TransferFailed
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import VolumeSpec
from tests.support.nodes import Node, create_owned, move, running_nodes
from tests.support.pools import ScratchPool, scratch_pool

pytestmark = pytest.mark.integration

MIB = 1 << 20
RPO = 6


@pytest.fixture
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("rp") as made:
        yield made


@pytest.fixture
async def nodes(
    pool: ScratchPool, keyspace: Keyspace, tmp_path: Path
) -> AsyncIterator[dict[str, Node]]:
    async with running_nodes(pool, keyspace, ["rp-a", "rp-b", "rp-c"], tmp_path) as made:
        yield made


@pytest.fixture
def volume() -> str:
    return f"rp-{secrets.token_hex(3)}"


class Links:
    """Peers as the owner reaches them; a node in ``cut`` is unreachable."""

    def __init__(self, nodes: dict[str, Node]) -> None:
        self.cut: set[str] = set()
        self._peers = {n.name: PeerClient(n.name, n.address, None, False) for n in nodes.values()}

    async def connect(self, node: str) -> RemotePeer:
        if node in self.cut:
            raise TransferFailed(f"{node} is unreachable (link cut by the test)")
        return RemotePeer(self._peers[node])

    async def close(self) -> None:
        for peer in self._peers.values():
            await peer.close()


async def with_replicas(keyspace: Keyspace, spec: VolumeSpec, nodes: tuple[str, ...]) -> VolumeSpec:
    current = await keyspace.get_volume(spec.name)
    assert current is not None
    wanted = replace(
        current.value,
        replicas=len(nodes),
        rpo_seconds=RPO if nodes else 0,
        replica_nodes=nodes,
    )
    assert await keyspace.update_volume(wanted, current.revision)
    return wanted


async def newest(node: Node, volume: str) -> tuple[str, int] | None:
    refs = await node.store.snapshots(volume) or []
    return (refs[-1].name, refs[-1].guid) if refs else None


async def until(what: str, check: Callable[[], Awaitable[bool]], limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def current(owner: Node, replica: Node, volume: str, since: float) -> bool:
    """The replica holds a snapshot of the owner taken after ``since``."""
    held = await newest(replica, volume)
    if held is None:
        return False
    taken = zfs.lzc_get_props(replica.store.snapshot_name(volume, held[0]))["creation"]
    return int(taken) >= int(since) and held in [
        (r.name, r.guid) for r in await owner.store.snapshots(volume) or []
    ]


def write(node: Node, volume: str, name: str, mib: int) -> None:
    with (node.path(volume) / name).open("wb") as out:
        out.write(os.urandom(mib * MIB))
        out.flush()
        os.fsync(out.fileno())


async def test_a_lagging_replica_keeps_its_base_and_catches_up_incrementally(
    nodes: dict[str, Node], keyspace: Keyspace, volume: str
) -> None:
    a, b, c = nodes["rp-a"], nodes["rp-b"], nodes["rp-c"]
    spec = await with_replicas(keyspace, await create_owned(a, keyspace, volume), (b.name, c.name))
    links = Links(nodes)
    replicator = Replicator(a.name, keyspace, a.store, links.connect)
    loop = asyncio.create_task(replicator.run(volume))
    try:
        write(a, volume, "first", 4)
        started = time.time()
        await until("both replicas current", lambda: _both(a, b, c, volume, started))
        links.cut.add(c.name)
        await asyncio.sleep(RPO / 3 + 1)  # a send to c already under way ends
        behind = (await a.store.replica_bases(volume))[c.name]
        for n in range(4):
            write(a, volume, f"more-{n}", 1)
            await asyncio.sleep(RPO / 3)
        bases = await a.store.replica_bases(volume)
        ours = [r.name for r in await a.store.snapshots(volume) or []]
        assert bases[c.name] == behind, "the lagging replica's base moved"
        assert bases[b.name] != behind
        assert behind in ours, "the lagging replica's base was pruned"
        assert zfs.hold_count(a.store.snapshot_name(volume, behind)) >= 1
        # Nothing more than each replica's base and the newest two is kept.
        assert len(ours) <= 4, ours
        assert c.name in replicator.error(volume)
        links.cut.clear()
        resumed = time.time()
        await until("c caught up", lambda: current(a, c, volume, resumed))
        assert zfs.lzc_list_children(c.root.aside) == [], "c was sent a full stream"
        await until("the error cleared", lambda: _cleared(replicator, volume))
        assert behind not in [r.name for r in await a.store.snapshots(volume) or []]
        # Dropping replica c releases the hold kept for it.
        await with_replicas(keyspace, spec, (b.name,))
        await until("c's hold released", lambda: _no_base(a, volume, c.name))
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await links.close()


async def _both(a: Node, b: Node, c: Node, volume: str, since: float) -> bool:
    held = await a.store.replica_bases(volume)
    return (
        await current(a, b, volume, since)
        and await current(a, c, volume, since)
        and {b.name, c.name} <= set(held)
    )


async def _cleared(replicator: Replicator, volume: str) -> bool:
    return replicator.error(volume) == ""


async def _no_base(a: Node, volume: str, node: str) -> bool:
    return node not in await a.store.replica_bases(volume)


async def test_a_move_to_a_replicas_node_sends_only_the_last_delta(
    nodes: dict[str, Node], keyspace: Keyspace, volume: str
) -> None:
    a, b = nodes["rp-a"], nodes["rp-b"]
    await with_replicas(keyspace, await create_owned(a, keyspace, volume), (b.name,))
    links = Links(nodes)
    loop = asyncio.create_task(Replicator(a.name, keyspace, a.store, links.connect).run(volume))
    try:
        write(a, volume, "bulk", 32)
        written = time.time()
        await until("b current", lambda: current(a, b, volume, written))
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await links.close()
    write(a, volume, "last", 1)
    await move(keyspace, a, b, volume)
    record = await keyspace.get_move(volume)
    assert record is not None
    sent = record.value.bytes_sent
    print(
        f"move to the replica's node sent {sent} bytes of a 33 MiB volume ({sent / (33 * MIB):.3f})"
    )
    assert sent < 4 * MIB
    assert (b.path(volume) / "last").stat().st_size == MIB
