"""The Docker volume plugin through the docker CLI: bad input is refused and changes nothing."""

from __future__ import annotations

import asyncio
import datetime
import json
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.agent import plugin_call
from tests.support.cluster import Cluster, ClusterHost
from tests.support.volumes import dataset_mounted, wait_for

pytestmark = pytest.mark.cluster

TOOLBOX = "ferry/toolbox"


def docker_host(cluster: Cluster) -> ClusterHost:
    host = cluster.hosts[0]
    if not host.docker_host:
        pytest.skip("this cluster runs no dockerd per host (FERRY_CLUSTER_DOCKER=0)")
    return host


def load_toolbox(host: ClusterHost) -> None:
    assert host.docker_host
    subprocess.run(
        ["deploy/images/build.sh", "--docker-host", host.docker_host, TOOLBOX],
        check=True,
        capture_output=True,
    )


def volume_names(cluster: Cluster) -> set[str]:
    listed = json.loads(cluster.ferryctl(["volume", "list", "-o", "json"]).stdout)
    return {v["name"] for v in listed}


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (["-o", "size=lots"], "invalid size"),
        (["-o", "size=-5G"], "invalid size"),
        (["-o", "size=1"], "below the smallest volume, 1M"),
        (["-o", "colour=blue"], "unknown option"),
        (["-o", "compression=zstd-max"], "invalid compression"),
        (["-o", "node=nowhere"], "unknown or down"),
        (["-o", "failover=sometimes"], "invalid failover"),
        (["-o", "failover_after=3"], "shorter than the fencing bound"),
        (["-o", "failover_after=soon"], "not a number of seconds"),
    ],
)
def test_bad_create_options_are_refused_and_nothing_is_created(
    cluster: Cluster, opts: list[str], message: str
) -> None:
    host = docker_host(cluster)
    name = f"bad-{secrets.token_hex(3)}"
    result = cluster.docker(host, ["volume", "create", "-d", "ferry", *opts, name], check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert name not in volume_names(cluster)


def test_a_volume_created_from_docker_can_fail_over_by_itself(cluster: Cluster) -> None:
    host = docker_host(cluster)
    name = f"auto-{secrets.token_hex(3)}"
    opts = ["-o", "failover=auto", "-o", "failover_after=45"]
    cluster.docker(host, ["volume", "create", "-d", "ferry", *opts, name])
    try:
        got = cluster.volume(name)
        assert (got["failover"], got["failover_after"]) == ("auto", 45.0)
    finally:
        cluster.ferryctl(["volume", "delete", name], check=False)


def test_an_invalid_volume_name_is_refused(cluster: Cluster) -> None:
    host = docker_host(cluster)
    too_long = "v" * 70  # Docker takes it; a Ferry volume name has at most 64 characters
    result = cluster.docker(host, ["volume", "create", "-d", "ferry", too_long], check=False)
    assert result.returncode != 0
    assert "Invalid volume name" in result.stderr
    assert too_long not in volume_names(cluster)


def test_volumes_show_their_owner_and_remove_waits_for_containers(cluster: Cluster) -> None:
    host = docker_host(cluster)
    load_toolbox(host)
    name = f"dk-{secrets.token_hex(3)}"
    before = time.time()
    cluster.docker(host, ["volume", "create", "-d", "ferry", "-o", "size=256M", name])
    inspected = json.loads(cluster.docker(host, ["volume", "inspect", name]).stdout)[0]
    assert inspected["Driver"] == "ferry"
    created = datetime.datetime.fromisoformat(inspected["CreatedAt"]).timestamp()
    assert before - 5 <= created <= time.time() + 5, inspected["CreatedAt"]
    assert inspected["Mountpoint"] == ""  # no container uses it yet
    container = f"c-{name}"
    cluster.docker(
        host,
        ["run", "-d", "--name", container, "--network", "none", "-v", f"{name}:/data",
         TOOLBOX, "sh", "-c", "echo kept > /data/file && sleep 300"],
    )  # fmt: skip
    inspected = json.loads(cluster.docker(host, ["volume", "inspect", name]).stdout)[0]
    assert inspected["Mountpoint"] == f"{host.mount_root}/{name}"
    status = inspected["Status"]
    assert status["owner"] == host.name and status["epoch"] == 1
    # Docker refuses by itself while one of its containers uses the volume; Ferry's own
    # refusal (what protects a volume a container on another host mounts) is asked for
    # on the plugin's socket, as a dockerd that did not know of the container would.
    refused = cluster.docker(host, ["volume", "rm", name], check=False)
    assert refused.returncode != 0 and "volume is in use" in refused.stderr
    assert host.plugin_socket
    removed = asyncio.run(
        plugin_call(Path(host.plugin_socket), "/VolumeDriver.Remove", {"Name": name})
    )
    assert removed["Err"] == (
        f"volume {name} is mounted on {host.name}; stop its containers or delete with --force"
    )
    assert name in volume_names(cluster)
    assert cluster.docker(host, ["exec", container, "cat", "/data/file"]).stdout == "kept\n"
    cluster.docker(host, ["rm", "-f", container])
    wait_for(
        "the dataset unmounted after the container's Unmount",
        lambda: not dataset_mounted(cluster, host, name),
        timeout=60,
    )
    inspected = json.loads(cluster.docker(host, ["volume", "inspect", name]).stdout)[0]
    assert inspected["Mountpoint"] == ""
    cluster.docker(host, ["volume", "rm", name])
    assert name not in volume_names(cluster)


def test_mounting_a_deleted_volume_is_refused_clearly(cluster: Cluster) -> None:
    """While its data is being destroyed (its owner's agent is down here, to hold that moment)."""
    host, other = docker_host(cluster), cluster.hosts[1]
    if not other.docker_host:
        pytest.skip("needs a dockerd on a second host")
    load_toolbox(other)
    name = f"del-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", name, "--size", "256M", "--node", host.name])
    cluster.agent(host.name, "stop")
    try:
        cluster.ferryctl(["volume", "delete", name])
        result = cluster.docker(
            other,
            ["run", "--rm", "--network", "none", "--volume-driver", "ferry",
             "-v", f"{name}:/data", TOOLBOX, "true"],
            check=False,
        )  # fmt: skip
    finally:
        cluster.agent(host.name, "start")
    assert result.returncode != 0
    assert "was deleted" in result.stderr


