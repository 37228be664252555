"""The cluster's processes: started with a marker in their environment, found by it.

Every process `up` starts, and every child of those, carries
``FERRY_LOCAL_CLUSTER=<name>`` and ``FERRY_LOCAL_CLUSTER_ROLE=<role>``; `down` and
`status` find them through /proc, so they need no pid files and work after a
crashed `up`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ferry.localcluster.commands import ClusterError, log_tail
from ferry.localcluster.layout import NETNS_DIR

log = logging.getLogger("local-cluster")

MARKER_ENV = "FERRY_LOCAL_CLUSTER"
ROLE_ENV = "FERRY_LOCAL_CLUSTER_ROLE"
STOP_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class ClusterProcess:
    pid: int
    ppid: int
    role: str


def read_proc_status(pid: int) -> tuple[int, str] | None:
    """(ppid, state) of a process, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def cluster_processes(name: str) -> list[ClusterProcess]:
    """Live processes whose environment marks them as part of this cluster (children inherit it)."""
    wanted = f"{MARKER_ENV}={name}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted not in environ:
            continue
        status = read_proc_status(int(entry.name))
        if status is None or status[1] == "Z":
            continue
        role = next(
            (
                v.split(b"=", 1)[1].decode()
                for v in environ
                if v.startswith(ROLE_ENV.encode() + b"=")
            ),
            "?",
        )
        found.append(ClusterProcess(pid=int(entry.name), ppid=status[0], role=role))
    return found


def main_pids_by_role(name: str) -> dict[str, list[int]]:
    """The process each role started (not its children, which share the marker)."""
    processes = cluster_processes(name)
    pids = {p.pid for p in processes}
    by_role: dict[str, list[int]] = {}
    for process in processes:
        if process.ppid not in pids:
            by_role.setdefault(process.role, []).append(process.pid)
    return by_role


def processes_in_netns(netns: str) -> list[int]:
    try:
        target = (NETNS_DIR / netns).stat()
    except OSError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            ns = (entry / "ns" / "net").stat()
            if (ns.st_ino, ns.st_dev) == (target.st_ino, target.st_dev):
                pids.append(int(entry.name))
    return pids


def with_descendants(pids: list[int]) -> list[int]:
    """``pids`` and every process descended from them, e.g. a dockerd's containers, whose
    processes do not carry the marker (runc gives them the image's environment)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (status := read_proc_status(int(entry.name))) is not None:
            children.setdefault(status[0], []).append(int(entry.name))
    found, pending = set(pids), list(pids)
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return sorted(found)


def is_gone(pid: int) -> bool:
    status = read_proc_status(pid)
    return status is None or status[1] == "Z"


def stop_pids(what: str, leaders: list[int], everyone: list[int]) -> None:
    """SIGTERM the leaders, wait the grace period, then SIGKILL whatever of `everyone` remains."""
    for pid in leaders:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline and not all(is_gone(p) for p in everyone):
        time.sleep(0.1)
    stubborn = [p for p in everyone if not is_gone(p)]
    for pid in stubborn:
        log.warning("killing process=%s pid=%d after %.0f s grace", what, pid, STOP_GRACE_SECONDS)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and not all(is_gone(p) for p in stubborn):
        time.sleep(0.1)


def stop_role(name: str, role: str) -> None:
    group = [p for p in cluster_processes(name) if p.role == role]
    if not group:
        return
    pids = {p.pid for p in group}
    leaders = [p.pid for p in group if p.ppid not in pids]
    log.info("stopping cluster=%s role=%s pids=%s", name, role, sorted(pids))
    stop_pids(role, leaders, sorted(pids))


def describe_role(role: str) -> str:
    """'agent:host1' -> 'ferry-agent on host1', for messages an operator reads."""
    kind, _, host = role.partition(":")
    program = {"agent": "ferry-agent", "docker": "dockerd", "control": "ferry-control"}.get(
        kind, kind
    )
    return f"{program} on {host}" if host else program


def argv_file(log_path: Path) -> Path:
    """Where a started process's command line is kept, so it can be started again."""
    return log_path.with_suffix(".argv.json")


class Started:
    """A long-running process started by `up`; it outlives `up` (own session)."""

    def __init__(self, role: str, argv: list[str], log_path: Path, cluster: str) -> None:
        self.role = role
        self.log_path = log_path
        env = dict(os.environ, **{MARKER_ENV: cluster, ROLE_ENV: role})
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv_file(log_path).write_text(json.dumps(argv))
        with log_path.open("ab") as out:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        log.info("started role=%s pid=%d log=%s", role, self.popen.pid, log_path)

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise ClusterError(
                f"{describe_role(self.role)} exited with code {code} while starting; "
                f"last lines of {self.log_path}:\n"
                f"{log_tail(self.log_path)}"
            )
