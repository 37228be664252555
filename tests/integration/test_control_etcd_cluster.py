"""Ferry against a three-member etcd cluster (client and peer mutual TLS, auth on):
losing the member in use loses nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from aetcd.exceptions import ClientError

from ferry.cluster.keyspace import Keyspace, endpoints_client
from ferry.core.records import VolumeSpec
from tests.support.etcd import EtcdCluster

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster(size=3) as members:
        yield members


def spec(name: str) -> VolumeSpec:
    return VolumeSpec(name=name, size_bytes=1 << 20, node="ct-n1")


@pytest.mark.parametrize("given_as", ["address", "name"])
async def test_the_keyspace_moves_to_another_member_when_the_first_dies(
    cluster: EtcdCluster, given_as: str
) -> None:
    endpoints = cluster.endpoints
    if given_as == "name":
        endpoints = [endpoint.replace("127.0.0.1", "localhost") for endpoint in endpoints]
    client = await asyncio.to_thread(endpoints_client, endpoints, cluster.certs.etcd_root)
    keyspace = Keyspace(client, prefix="/ct-cluster")
    try:
        await keyspace.create_volume(spec("before"))
        await asyncio.to_thread(cluster.members[0].kill)
        for _ in range(50):
            try:
                await keyspace.create_volume(spec("after"))
                break
            except ClientError:
                await asyncio.sleep(0.2)
        names = sorted(v.value.name for v in await keyspace.list_volumes())
        assert names == ["after", "before"]
    finally:
        await client.close()
