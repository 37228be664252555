"""ferryctl end to end: the CLI as a subprocess, a real ferry-control on mutual TLS, real etcd.

Node records sit on real etcd leases (``LiveNodes``) in place of agents:
control only reads them. Ownership is claimed through the keyspace the way
an agent claims a volume it created.
"""

from __future__ import annotations

import datetime
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from ferry.cluster.keyspace import Keyspace
from ferry.core.records import MountRecord, NodeState
from tests.support.etcd import (
    CliResult,
    ControlServer,
    LiveNodes,
    ferryctl,
    free_port,
)

pytestmark = pytest.mark.integration

GIB = 1 << 30


@pytest.fixture
async def nodes(keyspace: Keyspace) -> AsyncIterator[LiveNodes]:
    live = LiveNodes(keyspace)
    await live.add("ct-n1", 50 * GIB)
    await live.add("ct-n2", 20 * GIB)
    try:
        yield live
    finally:
        await live.revoke_all()


@pytest.fixture
def env(control: ControlServer) -> dict[str, str]:
    return control.ferryctl_env()


def unique(base: str) -> str:
    return f"{base}-{secrets.token_hex(3)}"


def ok(result: CliResult) -> CliResult:
    assert result.code == 0, f"ferryctl failed ({result.code}): {result.stderr}"
    return result


def refused(result: CliResult, *phrases: str) -> str:
    """The one-line error of a failed run, checked for each phrase."""
    assert result.code != 0, f"ferryctl should have failed:\n{result.stdout}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    for phrase in phrases:
        assert phrase in lines[0]
    return lines[0]


async def get_json(env: dict[str, str], name: str) -> dict[str, object]:
    result = ok(await ferryctl(env, "volume", "get", name, "-o", "json"))
    found: dict[str, object] = json.loads(result.stdout)
    return found


async def listed(env: dict[str, str]) -> dict[str, dict[str, object]]:
    result = ok(await ferryctl(env, "volume", "list", "-o", "json"))
    return {v["name"]: v for v in json.loads(result.stdout)}


async def test_create_then_get_and_list_in_every_format(
    env: dict[str, str], nodes: LiveNodes
) -> None:
    name = unique("pg")
    created = ok(
        await ferryctl(
            env,
            "volume",
            "create",
            name,
            "--size",
            "512M",
            "--node",
            "ct-n2",
            "--compression",
            "lzjb",
            "-o",
            "json",
        )
    )
    volume = json.loads(created.stdout)
    assert (volume["name"], volume["size_bytes"], volume["node"], volume["compression"]) == (
        name,
        512 << 20,
        "ct-n2",
        "lzjb",
    )
    assert volume["deleted"] is False
    assert await get_json(env, name) == volume
    assert (await listed(env))[name] == volume
    as_yaml = ok(await ferryctl(env, "volume", "get", name, "-o", "yaml"))
    assert yaml.safe_load(as_yaml.stdout) == volume
    table = ok(await ferryctl(env, "volume", "list")).stdout
    row = next(line for line in table.splitlines() if line.startswith(name))
    assert "512.0MiB" in row and "ct-n2" in row and "lzjb" in row


async def test_move_records_the_move_and_changes_the_desired_node(
    env: dict[str, str], nodes: LiveNodes, keyspace: Keyspace
) -> None:
    name = unique("db")
    ok(await ferryctl(env, "volume", "create", name, "--size", "1G", "--node", "ct-n1"))
    assert await keyspace.claim_owner(name, "ct-n1")
    moved = ok(await ferryctl(env, "volume", "move", name, "ct-n2"))
    assert "moving ct-n1 -> ct-n2" in moved.stdout
    volume = await get_json(env, name)
    assert volume["node"] == "ct-n2"
    assert volume["owner"] == "ct-n1"
    assert volume["move"] == {
        **volume["move"],  # type: ignore[dict-item]
        "source": "ct-n1",
        "target": "ct-n2",
        "phase": "pending",
    }
    status = json.loads(ok(await ferryctl(env, "move", "status", name, "-o", "json")).stdout)
    assert (status["source"], status["target"], status["phase"]) == ("ct-n1", "ct-n2", "pending")
    refused(await ferryctl(env, "volume", "move", name, "ct-n9"), "ct-n9", "unknown or down")


async def test_moving_back_to_the_source_cancels_a_move_that_has_not_handed_off(
    env: dict[str, str], nodes: LiveNodes, keyspace: Keyspace
) -> None:
    await nodes.add("ct-n3", 20 * GIB)
    name = unique("db")
    ok(await ferryctl(env, "volume", "create", name, "--size", "1G", "--node", "ct-n1"))
    assert await keyspace.claim_owner(name, "ct-n1")
    ok(await ferryctl(env, "volume", "move", name, "ct-n2"))
    refused(
        await ferryctl(env, "volume", "move", name, "ct-n3"),
        "already moving to ct-n2",
        "'ferryctl move cancel",
        "moves it back to ct-n1",
    )
    back = ok(await ferryctl(env, "volume", "move", name, "ct-n1"))
    assert "is on ct-n1 (its last move: cancelled: moved back to ct-n1" in back.stdout
    volume = await get_json(env, name)
    assert (volume["node"], volume["owner"]) == ("ct-n1", "ct-n1")
    assert volume["move"]["phase"] == "failed"  # type: ignore[index]
    again = ok(await ferryctl(env, "volume", "move", name, "ct-n3"))
    assert "moving ct-n1 -> ct-n3" in again.stdout


