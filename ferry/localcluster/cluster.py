"""The commands of local-cluster: ``up``, ``down``, ``status``, ``load-image`` and
``process``.

``up`` makes the network, pools, certificates, etcd, control, agents and dockerds in that
order and writes the description file last; ``down`` finds everything from the cluster
name alone (the marker in each process's environment, the derived names of netns, links
and pools), so it cleans up after a crashed ``up`` and can run any number of times.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferry.localcluster.certificates import issue_certificates
from ferry.localcluster.commands import (
    READY_TIMEOUT_SECONDS,
    ClusterError,
    ferry_command,
    require_root,
    run,
    tcp_open,
    wait_until,
)
from ferry.localcluster.description import HostDescription, read_if_present
from ferry.localcluster.dockerd import (
    DOCKER_PLUGIN_DIRS,
    activate_plugin,
    docker_answers,
    leave_swarm,
    start_dockerd,
    start_swarm,
    wait_for_dockerd,
)
from ferry.localcluster.layout import (
    MAX_HOSTS,
    NETNS_DIR,
    STATE_MARKER,
    Layout,
    describe,
    description_file,
    make_layout,
    netns_name,
)
from ferry.localcluster.network import (
    check_reachability,
    choose_subnet,
    cluster_netns,
    create_network,
    delete_network,
)
from ferry.localcluster.processes import (
    Started,
    argv_file,
    cluster_processes,
    is_gone,
    main_pids_by_role,
    processes_in_netns,
    stop_pids,
    stop_role,
    with_descendants,
)
from ferry.localcluster.services import (
    bootstrap_etcd,
    start_agent,
    start_control,
    start_etcd,
    wait_for_agent,
)
from ferry.localcluster.storage import (
    cluster_pools,
    create_pool,
    destroy_pools,
    ensure_zfs,
    make_shared_mount,
    mounts_under,
    unmount_all,
)

log = logging.getLogger("local-cluster")


def refuse_existing(name: str, state_dir: Path) -> None:
    """Checked before `up` arms its clean-up: a second `up` never tears down a running cluster."""
    require_root()
    if (NETNS_DIR / netns_name(name, 1)).exists() or state_dir.exists():
        raise ClusterError(
            f"cluster {name!r} already exists (netns or {state_dir}); "
            f"run 'local-cluster down --name {name}' first or choose another --name"
        )


def find_ferry_commands(ferry_bin: Path | None) -> tuple[str, str, str, str]:
    """ferry-agent, ferry-control, ferryctl and ferry-etcd-bootstrap, or an error naming what
    is missing."""
    names = ("ferry-agent", "ferry-control", "ferryctl", "ferry-etcd-bootstrap")
    found = {name: ferry_command(name, ferry_bin) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ClusterError(
            f"{', '.join(missing)} not found; install Ferry (pip install -e .) or pass --no-agents"
        )
    agent, control, ferryctl, bootstrap = found.values()
    assert agent and control and ferryctl and bootstrap
    return agent, control, ferryctl, bootstrap


@dataclass(frozen=True)
class UpOptions:
    hosts: int
    docker: bool
    insecure: bool
    agents: bool
    pool_size: int
    ferry_bin: Path | None
    swarm: bool = False


def up(name: str, state_dir: Path, options: UpOptions) -> Layout:
    count, insecure, docker = options.hosts, options.insecure, options.docker or options.swarm
    if options.swarm and not options.agents:
        raise ClusterError("--swarm needs the agents (their Ferry plugin); drop --no-agents")
    if not 1 <= count <= MAX_HOSTS:
        raise ClusterError(f"--hosts must be between 1 and {MAX_HOSTS}")
    commands = find_ferry_commands(options.ferry_bin) if options.agents else None
    ensure_zfs()
    state_dir.mkdir(parents=True)
    (state_dir / STATE_MARKER).write_text(f"{name}\n")
    make_shared_mount(state_dir)
    layout = make_layout(name, state_dir, choose_subnet(name), count)
    log.info(
        "bringing up cluster=%s hosts=%d subnet=%s dir=%s", name, count, layout.subnet, state_dir
    )
    create_network(layout)
    for host in layout.hosts:
        create_pool(host, options.pool_size)
    secure = bool(commands) and not insecure
    if commands and secure:
        issue_certificates(layout, commands[2])
    start_etcd(layout, secure)
    check_reachability(layout)
    if commands:
        agent_command, control_command, _, bootstrap = commands
        if insecure:
            log.warning("cluster=%s runs WITHOUT TLS (--insecure): local development only", name)
        else:
            bootstrap_etcd(layout, bootstrap)
        start_control(layout, control_command, insecure)
        for host in layout.hosts:
            host.mount_root.mkdir(parents=True)
            make_shared_mount(host.mount_root)
        agents_started = [
            (h, start_agent(layout, h, agent_command, insecure)) for h in layout.hosts
        ]
        for host, agent in agents_started:
            wait_for_agent(host, agent)
    if docker:
        for directory in DOCKER_PLUGIN_DIRS:
            directory.mkdir(parents=True, exist_ok=True)
        daemons = [(host, start_dockerd(layout, host)) for host in layout.hosts]
        for host, daemon in daemons:
            wait_for_dockerd(host, daemon)
    if options.swarm:
        for host in layout.hosts:
            activate_plugin(host)
        start_swarm(layout)
    describe(layout, docker, insecure, options.agents, options.swarm).save(layout.description_file)
    log.info("cluster ready cluster=%s description=%s", name, layout.description_file)
    return layout


def stop_processes(name: str) -> None:
    """Ferry agents first (they hold mounts), then dockerds, control, etcd; then any process
    still marked as this cluster's or still living in one of its network namespaces."""
    for role_prefix in ("agent:", "docker:", "control", "etcd"):
        roles = {p.role for p in cluster_processes(name) if p.role.startswith(role_prefix)}
        for role in sorted(roles):
            stop_role(name, role)
    leftovers = {p.pid for p in cluster_processes(name)}
    for netns in cluster_netns(name):
        leftovers.update(processes_in_netns(netns))
    if leftovers:
        stop_pids("leftover", sorted(leftovers), sorted(leftovers))


