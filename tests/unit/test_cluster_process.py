"""Killing, stopping and starting a cluster's services on systemd hosts (Vagrant, guests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ferry.localcluster.description import ClusterDescription, HostDescription
from tests.support.cluster import Cluster, ClusterError, ClusterHost


def systemd_cluster(kind: str = "vm") -> Cluster:
    hosts = tuple(
        HostDescription(
            name=f"node{i}", address=f"10.9.0.{10 + i}", run_prefix=("ssh",), pool="ferry"
        )
        for i in (1, 2, 3)
    )
    described = ClusterDescription(
        name="guests",
        kind=kind,
        hosts=hosts,
        etcd_endpoints=("10.9.0.11:2379", "10.9.0.12:2379"),
        control_address="10.9.0.11:7070",
    )
    return Cluster(Path("cluster.yaml"), described)


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """What the cluster would run on its hosts, in order: (host, argv)."""
    ran: list[tuple[str, list[str]]] = []

    def record(
        self: Cluster, host: str | ClusterHost, argv: Sequence[str], *args: Any, **kwargs: Any
    ) -> None:
        ran.append((host if isinstance(host, str) else host.name, list(argv)))

    monkeypatch.setattr(Cluster, "run", record)
    return ran


def test_a_killed_agent_stays_down_until_started(commands: list[tuple[str, list[str]]]) -> None:
    """systemd's Restart=on-failure would bring a SIGKILLed agent back 5 s later: the
    suite's "lost node" would come back while the test waits for its replacement."""
    systemd_cluster().agent("node2", "kill")
    assert commands == [
        ("node2", ["systemctl", "kill", "--signal=SIGKILL", "ferry-agent"]),
        ("node2", ["systemctl", "stop", "ferry-agent"]),
    ]


def test_etcd_restarts_on_every_member_and_control_on_its_host(
    commands: list[tuple[str, list[str]]],
) -> None:
    """A member's unit is started only once the members have a quorum, so each member's
    start is queued before any is waited for (the first member's start waited for ever in
    the guests: the second member was never started)."""
    cluster = systemd_cluster(kind="vagrant")
    cluster.process("etcd", "start")
    cluster.process("control", "stop")
    assert commands == [
        ("node1", ["systemctl", "start", "--no-block", "ferry-etcd"]),
        ("node2", ["systemctl", "start", "--no-block", "ferry-etcd"]),
        ("node1", ["systemctl", "start", "ferry-etcd"]),
        ("node2", ["systemctl", "start", "ferry-etcd"]),
        ("node1", ["systemctl", "stop", "ferry-control"]),
    ]


def test_settings_for_a_started_agent_need_a_local_cluster(
    commands: list[tuple[str, list[str]]],
) -> None:
    with pytest.raises(ClusterError, match="local cluster"):
        systemd_cluster().agent("node1", "start", {"FERRY_FAILPOINTS": "x"})
    assert commands == []
