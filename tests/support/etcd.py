"""The control plane for tests: a real etcd, and real ferry-control processes in front of it.

``EtcdServer`` runs ``/usr/bin/etcd`` on free loopback ports with its data dir
in a temporary directory, always removed. ``stop()``/``restart()`` keep the
data dir, so a test can prove that nothing is lost across an etcd restart;
``kill()`` is SIGKILL, the crash case.

``issue_certificates`` makes a cluster CA with ``ferryctl ca``, and
``ControlServer`` runs the ``ferry-control`` console script on mutual TLS
from it. Both servers are context managers and always stop their process.
``LiveNodes`` puts node records on real etcd leases, as agents do (control
only reads them), and ``ferryctl`` runs the CLI as a user would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aetcd
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control.keyspace import Keyspace
from control.records import NodeInfo
from control.tls import TlsFiles
from tests.support.service import TestService

log = logging.getLogger(__name__)

ETCD_BINARY = Path("/usr/bin/etcd")
VENV_BIN = Path("/opt/ferry/venv/bin")
# Console scripts import Ferry from wherever the venv's editable install points;
# the tests run the tree they belong to.
SOURCE_TREE = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
ADMIN = "ct-admin"
START_TIMEOUT = 20.0


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def terminate(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class EtcdServer(TestService):
    """One etcd member named ``ct-<random>`` serving on ``127.0.0.1:<port>``."""

    def __init__(self, prefix: str = "ct") -> None:
        if not ETCD_BINARY.exists():
            pytest.fail(f"{ETCD_BINARY} missing: run deploy/install.sh --dev (etcd-server)")
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "etcd.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._initial_cluster = f"{self.name}={self.peer_url}"
        self._token = self.name

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        """Start etcd (reusing the data dir) and wait until it reports healthy."""
        self.launch()
        self.wait_healthy()
        log.info("etcd started: name=%s endpoint=%s", self.name, self.endpoint)

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def launch(self, initial_cluster: str = "", token: str = "") -> None:
        """Start the process without waiting; a cluster's members need each other to be healthy."""
        self._initial_cluster = initial_cluster or self._initial_cluster
        self._token = token or self._token
        client_url = f"http://{self.endpoint}"
        command = [
            str(ETCD_BINARY),
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            client_url,
            "--advertise-client-urls",
            client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self._initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            self._token,
        ]
        with self.log_path.open("ab") as out:
            self._process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"etcd {self.name} exited with {self._process.returncode}: "
                    f"see {self.log_path}\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as reply:
                    if b'"true"' in reply.read():
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"etcd {self.name} not healthy in {START_TIMEOUT}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM and wait; the data dir stays for ``restart()``."""
        if self._process is not None:
            terminate(self._process)
        self._process = None

    def kill(self) -> None:
        """SIGKILL, like a crash; the data dir stays."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._process = None

    def restart(self) -> None:
        """Stop and start again on the same ports and data dir."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Kill etcd and remove its data dir."""
        self.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)


class EtcdCluster(TestService):
    """Several etcd members forming one cluster on loopback; ``endpoints`` lists them all."""

    def __init__(self, size: int = 3, prefix: str = "ct") -> None:
        self.members = [EtcdServer(prefix) for _ in range(size)]

    @property
    def endpoints(self) -> list[str]:
        return [member.endpoint for member in self.members]

    def start(self) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"{self.members[0].name}-cluster"
        for member in self.members:
            member.launch(initial, token)
        for member in self.members:
            member.wait_healthy()
        log.info("etcd cluster started: endpoints=%s", ",".join(self.endpoints))

    def close(self) -> None:
        for member in self.members:
            member.close()


@dataclass(frozen=True)
class ClusterCerts:
    """A cluster CA directory with certificates for control and for one user."""

    directory: Path

    @property
    def control(self) -> TlsFiles:
        d = self.directory
        return TlsFiles(d / "ca.crt", d / "control.crt", d / "control.key")

    @property
    def admin(self) -> TlsFiles:
        d = self.directory
        return TlsFiles(d / "ca.crt", d / f"{ADMIN}.crt", d / f"{ADMIN}.key")


def issue_certificates(directory: Path) -> ClusterCerts:
    """``ferryctl ca init`` then certificates for control (127.0.0.1) and the user ``ct-admin``."""
    ferryctl, where = str(VENV_BIN / "ferryctl"), str(directory)
    for command in (
        ["ca", "init", "--dir", where],
        [
            "ca",
            "issue",
            "--dir",
            where,
            "--kind",
            "control",
            "--name",
            "control",
            "--ip",
            "127.0.0.1",
        ],
        ["ca", "issue", "--dir", where, "--kind", "user", "--name", ADMIN],
    ):
        subprocess.run(
            [ferryctl, *command],
            env={**os.environ, **SOURCE_TREE},
            check=True,
            capture_output=True,
            timeout=60,
        )
    return ClusterCerts(directory)


