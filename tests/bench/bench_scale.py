"""Scale benchmark: 100, 1,000 and 3,000 volumes on 3 hosts through ``ferryctl apply``.

For each size a fresh local cluster (``mt3``, deploy/local-cluster, 3 hosts, no dockerd)
is brought up, the volumes are applied from one file (spread over the hosts), and it
measures: the apply call, the time until every volume is owned with a writable copy on
its owner (converged), the cost per volume, ``volume list`` (table and JSON), the agents'
CPU while idle, and how many of the cluster's datasets are mounted (only used volumes
should be: none here). Throughout, a probe writes and fsyncs a small file every 0.5 s in
a dataset of its own on the machine's ZFS and the worst latency is printed: the machine's
one zfs-fuse daemon must keep answering. The cluster is taken down after each size (its
pools, with every dataset, go with it). Ratios are against the smallest size of the same
run; nothing passes or fails.

    /opt/ferry/venv/bin/python -m tests.bench.bench_scale [SIZES...]   # default 100 1000 3000
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ferry.localcluster.processes import main_pids_by_role
from tests.support.cluster import Cluster, local_cluster

CLUSTER = "mt3"
HOSTS = 3
SIZES = (100, 1000, 3000)
VOLUME_SIZE = "1M"
CONVERGE_TIMEOUT_SECONDS = 1800.0
POLL_SECONDS = 2.0
LISTS = 3
IDLE_SECONDS = 30.0
PROBE_EVERY_SECONDS = 0.5
PROBE_TIMEOUT_SECONDS = 120.0
PROBE_DESTROY_ATTEMPTS = 10
APPLY_ATTEMPTS = 5
APPLY_RETRY_SECONDS = 10.0
LOGS_KEPT = Path("/tmp/mt3-bench-logs")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Result:
    volumes: int
    apply_seconds: float
    apply_failures: int
    converge_seconds: float
    list_table_seconds: float
    list_json_seconds: float
    idle_cpu_percent: float
    mounted: int
    probe_worst_seconds: float
    probe_writes: int

    @property
    def per_volume_ms(self) -> float:
        return 1000 * self.converge_seconds / self.volumes


class Probe:
    """Writes and fsyncs a 4 KiB file in its own dataset every PROBE_EVERY_SECONDS, in a
    thread; ``worst`` is the slowest write since ``reset`` (a hung write counts as long as
    it hangs, up to PROBE_TIMEOUT_SECONDS, then the probe says so)."""

    def __init__(self, pool: str) -> None:
        self._dataset = f"{pool}/mt-probe"
        self._where = Path(tempfile.mkdtemp(prefix="mt-probe-"))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._started: float | None = None
        self.worst = 0.0
        self.writes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        subprocess.run(
            ["zfs", "create", "-o", f"mountpoint={self._where}", self._dataset],
            check=True,
            timeout=PROBE_TIMEOUT_SECONDS,
        )
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(PROBE_TIMEOUT_SECONDS)
        # zfs-fuse answers "busy" for a moment after the last write: retry, bounded.
        for _attempt in range(PROBE_DESTROY_ATTEMPTS):
            destroyed = subprocess.run(
                ["zfs", "destroy", "-f", self._dataset],
                timeout=PROBE_TIMEOUT_SECONDS,
                capture_output=True,
            )
            if destroyed.returncode == 0:
                break
            time.sleep(1)
        self._where.rmdir()

    def reset(self) -> None:
        with self._lock:
            self.worst, self.writes = 0.0, 0

    def current_worst(self) -> float:
        """The worst latency so far, counting a write that has not returned yet."""
        with self._lock:
            pending = time.monotonic() - self._started if self._started is not None else 0.0
            return max(self.worst, pending)

    def _run(self) -> None:
        payload = os.urandom(4096)
        while not self._stop.wait(PROBE_EVERY_SECONDS):
            with self._lock:
                self._started = time.monotonic()
            with open(self._where / "probe", "wb") as out:
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            with self._lock:
                assert self._started is not None
                self.worst = max(self.worst, time.monotonic() - self._started)
                self.writes += 1
                self._started = None


def apply_file(volumes: int, hosts: list[str], directory: Path) -> Path:
    path = directory / f"volumes-{volumes}.yaml"
    lines = ["volumes:"]
    for i in range(volumes):
        node = hosts[i % len(hosts)]
        lines += [f"  - name: s{volumes}-{i:04d}", f"    size: {VOLUME_SIZE}", f"    node: {node}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(cluster: Cluster, args: list[str]) -> tuple[float, str]:
    started = time.monotonic()
    out = cluster.ferryctl(args, timeout=CONVERGE_TIMEOUT_SECONDS).stdout
    return time.monotonic() - started, out


def apply_until_done(cluster: Cluster, path: Path) -> tuple[float, int]:
    """``ferryctl apply`` (idempotent) until it succeeds; its time and how many attempts
    failed (say, a node's lease lapsed under the load and control refused its placements)."""
    started = time.monotonic()
    for failed in range(APPLY_ATTEMPTS):
        result = cluster.ferryctl(["apply", "-f", str(path)], check=False, timeout=600)
        if result.returncode == 0:
            return time.monotonic() - started, failed
        print(f"apply failed, retried: {result.stderr.strip()[-300:]}", flush=True)
        time.sleep(APPLY_RETRY_SECONDS)
    raise SystemExit(f"apply of {path} failed {APPLY_ATTEMPTS} times")


def converged(cluster: Cluster) -> int:
    """How many volumes are owned with a writable copy on their owner."""
    listed = json.loads(cluster.ferryctl(["volume", "list", "-o", "json"], timeout=300).stdout)
    return sum(
        1
        for v in listed
        if v.get("owner")
        and any(c["node"] == v["owner"] and c.get("writable") for c in v.get("copies", []))
    )


def agent_pids() -> list[int]:
    """The cluster's agents, by the role local-cluster started each with."""
    by_role = main_pids_by_role(CLUSTER)
    return [pid for role, pids in by_role.items() if role.startswith("agent:") for pid in pids]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def idle_cpu_percent() -> float:
    """The agents' CPU over IDLE_SECONDS with nothing to do, as % of one core (summed)."""
    pids = agent_pids()
    if not pids:
        return float("nan")
    before = sum(cpu_seconds(pid) for pid in pids)
    time.sleep(IDLE_SECONDS)
    after = sum(cpu_seconds(pid) for pid in pids)
    return 100 * (after - before) / IDLE_SECONDS


def mounted_datasets(cluster: Cluster) -> int:
    """Volume datasets of the cluster's pools in the machine's mount table."""
    pools = tuple(f"{host.pool}/ferry/" for host in cluster.hosts)
    return sum(
        1 for line in Path("/proc/self/mounts").read_text().splitlines() if line.startswith(pools)
    )


@contextmanager
def cluster_up() -> Iterator[Cluster]:
    """The cluster, its agents' and control's logs kept in LOGS_KEPT when it goes down."""
    with local_cluster(CLUSTER, hosts=HOSTS, docker=False, pool_size="8G") as cluster:
        try:
            yield cluster
        finally:
            LOGS_KEPT.mkdir(exist_ok=True)
            for role, log in cluster.logs.items():
                if log and Path(log).exists():
                    shutil.copy(log, LOGS_KEPT / f"{role}.log")
            for host in cluster.hosts:
                for role, log in (host.logs or {}).items():
                    if log and Path(log).exists():
                        shutil.copy(log, LOGS_KEPT / f"{host.name}-{role}.log")


def run_size(volumes: int) -> Result:
    with cluster_up() as cluster, Probe(cluster.hosts[0].pool) as probe:
        with tempfile.TemporaryDirectory(prefix="mt-bench-") as directory:
            path = apply_file(volumes, [h.name for h in cluster.hosts], Path(directory))
            probe.reset()
            started = time.monotonic()
            applied, apply_failures = apply_until_done(cluster, path)
            deadline = started + CONVERGE_TIMEOUT_SECONDS
            while (done := converged(cluster)) < volumes:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{volumes} volumes: only {done} converged in time")
                if probe.current_worst() > PROBE_TIMEOUT_SECONDS:
                    raise SystemExit(f"ZFS stopped answering: a probe write hangs ({volumes})")
                time.sleep(POLL_SECONDS)
            converge = time.monotonic() - started
        table = statistics.median(timed(cluster, ["volume", "list"])[0] for _ in range(LISTS))
        as_json = statistics.median(
            timed(cluster, ["volume", "list", "-o", "json"])[0] for _ in range(LISTS)
        )
        idle = idle_cpu_percent()
        mounted = mounted_datasets(cluster)
        return Result(
            volumes=volumes,
            apply_seconds=applied,
            apply_failures=apply_failures,
            converge_seconds=converge,
            list_table_seconds=table,
            list_json_seconds=as_json,
            idle_cpu_percent=idle,
            mounted=mounted,
            probe_worst_seconds=probe.current_worst(),
            probe_writes=probe.writes,
        )


def report(results: list[Result]) -> None:
    base = results[0]
    print(
        f"\n{'volumes':>8} {'apply s':>8} {'fails':>5} {'converge s':>10} {'ms/vol':>7} "
        f"{'x/vol':>6} {'list s':>7} {'x':>5} {'json s':>7} {'x':>5} {'idle cpu%':>9} "
        f"{'mounted':>7} {'probe worst s':>13} {'probes':>6}"
    )
    for r in results:
        print(
            f"{r.volumes:>8} {r.apply_seconds:>8.1f} {r.apply_failures:>5} "
            f"{r.converge_seconds:>10.1f} "
            f"{r.per_volume_ms:>7.1f} {r.per_volume_ms / base.per_volume_ms:>6.2f} "
            f"{r.list_table_seconds:>7.2f} {r.list_table_seconds / base.list_table_seconds:>5.1f} "
            f"{r.list_json_seconds:>7.2f} {r.list_json_seconds / base.list_json_seconds:>5.1f} "
            f"{r.idle_cpu_percent:>9.1f} {r.mounted:>7} {r.probe_worst_seconds:>13.2f} "
            f"{r.probe_writes:>6}"
        )
    print(
        "\nfails: apply attempts refused (retried; the converge time includes them). x/vol: "
        "converge time per volume against the smallest size (1.0 = flat); x: list "
        "time against the smallest size; mounted: datasets of the cluster in the mount table "
        "once converged (volumes are mounted only while used: none is here)."
    )


def main() -> None:
    sizes = [int(arg) for arg in sys.argv[1:]] or list(SIZES)
    results = []
    for volumes in sizes:
        print(f"{volumes} volumes on {HOSTS} hosts ...", flush=True)
        results.append(run_size(volumes))
        report(results)


if __name__ == "__main__":
    main()