async def test_delete_is_refused_while_mounted_unless_forced(
    env: dict[str, str], nodes: LiveNodes, keyspace: Keyspace
) -> None:
    name = unique("web")
    ok(await ferryctl(env, "volume", "create", name, "--size", "1G", "--node", "ct-n1"))
    lease = await keyspace.client.lease(60)
    await keyspace.put_mount(MountRecord(volume=name, node="ct-n1", ids=("c1",)), lease)
    # ct-n1 reports holding a copy, so control keeps the deleted spec until it is destroyed.
    holding = await keyspace.client.lease(60)
    await keyspace.put_state(NodeState(node="ct-n1", volume=name), holding)
    try:
        refused(await ferryctl(env, "volume", "delete", name), "mounted on ct-n1", "--force")
        assert (await listed(env))[name]["mounted_on"] == ["ct-n1"]
        assert (await get_json(env, name))["mounted_on"] == ["ct-n1"]
        ok(await ferryctl(env, "volume", "delete", name, "--force"))
    finally:
        await lease.revoke()
    assert name not in await listed(env)
    refused(await ferryctl(env, "volume", "get", name), "does not exist", "not_found")
    stored = await keyspace.get_volume(name)
    assert stored is not None and stored.value.deleted, "deletion is desired state for agents"
    again = ferryctl(env, "volume", "create", name, "--size", "1G", "--node", "ct-n1")
    refused(await again, "being destroyed", "no longer shows it")
    await holding.revoke()


