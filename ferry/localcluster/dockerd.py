"""A dockerd per host, and the Docker Swarm across them (``--docker``, ``--swarm``).

Each dockerd runs in its host's network namespace only (``nsenter --net``; ``ip netns
exec`` would remount /sys and dockerd fails), in a private mount namespace whose plugin
directories are the host's own, so it discovers only its own host's Ferry plugin.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
from pathlib import Path

from ferry.localcluster.commands import (
    READY_TIMEOUT_SECONDS,
    ClusterError,
    run,
    wait_until,
)
from ferry.localcluster.description import ClusterDescription
from ferry.localcluster.layout import SWARM_HOST_LABEL, HostLayout, Layout
from ferry.localcluster.processes import Started

log = logging.getLogger("local-cluster")

UNIX_SOCKET_PATH_MAX = 107
DOCKER_PLUGIN_DIRS = (Path("/etc/docker/plugins"), Path("/run/docker/plugins"))
SWARM_PORT = 2377
SWARM_COMMAND_TIMEOUT_SECONDS = 30.0


def check_socket_path(path: Path) -> None:
    if len(str(path)) > UNIX_SOCKET_PATH_MAX:
        raise ClusterError(
            f"{path} is longer than a Unix socket path may be ({UNIX_SOCKET_PATH_MAX}); "
            "choose a shorter --state-dir"
        )


def start_dockerd(layout: Layout, host: HostLayout) -> Started:
    """dockerd in the host's network namespace only (nsenter --net; `ip netns exec` would
    remount /sys and dockerd fails), in a private mount namespace whose plugin
    directories are this host's, so it discovers only this host's Ferry plugin."""
    check_socket_path(host.docker_dir / "exec" / "containerd" / "containerd.sock.ttrpc")
    check_socket_path(host.docker_socket)
    for directory in (host.docker_etc_plugins, host.docker_run_plugins, host.docker_dir / "data"):
        directory.mkdir(parents=True, exist_ok=True)
    (host.docker_etc_plugins / "ferry.spec").write_text(f"unix://{host.plugin_socket}\n")
    binds = " && ".join(
        f"mount --bind {own} {system}"
        for own, system in zip(
            (host.docker_etc_plugins, host.docker_run_plugins), DOCKER_PLUGIN_DIRS, strict=True
        )
    )
    namespace = f"ferry-{layout.name}-{host.name}"
    dockerd = [
        "dockerd",
        "--data-root", str(host.docker_dir / "data"),
        "--exec-root", str(host.docker_dir / "exec"),
        "--pidfile", str(host.docker_dir / "docker.pid"),
        "-H", host.docker_host,
        "--bridge=none",
        "--iptables=false",
        "--containerd-namespace", namespace,
        "--containerd-plugins-namespace", f"{namespace}-plugins",
    ]  # fmt: skip
    script = f'{binds} && exec "$@"'
    daemon = Started(
        f"docker:{host.name}",
        [
            *host.run_prefix,
            "unshare",
            "-m",
            "--propagation",
            "slave",
            "sh",
            "-c",
            script,
            "dockerd",
            *dockerd,
        ],
        host.docker_log,
        layout.name,
    )
    return daemon


def wait_for_dockerd(host: HostLayout, daemon: Started) -> None:
    wait_until(
        f"dockerd of {host.name} at {host.docker_host}",
        functools.partial(docker_answers, host.docker_host),
        READY_TIMEOUT_SECONDS,
        daemon.check_alive,
    )
    seen = sorted(
        p.name for p in Path(f"/proc/{daemon.popen.pid}/root/etc/docker/plugins").iterdir()
    )
    if seen != ["ferry.spec"]:
        raise ClusterError(
            f"dockerd of {host.name} sees plugin specs {seen}, expected only its own ferry.spec"
        )
    spec = Path(f"/proc/{daemon.popen.pid}/root/etc/docker/plugins/ferry.spec").read_text().strip()
    if spec != f"unix://{host.plugin_socket}":
        raise ClusterError(
            f"dockerd of {host.name} sees ferry.spec {spec!r}, not its own host's plugin socket"
        )
    log.info(
        "dockerd ready host=%s docker_host=%s plugin_spec=%s", host.name, host.docker_host, spec
    )


def docker_answers(docker_host: str) -> bool:
    info = ["docker", "-H", docker_host, "info", "--format", "{{.ID}}"]
    return run(info, check=False).returncode == 0


def docker_cli(
    host: HostLayout, *args: str, check: bool = True, timeout: float = SWARM_COMMAND_TIMEOUT_SECONDS
) -> subprocess.CompletedProcess[str]:
    """The docker CLI against one host's own dockerd."""
    return run(["docker", "-H", host.docker_host, *args], check=check, timeout=timeout)


