"""Streams are encrypted by default: a plain sender is refused, the default agents move the data.

A host's agent is restarted with FERRY_INSECURE_PLAIN_STREAMS=1 and
restarted as the shared cluster runs it afterwards, whatever happened.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import Cluster
from tests.support.volumes import (
    checksums,
    finish_and_check,
    mountpoint,
    move_error,
    wait_for,
    write_random_on,
)

pytestmark = pytest.mark.cluster

PLAIN = {"FERRY_INSECURE_PLAIN_STREAMS": "1"}


@pytest.fixture
def restores_default_agent(cluster: Cluster) -> Iterator[None]:
    if cluster.kind != "local" or cluster.insecure:
        pytest.skip("restarts local-cluster agents with TLS")
    yield
    cluster.agent(cluster.hosts[0].name, "stop")
    cluster.agent(cluster.hosts[0].name, "start")


def test_a_default_receiver_refuses_a_plain_sender_and_takes_its_copy_encrypted(
    cluster: Cluster, restores_default_agent: None
) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    name = f"enc-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", name, "--size", "512M", "--node", a.name])
    wait_for(f"{name} on {a.name}", lambda: cluster.volume(name)["owner"] == a.name)
    write_random_on(cluster, a, f"{mountpoint(a, name)}/data", 96)
    data = checksums(cluster, a, mountpoint(a, name))
    try:
        cluster.agent(a.name, "stop")
        cluster.agent(a.name, "start", PLAIN)
        cluster.ferryctl(["volume", "move", name, b.name])
        wait_for(
            "the plain stream to be refused",
            lambda: "accepts only encrypted streams" in move_error(cluster, name),
            60,
        )
        assert cluster.volume(name)["owner"] == a.name

        cluster.agent(a.name, "stop")
        cluster.agent(a.name, "start")
        finish_and_check(cluster, name, data, b)
        log = a.logs["agent"]
        assert log is not None
        text = Path(log).read_text()
        assert "INSECURE PLAIN STREAMS" in text
        sent = re.findall(rf"sent: volume={name} to={b.name} .* encrypted=(\w+)", text)
        assert sent and set(sent) == {"True"}
    finally:
        cluster.ferryctl(["volume", "delete", name, "--force"], check=False)
