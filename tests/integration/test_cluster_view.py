"""A cluster view on real etcd: one request, one revision, typed records; typed watch changes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from aetcd.exceptions import ClientError

from agent.asides import LEDGER_KINDS
from control.server import VOLUME_KINDS
from ferry.cluster.keyspace import Change, Keyspace, Kind
from ferry.cluster.view import DESIRED_KINDS, read_view
from ferry.core.records import (
    AsideCopy,
    AsideDrop,
    MountRecord,
    Move,
    NodeInfo,
    NodeState,
    VolumeSpec,
)
from protos.ferry.v1 import control_pb2
from tests.support.etcd import ClusterCerts, EtcdServer, register_node
from tests.support.etcd_requests import KvRecorder
from tests.support.inprocess import insecure_control

pytestmark = pytest.mark.integration

ASIDE = "pool/ferry-aside/pg-1"


@pytest.fixture
def keyspace(private_keyspace: Keyspace) -> Keyspace:
    return private_keyspace


@pytest.fixture
async def writer(etcd: EtcdServer, keyspace: Keyspace) -> AsyncIterator[Keyspace]:
    """The same keys through a client of its own: its requests are not the reader's."""
    client = etcd.client()
    try:
        yield Keyspace(client, prefix=keyspace._prefix)
    finally:
        await client.close()


async def _volume_on(keyspace: Keyspace, name: str, node: str) -> None:
    await keyspace.create_volume(VolumeSpec(name=name, size_bytes=1 << 30, node=node))
    assert await keyspace.claim_owner(name, node)


async def _request_move(keyspace: Keyspace, name: str, target: str) -> None:
    """What ``ferryctl volume move`` writes: the spec's node and the move, in one transaction."""
    spec, owner = await keyspace.get_volume(name), await keyspace.get_owner(name)
    assert spec is not None and owner is not None
    move = Move(volume=name, source=owner.value.node, target=target)
    assert await keyspace.request_move(spec, owner, move, None)


async def test_a_view_holds_every_kind_as_records_at_the_revision_it_was_read(
    keyspace: Keyspace,
) -> None:
    info = NodeInfo(name="n1", address="127.0.0.1:1", pool="p", free_bytes=1, version="t")
    lease = await register_node(keyspace, info, 30)
    await _volume_on(keyspace, "pg", "n1")
    await _volume_on(keyspace, "pg2", "n1")
    await keyspace.put_state(NodeState(node="n1", volume="pg", snapshots=("s1",)), lease)
    await keyspace.put_state(NodeState(node="n1", volume="pg2"), lease)
    await keyspace.put_mount(MountRecord(volume="pg", node="n1", ids=("c1",)), lease)
    await keyspace.put_mount(MountRecord(volume="pg2", node="n1"), lease)
    await keyspace.put_aside(AsideCopy(node="n1", volume="pg", dataset=ASIDE, kept_at=1), lease)
    assert await keyspace.request_drop(AsideDrop(node="n1", volume="pg", dataset=ASIDE))
    await _request_move(keyspace, "pg", "n2")

    view = await read_view(keyspace)
    assert view.revision == await keyspace.revision()
    assert sorted(view.volumes) == ["pg", "pg2"] and view.volumes["pg"].value.node == "n2"
    assert view.owners["pg"].value.node == "n1"
    assert view.moves["pg"].value.target == "n2" and "pg2" not in view.moves
    assert view.nodes["n1"].value.address == "127.0.0.1:1"
    assert [s.snapshots for s in view.states_of("pg")] == [("s1",)]
    assert [m.ids for m in view.mounts_of("pg")] == [("c1",)]
    assert [(a.volume, a.dataset) for a in view.asides] == [("pg", ASIDE)]
    assert view.drop_requested(view.asides[0])

    one = await read_view(keyspace, volume="pg")
    assert list(one.volumes) == ["pg"] and list(one.owners) == ["pg"]
    assert [s.volume for s in one.states] == ["pg"] and [m.volume for m in one.mounts] == ["pg"]
    assert list(one.nodes) == ["n1"], "nodes are about no volume: every view of one has them"
    await lease.revoke()


async def test_a_view_is_one_request_and_a_write_right_after_it_is_not_in_it(
    keyspace: Keyspace, writer: Keyspace
) -> None:
    await _volume_on(keyspace, "pg", "n1")
    requests = await KvRecorder(keyspace.client).install()
    requests.after_next(lambda: _request_move(writer, "pg", "n2"))
    view = await read_view(keyspace, DESIRED_KINDS)
    assert requests.total == 1, f"one etcd request, not {dict(requests.counts)}"
    assert view.volumes["pg"].value.node == "n1" and view.moves == {}, "all from before"
    after = await read_view(keyspace, DESIRED_KINDS)
    assert after.volumes["pg"].value.node == "n2" and after.moves["pg"].value.target == "n2"
    assert after.revision > view.revision


