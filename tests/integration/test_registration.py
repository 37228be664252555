"""Registering a node on real etcd and real pools: one live agent per node name."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.registration import NodeNameTaken, NodeNotAuthorized, Registration
from agent.store import VolumeStore
from agent.zfs.volumes import PoolRoot
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import NodeInfo
from tests.support.etcd import ClusterCerts, EtcdServer
from tests.support.pools import ScratchPool, scratch_pool

pytestmark = pytest.mark.integration


@pytest.fixture
def keyspace(private_keyspace: Keyspace) -> Keyspace:
    return private_keyspace


@pytest.fixture
def pools() -> Iterator[tuple[ScratchPool, ScratchPool]]:
    with scratch_pool("rg") as first, scratch_pool("rg") as second:
        yield first, second


@pytest.fixture
async def stores(
    pools: tuple[ScratchPool, ScratchPool], tmp_path: Path
) -> AsyncIterator[tuple[VolumeStore, VolumeStore]]:
    yield (
        VolumeStore(PoolRoot(pools[0].name), tmp_path / "a"),
        VolumeStore(PoolRoot(pools[1].name), tmp_path / "b"),
    )


def agent(keyspace: Keyspace, store: VolumeStore, address: str, ttl: int) -> Registration:
    record = NodeInfo(name="n1", address=address, pool="p", free_bytes=0, version="t")
    return Registration(keyspace, record, ttl, store)


async def address_on_record(keyspace: Keyspace) -> str:
    found = await keyspace.get_node("n1")
    assert found is not None
    return found.value.address


async def test_a_second_live_agent_under_the_same_name_is_refused(
    keyspace: Keyspace, stores: tuple[VolumeStore, VolumeStore]
) -> None:
    first = agent(keyspace, stores[0], "10.0.0.1:7480", ttl=3)
    await first.register()
    alive = asyncio.create_task(first.keep_alive(lambda: None))
    try:
        started = time.monotonic()
        with pytest.raises(
            NodeNameTaken, match=r"held by another live agent \(address 10\.0\.0\.1"
        ):
            await agent(keyspace, stores[1], "10.0.0.2:7480", ttl=3).register()
        assert time.monotonic() - started >= 6, "gave up before a dead agent's lease could end"
        assert await address_on_record(keyspace) == "10.0.0.1:7480"
    finally:
        alive.cancel()


async def test_a_restart_on_the_same_pool_takes_its_record_over_at_once(
    keyspace: Keyspace, stores: tuple[VolumeStore, VolumeStore]
) -> None:
    await agent(keyspace, stores[0], "10.0.0.1:7480", ttl=30).register()
    started = time.monotonic()
    await agent(keyspace, stores[0], "10.0.0.3:7480", ttl=30).register()
    assert time.monotonic() - started < 2
    assert await address_on_record(keyspace) == "10.0.0.3:7480"


async def test_the_name_is_free_once_a_dead_agents_lease_ends(
    keyspace: Keyspace, stores: tuple[VolumeStore, VolumeStore]
) -> None:
    await agent(keyspace, stores[0], "10.0.0.1:7480", ttl=1).register()
    await agent(keyspace, stores[1], "10.0.0.2:7480", ttl=1).register()
    assert await address_on_record(keyspace) == "10.0.0.2:7480"


async def test_the_record_carries_the_certificates_expiry_and_follows_a_renewal(
    keyspace: Keyspace, stores: tuple[VolumeStore, VolumeStore]
) -> None:
    expiry = [1_900_000_000.0]
    record = NodeInfo(name="n1", address="10.0.0.1:7480", pool="p", free_bytes=0, version="t")
    registration = Registration(keyspace, record, 3, stores[0], cert_not_after=lambda: expiry[0])
    await registration.register()

    async def on_record() -> float:
        found = await keyspace.get_node("n1")
        assert found is not None
        return found.value.cert_not_after

    assert await on_record() == 1_900_000_000.0
    alive = asyncio.create_task(registration.keep_alive(lambda: None))
    try:
        expiry[0] = 1_930_000_000.0  # renewed
        deadline = time.monotonic() + 10
        while await on_record() != 1_930_000_000.0:
            assert time.monotonic() < deadline, "the renewed expiry never reached the record"
            await asyncio.sleep(0.2)
    finally:
        alive.cancel()


async def test_a_node_without_its_etcd_user_is_told_how_to_give_it_one(
    etcd: EtcdServer, certs: ClusterCerts, stores: tuple[VolumeStore, VolumeStore]
) -> None:
    client = etcd.client(certs.issue("node", "rg-stranger"))
    try:
        record = NodeInfo(
            name="rg-stranger", address="10.0.0.9:7480", pool="p", free_bytes=0, version="t"
        )
        stranger = Registration(Keyspace(client), record, 3, stores[0])
        with pytest.raises(NodeNotAuthorized, match="run ferry-etcd-bootstrap --node rg-stranger"):
            await stranger.register()
    finally:
        await client.close()
    root = etcd.client()
    try:
        assert await Keyspace(root).get_node("rg-stranger") is None
    finally:
        await root.close()


async def test_a_node_is_on_record_as_seen_from_its_registration_before_any_renewal(
    keyspace: Keyspace, stores: tuple[VolumeStore, VolumeStore]
) -> None:
    """A node lost before its first renewal (a third of its TTL) must still say when it was
    last seen: a failover tells from it how long the lost owner ran after the snapshot."""
    before = time.time()
    await agent(keyspace, stores[0], "10.0.0.1:7480", ttl=30).register()
    seen = await keyspace.get_seen("n1")
    assert seen is not None, "no seen/<node> record until the first renewal"
    assert seen.at >= before