def activate_plugin(host: HostLayout) -> None:
    """dockerd loads a legacy plugin (a spec file) only on first use; until then its node
    description lacks the driver and Swarm keeps tasks that need it Pending ("missing plugin
    on N nodes") for the ~20 s the description takes to refresh. A volume listing loads it."""
    docker_cli(host, "volume", "ls", "--quiet")
    log.info("plugin activated host=%s docker_host=%s", host.name, host.docker_host)


def swarm_node_id(host: HostLayout) -> str:
    return docker_cli(host, "info", "--format", "{{.Swarm.NodeID}}").stdout.strip()


def node_has_ferry_plugin(manager: HostLayout, node_id: str) -> bool:
    listed = docker_cli(
        manager, "node", "inspect", "--format", "{{json .Description.Engine.Plugins}}", node_id
    ).stdout
    plugins = json.loads(listed) or []
    return {"Type": "Volume", "Name": "ferry"} in plugins


def start_swarm(layout: Layout) -> None:
    """host1's dockerd initialises a swarm, the others join it as workers; each node gets the
    label ferry.host=<host> (every netns host has the machine's hostname, so constraints
    need the label), and `up` returns only once every node reports the ferry volume driver."""
    manager, workers = layout.hosts[0], layout.hosts[1:]
    docker_cli(
        manager, "swarm", "init",
        "--advertise-addr", manager.address,
        "--listen-addr", f"{manager.address}:{SWARM_PORT}",
    )  # fmt: skip
    token = docker_cli(manager, "swarm", "join-token", "--quiet", "worker").stdout.strip()
    for host in workers:
        docker_cli(
            host, "swarm", "join",
            "--token", token,
            "--advertise-addr", host.address,
            "--listen-addr", f"{host.address}:{SWARM_PORT}",
            f"{manager.address}:{SWARM_PORT}",
        )  # fmt: skip
    for host in layout.hosts:
        node_id = swarm_node_id(host)
        docker_cli(
            manager, "node", "update", "--label-add", f"{SWARM_HOST_LABEL}={host.name}", node_id
        )
        wait_until(
            f"swarm node of {host.name} ({node_id}) to report the ferry volume plugin",
            functools.partial(node_has_ferry_plugin, manager, node_id),
            READY_TIMEOUT_SECONDS,
            lambda: None,
        )
        log.info(
            "swarm node ready cluster=%s host=%s node=%s label=%s=%s",
            layout.name, host.name, node_id, SWARM_HOST_LABEL, host.name,
        )  # fmt: skip


def leave_swarm(described: ClusterDescription | None) -> None:
    """Workers leave first, the manager last (--force: it is the last manager), while every
    dockerd still runs, so their task containers stop and unmount their volumes through
    the still running agents. A dockerd that does not answer is skipped: it is killed next."""
    if described is None or described.swarm is None:
        return
    hosts = [h for h in described.hosts if h.docker_host]
    for host in reversed(hosts):
        leave = ["docker", "-H", str(host.docker_host), "swarm", "leave", "--force"]
        try:
            result = run(leave, check=False, timeout=SWARM_COMMAND_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("swarm leave host=%s result=no answer, dockerd is killed next", host.name)
            continue
        outcome = "left" if result.returncode == 0 else result.stderr.strip()
        log.info("swarm leave host=%s result=%s", host.name, outcome)
