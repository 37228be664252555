"""The cluster description file: what local-cluster writes is what the suite reads back."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest
import yaml

from ferry.localcluster.description import ClusterDescription, DescriptionError
from ferry.localcluster.layout import describe, make_layout
from tests.support.cluster import Cluster

SUBNET = ipaddress.IPv4Network("10.212.7.0/24")
MINIMAL = {
    "version": 1,
    "name": "vm",
    "etcd": {"endpoints": ["10.213.1.11:2379"]},
    "hosts": [{"name": "node1", "address": "10.213.1.11", "run": ["env"], "pool": "ferry"}],
}


@pytest.mark.parametrize(
    ("docker", "insecure", "agents", "swarm"),
    [(True, False, True, True), (False, True, True, False), (True, False, False, False)],
)
def test_a_saved_description_loads_as_the_same_cluster(
    tmp_path: Path, docker: bool, insecure: bool, agents: bool, swarm: bool
) -> None:
    layout = make_layout("lc7", tmp_path / "lc7", SUBNET, 3)
    described = describe(layout, docker, insecure, agents, swarm)
    path = tmp_path / "cluster.yaml"
    described.save(path)
    assert ClusterDescription.load(path) == described
    host2 = described.hosts[1]
    assert (host2.name, host2.address, host2.pool) == ("host2", "10.212.7.3", "ferry-lc7-host2")
    assert host2.run_prefix == ("nsenter", "--net=/run/netns/ferry-lc7-host2")
    assert (host2.docker_host is not None) == docker
    assert (described.control_address is not None) == agents
    assert (described.tls.user_cert is not None) == (agents and not insecure)
    assert (described.swarm is not None) == swarm


def test_a_minimal_description_of_another_cluster_loads_with_the_rest_unset(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "name": "vagrant",
                "kind": "vagrant",
                "etcd": {"endpoints": ["192.168.56.11:2379"]},
                "hosts": [
                    {"name": "node1", "address": "192.168.56.11", "run": ["ssh"], "pool": "ferry"}
                ],
                "a_future_field": {"ignored": True},
            }
        )
    )
    described = ClusterDescription.load(path)
    assert described.kind == "vagrant"
    assert described.hosts[0].agent_address is None and described.control_address is None
    assert described.tls.insecure is False and described.tls.ca is None
    assert described.swarm is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("version: 2\nname: x\n", "is not a version 1 cluster description"),
        ("version: 1\nname: x\nhosts: []\netcd: {endpoints: []}\n", "describes no hosts"),
        (
            "version: 1\nname: x\nhosts: [{name: h}]\netcd: {endpoints: []}\n",
            "missing or malformed field",
        ),
        ("version: 1\nname: [x\n", "is not valid YAML"),
    ],
)
def test_an_unusable_description_is_refused_saying_why(
    tmp_path: Path, text: str, says: str
) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(DescriptionError, match=says):
        ClusterDescription.load(path)


def test_a_description_without_time_scale_is_of_hosts_of_their_own(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert ClusterDescription.load(path).time_scale == 1.0


def test_the_suite_stretches_its_waits_and_commands_by_the_time_scale(tmp_path: Path) -> None:
    """Emulated guests (vagrant/vm-cluster.sh) say they are slower; a command that takes
    2 s passes a 0.5 s limit stated for hosts of their own there, and fails it elsewhere."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "time_scale": 10}))
    slow = Cluster.load(path)
    assert slow.seconds(90) == 900
    assert slow.run("node1", ["sleep", "2"], timeout=0.5).returncode == 0
    path.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(subprocess.TimeoutExpired):
        Cluster.load(path).run("node1", ["sleep", "2"], timeout=0.5)


@pytest.mark.parametrize("scale", [0.5, "fast"])
def test_a_time_scale_below_one_is_refused(tmp_path: Path, scale: object) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "time_scale": scale}))
    with pytest.raises(DescriptionError, match=r"time_scale .*: give a number of at least 1"):
        ClusterDescription.load(path)


def test_a_described_lease_ttl_is_what_the_suite_expects_of_the_agents(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert ClusterDescription.load(path).lease_ttl == 10
    path.write_text(yaml.safe_dump({**MINIMAL, "lease_ttl": 30}))
    described = ClusterDescription.load(path)
    assert described.lease_ttl == 30
    saved = tmp_path / "saved.yaml"
    described.save(saved)
    assert ClusterDescription.load(saved).lease_ttl == 30


@pytest.mark.parametrize("ttl", [3, 2.5, "long"])
def test_a_lease_ttl_the_agents_would_refuse_is_refused(tmp_path: Path, ttl: object) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "lease_ttl": ttl}))
    with pytest.raises(DescriptionError, match="lease_ttl"):
        ClusterDescription.load(path)
