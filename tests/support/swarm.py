"""PostgreSQL as a Docker Swarm service on a Ferry volume: drain its node, the data follows.

The scenario the Swarm demo runs and the cluster test checks, on a cluster from
``local-cluster up --swarm`` (host1 manages the swarm, nodes carry the label
``ferry.host=<host>``): the volume is created on host1 and the service starts
there (the other nodes are paused while it is placed); a writer commits rows;
then host1 is drained. Swarm stops the task and starts a new one on another
node, whose Ferry plugin gets the Mount, asks for the move and holds the Mount
until the volume is there. Every committed row must be found. The reschedule
time runs from the drain command to the first query PostgreSQL answers on the
new node.

Run by hand against a running cluster::

    python -m tests.support.swarm CLUSTER_YAML
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from docker.models.containers import Container

from tests.support.cluster import Cluster, ClusterHost
from tests.support.migration import (
    IMAGE,
    MIB,
    PGDATA,
    Report,
    docker_client,
    load_image_told,
)
from tests.support.pgworkload import (
    PSQL,
    TABLE,
    Writer,
    create_table,
    log_since_start,
    psql,
    psql_row,
    recovery_problems,
    verify,
    wait_ready,
)

SERVICE_LABEL = "com.docker.swarm.service.name"
TASK_TIMEOUT_SECONDS = 150.0


@dataclass(frozen=True)
class DrainResult:
    rows_committed: int
    rows_found: int
    reschedule_seconds: float
    old_host: str
    new_host: str
    owner: str
    moved_bytes: int
    """The move's ``bytes_sent``: what the new host holds of the move's streams."""
    recovery_problems: tuple[str, ...]

    @property
    def intact(self) -> bool:
        return (
            self.rows_found == self.rows_committed
            and self.owner == self.new_host
            and not self.recovery_problems
        )


def manager(cluster: Cluster) -> ClusterHost:
    if cluster.swarm_manager is None:
        raise RuntimeError(f"{cluster.path} describes no swarm; bring the cluster up with --swarm")
    return cluster.host(cluster.swarm_manager)


def node_id(cluster: Cluster, host: ClusterHost) -> str:
    """The Swarm node id of a host's dockerd."""
    return cluster.docker(host, ["info", "--format", "{{.Swarm.NodeID}}"]).stdout.strip()


def set_availability(cluster: Cluster, host: ClusterHost, availability: str) -> None:
    """active, pause (keeps its tasks, takes no new ones) or drain (moves its tasks away)."""
    node = node_id(cluster, host)
    cluster.docker(manager(cluster), ["node", "update", "--availability", availability, node])


def create_postgres_service(cluster: Cluster, service: str, volume: str) -> None:
    """One PostgreSQL task with its data directory on the Ferry volume; no registry, so the
    image is the one loaded into every dockerd (--no-resolve-image); no network (the
    default VIP endpoint needs IPVS, which these dockerds lack)."""
    cluster.docker(
        manager(cluster),
        [
            "service", "create", "--detach",
            "--name", service,
            "--no-resolve-image",
            "--mount", f"type=volume,source={volume},target={PGDATA},volume-driver=ferry",
            "--stop-grace-period", "30s",
            IMAGE,
        ],
    )  # fmt: skip


def remove_service(cluster: Cluster, service: str) -> None:
    cluster.docker(manager(cluster), ["service", "rm", service], check=False)


def running_task(host: ClusterHost, service: str) -> Container | None:
    """The service's running task container on this host's dockerd, if any."""
    found = docker_client(host).containers.list(filters={"label": f"{SERVICE_LABEL}={service}"})
    return found[0] if found else None


