"""PostgreSQL on a replicated volume whose owner's host is lost, and the failover after it.

The scenario the host-loss cluster test checks and the failover benchmark times:
PostgreSQL on the owner's host writes rows (one per transaction, each id recorded with
the time its commit was acknowledged) into a volume with one replica; the owner's host
is lost (``tests.support.hostloss``: agent, dockerd and containers killed, link cut);
the volume fails over to the replica (``ferryctl volume failover``, or control by itself
with ``failover: auto``, which the container's Mount waits for); the same ``docker run``
on the replica's host starts PostgreSQL, which recovers from the copy.

What the copy must hold is measured against the newest snapshot the replica received:
ZFS's ``creation`` of it (whole seconds, set while its transaction group syncs), read on
the replica's host once the owner's lease is gone and before the failover (the new owner
takes snapshots of its own after it, and prunes the old ones).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ferry.core.fencing import MIN_FAILOVER_AFTER_SECONDS
from tests.support.cluster import Cluster, ClusterHost
from tests.support.hostloss import host_lost, live
from tests.support.migration import docker_client, run_postgres
from tests.support.pgworkload import (
    TABLE,
    Writer,
    create_table,
    log_since_start,
    psql,
    recovery_problems,
    verify,
    wait_ready,
)
from tests.support.volumes import wait_for, writable_here

Report = Callable[[str], None]

SNAPSHOT_TIME_MARGIN_SECONDS = 1.0
"""A commit acknowledged this long before the snapshot's ``creation`` is in it: a write
acknowledged through the ZIL while the transaction group before the snapshot's synced
belongs to the next one."""


@dataclass(frozen=True)
class HostLossResult:
    rows_committed: int
    """Acknowledged before the writer died with the lost host."""
    rows_found: int
    rows_before_snapshot: int
    """Acknowledged before the newest replicated snapshot (less the margin): all must be found."""
    rows_in_last_rpo: int
    """Acknowledged in the ``rpo`` before the loss: more than may be lost."""
    lag_seconds: float
    """From the newest replicated snapshot to the loss."""
    writable_after: float
    """Seconds from the loss to the replica's copy mounted read-write on its host."""
    answering_after: float
    """Seconds from the loss to PostgreSQL on the replica's host answering a query."""
    loss_message: str
    """What the failover said is lost (manual failover; empty for auto)."""
    unexpected_rows: tuple[int, ...]
    """Ids found that were never committed (nor the one commit in flight): must be none."""
    recovery_problems: tuple[str, ...]
    lease_ttl: int
    """The lost owner's lease TTL (the cluster's)."""

    @property
    def rows_lost(self) -> int:
        return self.rows_committed - self.rows_found

    def summary(self) -> str:
        return (
            f"rows committed {self.rows_committed}, found {self.rows_found} (lost "
            f"{self.rows_lost}; {self.rows_in_last_rpo} committed in the last rpo, "
            f"{self.rows_before_snapshot} before the newest replicated snapshot); lag "
            f"{self.lag_seconds:.1f} s; writable {self.writable_after:.1f} s and PostgreSQL "
            f"answering {self.answering_after:.1f} s after the loss (lease TTL "
            f"{self.lease_ttl} s)"
        )


def create_replicated(
    cluster: Cluster, volume: str, owner: ClusterHost, rpo: int, mode: str
) -> str:
    """The volume on ``owner`` with one replica, seeded; returns the replica's node."""
    cluster.ferryctl(
        [
            *("volume", "create", volume, "--size", "1G", "--node", owner.name),
            *("--replicas", "1", "--rpo", f"{rpo}s", "--failover", mode),
            *("--failover-after", f"{MIN_FAILOVER_AFTER_SECONDS:g}"),
        ]
    )
    wait_for("the replica to be seeded", lambda: cluster.volume(volume)["meets_rpo"], 120)
    (replica,) = cluster.volume(volume)["replica_nodes"]
    return str(replica)


