"""A volume's files on the hosts of a cluster, as the cluster tests and the benchmark use them.

Files are written and checksummed on the hosts themselves, through each host's run
prefix, so the helpers work on any cluster description (netns hosts, Vagrant nodes).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.cluster import Cluster, ClusterHost

MIB = 1 << 20


def wait_for(what: str, predicate: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def mountpoint(host: ClusterHost, name: str) -> str:
    assert host.mount_root, f"{host.name} has no mount_root in the cluster description"
    return f"{host.mount_root}/{name}"


def write_random_on(cluster: Cluster, host: ClusterHost, path: str, mib: int) -> None:
    """``mib`` MiB of incompressible data written to ``path`` on ``host``."""
    cluster.run(
        host, ["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={mib}", "status=none"]
    )


def checksums(cluster: Cluster, host: ClusterHost, directory: str) -> dict[str, str]:
    out = cluster.run(
        host, ["sh", "-s"], input=f"cd {directory} && sha256sum * | sort -k2\n"
    ).stdout
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


@contextmanager
def mount_held(cluster: Cluster, volume: str, node: str) -> Iterator[None]:
    """A mount of ``volume`` on ``node`` as a container holds one: a bind mount of the
    volume in a mount namespace of its own. A move of the volume waits for it to go
    before its handoff (the agent reads the kernel's mount tables, not a record).
    The holder writes to its stdout every second and ends when that fails: over ssh,
    killing the local client signals nothing on the host, but it closes the pipe."""
    host = cluster.host(node)
    inside = f"/tmp/held-{volume}"
    script = (
        f"mkdir -p {inside} && mount --bind {mountpoint(host, volume)} {inside} && "
        "while echo held; do sleep 1; done"
    )
    holder = subprocess.Popen(
        [*host.run_prefix, "unshare", "-m", "--propagation", "slave", "sh", "-c", script],
        stdout=subprocess.PIPE,
    )
    try:
        wait_for(
            f"{volume} to show as mounted on {node}",
            lambda: node in cluster.volume(volume)["mounted_on"],
            timeout=30,
        )
        yield
    finally:
        holder.kill()
        holder.wait()


def writable_copies(cluster: Cluster, name: str) -> list[str]:
    """Hosts (of the first two) where the volume's dataset is mounted read-write."""
    return [host.name for host in cluster.hosts[:2] if writable_here(cluster, host, name)]


def writable_here(cluster: Cluster, host: ClusterHost, name: str) -> bool:
    """Whether the volume's dataset on ``host`` is mounted read-write, in ZFS and in the
    mount table (what a container would get, not what an agent reports)."""
    out = cluster.run(
        host,
        ["zfs", "get", "-H", "-o", "value", "readonly,mounted", f"{host.pool}/ferry/{name}"],
        check=False,
    ).stdout.split()
    if out != ["off", "yes"]:
        return False
    options = cluster.run(
        host, ["findmnt", "-n", "-o", "OPTIONS", mountpoint(host, name)], check=False
    ).stdout
    return "ro" not in options.strip().split(",")


def move_phase(cluster: Cluster, name: str) -> str:
    move = cluster.volume(name).get("move") or {}
    assert isinstance(move, dict)
    return str(move.get("phase", ""))


def sent(cluster: Cluster, name: str) -> int:
    move = cluster.volume(name).get("move") or {}
    assert isinstance(move, dict)
    return int(move.get("bytes_sent", 0))


def move_error(cluster: Cluster, name: str) -> str:
    move = cluster.volume(name).get("move") or {}
    assert isinstance(move, dict)
    return str(move.get("error", ""))


def finish_and_check(
    cluster: Cluster, name: str, data: dict[str, str], target: ClusterHost
) -> None:
    wait_for("the move to finish", lambda: cluster.volume(name)["owner"] == target.name, 180)
    wait_for("the target to serve it", lambda: writable_copies(cluster, name) == [target.name], 60)
    assert checksums(cluster, target, mountpoint(target, name)) == data
