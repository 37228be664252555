"""ferry-etcd-bootstrap on a real etcd: run again, it adds nodes and keeps the others,
and takes back a right the table does not list; only etcd's root may run it once auth is on."""

from __future__ import annotations

import asyncio

import pytest
from aetcd import rpc
from aetcd.exceptions import ClientError

from control import etcd_auth
from ferry.cluster.keyspace import Keyspace, grant_range
from tests.support.etcd import ClusterCerts, EtcdServer

pytestmark = pytest.mark.integration


async def writes_own_state(
    etcd: EtcdServer, certs: ClusterCerts, node: str, other: str = ""
) -> bool:
    """Whether ``node``'s etcd user may remove a state key of its own (or of ``other``)."""
    client = etcd.client(certs.issue("node", node))
    try:
        await Keyspace(client).delete_state(other or node, "ct-nothing")
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


async def test_a_right_not_in_the_table_is_revoked_by_the_next_bootstrap(
    etcd: EtcdServer, certs: ClusterCerts
) -> None:
    await asyncio.to_thread(etcd.bootstrap, ("ct-widened",))
    everything = grant_range("/ferry/v1")
    root = etcd.client()
    try:
        await root.connect()
        await rpc.AuthStub(root.channel).RoleGrantPermission(
            rpc.AuthRoleGrantPermissionRequest(
                name=etcd_auth.node_role("ct-widened"),
                perm=rpc.Permission(
                    permType=etcd_auth.WRITE, key=everything.key, range_end=everything.range_end
                ),
            ),
            timeout=10,
        )
    finally:
        await root.close()
    assert await writes_own_state(etcd, certs, "ct-widened", other="ct-someone")
    await asyncio.to_thread(etcd.bootstrap, ("ct-widened",))
    assert not await writes_own_state(etcd, certs, "ct-widened", other="ct-someone")
    assert await writes_own_state(etcd, certs, "ct-widened")
