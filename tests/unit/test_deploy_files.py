"""The deploy files and the Vagrant cluster's shape, checked against the code they configure.

Flags are read from the real click commands, so a new flag fails these tests
until the env files document it. The Vagrant parts run plain Ruby (the
cluster description) and vagrant/provision.sh in --dry-run mode in a
throwaway directory; `.ci/validate-deploy.sh` runs `vagrant validate`.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import yaml

from agent.main import main as agent_main
from agent.plugin_forward import main as forward_main
from control import ctl
from control.etcd_auth import main as etcd_bootstrap_main
from control.server import main as control_main
from tests.support.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VAGRANT = REPO / "vagrant"
THREE_NODES = "node1=192.168.56.11,node2=192.168.56.12,node3=192.168.56.13"


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def options(command: click.Command) -> dict[str, click.Option]:
    """--flag name -> option, for every option of a click command."""
    return {
        param.opts[0]: param
        for param in command.params
        if isinstance(param, click.Option) and param.opts[0].startswith("--")
    }


def env_name(flag: str) -> str:
    return "FERRY_" + flag.removeprefix("--").replace("-", "_").upper()


def env_lines(path: Path) -> dict[str, str]:
    """KEY -> value for "KEY=value" and commented "#KEY=value" lines."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


# --- systemd units -----------------------------------------------------------


@pytest.mark.parametrize(
    ("unit", "binary", "env_file"),
    [
        ("ferry-agent.service", "/usr/local/bin/ferry-agent", "/etc/ferry/agent.env"),
        ("ferry-control.service", "/usr/local/bin/ferry-control", "/etc/ferry/control.env"),
        ("ferry-etcd.service", "/usr/bin/etcd", "/etc/ferry/etcd.env"),
        (
            "ferry-etcd-bootstrap.service",
            "/usr/local/bin/ferry-etcd-bootstrap",
            "/etc/ferry/etcd-bootstrap.env",
        ),
    ],
)
def test_units_restart_on_failure_and_run_the_right_binary(
    unit: str, binary: str, env_file: str
) -> None:
    parsed = read_unit(unit)
    assert parsed["Service"]["ExecStart"].split()[0] == binary
    assert parsed["Service"]["EnvironmentFile"] == env_file
    assert parsed["Service"]["Restart"] == "on-failure"
    assert parsed["Service"]["RestartSec"] == "5s"
    assert parsed["Unit"]["StartLimitIntervalSec"] == "0", "systemd must never give up restarting"
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


def test_agent_starts_after_zfs_and_before_docker_which_pulls_it_in() -> None:
    unit = read_unit("ferry-agent.service")["Unit"]
    after = unit["After"].split()
    assert {"zfs-fuse.service", "zfs-mount.service", "zfs-import.target"} <= set(after)
    assert {"zfs-fuse.service", "zfs-mount.service"} <= set(unit["Wants"].split())
    assert unit["Before"].split() == ["docker.service"]
    drop_in = configparser.ConfigParser(strict=False, interpolation=None)
    drop_in.read_string((DEPLOY / "systemd/docker.service.d/ferry.conf").read_text())
    assert drop_in["Unit"]["Wants"] == "ferry-agent.service"


def test_agent_counts_as_started_only_once_its_plugin_socket_exists() -> None:
    service = read_unit("ferry-agent.service")["Service"]
    assert "/run/docker/plugins/ferry.sock" in service["ExecStartPost"]
    assert "FERRY_PLUGIN_SOCKET" in service["ExecStartPost"]
    assert service["TimeoutStartSec"] == "120"


def test_ferry_etcd_replaces_debians_etcd_service() -> None:
    parsed = read_unit("ferry-etcd.service")
    assert parsed["Unit"]["Conflicts"] == "etcd.service"
    assert parsed["Service"]["User"] == "etcd"
    assert parsed["Service"]["StateDirectory"] == "ferry-etcd"


# --- configuration files -----------------------------------------------------


@pytest.mark.parametrize(
    ("command", "path"),
    [
        (agent_main, DEPLOY / "config/agent.env"),
        (control_main, DEPLOY / "config/control.env"),
        (etcd_bootstrap_main, DEPLOY / "config/etcd-bootstrap.env"),
    ],
)
def test_env_files_document_every_flag_with_its_default(command: click.Command, path: Path) -> None:
    text = path.read_text()
    documented = env_lines(path)
    for flag, option in options(command).items():
        name = env_name(flag)
        assert name in documented, f"{path.name} lacks {name}"
        explained = re.search(rf"^#.*(?<![\w-]){flag}(?![\w-])", text, re.MULTILINE)
        assert explained, f"{path.name} has no comment explaining {flag}"
        commented_default = f"#{name}=" in text
        if commented_default and not option.is_flag and option.default not in (None, ""):
            assert documented[name] == str(option.default), f"{name}: wrong default"