def delete_state_dir(state_dir: Path) -> None:
    if not state_dir.exists():
        return
    unmount_all(state_dir)
    remaining = mounts_under(state_dir)
    if remaining:
        raise ClusterError(
            f"mounts remain under {state_dir}: {[str(p) for p in remaining]}; "
            "unmount them (umount -l) and run down again"
        )
    if not (state_dir / STATE_MARKER).exists() and any(state_dir.iterdir()):
        raise ClusterError(
            f"{state_dir} was not made by local-cluster (no {STATE_MARKER}); not deleting it"
        )
    # Agents make the directory under each mount immutable (nothing lands on the host's disk
    # under an unmounted volume); the flag must go before the tree can.
    guarded = [str(p) for p in state_dir.glob("hosts/*/mnt/*") if p.is_dir()]
    if guarded:
        run(["chattr", "-i", *guarded], check=False)
    shutil.rmtree(state_dir)
    log.info("deleted state_dir=%s", state_dir)


def down(name: str, state_dir: Path) -> None:
    require_root()
    leave_swarm(read_if_present(description_file(state_dir)))
    stop_processes(name)
    destroy_pools(name)
    delete_network(name)
    delete_state_dir(state_dir)
    log.info("cluster down cluster=%s", name)


def host_status(
    host: HostDescription, netns: list[str], pools: dict[str, str], pids: dict[str, list[int]]
) -> dict[str, object]:
    agent_pids = pids.get(f"agent:{host.name}", [])
    docker_ok = docker_answers(host.docker_host) if host.docker_host else None
    healthy = (
        host.pool in netns
        and pools.get(host.pool) == "ONLINE"
        and (bool(agent_pids) or not host.agent_address)
        and docker_ok is not False
    )
    return {
        "name": host.name,
        "address": host.address,
        "healthy": healthy,
        "netns": host.pool in netns,
        "pool": host.pool,
        "pool_health": pools.get(host.pool),
        "agent_pids": agent_pids,
        "docker_pids": pids.get(f"docker:{host.name}", []),
        "docker_answers": docker_ok,
    }


def status(name: str, state_dir: Path) -> dict[str, object]:
    described = read_if_present(description_file(state_dir))
    pids = main_pids_by_role(name)
    pools = cluster_pools(name)
    netns = cluster_netns(name)
    hosts = [host_status(h, netns, pools, pids) for h in described.hosts] if described else []
    healthy = (
        described is not None
        and bool(pids.get("etcd"))
        and (bool(pids.get("control")) or not described.control_address)
        and all(h["healthy"] for h in hosts)
    )
    return {
        "name": name,
        "state_dir": str(state_dir),
        "description_file": str(description_file(state_dir)) if described else None,
        "exists": bool(described or pids or pools or netns),
        "healthy": healthy,
        "etcd_pids": pids.get("etcd", []),
        "control_pids": pids.get("control", []),
        "netns": netns,
        "pools": pools,
        "hosts": hosts,
    }


def format_status(report: dict[str, Any]) -> str:
    state = "healthy" if report["healthy"] else "NOT healthy" if report["exists"] else "not running"
    lines = [
        f"cluster {report['name']}: {state}",
        f"  state dir   {report['state_dir']}",
        f"  etcd        pids {report['etcd_pids'] or 'not running'}",
        f"  control     pids {report['control_pids'] or 'not running'}",
    ]
    docker_words = {None: "no dockerd", True: "dockerd answers", False: "dockerd NOT answering"}
    for host in report["hosts"]:
        lines.append(
            f"  {host['name']:<8} {host['address']:<14} "
            f"netns {'ok' if host['netns'] else 'MISSING'}, "
            f"pool {host['pool_health'] or 'MISSING'}, "
            f"agent {host['agent_pids'] or 'not running'}, "
            f"{docker_words[host['docker_answers']]}"
        )
    return "\n".join(lines)


