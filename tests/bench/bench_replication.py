"""Benchmark: standing replicas. Not a pass/fail test. Run as root::

    /opt/ferry/venv/bin/python -m tests.bench.bench_replication [--rpo 15] [--seconds 60]

On a three-host local cluster (zfs-fuse pools on sparse files, TLS between agents), in
one run:

- replication lag under a steady writer (fsynced lines every 10 ms): the replica's
  newest-snapshot age as ``volume get`` reports it, sampled twice a second, p50 and
  p99 against the RPO;
- the writer's throughput (``dd`` of 128 MiB, fsynced) into a volume with one replica
  and into one without, alternating, medians and their ratio;
- a move of a volume with 256 MiB written and 16 MiB changed since, to the node of its
  replica against one to a fresh node: time from the request until the target owns it
  and its copy is writable (nothing mounts it, so this is the pause a container
  restarted on the target waits), and the bytes the move sent.
"""

from __future__ import annotations

import argparse
import re
import secrets
import statistics
import subprocess
import sys
import time

from tests.support.cluster import REPO, Cluster, ClusterHost, local_cluster
from tests.support.volumes import mountpoint, wait_for, write_random_on

MIB = 1 << 20
DD_RATE = re.compile(r"([\d.]+) s,")


def create(cluster: Cluster, host: ClusterHost, replicas: int, rpo: int, size: str) -> str:
    name = f"bench-{secrets.token_hex(3)}"
    args = ["volume", "create", name, "--size", size, "--node", host.name]
    if replicas:
        args += ["--replicas", str(replicas), "--rpo", f"{rpo}s"]
    cluster.ferryctl(args)
    wait_for(f"{name} on {host.name}", lambda: cluster.volume(name)["owner"] == host.name)
    if replicas:
        wait_for(f"{name}'s replica seeded", lambda: cluster.volume(name)["meets_rpo"], 120)
    return name


def lag_samples(cluster: Cluster, name: str, replica: str, seconds: float) -> list[float]:
    lags = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for copy in cluster.volume(name)["copies"]:
            if copy["node"] == replica and copy["newest_snapshot_at"]:
                lags.append(float(copy["lag_seconds"]))
        time.sleep(0.5)
    return lags


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def dd_seconds(cluster: Cluster, host: ClusterHost, path: str, mib: int) -> float:
    out = cluster.run(
        host,
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync"],
    ).stderr
    match = DD_RATE.search(out)
    assert match, out
    return float(match.group(1))


