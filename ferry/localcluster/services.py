"""The Ferry processes and etcd: etcd and ferry-control in the root namespace on the
bridge address, a ferry-agent in each host's network namespace.

Each is a ``Started`` process whose command line is kept beside its log, so
``local-cluster process ROLE start`` can start it again the same way.
"""

from __future__ import annotations

import http.client
import logging
import ssl

from ferry.localcluster.certificates import ETCD_MEMBER, ETCD_ROOT, identity, tls_flags
from ferry.localcluster.commands import READY_TIMEOUT_SECONDS, run, tcp_open, wait_until
from ferry.localcluster.layout import (
    AGENT_PORT,
    CONTROL_PORT,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    HostLayout,
    Layout,
)
from ferry.localcluster.processes import Started
from ferry.security.ca import ETCD_SERVER_NAME

log = logging.getLogger("local-cluster")


def etcd_tls_flags(layout: Layout) -> list[str]:
    """Client and peer mutual TLS from the cluster CA, the member certificate ``etcd``."""
    files = identity(layout, ETCD_MEMBER)
    ca, cert, key = str(files.ca), str(files.cert), str(files.key)
    return [
        "--client-cert-auth", "--trusted-ca-file", ca, "--cert-file", cert, "--key-file", key,
        "--peer-client-cert-auth", "--peer-trusted-ca-file", ca,
        "--peer-cert-file", cert, "--peer-key-file", key,
        # Only a member certificate (it names "etcd") may be a peer: not a node's.
        "--peer-cert-allowed-hostname", ETCD_SERVER_NAME,
    ]  # fmt: skip


def etcd_health_connection(layout: Layout, secure: bool) -> http.client.HTTPConnection:
    """A connection to etcd's /health: over mutual TLS as etcd's root when etcd is secure."""
    address = layout.bridge_address
    if not secure:
        return http.client.HTTPConnection(address, ETCD_CLIENT_PORT, timeout=2)
    context = identity(layout, ETCD_ROOT).ssl_context(ssl.Purpose.SERVER_AUTH)
    return http.client.HTTPSConnection(address, ETCD_CLIENT_PORT, timeout=2, context=context)


def start_etcd(layout: Layout, secure: bool) -> Started:
    """etcd on the bridge address; ``secure``: on mutual TLS (then bootstrap_etcd turns auth on)."""
    address = layout.bridge_address
    scheme = "https" if secure else "http"
    client_url = f"{scheme}://{address}:{ETCD_CLIENT_PORT}"
    peer_url = f"{scheme}://{address}:{ETCD_PEER_PORT}"
    etcd = Started(
        "etcd",
        [
            "etcd",
            "--name", f"ferry-{layout.name}",
            "--data-dir", str(layout.state_dir / "etcd"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"ferry-{layout.name}={peer_url}",
            "--initial-cluster-token", f"ferry-{layout.name}",
            "--initial-cluster-state", "new",
            "--logger", "zap",
            *(etcd_tls_flags(layout) if secure else []),
        ],
        layout.state_dir / "etcd.log",
        layout.name,
    )  # fmt: skip

    def healthy() -> bool:
        connection = etcd_health_connection(layout, secure)
        try:
            connection.request("GET", "/health")
            return b'"health":"true"' in connection.getresponse().read()
        except OSError:
            return False
        finally:
            connection.close()

    wait_until(f"etcd at {client_url}", healthy, READY_TIMEOUT_SECONDS, etcd.check_alive)
    log.info("etcd ready cluster=%s endpoint=%s tls=%s", layout.name, layout.etcd_endpoint, secure)
    return etcd


def bootstrap_etcd(layout: Layout, bootstrap: str) -> None:
    """ferry-etcd-bootstrap as etcd's root: users and roles for control and each host, auth on."""
    nodes = [flag for host in layout.hosts for flag in ("--node", host.name)]
    run([bootstrap, "--etcd", layout.etcd_endpoint, *tls_flags(layout, ETCD_ROOT, False), *nodes])
    log.info(
        "etcd auth enabled cluster=%s users=control,%s",
        layout.name,
        ",".join(host.name for host in layout.hosts),
    )


def start_control(layout: Layout, command: str, insecure: bool) -> Started:
    control = Started(
        "control",
        [
            command,
            "--etcd", layout.etcd_endpoint,
            "--listen", layout.control_address,
            "--metrics-address", layout.control_metrics_address,
            *tls_flags(layout, "control", insecure),
        ],
        layout.state_dir / "control.log",
        layout.name,
    )  # fmt: skip
    wait_until(
        f"ferry-control at {layout.control_address}",
        lambda: tcp_open(layout.bridge_address, CONTROL_PORT),
        READY_TIMEOUT_SECONDS,
        control.check_alive,
    )
    log.info("control ready cluster=%s address=%s", layout.name, layout.control_address)
    return control


def start_agent(layout: Layout, host: HostLayout, command: str, insecure: bool) -> Started:
    host.mount_root.mkdir(parents=True, exist_ok=True)
    host.plugin_socket.parent.mkdir(parents=True, exist_ok=True)
    argv = [
            *host.run_prefix,
            command,
            "--node", host.name,
            "--etcd", layout.etcd_endpoint,
            "--control", layout.control_address,
            "--pool", host.pool,
            "--listen", host.agent_address,
            "--advertise", host.agent_address,
            "--metrics-address", host.metrics_address,
            "--mount-root", str(host.mount_root),
            "--plugin-socket", str(host.plugin_socket),
            *tls_flags(layout, host.name, insecure),
    ]  # fmt: skip
    return Started(f"agent:{host.name}", argv, host.agent_log, layout.name)


def wait_for_agent(host: HostLayout, agent: Started) -> None:
    """Ready when its gRPC port answers; the plugin socket may come a moment later."""
    wait_until(
        f"ferry-agent on {host.name} ({host.agent_address})",
        lambda: tcp_open(host.address, AGENT_PORT),
        READY_TIMEOUT_SECONDS,
        agent.check_alive,
    )
    plugin = "listening" if host.plugin_socket.is_socket() else "not yet created"
    log.info(
        "agent ready host=%s address=%s plugin_socket=%s (%s)",
        host.name, host.agent_address, host.plugin_socket, plugin,
    )  # fmt: skip
