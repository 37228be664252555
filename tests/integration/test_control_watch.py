"""Keyspace watches on real etcd: replay from a revision, and what a caller sees when etcd goes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from aetcd.exceptions import ClientError

from ferry.cluster.keyspace import Change, Keyspace, Kind
from ferry.core.records import VolumeSpec
from tests.support.etcd import EtcdServer

pytestmark = pytest.mark.integration


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
async def keyspace(etcd: EtcdServer) -> AsyncIterator[Keyspace]:
    client = etcd.client()
    try:
        yield Keyspace(client, prefix="/ct-watch")
    finally:
        await client.close()


def spec(name: str) -> VolumeSpec:
    return VolumeSpec(name=name, size_bytes=1 << 20, node="ct-n1")


async def first(changes: AsyncIterator[Change]) -> Change:
    return await asyncio.wait_for(anext(changes), timeout=10)


async def test_a_watch_from_a_revision_replays_what_changed_since(keyspace: Keyspace) -> None:
    before = await keyspace.revision()
    await keyspace.create_volume(spec("early"))
    assert await keyspace.claim_owner("early", "ct-n1")
    changes = keyspace.watch(Kind.OWNERS, start_revision=before + 1)
    try:
        change = await first(changes)
    finally:
        await changes.aclose()
    assert (change.kind, change.name, change.deleted) == ("owners", "early", False)
    assert change.revision == before + 2


async def test_a_watch_from_now_sees_only_later_changes(keyspace: Keyspace) -> None:
    await keyspace.create_volume(spec("old"))
    changes = keyspace.watch(Kind.VOLUMES, start_revision=await keyspace.revision() + 1)
    try:
        await keyspace.create_volume(spec("new"))
        assert (await first(changes)).name == "new"
    finally:
        await changes.aclose()


async def test_a_watch_raises_when_etcd_stops_and_resumes_after_its_restart(
    etcd: EtcdServer, keyspace: Keyspace
) -> None:
    changes = keyspace.watch(Kind.VOLUMES, start_revision=await keyspace.revision() + 1)
    await keyspace.create_volume(spec("before"))
    seen = await first(changes)
    await asyncio.to_thread(etcd.restart)
    with pytest.raises(ClientError):
        await first(changes)
    await keyspace.create_volume(spec("during"))
    resumed = keyspace.watch(Kind.VOLUMES, start_revision=seen.revision + 1)
    try:
        assert (await first(resumed)).name == "during"
    finally:
        await resumed.aclose()
