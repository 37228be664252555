"""The control plane for tests: a real etcd, and real ferry-control processes in front of it.

``EtcdServer`` runs ``/usr/bin/etcd`` on free loopback ports with its data dir
in a temporary directory, always removed. ``stop()``/``restart()`` keep the
data dir, so a test can prove that nothing is lost across an etcd restart;
``kill()`` is SIGKILL, the crash case. It serves as Ferry deploys it: mutual
TLS from a cluster CA (the given ``certs``, else one of its own), peers on
TLS too, and etcd auth on with Ferry's users and roles
(``control.etcd_auth``, what ``ferry-etcd-bootstrap`` runs); ``client()``
connects as etcd's ``root``.
``secure=False`` is the plaintext etcd of an ``--insecure`` development cluster.

``issue_certificates`` makes a cluster CA (``ferry.security.ca``), and
``ControlServer`` runs the ``ferry-control`` console script on mutual TLS
from it. Both servers are context managers and always stop their process.
``LiveNodes`` puts node records on real etcd leases, as agents do (control
only reads them), and ``ferryctl`` runs the CLI as a user would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import secrets
import shutil
import socket
import ssl
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

from control import etcd_auth
from ferry.cluster.keyspace import DEFAULT_PREFIX, Keyspace, endpoints_client
from ferry.core.records import NodeInfo
from ferry.security import ca
from ferry.security.ca import ETCD_SERVER_NAME
from ferry.security.tls import TlsFiles
from tests.support.service import TestService

log = logging.getLogger(__name__)

ETCD_BINARY = Path("/usr/bin/etcd")
VENV_BIN = Path("/opt/ferry/venv/bin")
# Console scripts import Ferry from wherever the venv's editable install points;
# the tests run the tree they belong to.
SOURCE_TREE = {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}
ADMIN = "ct-admin"
ETCD_MEMBER = "ct-etcd"
# A bound, not a wait: a one-CPU TCG guest on a loaded machine (vagrant/vm-test.sh) took
# over 20 s from etcd's start to its first leader.
START_TIMEOUT = 60.0


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

    def __init__(
        self,
        prefix: str = "ct",
        certs: ClusterCerts | None = None,
        secure: bool = True,
        nodes: tuple[str, ...] = (),
    ) -> None:
        if not ETCD_BINARY.exists():
            pytest.fail(f"{ETCD_BINARY} missing: run deploy/install.sh --dev (etcd-server)")
        self.name = f"{prefix}-{secrets.token_hex(4)}"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "etcd.log"
        self.secure = secure
        self.nodes = nodes
        self._certs = certs
        self._process: subprocess.Popen[bytes] | None = None
        self._initial_cluster = f"{self.name}={self.peer_url}"
        self._token = self.name
        self._bootstrapped = False

    @property
    def certs(self) -> ClusterCerts:
        """The cluster CA this etcd trusts (made on first use when none was given)."""
        if self._certs is None:
            self._certs = issue_certificates(self.workdir / "ca")
        return self._certs

    @property
    def root(self) -> TlsFiles | None:
        """etcd's administrator (None on a plaintext etcd)."""
        return self.certs.etcd_root if self.secure else None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def client(self, tls: TlsFiles | None = None) -> aetcd.Client:
        """A client of this etcd as ``tls`` names it; by default etcd's ``root``."""
        return endpoints_client([self.endpoint], tls or self.root)

    def start(self) -> None:
        """Start etcd (reusing the data dir), wait until healthy; auth on after the first start."""
        self.launch()
        self.wait_healthy()
        self.bootstrap()
        log.info("etcd started: name=%s endpoint=%s", self.name, self.endpoint)

    def bootstrap(self, nodes: tuple[str, ...] = ()) -> None:
        """Ferry's etcd users for control and ``nodes`` (once, unless nodes are added)."""
        self.nodes = tuple(dict.fromkeys((*self.nodes, *nodes)))
        if not self.secure or (self._bootstrapped and not nodes):
            return
        run_bootstrap([self.endpoint], self.certs, self.nodes)
        self._bootstrapped = True

    @property
    def scheme(self) -> str:
        return "https" if self.secure else "http"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.peer_port}"

    def tls_flags(self) -> list[str]:
        """Client and peer mutual TLS from the cluster CA (none on a plaintext etcd)."""
        if not self.secure:
            return []
        ca, member = self.certs.directory / "ca.crt", self.certs.etcd_member
        return [
            "--client-cert-auth",
            "--trusted-ca-file", str(ca),
            "--cert-file", str(member.cert),
            "--key-file", str(member.key),
            "--peer-client-cert-auth",
            "--peer-trusted-ca-file", str(ca),
            "--peer-cert-file", str(member.cert),
            "--peer-key-file", str(member.key),
            "--peer-cert-allowed-hostname", ETCD_SERVER_NAME,
        ]  # fmt: skip

    def launch(self, initial_cluster: str = "", token: str = "") -> None:
        """Start the process without waiting; a cluster's members need each other to be healthy."""
        self._initial_cluster = initial_cluster or self._initial_cluster
        self._token = token or self._token
        client_url = f"{self.scheme}://{self.endpoint}"
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
            *self.tls_flags(),
        ]
        with self.log_path.open("ab") as out:
            self._process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_healthy(self) -> None:
        context = self.certs.etcd_root.ssl_context(ssl.Purpose.SERVER_AUTH) if self.secure else None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"etcd {self.name} exited with {self._process.returncode}: "
                    f"see {self.log_path}\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(
                    f"{self.scheme}://{self.endpoint}/health", timeout=1, context=context
                ) as reply:
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
    """Several etcd members forming one cluster on loopback, peers on mutual TLS, auth on;
    ``endpoints`` lists them all."""

    def __init__(self, size: int = 3, prefix: str = "ct") -> None:
        first = EtcdServer(prefix)
        self.members = [first, *(EtcdServer(prefix, certs=first.certs) for _ in range(size - 1))]

    @property
    def certs(self) -> ClusterCerts:
        return self.members[0].certs

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
        run_bootstrap(self.endpoints, self.certs, ())
        log.info("etcd cluster started: endpoints=%s", ",".join(self.endpoints))

    def close(self) -> None:
        for member in self.members:
            member.close()