def test_env_files_use_the_documented_certificate_layout() -> None:
    agent = env_lines(DEPLOY / "config/agent.env")
    control = env_lines(DEPLOY / "config/control.env")
    assert agent["FERRY_TLS_CA"] == control["FERRY_TLS_CA"] == "/etc/ferry/pki/ca.crt"
    assert (agent["FERRY_TLS_CERT"], agent["FERRY_TLS_KEY"]) == (
        "/etc/ferry/pki/node.crt",
        "/etc/ferry/pki/node.key",
    )
    assert (control["FERRY_TLS_CERT"], control["FERRY_TLS_KEY"]) == (
        "/etc/ferry/pki/control.crt",
        "/etc/ferry/pki/control.key",
    )


def test_etcd_serves_clients_and_peers_on_mutual_tls_from_the_cluster_ca() -> None:
    etcd = env_lines(DEPLOY / "etcd/etcd.env")
    for urls in ("LISTEN_CLIENT_URLS", "ADVERTISE_CLIENT_URLS", "LISTEN_PEER_URLS"):
        assert all(url.startswith("https://") for url in etcd[f"ETCD_{urls}"].split(","))
    assert all("=https://" in member for member in etcd["ETCD_INITIAL_CLUSTER"].split(","))
    assert etcd["ETCD_CLIENT_CERT_AUTH"] == etcd["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    assert (
        etcd["ETCD_TRUSTED_CA_FILE"] == etcd["ETCD_PEER_TRUSTED_CA_FILE"] == "/etc/ferry/pki/ca.crt"
    )
    assert etcd["ETCD_CERT_FILE"] == etcd["ETCD_PEER_CERT_FILE"] == "/etc/ferry/pki/etcd.crt"
    bootstrap = env_lines(DEPLOY / "config/etcd-bootstrap.env")
    assert bootstrap["FERRY_TLS_CERT"] == "/etc/ferry/pki/root.crt"


def test_control_starts_after_etcd_auth_is_bootstrapped() -> None:
    assert "ferry-etcd-bootstrap.service" in read_unit("ferry-control.service")["Unit"]["After"]
    assert read_unit("ferry-etcd-bootstrap.service")["Service"]["Type"] == "oneshot"


def test_ferryctl_config_has_exactly_the_keys_ferryctl_accepts() -> None:
    config = yaml.safe_load((DEPLOY / "config/ferryctl.yaml").read_text())
    assert set(config) == set(ctl.SETTINGS)
    assert config["insecure"] is False


# --- Docker plugin -------------------------------------------------------------


def test_legacy_spec_is_one_unix_socket_url() -> None:
    assert (DEPLOY / "docker-plugin/ferry.spec").read_text() == "unix:///run/ferry/ferry.sock\n"


def test_managed_plugin_config_forwards_to_the_host_agent() -> None:
    """The managed plugin runs ferry-plugin-forward: no devices, no network, the agent's
    socket and mount root mounted in, and only variables the forwarder reads."""
    config = json.loads((DEPLOY / "docker-plugin/config.json").read_text())
    assert config["interface"] == {"types": ["docker.volumedriver/1.0"], "socket": "ferry.sock"}
    assert config["network"] == {"type": "none"}
    assert config["linux"]["capabilities"] == ["CAP_SYS_ADMIN"]
    assert config["linux"]["devices"] == []
    assert config["entrypoint"] == ["/opt/ferry/venv/bin/ferry-plugin-forward"]
    mounts = {m["name"]: m for m in config["mounts"]}
    assert set(mounts) == {"agent-socket", "agent-mnt"}
    assert "rslave" in mounts["agent-mnt"]["options"], "new agent mounts must appear in the plugin"
    env = {e["name"]: e["value"] for e in config["env"]}
    assert env["FERRY_MOUNT_ROOT"] == config["propagatedmount"]
    assert env["FERRY_PLUGIN_SOCKET"].endswith("/" + config["interface"]["socket"])
    assert Path(env["FERRY_AGENT_SOCKET"]).parent == Path(mounts["agent-socket"]["destination"])
    assert env["FERRY_SEEN_MOUNT_ROOT"] == mounts["agent-mnt"]["destination"]
    assert env["FERRY_AGENT_MOUNT_ROOT"] == mounts["agent-mnt"]["source"]
    forwarder_env_names = {env_name(flag) for flag in options(forward_main)}
    assert set(env) == forwarder_env_names, "config.json and ferry-plugin-forward's flags differ"


