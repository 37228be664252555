"""The agent's settings, from flags or FERRY_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ferry.cluster.keyspace import DEFAULT_PREFIX
from ferry.core import fencing
from ferry.metrics import parse_address
from ferry.security.tls import TlsFiles


@dataclass(frozen=True)
class AgentConfig:
    """Everything one agent needs to know about its host and its cluster."""

    node: str
    etcd: tuple[str, ...]
    pool: str
    listen: str
    advertise: str
    data_port: int
    mount_root: Path
    plugin_socket: Path | None
    tls: TlsFiles | None
    control: str = ""
    """ferry-control's HOST:PORT: the Docker plugin asks it to create and move volumes."""
    plain_streams: bool = False
    etcd_prefix: str = DEFAULT_PREFIX
    lease_ttl: int = fencing.DEFAULT_LEASE_TTL_SECONDS
    """Seconds; every self-fence duration is a share of it (``ferry.core.fencing``)."""
    resync_seconds: float = 10.0
    state_dir: Path | None = None
    """Where the agent keeps what must survive its restarts; beside the mount root if unset."""
    metrics_address: str = ""
    """HOST:PORT of the Prometheus endpoint (ferry.metrics); none when empty."""

    @property
    def docker_mounts_file(self) -> Path:
        return (self.state_dir or self.mount_root.parent / "agent-state") / "docker-mounts.json"

    def __post_init__(self) -> None:
        if not self.node:
            raise ValueError("--node is required: the name this host has in the cluster")
        if not self.etcd:
            raise ValueError("--etcd is required: HOST:PORT of at least one etcd member")
        if not self.pool:
            raise ValueError("--pool is required: the ZFS pool that holds this host's volumes")
        if self.plugin_socket is not None and not self.control:
            raise ValueError(
                "--control is required: ferry-control's HOST:PORT, which the Docker plugin "
                "(--plugin-socket) asks to create and move volumes"
            )
        fencing.check_lease_ttl(self.lease_ttl)
        if self.metrics_address:
            parse_address(self.metrics_address)
        if not 0 <= self.data_port < 65536:
            raise ValueError(f"--data-port {self.data_port} is not a TCP port (0 to 65535)")

    @property
    def encrypt_streams(self) -> bool:
        """Streams go over TLS, and only such streams are accepted, unless the agent runs
        --insecure (no TLS files) or --insecure-plain-streams."""
        return self.tls is not None and not self.plain_streams
