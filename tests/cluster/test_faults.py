"""Faults during a move: every one ends with exactly one writable copy and the data intact.

Agents are killed with SIGKILL mid-transfer and around the ownership
compare-and-swap (through agent.failpoints, which exit like kill -9 at an
exact line), the target's link is cut, and streams from impostors are sent
straight to an agent's Transfer service.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Iterator

import grpc
import pytest

from agent.replication.source import HANDOFF_DEADLINE_SECONDS
from protos.ferry.v1 import transfer_pb2, transfer_pb2_grpc
from tests.support.cluster import Cluster, ClusterHost
from tests.support.volumes import (
    MIB,
    checksums,
    finish_and_check,
    mount_held,
    mountpoint,
    sent,
    wait_for,
    writable_copies,
    write_random_on,
)

pytestmark = pytest.mark.cluster


@pytest.fixture
def loaded(cluster: Cluster) -> Iterator[tuple[str, dict[str, str]]]:
    """A volume on the first host with 384 MiB of data, and its checksums."""
    if cluster.kind != "local":
        pytest.skip("fault injection drives local-cluster agents")
    a = cluster.hosts[0]
    name = f"ft-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", name, "--size", "1G", "--node", a.name])
    wait_for(f"{name} owned by {a.name}", lambda: cluster.volume(name)["owner"] == a.name)
    write_random_on(cluster, a, f"{mountpoint(a, name)}/data", 384)
    yield name, checksums(cluster, a, mountpoint(a, name))
    for host in cluster.hosts:
        if not _port_open(host.agent_address or ""):
            cluster.agent(host.name, "start")
    cluster.ferryctl(["volume", "delete", name, "--force"], check=False)


def _port_open(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.parametrize("victim", [0, 1], ids=["source", "target"])
def test_an_agent_killed_mid_transfer_leaves_the_source_owner_and_the_move_completes(
    cluster: Cluster, loaded: tuple[str, dict[str, str]], victim: int
) -> None:
    name, data = loaded
    a, b = cluster.hosts[0], cluster.hosts[1]
    cluster.ferryctl(["volume", "move", name, b.name])
    wait_for("the transfer to start", lambda: sent(cluster, name) > 0, 60)
    cluster.agent(cluster.hosts[victim].name, "kill")
    info = cluster.volume(name)
    assert (info["owner"], info["epoch"]) == (a.name, 1)
    # Writable on the source, or read-only there if the handoff had begun: never on both.
    assert writable_copies(cluster, name) in ([a.name], [])
    time.sleep(2)
    cluster.agent(cluster.hosts[victim].name, "start")
    finish_and_check(cluster, name, data, b)


def test_a_stream_cut_by_the_target_dying_is_not_counted_twice(
    cluster: Cluster, loaded: tuple[str, dict[str, str]]
) -> None:
    """The move's bytes are what the target holds; the attempt's are what it sent (so 712 MB
    "sent" for a 525 MB volume after one retry was the sum of both attempts)."""
    name, data = loaded
    b = cluster.hosts[1]
    cluster.ferryctl(["volume", "move", name, b.name])
    wait_for("the full stream to be under way", lambda: sent(cluster, name) >= 48 * MIB, 60)
    cluster.agent(b.name, "kill")
    wait_for(
        "the source to see the cut",
        lambda: int(cluster.volume(name)["move"].get("attempt", 0)) >= 1,
        60,
    )
    cut = cluster.volume(name)["move"]
    assert cut["bytes_sent"] < 48 * MIB, cut  # the target kept none of the cut stream
    cluster.agent(b.name, "start")
    finish_and_check(cluster, name, data, b)
    move = cluster.volume(name)["move"]
    # One full stream of 384 MiB and small incrementals, not the cut stream on top.
    assert 384 * MIB <= move["bytes_sent"] < 400 * MIB, move
    assert move["attempt_bytes_sent"] <= move["bytes_sent"], move


def _move_until_the_source_dies_at(cluster: Cluster, name: str, failpoint: str) -> None:
    """Restart the source's agent armed with ``failpoint``, move the volume to the second
    host, and return once the source has died there."""
    a, b = cluster.hosts[0], cluster.hosts[1]
    cluster.agent(a.name, "stop")
    cluster.agent(a.name, "start", {"FERRY_FAILPOINTS": failpoint})
    wait_for("the armed agent", lambda: _port_open(a.agent_address or ""), 30)
    cluster.ferryctl(["volume", "move", name, b.name])
    wait_for(
        f"the source to die at {failpoint}", lambda: not _port_open(a.agent_address or ""), 120
    )


def test_a_source_dead_before_releasing_its_transfer_holds_finishes_the_move(
    cluster: Cluster, loaded: tuple[str, dict[str, str]]
) -> None:
    """The first stream arrived, the source died holding its snapshots: they must not stay held."""
    name, data = loaded
    a, b = cluster.hosts[0], cluster.hosts[1]
    _move_until_the_source_dies_at(cluster, name, "transfer.sent")
    assert cluster.volume(name)["owner"] == a.name
    cluster.agent(a.name, "start")
    finish_and_check(cluster, name, data, b)
    dataset = f"{a.pool}/ferry/{name}"
    holds = cluster.run(
        a, ["zfs", "get", "-H", "-r", "-o", "name,value", "userrefs", dataset]
    ).stdout.split("\n")
    snapshots = [line.split("\t") for line in holds if "@" in line]
    assert snapshots and {value for _, value in snapshots} == {"0"}


@pytest.mark.parametrize("failpoint", ["handoff.before_cas", "handoff.after_cas"])
def test_the_source_dying_around_the_ownership_swap_loses_nothing(
    cluster: Cluster, loaded: tuple[str, dict[str, str]], failpoint: str
) -> None:
    name, data = loaded
    a, b = cluster.hosts[0], cluster.hosts[1]
    _move_until_the_source_dies_at(cluster, name, failpoint)
    expected_owner = a.name if failpoint == "handoff.before_cas" else b.name
    assert cluster.volume(name)["owner"] == expected_owner
    assert len(writable_copies(cluster, name)) <= 1
    cluster.agent(a.name, "start")
    finish_and_check(cluster, name, data, b)


def test_a_cut_link_to_the_target_delays_the_move_and_it_completes(
    cluster: Cluster, loaded: tuple[str, dict[str, str]]
) -> None:
    name, data = loaded
    a, b = cluster.hosts[0], cluster.hosts[1]
    # While a container on a mounts the volume the move cannot hand off, so the cut
    # lands in the pre-copy whatever the timing (tests/integration/test_handoff_failure.py
    # covers a cut during the handoff).
    with mount_held(cluster, name, a.name):
        cluster.ferryctl(["volume", "move", name, b.name])
        wait_for("the transfer to start", lambda: sent(cluster, name) > 0, 60)
        cluster.run(b, ["ip", "link", "set", "eth0", "down"])
        try:
            time.sleep(12)
            assert cluster.volume(name)["owner"] == a.name
            assert writable_copies(cluster, name) == [a.name]
        finally:
            cluster.run(b, ["ip", "link", "set", "eth0", "up"])
    finish_and_check(cluster, name, data, b)


def _stub(
    cluster: Cluster, host: ClusterHost, identity: str | None
) -> transfer_pb2_grpc.TransferStub:
    assert cluster.tls_ca and host.agent_address
    certs = cluster.tls_ca.parent
    key = (certs / f"{identity}.key").read_bytes() if identity else None
    cert = (certs / f"{identity}.crt").read_bytes() if identity else None
    credentials = grpc.ssl_channel_credentials(cluster.tls_ca.read_bytes(), key, cert)
    channel = grpc.secure_channel(
        host.agent_address, credentials, options=[("grpc.ssl_target_name_override", host.name)]
    )
    return transfer_pb2_grpc.TransferStub(channel)


def _push(stub: transfer_pb2_grpc.TransferStub, header: transfer_pb2.StreamHeader) -> grpc.RpcError:
    """The receiver's answer to a stream header: an error, never a data ticket."""
    with pytest.raises(grpc.RpcError) as refused:
        next(iter(stub.Receive(header, timeout=20)))
    return refused.value