def load_image(name: str, state_dir: Path, image: Path) -> None:
    described = read_if_present(description_file(state_dir))
    if described is None:
        raise ClusterError(
            f"no cluster description at {description_file(state_dir)}; "
            "run 'local-cluster up --docker' first"
        )
    targets = [h for h in described.hosts if h.docker_host]
    if not targets:
        raise ClusterError(f"cluster {name!r} runs no dockerd per host; bring it up with --docker")
    if not image.is_file():
        raise ClusterError(f"{image} is not a file; make one with 'docker save -o FILE IMAGE'")
    for host in targets:
        started = time.monotonic()
        load = ["docker", "-H", str(host.docker_host), "load", "-i", str(image)]
        result = run(load, timeout=600)
        log.info(
            "image loaded host=%s file=%s seconds=%.1f output=%s",
            host.name, image, time.monotonic() - started, result.stdout.strip(),
        )  # fmt: skip


def role_log(state_dir: Path, role: str) -> Path:
    kind, _, host = role.partition(":")
    if kind == "agent" and host:
        return state_dir / "hosts" / host / "agent.log"
    if kind == "docker" and host:
        return state_dir / "hosts" / host / "dockerd.log"
    if role in ("etcd", "control"):
        return state_dir / f"{role}.log"
    raise ClusterError(f"unknown role {role!r}: use etcd, control, agent:HOST or docker:HOST")


def process_action(name: str, state_dir: Path, role: str, action: str) -> None:
    """Kill, stop or start etcd, control, one host's agent or one host's dockerd (fault
    tests, experiments). Killing a dockerd kills its containers with it, as losing the
    host would: every process of the role (containerd, the shims) and their descendants."""
    log_path = role_log(state_dir, role)
    if not argv_file(log_path).exists():
        raise ClusterError(f"cluster {name} never started {role} (no {argv_file(log_path)})")
    if action == "start":
        if main_pids_by_role(name).get(role):
            raise ClusterError(f"{role} is already running")
        if role.startswith("docker:"):
            # Left by a killed dockerd, which refuses to start while it exists.
            (log_path.parent / "docker" / "docker.pid").unlink(missing_ok=True)
        started = Started(role, json.loads(argv_file(log_path).read_text()), log_path, name)
        if role.startswith("agent:"):
            wait_for_restarted_agent(state_dir, role, started)
        if role.startswith("docker:"):
            wait_for_restarted_dockerd(state_dir, role, started)
        return
    sig = signal.SIGKILL if action == "kill" else signal.SIGTERM
    pids = main_pids_by_role(name).get(role, [])
    if not pids:
        raise ClusterError(f"{role} is not running")
    if role.startswith("docker:") and action == "kill":
        pids = with_descendants([p.pid for p in cluster_processes(name) if p.role == role])
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    wait_until(
        f"{role} to exit",
        lambda: not main_pids_by_role(name).get(role) and all(is_gone(p) for p in pids),
        READY_TIMEOUT_SECONDS,
        lambda: None,
    )
    log.info("%s %s pids=%s", role, "killed" if action == "kill" else "stopped", pids)


def wait_for_restarted_dockerd(state_dir: Path, role: str, daemon: Started) -> None:
    """`process docker:HOST start` returns once the dockerd answers, as `up` does."""
    host = role.split(":", 1)[1]
    described = read_if_present(description_file(state_dir))
    found = described.host(host) if described else None
    if found is None or not found.docker_host:
        return
    docker_host = found.docker_host
    wait_until(
        f"dockerd of {host} at {docker_host}",
        lambda: docker_answers(docker_host),
        READY_TIMEOUT_SECONDS,
        daemon.check_alive,
    )
    log.info("dockerd ready host=%s docker_host=%s", host, docker_host)


def wait_for_restarted_agent(state_dir: Path, role: str, agent: Started) -> None:
    """`process agent:HOST start` returns once the agent serves, as `up` does: its gRPC port
    opens only after it registered, so a move to the host right after does not find it down."""
    host = role.split(":", 1)[1]
    described = read_if_present(description_file(state_dir))
    found = described.host(host) if described else None
    address = found.agent_address if found else None
    if not address:
        return
    ip_address, port = str(address).rsplit(":", 1)
    wait_until(
        f"ferry-agent on {host} ({address})",
        lambda: tcp_open(ip_address, int(port)),
        READY_TIMEOUT_SECONDS,
        agent.check_alive,
    )
    log.info("agent ready host=%s address=%s", host, address)
