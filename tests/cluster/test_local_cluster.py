"""Hosts of a cluster: the generic tests use the `cluster` fixture (any description file);
the local-only ones bring up their own netns clusters with deploy/local-cluster."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from socketserver import ThreadingMixIn, UnixStreamServer
from typing import cast

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from agent.plugin import HANDSHAKE, ROUTES, VolumePlugin
from ferry.localcluster.description import ClusterDescription
from tests.cluster.conftest import requires_root
from tests.support.cluster import Cluster, ClusterHost, local_cluster, local_cluster_command
from tests.support.etcd import SOURCE_TREE, VENV_BIN

pytestmark = pytest.mark.cluster

PROBE_PORT = 7098

LISTENER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16); s.settimeout(1)
print("ready", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        s.accept()[0].close()
    except TimeoutError:
        pass
"""

CONNECTOR = """
import socket, sys
failed = []
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        failed.append(f"{target}: {exc}")
print("\\n".join(failed))
"""


def unique_cluster_name() -> str:
    return f"lc{secrets.token_hex(3)}"


# ---------------------------------------------------------------- any cluster
# Commands go to hosts as plain words and scripts through stdin, so that a remote
# `run` prefix (vagrant ssh, which joins words with spaces) runs them unchanged.


def test_suite_reads_its_hosts_from_the_description_file(cluster: Cluster) -> None:
    described = ClusterDescription.load(cluster.path)
    assert cluster.host_names == [h.name for h in described.hosts]
    assert len(set(cluster.host_names)) == len(cluster.hosts) >= 2
    for host in cluster.hosts:
        addresses = cluster.run(host, ["ip", "-o", "-4", "addr", "show"]).stdout
        assert f"inet {host.address}/" in addresses, f"command did not run on {host.name}"
        for other in cluster.hosts:
            if other is not host:
                assert f"inet {other.address}/" not in addresses


