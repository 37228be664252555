"""Placement sees the space volumes use: a node's record follows its pool's free space."""

from __future__ import annotations

import json
import secrets

import pytest

from tests.support.cluster import Cluster
from tests.support.volumes import MIB, mountpoint, wait_for, write_random_on

pytestmark = pytest.mark.cluster


def free_bytes(cluster: Cluster, node: str) -> int:
    nodes = json.loads(cluster.ferryctl(["node", "list", "-o", "json"]).stdout)
    return int(next(n["free_bytes"] for n in nodes if n["name"] == node))


def test_written_data_lowers_the_free_space_that_creates_are_checked_against(
    cluster: Cluster,
) -> None:
    host = cluster.hosts[0]
    name = f"sp-{secrets.token_hex(3)}"
    before = free_bytes(cluster, host.name)
    cluster.ferryctl(["volume", "create", name, "--size", "1G", "--node", host.name])
    try:
        wait_for(f"{name} owned by {host.name}", lambda: cluster.volume(name)["owner"] == host.name)
        write_random_on(cluster, host, f"{mountpoint(host, name)}/data", 96)
        wait_for(
            f"{host.name}'s free space on record to drop by the 96 MiB written",
            lambda: free_bytes(cluster, host.name) <= before - 64 * MIB,
        )
        too_big = free_bytes(cluster, host.name) + 32 * MIB
        assert too_big < before, "the refused size must have fitted before the write"
        refused = cluster.ferryctl(
            ["volume", "create", f"{name}x", "--size", str(too_big), "--node", host.name],
            check=False,
        )
        assert refused.returncode != 0
        assert f"more than node {host.name} has free" in refused.stderr
    finally:
        cluster.ferryctl(["volume", "delete", name, "--force"], check=False)