def _forged_data_connection_is_closed(host: ClusterHost) -> bool:
    """A stream pushed straight at the data port, with a made-up ticket, is dropped unread."""
    assert host.agent_address
    address, port = host.agent_address.rsplit(":", 1)
    with socket.create_connection((address, int(port) + 1), timeout=10) as sock:
        sock.sendall(secrets.token_bytes(32) + b"\0" * 65536)
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True


def test_streams_from_impostors_are_refused_and_change_nothing(
    cluster: Cluster, loaded: tuple[str, dict[str, str]]
) -> None:
    name, _ = loaded
    if cluster.insecure or cluster.tls_ca is None:
        pytest.skip("the cluster runs without TLS")
    a, b = cluster.hosts[0], cluster.hosts[1]
    before = cluster.run(b, ["zfs", "list", "-H", "-r", "-t", "all", "-o", "name", b.pool]).stdout

    def header(sender: str, epoch: int = 1) -> transfer_pb2.StreamHeader:
        return transfer_pb2.StreamHeader(
            volume=name, to_snapshot="ferry-1-99", epoch=epoch, sender=sender
        )

    claims_other = _push(_stub(cluster, b, a.name), header("host9"))
    assert claims_other.code() == grpc.StatusCode.PERMISSION_DENIED
    refused = _push(_stub(cluster, b, a.name), header(a.name, epoch=7))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not the owner" in (refused.details() or "")
    not_owner = _push(_stub(cluster, b, b.name), header(b.name))
    assert not_owner.code() == grpc.StatusCode.FAILED_PRECONDITION
    no_cert = _push(_stub(cluster, b, None), header(a.name))
    assert no_cert.code() == grpc.StatusCode.UNAVAILABLE
    assert _forged_data_connection_is_closed(b)

    after = cluster.run(b, ["zfs", "list", "-H", "-r", "-t", "all", "-o", "name", b.pool]).stdout
    assert after == before
    assert sent(cluster, name) == 0


