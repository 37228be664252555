"""A real agent with a hung command: bounded, reported, and never taken for a live node.

A ``ferry-agent`` process on a real zfs-fuse pool and etcd, a ``ferry-control``
in front of the same keyspace, and ``ferryctl`` as the operator runs it. The
``hang:`` failpoint makes one chosen command hang the way a command on a hung
filesystem does.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.zfs.volumes import PoolRoot
from tests.support.agent import AgentProcess
from tests.support.etcd import ClusterCerts, ControlServer, EtcdServer, ferryctl
from tests.support.pools import ScratchPool, scratch_pool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HUNG_SIZE = 17 << 20
FINE_SIZE = 16 << 20
# Seconds for what an agent does in one or two convergence passes, on a busy 2-core machine.
PATIENCE = 60.0


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    """Plaintext: the agent and control here run --insecure, as a development cluster does."""
    with EtcdServer(secure=False) as server:
        yield server


@pytest.fixture
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("to") as made:
        yield made


@pytest.fixture
def prefix() -> str:
    return f"/to-{secrets.token_hex(4)}/v1"


@pytest.fixture
def control(
    etcd: EtcdServer, certs: ClusterCerts, workdir: Path, prefix: str
) -> Iterator[ControlServer]:
    with ControlServer(etcd.endpoint, certs, workdir, prefix=prefix, insecure=True) as server:
        yield server


async def ctl_json(control: ControlServer, *args: str) -> Any:
    result = await ferryctl(control.ferryctl_env(), *args, "-o", "json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


async def until(what: str, check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"not within {seconds:.0f} s: {what}"
        await asyncio.sleep(0.5)


async def node_status(control: ControlServer, node: str) -> str | None:
    nodes = await ctl_json(control, "node", "list")
    return next((n.get("status", "") for n in nodes if n["name"] == node), None)


async def test_a_hung_command_on_one_volume_is_reported_while_the_others_converge(
    etcd: EtcdServer,
    control: ControlServer,
    pool: ScratchPool,
    prefix: str,
    workdir: Path,
) -> None:
    node = f"to-{secrets.token_hex(2)}"
    hang = f"hang:zfs create -o refquota={HUNG_SIZE}"
    env = {"FERRY_FAILPOINTS": hang, "FERRY_ZFS_TIMEOUTS": "change=200"}
    agent_process = AgentProcess(
        node, pool.name, etcd.endpoint, control.address, prefix, workdir, env
    )
    with agent_process as agent:
        await until("the agent is ready", lambda: _is(node_status(control, node), "ready"), 60)
        activated = await agent.plugin_call("/Plugin.Activate", {})
        assert activated["Implements"] == ["VolumeDriver"]

        await ctl_json(control, "volume", "create", "to-hung", "--size", "17M", "--node", node)

        async def hung_is_reported() -> bool:
            copies = (await ctl_json(control, "volume", "get", "to-hung"))["copies"]
            return any("zfs create" in c.get("stuck", "") for c in copies)

        await until("the hung create shows in volume get", hung_is_reported, PATIENCE)
        await ctl_json(control, "volume", "create", "to-fine", "--size", "16M", "--node", node)

        async def fine_is_writable() -> bool:
            copies = (await ctl_json(control, "volume", "get", "to-fine"))["copies"]
            return any(c["node"] == node and c["writable"] for c in copies)

        await until("the other volume converges meanwhile", fine_is_writable, PATIENCE)
        shown = await ferryctl(control.ferryctl_env(), "volume", "get", "to-hung")
        assert f"stuck on {node}: `zfs create" in shown.stdout
        assert "running since" in shown.stdout and "zpool status" in shown.stdout
        assert await hung_is_reported(), "still hung: it was not retried as if it had ended"


async def test_an_agent_whose_recovery_hangs_is_not_live_and_its_plugin_refuses_clearly(
    etcd: EtcdServer,
    control: ControlServer,
    pool: ScratchPool,
    prefix: str,
    workdir: Path,
    tmp_path: Path,
) -> None:
    """A copy in the pool makes start-up recovery list its snapshots: that listing hangs."""
    root = PoolRoot(pool.name)
    root.ensure()
    root.create_volume("to-held", FINE_SIZE, "off", tmp_path / "to-held")
    node = f"to-{secrets.token_hex(2)}"
    env = {"FERRY_FAILPOINTS": "hang:zfs list -H -o name -t snapshot"}
    agent_process = AgentProcess(
        node, pool.name, etcd.endpoint, control.address, prefix, workdir, env
    )
    with agent_process as agent:
        await until("the node is registered", lambda: _is_not_none(node_status(control, node)), 60)
        refused = await agent.plugin_call("/VolumeDriver.Get", {"Name": "to-held"})
        assert refused["Err"] == f"ferry agent on {node} is starting; retry in a few seconds"
        mounted = await agent.plugin_call("/VolumeDriver.Mount", {"Name": "to-held", "ID": "c1"})
        assert "is starting; retry in a few seconds" in mounted["Err"]
        activated = await agent.plugin_call("/Plugin.Activate", {})
        assert activated["Implements"] == ["VolumeDriver"]
        await asyncio.sleep(5)
        assert await node_status(control, node) == "starting"
        listed = await ferryctl(control.ferryctl_env(), "node", "list")
        assert "starting" in listed.stdout


async def _is(value: Awaitable[str | None], expected: str) -> bool:
    return await value == expected


async def _is_not_none(value: Awaitable[str | None]) -> bool:
    return await value is not None
