"""ferry-agent: the per-host Ferry agent."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click

from agent.config import AgentConfig
from agent.registration import NodeNameTaken, NodeNotAuthorized
from agent.service import run
from agent.zfs import runner
from ferry.core.fencing import DEFAULT_LEASE_TTL_SECONDS
from ferry.flags import service_flags
from ferry.logs import setup_logging
from ferry.security.tls import endpoints, from_flags

log = logging.getLogger("agent")


@click.command(context_settings={"auto_envvar_prefix": "FERRY", "show_default": True})
@click.option("--node", required=True, help="This host's name in the cluster.")
@click.option("--etcd", required=True, help="etcd endpoints, HOST:PORT[,HOST:PORT...].")
@click.option(
    "--control",
    default="",
    help="ferry-control HOST:PORT (required: the Docker plugin asks it to create and move "
    "volumes, with this node's certificate).",
)
@click.option("--pool", required=True, help="ZFS pool that holds this host's volumes.")
@click.option("--listen", default="0.0.0.0:7480", help="Address of the agent's gRPC server.")
@click.option("--advertise", default="", help="Address peers use to reach this agent.")
@click.option(
    "--data-port",
    type=int,
    default=None,
    help="TCP port for snapshot streams from peers, on the --listen host "
    "[default: the --listen port + 1].",
)
@click.option(
    "--mount-root",
    default="/var/lib/ferry/mnt",
    type=click.Path(path_type=Path),
    help="Directory under which volumes are mounted.",
)
@click.option(
    "--state-dir",
    default=None,
    type=click.Path(path_type=Path),
    help="Directory for what the agent keeps across restarts (Docker's mount IDs) "
    "[default: agent-state beside the mount root].",
)
@click.option(
    "--plugin-socket",
    default="/run/docker/plugins/ferry.sock",
    type=click.Path(path_type=Path),
    help="Unix socket of the Docker volume plugin.",
)
@click.option(
    "--insecure-plain-streams",
    is_flag=True,
    help="Send and accept snapshot streams in plain text on the data port (anyone on the "
    "network between agents can read or alter volume data; says so loudly). Default: "
    "mutual TLS, and plain streams are refused.",
)
@click.option(
    "--lease-ttl",
    type=int,
    default=DEFAULT_LEASE_TTL_SECONDS,
    help="Seconds of the agent's etcd lease, the same on every host. The agent freezes its "
    "volumes after 0.6 x this without a confirmed renewal, and a failover waits at least "
    "this long; raise it only on hosts too slow to renew in time (a VM under emulation).",
)
@service_flags(
    cert_help="This node's certificate (PEM, CN = node name).",
    key_help="This node's private key (PEM).",
)
def main(
    node: str,
    etcd: str,
    control: str,
    pool: str,
    listen: str,
    advertise: str,
    data_port: int | None,
    mount_root: Path,
    state_dir: Path | None,
    plugin_socket: Path,
    tls_ca: str,
    tls_cert: str,
    tls_key: str,
    insecure: bool,
    insecure_plain_streams: bool,
    lease_ttl: int,
    etcd_prefix: str,
    metrics_address: str,
    log_level: str,
    log_format: str,
) -> None:
    """Run the Ferry agent on this host: volumes, transfers, and the Docker plugin."""
    setup_logging(log_level, log_format)
    try:
        config = AgentConfig(
            node=node,
            etcd=endpoints(etcd),
            pool=pool,
            listen=listen,
            advertise=advertise or listen,
            data_port=_data_port(listen) if data_port is None else data_port,
            mount_root=mount_root,
            state_dir=state_dir,
            plugin_socket=plugin_socket,
            tls=from_flags(tls_ca, tls_cert, tls_key, insecure),
            control=control,
            plain_streams=insecure_plain_streams,
            etcd_prefix=etcd_prefix,
            lease_ttl=lease_ttl,
            metrics_address=metrics_address,
        )
        runner.limits()
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    try:
        asyncio.run(run(config))
    except KeyboardInterrupt:
        log.info("agent stopped")
    except (NodeNameTaken, NodeNotAuthorized) as error:
        raise click.ClickException(str(error)) from error


def _data_port(listen: str) -> int:
    """The default data port: the one after the gRPC port."""
    try:
        return int(listen.rsplit(":", 1)[1]) + 1
    except (IndexError, ValueError):
        raise click.UsageError(f"--listen {listen!r} is not HOST:PORT") from None
