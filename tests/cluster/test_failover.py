"""Failover between netns hosts: an owner cut off stops its writes before anyone may take
over, a failover says what it loses, and the old owner comes back as a replica.

host2 holds a standby copy of each volume: the volume is created there and moved
to host1, and a move's source keeps a read-only copy.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from ferry.core.fencing import MIN_FAILOVER_AFTER_SECONDS, FencingTiming
from tests.support.cluster import Cluster, ClusterHost
from tests.support.containers import TOOLBOX, container_writing, docker_hosts, logs
from tests.support.hostloss import host_lost, link, live
from tests.support.volumes import (
    checksums,
    mountpoint,
    wait_for,
    writable_copies,
    writable_here,
    write_random_on,
)

pytestmark = pytest.mark.cluster

LOSS = re.compile(
    r"writes on host1 after \d\d:\d\d:\d\d UTC \((\d+) s before it was lost\) are not in this copy"
)
# Polling the container's log every half second, and docker logs' own delay.
OBSERVED_SLACK_SECONDS = 1.5


@pytest.fixture
def volume(cluster: Cluster) -> Iterator[str]:
    """A volume owned by host1 with a standby copy on host2."""
    name = f"fo-{secrets.token_hex(3)}"
    a, b = cluster.hosts[0], cluster.hosts[1]
    cluster.ferryctl(["volume", "create", name, "--size", "128M", "--node", b.name])
    wait_for(f"{name} owned by {b.name}", lambda: cluster.volume(name)["owner"] == b.name)
    cluster.ferryctl(["volume", "move", name, a.name, "--wait", "--timeout", "120"])
    yield name
    cluster.ferryctl(["volume", "delete", name, "--force"], check=False)


def until_lease_gone(cluster: Cluster, host: ClusterHost, container: str) -> tuple[float, float]:
    """Follow the container's acknowledged writes until ``host``'s lease is gone (at most
    30 s); returns when (time.monotonic) the last new write was seen, and the lease gone."""
    count, written_at = len(logs(cluster, host, container)), time.monotonic()
    deadline = written_at + 30
    while live(cluster, host):
        assert time.monotonic() < deadline, f"{host.name}'s lease did not expire"
        now = len(logs(cluster, host, container))
        if now != count:
            count, written_at = now, time.monotonic()
    return written_at, time.monotonic()


def writable_on(cluster: Cluster, volume: str, host: ClusterHost) -> bool:
    """What ``host``'s agent reports (the lost host's own mount, its agent dead, is not asked)."""
    return any(c["node"] == host.name and c["writable"] for c in cluster.volume(volume)["copies"])


def failover(cluster: Cluster, volume: str, *args: str) -> str:
    result = cluster.ferryctl(["volume", "failover", volume, *args], check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_partitioned_owner_stops_writing_before_a_failover_and_returns_as_a_replica(
    cluster: Cluster, volume: str
) -> None:
    a, b = docker_hosts(cluster)
    bound = FencingTiming(cluster.description.lease_ttl).fencing_bound
    with container_writing(cluster, a, volume) as container:
        written_before = logs(cluster, a, container)
        link(cluster, a, up=False)
        cut = time.monotonic()
        try:
            refused = cluster.ferryctl(["volume", "failover", volume], check=False)
            assert refused.returncode != 0 and "is live" in refused.stderr, refused.stderr
            written_at, gone_at = until_lease_gone(cluster, a, container)
            print(
                f"writes stopped {written_at - cut:.1f} s after the cut (bound "
                f"{bound} s), the lease went {gone_at - cut:.1f} s after it"
            )
            assert written_at - cut <= bound + OBSERVED_SLACK_SECONDS
            assert written_at < gone_at, "a write was acknowledged after the lease was gone"
            assert "Read-only file system" in cluster.docker(a, ["logs", container]).stderr
            said = failover(cluster, volume)
            assert LOSS.search(said), said
            print(said.strip())
        finally:
            link(cluster, a, up=True)
        assert cluster.volume(volume)["owner"] == b.name
        wait_for(f"{a.name} to register again", lambda: live(cluster, a), 60)
        late = logs(cluster, a, container)
        time.sleep(3)
        assert logs(cluster, a, container) == late, f"{a.name} served writes after it returned"
    wait_for(
        f"{a.name}'s late writes kept aside",
        lambda: [d["node"] for d in cluster.volume(volume)["diverged"]] == [a.name],
        60,
    )
    # The new owner activates on its next pass; until then no copy is writable, never two.
    wait_for(
        f"{b.name}'s copy to be the one writable",
        lambda: writable_copies(cluster, volume) == [b.name],
        60,
    )
    copies = {c["node"]: c for c in cluster.volume(volume)["copies"]}
    assert not copies[a.name]["writable"], f"{a.name}'s copy is a read-only replica"
    assert written_before, "the container wrote before the cut"


def test_a_failover_after_host_loss_by_hand_then_by_itself(cluster: Cluster, volume: str) -> None:
    a, b = docker_hosts(cluster)
    with host_lost(cluster, a, docker=False) as lost:
        wait_for(f"{a.name}'s lease to expire", lambda: not live(cluster, a), 30)
        said = failover(cluster, volume, "--to", b.name)
        found = LOSS.search(said)
        assert found, said
        print(said.strip())
        wait_for(f"{b.name}'s copy writable", lambda: writable_on(cluster, volume, b))
        print(f"manual failover: writable {time.monotonic() - lost:.1f} s after the loss")
    wait_for(f"{a.name} back as a replica", lambda: live(cluster, a), 60)

    ttl = cluster.description.lease_ttl
    auto = f"fa-{secrets.token_hex(3)}"
    cluster.ferryctl(
        ["volume", "create", auto, "--size", "128M", "--node", b.name, "--failover", "auto",
         "--failover-after", f"{MIN_FAILOVER_AFTER_SECONDS:g}"]
    )  # fmt: skip
    try:
        wait_for(f"{auto} owned by {b.name}", lambda: cluster.volume(auto)["owner"] == b.name)
        cluster.ferryctl(["volume", "move", auto, a.name, "--wait", "--timeout", "120"])
        with host_lost(cluster, a, docker=False) as lost:
            # A container started on b at once: its Mount waits for the auto failover.
            ran = cluster.docker(
                b,
                ["run", "--rm", "--network", "none", "--volume-driver", "ferry",
                 "-v", f"{auto}:/data", TOOLBOX, "sh", "-c", "echo after > /data/f && cat /data/f"],
                check=False,
                timeout=150,
            )  # fmt: skip
            took = time.monotonic() - lost
            assert ran.returncode == 0 and ran.stdout.strip() == "after", ran.stderr
            assert cluster.volume(auto)["owner"] == b.name
            print(
                f"auto failover: a container on {b.name} ran {took:.1f} s after the loss "
                f"(lease TTL {ttl} s, failover_after {MIN_FAILOVER_AFTER_SECONDS:g} s)"
            )
            assert took >= ttl, "failed over before the owner's lease could expire"
        wait_for(f"{a.name} to register again", lambda: live(cluster, a), 60)
    finally:
        cluster.ferryctl(["volume", "delete", auto, "--force"], check=False)


@contextmanager
def streams_refused(cluster: Cluster, host: ClusterHost, sender: ClusterHost) -> Iterator[None]:
    """Every TCP connection from ``sender`` to ``host`` reset at once: ``sender`` cannot
    replicate to ``host`` (each send fails fast and backs off), and the rest goes on."""
    rule = [
        "INPUT",
        "-s",
        sender.address,
        "-p",
        "tcp",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ]
    cluster.run(host, ["iptables", "-I", *rule])
    try:
        yield
    finally:
        cluster.run(host, ["iptables", "-D", *rule])


def newest_at(cluster: Cluster, volume: str, node: str) -> float:
    return next(
        (
            float(c["newest_snapshot_at"])
            for c in cluster.volume(volume)["copies"]
            if c["node"] == node
        ),
        0.0,
    )


def test_with_two_replicas_the_newest_is_promoted_and_the_other_follows_it(
    three_hosts: Cluster,
) -> None:
    cluster = three_hosts
    owner = cluster.hosts[0]
    volume = f"f2-{secrets.token_hex(3)}"
    cluster.ferryctl(
        ["volume", "create", volume, "--size", "128M", "--node", owner.name,
         "--replicas", "2", "--rpo", "6s"]
    )  # fmt: skip
    try:
        wait_for("both replicas seeded", lambda: cluster.volume(volume)["meets_rpo"], 90)
        ahead, behind = cluster.volume(volume)["replica_nodes"]
        with streams_refused(cluster, cluster.host(behind), owner):
            write_random_on(cluster, owner, f"{mountpoint(owner, volume)}/data", 4)
            written = time.time()
            data = checksums(cluster, owner, mountpoint(owner, volume))
            wait_for(
                f"{ahead} to hold the write, {behind} not",
                lambda: newest_at(cluster, volume, ahead) > written,
                60,
            )
            assert newest_at(cluster, volume, behind) < written
            with host_lost(cluster, owner, docker=False):
                wait_for(f"{owner.name}'s lease to expire", lambda: not live(cluster, owner), 30)
                said = failover(cluster, volume)
                failed_over = time.time()
                print(said.strip())
                assert f"to {ahead}" in said, said
                assert cluster.volume(volume)["owner"] == ahead
                wait_for(
                    f"{behind} to follow {ahead}",
                    lambda: newest_at(cluster, volume, behind) > failed_over,
                    60,
                )
                wait_for(
                    f"{ahead}'s copy mounted writable",
                    lambda: writable_here(cluster, cluster.host(ahead), volume),
                )
                assert (
                    checksums(cluster, cluster.host(ahead), mountpoint(cluster.host(ahead), volume))
                    == data
                )
                assert behind in cluster.volume(volume)["replica_nodes"]
            wait_for(f"{owner.name} to register again", lambda: live(cluster, owner), 60)
        wait_for(
            f"{owner.name} a replica of {ahead} in place of it",
            lambda: sorted(cluster.volume(volume)["replica_nodes"]) == sorted([behind, owner.name]),
            60,
        )
    finally:
        cluster.ferryctl(["volume", "delete", volume, "--force"], check=False)