def test_a_user_certificate_cannot_call_an_agents_peer_rpcs(cluster: Cluster) -> None:
    """Holdings and Receive take node certificates only: ferryctl's user never reaches an agent."""
    if cluster.insecure or cluster.user_cert is None:
        pytest.skip("the cluster runs without TLS")
    a, b = cluster.hosts[0], cluster.hosts[1]
    user = _stub(cluster, b, cluster.user_cert.stem)
    with pytest.raises(grpc.RpcError) as refused:
        user.Holdings(transfer_pb2.HoldingsRequest(volume="az-any"), timeout=20)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "a user certificate" in (refused.value.details() or "")
    assert "takes a node certificate" in (refused.value.details() or "")
    header = transfer_pb2.StreamHeader(
        volume="az-any", to_snapshot="ferry-1-1", epoch=1, sender=cluster.user_cert.stem
    )
    pushed = _push(user, header)
    assert pushed.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not call /ferry.v1.Transfer/Receive" in (pushed.details() or "")
    node = _stub(cluster, b, a.name)
    reply = node.Holdings(transfer_pb2.HoldingsRequest(volume="az-any"), timeout=20)
    assert reply.node == b.name and not reply.snapshots


def test_etcd_restarted_mid_move_loses_nothing_and_the_move_completes(
    cluster: Cluster, loaded: tuple[str, dict[str, str]]
) -> None:
    name, data = loaded
    b = cluster.hosts[1]
    cluster.ferryctl(["volume", "move", name, b.name])
    wait_for("the transfer to start", lambda: sent(cluster, name) > 0, 60)
    cluster.local_process("etcd", "kill")
    time.sleep(3)
    cluster.local_process("etcd", "start")
    finish_and_check(cluster, name, data, b)
    assert cluster.volume(name)["epoch"] == 2


def test_a_handoff_whose_final_send_hangs_thaws_the_source_and_the_move_completes_later(
    cluster: Cluster,
) -> None:
    """The final incremental's ``zfs send`` hangs (the ``hang:`` failpoint; the pre-copy is one
    full send of a small volume): past the handoff deadline the source thaws and takes writes
    again, still the owner, and ``move status`` says what hung; once the hang is gone the move
    completes with every byte."""
    if cluster.kind != "local":
        pytest.skip("fault injection drives local-cluster agents")
    a, b = cluster.hosts[0], cluster.hosts[1]
    name = f"ft-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", name, "--size", "256M", "--node", a.name])
    try:
        wait_for(f"{name} owned by {a.name}", lambda: cluster.volume(name)["owner"] == a.name)
        write_random_on(cluster, a, f"{mountpoint(a, name)}/data", 8)
        hung = {"FERRY_FAILPOINTS": "hang:zfs send -i", "FERRY_ZFS_TIMEOUTS": "stream=300"}
        cluster.agent(a.name, "stop")
        cluster.agent(a.name, "start", hung)
        wait_for("the armed agent", lambda: _port_open(a.agent_address or ""), 30)
        cluster.ferryctl(["volume", "move", name, b.name])
        wait_for(
            "the handoff to freeze the source", lambda: not writable_copies(cluster, name), 120
        )
        frozen_at = time.monotonic()
        wait_for(
            "the source to thaw after the handoff deadline",
            lambda: writable_copies(cluster, name) == [a.name],
            HANDOFF_DEADLINE_SECONDS + 30,
        )
        assert time.monotonic() - frozen_at < HANDOFF_DEADLINE_SECONDS + 30
        assert cluster.volume(name)["owner"] == a.name
        write_random_on(cluster, a, f"{mountpoint(a, name)}/after-the-hung-handoff", 4)
        wait_for(
            "move status to show the hung send of the next attempt",
            lambda: (
                f"stuck on {a.name}: `zfs send -i"
                in cluster.ferryctl(["move", "status", name]).stdout
            ),
            60,
        )
        data = checksums(cluster, a, mountpoint(a, name))
        disarm(cluster, a)
        finish_and_check(cluster, name, data, b)
    finally:
        disarm(cluster, a)
        cluster.ferryctl(["volume", "delete", name, "--force"], check=False)


def disarm(cluster: Cluster, host: ClusterHost) -> None:
    """The host's agent again, started without failpoints."""
    cluster.agent(host.name, "stop")
    cluster.agent(host.name, "start")
    wait_for(f"the agent of {host.name}", lambda: _port_open(host.agent_address or ""), 30)
