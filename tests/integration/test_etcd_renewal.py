"""A node's renewed certificate reaches its etcd client without a restart, on real etcd: once
the old certificate has expired, a reconnect (etcd restarted) still renews the node's lease."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import aetcd
import pytest

from ferry.cluster.etcd_tls import follow_renewals
from ferry.cluster.keyspace import Keyspace, endpoints_client
from ferry.core.records import NodeInfo
from ferry.security import ca
from ferry.security.certificates import CertificateWatch, not_after
from tests.support.etcd import EtcdServer, register_node

pytestmark = pytest.mark.integration

NODE = "ct-renewing"
SHORT_SECONDS = 20.0
LEASE_TTL = 60
RECONNECT_SECONDS = 30.0


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer(nodes=(NODE,)) as server:
        yield server


async def lease_renews(keyspace: Keyspace, lease: aetcd.Lease, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if await asyncio.wait_for(keyspace.refresh_lease(lease), 5) > 0:
                return True
        await asyncio.sleep(0.5)
    return False


async def test_after_renewal_and_expiry_of_the_old_certificate_the_lease_still_renews(
    etcd: EtcdServer,
) -> None:
    directory = etcd.certs.directory
    ca.issue(directory, "node", NODE, valid_days=SHORT_SECONDS / 86400)
    files = etcd.certs.files(NODE)
    expires = not_after(files.cert.read_bytes())
    certificates = CertificateWatch(files)
    client = endpoints_client([etcd.endpoint], certificates)
    keyspace = Keyspace(client)
    following = asyncio.create_task(follow_renewals(client, every=0.2))
    try:
        lease = await register_node(keyspace, NodeInfo(NODE, "127.0.0.1:1", "p", 1, "t"), LEASE_TTL)
        ca.issue(directory, "node", NODE)  # renewed in place: the same paths
        for _ in range(50):
            if certificates.generation:
                break
            await asyncio.sleep(0.2)
        assert certificates.generation, "the renewal was not taken"
        await asyncio.sleep(max(expires - time.time(), 0) + 1)
        await asyncio.to_thread(etcd.restart)  # every connection is made anew
        assert await lease_renews(keyspace, lease, RECONNECT_SECONDS), (
            "the lease could not be renewed after a reconnect: the old certificate is in use"
        )
        assert await keyspace.get_node(NODE) is not None
    finally:
        following.cancel()
        await client.close()