async def test_node_list_shows_live_nodes(env: dict[str, str], nodes: LiveNodes) -> None:
    rows = json.loads(ok(await ferryctl(env, "node", "list", "-o", "json")).stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["ct-n1"]["free_bytes"] == 50 * GIB
    assert by_name["ct-n2"]["pool"] == "ct-ct-n2"
    table = ok(await ferryctl(env, "node", "list")).stdout
    assert "50.0GiB" in table and "20.0GiB" in table


async def test_node_list_shows_when_each_nodes_certificate_expires(
    env: dict[str, str], nodes: LiveNodes
) -> None:
    expiry = datetime.datetime(2027, 3, 4, 5, 6, tzinfo=datetime.UTC).timestamp()
    await nodes.add("ct-certified", GIB, cert_not_after=expiry)
    rows = json.loads(ok(await ferryctl(env, "node", "list", "-o", "json")).stdout)
    assert {r["name"]: r.get("cert_not_after") for r in rows}["ct-certified"] == expiry
    table = ok(await ferryctl(env, "node", "list")).stdout
    assert "CERT_EXPIRES" in table
    line = next(row for row in table.splitlines() if "ct-certified" in row)
    assert "2027-03-04" in line
    assert next(row for row in table.splitlines() if "ct-n1" in row).rstrip().endswith("-")


def write(path: Path, volumes: list[dict[str, str]]) -> Path:
    path.write_text(yaml.safe_dump({"volumes": volumes}, sort_keys=False))
    return path


async def test_apply_creates_then_changes_nothing_then_moves_then_prunes(
    env: dict[str, str], nodes: LiveNodes, keyspace: Keyspace, tmp_path: Path
) -> None:
    a, b, stray = unique("app"), unique("logs"), unique("stray")
    ok(await ferryctl(env, "volume", "create", stray, "--size", "1G", "--node", "ct-n2"))
    first = [
        {"name": a, "size": "2G", "node": "ct-n1", "compression": "gzip"},
        {"name": b, "size": "256M"},
    ]
    file = write(tmp_path / "volumes.yaml", first)
    created = ok(await ferryctl(env, "apply", "-f", str(file))).stdout
    assert f"create {a}: on ct-n1" in created and f"create {b}" in created
    now = await listed(env)
    assert (now[a]["node"], now[a]["size_bytes"], now[a]["compression"]) == (
        "ct-n1",
        2 * GIB,
        "gzip",
    )
    assert now[b]["node"] == "ct-n1", "placed on the node with most free space"
    assert ok(await ferryctl(env, "apply", "-f", str(file))).stdout.strip() == "nothing to change"
    assert json.loads(ok(await ferryctl(env, "diff", "-f", str(file), "-o", "json")).stdout) == []

    assert await keyspace.claim_owner(a, "ct-n1")
    second = [{**first[0], "node": "ct-n2", "size": "3G"}, first[1]]
    write(file, second)
    planned = json.loads(ok(await ferryctl(env, "diff", "-f", str(file), "-o", "json")).stdout)
    assert planned == [
        {"action": "move", "name": a, "detail": "ct-n1 -> ct-n2"},
        {"action": "update", "name": a, "detail": f"size {2 * GIB} -> {3 * GIB}"},
    ]
    dry = ok(await ferryctl(env, "apply", "--dry-run", "-f", str(file))).stdout
    assert f"would move {a}" in dry
    assert (await get_json(env, a))["node"] == "ct-n1", "a dry run changes nothing"
    ok(await ferryctl(env, "apply", "-f", str(file)))
    moved = await get_json(env, a)
    assert (moved["node"], moved["size_bytes"]) == ("ct-n2", 3 * GIB)
    assert moved["move"]["target"] == "ct-n2"  # type: ignore[index]
    assert ok(await ferryctl(env, "apply", "-f", str(file))).stdout.strip() == "nothing to change"

    assert stray in await listed(env), "without --prune, volumes absent from the file stay"
    pruning = json.loads(
        ok(await ferryctl(env, "diff", "--prune", "-f", str(file), "-o", "json")).stdout
    )
    assert {"action": "delete", "name": stray, "detail": "not in the file"} in pruning
    ok(await ferryctl(env, "apply", "--prune", "-f", str(file)))
    after = await listed(env)
    assert stray not in after and a in after and b in after


async def test_apply_makes_every_change_it_can_and_names_the_one_it_could_not(
    env: dict[str, str], nodes: LiveNodes, tmp_path: Path
) -> None:
    stranded, first, second = unique("stranded"), unique("first"), unique("second")
    file = write(
        tmp_path / "volumes.yaml",
        [
            {"name": stranded, "size": "1G", "node": "ct-nowhere"},
            {"name": first, "size": "1G", "node": "ct-n1"},
            {"name": second, "size": "1G", "node": "ct-n2"},
        ],
    )
    result = await ferryctl(env, "apply", "-f", str(file))
    assert result.code == 1, result.stdout
    assert f"create {stranded} failed" in result.stderr and "ct-nowhere" in result.stderr
    assert "1 of 3 volumes" in result.stderr and "run apply again" in result.stderr
    now = await listed(env)
    assert stranded not in now
    assert (now[first]["node"], now[second]["node"]) == ("ct-n1", "ct-n2")
    planned = json.loads(ok(await ferryctl(env, "diff", "-f", str(file), "-o", "json")).stdout)
    assert [change["name"] for change in planned] == [stranded], "only the failed one is left"


async def test_a_malformed_file_is_rejected_whole_with_its_line(
    env: dict[str, str], nodes: LiveNodes, tmp_path: Path
) -> None:
    good, bad = unique("good"), unique("bad")
    file = tmp_path / "broken.yaml"
    file.write_text(f"volumes:\n  - name: {good}\n    size: 1G\n  - name: {bad}\n    size: lots\n")
    before = await listed(env)
    for command in ("apply", "diff"):
        refused(await ferryctl(env, command, "-f", str(file)), f"{file}:4:", "invalid size 'lots'")
    assert await listed(env) == before
    file.write_text(f"volumes:\n  - name: {good}\n    colour: red\n")
    refused(await ferryctl(env, "apply", "-f", str(file)), f"{file}:3:", "unknown key 'colour'")
    assert await listed(env) == before


async def test_every_bad_input_exits_non_zero_with_one_line(
    env: dict[str, str], nodes: LiveNodes, control: ControlServer
) -> None:
    name = unique("dup")
    ok(await ferryctl(env, "volume", "create", name, "--size", "1G"))
    refused(
        await ferryctl(env, "volume", "create", name, "--size", "1G"),
        f"volume {name} already exists",
    )
    refused(
        await ferryctl(env, "volume", "create", "no/slash", "--size", "1G"),
        "invalid volume name 'no/slash'",
    )
    refused(
        await ferryctl(env, "volume", "create", unique("v"), "--size", "huge"),
        "invalid size 'huge'",
    )
    refused(await ferryctl(env, "volume", "create", unique("v"), "--size", "-1G"), "invalid size")
    refused(
        await ferryctl(env, "volume", "create", unique("v"), "--node", "ct-ghost"),
        "node 'ct-ghost' is unknown or down",
    )
    refused(
        await ferryctl(env, "volume", "create", unique("v"), "--compression", "zstd"),
        "invalid compression 'zstd'",
    )
    refused(await ferryctl(env, "volume", "get", "ct-missing"), "volume ct-missing does not exist")
    refused(await ferryctl(env, "volume", "delete", "ct-missing"), "does not exist")
    refused(await ferryctl(env, "volume", "move", "ct-missing", "ct-n1"), "does not exist")
    unreachable = {**env, "FERRY_CONTROL": f"127.0.0.1:{free_port()}"}
    refused(await ferryctl(unreachable, "volume", "list"), "cannot reach ferry-control")
    assert name in await listed(env)
