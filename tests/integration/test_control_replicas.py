"""Control's side of replicas, through ferryctl against a real control and etcd: placement
on create, refusal with too few nodes, update and apply files change a live volume, a move
to a replica swaps roles, and a replica whose node stays down is placed anew."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.control_client import ControlClient
from agent.plugin import PluginError
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import NodeInfo
from tests.support.etcd import ControlServer, LiveNodes, ferryctl, free_port, register_node

pytestmark = pytest.mark.integration

GIB = 1 << 30


@pytest.fixture
async def nodes(keyspace: Keyspace) -> AsyncIterator[LiveNodes]:
    live = LiveNodes(keyspace)
    try:
        yield live
    finally:
        await live.revoke_all()


def unique(base: str) -> str:
    return f"{base}-{secrets.token_hex(3)}"


async def get(env: dict[str, str], name: str) -> dict[str, object]:
    shown = await ferryctl(env, "volume", "get", name, "-o", "json")
    assert shown.code == 0, shown.stderr
    return dict(json.loads(shown.stdout))


async def test_replicas_are_placed_off_the_owner_and_too_few_nodes_is_refused(
    control: ControlServer, nodes: LiveNodes, tmp_path: Path
) -> None:
    prefix = secrets.token_hex(2)
    a, b, c = f"r{prefix}-a", f"r{prefix}-b", f"r{prefix}-c"
    await nodes.add(a, 100 * GIB)
    await nodes.add(b, 30 * GIB)
    await nodes.add(c, 60 * GIB)
    env = control.ferryctl_env()
    name = unique("rp")
    made = await ferryctl(
        env, "volume", "create", name, "--node", a, "--replicas", "1", "--rpo", "15s", "-o", "json"
    )
    assert made.code == 0, made.stderr
    created = json.loads(made.stdout)
    assert (created["replicas"], created["rpo_seconds"]) == (1, 15)
    assert created["replica_nodes"] == [c], "the roomiest node that is not the owner's"
    assert created["replace_after_seconds"] == 300 and not created["meets_rpo"]
    table = await ferryctl(env, "volume", "get", name)
    assert f"does NOT meet its rpo of 15s with 1 replica(s) on {c}" in table.stdout
    assert f"replica on {c} reports no copy" in table.stdout
    listed = await ferryctl(env, "volume", "list")
    assert "OUT/15s" in listed.stdout
    refused = await ferryctl(env, "volume", "create", unique("rp"), "--node", a, "--replicas", "3")
    assert refused.code != 0
    assert "wants 3 replica(s)" in refused.stderr and "ask for fewer" in refused.stderr
    bad = await ferryctl(env, "volume", "create", unique("rp"), "--replicas", "1", "--rpo", "1s")
    assert bad.code != 0 and "below the shortest" in bad.stderr
    # More replicas on a live volume, then fewer, and a new rpo from an apply file.
    more = await ferryctl(env, "volume", "update", name, "--replicas", "2", "-o", "json")
    assert more.code == 0, more.stderr
    assert json.loads(more.stdout)["replica_nodes"] == [c, b]
    file = tmp_path / "volumes.yaml"
    file.write_text(f"volumes:\n  - name: {name}\n    replicas: 1\n    rpo: 1m\n")
    applied = await ferryctl(env, "apply", "-f", str(file))
    assert applied.code == 0, applied.stderr
    assert "replicas 2 -> 1" in applied.stdout and "rpo 15s -> 60s" in applied.stdout
    after = await get(env, name)
    assert (after["replica_nodes"], after["rpo_seconds"]) == ([c], 60)
    again = await ferryctl(env, "apply", "-f", str(file))
    assert "nothing to change" in again.stdout


async def test_a_move_to_a_replicas_node_swaps_roles(
    control: ControlServer, nodes: LiveNodes, keyspace: Keyspace
) -> None:
    prefix = secrets.token_hex(2)
    a, b = f"m{prefix}-a", f"m{prefix}-b"
    await nodes.add(a, 100 * GIB)
    await nodes.add(b, 30 * GIB)
    env = control.ferryctl_env()
    name = unique("rp")
    made = await ferryctl(env, "volume", "create", name, "--node", a, "--replicas", "1")
    assert made.code == 0, made.stderr
    assert await keyspace.claim_owner(name, a)
    moved = await ferryctl(env, "volume", "move", name, b)
    assert moved.code == 0, moved.stderr
    shown = await get(env, name)
    assert (shown["node"], shown["replica_nodes"]) == (b, [a])
    back = await ferryctl(env, "volume", "move", name, a)
    assert back.code == 0, back.stderr
    shown = await get(env, name)
    assert (shown["node"], shown["replica_nodes"]) == (a, [b]), "a cancel swaps back"


async def test_a_replica_whose_node_stays_down_is_placed_anew(
    control: ControlServer, nodes: LiveNodes, keyspace: Keyspace
) -> None:
    prefix = secrets.token_hex(2)
    a, b, c = f"d{prefix}-a", f"d{prefix}-b", f"d{prefix}-c"
    await nodes.add(a, 100 * GIB)
    await nodes.add(c, 30 * GIB)
    lease = await register_node(
        keyspace,
        NodeInfo(
            name=b,
            address=f"127.0.0.1:{free_port()}",
            pool="p",
            free_bytes=90 * GIB,
            version="test",
        ),
        60,
    )
    env = control.ferryctl_env()
    name = unique("rp")
    made = await ferryctl(
        env, "volume", "create", name, "--node", a, "--replicas", "1", "--replace-after", "10s"
    )
    assert made.code == 0, made.stderr
    assert (await get(env, name))["replica_nodes"] == [b]
    await keyspace.claim_owner(name, a)
    await lease.revoke()
    down = time.monotonic()
    while (await get(env, name))["replica_nodes"] == [b]:
        assert time.monotonic() - down < 40, "the replica was not placed anew"
        await asyncio.sleep(1)
    waited = time.monotonic() - down
    shown = await get(env, name)
    assert shown["replica_nodes"] == [c]
    assert waited >= 10, f"replaced after {waited:.0f}s, before replace_after"
    history = shown["replica_history"]
    assert isinstance(history, list) and len(history) == 1
    assert f"replica on {b} replaced by {c}" in history[0]
    listed = await ferryctl(env, "node", "list")
    assert f"replica on {b} replaced by {c}" in listed.stdout


async def test_docker_create_options_ask_for_replicas(
    control: ControlServer, nodes: LiveNodes
) -> None:
    """``docker volume create -d ferry -o replicas=1 -o rpo=15s``: the plugin's create."""
    prefix = secrets.token_hex(2)
    a, b = f"p{prefix}-a", f"p{prefix}-b"
    await nodes.add(a, 100 * GIB)
    await nodes.add(b, 30 * GIB)
    client = ControlClient(control.address, control.certs.issue("node", a), a)
    try:
        name = unique("rp")
        await client.create_volume(name, "", "", "", {"replicas": "1", "rpo": "15s"})
        shown = await get(control.ferryctl_env(), name)
        assert (shown["node"], shown["replica_nodes"], shown["rpo_seconds"]) == (a, [b], 15)
        with pytest.raises(PluginError, match="invalid replicas"):
            await client.create_volume(unique("rp"), "", "", "", {"replicas": "one"})
    finally:
        await client.close()
