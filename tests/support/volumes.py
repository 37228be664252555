"""A volume's files on the hosts of a cluster, as the cluster tests and the benchmark use them.

Files are written and checksummed on the hosts themselves, through each host's run
prefix, so the helpers work on any cluster description (netns hosts, Vagrant nodes).
"""

from __future__ import annotations

import json
import secrets
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


def plugin_request(
    cluster: Cluster, host: ClusterHost, call: str, body: dict[str, str]
) -> dict[str, str]:
    """A Docker plugin call (``Mount``, ``Unmount``...) on the host's plugin socket, made on
    the host as Docker or an operator makes it; the JSON reply."""
    assert host.plugin_socket, f"{host.name} has no plugin_socket in the cluster description"
    out = cluster.run(
        host,
        ["curl", "-sS", "--max-time", "110", "--unix-socket", host.plugin_socket,
         "-d", json.dumps(body), f"http://plugin/VolumeDriver.{call}"],
        timeout=120,
    ).stdout  # fmt: skip
    return dict(json.loads(out))


def dataset_mounted(cluster: Cluster, host: ClusterHost, name: str) -> bool:
    """The host's mount table shows the volume at its mountpoint."""
    found = cluster.run(
        host, ["findmnt", "-n", "-o", "TARGET", mountpoint(host, name)], check=False
    ).stdout
    return mountpoint(host, name) in found.splitlines()  # once per propagated copy


@contextmanager
def used_on(cluster: Cluster, host: ClusterHost, name: str) -> Iterator[str]:
    """The volume used on ``host`` as an operator uses it: Mounted through the plugin socket
    (with an ID of its own) while inside, Unmounted after; yields the mountpoint. A volume
    is mounted only while something uses it, so a test that reads or writes its files
    directly holds this (on the owner: a Mount elsewhere asks for a move there)."""
    request = {"Name": name, "ID": f"test-{secrets.token_hex(6)}"}
    reply = plugin_request(cluster, host, "Mount", request)
    assert not reply.get("Err"), f"Mount of {name} on {host.name}: {reply['Err']}"
    try:
        yield reply["Mountpoint"]
    finally:
        plugin_request(cluster, host, "Unmount", request)


def volume_under(host: ClusterHost, path: str) -> str:
    """The volume whose mountpoint holds ``path`` on ``host``."""
    assert host.mount_root and path.startswith(f"{host.mount_root}/"), path
    return path[len(host.mount_root) + 1 :].split("/", 1)[0]


def write_random_on(cluster: Cluster, host: ClusterHost, path: str, mib: int) -> None:
    """``mib`` MiB of incompressible data written to ``path`` (in a volume) on ``host``, the
    volume used (``used_on``) while it is written."""
    with used_on(cluster, host, volume_under(host, path)):
        cluster.run(
            host, ["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={mib}", "status=none"]
        )


def checksums(cluster: Cluster, host: ClusterHost, directory: str) -> dict[str, str]:
    """Checksums of the files in a volume's ``directory`` on ``host``, used while read."""
    with used_on(cluster, host, volume_under(host, directory)):
        out = cluster.run(
            host, ["sh", "-s"], input=f"cd {directory} && sha256sum * | sort -k2\n"
        ).stdout
    return {line.split()[1]: line.split()[0] for line in out.splitlines()}


@contextmanager
def mount_held(cluster: Cluster, volume: str, node: str) -> Iterator[None]:
    """A mount of ``volume`` on ``node`` as a container holds one: a bind mount of the
    volume in a mount namespace of its own, made after a Mount (``used_on``), as Docker
    makes it. A move of the volume waits for it to go before its handoff (the agent reads
    the kernel's mount tables, not a record). The holder writes to its stdout every second
    and ends when that fails: over ssh, killing the local client signals nothing on the
    host, but it closes the pipe."""
    host = cluster.host(node)
    inside = f"/tmp/held-{volume}"
    script = (
        f"mkdir -p {inside} && mount --bind {mountpoint(host, volume)} {inside} && "
        "while echo held; do sleep 1; done"
    )
    with used_on(cluster, host, volume):
        holder = subprocess.Popen(
            [*host.run_prefix, "unshare", "-m", "--propagation", "slave", "sh", "-c", script],
            stdout=subprocess.PIPE,
        )
        try:
            wait_for(
                f"{volume} to show as mounted on {node}",
                lambda: node in cluster.volume(volume)["mounted_on"],
                timeout=cluster.seconds(30),
            )
            yield
        finally:
            holder.kill()
            holder.wait()


def writable_copies(cluster: Cluster, name: str) -> list[str]:
    """Hosts (of the first two) whose copy of the volume takes writes (``writable_here``)."""
    return [host.name for host in cluster.hosts[:2] if writable_here(cluster, host, name)]


def writable_here(cluster: Cluster, host: ClusterHost, name: str) -> bool:
    """Whether the volume's copy on ``host`` takes writes, at once if mounted or at its next
    mount: ``readonly=off`` in ZFS and, if mounted, read-write in the mount table (not
    frozen); what a container would get, not what an agent reports."""
    out = cluster.run(
        host,
        ["zfs", "get", "-H", "-o", "value", "readonly,mounted", f"{host.pool}/ferry/{name}"],
        check=False,
    ).stdout.split()
    if out[:1] != ["off"]:
        return False
    if out[1:] != ["yes"]:
        return True
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
    wait_for(
        "the move to finish",
        lambda: cluster.volume(name)["owner"] == target.name,
        cluster.seconds(180),
    )
    wait_for(
        "the target to serve it",
        lambda: writable_copies(cluster, name) == [target.name],
        cluster.seconds(60),
    )
    assert checksums(cluster, target, mountpoint(target, name)) == data