def wait_for_task(
    hosts: list[ClusterHost], service: str, timeout: float = TASK_TIMEOUT_SECONDS
) -> tuple[ClusterHost, Container]:
    """The first of ``hosts`` that runs the service's task, once PostgreSQL answers there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for host in hosts:
            container = running_task(host, service)
            if container is not None:
                wait_ready(container, timeout=max(deadline - time.monotonic(), 1.0))
                return host, container
        time.sleep(0.2)
    raise TimeoutError(
        f"no task of service {service} runs on {[h.name for h in hosts]} after {timeout:.0f}s; "
        f"see `docker service ps {service}` on the manager"
    )


def drain_moves_postgres(
    cluster: Cluster, volume: str, rows: int = 1000, report: Report = print
) -> tuple[DrainResult, DrainResult]:
    """PostgreSQL service on host1 with a writer; drain host1 (onto a node with no copy),
    then drain the new node (back onto host1, which holds the copy it left); after each,
    every row committed so far must be on the node the task landed on."""
    first, others = cluster.hosts[0], list(cluster.hosts[1:])
    service = f"svc-{volume}"
    report(f"creating volume {volume} on {first.name} through the Docker plugin")
    docker_client(first).volumes.create(
        volume, driver="ferry", driver_opts={"size": "1G", "node": first.name}
    )
    for host in others:
        set_availability(cluster, host, "pause")
    create_postgres_service(cluster, service, volume)
    _, pg = wait_for_task([first], service)
    for host in others:
        set_availability(cluster, host, "active")
    create_table(pg)
    onto_fresh = drain_once(cluster, service, volume, first, pg, (), rows, report)
    new_host = cluster.host(onto_fresh.new_host)
    _, pg = wait_for_task([new_host], service)
    kept = tuple(int(line) for line in psql(pg, f"SELECT id FROM {TABLE}").split())
    onto_copy = drain_once(cluster, service, volume, new_host, pg, kept, rows, report)
    remove_service(cluster, service)
    return onto_fresh, onto_copy


def drain_once(
    cluster: Cluster,
    service: str,
    volume: str,
    old: ClusterHost,
    pg_old: Container,
    kept: tuple[int, ...],
    rows: int,
    report: Report,
) -> DrainResult:
    """Write ``rows`` more rows on ``old``, drain it while writing, verify ``kept`` and every
    newly committed row where the task lands; ``old`` is active again afterwards."""
    others = [host for host in cluster.hosts if host is not old]
    writer = Writer(pg_old, first_id=max(kept, default=0) + 1, rows_per_commit=10).start()
    writer.wait_for_rows(rows, timeout=120)
    report(f"service {service} on {old.name}: {len(writer.committed)} rows committed, writing")
    drained_at = time.monotonic()
    set_availability(cluster, old, "drain")
    new_host, pg_new = wait_for_task(others, service)
    reschedule = time.monotonic() - drained_at
    committed = kept + writer.stop()
    report(
        f"drained {old.name}: the task runs on {new_host.name}, PostgreSQL answered "
        f"{reschedule:.2f}s after the drain command"
    )
    found = verify(pg_new, committed)
    info = cluster.volume(volume)
    owner = str(info["owner"])
    move = info.get("move") or {}
    assert isinstance(move, dict)
    report(
        f"{found.count} of {len(committed)} committed rows on {new_host.name} "
        f"(volume owner {owner}, {found.uncertain} rows past the last acknowledged commit)"
    )
    set_availability(cluster, old, "active")
    return DrainResult(
        rows_committed=len(committed),
        rows_found=found.count,
        reschedule_seconds=reschedule,
        old_host=old.name,
        new_host=new_host.name,
        owner=owner,
        moved_bytes=int(move.get("bytes_sent", 0)),
        recovery_problems=tuple(recovery_problems(log_since_start(pg_new))),
    )


@dataclass(frozen=True)
class FrozenNodeResult:
    rows_committed: int
    rows_found: int
    unacknowledged_rows_found: int
    replacement_held_seconds: float
    """How long the replacement's Mount was held while the frozen node's container ran."""
    move_seconds_after_thaw: float
    """From kill -CONT to the first query answered on the replacement's node."""
    new_host: str
    owner: str


UNACKNOWLEDGED_TABLE = "ferry_loose"
UNACKNOWLEDGED_LOOP = (
    f"while {' '.join(PSQL)} -c 'INSERT INTO {UNACKNOWLEDGED_TABLE} VALUES (now())'; do :; done"
)


def dockerd_pid(host: ClusterHost) -> int:
    """A local-cluster dockerd's pid, from the --pidfile beside its socket."""
    assert host.docker_host and host.docker_host.startswith("unix://")
    pidfile = Path(host.docker_host.removeprefix("unix://")).with_name("docker.pid")
    return int(pidfile.read_text().strip())


def node_state(cluster: Cluster, node: str) -> str:
    """ready or down, as the swarm manager sees the node."""
    inspect = ["node", "inspect", "--format", "{{.Status.State}}", node]
    return cluster.docker(manager(cluster), inspect).stdout.strip()


def wait_for(what: str, ready: Callable[[], bool], timeout: float) -> float:
    """Polls ``ready`` until true; returns the seconds it took."""
    started = time.monotonic()
    while not ready():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.5)
    return time.monotonic() - started


