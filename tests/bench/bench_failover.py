"""Benchmark: failover time when the owner's host is lost. Not a pass/fail test. As root::

    /opt/ferry/venv/bin/python -m tests.bench.bench_failover [--rpo 15] [--cluster FILE]

On a three-host local cluster with a dockerd per host (its own, or the running one
``--cluster`` describes), in one run, once with ``failover: manual`` (``ferryctl volume
failover`` run as soon as the owner's lease is gone) and once with ``failover: auto``
(``failover_after`` at its minimum, the lease TTL; the container's Mount on the replica's
host waits for it): PostgreSQL commits on the owner's host into a volume with one
replica, the host is lost (``tests.support.pgfailover``), and the time from the loss to
the replica's copy being mounted writable (ZFS and the mount table, polled) and to
PostgreSQL answering on the replica's host is printed against the lease TTL, with the
rows lost and the lag.
"""

from __future__ import annotations

import argparse
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ferry.core.fencing import FencingTiming
from tests.support.cluster import Cluster, local_cluster
from tests.support.migration import load_image
from tests.support.pgfailover import HostLossResult, create_replicated, lose_owner_while_writing


@contextmanager
def bench_cluster(described: Path | None, name: str) -> Iterator[Cluster]:
    if described is not None:
        yield Cluster.load(described)
        return
    with local_cluster(name, hosts=3, docker=True) as cluster:
        yield cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rpo", type=int, default=15)
    parser.add_argument("--cluster", type=Path, help="a running cluster's description file")
    parser.add_argument("--name", default=f"bf{secrets.token_hex(2)}", help="own cluster's name")
    args = parser.parse_args()
    with bench_cluster(args.cluster, args.name) as cluster:
        for host in cluster.hosts:
            load_image(host)
        results = {mode: one_loss(cluster, mode, args.rpo) for mode in ("manual", "auto")}
    timing = FencingTiming(cluster.description.lease_ttl)
    ttl = timing.lease_ttl
    print(f"lease TTL {ttl} s, fencing bound {timing.fencing_bound} s")
    for mode, result in results.items():
        print(
            f"{mode:>6} failover: writable {result.writable_after:.1f} s "
            f"({result.writable_after / ttl:.2f} x TTL), PostgreSQL answering "
            f"{result.answering_after:.1f} s ({result.answering_after / ttl:.2f} "
            f"x TTL); {result.rows_lost} of {result.rows_committed} rows lost, lag "
            f"{result.lag_seconds:.1f} s ({result.lag_seconds / args.rpo:.2f} of rpo)"
        )
    manual, auto = results["manual"], results["auto"]
    ratio = auto.answering_after / manual.answering_after
    print(f"auto / manual, time to PostgreSQL answering: {ratio:.2f}")


def one_loss(cluster: Cluster, mode: str, rpo: int) -> HostLossResult:
    owner = cluster.hosts[0]
    volume = f"bench-{secrets.token_hex(3)}"
    replica = cluster.host(create_replicated(cluster, volume, owner, rpo, mode))
    try:
        return lose_owner_while_writing(cluster, volume, owner, replica, rpo, mode)
    finally:
        cluster.ferryctl(["volume", "delete", volume, "--force"], check=False)


if __name__ == "__main__":
    main()
