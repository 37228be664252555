"""Every name, address and path of a local cluster, derived from its name alone.

That derivation is what lets ``down`` find everything of a cluster (netns, links,
pools, state dir) with no state of its own, even after a crashed ``up``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from ferry.localcluster.commands import ClusterError
from ferry.localcluster.description import (
    FILE_NAME,
    ClusterDescription,
    HostDescription,
    SwarmDescription,
    TlsDescription,
)

DEFAULT_NAME = "local"
STATE_ROOT = Path("/run/ferry-cluster")
NETNS_DIR = Path("/run/netns")
STATE_MARKER = ".ferry-local-cluster"
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,7}$")
MAX_HOSTS = 20
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
CONTROL_PORT = 7070
CONTROL_METRICS_PORT = 7079
AGENT_PORT = 7080
# The data port is AGENT_PORT + 1.
AGENT_METRICS_PORT = 7089
USER_CERT_NAME = "admin"
SWARM_HOST_LABEL = "ferry.host"


@dataclass(frozen=True)
class HostLayout:
    """Where one host's pieces live; all names are derived from the cluster name."""

    index: int
    name: str
    netns: str
    address: str
    veth: str
    veth_peer: str
    pool: str
    dir: Path

    @property
    def run_prefix(self) -> list[str]:
        return ["nsenter", f"--net={NETNS_DIR / self.netns}"]

    @property
    def pool_file(self) -> Path:
        return self.dir / "pool.img"

    @property
    def pool_mountpoint(self) -> Path:
        return self.dir / "pool"

    @property
    def mount_root(self) -> Path:
        return self.dir / "mnt"

    @property
    def plugin_socket(self) -> Path:
        return self.dir / "plugins" / "ferry.sock"

    @property
    def agent_address(self) -> str:
        return f"{self.address}:{AGENT_PORT}"

    @property
    def metrics_address(self) -> str:
        return f"{self.address}:{AGENT_METRICS_PORT}"

    @property
    def agent_log(self) -> Path:
        return self.dir / "agent.log"

    @property
    def docker_dir(self) -> Path:
        return self.dir / "docker"

    @property
    def docker_socket(self) -> Path:
        return self.docker_dir / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.docker_socket}"

    @property
    def docker_log(self) -> Path:
        return self.dir / "dockerd.log"

    @property
    def docker_etc_plugins(self) -> Path:
        return self.docker_dir / "etc-plugins"

    @property
    def docker_run_plugins(self) -> Path:
        return self.docker_dir / "run-plugins"


@dataclass(frozen=True)
class Layout:
    """The whole cluster's names, addresses and paths."""

    name: str
    state_dir: Path
    subnet: ipaddress.IPv4Network
    hosts: tuple[HostLayout, ...]

    @property
    def bridge(self) -> str:
        return f"fbr-{self.name}"

    @property
    def bridge_address(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def etcd_endpoint(self) -> str:
        return f"{self.bridge_address}:{ETCD_CLIENT_PORT}"

    @property
    def control_address(self) -> str:
        return f"{self.bridge_address}:{CONTROL_PORT}"

    @property
    def control_metrics_address(self) -> str:
        return f"{self.bridge_address}:{CONTROL_METRICS_PORT}"

    @property
    def certs_dir(self) -> Path:
        return self.state_dir / "certs"

    @property
    def description_file(self) -> Path:
        return description_file(self.state_dir)


def validate_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ClusterError(
            f"cluster name {name!r} is not usable: use 1-8 lower-case letters or digits, "
            "starting with a letter (it becomes part of interface names, which are "
            "limited to 15 characters)"
        )
    return name


def default_state_dir(name: str) -> Path:
    return STATE_ROOT / name


def description_file(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def netns_name(name: str, index: int) -> str:
    return f"ferry-{name}-host{index}"


def is_cluster_host_name(name: str, candidate: str) -> bool:
    """Whether a netns or pool name belongs to cluster `name` (same pattern for both)."""
    return re.fullmatch(rf"ferry-{name}-host\d+", candidate) is not None


def make_layout(name: str, state_dir: Path, subnet: ipaddress.IPv4Network, count: int) -> Layout:
    hosts = tuple(
        HostLayout(
            index=i,
            name=f"host{i}",
            netns=netns_name(name, i),
            address=str(subnet.network_address + 1 + i),
            veth=f"fve-{name}-{i}",
            veth_peer=f"fvp-{name}-{i}",
            pool=netns_name(name, i),
            dir=state_dir / "hosts" / f"host{i}",
        )
        for i in range(1, count + 1)
    )
    return Layout(name=name, state_dir=state_dir, subnet=subnet, hosts=hosts)


def describe(
    layout: Layout, docker: bool, insecure: bool, agents: bool, swarm: bool = False
) -> ClusterDescription:
    """What `up` made, as the description file states it."""
    certs = layout.certs_dir
    secure = agents and not insecure
    return ClusterDescription(
        name=layout.name,
        kind="local",
        subnet=str(layout.subnet),
        etcd_endpoints=(layout.etcd_endpoint,),
        etcd_log=str(layout.state_dir / "etcd.log"),
        control_address=layout.control_address if agents else None,
        control_log=str(layout.state_dir / "control.log") if agents else None,
        control_metrics_address=layout.control_metrics_address if agents else None,
        tls=TlsDescription(
            insecure=insecure,
            dir=certs if secure else None,
            ca=certs / "ca.crt" if secure else None,
            user_cert=certs / f"{USER_CERT_NAME}.crt" if secure else None,
            user_key=certs / f"{USER_CERT_NAME}.key" if secure else None,
            etcd_root_cert=certs / "root.crt" if secure else None,
            etcd_root_key=certs / "root.key" if secure else None,
        ),
        hosts=tuple(
            HostDescription(
                name=host.name,
                address=host.address,
                run_prefix=tuple(host.run_prefix),
                pool=host.pool,
                agent_address=host.agent_address if agents else None,
                metrics_address=host.metrics_address if agents else None,
                plugin_socket=str(host.plugin_socket),
                mount_root=str(host.mount_root),
                docker_host=host.docker_host if docker else None,
                logs={
                    "agent": str(host.agent_log) if agents else None,
                    "docker": str(host.docker_log) if docker else None,
                },
            )
            for host in layout.hosts
        ),
        swarm=SwarmDescription(layout.hosts[0].name, SWARM_HOST_LABEL) if swarm else None,
    )