def test_hosts_reach_each_other_and_the_cluster_services(cluster: Cluster) -> None:
    listeners = []
    try:
        for host in cluster.hosts:
            listener = subprocess.Popen(
                [*host.run_prefix, "python3", "-", host.address, str(PROBE_PORT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            listeners.append(listener)
            assert listener.stdin is not None and listener.stdout is not None
            listener.stdin.write(LISTENER)
            listener.stdin.close()
            assert listener.stdout.readline().strip() == "ready", f"no listener on {host.name}"
        services = [*cluster.etcd_endpoints]
        if cluster.control_address:
            services.append(cluster.control_address)
        for host in cluster.hosts:
            peers = [f"{o.address}:{PROBE_PORT}" for o in cluster.hosts if o is not host]
            connect = ["python3", "-", *peers, *services]
            failed = cluster.run(host, connect, input=CONNECTOR).stdout
            assert failed.strip() == "", f"{host.name} cannot reach:\n{failed}"
    finally:
        for listener in listeners:
            listener.kill()
            listener.wait()
            if listener.stdout:
                listener.stdout.close()


def test_each_host_has_its_own_usable_pool(cluster: Cluster) -> None:
    assert len({host.pool for host in cluster.hosts}) == len(cluster.hosts)
    probe = f"lc-probe-{uuid.uuid4().hex[:8]}"
    created: list[tuple[ClusterHost, str]] = []
    try:
        for host in cluster.hosts:
            pools = cluster.run(host, ["zpool", "list", "-H", "-o", "name,health"]).stdout
            assert f"{host.pool}\tONLINE" in pools.splitlines()
            dataset = f"{host.pool}/{probe}"
            cluster.run(host, ["zfs", "create", dataset])
            created.append((host, dataset))
            mountpoint = cluster.run(
                host, ["zfs", "get", "-H", "-o", "value", "mountpoint", dataset]
            ).stdout.strip()
            cluster.run(host, ["tee", f"{mountpoint}/file"], input=f"written-on-{host.name}\n")
            content = cluster.run(host, ["cat", f"{mountpoint}/file"]).stdout.strip()
            assert content == f"written-on-{host.name}"
        for host, dataset in created:
            for other in cluster.hosts:
                names = cluster.run(other, ["zfs", "list", "-H", "-o", "name", "-r", other.pool])
                assert (dataset in names.stdout.split()) == (other is host)
    finally:
        for host, dataset in created:
            cluster.run(host, ["zfs", "destroy", "-r", dataset], check=False)


# ---------------------------------------------------------------- the local tool


def leftovers(name: str, state_dir: Path, pids: list[int]) -> list[str]:
    """Everything of cluster `name` that still exists on this machine."""
    found = []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found += [f"netns {n}" for n in netns.split() if n.startswith(f"ferry-{name}-")]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found += [
        f"link {line.split(':')[1].strip()}"
        for line in links.splitlines()
        if f"fbr-{name}:" in line or f"fve-{name}-" in line
    ]
    pools = subprocess.run(["zpool", "list", "-H", "-o", "name"], capture_output=True, text=True)
    found += [f"pool {p}" for p in pools.stdout.split() if p.startswith(f"ferry-{name}-")]
    found += [f"process {pid}" for pid in pids if process_alive(pid)]
    marker = f"FERRY_LOCAL_CLUSTER={name}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(f"marked process {environ.parent.name}")
        except OSError:
            continue
    mounts = Path("/proc/self/mountinfo").read_text()
    found += [f"mount {line.split()[4]}" for line in mounts.splitlines() if str(state_dir) in line]
    if state_dir.exists():
        found.append(f"state dir {state_dir}")
    return found


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def status_of(name: str) -> tuple[int, dict[str, object]]:
    result = local_cluster_command("status", "--name", name, "-o", "json")
    return result.returncode, json.loads(result.stdout)


def all_pids(report: dict[str, object]) -> list[int]:
    hosts = report["hosts"]
    assert isinstance(hosts, list)
    pids = [*report["etcd_pids"], *report["control_pids"]]  # type: ignore[misc]
    for host in hosts:
        pids += host["agent_pids"] + host["docker_pids"]
    return pids


def test_down_leaves_nothing_behind_and_status_reports_a_dead_process() -> None:
    requires_root()
    name = unique_cluster_name()
    state_dir = Path("/run/ferry-cluster") / name
    pids: list[int] = []
    up = local_cluster_command("up", "--name", name, "--hosts", "2", "--docker", "--no-agents")
    try:
        assert up.returncode == 0, up.stderr
        code, report = status_of(name)
        assert code == 0 and report["healthy"] is True
        pids = all_pids(report)
        assert len(pids) == 3, report  # etcd and two dockerds
        etcd_pid = report["etcd_pids"][0]  # type: ignore[index]
        subprocess.run(["kill", "-9", str(etcd_pid)], check=True)
        code, report = status_of(name)
        assert code == 1 and report["healthy"] is False and report["etcd_pids"] == []
    finally:
        down = local_cluster_command("down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert leftovers(name, state_dir, pids) == []
    again = local_cluster_command("down", "--name", name)
    assert again.returncode == 0, again.stderr


def test_failed_up_cleans_up_after_itself() -> None:
    requires_root()
    name = unique_cluster_name()
    try:
        up = local_cluster_command("up", "--name", name, "--no-agents", "--pool-size", "1M")
        assert up.returncode != 0
        assert "zpool create" in up.stderr
        assert leftovers(name, Path("/run/ferry-cluster") / name, []) == []
    finally:
        local_cluster_command("down", "--name", name)


@pytest.fixture(scope="module")
def docker_cluster() -> Iterator[Cluster]:
    requires_root()
    with local_cluster(unique_cluster_name(), hosts=2, docker=True, agents=False) as running:
        yield running


class RecordingPlugin(ThreadingMixIn, UnixStreamServer):
    """Answers the Docker volume plugin protocol on one host's plugin socket and records
    which calls reached it; stands in for the agent to show where each dockerd goes.

    Docker's handshake (Activate, Capabilities: the driver's scope) is answered by the real
    plugin's own handlers, so dockerd treats the stand-in as it treats the agent."""

    daemon_threads = True

    def __init__(self, socket_path: Path) -> None:
        self.calls: list[tuple[str, dict[str, object]]] = []
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(str(socket_path), PluginHandler)


async def real_plugin_answer(path: str) -> dict[str, object]:
    return await ROUTES[path](cast(VolumePlugin, None), {})


class PluginHandler(BaseHTTPRequestHandler):
    server: RecordingPlugin

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.server.calls.append((self.path, body))
        reply = json.dumps({"Err": "", **self.answer(self.path)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.docker.plugins.v1+json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    @staticmethod
    def answer(path: str) -> dict[str, object]:
        if path in HANDSHAKE:
            # Activate and Capabilities answer constants; they never read the plugin.
            return asyncio.run(real_plugin_answer(path))
        return {"Volumes": []} if path == "/VolumeDriver.List" else {}

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the recorded calls are what the test reads."""

    def address_string(self) -> str:
        return "unix"


def test_each_dockerd_reaches_only_its_own_hosts_plugin(docker_cluster: Cluster) -> None:
    plugins = {}
    for host in docker_cluster.hosts:
        assert host.plugin_socket is not None
        plugins[host.name] = RecordingPlugin(Path(host.plugin_socket))
        threading.Thread(target=plugins[host.name].serve_forever, daemon=True).start()
    try:
        for host in docker_cluster.hosts:
            info = docker_cluster.docker(host, ["info", "--format", "{{.Name}}"])
            assert info.returncode == 0
            docker_cluster.docker(host, ["volume", "create", "-d", "ferry", f"lcvol-{host.name}"])
        for host in docker_cluster.hosts:
            created = [
                body.get("Name")
                for path, body in plugins[host.name].calls
                if path == "/VolumeDriver.Create"
            ]
            assert created == [f"lcvol-{host.name}"]
    finally:
        for host in docker_cluster.hosts:
            plugins[host.name].shutdown()
            plugins[host.name].server_close()
            Path(str(host.plugin_socket)).unlink(missing_ok=True)


def test_load_image_puts_a_saved_image_into_every_hosts_dockerd(
    docker_cluster: Cluster, tmp_path: Path
) -> None:
    first, *others = docker_cluster.hosts
    image = f"lc-probe:{uuid.uuid4().hex[:8]}"
    (tmp_path / "hello.txt").write_text("hello from lc\n")
    with tarfile.open(tmp_path / "rootfs.tar", "w") as rootfs:
        rootfs.add(tmp_path / "hello.txt", arcname="hello.txt")
    docker_cluster.docker(first, ["import", str(tmp_path / "rootfs.tar"), image])
    docker_cluster.docker(first, ["save", "-o", str(tmp_path / "image.tar"), image])
    for host in others:
        assert docker_cluster.docker(host, ["image", "inspect", image], check=False).returncode != 0
    loaded = local_cluster_command(
        "load-image", "--name", docker_cluster.name, str(tmp_path / "image.tar")
    )
    assert loaded.returncode == 0, loaded.stderr
    for host in docker_cluster.hosts:
        docker_cluster.docker(host, ["image", "inspect", image])


def test_second_up_with_the_same_name_refuses_and_keeps_the_cluster(
    docker_cluster: Cluster,
) -> None:
    again = local_cluster_command("up", "--name", docker_cluster.name, "--no-agents")
    assert again.returncode != 0
    assert "already exists" in again.stderr
    code, report = status_of(docker_cluster.name)
    assert code == 0 and report["healthy"] is True


FAKE_FERRY = """#!{python}
# Stands in for {program} to test how local-cluster starts, checks and stops Ferry processes.
# ferryctl makes real certificates (etcd serves on them); the others only pretend.
import os, socket, sys, time
from pathlib import Path
args = sys.argv[1:]
with open(os.environ["LC_FAKE_RECORD"], "a") as record:
    record.write("{program} " + " ".join(args) + "\\n")
def flag(name):
    return args[args.index(name) + 1]
if "{program}" == "ferryctl":
    os.environ["PYTHONPATH"] = "{source}"
    os.execv("{ferryctl}", ["{ferryctl}", *args])
if "{program}" == "ferry-etcd-bootstrap":
    sys.exit(0)
if "{program}" == "ferry-agent" and flag("--node") == os.environ.get("LC_FAKE_AGENT_FAILS_ON"):
    print("agent: cannot open pool " + flag("--pool"), file=sys.stderr)
    sys.exit(3)
host, port = flag("--listen").rsplit(":", 1)
listener = socket.create_server((host, int(port)))
if "{program}" == "ferry-agent":
    plugin = socket.socket(socket.AF_UNIX)
    plugin.bind(flag("--plugin-socket"))
    plugin.listen()
time.sleep(3600)
"""


def fake_ferry_bin(directory: Path) -> Path:
    directory.mkdir()
    for program in ("ferry-agent", "ferry-control", "ferryctl", "ferry-etcd-bootstrap"):
        script = directory / program
        script.write_text(
            FAKE_FERRY.format(
                python=sys.executable,
                program=program,
                ferryctl=VENV_BIN / "ferryctl",
                source=SOURCE_TREE["PYTHONPATH"],
            )
        )
        script.chmod(0o755)
    return directory


def certificate_says(path: Path) -> tuple[str, list[str]]:
    """The kind (organizational unit) and IP addresses a certificate names."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    kind = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(kind), [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]


def test_up_issues_certificates_and_starts_control_and_an_agent_per_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requires_root()
    name = unique_cluster_name()
    record = tmp_path / "calls.txt"
    monkeypatch.setenv("LC_FAKE_RECORD", str(record))
    ferry_bin = fake_ferry_bin(tmp_path / "bin")
    pids: list[int] = []
    up = local_cluster_command("up", "--name", name, "--ferry-bin", str(ferry_bin))
    try:
        assert up.returncode == 0, up.stderr
        cluster = Cluster.load(Path(up.stdout.strip()))
        code, report = status_of(name)
        assert code == 0 and report["healthy"] is True
        pids = all_pids(report)
        assert len(pids) == 4  # etcd, control, two agents
        calls = record.read_text().splitlines()
        bridge = cluster.control_address.split(":")[0]  # type: ignore[union-attr]
        certs = cluster.tls_ca.parent  # type: ignore[union-attr]
        assert any(c.startswith(f"ferryctl ca issue-cluster --dir {certs} ") for c in calls)
        expected = {
            "control": ("control", [bridge]),
            "admin": ("user", []),
            "etcd": ("etcd", [bridge]),
            "root": ("etcd-root", []),
            **{host.name: ("node", [host.address]) for host in cluster.hosts},
        }
        assert {who: certificate_says(certs / f"{who}.crt") for who in expected} == expected
        nodes = " ".join(f"--node {host}" for host in cluster.host_names)
        assert any(c.startswith("ferry-etcd-bootstrap ") and c.endswith(nodes) for c in calls)
        for host in cluster.hosts:
            agent = next(c for c in calls if c.startswith(f"ferry-agent --node {host.name} "))
            assert f"--pool {host.pool} " in agent
            assert f"--listen {host.agent_address} --advertise {host.agent_address}" in agent
            assert f"--tls-cert {certs}/{host.name}.crt" in agent
            assert f"--etcd {cluster.etcd_endpoints[0]}" in agent
        assert cluster.user_cert == certs / "admin.crt"
        assert cluster.ferryctl_environment()["FERRY_TLS_CERT"] == str(certs / "admin.crt")
    finally:
        down = local_cluster_command("down", "--name", name)
    assert down.returncode == 0, down.stderr
    assert leftovers(name, Path("/run/ferry-cluster") / name, pids) == []


def test_an_agent_that_exits_during_up_is_reported_and_everything_is_cleaned_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requires_root()
    name = unique_cluster_name()
    monkeypatch.setenv("LC_FAKE_RECORD", str(tmp_path / "calls.txt"))
    monkeypatch.setenv("LC_FAKE_AGENT_FAILS_ON", "host2")
    ferry_bin = fake_ferry_bin(tmp_path / "bin")
    try:
        up = local_cluster_command(
            "up", "--name", name, "--insecure", "--ferry-bin", str(ferry_bin)
        )
        assert up.returncode != 0
        assert "ferry-agent on host2 exited with code 3" in up.stderr
        assert f"cannot open pool ferry-{name}-host2" in up.stderr
        assert leftovers(name, Path("/run/ferry-cluster") / name, []) == []
    finally:
        local_cluster_command("down", "--name", name)
