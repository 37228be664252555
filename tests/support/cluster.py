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

from ferry.cluster.keyspace import endpoints_client
from ferry.localcluster.description import ClusterDescription, DescriptionError, HostDescription
from ferry.security.tls import TlsFiles

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "deploy" / "local-cluster"
COMMAND_TIMEOUT_SECONDS = 300.0


class ClusterError(RuntimeError):
    """The description file is unusable or a cluster command failed; the message says which."""


ClusterHost = HostDescription
"""One host as the description file states it (``ferry.localcluster.description``)."""


@dataclass(frozen=True)
class Cluster:
    """The cluster a description file names, and the commands tests run on it."""

    path: Path
    description: ClusterDescription

    @classmethod
    def load(cls, path: Path) -> Cluster:
        try:
            return cls(path, ClusterDescription.load(path))
        except DescriptionError as exc:
            raise ClusterError(str(exc)) from exc

    @property
    def name(self) -> str:
        return self.description.name

    @property
    def kind(self) -> str:
        return self.description.kind

    def seconds(self, native: float) -> float:
        """A duration the suite states for hosts of their own (a wait's limit, an RPO, a
        sampling window), stretched by the description's ``time_scale`` for this cluster."""
        return native * self.description.time_scale

    @property
    def hosts(self) -> tuple[ClusterHost, ...]:
        return self.description.hosts

    @property
    def etcd_endpoints(self) -> tuple[str, ...]:
        return self.description.etcd_endpoints

    @property
    def control_address(self) -> str | None:
        return self.description.control_address

    @property
    def insecure(self) -> bool:
        return self.description.tls.insecure

    @property
    def tls_ca(self) -> Path | None:
        return self.description.tls.ca

    @property
    def user_cert(self) -> Path | None:
        return self.description.tls.user_cert

    @property
    def user_key(self) -> Path | None:
        return self.description.tls.user_key

    @property
    def etcd_root_cert(self) -> Path | None:
        return self.description.tls.etcd_root_cert

    @property
    def etcd_root_key(self) -> Path | None:
        return self.description.tls.etcd_root_key

    @property
    def logs(self) -> Mapping[str, str | None]:
        """Logs of the cluster's services: ``etcd`` and ``control``."""
        return {"etcd": self.description.etcd_log, "control": self.description.control_log}

    @property
    def swarm_manager(self) -> str | None:
        """The host whose dockerd manages a Docker Swarm of all hosts' dockerds, if any."""
        swarm = self.description.swarm
        return swarm.manager if swarm else None

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
        Pass plain words: a remote prefix (ssh) joins them with spaces, so avoid `sh -c`.
        Here and below, ``timeout`` is for hosts of their own (``seconds`` stretches it)."""
        target = host if isinstance(host, ClusterHost) else self.host(host)
        return _run([*target.run_prefix, *argv], check, self.seconds(timeout), input=input)

    def ferryctl(
        self, args: Sequence[str], check: bool = True, timeout: float = COMMAND_TIMEOUT_SECONDS
    ) -> subprocess.CompletedProcess[str]:
        """Run ferryctl on this machine against the cluster's control, with its user certificate."""
        if self.control_address is None:
            raise ClusterError(f"cluster {self.name} runs no ferry-control (up --no-agents)")
        command = _ferry_command("ferryctl")
        return _run([command, *args], check, self.seconds(timeout), env=self.ferryctl_environment())

    def ferryctl_argv(self, args: Sequence[str]) -> list[str]:
        """The argv of a ferryctl for this cluster (with ``ferryctl_environment``), for tests
        that run it themselves (in a terminal, following its output)."""
        return [_ferry_command("ferryctl"), *args]

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
        """Kill (SIGKILL), stop (SIGTERM) or start a host's agent (``process`` says how).
        ``env`` adds FERRY_* settings (FERRY_FAILPOINTS, FERRY_INSECURE_PLAIN_STREAMS) to the
        started agent (local clusters only)."""
        self.process(f"agent:{host}", action, env)

    def process(self, role: str, action: str, env: Mapping[str, str] | None = None) -> None:
        """Kill, stop or start etcd, control, agent:HOST or docker:HOST (killing a dockerd
        kills its containers): local-cluster's own command on a local cluster, systemd's
        units on real machines (etcd: every member). A kill is SIGKILL and the process
        stays down until started, as on a local cluster: on systemd the kill is followed
        by a stop, which cancels the unit's Restart=on-failure (without it a killed agent
        is back 5 s later)."""
        if self.kind == "local":
            result = local_cluster_command("process", "--name", self.name, role, action, env=env)
            if result.returncode != 0:
                raise ClusterError(f"local-cluster process {role} {action} failed: {result.stderr}")
            return
        if env:
            raise ClusterError(f"settings for a started {role} need a local cluster: {self.kind}")
        units = self._units(role)
        if action == "start" and len(units) > 1:
            # etcd's unit is started once the member has a quorum: a start that waits on the
            # first member waits for ever for the next ones. Every member's start is queued
            # first, then each one waited for.
            for host, unit in units:
                self.run(host, ["systemctl", "start", "--no-block", unit])
        for host, unit in units:
            if action == "kill":
                self.run(host, ["systemctl", "kill", "--signal=SIGKILL", unit])
                self.run(host, ["systemctl", "stop", unit])
            else:
                self.run(host, ["systemctl", action, unit])

    def _units(self, role: str) -> list[tuple[ClusterHost, str]]:
        """The hosts and systemd units of a role (units of deploy/systemd)."""
        if role.startswith("agent:"):
            return [(self.host(role.removeprefix("agent:")), "ferry-agent")]
        if role.startswith("docker:"):
            return [(self.host(role.removeprefix("docker:")), "docker")]
        by_address = {host.address: host for host in self.hosts}
        if role == "etcd":
            return [(by_address[e.rsplit(":", 1)[0]], "ferry-etcd") for e in self.etcd_endpoints]
        if role == "control" and self.control_address:
            return [(by_address[self.control_address.rsplit(":", 1)[0]], "ferry-control")]
        raise ClusterError(f"{self.path} has no {role!r} to kill, stop or start")

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
            return _run(["docker", "-H", target.docker_host, *args], check, self.seconds(timeout))
        return self.run(target, ["docker", *args], check, timeout)


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
