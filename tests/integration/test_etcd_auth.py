"""ferry-etcd-bootstrap on a real etcd: run again, it adds nodes and keeps the others;
only etcd's root may run it once auth is on."""

from __future__ import annotations

import asyncio

import pytest
from aetcd.exceptions import ClientError

from control import etcd_auth
from control.keyspace import Keyspace
from tests.support.etcd import ClusterCerts, EtcdServer

pytestmark = pytest.mark.integration


async def writes_own_state(etcd: EtcdServer, certs: ClusterCerts, node: str) -> bool:
    client = etcd.client(certs.issue("node", node))
    try:
        await Keyspace(client).delete_state(node, "ct-nothing")
        return True
    except ClientError as error:
        assert "permission denied" in str(error) or "user name is empty" in str(error), error
        return False
    finally:
        await client.close()


async def test_a_node_added_later_gets_its_user_and_the_earlier_keep_theirs(
    etcd: EtcdServer, certs: ClusterCerts
) -> None:
    assert not await writes_own_state(etcd, certs, "ct-late")
    await asyncio.to_thread(etcd.bootstrap, ("ct-early",))
    await asyncio.to_thread(etcd.bootstrap, ("ct-late",))
    assert await writes_own_state(etcd, certs, "ct-early")
    assert await writes_own_state(etcd, certs, "ct-late")


async def test_only_etcds_root_runs_the_bootstrap_once_auth_is_on(
    etcd: EtcdServer, certs: ClusterCerts
) -> None:
    client = etcd.client(certs.control)
    try:
        with pytest.raises(etcd_auth.BootstrapError, match="etcd-root"):
            await etcd_auth.bootstrap(client, "/ferry/v1", ["ct-sneaky"])
    finally:
        await client.close()
    assert not await writes_own_state(etcd, certs, "ct-sneaky")