@dataclass(frozen=True)
class ClusterCerts:
    """A cluster CA directory with certificates for control, one user, etcd's members and root."""

    directory: Path

    def files(self, name: str) -> TlsFiles:
        """The certificate ``<name>.crt`` of this CA (``issue`` makes more)."""
        d = self.directory
        return TlsFiles(d / "ca.crt", d / f"{name}.crt", d / f"{name}.key")

    @property
    def control(self) -> TlsFiles:
        return self.files("control")

    @property
    def admin(self) -> TlsFiles:
        return self.files(ADMIN)

    @property
    def etcd_member(self) -> TlsFiles:
        return self.files(ETCD_MEMBER)

    @property
    def etcd_root(self) -> TlsFiles:
        return self.files("root")

    def issue(self, kind: str, name: str) -> TlsFiles:
        """A certificate of KIND named NAME from this CA (kept if it exists)."""
        if not self.files(name).cert.exists():
            ca.issue(self.directory, kind, name)
        return self.files(name)


def run_bootstrap(endpoints: list[str], certs: ClusterCerts, nodes: tuple[str, ...]) -> None:
    """``control.etcd_auth.bootstrap`` (what ``ferry-etcd-bootstrap`` runs) as etcd's root:
    Ferry's users and roles, then auth on. In a thread of its own, so callers inside an event
    loop (a test's ``etcd.restart()``) can call it too."""

    async def bootstrap() -> None:
        client = endpoints_client(endpoints, certs.etcd_root)
        try:
            await etcd_auth.bootstrap(client, DEFAULT_PREFIX, nodes)
        finally:
            await client.close()

    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        worker.submit(asyncio.run, bootstrap()).result(timeout=START_TIMEOUT)


def issue_certificates(directory: Path) -> ClusterCerts:
    """A cluster CA with certificates for control (127.0.0.1), the user ``ct-admin``, etcd's
    members (127.0.0.1) and etcd's ``root``: ``ca.issue_cluster``, as local-cluster and
    Vagrant make theirs, in this process (five ferryctl processes cost seconds per etcd on a
    loaded machine). Nodes get theirs on demand (``ClusterCerts.issue``).
    """
    ca.issue_cluster(
        directory,
        control_ips=("127.0.0.1",),
        nodes={},
        etcd_members={ETCD_MEMBER: ("127.0.0.1",)},
        users=(ADMIN,),
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
        prefix: str = DEFAULT_PREFIX,
        insecure: bool = False,
    ) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
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
                "--metrics-address",
                self.metrics_address,
            ]
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_address(self) -> str:
        """Its /metrics (HTTPS, the cluster CA's client certificates), when started with TLS."""
        return f"127.0.0.1:{self.metrics_port}"

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
