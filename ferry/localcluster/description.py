"""The cluster description file (format version 1; docs/local-cluster.md): what a cluster
is, as the cluster test suite sees it.

``deploy/local-cluster up`` writes it; the Vagrant cluster writes the same format
(``vagrant/ferry_cluster.rb``); ``tests/support/cluster.py`` and local-cluster's own
``status``, ``down`` and ``load-image`` read it with ``ClusterDescription.load``. Readers
ignore unknown keys, so a new optional field needs no new version; they refuse another
version, because a change in meaning does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ferry.core import fencing

FORMAT_VERSION = 1
FILE_NAME = "cluster.yaml"


class DescriptionError(Exception):
    """The description file is missing, of another version, or malformed; says which."""


@dataclass(frozen=True)
class HostDescription:
    """One host. Paths are paths on that host; ``run_prefix`` runs a command on it as root."""

    name: str
    address: str
    run_prefix: tuple[str, ...]
    pool: str
    agent_address: str | None = None
    metrics_address: str | None = None
    """The agent's Prometheus endpoint (HTTPS unless the cluster is insecure)."""
    plugin_socket: str | None = None
    mount_root: str | None = None
    docker_host: str | None = None
    logs: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class TlsDescription:
    """Certificates, as paths on the machine running the tests; all None on a plaintext
    cluster (``--insecure`` or ``--no-agents``)."""

    insecure: bool = False
    dir: Path | None = None
    ca: Path | None = None
    user_cert: Path | None = None
    user_key: Path | None = None
    etcd_root_cert: Path | None = None
    etcd_root_key: Path | None = None


@dataclass(frozen=True)
class SwarmDescription:
    manager: str
    """The host whose dockerd manages the swarm."""
    host_label: str
    """The node label holding each node's host name."""


@dataclass(frozen=True)
class ClusterDescription:
    name: str
    hosts: tuple[HostDescription, ...]
    etcd_endpoints: tuple[str, ...]
    kind: str = "local"
    subnet: str | None = None
    etcd_log: str | None = None
    control_address: str | None = None
    """None when no ferry-control runs (``up --no-agents``)."""
    control_log: str | None = None
    control_metrics_address: str | None = None
    tls: TlsDescription = field(default_factory=TlsDescription)
    swarm: SwarmDescription | None = None
    time_scale: float = 1.0
    """How many times longer than a host of its own a step takes here (emulated guests
    sharing a machine: more than 1); the suite stretches its waits by it."""
    lease_ttl: int = fencing.DEFAULT_LEASE_TTL_SECONDS
    """The agents' ``--lease-ttl`` (more than the default on guests too slow to renew in
    time): the suite's fencing and failover expectations follow from it."""

    def __post_init__(self) -> None:
        _check_time_scale(self.time_scale)
        _check_lease_ttl(self.lease_ttl)

    def host(self, name: str) -> HostDescription | None:
        return next((host for host in self.hosts if host.name == name), None)

    @classmethod
    def load(cls, path: Path) -> ClusterDescription:
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise DescriptionError(f"cannot read cluster description {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise DescriptionError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise DescriptionError(
                f"{path} is not a version {FORMAT_VERSION} cluster description "
                "(see docs/local-cluster.md)"
            )
        try:
            described = cls.from_mapping(raw)
        except (KeyError, TypeError, AttributeError) as exc:
            raise DescriptionError(
                f"{path}: missing or malformed field {exc} (see docs/local-cluster.md)"
            ) from exc
        if not described.hosts:
            raise DescriptionError(f"{path} describes no hosts")
        return described

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_mapping(), sort_keys=False))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> ClusterDescription:
        tls = raw.get("tls") or {}
        control = raw.get("control") or {}
        swarm = raw.get("swarm")
        return cls(
            name=raw["name"],
            kind=str(raw.get("kind", "local")),
            subnet=raw.get("subnet"),
            etcd_endpoints=tuple(raw["etcd"]["endpoints"]),
            etcd_log=(raw["etcd"] or {}).get("log"),
            control_address=control.get("address"),
            control_log=control.get("log"),
            control_metrics_address=control.get("metrics"),
            tls=TlsDescription(
                insecure=bool(tls.get("insecure")),
                **{key: _optional_path(tls.get(key)) for key in _TLS_PATHS},
            ),
            hosts=tuple(
                HostDescription(
                    name=h["name"],
                    address=h["address"],
                    run_prefix=tuple(h["run"]),
                    pool=h["pool"],
                    agent_address=h.get("agent"),
                    metrics_address=h.get("metrics"),
                    plugin_socket=h.get("plugin_socket"),
                    mount_root=h.get("mount_root"),
                    docker_host=h.get("docker_host"),
                    logs=dict(h.get("logs") or {}),
                )
                for h in raw["hosts"]
            ),
            swarm=SwarmDescription(swarm["manager"], swarm["host_label"]) if swarm else None,
            time_scale=_check_time_scale(raw.get("time_scale", 1.0)),
            lease_ttl=_check_lease_ttl(raw.get("lease_ttl", fencing.DEFAULT_LEASE_TTL_SECONDS)),
        )

    def to_mapping(self) -> dict[str, object]:
        return {
            "version": FORMAT_VERSION,
            "name": self.name,
            "kind": self.kind,
            "subnet": self.subnet,
            "etcd": {"endpoints": list(self.etcd_endpoints), "log": self.etcd_log},
            "control": {
                "address": self.control_address,
                "log": self.control_log,
                "metrics": self.control_metrics_address,
            },
            "tls": {
                "insecure": self.tls.insecure,
                **{key: _optional_str(getattr(self.tls, key)) for key in _TLS_PATHS},
            },
            "hosts": [
                {
                    "name": host.name,
                    "address": host.address,
                    "run": list(host.run_prefix),
                    "pool": host.pool,
                    "agent": host.agent_address,
                    "metrics": host.metrics_address,
                    "plugin_socket": host.plugin_socket,
                    "mount_root": host.mount_root,
                    "docker_host": host.docker_host,
                    "logs": dict(host.logs),
                }
                for host in self.hosts
            ],
            "swarm": (
                {"manager": self.swarm.manager, "host_label": self.swarm.host_label}
                if self.swarm
                else None
            ),
            "time_scale": self.time_scale,
            "lease_ttl": self.lease_ttl,
        }


_TLS_PATHS = ("dir", "ca", "user_cert", "user_key", "etcd_root_cert", "etcd_root_key")


def _check_time_scale(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 1:
        raise DescriptionError(f"time_scale {value!r}: give a number of at least 1")
    return float(value)


def _check_lease_ttl(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DescriptionError(f"lease_ttl {value!r}: give a whole number of seconds")
    try:
        return fencing.check_lease_ttl(value)
    except ValueError as exc:
        raise DescriptionError(f"lease_ttl: {exc}") from exc


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _optional_str(value: Path | None) -> str | None:
    return str(value) if value is not None else None


def read_if_present(path: Path) -> ClusterDescription | None:
    """The description at ``path``; None when there is none or it is unusable, because
    ``down`` and ``status`` must work on a cluster whose ``up`` died before writing it."""
    try:
        return ClusterDescription.load(path)
    except DescriptionError:
        return None
