"""A volume's dataset is mounted on its owner only while something uses it.

Through Docker on the first host: a created volume is not mounted until a container
uses it, and is unmounted after the container stops (Docker's Unmount). An unmounted
volume moves (snapshots and streams need no mount) and is not mounted on its new owner
until something uses it there; the data the container wrote and synced is intact
throughout.
"""

from __future__ import annotations

import json
import secrets

import pytest

from tests.support.cluster import Cluster, ClusterHost
from tests.support.containers import TOOLBOX, docker_hosts
from tests.support.volumes import dataset_mounted, used_on, wait_for, writable_copies

pytestmark = pytest.mark.cluster

DATA_MIB = 8


def inspected_mountpoint(cluster: Cluster, host: ClusterHost, name: str) -> str:
    return str(
        json.loads(cluster.docker(host, ["volume", "inspect", name]).stdout)[0]["Mountpoint"]
    )


def test_mounted_while_a_container_uses_it_unmounted_after_and_moved_unmounted(
    cluster: Cluster,
) -> None:
    host, other = docker_hosts(cluster)
    name = f"mw-{secrets.token_hex(3)}"
    container = f"c-{name}"
    cluster.docker(host, ["volume", "create", "-d", "ferry", "-o", "size=256M", name])
    try:
        wait_for(
            "the volume owned on its host", lambda: writable_copies(cluster, name) == [host.name]
        )
        assert not dataset_mounted(cluster, host, name), "mounted before anything used it"
        assert inspected_mountpoint(cluster, host, name) == ""

        cluster.docker(
            host,
            ["run", "-d", "--name", container, "--network", "none", "-v", f"{name}:/data",
             TOOLBOX, "sh", "-c",
             f"head -c {DATA_MIB << 20} /dev/urandom > /data/file"
             " && sha256sum /data/file > /data/sum && sync && exec sleep 300"],
        )  # fmt: skip
        assert dataset_mounted(cluster, host, name), cluster.docker(
            host, ["logs", container]
        ).stderr
        assert inspected_mountpoint(cluster, host, name) == f"{host.mount_root}/{name}"
        wait_for(
            "the container's synced write",
            lambda: (
                cluster.docker(host, ["exec", container, "cat", "/data/sum"], check=False).stdout
            ),
        )
        written = cluster.docker(host, ["exec", container, "cat", "/data/sum"]).stdout.split()[0]

        cluster.docker(host, ["stop", "-t", "1", container])
        wait_for(
            "the dataset unmounted after the container's Unmount",
            lambda: not dataset_mounted(cluster, host, name),
            timeout=60,
        )
        assert inspected_mountpoint(cluster, host, name) == ""
        assert cluster.volume(name)["mounted_on"] == []

        cluster.ferryctl(["volume", "move", name, other.name])
        wait_for("the move to finish", lambda: cluster.volume(name)["owner"] == other.name, 180)
        wait_for(
            "the new owner to serve it", lambda: writable_copies(cluster, name) == [other.name]
        )
        assert not dataset_mounted(cluster, other, name), "mounted on the target before any use"
        assert not dataset_mounted(cluster, host, name)

        with used_on(cluster, other, name) as where:
            assert dataset_mounted(cluster, other, name)
            summed = cluster.run(other, ["sha256sum", f"{where}/file"]).stdout.split()[0]
            recorded = cluster.run(other, ["cat", f"{where}/sum"]).stdout.split()[0]
        assert summed == recorded == written, "the container's synced data changed"
        wait_for(
            "the target's dataset unmounted after its last Unmount",
            lambda: not dataset_mounted(cluster, other, name),
            timeout=60,
        )
    finally:
        cluster.docker(host, ["rm", "-f", container], check=False)
        cluster.ferryctl(["volume", "delete", name], check=False)
