"""Writes on an old owner's copy after its handoff survive a move back, kept aside and listed.

Issue 9, item 3: the old owner's copy took writes after the move (a
container's bind mount the agent did not see), and moving the volume back
received over it with ``zfs receive -F``, rolling 170 acknowledged lines
back without a word. Here the late writes are made while the old owner's
agent is down, into its stopped copy, and the move back goes through ferryctl.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from tests.support.cluster import Cluster, ClusterHost
from tests.support.volumes import mountpoint, used_on, wait_for, write_random_on

pytestmark = pytest.mark.cluster

LATE_LINES = 170


@pytest.fixture
def volume(cluster: Cluster) -> Iterator[str]:
    name = f"dv-{secrets.token_hex(3)}"
    first = cluster.hosts[0].name
    cluster.ferryctl(["volume", "create", name, "--size", "256M", "--node", first])
    wait_for(f"{name} owned by {first}", lambda: cluster.volume(name)["owner"] == first)
    yield name
    cluster.ferryctl(["volume", "delete", name, "--force"], check=False)


def write_late_lines(cluster: Cluster, host: ClusterHost, volume: str) -> str:
    """Append fsynced lines to the host's stopped copy while its agent is down."""
    dataset = f"{host.pool}/ferry/{volume}"
    lines = "".join(f"late {n}\n" for n in range(LATE_LINES))
    cluster.agent(host.name, "stop")
    try:
        cluster.run(host, ["zfs", "set", "readonly=off", dataset])
        cluster.run(host, ["zfs", "mount", dataset])
        cluster.run(
            host, ["dd", f"of={mountpoint(host, volume)}/late.log", "conv=fsync"], input=lines
        )
        cluster.run(host, ["zfs", "unmount", dataset])
        cluster.run(host, ["zfs", "set", "readonly=on", dataset])
    finally:
        cluster.agent(host.name, "start")
    return lines


def read_kept(cluster: Cluster, host: ClusterHost, dataset: str, file: str) -> str:
    where = f"/tmp/{dataset.replace('/', '-')}"
    cluster.run(host, ["zfs", "set", f"mountpoint={where}", dataset])
    cluster.run(host, ["zfs", "mount", dataset])
    try:
        return cluster.run(host, ["cat", f"{where}/{file}"]).stdout
    finally:
        cluster.run(host, ["zfs", "unmount", dataset])
        cluster.run(host, ["zfs", "inherit", "mountpoint", dataset])


def test_late_writes_on_the_old_copy_are_kept_aside_listed_and_dropped_on_request(
    cluster: Cluster, volume: str
) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    write_random_on(cluster, a, f"{mountpoint(a, volume)}/before", 1)
    cluster.ferryctl(["volume", "move", volume, b.name, "--wait", "--timeout", "300"])
    late = write_late_lines(cluster, a, volume)

    cluster.ferryctl(["volume", "move", volume, a.name, "--wait", "--timeout", "300"])

    back = cluster.volume(volume)
    assert (back["owner"], back["epoch"], back["move"]["phase"]) == (a.name, 3, "done")
    with used_on(cluster, a, volume) as where:
        files = cluster.run(a, ["ls", "-A", where]).stdout.split()
    assert "before" in files and "late.log" not in files
    wait_for(
        f"volume get to list the copy {a.name} kept aside",
        lambda: len(cluster.volume(volume)["diverged"]) == 1,
    )
    (kept,) = cluster.volume(volume)["diverged"]
    assert (kept["node"], kept["epoch"]) == (a.name, 2)
    assert kept["dataset"].startswith(f"{a.pool}/ferry-aside/{volume}-e2-")
    assert kept["used_bytes"] > 0 and "written to after" in kept["reason"]
    assert read_kept(cluster, a, kept["dataset"], "late.log") == late, "every late line kept"
    table = cluster.ferryctl(["volume", "get", volume]).stdout
    assert kept["dataset"] in table

    cluster.ferryctl(["volume", "aside", "drop", volume, kept["dataset"], "--node", a.name])
    wait_for(
        "the dropped copy to leave the listing",
        lambda: cluster.volume(volume)["diverged"] == [],
    )
    gone = cluster.run(a, ["zfs", "list", kept["dataset"]], check=False)
    assert gone.returncode != 0, "the agent destroyed the copy it was asked to drop"
