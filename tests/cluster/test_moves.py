"""Moving volumes between hosts: data intact, incremental back, waiting for unmount.

Runs against any cluster description (the netns hosts here, Vagrant nodes
there): files are written and checksummed on the hosts themselves, and the
volume is driven through ferryctl like an operator would.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.support.cluster import Cluster, ClusterHost
from tests.support.volumes import (
    MIB,
    checksums,
    mount_held,
    mountpoint,
    wait_for,
    write_random_on,
)

pytestmark = pytest.mark.cluster


@contextmanager
def moving_while_mounted(
    cluster: Cluster, volume: str, source: ClusterHost, target: ClusterHost
) -> Iterator[None]:
    """16 MiB written on ``source``, a container's mount held there, and a move to ``target``
    that has pre-copied and waits for the unmount; the mount goes on leaving."""
    write_random_on(cluster, source, f"{mountpoint(source, volume)}/before", 16)
    with mount_held(cluster, volume, source.name):
        cluster.ferryctl(["volume", "move", volume, target.name])
        wait_for(
            "the move to wait for the unmount",
            lambda: cluster.volume(volume)["move"]["phase"] == "waiting_for_unmount",
            cluster.seconds(60),
        )
        yield


@pytest.fixture
def volume(cluster: Cluster) -> Iterator[str]:
    name = f"mv-{secrets.token_hex(3)}"
    first = cluster.hosts[0].name
    cluster.ferryctl(["volume", "create", name, "--size", "1G", "--node", first])
    wait_for(
        f"{name} owned by {first}",
        lambda: cluster.volume(name)["owner"] == first,
        cluster.seconds(60),
    )
    yield name
    cluster.ferryctl(["volume", "delete", name, "--force"], check=False)


def test_a_volume_moves_with_its_data_and_comes_back_incrementally(
    cluster: Cluster, volume: str
) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    write_random_on(cluster, a, f"{mountpoint(a, volume)}/big", 256)
    write_random_on(cluster, a, f"{mountpoint(a, volume)}/small", 1)
    before = checksums(cluster, a, mountpoint(a, volume))

    move_timeout = str(round(cluster.seconds(300)))
    cluster.ferryctl(["volume", "move", volume, b.name, "--wait", "--timeout", move_timeout])
    there = cluster.volume(volume)
    assert (there["owner"], there["epoch"]) == (b.name, 2)
    assert checksums(cluster, b, mountpoint(b, volume)) == before
    first_move = there["move"]
    assert isinstance(first_move, dict) and first_move["bytes_sent"] >= 256 * MIB
    wait_for(
        f"volume get to show the copy on {b.name} writable and {a.name}'s read-only, both at "
        "the final snapshot",
        lambda: copies_of(cluster, volume) == {b.name: True, a.name: False},
        cluster.seconds(60),
    )

    write_random_on(cluster, b, f"{mountpoint(b, volume)}/new-on-b", 4)
    after_b = checksums(cluster, b, mountpoint(b, volume))
    cluster.ferryctl(["volume", "move", volume, a.name, "--wait", "--timeout", move_timeout])
    back = cluster.volume(volume)
    assert (back["owner"], back["epoch"]) == (a.name, 3)
    assert checksums(cluster, a, mountpoint(a, volume)) == after_b
    back_move = back["move"]
    assert isinstance(back_move, dict)
    assert back_move["bytes_sent"] < 32 * MIB, "the way back must send only what changed"


def copies_of(cluster: Cluster, volume: str) -> dict[str, bool] | None:
    """Which nodes ``volume get`` lists with a copy, and whether each is writable; None
    while the copies are not all at the same newest snapshot."""
    copies = cluster.volume(volume)["copies"]
    if len({c["newest_snapshot"] for c in copies}) != 1:
        return None
    return {c["node"]: c["writable"] for c in copies}


def test_a_move_waits_while_mounted_and_completes_after_unmount(
    cluster: Cluster, volume: str
) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    with moving_while_mounted(cluster, volume, a, b):
        write_random_on(cluster, a, f"{mountpoint(a, volume)}/while-mounted", 8)
        time.sleep(cluster.seconds(1))
        assert cluster.volume(volume)["owner"] == a.name, "still writable on a while mounted"
        expected = checksums(cluster, a, mountpoint(a, volume))
    wait_for("the handoff", lambda: cluster.volume(volume)["owner"] == b.name, cluster.seconds(120))
    wait_for(
        "the move to finish",
        lambda: cluster.volume(volume)["move"]["phase"] == "done",
        cluster.seconds(60),
    )
    assert checksums(cluster, b, mountpoint(b, volume)) == expected


def test_moving_back_during_a_move_cancels_it_and_the_source_keeps_the_volume(
    cluster: Cluster, volume: str
) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    with moving_while_mounted(cluster, volume, a, b):
        back = cluster.ferryctl(["volume", "move", volume, a.name]).stdout
        assert "cancelled" in back
    # Nothing mounts it now: a move still running would hand off in this time.
    time.sleep(cluster.seconds(5))
    there = cluster.volume(volume)
    assert (there["owner"], there["epoch"], there["node"]) == (a.name, 1, a.name)
    assert there["move"]["phase"] == "failed"
    write_random_on(cluster, a, f"{mountpoint(a, volume)}/after-the-cancel", 1)