def timed_move(cluster: Cluster, name: str, target: str) -> tuple[float, int]:
    started = time.monotonic()
    cluster.ferryctl(["volume", "move", name, target, "--wait"], timeout=600)
    took = time.monotonic() - started
    return took, int(cluster.volume(name)["move"]["bytes_sent"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rpo", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--parts", default="lag,throughput,moves", help="which of lag,throughput,moves to run"
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    with local_cluster(f"br{secrets.token_hex(2)}", hosts=3, pool_size="8G") as cluster:
        if "lag" in parts:
            lag(cluster, args)
        if "throughput" in parts:
            throughput(cluster, args)
        if "moves" in parts:
            moves(cluster, args)


def lag(cluster: Cluster, args: argparse.Namespace) -> None:
    a, b, _ = cluster.hosts
    name = create(cluster, a, 1, args.rpo, "1G")
    writer = subprocess.Popen(
        [
            *a.run_prefix,
            sys.executable,
            "-m",
            "tests.support.writer",
            f"{mountpoint(a, name)}/log",
            "--interval",
            "0.01",
        ],
        stdout=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        lags = lag_samples(cluster, name, b.name, args.seconds)
    finally:
        writer.kill()
        writer.wait()
    p50, p99 = statistics.median(lags), percentile(lags, 0.99)
    print(
        f"lag under a steady writer, {len(lags)} samples over {args.seconds:.0f}s: "
        f"p50 {p50:.1f}s ({p50 / args.rpo:.2f} of rpo {args.rpo}s), "
        f"p99 {p99:.1f}s ({p99 / args.rpo:.2f} of rpo)"
    )
    cluster.ferryctl(["volume", "delete", name, "--force"])


def throughput(cluster: Cluster, args: argparse.Namespace) -> None:
    a = cluster.hosts[0]
    seconds: dict[str, list[float]] = {"replica": [], "none": []}
    volumes = {
        "replica": create(cluster, a, 1, args.rpo, "1G"),
        "none": create(cluster, a, 0, 0, "1G"),
    }
    for run in range(args.runs):
        order = ["replica", "none"] if run % 2 == 0 else ["none", "replica"]
        for kind in order:
            path = f"{mountpoint(a, volumes[kind])}/dd-{run}"
            seconds[kind].append(dd_seconds(cluster, a, path, 128))
        print(
            f"run {run + 1}: with replica {seconds['replica'][-1]:.2f}s, "
            f"without {seconds['none'][-1]:.2f}s for 128 MiB"
        )
    with_r = 128 / statistics.median(seconds["replica"])
    without = 128 / statistics.median(seconds["none"])
    print(
        f"writer throughput, medians of {args.runs}: with one replica {with_r:.0f} MiB/s, "
        f"without {without:.0f} MiB/s, ratio {with_r / without:.2f}"
    )
    for volume in volumes.values():
        cluster.ferryctl(["volume", "delete", volume, "--force"])


def moves(cluster: Cluster, args: argparse.Namespace) -> None:
    a = cluster.hosts[0]
    pauses: dict[str, list[tuple[float, int]]] = {"replica": [], "fresh": []}
    for run in range(args.runs):
        order = ["replica", "fresh"] if run % 2 == 0 else ["fresh", "replica"]
        for kind in order:
            name = create(cluster, a, 1 if kind == "replica" else 0, args.rpo, "1G")
            write_random_on(cluster, a, f"{mountpoint(a, name)}/bulk", 256)
            # Placement picks the replica's node (most free space); the fresh node is the other.
            replica = (cluster.volume(name)["replica_nodes"] or [cluster.hosts[1].name])[0]
            target = replica
            if kind == "replica":
                written = time.time()
                try:
                    wait_for(
                        "the replica to hold the bulk",
                        lambda n=name, w=written, r=replica: _replica_after(cluster, n, r, w),
                        300,
                    )
                except AssertionError:
                    print(cluster.ferryctl(["volume", "get", name]).stdout)
                    raise
            write_random_on(cluster, a, f"{mountpoint(a, name)}/changed", 16)
            if kind == "fresh":
                target = next(h.name for h in cluster.hosts[1:] if h.name != replica)
            pauses[kind].append(timed_move(cluster, name, target))
            cluster.ferryctl(["volume", "delete", name, "--force"])
            took, sent = pauses[kind][-1]
            print(f"run {run + 1}: move to {kind} node {took:.2f}s, {sent / MIB:.1f} MiB sent")
    replica_pause = statistics.median(p for p, _ in pauses["replica"])
    fresh_pause = statistics.median(p for p, _ in pauses["fresh"])
    replica_bytes = statistics.median(s for _, s in pauses["replica"])
    fresh_bytes = statistics.median(s for _, s in pauses["fresh"])
    print(
        f"move, 256 MiB written and 16 MiB changed, medians of {args.runs}: to the "
        f"replica's node {replica_pause:.2f}s and {replica_bytes / MIB:.1f} MiB, to a fresh "
        f"node {fresh_pause:.2f}s and {fresh_bytes / MIB:.1f} MiB; ratios "
        f"{replica_pause / fresh_pause:.2f} (time), {replica_bytes / fresh_bytes:.2f} (bytes)"
    )


def _replica_after(cluster: Cluster, name: str, replica: str, since: float) -> bool:
    return any(
        c["node"] == replica and c["newest_snapshot_at"] >= int(since)
        for c in cluster.volume(name)["copies"]
    )


if __name__ == "__main__":
    main()
