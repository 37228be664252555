"""`ferryctl volume move --wait` follows a move to its end, across an etcd restart.

The test plays the agents' part: it advances the move record and commits the
ownership transfer through the keyspace, as the source agent does.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from ferry.cluster.keyspace import Keyspace, Versioned
from ferry.core.records import Move, MovePhase, Owner
from tests.support.etcd import (
    VENV_BIN,
    ControlServer,
    EtcdServer,
    LiveNodes,
    ferryctl,
)

pytestmark = pytest.mark.integration

GIB = 1 << 30


@pytest.fixture
async def volume(control: ControlServer, keyspace: Keyspace) -> AsyncIterator[str]:
    """A volume owned by ct-wa, with ct-wb alive to move it to."""
    nodes = LiveNodes(keyspace)
    await nodes.add("ct-wa", 10 * GIB, ttl=120)
    await nodes.add("ct-wb", 10 * GIB, ttl=120)
    name = f"wait-{secrets.token_hex(3)}"
    created = await ferryctl(
        control.ferryctl_env(), "volume", "create", name, "--size", "1G", "--node", "ct-wa"
    )
    assert created.code == 0, created.stderr
    assert await keyspace.claim_owner(name, "ct-wa")
    try:
        yield name
    finally:
        await nodes.revoke_all()


async def start_move_wait(
    control: ControlServer, name: str, *extra: str
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(VENV_BIN / "ferryctl"),
        "volume",
        "move",
        name,
        "ct-wb",
        "--wait",
        *extra,
        env=control.ferryctl_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def pending_move(keyspace: Keyspace, name: str) -> Versioned[Move]:
    for _ in range(100):
        found = await keyspace.get_move(name)
        if found is not None:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"ferryctl never requested the move of {name}")


async def advance(
    keyspace: Keyspace, current: Versioned[Move], **changes: object
) -> Versioned[Move]:
    assert await keyspace.put_move(replace(current.value, **changes), current.revision)  # type: ignore[arg-type]
    found = await keyspace.get_move(current.value.volume)
    assert found is not None
    return found


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_wait_follows_the_move_through_an_etcd_restart_and_exits_0_once_moved(
    etcd: EtcdServer, control: ControlServer, keyspace: Keyspace, volume: str
) -> None:
    process = await start_move_wait(control, volume)
    move = await pending_move(keyspace, volume)
    move = await advance(
        keyspace, move, phase=MovePhase.PRECOPY, bytes_sent=1 << 20, bytes_total=4 << 20
    )
    await asyncio.sleep(1.0)
    await asyncio.to_thread(etcd.restart)
    move = await advance(keyspace, move, bytes_sent=4 << 20, rate_bps=25e6, phase=MovePhase.HANDOFF)
    assert await keyspace.transfer_owner(volume, Owner("ct-wa", 1), "ct-wb")
    await advance(keyspace, move, phase=MovePhase.DONE)
    code, stdout, stderr = await finish(process)
    assert code == 0, stderr
    assert f"volume {volume} is on ct-wb" in stdout
    bar = stderr.strip().splitlines()[-1]
    assert bar.startswith("done") and bar.endswith("4.2/4.2 MB 25.0 MB/s"), stderr


async def test_wait_exits_non_zero_with_the_agents_error_when_the_move_fails(
    control: ControlServer, keyspace: Keyspace, volume: str
) -> None:
    process = await start_move_wait(control, volume)
    move = await pending_move(keyspace, volume)
    await advance(keyspace, move, phase=MovePhase.FAILED, error="ct-wb: pool ferry-ct-wb is full")
    code, _, stderr = await finish(process)
    assert code != 0
    assert stderr.strip().splitlines()[-1] == (
        f"ferryctl: move of {volume} failed: ct-wb: pool ferry-ct-wb is full"
    )
    owner = await keyspace.get_owner(volume)
    assert owner is not None and owner.value == Owner("ct-wa", 1)


async def test_wait_gives_up_at_its_timeout_and_says_how_to_follow_on(
    control: ControlServer, keyspace: Keyspace, volume: str
) -> None:
    process = await start_move_wait(control, volume, "--timeout", "2")
    await pending_move(keyspace, volume)
    code, _, stderr = await finish(process)
    assert code != 0
    assert f"ferryctl move status {volume}" in stderr.strip().splitlines()[-1]
