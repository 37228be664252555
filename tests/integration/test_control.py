"""ferry-control as it runs in production: processes on mutual TLS in front of a real etcd.

Several instances stay correct together, desired state survives an etcd
restart, dead nodes vanish with their lease, placement picks the roomiest
live node, and only clients with a certificate from the cluster CA get in.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from ferry.cluster.keyspace import Keyspace
from ferry.security.tls import TlsFiles
from protos.ferry.v1 import control_pb2, control_pb2_grpc
from tests.support.etcd import (
    ClusterCerts,
    ControlServer,
    EtcdServer,
    LiveNodes,
    ferryctl,
    issue_certificates,
)

pytestmark = pytest.mark.integration

GIB = 1 << 30


@pytest.fixture
async def nodes(keyspace: Keyspace) -> AsyncIterator[LiveNodes]:
    live = LiveNodes(keyspace)
    try:
        yield live
    finally:
        await live.revoke_all()


def channel(address: str, tls: TlsFiles) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(
        address,
        tls.channel_credentials(),
        options=[("grpc.ssl_target_name_override", "control")],
    )


def unique(base: str) -> str:
    return f"{base}-{secrets.token_hex(3)}"


async def test_two_instances_racing_the_same_create_let_exactly_one_win(
    etcd: EtcdServer, control: ControlServer, certs: ClusterCerts, workdir: Path, nodes: LiveNodes
) -> None:
    await nodes.add("ct-a", 10 * GIB)
    with ControlServer(etcd.endpoint, certs, workdir) as second:
        first_channel = channel(control.address, certs.admin)
        second_channel = channel(second.address, certs.admin)
        stubs = [
            control_pb2_grpc.ControlStub(first_channel),
            control_pb2_grpc.ControlStub(second_channel),
        ]
        try:
            for _ in range(5):
                name = unique("race")
                request = control_pb2.CreateVolumeRequest(name=name, size="1G")
                outcomes = await asyncio.gather(
                    *(stubs[i % 2].CreateVolume(request, timeout=30) for i in range(8)),
                    return_exceptions=True,
                )
                wins = [o for o in outcomes if isinstance(o, control_pb2.Volume)]
                losses = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
                assert len(wins) == 1 and len(losses) == 7, outcomes
                for loss in losses:
                    assert loss.code() == grpc.StatusCode.ALREADY_EXISTS
                    assert loss.details() == f"volume {name} already exists"
        finally:
            await first_channel.close(None)
            await second_channel.close(None)


async def test_racing_moves_to_two_nodes_let_one_target_win_in_placement_and_move(
    etcd: EtcdServer,
    control: ControlServer,
    certs: ClusterCerts,
    workdir: Path,
    nodes: LiveNodes,
    keyspace: Keyspace,
) -> None:
    for node in ("ct-m1", "ct-m2", "ct-m3"):
        await nodes.add(node, 10 * GIB)
    with ControlServer(etcd.endpoint, certs, workdir) as second:
        channels = [channel(control.address, certs.admin), channel(second.address, certs.admin)]
        stubs = [control_pb2_grpc.ControlStub(c) for c in channels]
        try:
            for _ in range(5):
                name = unique("mrace")
                await stubs[0].CreateVolume(
                    control_pb2.CreateVolumeRequest(name=name, size="1G", node="ct-m1")
                )
                assert await keyspace.claim_owner(name, "ct-m1")
                outcomes = await asyncio.gather(
                    *(
                        stubs[i % 2].MoveVolume(
                            control_pb2.MoveVolumeRequest(name=name, node=f"ct-m{2 + i % 2}"),
                            timeout=30,
                        )
                        for i in range(8)
                    ),
                    return_exceptions=True,
                )
                spec, move = await keyspace.get_volume(name), await keyspace.get_move(name)
                assert spec is not None and move is not None
                assert spec.value.node == move.value.target, "placement without its move"
                for outcome in outcomes:
                    if isinstance(outcome, control_pb2.Volume):
                        assert outcome.node == move.value.target
                    else:
                        assert isinstance(outcome, grpc.aio.AioRpcError), outcome
                        assert outcome.code() in (
                            grpc.StatusCode.ABORTED,
                            grpc.StatusCode.FAILED_PRECONDITION,
                        ), outcome.details()
        finally:
            for open_channel in channels:
                await open_channel.close(None)


async def test_desired_state_survives_an_etcd_restart(
    etcd: EtcdServer, control: ControlServer, nodes: LiveNodes
) -> None:
    await nodes.add("ct-b", 10 * GIB, ttl=120)
    env = control.ferryctl_env()
    names = [unique("keep") for _ in range(3)]
    for name in names:
        assert (await ferryctl(env, "volume", "create", name, "--size", "2G")).code == 0
    before = json.loads((await ferryctl(env, "volume", "list", "-o", "json")).stdout)
    etcd.restart()
    listing = await ferryctl(env, "volume", "list", "-o", "json")
    for _ in range(20):
        if listing.code == 0:
            break
        await asyncio.sleep(0.5)
        listing = await ferryctl(env, "volume", "list", "-o", "json")
    assert listing.code == 0, listing.stderr
    assert json.loads(listing.stdout) == before
    after = unique("after")
    created = await ferryctl(env, "volume", "create", after, "--size", "1G", "-o", "json")
    assert created.code == 0, created.stderr
    assert json.loads(created.stdout)["node"] == "ct-b"


async def test_a_node_whose_lease_expires_leaves_node_list(
    control: ControlServer, nodes: LiveNodes
) -> None:
    await nodes.add("ct-dying", GIB, ttl=2)
    env = control.ferryctl_env()

    async def names() -> set[str]:
        result = await ferryctl(env, "node", "list", "-o", "json")
        assert result.code == 0, result.stderr
        return {n["name"] for n in json.loads(result.stdout)}

    assert "ct-dying" in await names()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while "ct-dying" in await names():
        assert loop.time() < deadline, "node still listed long after its 2 s lease"
        await asyncio.sleep(0.3)
    refused = await ferryctl(env, "volume", "create", unique("v"), "--node", "ct-dying")
    assert refused.code != 0 and "unknown or down" in refused.stderr


async def test_placement_picks_the_roomiest_live_node_and_keeps_the_choice(
    control: ControlServer, nodes: LiveNodes
) -> None:
    await nodes.add("ct-small", 5 * GIB)
    await nodes.add("ct-big", 500 * GIB)
    env = control.ferryctl_env()
    name = unique("placed")
    created = await ferryctl(env, "volume", "create", name, "--size", "4G", "-o", "json")
    assert created.code == 0, created.stderr
    assert json.loads(created.stdout)["node"] == "ct-big"
    await nodes.add("ct-bigger", 900 * GIB)
    shown = await ferryctl(env, "volume", "get", name, "-o", "json")
    assert json.loads(shown.stdout)["node"] == "ct-big", "placement is stored, not recomputed"
    too_big = await ferryctl(
        env, "volume", "create", unique("v"), "--size", "6G", "--node", "ct-small"
    )
    assert too_big.code != 0
    assert "more than node ct-small has free" in too_big.stderr
    assert "smaller size or another node" in too_big.stderr
    nowhere = await ferryctl(env, "volume", "create", unique("v"), "--size", "2T")
    assert nowhere.code != 0 and "more than node ct-bigger has free" in nowhere.stderr


async def test_clients_without_a_cluster_certificate_are_refused(
    control: ControlServer, certs: ClusterCerts, workdir: Path, nodes: LiveNodes
) -> None:
    request = control_pb2.ListVolumesRequest()
    anonymous = grpc.aio.secure_channel(
        control.address,
        grpc.ssl_channel_credentials(root_certificates=certs.admin.ca.read_bytes()),
        options=[("grpc.ssl_target_name_override", "control")],
    )
    plaintext = grpc.aio.insecure_channel(control.address)
    other = issue_certificates(workdir / "other-ca")
    foreign = TlsFiles(certs.admin.ca, other.admin.cert, other.admin.key)
    impostor = channel(control.address, foreign)
    trusted = channel(control.address, certs.admin)
    try:
        for refused_channel in (anonymous, plaintext, impostor):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await control_pb2_grpc.ControlStub(refused_channel).ListVolumes(request, timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        reply = await control_pb2_grpc.ControlStub(trusted).ListVolumes(request, timeout=5)
        assert isinstance(reply, control_pb2.ListVolumesReply)
    finally:
        for open_channel in (anonymous, plaintext, impostor, trusted):
            await open_channel.close(None)
    through_cli = await ferryctl(control.ferryctl_env(foreign), "volume", "list")
    assert through_cli.code != 0
    assert len(through_cli.stderr.strip().splitlines()) == 1
    assert "cannot reach ferry-control" in through_cli.stderr


async def test_a_call_while_etcd_is_down_says_so_and_what_to_do(
    etcd: EtcdServer, control: ControlServer, nodes: LiveNodes
) -> None:
    await nodes.add("ct-d", 10 * GIB, ttl=120)
    env = control.ferryctl_env()
    name = unique("down")
    assert (await ferryctl(env, "volume", "create", name, "--size", "1G")).code == 0
    etcd.stop()
    try:
        answer = await ferryctl(env, "volume", "get", name)
    finally:
        etcd.start()
    assert answer.code != 0
    assert "ferry-control cannot reach etcd" in answer.stderr, answer.stderr
    assert "retry" in answer.stderr
    assert "Unexpected" not in answer.stderr
