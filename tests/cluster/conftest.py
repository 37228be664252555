"""The cluster every test in tests/cluster runs against.

FERRY_CLUSTER_FILE=PATH uses an already running cluster described by that file
(a Vagrant cluster, or a local one brought up by hand). Otherwise a local netns
cluster is brought up once per session with deploy/local-cluster and taken down
at the end; FERRY_CLUSTER_HOSTS (default 2), FERRY_CLUSTER_DOCKER (default 1)
and FERRY_CLUSTER_AGENTS (default 1; 0 runs hosts, pools, etcd and dockerd only)
shape it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferry.localcluster.description import ClusterDescription
from tests.support.cluster import Cluster, local_cluster

NOT_ROOT_REASON = (
    "a local cluster needs root (network namespaces, zpools, dockerd); run as root, "
    "or set FERRY_CLUSTER_FILE to the description file of a running cluster"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A described cluster slower than hosts of their own (``time_scale``) gets each of its
    tests' time limits (pytest-timeout's, from pyproject.toml or a marker) stretched alike."""
    described = os.environ.get("FERRY_CLUSTER_FILE")
    if not described:
        return
    scale = ClusterDescription.load(Path(described)).time_scale
    here = Path(__file__).parent
    for item in items:
        if scale == 1.0 or here not in item.path.parents:
            continue
        marker = item.get_closest_marker("timeout")
        limit = float(marker.args[0]) if marker and marker.args else float(config.getini("timeout"))
        item.add_marker(pytest.mark.timeout(limit * scale))


def requires_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(NOT_ROOT_REASON)


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value not in ("0", "no", "false", "")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    described = os.environ.get("FERRY_CLUSTER_FILE")
    if described:
        yield Cluster.load(Path(described))
        return
    requires_root()
    with local_cluster(
        f"lc{os.getpid() % 1_000_000}",
        hosts=int(os.environ.get("FERRY_CLUSTER_HOSTS", "2")),
        docker=env_flag("FERRY_CLUSTER_DOCKER", True),
        agents=env_flag("FERRY_CLUSTER_AGENTS", True),
    ) as running:
        yield running


@pytest.fixture(scope="session")
def three_hosts(cluster: Cluster) -> Iterator[Cluster]:
    """The session's cluster when it has 3 hosts, else one of 3 hosts (with dockerd as the
    session's has) kept for the rest of the session: a replica placed anew needs a node
    that is neither the owner nor the lost one, and a failover with 2 replicas 3 nodes."""
    if len(cluster.hosts) >= 3:
        yield cluster
        return
    requires_root()
    with local_cluster(
        f"lr{os.getpid() % 1_000_000}",
        hosts=3,
        docker=bool(cluster.hosts[0].docker_host),
    ) as own:
        yield own
