"""The managed (v2) Docker plugin, built by deploy/docker-plugin/build.sh and enabled in
each host's dockerd: a volume is created, written, moved and removed through it."""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster, ClusterHost

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "deploy" / "docker-plugin" / "build.sh"
PLUGIN = "ferry/ferry:latest"
TOOLBOX = "ferry/toolbox"
BUILD_TIMEOUT_SECONDS = 1800
MOVE_DEADLINE_SECONDS = 300


def install_plugin(host: ClusterHost) -> None:
    """build.sh (its root filesystem cached after the first build) into the host's dockerd,
    forwarding to the host's agent socket and mount root as the description states them."""
    assert host.docker_host and host.plugin_socket and host.mount_root
    for command in (
        [str(BUILD), "--docker-host", host.docker_host, "--name", PLUGIN,
         "--agent-socket-dir", str(Path(host.plugin_socket).parent),
         "--agent-mount-root", host.mount_root],
        [str(REPO / "deploy/images/build.sh"), "--docker-host", host.docker_host, TOOLBOX],
    ):  # fmt: skip
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS, check=False
        )
        assert result.returncode == 0, f"{command[0]} failed:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def plugin_hosts(cluster: Cluster) -> Iterator[tuple[ClusterHost, ClusterHost]]:
    hosts = [h for h in cluster.hosts if h.docker_host and h.plugin_socket and h.mount_root]
    if cluster.kind != "local" or len(hosts) < 2:
        pytest.skip("needs a local cluster with a dockerd on two hosts (FERRY_CLUSTER_DOCKER=1)")
    for host in hosts[:2]:
        install_plugin(host)
    try:
        yield hosts[0], hosts[1]
    finally:
        for host in hosts[:2]:
            cluster.docker(host, ["plugin", "rm", "--force", PLUGIN], check=False)


def run_toolbox(cluster: Cluster, host: ClusterHost, volume: str, script: str) -> str:
    """A container with the volume; retried while the Mount waits for a move to this host
    (the plugin answers "not ready" within Docker's 30 s for a call; a move may take longer)."""
    deadline = time.monotonic() + MOVE_DEADLINE_SECONDS
    while True:
        result = cluster.docker(
            host,
            ["run", "--rm", "--network", "none", "--volume-driver", PLUGIN,
             "-v", f"{volume}:/data", TOOLBOX, "sh", "-c", script],
            check=False,
        )  # fmt: skip
        if result.returncode == 0:
            return result.stdout
        waiting = "not ready on this host yet" in result.stderr or "still moving" in result.stderr
        assert waiting and time.monotonic() < deadline, result.stderr
        time.sleep(2)


def test_a_volume_is_created_written_moved_and_removed_through_the_managed_plugin(
    cluster: Cluster, plugin_hosts: tuple[ClusterHost, ClusterHost]
) -> None:
    first, second = plugin_hosts
    plugins = json.loads(cluster.docker(first, ["plugin", "inspect", PLUGIN]).stdout)
    assert plugins[0]["Enabled"] is True
    name = f"mp-{secrets.token_hex(3)}"
    cluster.docker(first, ["volume", "create", "-d", PLUGIN, "-o", "size=256M", name])
    inspected = json.loads(cluster.docker(first, ["volume", "inspect", name]).stdout)[0]
    assert inspected["Driver"] == PLUGIN
    assert cluster.volume(name)["owner"] == first.name

    run_toolbox(cluster, first, name, "echo written-on-first > /data/file && sync")
    assert run_toolbox(cluster, second, name, "cat /data/file").strip() == "written-on-first"
    assert cluster.volume(name)["owner"] == second.name

    cluster.docker(first, ["volume", "rm", name])
    listed = json.loads(cluster.ferryctl(["volume", "list", "-o", "json"]).stdout)
    assert name not in {v["name"] for v in listed}
    cluster.docker(second, ["volume", "rm", name], check=False)
