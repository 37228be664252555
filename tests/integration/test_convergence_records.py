"""One agent's convergence on a real pool and etcd, with records it cannot use (issue 9, 7 and 8).

A record that does not decode is skipped with its key, and every other
volume converges; a create the node's ZFS refuses ends in a failed state
that ``ferryctl volume get`` and Docker's error show, and is not retried.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import pytest

import agent.service as agent_service
from agent.control_client import ControlClient
from agent.plugin import PluginError, VolumePlugin
from agent.service import AgentService
from agent.store import VolumeStore
from agent.usage import DockerMounts
from control.operations import VolumeOps
from ferry.cluster.keyspace import Keyspace
from ferry.core.plan import Action, Actual, Desired, LocalVolume
from ferry.core.records import Move, VolumeSpec
from ferry.security import ca
from ferry.security.tls import TlsFiles
from tests.support.etcd import ControlServer, EtcdServer, ferryctl
from tests.support.etcd_requests import KvRecorder
from tests.support.inprocess import registered_agent
from tests.support.pools import ScratchPool, scratch_pool

pytestmark = pytest.mark.integration

NODE = "mv-conv"


@pytest.fixture(scope="module")
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("mvconv") as made:
        yield made


@pytest.fixture
async def agent(
    pool: ScratchPool,
    keyspace: Keyspace,
    etcd: EtcdServer,
    control: ControlServer,
    tmp_path: Path,
) -> AsyncIterator[tuple[AgentService, VolumeStore]]:
    """An agent that converges only when told (``converge()``), registered on a lease; it
    reports to ferry-control with a node certificate."""
    certs = control.certs.directory
    ca.issue(certs, "node", NODE)
    tls = TlsFiles(certs / "ca.crt", certs / f"{NODE}.crt", certs / f"{NODE}.key")
    async with registered_agent(
        NODE, pool.name, etcd.endpoint, keyspace, tmp_path, 60, tls, control.address
    ) as agent:
        _, store = agent
        try:
            yield agent
        finally:
            for volume in await store.local_volumes():
                await store.stop_writes(volume)
                await store.destroy(volume)


def unique(base: str) -> str:
    return f"{base}-{secrets.token_hex(3)}"


async def test_a_record_that_does_not_decode_is_skipped_and_the_rest_converges(
    agent: tuple[AgentService, VolumeStore],
    keyspace: Keyspace,
    control: ControlServer,
) -> None:
    service, store = agent
    good, bad_schema, bad_json = unique("good"), unique("newer"), unique("garbled")
    await keyspace.create_volume(VolumeSpec(name=good, size_bytes=16 << 20, node=NODE))
    await keyspace.create_volume(VolumeSpec(name=bad_schema, size_bytes=16 << 20, node=NODE))
    newer = {"v": 99, "node": NODE, "epoch": 1}
    bad_keys = [keyspace._key("owners", bad_schema), keyspace._key("volumes", bad_json)]
    await keyspace.client.put(bad_keys[0], json.dumps(newer).encode())
    await keyspace.client.put(bad_keys[1], b"{not json")
    try:
        await service.converge()
        held = await store.local_volumes()
        assert good in held, "the readable volume was created while others were unreadable"
        owner = await keyspace.get_owner(good)
        assert owner is not None and owner.value.node == NODE
        assert bad_schema not in held, "a volume with an unreadable owner is left alone"

        listing = await ferryctl(control.ferryctl_env(), "volume", "list", "-o", "json")
        assert listing.code == 0, listing.stderr
        assert good in {v["name"] for v in json.loads(listing.stdout)}
        for key in bad_keys:
            assert f"skipped unreadable record {key.decode()}" in listing.stderr
        assert "schema version 99" in listing.stderr
        shown = await ferryctl(control.ferryctl_env(), "volume", "get", bad_json)
        assert shown.code != 0
        assert f"record {bad_keys[1].decode()} is unreadable" in shown.stderr
        assert "fix or delete it with etcdctl" in shown.stderr
    finally:
        for key in bad_keys:
            await keyspace.client.delete(key)
        for name in (good, bad_schema):
            spec = await keyspace.get_volume(name)
            assert spec is not None
            await keyspace.update_volume(
                VolumeSpec(**{**spec.value.__dict__, "deleted": True}), spec.revision
            )
        await service.converge()


async def test_a_size_below_an_empty_dataset_is_refused_at_control(
    agent: tuple[AgentService, VolumeStore], control: ControlServer, keyspace: Keyspace
) -> None:
    """With a live node of ample room, as Docker's ``-o size=1`` reached it."""
    name = unique("tiny")
    result = await ferryctl(control.ferryctl_env(), "volume", "create", name, "--size", "1")
    assert result.code != 0
    assert "below the smallest volume, 1M" in result.stderr
    assert await keyspace.get_volume(name) is None, "nothing was stored"


