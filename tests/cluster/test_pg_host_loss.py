"""The loss users give Ferry replicas for: PostgreSQL's host dies while it commits, and the
database comes back on the replica's host with what the RPO promised."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.support.cluster import Cluster
from tests.support.containers import docker_hosts
from tests.support.migration import load_image
from tests.support.pgfailover import create_replicated, lose_owner_while_writing

pytestmark = pytest.mark.cluster

RPO = 15


@pytest.fixture
def volume(three_hosts: Cluster) -> Iterator[str]:
    name = f"pl-{secrets.token_hex(3)}"
    yield name
    three_hosts.ferryctl(["volume", "delete", name, "--force"], check=False)


@pytest.mark.parametrize("mode", ["manual", "auto"])
def test_postgres_comes_back_on_the_replica_with_the_rows_the_rpo_promised(
    three_hosts: Cluster, volume: str, mode: str
) -> None:
    cluster = three_hosts
    owner, _ = docker_hosts(cluster)
    for host in cluster.hosts:
        load_image(host)
    replica = cluster.host(create_replicated(cluster, volume, owner, RPO, mode))
    lines: list[str] = []
    result = lose_owner_while_writing(
        cluster, volume, owner, replica, RPO, mode, report=lines.append
    )
    print("\n".join(lines))
    assert result.rows_before_snapshot > 0, "no row committed before the replicated snapshot"
    # verify() in the scenario raised already if one of those is missing or differs.
    assert result.rows_found >= result.rows_before_snapshot
    assert result.unexpected_rows == (), "rows that were never committed"
    assert result.rows_lost < result.rows_in_last_rpo
    assert result.lag_seconds < RPO
    assert result.recovery_problems == ()
    if mode == "manual":
        assert f"writes on {owner.name} after" in result.loss_message, result.loss_message
    assert cluster.volume(volume)["owner"] == replica.name
