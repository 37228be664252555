"""Moves and deletes around nodes that are down or full, through ferryctl (issue 9, 6 and 8).

ferryctl runs as a subprocess against a real ferry-control and etcd; node
records sit on real leases (``LiveNodes``), and revoking one is that node
going down. Ownership and node state are written the way agents write them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

import pytest

from ferry.cluster.keyspace import Keyspace
from ferry.core.records import NodeState
from tests.support.etcd import CliResult, ControlServer, LiveNodes, ferryctl

pytestmark = pytest.mark.integration

GIB, MIB = 1 << 30, 1 << 20


@pytest.fixture
async def target(keyspace: Keyspace) -> AsyncIterator[LiveNodes]:
    live = LiveNodes(keyspace)
    await live.add("mv-t1", 50 * GIB)
    await live.add("mv-t2", 50 * GIB)
    try:
        yield live
    finally:
        await live.revoke_all()


@pytest.fixture
async def source(keyspace: Keyspace) -> AsyncIterator[LiveNodes]:
    """The node ``mv-s`` on a lease of its own: ``revoke_all`` is that node going down."""
    live = LiveNodes(keyspace)
    await live.add("mv-s", 50 * GIB)
    try:
        yield live
    finally:
        await live.revoke_all()


@pytest.fixture
def env(control: ControlServer) -> dict[str, str]:
    return control.ferryctl_env()


def ok(result: CliResult) -> CliResult:
    assert result.code == 0, f"ferryctl failed ({result.code}): {result.stderr}"
    return result


def refused(result: CliResult, *phrases: str) -> None:
    assert result.code != 0, f"ferryctl should have failed:\n{result.stdout}"
    for phrase in phrases:
        assert phrase in result.stderr


async def volume_on_source(env: dict[str, str], keyspace: Keyspace) -> str:
    name = f"mv-{secrets.token_hex(3)}"
    ok(await ferryctl(env, "volume", "create", name, "--size", "1G", "--node", "mv-s"))
    assert await keyspace.claim_owner(name, "mv-s")
    return name


async def test_a_move_whose_source_died_can_be_cancelled_and_no_new_one_starts_from_it(
    env: dict[str, str], keyspace: Keyspace, source: LiveNodes, target: LiveNodes
) -> None:
    name = await volume_on_source(env, keyspace)
    ok(await ferryctl(env, "volume", "move", name, "mv-t1"))
    await source.revoke_all()

    refused(
        await ferryctl(env, "volume", "move", name, "mv-t2"),
        "already moving to mv-t1",
        f"'ferryctl move cancel {name}' moves it back to mv-s",
    )
    back = ok(await ferryctl(env, "volume", "move", name, "mv-s"))
    assert "is on mv-s (its last move: cancelled" in back.stdout
    volume = json.loads(ok(await ferryctl(env, "volume", "get", name, "-o", "json")).stdout)
    assert (volume["node"], volume["owner"], volume["move"]["phase"]) == ("mv-s", "mv-s", "failed")

    refused(
        await ferryctl(env, "volume", "move", name, "mv-t2"),
        f"volume {name} is on mv-s, which is down",
        "cannot start until mv-s is back",
    )
    assert (await keyspace.get_move(name)).value.target == "mv-t1"  # type: ignore[union-attr]


async def test_move_cancel_ends_a_move_and_says_where_the_volume_stays(
    env: dict[str, str], keyspace: Keyspace, source: LiveNodes, target: LiveNodes
) -> None:
    name = await volume_on_source(env, keyspace)
    refused(await ferryctl(env, "move", "cancel", name), "has no move to cancel")
    ok(await ferryctl(env, "volume", "move", name, "mv-t1"))
    cancelled = ok(await ferryctl(env, "move", "cancel", name))
    assert f"move of {name} cancelled: it stays on mv-s" in cancelled.stdout
    status = json.loads(ok(await ferryctl(env, "move", "status", name, "-o", "json")).stdout)
    assert status["phase"] == "failed" and status["error"].startswith("cancelled")
    shown = ok(await ferryctl(env, "volume", "get", name)).stdout
    assert "move failed, last error: cancelled: moved back to mv-s" in shown


async def test_delete_with_the_owner_down_says_what_happens_to_its_data(
    env: dict[str, str], keyspace: Keyspace, source: LiveNodes, target: LiveNodes
) -> None:
    name = await volume_on_source(env, keyspace)
    await source.revoke_all()
    deleted = ok(await ferryctl(env, "volume", "delete", name))
    assert f"volume {name} deleted; its owner mv-s is down and still holds its data" in (
        deleted.stdout
    )
    assert f"in <pool>/ferry/{name}: when mv-s is back, Ferry leaves that copy alone" in (
        deleted.stdout
    )
    assert "destroy it there with 'zfs destroy -r'" in deleted.stdout


async def test_a_move_to_a_node_without_room_is_refused_up_front(
    env: dict[str, str], keyspace: Keyspace, source: LiveNodes, target: LiveNodes
) -> None:
    await target.add("mv-small", 100 * MIB)
    name = await volume_on_source(env, keyspace)
    lease = await keyspace.new_lease(60)
    try:
        await keyspace.put_state(NodeState(node="mv-s", volume=name, used_bytes=501 * MIB), lease)
        refused(
            await ferryctl(env, "volume", "move", name, "mv-small"),
            f"node mv-small has {100 * MIB} bytes free",
            f"holds {501 * MIB} bytes on mv-s",
        )
        assert await keyspace.get_move(name) is None, "no move was recorded"
        ok(await ferryctl(env, "volume", "move", name, "mv-t1"))
    finally:
        await lease.revoke()