def test_the_plugin_asks_control_with_its_node_certificate_and_removes_only_its_own(
    cluster: Cluster,
) -> None:
    """Docker's create reaches ferry-control as the node; a ferryctl volume stays on rm."""
    host = docker_host(cluster)
    if cluster.insecure:
        pytest.skip("the cluster runs without TLS: no caller is authorized or named")
    made_by_docker = f"az-dk-{secrets.token_hex(3)}"
    cluster.docker(host, ["volume", "create", "-d", "ferry", "-o", "size=64M", made_by_docker])
    control_log = Path(str(cluster.logs["control"])).read_text()
    assert (
        f"call: caller={host.name} kind=node method=ferry.v1.Control/CreateVolume "
        f"volume={made_by_docker}"
    ) in control_log
    made_by_ferryctl = f"az-ctl-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", made_by_ferryctl, "--size", "64M", "--node", host.name])
    refused = cluster.docker(host, ["volume", "rm", made_by_ferryctl], check=False)
    assert refused.returncode != 0
    assert f"delete it with 'ferryctl volume delete {made_by_ferryctl}'" in refused.stderr
    assert made_by_ferryctl in volume_names(cluster)
    cluster.ferryctl(["volume", "delete", made_by_ferryctl])
    cluster.docker(host, ["volume", "rm", made_by_docker])
    assert not {made_by_docker, made_by_ferryctl} & volume_names(cluster)
