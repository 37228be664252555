"""Who uses a ZFS filesystem on this host, as the kernel says: every mount namespace, every process.

"In use" is not what the Docker plugin remembers nor what etcd says: a
container's bind mount lives in the container's own mount namespace and
survives the agent's unmount of its mountpoint (and an agent restart that
forgets its counts). So a filesystem is in use while

- any mount entry of it exists in any mount namespace, other than the
  agent's own mountpoint in the agent's own namespace and the copies of that
  entry which mount propagation made (they share its peer group and go
  when it goes), or
- any process other than the caller has a file open, its working directory
  or its root on it.

Everything here reads ``/proc`` only (mountinfo, fdinfo, the cwd and root
links): nothing asks the filesystem itself, so a hung zfs-fuse cannot hang
the scan. A process or namespace that vanishes while it is read is skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
FILESYSTEM_TYPES = frozenset({"zfs", "fuse.zfs"})


@dataclass(frozen=True)
class MountEntry:
    """One line of a mountinfo table (``proc(5)``), the fields Ferry needs."""

    mount_id: int
    device: str
    root: str
    mount_point: str
    peer_groups: frozenset[str]
    fstype: str
    source: str

    @classmethod
    def parse(cls, line: str) -> MountEntry:
        left, _, right = line.partition(" - ")
        fields = left.split()
        fstype, source = right.split()[:2]
        return cls(
            mount_id=int(fields[0]),
            device=fields[2],
            root=_unescape(fields[3]),
            mount_point=_unescape(fields[4]),
            peer_groups=frozenset(f for f in fields[6:] if f.startswith(("shared:", "master:"))),
            fstype=fstype,
            source=_unescape(source),
        )

    def propagated_from(self, entry: MountEntry) -> bool:
        """This entry is a propagated copy of ``entry`` (same place, same peer group)."""
        groups = {group.split(":", 1)[1] for group in self.peer_groups}
        own = {group.split(":", 1)[1] for group in entry.peer_groups if group.startswith("shared:")}
        return (
            self.mount_point == entry.mount_point and self.root == entry.root and bool(groups & own)
        )


@dataclass(frozen=True)
class User:
    """Something that keeps the filesystem in use: a mount entry or a process."""

    kind: str  # "mount" or "process"
    pid: int
    command: str
    path: str

    def describe(self) -> str:
        if self.kind == "mount":
            return f"mounted at {self.path} (mount namespace of pid {self.pid}, {self.command})"
        return f"pid {self.pid} ({self.command}) has {self.path} open"


@dataclass(frozen=True)
class KernelView:
    """The mount tables of every namespace and what every process holds, read once."""

    own_namespace: str | None
    tables: dict[str, tuple[int, list[MountEntry]]]
    holders: dict[int, tuple[str, frozenset[int], tuple[str, ...]]]
    """pid -> (mount namespace, mount IDs of its open files, its cwd and root)."""

    @classmethod
    def read(cls, exclude: int | None = None) -> KernelView:
        """Read ``/proc`` now; ``exclude`` (default: this process) is never a user."""
        me = os.getpid() if exclude is None else exclude
        tables: dict[str, tuple[int, list[MountEntry]]] = {}
        holders: dict[int, tuple[str, frozenset[int], tuple[str, ...]]] = {}
        for pid in _pids():
            namespace = _namespace(pid)
            if namespace is None:
                continue
            if namespace not in tables:
                table = _mount_table(pid)
                if table is not None:
                    tables[namespace] = (pid, table)
            if pid != me:
                holders[pid] = (namespace, _open_mount_ids(pid), _directories(pid))
        return cls(_namespace(os.getpid()), tables, holders)

    def users(self, dataset: str, own_mountpoint: Path | None) -> list[User]:
        """Every user of ``dataset``'s filesystem but the caller's own mountpoint."""
        entries = {
            namespace: [e for e in table if _is_dataset(e, dataset)]
            for namespace, (_, table) in self.tables.items()
        }
        own = [
            e
            for e in entries.get(self.own_namespace or "", [])
            if own_mountpoint is not None and e.mount_point == str(own_mountpoint)
        ]
        found: list[User] = []
        for namespace, (pid, _) in self.tables.items():
            for entry in entries[namespace]:
                if namespace == self.own_namespace and entry in own:
                    continue
                if namespace != self.own_namespace and any(entry.propagated_from(o) for o in own):
                    continue
                found.append(User("mount", pid, _command(pid), entry.mount_point))
        mount_ids = {e.mount_id for listed in entries.values() for e in listed}
        if not mount_ids:
            return found
        for pid, (namespace, open_ids, directories) in self.holders.items():
            held = _on(directories, entries.get(namespace, []))
            if open_ids & mount_ids:
                held = held or "a file"
            if held is not None:
                found.append(User("process", pid, _command(pid), held))
        return found


def writing_pids(dataset: str) -> list[int]:
    """Processes (but this one) holding a file of ``dataset``'s filesystem open for writing,
    in any mount namespace: what keeps the kernel from freezing it."""
    me = os.getpid()
    mount_ids = set()
    for pid in _pids():
        for entry in _mount_table(pid) or []:
            if _is_dataset(entry, dataset):
                mount_ids.add(entry.mount_id)
    return [pid for pid in _pids() if pid != me and _writes_on(pid, mount_ids)]


def _writes_on(pid: int, mount_ids: set[int]) -> bool:
    """Whether the process has a file open for writing on one of ``mount_ids`` (from fdinfo)."""
    base = PROC / str(pid)
    try:
        fds = os.listdir(base / "fd")
    except OSError:
        return False
    for fd in fds:
        try:
            info = dict(
                line.split(":", 1) for line in (base / "fdinfo" / fd).read_text().splitlines()
            )
        except (OSError, ValueError):
            continue
        flags = int(info.get("flags", "0").strip() or "0", 8)
        if int(info.get("mnt_id", "-1").strip()) in mount_ids and flags & os.O_ACCMODE:
            return True
    return False


def _is_dataset(entry: MountEntry, dataset: str) -> bool:
    return entry.fstype in FILESYSTEM_TYPES and entry.source == dataset


def _mount_table(pid: int) -> list[MountEntry] | None:
    try:
        text = (PROC / str(pid) / "mountinfo").read_text()
    except OSError:
        return None
    return [MountEntry.parse(line) for line in text.splitlines() if line]


def _open_mount_ids(pid: int) -> frozenset[int]:
    """The mount IDs of the process's open files, from fdinfo (no call into any filesystem)."""
    base = PROC / str(pid)
    try:
        fds = os.listdir(base / "fd")
    except OSError:
        return frozenset()
    found = set()
    for fd in fds:
        try:
            info = (base / "fdinfo" / fd).read_text()
        except OSError:
            continue
        for line in info.splitlines():
            if line.startswith("mnt_id:"):
                found.add(int(line.split()[1]))
                break
    return frozenset(found)


def _directories(pid: int) -> tuple[str, ...]:
    found = []
    for link in ("cwd", "root"):
        try:
            found.append(os.readlink(PROC / str(pid) / link))
        except OSError:
            continue
    return tuple(found)


def _on(paths: tuple[str, ...], entries: list[MountEntry]) -> str | None:
    """The first of ``paths`` (in the process's own namespace) at or below one of ``entries``."""
    for path in paths:
        for entry in entries:
            point = entry.mount_point.rstrip("/")
            if path == entry.mount_point or path.startswith(point + "/"):
                return path
    return None


def _pids() -> list[int]:
    return [int(name) for name in os.listdir(PROC) if name.isdigit()]


def _namespace(pid: int) -> str | None:
    try:
        return os.readlink(PROC / str(pid) / "ns" / "mnt")
    except OSError:
        return None


def _command(pid: int) -> str:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text
