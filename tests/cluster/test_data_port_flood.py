"""A flood of idle and junk connections to an agent's data port, from another host's netns.

The agent must close what is over its cap at once, drop the rest within the
token deadline, keep serving (a move into it completes), and write only a
few summary lines about it.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import pytest

from agent.transfer.data import TOKEN_READ_SECONDS, host_of
from agent.transfer.unadmitted import PER_PEER
from tests.support.cluster import Cluster
from tests.support.volumes import checksums, finish_and_check, mountpoint, wait_for, write_random_on

pytestmark = pytest.mark.cluster

IDLE = 300
JUNK = 200

# Runs in the flooding host's network namespace; prints what the agent did to the connections.
FLOOD = """
import json, os, socket, sys, time
host = sys.argv[1]
port, idle_count, junk_count = (int(arg) for arg in sys.argv[2:5])
started = time.monotonic()
idle = [socket.create_connection((host, port), timeout=5) for _ in range(idle_count)]
for _ in range(junk_count):
    with socket.create_connection((host, port), timeout=5) as junk:
        try:
            junk.sendall(os.urandom(64))
        except OSError:
            pass
def closed(sock):
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
time.sleep(1.0)
at_once = sum(closed(s) for s in idle)
deadline = time.monotonic() + 30
while not all(closed(s) for s in idle) and time.monotonic() < deadline:
    time.sleep(0.5)
print(json.dumps({"closed_at_once": at_once, "closed": sum(closed(s) for s in idle),
                  "seconds": time.monotonic() - started}))
"""


def test_a_flood_on_the_data_port_is_capped_quiet_and_leaves_the_agent_serving(
    cluster: Cluster,
) -> None:
    a, b = cluster.hosts[0], cluster.hosts[1]
    assert b.agent_address is not None
    log = Path(b.logs["agent"] or "")
    name = f"fl-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", name, "--size", "256M", "--node", a.name])
    wait_for(f"{name} on {a.name}", lambda: cluster.volume(name)["owner"] == a.name)
    write_random_on(cluster, a, f"{mountpoint(a, name)}/data", 16)
    data = checksums(cluster, a, mountpoint(a, name))
    try:
        logged_before = log.stat().st_size
        port = int(b.agent_address.rsplit(":", 1)[1]) + 1
        flood = cluster.run(
            a,
            [
                sys.executable,
                "-c",
                FLOOD,
                host_of(b.agent_address),
                str(port),
                str(IDLE),
                str(JUNK),
            ],
            timeout=120,
        )
        result = json.loads(flood.stdout)
        assert result["closed_at_once"] >= IDLE - PER_PEER
        assert result["closed"] == IDLE
        assert result["seconds"] < 30 + TOKEN_READ_SECONDS

        cluster.ferryctl(["volume", "move", name, b.name])
        finish_and_check(cluster, name, data, b)
        with log.open() as text:
            text.seek(logged_before)
            about_it = [line for line in text if "admission" in line or "data connection" in line]
        assert 1 <= len(about_it) <= 3, about_it
    finally:
        cluster.ferryctl(["volume", "delete", name, "--force"], check=False)
