"""A Ferry cluster as the cluster test suite sees it: whatever one description file says.

The file (format in docs/local-cluster.md) names the hosts, their addresses and
how to run a command on each (an argv prefix: ``nsenter --net=...`` for the
netns hosts of ``deploy/local-cluster``, ``vagrant ssh NODE -- sudo`` for
Vagrant nodes), plus etcd, control, certificates and logs. Tests use only this
class, so the same suite runs against any cluster that has such a file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import yaml

from ferry.cluster.keyspace import endpoints_client
from ferry.security.tls import TlsFiles

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "deploy" / "local-cluster"
FORMAT_VERSION = 1
COMMAND_TIMEOUT_SECONDS = 300.0


class ClusterError(RuntimeError):
    """The description file is unusable or a cluster command failed; the message says which."""


@dataclass(frozen=True)
class ClusterHost:
    name: str
    address: str
    run_prefix: tuple[str, ...]
    pool: str
    agent_address: str | None
    plugin_socket: str | None
    mount_root: str | None
    docker_host: str | None
    logs: Mapping[str, str | None]


@dataclass(frozen=True)
class Cluster:
    path: Path
    name: str
    hosts: tuple[ClusterHost, ...]
    etcd_endpoints: tuple[str, ...]
    control_address: str | None
    insecure: bool
    tls_ca: Path | None
    user_cert: Path | None
    user_key: Path | None
    logs: Mapping[str, str | None]
    kind: str = "local"
    etcd_root_cert: Path | None = None
    etcd_root_key: Path | None = None
    swarm_manager: str | None = None
    """The host whose dockerd manages a Docker Swarm of all hosts' dockerds, if any."""

    @classmethod
    def load(cls, path: Path) -> Cluster:
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ClusterError(f"cannot read cluster description {path}: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
            raise ClusterError(
                f"{path} is not a version {FORMAT_VERSION} cluster description "
                "(see docs/local-cluster.md)"
            )
        try:
            return cls._from_mapping(path, raw)
        except (KeyError, TypeError) as exc:
            raise ClusterError(
                f"{path}: missing or malformed field {exc} (see docs/local-cluster.md)"
            ) from exc

    @classmethod
    def _from_mapping(cls, path: Path, raw: dict[str, Any]) -> Cluster:
        hosts = tuple(
            ClusterHost(
                name=h["name"],
                address=h["address"],
                run_prefix=tuple(h["run"]),
                pool=h["pool"],
                agent_address=h.get("agent"),
                plugin_socket=h.get("plugin_socket"),
                mount_root=h.get("mount_root"),
                docker_host=h.get("docker_host"),
                logs=dict(h.get("logs") or {}),
            )
            for h in raw["hosts"]
        )
        if not hosts:
            raise ClusterError(f"{path} describes no hosts")
        tls = raw.get("tls") or {}
        control = raw.get("control") or {}
        return cls(
            path=path,
            name=raw["name"],
            hosts=hosts,
            etcd_endpoints=tuple(raw["etcd"]["endpoints"]),
            control_address=control.get("address"),
            insecure=bool(tls.get("insecure")),
            tls_ca=_optional_path(tls.get("ca")),
            user_cert=_optional_path(tls.get("user_cert")),
            user_key=_optional_path(tls.get("user_key")),
            logs={
                "etcd": (raw["etcd"] or {}).get("log"),
                "control": control.get("log"),
            },
            kind=str(raw.get("kind", "local")),
            etcd_root_cert=_optional_path(tls.get("etcd_root_cert")),
            etcd_root_key=_optional_path(tls.get("etcd_root_key")),
            swarm_manager=(raw.get("swarm") or {}).get("manager"),
        )

    @property
    def etcd_root(self) -> TlsFiles | None:
        """etcd's administrator certificate (None for a plaintext etcd: insecure, no agents)."""
        if self.tls_ca and self.etcd_root_cert and self.etcd_root_key:
            return TlsFiles(self.tls_ca, self.etcd_root_cert, self.etcd_root_key)
        return None

    def etcd_client(self, tls: TlsFiles | None = None) -> aetcd.Client:
        """A client of the cluster's etcd as ``tls`` names it; by default etcd's root."""
        return endpoints_client(self.etcd_endpoints, tls or self.etcd_root)

    def host(self, name: str) -> ClusterHost:
        for host in self.hosts:
            if host.name == name:
                return host
        raise ClusterError(f"{self.path} has no host {name!r}; it has {self.host_names}")

    @property
    def host_names(self) -> list[str]:
        return [host.name for host in self.hosts]

    def run(
        self,
        host: str | ClusterHost,
        argv: Sequence[str],
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_SECONDS,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on a host through its argv prefix; `input` goes to its stdin.
        Pass plain words: a remote prefix (ssh) joins them with spaces, so avoid `sh -c`."""
        target = host if isinstance(host, ClusterHost) else self.host(host)
        return _run([*target.run_prefix, *argv], check, timeout, input=input)

    def ferryctl(
        self, args: Sequence[str], check: bool = True, timeout: float = COMMAND_TIMEOUT_SECONDS
    ) -> subprocess.CompletedProcess[str]:
        """Run ferryctl on this machine against the cluster's control, with its user certificate."""
        if self.control_address is None:
            raise ClusterError(f"cluster {self.name} runs no ferry-control (up --no-agents)")
        command = _ferry_command("ferryctl")
        return _run([command, *args], check, timeout, env=self.ferryctl_environment())

    def volume(self, name: str) -> dict[str, Any]:
        """``ferryctl volume get NAME -o json``, parsed."""
        return dict(json.loads(self.ferryctl(["volume", "get", name, "-o", "json"]).stdout))

    def ferryctl_environment(self) -> dict[str, str]:
        """FERRY_* variables ferryctl reads in place of its --control/--tls-* flags."""
        env = dict(os.environ, FERRY_CONTROL=self.control_address or "")
        if self.insecure:
            env["FERRY_INSECURE"] = "1"
        elif self.tls_ca and self.user_cert and self.user_key:
            env.update(
                FERRY_TLS_CA=str(self.tls_ca),
                FERRY_TLS_CERT=str(self.user_cert),
                FERRY_TLS_KEY=str(self.user_key),
            )
        return env

    def agent(self, host: str, action: str, env: Mapping[str, str] | None = None) -> None:
        """Kill (SIGKILL), stop (SIGTERM) or start a host's agent: local-cluster's own
        command for netns hosts, systemd's on real machines. ``env`` adds FERRY_*
        settings (FERRY_FAILPOINTS, FERRY_INSECURE_PLAIN_STREAMS) to the started agent (local
        clusters only)."""
        if self.kind == "local":
            self.local_process(f"agent:{host}", action, env)
            return
        verbs = {"kill": ["kill", "--signal=SIGKILL"], "stop": ["stop"], "start": ["start"]}
        self.run(host, ["systemctl", *verbs[action], "ferry-agent"])

    def local_process(self, role: str, action: str, env: Mapping[str, str] | None = None) -> None:
        """Kill, stop or start etcd, control or agent:HOST of a local cluster."""
        result = local_cluster_command("process", "--name", self.name, role, action, env=env)
        if result.returncode != 0:
            raise ClusterError(f"local-cluster process {role} {action} failed: {result.stderr}")

    def docker(
        self,
        host: str | ClusterHost,
        args: Sequence[str],
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_SECONDS,
    ) -> subprocess.CompletedProcess[str]:
        """The docker CLI against a host's daemon: its docker_host URL from here when the
        description gives one, otherwise `docker` run on the host with its default daemon."""
        target = host if isinstance(host, ClusterHost) else self.host(host)
        if target.docker_host:
            return _run(["docker", "-H", target.docker_host, *args], check, timeout)
        return self.run(target, ["docker", *args], check, timeout)


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _ferry_command(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ClusterError(f"{name} is not installed here; pip install -e . in the test venv")
    return found


def _run(
    argv: Sequence[str],
    check: bool,
    timeout: float,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    log.debug("cluster command argv=%s", " ".join(argv))
    result = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        input=input,
        check=False,
    )
    if check and result.returncode != 0:
        raise ClusterError(
            f"{' '.join(argv)!r} exited with {result.returncode}\n"
            f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
        )
    return result


def local_cluster_command(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """deploy/local-cluster with the test venv's python (it needs PyYAML)."""
    return _run(
        [sys.executable, str(LOCAL_CLUSTER), *args],
        False,
        COMMAND_TIMEOUT_SECONDS,
        env=dict(os.environ, **(env or {})),
    )


@contextmanager
def local_cluster(
    name: str,
    hosts: int = 2,
    docker: bool = False,
    *,
    agents: bool = True,
    insecure: bool = False,
    state_dir: Path | None = None,
    pool_size: str = "4G",
    swarm: bool = False,
) -> Iterator[Cluster]:
    """A netns cluster from deploy/local-cluster, always taken down again; ``swarm`` makes
    its dockerds one Docker Swarm (host1 the manager)."""
    where = ["--name", name] + (["--state-dir", str(state_dir)] if state_dir else [])
    flags = [f"--hosts={hosts}", f"--pool-size={pool_size}"]
    flags += ["--docker"] if docker else []
    flags += ["--swarm"] if swarm else []
    flags += [] if agents else ["--no-agents"]
    flags += ["--insecure"] if insecure else []
    log.info("local cluster up name=%s hosts=%d docker=%s agents=%s", name, hosts, docker, agents)
    try:
        up = local_cluster_command("up", *where, *flags)
        if up.returncode != 0:
            raise ClusterError(f"local-cluster up failed for {name}:\n{up.stderr.strip()}")
        yield Cluster.load(Path(up.stdout.strip()))
    finally:
        down = local_cluster_command("down", *where)
        log.info("local cluster down name=%s rc=%d", name, down.returncode)
        if down.returncode != 0:
            raise ClusterError(f"local-cluster down failed for {name}:\n{down.stderr.strip()}")
