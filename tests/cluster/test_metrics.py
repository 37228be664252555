"""The agents' and control's /metrics, scraped as Prometheus would, through a move.

A move that waits for a held mount is scraped while it waits (its phase,
the bytes its pre-copy sent, the control call that started it), and again
after its handoff (the pause histogram, the handoff counter, the new
owner's role and epoch, the target's admitted data connections, the
ownership swap's etcd operation). A replicated volume's owner shows each
replica's lag, its last successful send and whether the RPO is met, and
that verdict turns to 0 while the replica's agent is down.
"""

from __future__ import annotations

import secrets
import time

import pytest

from tests.support.cluster import Cluster
from tests.support.metrics import Samples, sample, scrape_cluster, value
from tests.support.volumes import mount_held, mountpoint, wait_for, write_random_on

pytestmark = pytest.mark.cluster


def _agent(cluster: Cluster, host: int) -> Samples:
    address = cluster.hosts[host].metrics_address
    assert address, "the cluster description names no agent metrics address"
    return scrape_cluster(cluster, address)


def _control(cluster: Cluster) -> Samples:
    address = cluster.description.control_metrics_address
    assert address, "the cluster description names no control metrics address"
    return scrape_cluster(cluster, address)


def test_metrics_follow_a_move(cluster: Cluster) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    volume = f"mt-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", volume, "--size", "1G", "--node", a.name])
    try:
        wait_for(f"{volume} owned by {a.name}", lambda: cluster.volume(volume)["owner"] == a.name)
        write_random_on(cluster, a, f"{mountpoint(a, volume)}/data", 16)
        wait_for(
            f"{a.name}'s metrics to show {volume} as owner",
            lambda: (
                value(_agent(cluster, 0), "ferry_volume_role", volume=volume, role="owner") == 1
            ),
        )
        source, target, control = _agent(cluster, 0), _agent(cluster, 1), _control(cluster)
        epoch = value(source, "ferry_volume_epoch", volume=volume)
        pauses = value(source, "ferry_move_handoff_pause_seconds_count")
        sent = value(source, "ferry_move_sent_bytes_total")

        with mount_held(cluster, volume, a.name):
            cluster.ferryctl(["volume", "move", volume, b.name])
            wait_for(
                "the move to wait for the unmount",
                lambda: cluster.volume(volume)["move"]["phase"] == "waiting_for_unmount",
            )
            wait_for(
                f"{a.name}'s metrics to show the move waiting",
                lambda: (
                    value(
                        _agent(cluster, 0),
                        "ferry_move_phase",
                        volume=volume,
                        phase="waiting_for_unmount",
                    )
                    == 1
                ),
            )
            during = _agent(cluster, 0)
            assert value(during, "ferry_move_sent_bytes_total") >= sent + (16 << 20)
            assert value(during, "ferry_move_handoff_pause_seconds_count") == pauses
            moved = _control(cluster)
            assert value(
                moved, "ferry_control_rpcs_total", method="ferry.v1.Control/MoveVolume", result="OK"
            ) > value(
                control,
                "ferry_control_rpcs_total",
                method="ferry.v1.Control/MoveVolume",
                result="OK",
            )

        wait_for(f"{volume} owned by {b.name}", lambda: cluster.volume(volume)["owner"] == b.name)
        wait_for(
            f"{b.name}'s metrics to show {volume} as owner",
            lambda: (
                value(_agent(cluster, 1), "ferry_volume_role", volume=volume, role="owner") == 1
            ),
        )
        after, arrived = _agent(cluster, 0), _agent(cluster, 1)
        assert value(after, "ferry_move_handoff_pause_seconds_count") == pauses + 1
        assert (
            value(after, "ferry_move_handoff_pause_seconds_sum")
            - value(source, "ferry_move_handoff_pause_seconds_sum")
            > 0
        )
        assert value(after, "ferry_move_handoffs_total") >= 1
        assert value(after, "ferry_volume_role", volume=volume, role="copy") == 1
        assert value(arrived, "ferry_volume_epoch", volume=volume) == epoch + 1
        newest = value(after, "ferry_volume_newest_snapshot_timestamp_seconds", volume=volume)
        assert time.time() - 300 < newest <= time.time()
        assert value(arrived, "ferry_data_connections_accepted_total") > value(
            target, "ferry_data_connections_accepted_total"
        )
        assert value(after, "ferry_zfs_command_duration_seconds_count", command="zfs send") > (
            value(source, "ferry_zfs_command_duration_seconds_count", command="zfs send")
        )
        swaps = "ferry_etcd_operation_duration_seconds_count"
        assert value(after, swaps, operation="transfer_owner") > value(
            source, swaps, operation="transfer_owner"
        )
    finally:
        cluster.ferryctl(["volume", "delete", volume, "--force"], check=False)


RPO = 8


def test_metrics_show_each_replicas_lag_and_whether_the_rpo_is_met(cluster: Cluster) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    volume = f"mr-{secrets.token_hex(3)}"
    cluster.ferryctl(
        [
            *("volume", "create", volume, "--size", "256M", "--node", a.name),
            *("--replicas", "1", "--rpo", f"{RPO}s", "--replace-after", "1h"),
        ]
    )

    def rpo_met() -> float | None:
        return sample(_agent(cluster, 0), "ferry_volume_rpo_met", volume=volume)

    try:
        wait_for(f"{a.name}'s metrics to show {volume} within its RPO", lambda: rpo_met() == 1, 90)
        now = _agent(cluster, 0)
        replica = {"volume": volume, "replica": b.name}
        lag = sample(now, "ferry_volume_replication_lag_seconds", **replica)
        assert lag is not None and 0 <= lag <= RPO
        success = sample(now, "ferry_volume_replication_last_success_timestamp_seconds", **replica)
        assert success is not None and time.time() - RPO <= success <= time.time() + 1
        assert value(now, "ferry_etcd_operation_duration_seconds_count", operation="put_state") > 0

        cluster.agent(b.name, "stop")
        try:
            wait_for("the RPO to be missed with the replica down", lambda: rpo_met() == 0, 60)
            late = sample(_agent(cluster, 0), "ferry_volume_replication_lag_seconds", **replica)
            assert late is not None and late > RPO
        finally:
            cluster.agent(b.name, "start")
        wait_for("the RPO to be met again once the replica is back", lambda: rpo_met() == 1, 90)
    finally:
        cluster.ferryctl(["volume", "delete", volume, "--force"], check=False)
