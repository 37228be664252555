"""Docker Swarm reschedules a PostgreSQL service and its Ferry volume follows.

These tests bring up their own small cluster (2 hosts, ``local-cluster up
--swarm``): the session cluster's dockerds form no swarm.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator

import pytest

from tests.cluster.conftest import requires_root
from tests.support.cluster import Cluster, local_cluster
from tests.support.migration import load_image
from tests.support.swarm import drain_moves_postgres, frozen_node_never_two_writers

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def swarm_cluster() -> Iterator[Cluster]:
    requires_root()
    with local_cluster(f"sw{os.getpid() % 1_000_000}", hosts=2, swarm=True) as running:
        for host in running.hosts:
            load_image(host)
        yield running


def test_swarm_nodes_carry_their_ferry_host_label_and_report_the_ferry_driver(
    swarm_cluster: Cluster,
) -> None:
    manager = swarm_cluster.host(swarm_cluster.swarm_manager or "")
    for host in swarm_cluster.hosts:
        node = swarm_cluster.docker(host, ["info", "--format", "{{.Swarm.NodeID}}"]).stdout.strip()
        inspect = ["node", "inspect", "--format", "{{json .}}", node]
        described = json.loads(swarm_cluster.docker(manager, inspect).stdout)
        assert described["Spec"]["Labels"]["ferry.host"] == host.name
        assert {"Type": "Volume", "Name": "ferry"} in described["Description"]["Engine"]["Plugins"]


def test_drained_node_s_postgres_service_restarts_elsewhere_with_every_committed_row(
    swarm_cluster: Cluster,
) -> None:
    lines: list[str] = []
    onto_fresh, onto_copy = drain_moves_postgres(
        swarm_cluster, f"pg-{secrets.token_hex(3)}", report=lines.append
    )
    print("\n".join(lines))
    print(
        f"reschedule (drain command to first query): onto a fresh node "
        f"{onto_fresh.reschedule_seconds:.2f}s, onto a node holding a copy "
        f"{onto_copy.reschedule_seconds:.2f}s"
    )
    assert (onto_fresh.old_host, onto_fresh.new_host) == ("host1", "host2")
    assert (onto_copy.old_host, onto_copy.new_host) == ("host2", "host1")
    for result in (onto_fresh, onto_copy):
        assert result.owner == result.new_host
        assert result.recovery_problems == ()
    assert onto_fresh.rows_found == onto_fresh.rows_committed >= 1000
    assert onto_copy.rows_found == onto_copy.rows_committed >= onto_fresh.rows_committed + 1000


@pytest.mark.slow
def test_frozen_node_s_container_keeps_the_volume_until_it_stops_then_the_replacement_gets_it(
    swarm_cluster: Cluster,
) -> None:
    """Run with FERRY_SLOW_TESTS=1 (about 3 minutes): never two writers, nothing lost."""
    lines: list[str] = []
    result = frozen_node_never_two_writers(
        swarm_cluster, f"pg-{secrets.token_hex(3)}", report=lines.append
    )
    print("\n".join(lines))
    print(f"move after the thaw (kill -CONT to first query): {result.move_seconds_after_thaw:.2f}s")
    assert result.owner == result.new_host == swarm_cluster.swarm_manager
    assert result.rows_found == result.rows_committed >= 500
    assert result.unacknowledged_rows_found > 100
