"""The database migration users came for: PostgreSQL moves hosts with every committed row."""

from __future__ import annotations

import secrets

import pytest

from tests.support.cluster import Cluster
from tests.support.migration import load_image, migrate

pytestmark = pytest.mark.cluster


def test_postgres_moves_to_another_host_with_every_committed_row(cluster: Cluster) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    if not (a.docker_host and b.docker_host):
        pytest.skip("this cluster runs no dockerd per host (FERRY_CLUSTER_DOCKER=0)")
    for host in (a, b):
        load_image(host, cluster.seconds(1800))
    volume = f"pg-{secrets.token_hex(3)}"
    lines: list[str] = []
    result = migrate(cluster, volume, a, b, report=lines.append)
    print("\n".join(lines))
    assert result.rows_found == result.rows_committed > 2000
    assert result.checksum_found == result.checksum_committed
    assert result.recovery_problems == ()
    assert result.precopied_bytes > 0, "pre-copy must happen while the database runs"
    cluster.ferryctl(["volume", "delete", volume])