def lose_owner_while_writing(
    cluster: Cluster,
    volume: str,
    owner: ClusterHost,
    replica: ClusterHost,
    rpo: int,
    mode: str,
    report: Report = print,
) -> HostLossResult:
    """PostgreSQL writes on ``owner`` for a little longer than ``rpo``; ``owner`` is lost;
    the volume fails over to ``replica`` (by ``mode``) and PostgreSQL starts there. The
    lost host is back (as a replica) when this returns."""
    client_a, client_b = docker_client(owner), docker_client(replica)
    container = f"pg-{volume}"
    pg_a = run_postgres(client_a, volume, container)
    wait_ready(pg_a, timeout=120)
    create_table(pg_a)
    writer = Writer(pg_a).start()
    writer.wait_for_rows(100, timeout=60)
    started = time.monotonic()
    wait_for(
        f"{rpo + 5} s of writes with the replica current",
        lambda: time.monotonic() - started > rpo + 5 and cluster.volume(volume)["meets_rpo"],
        rpo + 60,
    )
    report(f"PostgreSQL on {owner.name}: {len(writer.committed)} rows committed, still writing")
    try:
        with host_lost(cluster, owner) as lost:
            lost_at = time.time() - (time.monotonic() - lost)
            writable = _first_time(lambda: writable_here(cluster, replica, volume), lost)
            writer.stop()
            committed = writer.committed
            wait_for(f"{owner.name}'s lease to expire", lambda: not live(cluster, owner), 30)
            snapshot_at = _newest_snapshot(cluster, replica, volume)
            said = ""
            if mode == "manual":
                said = _failover(cluster, volume, replica)
                report(said)
            pg_b = run_postgres(client_b, volume, container)
            wait_ready(pg_b, timeout=120)
            answering_after = time.monotonic() - lost
            writable.join(timeout=30)
        wait_for(f"{owner.name} to register again", lambda: live(cluster, owner), 60)
        before = writer.committed_before(snapshot_at - SNAPSHOT_TIME_MARGIN_SECONDS)
        verify(pg_b, before)
        found = {int(line) for line in psql(pg_b, f"SELECT id FROM {TABLE}").split()}
        problems = recovery_problems(log_since_start(pg_b))
    finally:
        for client in (client_a, client_b):
            for leftover in client.containers.list(all=True, filters={"name": container}):
                leftover.remove(force=True)
    in_flight = {max(committed, default=0) + 1}
    result = HostLossResult(
        rows_committed=len(committed),
        rows_found=len(found & set(committed)),
        rows_before_snapshot=len(before),
        rows_in_last_rpo=len(committed) - len(writer.committed_before(lost_at - rpo)),
        lag_seconds=lost_at - snapshot_at,
        writable_after=writable.seconds,
        answering_after=answering_after,
        loss_message=said,
        unexpected_rows=tuple(sorted(found - set(committed) - in_flight)),
        recovery_problems=tuple(problems),
        lease_ttl=cluster.description.lease_ttl,
    )
    report(result.summary())
    return result


def _failover(cluster: Cluster, volume: str, replica: ClusterHost) -> str:
    result = cluster.ferryctl(["volume", "failover", volume, "--to", replica.name], check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


class _FirstTime(threading.Thread):
    """Polls ``predicate`` in the background; ``seconds`` is when it first held, after ``since``."""

    def __init__(self, predicate: Callable[[], bool], since: float) -> None:
        super().__init__(name="first-time", daemon=True)
        self._predicate = predicate
        self._since = since
        self.seconds = float("nan")

    def run(self) -> None:
        deadline = self._since + 180
        while time.monotonic() < deadline:
            if self._predicate():
                self.seconds = time.monotonic() - self._since
                return
            time.sleep(0.2)


def _first_time(predicate: Callable[[], bool], since: float) -> _FirstTime:
    watcher = _FirstTime(predicate, since)
    watcher.start()
    return watcher


def _newest_snapshot(cluster: Cluster, host: ClusterHost, volume: str) -> float:
    """The ``creation`` of the newest snapshot of ``volume`` on ``host``."""
    dataset = f"{host.pool}/ferry/{volume}"
    listed = cluster.run(
        host, ["zfs", "get", "-Hp", "-r", "-o", "name,value", "creation", dataset]
    ).stdout.splitlines()
    created = [line.split("\t") for line in listed]
    taken = [float(at) for name, at in created if name.startswith(f"{dataset}@")]
    assert taken, f"{host.name} holds no snapshot of {volume}"
    return max(taken)
