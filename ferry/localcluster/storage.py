"""The hosts' ZFS pools (sparse files) and the mounts under the state dir.

zfs-fuse is one daemon for every pool on the machine and serves commands over a Unix
socket on the filesystem, so a pool made here is usable from inside every host's
network namespace; each host uses only the pool named in the description file. The
agent's ZFS door (``agent/zfs/``) never creates or destroys a pool: making the test
hosts' pools is this tool's job alone.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from ferry.localcluster.commands import REPO, ClusterError, run
from ferry.localcluster.layout import HostLayout, is_cluster_host_name

log = logging.getLogger("local-cluster")


def ensure_zfs() -> None:
    if run(["zpool", "list"], check=False).returncode == 0:
        return
    log.info("zpool does not answer; starting zfs-fuse with deploy/zfs-fuse-up.sh")
    run([str(REPO / "deploy" / "zfs-fuse-up.sh")])


def create_pool(host: HostLayout, size: int) -> None:
    host.dir.mkdir(parents=True, exist_ok=True)
    with host.pool_file.open("wb") as sparse:
        sparse.truncate(size)
    run(["zpool", "create", "-m", str(host.pool_mountpoint), host.pool, str(host.pool_file)])
    log.info(
        "pool created host=%s pool=%s file=%s size=%d", host.name, host.pool, host.pool_file, size
    )


def cluster_pools(name: str) -> dict[str, str]:
    """This cluster's pools and their health."""
    listing = run(["zpool", "list", "-H", "-o", "name,health"], check=False).stdout
    pools = (line.split("\t") for line in listing.splitlines())
    return {fields[0]: fields[1] for fields in pools if is_cluster_host_name(name, fields[0])}


def destroy_pools(name: str) -> None:
    for pool in cluster_pools(name):
        for attempt in range(10):
            result = run(["zpool", "destroy", "-f", pool], check=False)
            if result.returncode == 0:
                log.info("destroyed pool=%s", pool)
                break
            log.info(
                "pool busy pool=%s attempt=%d error=%s", pool, attempt + 1, result.stderr.strip()
            )
            time.sleep(0.5)
        else:
            raise ClusterError(
                f"cannot destroy pool {pool}: {result.stderr.strip()}; find what uses it "
                f"(fuser -vm on its mountpoints), stop that and run 'local-cluster down' again"
            )


def unescape_mount_path(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below `directory`, deepest first."""
    root = str(directory.resolve()) if directory.exists() else str(directory)
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = unescape_mount_path(line.split()[4])
        if point == root or point.startswith(root + "/"):
            points.append(Path(point))
    return sorted(points, key=lambda p: len(p.parts), reverse=True)


def make_shared_mount(directory: Path) -> None:
    """Bind a directory onto itself as a shared mount, so that datasets mounted under it
    later appear inside each dockerd's private mount namespace. The state dir gets one
    (pools, agent mounts), and so does each agent's mount root: a managed plugin's
    container makes the mount holding its root filesystem (the state dir's) private, so
    only a mount root with a mount of its own keeps propagating new volumes into it."""
    run(["mount", "--bind", str(directory), str(directory)])
    run(["mount", "--make-shared", str(directory)])


def unmount_all(directory: Path) -> None:
    for point in mounts_under(directory):
        if run(["umount", str(point)], check=False).returncode != 0:
            run(["umount", "-l", str(point)])
        log.info("unmounted path=%s", point)