async def test_an_unreadable_record_is_skipped_and_listed_with_its_key(
    keyspace: Keyspace,
) -> None:
    await _volume_on(keyspace, "pg", "n1")
    await _volume_on(keyspace, "pg2", "n1")
    bad = keyspace._key("owners", "pg2")
    await keyspace.client.put(bad, json.dumps({"v": 99, "node": "n1", "epoch": 1}).encode())
    view = await read_view(keyspace, DESIRED_KINDS)
    assert sorted(view.owners) == ["pg"] and sorted(view.volumes) == ["pg", "pg2"]
    [skipped] = view.skipped()
    assert (skipped.key, skipped.volume) == (bad.decode(), "pg2")
    assert "schema version 99" in skipped.reason
    assert (await read_view(keyspace, DESIRED_KINDS, volume="pg")).skipped() == []


async def test_get_volume_is_not_split_by_a_move_written_while_it_reads(
    keyspace: Keyspace, writer: Keyspace
) -> None:
    """Failed on the five-read GetVolume: it read the spec (node n1), then the move to n2."""
    await _volume_on(keyspace, "pg", "n1")
    async with insecure_control(keyspace) as stub:
        requests = await KvRecorder(keyspace.client).install()
        requests.after_next(lambda: _request_move(writer, "pg", "n2"))
        shown = await stub.GetVolume(control_pb2.GetVolumeRequest(name="pg"))
        moving = (shown.node, shown.move.target if shown.HasField("move") else "")
        assert moving == ("n1", ""), f"a spec and a move of two moments: {moving}"
        assert requests.total == 1, f"one etcd request, not {dict(requests.counts)}"
        again = await stub.GetVolume(control_pb2.GetVolumeRequest(name="pg"))
        assert (again.node, again.move.target) == ("n2", "n2")


async def test_a_watch_says_which_kind_of_key_changed_and_what_it_is_about(
    keyspace: Keyspace,
) -> None:
    seen: list[Change] = []

    async def follow() -> None:
        async for change in keyspace.watch(Kind.MOUNTS, Kind.STATE, Kind.DROPS):
            seen.append(change)
            if len(seen) == 3:
                return

    watcher = asyncio.create_task(follow())
    await asyncio.sleep(0.3)
    lease = await keyspace.new_lease(30)
    await keyspace.put_mount(MountRecord(volume="pg", node="n1"), lease)
    await keyspace.put_state(NodeState(node="n2", volume="pg"), lease)
    assert await keyspace.request_drop(AsideDrop(node="n3", volume="pg", dataset=ASIDE))
    await asyncio.wait_for(watcher, timeout=10)
    assert [(c.kind, c.volume, c.node) for c in seen] == [
        (Kind.MOUNTS, "pg", "n1"),
        (Kind.STATE, "pg", "n2"),
        (Kind.DROPS, "", "n3"),
    ]
    await lease.revoke()


async def test_a_node_and_control_may_read_their_views_under_etcd_auth(
    etcd: EtcdServer, certs: ClusterCerts
) -> None:
    """etcd checks every range of the transaction against the user's role."""
    await asyncio.to_thread(etcd.bootstrap, ("ct-viewer",))
    for tls, kinds, node in (
        (certs.issue("node", "ct-viewer"), DESIRED_KINDS + LEDGER_KINDS, "ct-viewer"),
        (certs.control, VOLUME_KINDS, ""),
    ):
        client = etcd.client(tls)
        try:
            view = await read_view(Keyspace(client), kinds, node=node)
            assert view.revision > 0
        finally:
            await client.close()
    stranger = etcd.client(certs.issue("node", "ct-unlisted"))
    try:
        with pytest.raises(ClientError, match=r"permission denied|user name is empty"):
            await read_view(Keyspace(stranger), DESIRED_KINDS)
    finally:
        await stranger.close()


async def test_a_view_larger_than_grpcs_default_reply_limit_is_read(
    keyspace: Keyspace,
) -> None:
    """Failed before the client raised the limit: "Received message larger than max"."""
    lease = await keyspace.new_lease(60)
    snapshots = tuple(f"ferry-1-{n:06d}-{'x' * 24}" for n in range(1000))
    for i in range(120):
        await keyspace.put_state(NodeState(node="n1", volume=f"v{i}", snapshots=snapshots), lease)
    view = await read_view(keyspace, (Kind.STATE,))
    assert len(view.states) == 120 and view.states[0].snapshots == snapshots
    await lease.revoke()
