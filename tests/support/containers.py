"""Containers that write into Ferry volumes on a cluster's hosts, and what they acknowledged."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support.cluster import Cluster, ClusterHost
from tests.support.volumes import wait_for
from tests.support.writer import acknowledged

TOOLBOX = "ferry/toolbox"
# busybox sh: `sync FILE` fsyncs the file; "ok N" is printed only after it returned.
WRITER = (
    "i=0; while :; do "
    'if echo "line $i" >> {log} && sync {log}; then echo "ok $i"; fi; '
    "i=$((i+1)); sleep 0.05; done"
)


def docker_hosts(cluster: Cluster) -> tuple[ClusterHost, ClusterHost]:
    if cluster.kind != "local":
        pytest.skip("kills and restarts local-cluster agents and etcd")
    a, b = cluster.hosts[0], cluster.hosts[1]
    if not (a.docker_host and b.docker_host):
        pytest.skip("this cluster runs no dockerd per host (FERRY_CLUSTER_DOCKER=0)")
    for host in (a, b):
        assert host.docker_host
        subprocess.run(
            ["deploy/images/build.sh", "--docker-host", host.docker_host, TOOLBOX],
            check=True,
            capture_output=True,
        )
    return a, b


@contextmanager
def container_writing(cluster: Cluster, host: ClusterHost, volume: str) -> Iterator[str]:
    name = f"w-{volume}"
    cluster.docker(
        host,
        ["run", "-d", "--name", name, "--network", "none", "--volume-driver", "ferry",
         "-v", f"{volume}:/data", TOOLBOX, "sh", "-c", WRITER.format(log="/data/log")],
    )  # fmt: skip
    try:
        wait_for("the writer to start", lambda: len(logs(cluster, host, name)) > 10)
        yield name
    finally:
        cluster.docker(host, ["rm", "-f", name], check=False)


def logs(cluster: Cluster, host: ClusterHost, container: str) -> set[int]:
    return acknowledged(cluster.docker(host, ["logs", container], check=False).stdout)
