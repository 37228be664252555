"""Agents started with --encrypt-streams: plain streams are refused, encrypted ones move the data.

The agents of the shared cluster are restarted with FERRY_ENCRYPT_STREAMS=1
and restarted plain again afterwards, whatever happened.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.test_faults import finish_and_check, move_error
from tests.cluster.test_moves import checksums, mountpoint, wait_for, write_random
from tests.support.cluster import Cluster

pytestmark = pytest.mark.cluster

ENCRYPTED = {"FERRY_ENCRYPT_STREAMS": "1"}


@pytest.fixture
def restores_plain_agents(cluster: Cluster) -> Iterator[None]:
    if cluster.kind != "local" or cluster.insecure:
        pytest.skip("restarts local-cluster agents with TLS")
    yield
    for host in cluster.hosts[:2]:
        cluster.agent(host.name, "stop")
        cluster.agent(host.name, "start")


def test_a_receiver_that_requires_encryption_gets_its_copy_only_encrypted(
    cluster: Cluster, restores_plain_agents: None
) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    name = f"enc-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", name, "--size", "512M", "--node", a.name])
    wait_for(f"{name} on {a.name}", lambda: cluster.volume(name)["owner"] == a.name)
    write_random(cluster, a, f"{mountpoint(a, name)}/data", 96)
    data = checksums(cluster, a, mountpoint(a, name))
    try:
        cluster.agent(b.name, "stop")
        cluster.agent(b.name, "start", ENCRYPTED)
        cluster.ferryctl(["volume", "move", name, b.name])
        wait_for(
            "the plain stream to be refused",
            lambda: "accepts only encrypted streams" in move_error(cluster, name),
            60,
        )
        assert cluster.volume(name)["owner"] == a.name

        cluster.agent(a.name, "stop")
        cluster.agent(a.name, "start", ENCRYPTED)
        finish_and_check(cluster, name, data, b)
        log = a.logs["agent"]
        assert log is not None
        sent = re.findall(
            rf"sent: volume={name} to={b.name} .* encrypted=(\w+)", Path(log).read_text()
        )
        assert sent and set(sent) == {"True"}
    finally:
        cluster.ferryctl(["volume", "delete", name, "--force"], check=False)
