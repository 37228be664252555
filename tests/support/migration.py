"""Migrating a PostgreSQL container between two hosts on a Ferry volume.

The scenario the README demo runs and the cluster test checks: PostgreSQL on
host A with its data directory on a Ferry volume; a writer inserts rows and
records every committed id; pre-copy to host B starts while it runs; the
container on A stops; the same ``docker run`` on host B starts PostgreSQL on
the moved volume; every committed row is there.

Run by hand against a running cluster::

    python -m tests.support.migration CLUSTER_YAML
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.models.containers import Container

from tests.support.cluster import Cluster, ClusterHost
from tests.support.pgworkload import (
    Writer,
    create_table,
    expected_checksum,
    log_since_start,
    recovery_problems,
    verify,
    wait_ready,
)

REPO = Path(__file__).resolve().parents[2]
IMAGE = "ferry/postgres:15"
PGDATA = "/var/lib/postgresql/data"
MIB = 1 << 20

Report = Callable[[str], None]


@dataclass(frozen=True)
class MigrationResult:
    rows_committed: int
    rows_found: int
    checksum_committed: str
    checksum_found: str
    pause_seconds: float
    volume_bytes: int
    precopied_bytes: int
    moved_bytes: int
    """The move's ``bytes_sent`` once done: what the target holds of its streams."""
    recovery_problems: tuple[str, ...]

    @property
    def intact(self) -> bool:
        return self.checksum_found == self.checksum_committed and not self.recovery_problems


def docker_client(host: ClusterHost, timeout: float = 180) -> docker.DockerClient:
    if not host.docker_host:
        raise RuntimeError(f"{host.name} has no docker_host in the cluster description")
    return docker.DockerClient(base_url=host.docker_host, timeout=round(timeout))


def load_image(host: ClusterHost, timeout: float = 1800) -> None:
    """Build (or take from the cache) the PostgreSQL image and import it into the host's dockerd."""
    assert host.docker_host
    subprocess.run(
        [str(REPO / "deploy/images/build.sh"), "--docker-host", host.docker_host, IMAGE],
        check=True,
        capture_output=True,
        timeout=timeout,
    )


def load_image_told(host: ClusterHost) -> None:
    """``load_image``, on one line: what it does, then how long it took (the first build
    from Debian packages takes minutes; later ones come from the cache)."""
    print(f"loading {IMAGE} into {host.name}'s dockerd... ", end="", flush=True)
    started = time.monotonic()
    load_image(host)
    print(f"done ({time.monotonic() - started:.0f} s)", flush=True)


def run_postgres(client: docker.DockerClient, volume: str, name: str) -> Container:
    """The same ``docker run`` on every host: the volume comes from the ferry driver."""
    return client.containers.run(
        IMAGE,
        name=name,
        detach=True,
        network_mode="none",
        volumes={volume: {"bind": PGDATA, "mode": "rw"}},
        volume_driver="ferry",
    )


def migrate(
    cluster: Cluster, volume: str, a: ClusterHost, b: ClusterHost, report: Report = print
) -> MigrationResult:
    """Run PostgreSQL on ``a``, write, move to ``b`` while writing, verify every committed row.
    Its waits are stretched by the cluster's ``time_scale``."""
    seconds = cluster.seconds
    client_a, client_b = docker_client(a, seconds(180)), docker_client(b, seconds(180))
    container = f"pg-{volume}"
    report(f"creating volume {volume} on {a.name} through the Docker plugin")
    client_a.volumes.create(volume, driver="ferry", driver_opts={"size": "1G", "node": a.name})
    pg_a = run_postgres(client_a, volume, container)
    wait_ready(pg_a, timeout=seconds(120))
    create_table(pg_a)
    writer = Writer(pg_a, rows_per_commit=10, statement_timeout=seconds(30)).start()
    writer.wait_for_rows(2000, timeout=seconds(120))
    report(f"PostgreSQL on {a.name}: {len(writer.committed)} rows committed so far, still writing")

    cluster.ferryctl(["volume", "move", volume, b.name])
    deadline = time.monotonic() + seconds(180)
    while True:
        move = cluster.volume(volume).get("move") or {}
        assert isinstance(move, dict)
        if move.get("phase") == "waiting_for_unmount" and int(move.get("bytes_sent", 0)) > 0:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"pre-copy of {volume} did not reach waiting_for_unmount: {move}")
        time.sleep(0.5)
    precopied = int(move["bytes_sent"])
    report(
        f"pre-copy to {b.name} done while PostgreSQL runs: {precopied / MIB:.1f} MiB sent; "
        f"waiting for the container on {a.name} to stop"
    )
    time.sleep(2)

    stopped_at = time.monotonic()
    pg_a.stop(timeout=round(seconds(30)))
    committed = writer.stop(timeout=seconds(60))
    report(f"stopped PostgreSQL on {a.name} with {len(committed)} committed rows")

    pg_b = run_postgres(client_b, volume, container)
    wait_ready(pg_b, timeout=seconds(120))
    pause = time.monotonic() - stopped_at
    found = verify(pg_b, committed)
    logs = log_since_start(pg_b)
    info = cluster.volume(volume)
    move = info.get("move") or {}
    assert isinstance(move, dict)
    used = int(
        cluster.run(
            b, ["zfs", "get", "-Hp", "-o", "value", "used", f"{b.pool}/ferry/{volume}"]
        ).stdout.strip()
    )
    report(
        f"PostgreSQL on {b.name} (owner {info['owner']}, epoch {info['epoch']}): "
        f"{found.count} rows, checksum {found.checksum[:12]}; pause {pause:.2f}s; "
        f"volume holds {used / MIB:.0f} MiB"
    )
    pg_b.stop(timeout=round(seconds(30)))
    pg_a.remove()
    pg_b.remove()
    return MigrationResult(
        rows_committed=len(committed),
        rows_found=found.count,
        checksum_committed=expected_checksum(committed),
        checksum_found=found.checksum,
        pause_seconds=pause,
        volume_bytes=used,
        precopied_bytes=precopied,
        moved_bytes=int(move.get("bytes_sent", 0)),
        recovery_problems=tuple(recovery_problems(logs)),
    )


def summary(result: MigrationResult) -> str:
    """The demo's closing lines: rows written and found, the pause, the bytes moved."""
    same = result.checksum_found == result.checksum_committed
    checksum = "checksum matches" if same else "checksum DIFFERS"
    problems = ", ".join(result.recovery_problems) or "none"
    return "\n".join(
        [
            "== summary",
            f"rows written: {result.rows_committed}  rows found after the move: "
            f"{result.rows_found}  ({checksum})",
            f"pause: {result.pause_seconds:.2f} s (PostgreSQL stopped on the old host until "
            "it answered on the new one)",
            f"moved: {result.moved_bytes / MIB:.1f} MiB sent ({result.precopied_bytes / MIB:.1f}"
            f" MiB of it pre-copied while PostgreSQL ran); the volume holds "
            f"{result.volume_bytes / MIB:.0f} MiB",
            f"recovery problems: {problems}",
            "result: " + ("every committed row is there" if result.intact else "FAILED"),
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cluster", type=Path, help="cluster description (cluster.yaml)")
    parser.add_argument("--volume", default="pgdata")
    args = parser.parse_args()
    cluster = Cluster.load(args.cluster)
    a, b = cluster.hosts[0], cluster.hosts[1]
    for host in (a, b):
        load_image_told(host)
    result = migrate(cluster, args.volume, a, b, report=lambda line: print(line, flush=True))
    print(summary(result), flush=True)
    return 0 if result.intact else 1


if __name__ == "__main__":
    sys.exit(main())
