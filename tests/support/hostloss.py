"""Losing a host of a local cluster, as a power cut would, and bringing it back.

A lost host's agent is killed (no lease renewal, no last report), its dockerd with every
container it runs (SIGKILL: a database gets no shutdown checkpoint), and its link cut, in
that order and within a second. What it wrote stays in its pool, as on a real disk.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.cluster import Cluster, ClusterHost


def link(cluster: Cluster, host: ClusterHost, up: bool) -> None:
    cluster.run(host, ["ip", "link", "set", "eth0", "up" if up else "down"])


def live(cluster: Cluster, host: ClusterHost) -> bool:
    """Whether ``host``'s node record is there (its lease not expired)."""
    nodes = json.loads(cluster.ferryctl(["node", "list", "-o", "json"]).stdout)
    return any(node["name"] == host.name for node in nodes)


@contextmanager
def host_lost(cluster: Cluster, host: ClusterHost, docker: bool = True) -> Iterator[float]:
    """``host`` lost (its dockerd too, with ``docker``) for the block; yields when
    (time.monotonic) the loss began. It returns after the block: link up, agent and dockerd
    started again."""
    cluster.agent(host.name, "kill")
    lost = time.monotonic()
    if docker:
        cluster.process(f"docker:{host.name}", "kill")
    link(cluster, host, up=False)
    try:
        yield lost
    finally:
        link(cluster, host, up=True)
        # The agent first, as at boot: a starting dockerd asks the Ferry plugin about each
        # volume it knows, and waits (seconds each) for a plugin that does not answer.
        cluster.agent(host.name, "start")
        if docker:
            cluster.process(f"docker:{host.name}", "start")
