"""A node's renewed certificate reaches its client of ferry-control without a restart, and the
channel of the old certificate is closed after its grace instead of being kept for ever."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import pytest

from agent.control_client import ControlClient
from agent.plugin import PluginError
from ferry.security import ca
from ferry.security.certificates import CertificateWatch
from tests.support.etcd import ControlServer

pytestmark = pytest.mark.integration

GRACE_SECONDS = 1.0
WAIT_SECONDS = 30.0
ESTABLISHED = "01"


def connections_to(port: int) -> set[int]:
    """The local ports of this network namespace's established TCP connections to ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == ESTABLISHED and int(fields[2].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[1].rsplit(":", 1)[1], 16))
    return found


async def refused_delete(client: ControlClient) -> str:
    """A call that reaches control and is refused there (a node may not delete volumes)."""
    with pytest.raises(PluginError) as refused:
        await client.delete_volume(f"none-{secrets.token_hex(3)}")
    return str(refused.value)


async def test_after_a_renewal_calls_use_a_new_channel_and_the_old_one_is_closed(
    control: ControlServer,
) -> None:
    node = f"cr-{secrets.token_hex(3)}"
    files = control.certs.issue("node", node)
    certificates = CertificateWatch(files)
    client = ControlClient(control.address, certificates, node, redial_grace=GRACE_SECONDS)
    following = asyncio.create_task(client.follow_renewals())
    try:
        assert "cannot reach" not in await refused_delete(client)
        old = connections_to(control.port)
        assert len(old) == 1

        ca.issue(control.certs.directory, "node", node)  # renewed in place: the same paths
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            assert "cannot reach" not in await refused_delete(client)
            now = connections_to(control.port)
            if certificates.generation == 1 and len(now) == 1 and now != old:
                break
            assert time.monotonic() < deadline, (
                f"still {len(now)} connection(s) to control {WAIT_SECONDS:.0f} s after the "
                f"renewal, the old one {'open' if old <= now else 'closed'}"
            )
            await asyncio.sleep(0.2)
    finally:
        following.cancel()
        await client.close()