async def test_a_create_the_node_refuses_ends_failed_and_is_not_retried(
    agent: tuple[AgentService, VolumeStore],
    keyspace: Keyspace,
    control: ControlServer,
    tmp_path: Path,
) -> None:
    service, store = agent
    name = unique("small")
    # Stored past control's check (as an older control would): ZFS refuses it on the node.
    await keyspace.create_volume(VolumeSpec(name=name, size_bytes=64 << 10, node=NODE))
    await service.converge()
    failed = await keyspace.get_volume(name)
    assert failed is not None and "NoSpace" in failed.value.create_error
    assert name not in await store.local_volumes()
    await service.converge()
    again = await keyspace.get_volume(name)
    assert again is not None and again.revision == failed.revision, "not tried again"

    shown = await ferryctl(control.ferryctl_env(), "volume", "get", name)
    assert shown.code == 0, shown.stderr
    assert f"failed: node {NODE} could not create it" in shown.stdout

    certs = control.certs.directory
    node_tls = TlsFiles(certs / "ca.crt", certs / f"{NODE}.crt", certs / f"{NODE}.key")
    to_control = ControlClient(control.address, node_tls, NODE)
    plugin = VolumePlugin(
        node=NODE,
        keyspace=keyspace,
        store=store,
        control=to_control,
        lease=lambda: service._registration.lease,
        mounts=DockerMounts(tmp_path / "docker-mounts.json"),
    )
    try:
        with pytest.raises(PluginError, match=f"could not be created on {NODE}: NoSpace"):
            await plugin.mount(name, "container-1")
    finally:
        await to_control.close()

    resized = await VolumeOps(keyspace).update(name, size="16M")
    assert resized.create_error == "", "a new size is a new try"
    await service.converge()
    assert name in await store.local_volumes()


async def test_a_move_requested_while_a_pass_reads_is_planned_whole(
    agent: tuple[AgentService, VolumeStore],
    keyspace: Keyspace,
    etcd: EtcdServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pass plans from one revision: the spec's new node and the move together, or neither.

    Failed on the three-read pass: it read the volumes (node mv-conv), then the move
    request landed, then it read the owners and the move to mv-away.
    """
    service, _ = agent
    name = unique("split")
    await keyspace.create_volume(VolumeSpec(name=name, size_bytes=16 << 20, node=NODE))
    planned: list[Desired] = []

    def record(desired: Desired, actual: Actual) -> list[Action]:
        planned.append(desired)
        return []

    monkeypatch.setattr(agent_service, "plan", record)
    other = etcd.client()
    try:
        mover = Keyspace(other)
        assert await mover.claim_owner(name, NODE)

        async def request_move() -> None:
            spec, owner = await mover.get_volume(name), await mover.get_owner(name)
            assert spec is not None and owner is not None
            move = Move(volume=name, source=NODE, target="mv-away")
            assert await mover.request_move(spec, owner, move, None)

        requests = await KvRecorder(keyspace.client).install()
        requests.after_next(request_move)
        await service.converge()
        await service.converge()
        first, second = planned
        seen = [
            (d.volumes[name].node, d.moves[name].target if name in d.moves else "") for d in planned
        ]
        assert seen == [(NODE, ""), ("mv-away", "mv-away")], f"planned from two moments: {seen}"
        assert first.owners[name].node == second.owners[name].node == NODE
    finally:
        spec = await keyspace.get_volume(name)
        if spec is not None:
            await keyspace.update_volume(
                VolumeSpec(**{**spec.value.__dict__, "deleted": True}), spec.revision
            )
        await keyspace.purge_volume(name)
        await other.close()


async def test_a_move_driver_ending_while_a_pass_reads_still_counts_as_running(
    agent: tuple[AgentService, VolumeStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What runs is read before the copies: a copy read while its driver ran is planned with
    that driver running.

    Failed when ``running_moves`` was read after the copies and the view: a handoff whose
    driver unmounted the frozen copy and ended in between left a copy that read "mounted",
    owned elsewhere, with no driver, and the pass planned Rejoin on a clean handoff (it
    snapshotted, split and re-received the old owner's copy).
    """
    service, store = agent
    name = unique("ending")
    driver_may_end = asyncio.Event()

    async def driver() -> None:
        await driver_may_end.wait()

    service._executor._moves[name] = asyncio.create_task(driver())
    read_copies = store.local_volumes

    async def copies_read_as_the_driver_ends(skip: Iterable[str] = ()) -> dict[str, LocalVolume]:
        found = await read_copies(skip=skip)
        driver_may_end.set()
        await asyncio.sleep(0.05)
        return found

    planned: list[Actual] = []

    def record(desired: Desired, actual: Actual) -> list[Action]:
        planned.append(actual)
        return []

    monkeypatch.setattr(store, "local_volumes", copies_read_as_the_driver_ends)
    monkeypatch.setattr(agent_service, "plan", record)
    await service.converge()
    assert name not in service._executor.running_moves, "the stand-in driver did not end"
    assert name in planned[0].running_moves
