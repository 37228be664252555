"""No acknowledged write is lost: a move waits for whatever really uses the volume.

A writer appends a numbered line and fsyncs it every 50 ms, and prints the
number once the fsync returned (acknowledged). The volume is moved while it
writes, after the agent or etcd was killed and restarted (both used to make
the agent forget the container's mount and hand off under it). The move must
wait for the writer; once the writer stops, every acknowledged line must be
on the new owner, and at no moment may two hosts hold a writable copy.
"""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.cluster import Cluster, ClusterHost
from tests.support.containers import TOOLBOX, WRITER, container_writing, docker_hosts, logs
from tests.support.volumes import used_on, wait_for, writable_copies
from tests.support.writer import acknowledged, lines_in, start_writer

pytestmark = pytest.mark.cluster

WAIT_FOR_THE_WRITER_SECONDS = 6.0


class CopySampler:
    """Samples every host's writable copies of a volume every half second while it runs."""

    def __init__(self, cluster: Cluster, volume: str) -> None:
        self._cluster = cluster
        self._volume = volume
        self._stop = threading.Event()
        self.worst: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            found = writable_copies(self._cluster, self._volume)
            if len(found) > len(self.worst):
                self.worst = found

    def __enter__(self) -> CopySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        assert len(self.worst) <= 1, f"two writable copies at once: {self.worst}"


def lines_on(cluster: Cluster, host: ClusterHost, volume: str) -> set[int]:
    """The lines of the volume's log on ``host``, its owner (used while read)."""
    with used_on(cluster, host, volume) as where:
        return lines_in(cluster.run(host, ["cat", f"{where}/log"], check=False).stdout)


@pytest.fixture
def volume(cluster: Cluster) -> Iterator[str]:
    name = f"aw-{secrets.token_hex(3)}"
    first = cluster.hosts[0].name
    cluster.ferryctl(["volume", "create", name, "--size", "256M", "--node", first])
    wait_for(f"{name} owned by {first}", lambda: cluster.volume(name)["owner"] == first)
    yield name
    cluster.ferryctl(["volume", "delete", name, "--force"], check=False)


def restart_agent(cluster: Cluster, host: ClusterHost) -> None:
    cluster.agent(host.name, "kill")
    cluster.agent(host.name, "start")
    # Past the old lease: the records it held (a mount record among them) are gone.
    time.sleep(12)


def restart_etcd(cluster: Cluster, host: ClusterHost) -> None:
    cluster.process("etcd", "kill")
    time.sleep(12)  # down longer than the agents' lease: they re-register on new leases
    cluster.process("etcd", "start")
    wait_for("both agents to register again", lambda: both_registered(cluster), 60)
    # etcd revives the old leases at its start; nobody renews them now, and the
    # records they carried (a mount record among them) go when they expire.
    time.sleep(12)


def cut_link(cluster: Cluster, host: ClusterHost) -> None:
    """The host cannot reach etcd for longer than its lease: etcd drops the lease and every
    record on it (the mount record among them); the agent registers again on a new one."""
    cluster.run(host, ["ip", "link", "set", "eth0", "down"])
    try:
        time.sleep(15)
    finally:
        cluster.run(host, ["ip", "link", "set", "eth0", "up"])
    wait_for("both agents to register again", lambda: both_registered(cluster), 60)
    time.sleep(3)


def moved_to(cluster: Cluster, volume: str, host: ClusterHost) -> bool:
    """The move is done: ``host`` owns the volume and has made its copy writable (the owner
    changes first, at the handoff; reading the copy before its activation found no file)."""
    state = cluster.volume(volume)
    return bool(state["owner"] == host.name and (state.get("move") or {}).get("phase") == "done")


def both_registered(cluster: Cluster) -> bool:
    listed = cluster.ferryctl(["node", "list"], check=False).stdout
    return all(host.name in listed for host in cluster.hosts[:2])


class MoveRequest:
    """A move asked for; ``finish`` returns the lines the new owner's container read, or None
    when no container reads (a move asked with ferryctl)."""

    def check(self) -> None:
        """Raise if the request already failed."""

    def finish(self) -> set[int] | None:
        return None


def request_with_ferryctl(cluster: Cluster, volume: str, target: ClusterHost) -> MoveRequest:
    cluster.ferryctl(["volume", "move", volume, target.name])
    return MoveRequest()


