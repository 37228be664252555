"""A volume deleted while a host was down, then created again under the same name.

The host comes back still holding the old volume's dataset. The new volume
must start empty there, and the old data must be kept aside, not adopted
and not destroyed.
"""

from __future__ import annotations

import asyncio
import secrets

import pytest

from ferry.cluster.keyspace import Keyspace
from tests.support.cluster import Cluster, ClusterHost
from tests.support.volumes import used_on, wait_for, writable_copies

pytestmark = pytest.mark.cluster


def test_a_new_volume_never_adopts_a_deleted_namesakes_leftover(cluster: Cluster) -> None:
    host = cluster.hosts[0]
    name = f"ns-{secrets.token_hex(3)}"
    create = ["volume", "create", name, "--size", "64M", "--node", host.name]
    cluster.ferryctl(create)
    wait_for(f"{name} owned on {host.name}", lambda: owned_here(cluster, host, name))
    with used_on(cluster, host, name) as where:
        cluster.run(host, ["sh", "-c", f"echo old-volume > {where}/old"])

    cluster.agent(host.name, "stop")
    try:
        cluster.ferryctl(["volume", "delete", name, "--force"])
        wait_for(
            f"{name} purged while {host.name} is down",
            lambda: not stored(cluster, name),
            timeout=90,
        )
    finally:
        cluster.agent(host.name, "start")
    wait_for(
        f"{name} created again once {host.name} is back",
        lambda: cluster.ferryctl(create, check=False).returncode == 0,
    )
    try:
        # First the old dataset goes aside: until then it sits where the new volume will
        # be, and a listing taken then would see the old data whoever is right.
        wait_for(
            f"the old data listed as a copy of {name} kept aside on {host.name}",
            lambda: any(
                c["node"] == host.name and c["dataset"].startswith(f"{host.pool}/ferry-aside/")
                for c in cluster.volume(name)["diverged"]
            ),
        )
        wait_for(f"new {name} owned on {host.name}", lambda: owned_here(cluster, host, name))
        with used_on(cluster, host, name) as where:
            listing = cluster.run(host, ["ls", "-A", where]).stdout.split()
        assert "old" not in listing, "the new volume adopted the deleted volume's data"
    finally:
        cluster.ferryctl(["volume", "delete", name, "--force"], check=False)


def owned_here(cluster: Cluster, host: ClusterHost, name: str) -> bool:
    """The host's copy is the volume's writable one (mounted only while used)."""
    return writable_copies(cluster, name) == [host.name]


def stored(cluster: Cluster, name: str) -> bool:
    """Whether etcd still holds the volume's spec (a deleted one stays until purged)."""

    async def read() -> bool:
        client = cluster.etcd_client()
        try:
            return await Keyspace(client).get_volume(name) is not None
        finally:
            await client.close()

    return asyncio.run(read())
