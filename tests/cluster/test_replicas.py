"""Standing replicas on netns hosts: lag under the RPO with a steady writer, a move to a
replica's node that sends little, replication across an agent and an etcd restart, and a
replica whose node is lost placed anew (the old copy reconciled when the host returns).

Driven through ferryctl as an operator would; ``volume get -o json`` is the truth the
tests read (each copy's role, newest snapshot and lag; whether the volume meets its RPO).
"""

from __future__ import annotations

import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.cluster import REPO, Cluster, ClusterHost
from tests.support.volumes import mountpoint, used_on, wait_for, write_random_on

pytestmark = pytest.mark.cluster

RPO = 8
"""Seconds, on hosts of their own; ``rpo`` stretches it for the cluster."""


def rpo(cluster: Cluster) -> int:
    """The RPO the test volumes declare: replication runs on the cluster's hosts, so on
    slower ones (``time_scale``) the RPO they can meet is longer by as much."""
    return round(cluster.seconds(RPO))


@pytest.fixture
def volume(cluster: Cluster) -> Iterator[str]:
    name = f"rp-{secrets.token_hex(3)}"
    yield name
    cluster.ferryctl(["volume", "delete", name, "--force"], check=False)


def copies(cluster: Cluster, volume: str) -> dict[str, dict[str, Any]]:
    return {c["node"]: c for c in cluster.volume(volume)["copies"]}


def create_replicated(cluster: Cluster, volume: str, replicas: int = 1) -> tuple[str, list[str]]:
    """The volume on the first host with ``replicas`` replicas; returns owner and replicas."""
    owner = cluster.hosts[0].name
    cluster.ferryctl(
        [
            *("volume", "create", volume, "--size", "256M", "--node", owner),
            *("--replicas", str(replicas), "--rpo", f"{rpo(cluster)}s"),
            *("--replace-after", f"{round(cluster.seconds(10))}s"),
        ]
    )
    found = cluster.volume(volume)
    assert found["replicas"] == replicas and found["rpo_seconds"] == rpo(cluster)
    assert owner not in found["replica_nodes"]
    wait_for(
        "every replica to hold a copy and the volume to meet its RPO",
        lambda: cluster.volume(volume)["meets_rpo"],
        timeout=cluster.seconds(90),
    )
    return owner, list(found["replica_nodes"])


def writer(host: ClusterHost, path: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tests.support.writer", path, "--interval", "0.02"]
    return subprocess.Popen(
        [*host.run_prefix, *argv], stdout=subprocess.DEVNULL, text=True, cwd=REPO
    )


def sample_lags(cluster: Cluster, volume: str, replica: str, seconds: float) -> list[float]:
    lags = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        copy = copies(cluster, volume).get(replica)
        if copy is not None:
            lags.append(float(copy["lag_seconds"]))
        time.sleep(0.5)
    return lags


def test_replication_keeps_the_lag_under_the_rpo_with_a_steady_writer(
    cluster: Cluster, volume: str
) -> None:
    owner, (replica,) = create_replicated(cluster, volume)
    found = copies(cluster, volume)
    assert found[owner]["role"] == "owner" and found[replica]["role"] == "replica"
    with used_on(cluster, cluster.host(owner), volume) as where:
        running = writer(cluster.host(owner), f"{where}/log")
        try:
            lags = sample_lags(cluster, volume, replica, cluster.seconds(30))
        finally:
            running.kill()
            running.wait()
    p50, p99 = statistics.median(lags), sorted(lags)[int(len(lags) * 0.99) - 1]
    print(f"lag over {len(lags)} samples: p50 {p50:.1f}s p99 {p99:.1f}s rpo {rpo(cluster)}s")
    assert p99 < rpo(cluster)
    assert cluster.volume(volume)["meets_rpo"]


def test_a_move_to_a_replicas_node_sends_only_the_last_delta(cluster: Cluster, volume: str) -> None:
    owner, (replica,) = create_replicated(cluster, volume)
    path = mountpoint(cluster.host(owner), volume)
    write_random_on(cluster, cluster.host(owner), f"{path}/bulk", 64)
    written = time.time()
    wait_for(
        "the replica to hold the bulk",
        lambda: copies(cluster, volume).get(replica, {}).get("newest_snapshot_at", 0) > written,
        timeout=cluster.seconds(60),
    )
    started = time.monotonic()
    cluster.ferryctl(["volume", "move", volume, replica, "--wait"], timeout=120)
    took = time.monotonic() - started
    after = cluster.volume(volume)
    sent = int(after["move"]["bytes_sent"])
    print(f"move to the replica's node: {sent} bytes of 64 MiB written, {took:.1f}s")
    assert sent < 8 << 20
    assert after["owner"] == replica
    # Roles swapped: the old owner's copy is the replica now, and it is kept current.
    assert after["replica_nodes"] == [owner]
    wait_for(
        "the old owner to be a current replica",
        lambda: cluster.volume(volume)["meets_rpo"],
        cluster.seconds(60),
    )


def test_replication_goes_on_across_an_agent_restart_and_an_etcd_restart(
    cluster: Cluster, volume: str
) -> None:
    owner, (replica,) = create_replicated(cluster, volume)
    for role in (f"agent:{owner}", "etcd"):
        cluster.process(role, "kill")
        cluster.process(role, "start")
        restarted = time.time()
        wait_for(
            f"ferry-control to answer again after the {role} restart",
            lambda: cluster.ferryctl(["volume", "get", volume], check=False).returncode == 0,
            timeout=cluster.seconds(10),
        )
        wait_for(
            f"a snapshot newer than the {role} restart on the replica",
            lambda since=restarted: (
                copies(cluster, volume).get(replica, {}).get("newest_snapshot_at", 0) > since
            ),
            timeout=cluster.seconds(90),
        )
    wait_for(
        "the volume to meet its RPO",
        lambda: cluster.volume(volume)["meets_rpo"],
        cluster.seconds(60),
    )


@pytest.fixture
def volume_on_three(three_hosts: Cluster) -> Iterator[str]:
    name = f"rp-{secrets.token_hex(3)}"
    yield name
    three_hosts.ferryctl(["volume", "delete", name, "--force"], check=False)


def test_a_replica_whose_node_is_lost_is_placed_anew(
    three_hosts: Cluster, volume_on_three: str
) -> None:
    cluster, volume = three_hosts, volume_on_three
    owner, (lost,) = create_replicated(cluster, volume)
    cluster.agent(lost, "kill")
    try:
        wait_for(
            "control to place the replica on another node",
            lambda: cluster.volume(volume)["replica_nodes"] not in ([lost], []),
            timeout=cluster.seconds(90),
        )
        found = cluster.volume(volume)
        (fresh,) = found["replica_nodes"]
        assert fresh not in (owner, lost)
        assert any(lost in event and fresh in event for event in found["replica_history"])
        wait_for(
            "the new replica to be seeded",
            lambda: cluster.volume(volume)["meets_rpo"],
            cluster.seconds(60),
        )
        nodes = cluster.ferryctl(["node", "list"]).stdout
        assert f"replica on {lost} replaced by {fresh}" in nodes
    finally:
        cluster.agent(lost, "start")
    wait_for(
        "the lost host's copy to report again",
        lambda: lost in copies(cluster, volume),
        cluster.seconds(60),
    )
    assert copies(cluster, volume)[lost]["role"] == "stale"
    assert cluster.volume(volume)["replica_nodes"] == [fresh]