class ControlServer(TestService):
    """``ferry-control`` on a free loopback port in front of one etcd.

    On mutual TLS with flags by default; ``insecure=True`` starts it the
    development way, configured by ``FERRY_*`` environment variables alone.
    """

    def __init__(
        self,
        etcd: str,
        certs: ClusterCerts,
        log_dir: Path,
        prefix: str = "/ferry/v1",
        insecure: bool = False,
    ) -> None:
        self.port = free_port()
        self.certs = certs
        self.insecure = insecure
        self.log_path = log_dir / f"control-{self.port}.log"
        tls = certs.control
        self._env = {**os.environ, **SOURCE_TREE}
        if insecure:
            self._command = [str(VENV_BIN / "ferry-control")]
            self._env = {
                **SOURCE_TREE,
                "PATH": f"{VENV_BIN}:/usr/bin:/bin",
                "FERRY_ETCD": etcd,
                "FERRY_LISTEN": self.address,
                "FERRY_INSECURE": "1",
                "FERRY_ETCD_PREFIX": prefix,
            }
        else:
            self._command = [
                str(VENV_BIN / "ferry-control"),
                "--etcd",
                etcd,
                "--listen",
                self.address,
                "--tls-ca",
                str(tls.ca),
                "--tls-cert",
                str(tls.cert),
                "--tls-key",
                str(tls.key),
                "--etcd-prefix",
                prefix,
            ]
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ferryctl_env(self, tls: TlsFiles | None = None) -> dict[str, str]:
        """Environment for a ``ferryctl`` talking to this control (the admin's certificate)."""
        base = {
            **SOURCE_TREE,
            "PATH": f"{VENV_BIN}:/usr/bin:/bin",
            "HOME": str(self.log_path.parent),
            "FERRY_CONTROL": self.address,
        }
        if self.insecure and tls is None:
            return {**base, "FERRY_INSECURE": "1"}
        tls = tls or self.certs.admin
        return {
            **base,
            "FERRY_TLS_CA": str(tls.ca),
            "FERRY_TLS_CERT": str(tls.cert),
            "FERRY_TLS_KEY": str(tls.key),
        }

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self._process = subprocess.Popen(
                self._command,
                env=self._env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_serving()
        log.info("ferry-control started: address=%s", self.address)

    def _wait_serving(self) -> None:
        channel = (
            grpc.insecure_channel(self.address)
            if self.insecure
            else grpc.secure_channel(
                self.address,
                self.certs.admin.channel_credentials(),
                options=[("grpc.ssl_target_name_override", "control")],
            )
        )
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while time.monotonic() < deadline:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"ferry-control exited with {self._process.returncode}:\n"
                        + self.log_path.read_text(errors="replace")[-2000:]
                    )
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.1)
        finally:
            channel.close()
        self.close()
        raise RuntimeError(f"ferry-control not serving in {START_TIMEOUT}s: see {self.log_path}")

    def close(self) -> None:
        if self._process is not None:
            terminate(self._process)
        self._process = None


async def register_node(keyspace: Keyspace, info: NodeInfo, ttl: int) -> aetcd.Lease:
    """Put ``info`` on a new lease of ``ttl`` seconds, as an agent does (the name must be free)."""
    lease = await keyspace.new_lease(ttl)
    holder = await keyspace.claim_node(info, lease)
    assert holder is None, f"node {info.name} is registered already: {holder}"
    return lease


class LiveNodes:
    """Node records on etcd leases, standing in for agents; ``revoke_all`` makes them vanish."""

    def __init__(self, keyspace: Keyspace) -> None:
        self._keyspace = keyspace
        self._leases: list[object] = []

    async def add(
        self, name: str, free_bytes: int, ttl: int = 60, cert_not_after: float = 0.0
    ) -> NodeInfo:
        info = NodeInfo(
            name=name,
            address=f"127.0.0.1:{free_port()}",
            pool=f"ct-{name}",
            free_bytes=free_bytes,
            version="test",
            cert_not_after=cert_not_after,
        )
        self._leases.append(await register_node(self._keyspace, info, ttl))
        return info

    async def revoke_all(self) -> None:
        for lease in self._leases:
            try:
                await lease.revoke()  # type: ignore[attr-defined]
            except aetcd.ClientError as error:
                if "lease not found" not in str(error):
                    raise
        self._leases.clear()


@dataclass(frozen=True)
class CliResult:
    """What a ``ferryctl`` run printed and returned."""

    code: int
    stdout: str
    stderr: str


CLI_TIMEOUT = 60.0


async def ferryctl(env: dict[str, str], *args: str) -> CliResult:
    """Run ``ferryctl ARGS`` with ``env`` as its whole environment."""
    process = await asyncio.create_subprocess_exec(
        str(VENV_BIN / "ferryctl"),
        *args,
        env={**env, **SOURCE_TREE},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())
