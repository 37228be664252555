"""The cluster network: a bridge in the root namespace, a network namespace per host on
a veth, and the check that every host reaches every other host and etcd.

The namespaces have no default route and nothing here changes forwarding or firewall
settings, so only the cluster's own addresses and loopback carry traffic.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import subprocess
import sys
import zlib

from ferry.localcluster.commands import ClusterError, run
from ferry.localcluster.layout import Layout, is_cluster_host_name

log = logging.getLogger("local-cluster")

SUBNET_PREFIX = "10.212"
PROBE_PORT = 7099


def used_subnets() -> set[str]:
    out = ip("-o -4 addr show").stdout + ip("-4 route show").stdout
    return set(re.findall(r"\b(\d+\.\d+\.\d+)\.\d+", out))


def choose_subnet(name: str) -> ipaddress.IPv4Network:
    """10.212.<k>.0/24 with k derived from the name, moved on while another one uses it."""
    taken = used_subnets()
    start = zlib.crc32(name.encode()) % 256
    for step in range(256):
        k = (start + step) % 256
        if f"{SUBNET_PREFIX}.{k}" not in taken:
            return ipaddress.IPv4Network(f"{SUBNET_PREFIX}.{k}.0/24")
    raise ClusterError(
        f"every {SUBNET_PREFIX}.x.0/24 subnet is in use; run 'local-cluster down' for old clusters"
    )


def ip(command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip` with a command line made of names and addresses (no quoting needed)."""
    return run(["ip", *command.split()], check=check)


def create_network(layout: Layout) -> None:
    prefix = layout.subnet.prefixlen
    ip(f"link add {layout.bridge} type bridge")
    ip(f"addr add {layout.bridge_address}/{prefix} dev {layout.bridge}")
    ip(f"link set {layout.bridge} up")
    for host in layout.hosts:
        ns = host.netns
        ip(f"netns add {ns}")
        ip(f"link add {host.veth} type veth peer name {host.veth_peer} netns {ns}")
        ip(f"link set {host.veth} master {layout.bridge} up")
        ip(f"-n {ns} link set {host.veth_peer} name eth0")
        ip(f"-n {ns} addr add {host.address}/{prefix} dev eth0")
        ip(f"-n {ns} link set eth0 up")
        ip(f"-n {ns} link set lo up")
        log.info(
            "host up cluster=%s host=%s netns=%s address=%s",
            layout.name,
            host.name,
            ns,
            host.address,
        )


PROBE_LISTENER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64); print("ready", flush=True)
while True:
    s.accept()[0].close()
"""

PROBE_CONNECTOR = """
import socket, sys
bad = []
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        bad.append(f"{target} ({exc})")
print(", ".join(bad))
sys.exit(1 if bad else 0)
"""


def check_reachability(layout: Layout) -> None:
    """Every host connects over TCP to every other host and to the bridge address (etcd)."""
    listeners = []
    try:
        for host in layout.hosts:
            listener = subprocess.Popen(
                [
                    *host.run_prefix,
                    sys.executable,
                    "-c",
                    PROBE_LISTENER,
                    host.address,
                    str(PROBE_PORT),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            listeners.append(listener)
            assert listener.stdout is not None
            if listener.stdout.readline().strip() != "ready":
                raise ClusterError(
                    f"probe listener in {host.netns} failed: {listener.communicate()[1].strip()}"
                )
        for host in layout.hosts:
            targets = [
                f"{other.address}:{PROBE_PORT}" for other in layout.hosts if other is not host
            ]
            targets.append(layout.etcd_endpoint)
            result = run(
                [*host.run_prefix, sys.executable, "-c", PROBE_CONNECTOR, *targets], check=False
            )
            if result.returncode != 0:
                raise ClusterError(
                    f"{host.name} ({host.address}) cannot reach {result.stdout.strip()}; "
                    f"check that bridge {layout.bridge} is up and that no firewall filters "
                    "bridged traffic (bridge-nf-call-iptables with a FORWARD DROP policy)"
                )
    finally:
        for listener in listeners:
            listener.kill()
            listener.communicate()
    log.info(
        "reachability ok cluster=%s hosts=%d bridge=%s",
        layout.name,
        len(layout.hosts),
        layout.bridge_address,
    )


def cluster_netns(name: str) -> list[str]:
    listing = ip("netns list").stdout.splitlines()
    names = (line.split()[0] for line in listing if line.strip())
    return [netns for netns in names if is_cluster_host_name(name, netns)]


def delete_network(name: str) -> None:
    links = ip("-o link show").stdout
    for netns in cluster_netns(name):
        ip(f"netns delete {netns}")
        log.info("deleted netns=%s", netns)
    for link in re.findall(rf"^\d+: (fve-{name}-\d+)@", links, re.MULTILINE):
        ip(f"link delete {link}", check=False)
    if re.search(rf"^\d+: fbr-{name}:", links, re.MULTILINE):
        ip(f"link delete fbr-{name}")
        log.info("deleted bridge=fbr-%s", name)
