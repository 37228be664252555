"""aetcd against a real etcd with the installed grpcio and protobuf: the calls Ferry relies on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aetcd
import pytest

from tests.support.etcd import ClusterCerts, EtcdServer

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(etcd: EtcdServer) -> AsyncIterator[aetcd.Client]:
    client = etcd.client()
    try:
        yield client
    finally:
        await client.close()


async def test_put_then_get_prefix_returns_every_key_under_it(client: aetcd.Client) -> None:
    await client.put(b"/ct/a/1", b"one")
    await client.put(b"/ct/a/2", b"two")
    await client.put(b"/ct/b/1", b"other")
    found = await client.get_prefix(b"/ct/a/")
    assert sorted((kv.key, kv.value) for kv in found) == [
        (b"/ct/a/1", b"one"),
        (b"/ct/a/2", b"two"),
    ]


async def test_transaction_compares_mod_revision(client: aetcd.Client) -> None:
    await client.put(b"/ct/cas", b"v1")
    read = await client.get(b"/ct/cas")
    assert read is not None
    tx = client.transactions
    won, _ = await client.transaction(
        compare=[tx.mod(b"/ct/cas") == read.mod_revision],
        success=[tx.put(b"/ct/cas", b"v2")],
        failure=[],
    )
    lost, _ = await client.transaction(
        compare=[tx.mod(b"/ct/cas") == read.mod_revision],
        success=[tx.put(b"/ct/cas", b"v3")],
        failure=[],
    )
    assert (won, lost) == (True, False)
    after = await client.get(b"/ct/cas")
    assert after is not None and after.value == b"v2"


async def test_key_on_a_lease_disappears_when_the_lease_expires(client: aetcd.Client) -> None:
    lease = await client.lease(1)
    await client.put(b"/ct/leased", b"alive", lease=lease)
    assert await client.get(b"/ct/leased") is not None
    for _ in range(60):
        await asyncio.sleep(0.1)
        if await client.get(b"/ct/leased") is None:
            break
    assert await client.get(b"/ct/leased") is None


async def test_prefix_watch_sees_puts_and_deletes(client: aetcd.Client) -> None:
    watch = await client.watch_prefix(b"/ct/watched/")
    seen: list[tuple[str, bytes]] = []

    async def collect() -> None:
        async for event in watch:
            seen.append((str(event.kind), event.kv.key))
            if len(seen) == 2:
                return

    collector = asyncio.create_task(collect())
    await asyncio.sleep(0.2)
    await client.put(b"/ct/watched/x", b"1")
    await client.put(b"/ct/elsewhere", b"ignored")
    await client.delete(b"/ct/watched/x")
    try:
        await asyncio.wait_for(collector, timeout=10)
    finally:
        await watch.cancel()
    assert [key for _, key in seen] == [b"/ct/watched/x", b"/ct/watched/x"]
    assert "DELETE" in seen[1][0]
    assert "DELETE" not in seen[0][0]


async def test_a_client_answers_within_seconds_of_etcd_returning_from_a_long_outage(
    certs: ClusterCerts,
) -> None:
    """The channel redials etcd often enough that a long outage does not add a long wait:
    gRPC's default backoff (1 s growing 1.6x to 120 s) left control answering "cannot reach
    etcd" for several seconds after a 20 s outage had ended."""
    with EtcdServer(certs=certs) as server:
        client = server.client()
        try:
            await client.put(b"/ct/outage", b"before")
            server.kill()
            loop = asyncio.get_running_loop()
            outage_ends = loop.time() + 20
            while loop.time() < outage_ends:
                with contextlib.suppress(aetcd.exceptions.ConnectionFailedError):
                    await client.get(b"/ct/outage")
                await asyncio.sleep(0.5)
            server.start()
            healthy = loop.time()
            while True:
                try:
                    found = await client.get(b"/ct/outage")
                    break
                except aetcd.exceptions.ConnectionFailedError:
                    assert loop.time() - healthy < 3, "no answer 3 s after etcd was healthy"
                    await asyncio.sleep(0.1)
            assert found is not None and found.value == b"before"
        finally:
            await client.close()