# --- Vagrant cluster shape (Ruby) -----------------------------------------------


def ruby(script: str, nodes: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run Ruby with vagrant/ferry_cluster.rb loaded and FERRY_NODES set (or unset)."""
    if shutil.which("ruby") is None:
        pytest.fail("ruby is not installed: run deploy/install.sh --dev")
    env = {k: v for k, v in os.environ.items() if k != "FERRY_NODES"}
    if nodes is not None:
        env["FERRY_NODES"] = nodes
    return subprocess.run(
        ["ruby", "-r", str(VAGRANT / "ferry_cluster.rb"), "-e", script],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


@pytest.mark.parametrize(("nodes", "count"), [(None, 3), ("1", 1), ("5", 5)])
def test_vagrant_writes_a_description_the_cluster_suite_reads(
    tmp_path: Path, nodes: str | None, count: int
) -> None:
    path = tmp_path / "cluster.yaml"
    script = f"""
        nodes = FerryCluster.nodes(FerryCluster.node_count(ENV["FERRY_NODES"]), "192.168.56")
        description = FerryCluster.description(
            nodes, vagrant_dir: "/src/vagrant", certs_dir: "/src/vagrant/.certs")
        FerryCluster.write("{path}", description)
    """
    result = ruby(script, nodes)
    assert result.returncode == 0, result.stderr
    cluster = Cluster.load(path)
    assert cluster.kind == "vagrant"
    assert cluster.host_names == [f"node{i}" for i in range(1, count + 1)]
    node1 = cluster.host("node1")
    assert node1.run_prefix == (
        "env",
        "VAGRANT_CWD=/src/vagrant",
        "vagrant",
        "ssh",
        "node1",
        "--",
        "sudo",
    )
    assert node1.agent_address == "192.168.56.11:7480"
    assert node1.plugin_socket == "/run/docker/plugins/ferry.sock"
    assert node1.docker_host == "tcp://192.168.56.11:2375"
    assert cluster.control_address == "192.168.56.11:7070"
    assert cluster.etcd_endpoints == tuple(
        f"192.168.56.{10 + i}:2379" for i in range(1, min(count, 3) + 1)
    )
    assert cluster.user_cert == Path("/src/vagrant/.certs/admin.crt")


@pytest.mark.parametrize("value", ["0", "10", "three"])
def test_vagrant_refuses_a_node_count_it_cannot_address(value: str) -> None:
    result = ruby('FerryCluster.node_count(ENV["FERRY_NODES"])', value)
    assert result.returncode != 0
    assert f'FERRY_NODES="{value}": give a whole number from 1 to 9' in result.stderr


# --- provision.sh, dry run ----------------------------------------------------------


def provision(
    tmp_path: Path,
    node: str,
    nodes: str,
    etcd_members: int,
    make_certs: bool = True,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """vagrant/provision.sh --dry-run: files go under tmp_path/root, commands to stdout.
    The certificates are placeholders: provisioning only copies them."""
    pki = tmp_path / "certs"
    pki.mkdir(exist_ok=True)
    hosts = [entry.split("=")[0] for entry in nodes.split(",")]
    for name in ["ca", "control", "root", *hosts, *(f"etcd-{host}" for host in hosts)]:
        if make_certs:
            (pki / f"{name}.crt").write_text(f"certificate of {name}\n")
            (pki / f"{name}.key").write_text(f"key of {name}\n")
    return subprocess.run(
        [
            "bash",
            str(VAGRANT / "provision.sh"),
            *("--node", node, "--nodes", nodes, "--etcd-members", str(etcd_members)),
            *("--zfs", "fuse", "--repo", str(REPO), "--pki", str(pki), "--disk", "/dev/vdb"),
            *("--dry-run", "--root", str(tmp_path / "root")),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_provisioning_node1_makes_it_etcd_member_control_and_agent(tmp_path: Path) -> None:
    result = provision(tmp_path, "node1", THREE_NODES, 3)
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    assert f"dry-run: bash {REPO}/deploy/install.sh --dev" in commands
    assert "dry-run: zpool create -f -m /var/lib/ferry/pool ferry /dev/vdb" in commands
    for unit in ["ferry-etcd", "ferry-control", "ferry-agent"]:
        assert f"dry-run: systemctl enable --now --no-block {unit}.service" in commands
    etc = tmp_path / "root/etc/ferry"
    etcd = env_lines(etc / "etcd.env")
    assert etcd["ETCD_NAME"] == "node1"
    assert etcd["ETCD_INITIAL_CLUSTER"] == (
        "node1=https://192.168.56.11:2380,node2=https://192.168.56.12:2380,"
        "node3=https://192.168.56.13:2380"
    )
    assert (etc / "pki/etcd.crt").read_text() == "certificate of etcd-node1\n"
    assert f"dry-run: chown etcd {etc}/pki/etcd.key" in commands
    bootstrap = env_lines(etc / "etcd-bootstrap.env")
    assert bootstrap["FERRY_NODE"] == "node1 node2 node3"
    assert (etc / "pki/root.key").stat().st_mode & 0o777 == 0o600
    assert "dry-run: systemctl enable --now --no-block ferry-etcd-bootstrap.service" in commands
    control = env_lines(etc / "control.env")
    assert control["FERRY_LISTEN"] == "192.168.56.11:7070"
    assert (etc / "pki/control.key").read_text() == "key of control\n"
    assert (etc / "pki/control.key").stat().st_mode & 0o777 == 0o600


def test_a_lease_ttl_given_to_provisioning_reaches_the_agent_and_none_keeps_the_default(
    tmp_path: Path,
) -> None:
    slow, plain = tmp_path / "slow", tmp_path / "plain"
    slow.mkdir()
    plain.mkdir()
    result = provision(slow, "node2", THREE_NODES, 3, extra=("--lease-ttl", "30"))
    assert result.returncode == 0, result.stderr
    assert set_lines(slow / "root/etc/ferry/agent.env")["FERRY_LEASE_TTL"] == "30"
    result = provision(plain, "node2", THREE_NODES, 3)
    assert result.returncode == 0, result.stderr
    assert "FERRY_LEASE_TTL" not in set_lines(plain / "root/etc/ferry/agent.env")


def set_lines(path: Path) -> dict[str, str]:
    """The KEY=value lines of an env file that are set (not commented out)."""
    return {
        key: value
        for key, _, value in (
            line.partition("=")
            for line in path.read_text().splitlines()
            if re.match(r"[A-Z]", line)
        )
    }


@pytest.mark.parametrize(
    ("command", "env_file", "expected"),
    [
        (
            agent_main,
            "agent.env",
            {"node": "node2", "advertise": "192.168.56.12:7480", "pool": "ferry"},
        ),
        (control_main, "control.env", {"listen": "192.168.56.11:7070"}),
        (etcd_bootstrap_main, "etcd-bootstrap.env", {"nodes": ("node1", "node2", "node3")}),
    ],
)
def test_provisioned_env_files_are_complete_configurations(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: click.Command,
    env_file: str,
    expected: dict[str, str],
) -> None:
    """The commands parse their settings from the provisioned file alone (no missing flag)."""
    node = "node2" if env_file == "agent.env" else "node1"
    result = provision(tmp_path, node, THREE_NODES, 3)
    assert result.returncode == 0, result.stderr
    for key in [k for k in os.environ if k.startswith("FERRY_")]:
        monkeypatch.delenv(key)
    for key, value in set_lines(tmp_path / "root/etc/ferry" / env_file).items():
        monkeypatch.setenv(key, value)
    context = command.make_context(command.name or env_file, [])
    assert context.params["etcd"] == ",".join(f"192.168.56.1{i}:2379" for i in (1, 2, 3))
    assert context.params["tls_cert"].startswith("/etc/ferry/pki/")
    for key, value in expected.items():
        assert context.params[key] == value


def test_provisioning_a_node_beyond_the_etcd_members_runs_only_the_agent(tmp_path: Path) -> None:
    five = THREE_NODES + ",node4=192.168.56.14,node5=192.168.56.15"
    result = provision(tmp_path, "node4", five, 3)
    assert result.returncode == 0, result.stderr
    assert "ferry-etcd" not in result.stdout.replace("systemctl daemon-reload", "")
    assert "dry-run: systemctl enable --now --no-block ferry-agent.service" in result.stdout
    etc = tmp_path / "root/etc/ferry"
    assert sorted(p.name for p in etc.iterdir()) == ["agent.env", "pki"]
    assert (etc / "pki/node.crt").read_text() == "certificate of node4\n"
    docker_drop_in = tmp_path / "root/etc/systemd/system/docker.service.d/vagrant-tcp.conf"
    assert 'DOCKER_OPTS=-H tcp://192.168.56.14:2375"' in docker_drop_in.read_text()


def test_provisioning_without_the_node_certificate_says_how_to_make_it(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    result = provision(tmp_path, "node2", THREE_NODES, 3, make_certs=False)
    assert result.returncode == 1
    assert "ca.crt is missing: run 'vagrant provision node2'" in result.stderr