def frozen_node_never_two_writers(
    cluster: Cluster, volume: str, hold: float = 20.0, report: Report = print
) -> FrozenNodeResult:
    """The service runs on a worker; its dockerd is frozen (SIGSTOP) while the container keeps
    writing. Swarm marks the node down and starts a replacement on the manager, whose Mount
    Ferry must hold while the frozen node's container still has the volume mounted; after
    SIGCONT the old task stops, the move finishes and the replacement runs with every row."""
    boss, worker = manager(cluster), cluster.hosts[-1]
    assert boss is not worker, "needs a worker besides the manager"
    service = f"svc-{volume}"
    docker_client(worker).volumes.create(
        volume, driver="ferry", driver_opts={"size": "1G", "node": worker.name}
    )
    set_availability(cluster, boss, "pause")
    create_postgres_service(cluster, service, volume)
    _, pg_old = wait_for_task([worker], service)
    set_availability(cluster, boss, "active")
    create_table(pg_old)
    writer = Writer(pg_old, rows_per_commit=10).start()
    writer.wait_for_rows(500, timeout=120)
    committed = writer.stop()
    psql(pg_old, f"CREATE TABLE {UNACKNOWLEDGED_TABLE} (at timestamptz)")
    pg_old.exec_run(["sh", "-c", UNACKNOWLEDGED_LOOP], user="postgres", detach=True)
    wait_for(
        "the container's own writes",
        lambda: int(psql_row(pg_old, f"SELECT count(*) FROM {UNACKNOWLEDGED_TABLE}")) > 100,
        60,
    )
    worker_node, pid = node_id(cluster, worker), dockerd_pid(worker)
    report(f"{len(committed)} rows committed on {worker.name}; freezing its dockerd (pid {pid})")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(
            f"{worker.name} marked down",
            lambda: node_state(cluster, worker_node) == "down",
            90,
        )

        def asked_to_move() -> bool:
            move = cluster.volume(volume).get("move") or {}
            return isinstance(move, dict) and move.get("target") == boss.name

        wait_for(f"a Mount on {boss.name} asking for the move", asked_to_move, 90)
        held_since = time.monotonic()
        while time.monotonic() - held_since < hold:
            assert running_task(boss, service) is None, (
                f"a second PostgreSQL started on {boss.name} while {worker.name}'s still writes"
            )
            owner = cluster.volume(volume)["owner"]
            assert owner == worker.name, f"owner moved to {owner} while {worker.name} writes"
            time.sleep(0.5)
        held = time.monotonic() - held_since
        report(f"replacement's Mount on {boss.name} held {held:.0f}s; thawing {worker.name}")
    finally:
        os.kill(pid, signal.SIGCONT)
    thawed_at = time.monotonic()
    new_host, pg_new = wait_for_task([boss], service, timeout=240)
    after_thaw = time.monotonic() - thawed_at
    found = verify(pg_new, committed)
    loose = int(psql_row(pg_new, f"SELECT count(*) FROM {UNACKNOWLEDGED_TABLE}"))
    owner = str(cluster.volume(volume)["owner"])
    report(
        f"task runs on {new_host.name} {after_thaw:.1f}s after the thaw: {found.count} of "
        f"{len(committed)} committed rows, {loose} rows the frozen node's container wrote"
    )
    remove_service(cluster, service)
    return FrozenNodeResult(
        rows_committed=len(committed),
        rows_found=found.count,
        unacknowledged_rows_found=loose,
        replacement_held_seconds=held,
        move_seconds_after_thaw=after_thaw,
        new_host=new_host.name,
        owner=owner,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cluster", type=Path, help="cluster description (cluster.yaml)")
    parser.add_argument("--volume", default="pgdata")
    args = parser.parse_args()
    cluster = Cluster.load(args.cluster)
    for host in cluster.hosts:
        load_image_told(host)
    results = drain_moves_postgres(
        cluster, args.volume, report=lambda line: print(line, flush=True)
    )
    print(drain_summary(results), flush=True)
    return 0 if all(result.intact for result in results) else 1


def drain_summary(results: Sequence[DrainResult]) -> str:
    """The Swarm demo's closing lines: per drain, rows written and found, the reschedule
    time, the bytes moved."""
    lines = ["== summary"]
    for label, result in zip(
        ("onto a fresh node", "onto a node holding a copy"), results, strict=True
    ):
        lines.append(
            f"drain {label} ({result.old_host} -> {result.new_host}): rows written: "
            f"{result.rows_committed}  found: {result.rows_found}  reschedule (drain to first "
            f"query): {result.reschedule_seconds:.2f} s  moved: "
            f"{result.moved_bytes / MIB:.1f} MiB  "
            f"recovery problems: {', '.join(result.recovery_problems) or 'none'}"
            + ("" if result.intact else "  NOT INTACT")
        )
    lines.append(
        "result: "
        + ("every committed row is there" if all(r.intact for r in results) else "FAILED")
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