class DockerRun(MoveRequest):
    """``docker run`` on the target: its Mount asks for the move and waits for it."""

    def __init__(self, target: ClusterHost, volume: str) -> None:
        assert target.docker_host
        self.target = target
        self.process = subprocess.Popen(
            ["docker", "-H", target.docker_host, "run", "--rm", "--network", "none",
             "--volume-driver", "ferry", "-v", f"{volume}:/data", TOOLBOX, "cat", "/data/log"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip

    def check(self) -> None:
        if self.process.poll() is not None:
            self.finish()

    def finish(self) -> set[int]:
        out, err = self.process.communicate(timeout=150)
        assert self.process.returncode == 0, f"docker run on {self.target.name} failed: {err}"
        return lines_in(out)


def request_with_docker_run(cluster: Cluster, volume: str, target: ClusterHost) -> MoveRequest:
    return DockerRun(target, volume)


def still_waiting(
    cluster: Cluster, volume: str, source: ClusterHost, request: MoveRequest | None = None
) -> None:
    """For a while, the move waits: the owner stays, the phase says why."""
    deadline = time.monotonic() + WAIT_FOR_THE_WRITER_SECONDS
    while time.monotonic() < deadline:
        if request is not None:
            request.check()
        state = cluster.volume(volume)
        assert state["owner"] == source.name, "handed off while the writer still writes"
        time.sleep(0.5)
    move = cluster.volume(volume).get("move") or {}
    assert move.get("phase") == "waiting_for_unmount", f"no move waits for the writer: {move}"


@pytest.mark.parametrize(
    "restart", [restart_agent, restart_etcd, cut_link], ids=["agent", "etcd", "partition"]
)
@pytest.mark.parametrize(
    "request_move", [request_with_ferryctl, request_with_docker_run], ids=["ferryctl", "docker"]
)
def test_a_container_keeps_every_acknowledged_line_across_a_restart_and_a_move(
    cluster: Cluster,
    volume: str,
    restart: Callable[[Cluster, ClusterHost], None],
    request_move: Callable[[Cluster, str, ClusterHost], MoveRequest],
) -> None:
    a, b = docker_hosts(cluster)
    with CopySampler(cluster, volume), container_writing(cluster, a, volume) as container:
        restart(cluster, a)
        request = request_move(cluster, volume, b)
        still_waiting(cluster, volume, a, request)
        cluster.docker(a, ["stop", "-t", "1", container])
        written = logs(cluster, a, container)
        wait_for("the move to finish", lambda: moved_to(cluster, volume, b), 120)
        read_by_docker = request.finish()
    on_b = lines_on(cluster, b, volume)
    assert written, "the writer acknowledged lines"
    assert written <= on_b, f"acknowledged lines missing on {b.name}: {sorted(written - on_b)}"
    if read_by_docker is not None:
        missing = sorted(written - read_by_docker)
        assert not missing, f"acknowledged lines the container on {b.name} did not read: {missing}"


def test_a_writer_outside_docker_holding_its_file_open_is_waited_for(
    cluster: Cluster, volume: str
) -> None:
    """Like a database's WAL: the kernel shows the open file, the move waits for it."""
    a, b = docker_hosts(cluster)
    with used_on(cluster, a, volume) as where:
        writer = start_writer(f"{where}/log", hold=True, prefix=a.run_prefix)
        out = wait_for_the_move_past(cluster, volume, writer, a, b)
    written = acknowledged(out)
    assert written and written <= lines_on(cluster, b, volume)


def wait_for_the_move_past(
    cluster: Cluster, volume: str, writer: subprocess.Popen[str], a: ClusterHost, b: ClusterHost
) -> str:
    """Move ``volume`` to ``b`` while ``writer`` holds its file on ``a``: the move waits,
    then ends once the writer is killed; the writer's output."""
    try:
        with CopySampler(cluster, volume):
            wait_for("the writer to start", lambda: lines_on(cluster, a, volume))
            cluster.ferryctl(["volume", "move", volume, b.name])
            still_waiting(cluster, volume, a)
            writer.kill()
            out, _ = writer.communicate()
            wait_for("the move to finish", lambda: moved_to(cluster, volume, b), 120)
    finally:
        writer.kill()
        writer.wait()
    return out


def test_a_writer_that_reopens_its_file_loses_no_acknowledged_line(
    cluster: Cluster, volume: str
) -> None:
    """Nothing holds the volume between two of its writes, so the move may hand off under
    it: its writes are then refused (the freeze, then no mountpoint to write into), and
    every line it was told was written is on the new owner."""
    a, b = docker_hosts(cluster)
    with used_on(cluster, a, volume) as where:
        writer = start_writer(f"{where}/log", hold=False, prefix=a.run_prefix)
        try:
            with CopySampler(cluster, volume):
                wait_for("the writer to start", lambda: lines_on(cluster, a, volume))
                move = ["volume", "move", volume, b.name, "--wait", "--timeout", "120"]
                cluster.ferryctl(move)
                time.sleep(1)
        finally:
            writer.kill()
            out, _ = writer.communicate()
    written = acknowledged(out)
    assert any(line.startswith("err ") for line in out.splitlines()), "writes were refused"
    assert written and written <= lines_on(cluster, b, volume)


def test_a_container_binding_the_mountpoints_host_path_is_waited_for(
    cluster: Cluster, volume: str
) -> None:
    """``-v /var/lib/ferry/mnt/NAME:/data`` never reaches the plugin; the kernel still sees it."""
    a, b = docker_hosts(cluster)
    name = f"bind-{volume}"
    with used_on(cluster, a, volume) as where:  # mounted, so there is something to bind
        cluster.docker(
            a,
            ["run", "-d", "--name", name, "--network", "none",
             "-v", f"{where}:/data", TOOLBOX, "sh", "-c",
             WRITER.format(log="/data/log")],
        )  # fmt: skip
    try:
        with CopySampler(cluster, volume):
            wait_for("the writer to start", lambda: len(logs(cluster, a, name)) > 10)
            cluster.ferryctl(["volume", "move", volume, b.name])
            still_waiting(cluster, volume, a)
            cluster.docker(a, ["stop", "-t", "1", name])
            written = logs(cluster, a, name)
            wait_for("the move to finish", lambda: moved_to(cluster, volume, b), 120)
    finally:
        cluster.docker(a, ["rm", "-f", name], check=False)
    assert written and written <= lines_on(cluster, b, volume)
