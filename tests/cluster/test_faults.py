"""Faults during a move: every one ends with exactly one writable copy and the data intact.

Agents are killed with SIGKILL mid-transfer and around the ownership
compare-and-swap (through agent.failpoints, which exit like kill -9 at an
exact line), the target's link is cut, and streams from impostors are sent
straight to an agent's Transfer service.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import grpc
import pytest

from agent.replication.source import HANDOFF_DEADLINE_SECONDS
from protos.ferry.v1 import transfer_pb2, transfer_pb2_grpc
from tests.support.cluster import Cluster, ClusterHost
from tests.support.volumes import (
    MIB,
    checksums,
    finish_and_check,
    mountpoint,
    move_error,
    move_phase,
    sent,
    used_on,
    wait_for,
    writable_copies,
    write_random_on,
)
from tests.support.writer import acknowledged, lines_in, start_writer

pytestmark = pytest.mark.cluster

LOADED = 384 * MIB
"""What the ``loaded`` volume holds."""
CUT_AFTER = 16 * MIB
"""How far the first send of it gets before the cut-link test cuts the link."""


@pytest.fixture
def loaded(cluster: Cluster) -> Iterator[tuple[str, dict[str, str]]]:
    """A volume on the first host with LOADED bytes of data, and its checksums."""
    if cluster.kind != "local":
        pytest.skip("fault injection drives local-cluster agents")
    a = cluster.hosts[0]
    name = f"ft-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", name, "--size", "1G", "--node", a.name])
    wait_for(f"{name} owned by {a.name}", lambda: cluster.volume(name)["owner"] == a.name)
    write_random_on(cluster, a, f"{mountpoint(a, name)}/data", LOADED // MIB)
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


@contextmanager
def slowed(cluster: Cluster, host: ClusterHost, rate: str) -> Iterator[None]:
    """What ``host`` sends limited to ``rate`` (a token bucket on its link), for a while."""
    limit = ["tbf", "rate", rate, "burst", "256kb", "latency", "400ms"]
    cluster.run(host, ["tc", "qdisc", "add", "dev", "eth0", "root", *limit])
    try:
        yield
    finally:
        cluster.run(host, ["tc", "qdisc", "del", "dev", "eth0", "root"])


class LogWriter:
    """``tests.support.writer`` appending fsynced lines to ``log`` in the volume on ``host``,
    from entering to ``stop`` (at the latest the exit). It reopens the file for each line, so
    nothing holds the volume between two writes and a move may hand off under it (its writes
    are refused then)."""

    def __init__(self, cluster: Cluster, host: ClusterHost, name: str) -> None:
        self._cluster = cluster
        self._host = host
        self._name = name
        self._process: subprocess.Popen[str] | None = None
        self._used = ExitStack()

    def __enter__(self) -> LogWriter:
        where = self._used.enter_context(used_on(self._cluster, self._host, self._name))
        self._process = start_writer(f"{where}/log", hold=False, prefix=self._host.run_prefix)
        wait_for("the writer to start", lambda: lines_on(self._cluster, self._host, self._name))
        return self

    def __exit__(self, *_: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._used.close()

    def stop(self) -> set[int]:
        """Stop it; the numbers of the lines it was told were written."""
        assert self._process is not None
        self._process.kill()
        said, _ = self._process.communicate()
        acked = acknowledged(said)
        assert len(acked) > 20, f"the writer wrote during the move: {said[-400:]}"
        return acked


def lines_on(cluster: Cluster, host: ClusterHost, name: str) -> set[int]:
    """The lines a LogWriter's file holds in the copy of the volume on ``host``, its owner
    (used while read)."""
    with used_on(cluster, host, name) as where:
        out = cluster.run(host, ["cat", f"{where}/log"], check=False).stdout
    return lines_in(out)


def finish_with_every_line(
    cluster: Cluster, name: str, data: dict[str, str], target: ClusterHost, writer: LogWriter
) -> None:
    """``finish_and_check`` for a volume a LogWriter writes to: the data written before the
    move, and every line the writer was told was written, are on the target."""
    wait_for("the move to finish", lambda: cluster.volume(name)["owner"] == target.name, 180)
    wait_for("the target to serve it", lambda: writable_copies(cluster, name) == [target.name], 60)
    time.sleep(1)  # the writer's writes on the source are refused now
    acked = writer.stop()
    lost = sorted(acked - lines_on(cluster, target, name))
    assert not lost, f"acknowledged lines lost on {target.name}: {lost}"
    there = checksums(cluster, target, mountpoint(target, name))
    assert {file: there.get(file) for file in data} == data


@pytest.mark.parametrize("victim", [0, 1], ids=["source", "target"])
def test_an_agent_killed_mid_transfer_leaves_the_source_owner_and_the_move_completes(
    cluster: Cluster, loaded: tuple[str, dict[str, str]], victim: int
) -> None:
    """Killed in the middle of the first, full send (the source's link is slowed to 10 MB/s
    until then, so the send is surely still running)."""
    name, data = loaded
    a, b = cluster.hosts[0], cluster.hosts[1]
    with slowed(cluster, a, "80mbit"):
        cluster.ferryctl(["volume", "move", name, b.name])
        wait_for("the full send to be under way", lambda: sent(cluster, name) >= CUT_AFTER, 60)
        cluster.agent(cluster.hosts[victim].name, "kill")
    info = cluster.volume(name)
    assert (info["owner"], info["epoch"]) == (a.name, 1)
    move = info["move"]
    assert move["phase"] == "precopy" and move["bytes_sent"] < LOADED, f"not in flight: {move}"
    assert writable_copies(cluster, name) == [a.name]
    time.sleep(2)
    cluster.agent(cluster.hosts[victim].name, "start")
    finish_and_check(cluster, name, data, b)
    # The killed stream (left pending in the record when the source died) is not counted on
    # top of the one sent again in full.
    assert LOADED <= cluster.volume(name)["move"]["bytes_sent"] < LOADED + CUT_AFTER


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
    cluster.agent(b.name, "start")
    finish_and_check(cluster, name, data, b)
    move = cluster.volume(name)["move"]
    # One full stream and small incrementals: the cut one never on top, and a stream that
    # arrived whole just before the kill still counted.
    assert LOADED <= move["bytes_sent"] < LOADED + CUT_AFTER, move
    assert move["attempt_bytes_sent"] <= move["bytes_sent"], move


def test_a_stream_the_dying_target_took_without_replying_is_counted_once(
    cluster: Cluster, loaded: tuple[str, dict[str, str]]
) -> None:
    """The target receives the whole first stream and dies before its reply (a failpoint):
    the source sees a failed send while the target's copy holds the stream. The retry finds
    it there and sends only an incremental, and the move counts the full stream once (its
    last progress count, up to half a second old, made it look cut short and it was taken
    out: the move ended with a fraction of the volume)."""
    name, data = loaded
    b = cluster.hosts[1]
    cluster.agent(b.name, "stop")
    cluster.agent(b.name, "start", {"FERRY_FAILPOINTS": "transfer.received"})
    wait_for("the armed target", lambda: _port_open(b.agent_address or ""), 30)
    cluster.ferryctl(["volume", "move", name, b.name])
    wait_for(
        "the target to die before its reply", lambda: not _port_open(b.agent_address or ""), 120
    )
    wait_for(
        "the source to see the failed send",
        lambda: int(cluster.volume(name)["move"].get("attempt", 0)) >= 1,
        60,
    )
    cluster.agent(b.name, "start")
    finish_and_check(cluster, name, data, b)
    move = cluster.volume(name)["move"]
    assert LOADED <= move["bytes_sent"] < LOADED + CUT_AFTER, move
    assert move["attempt_bytes_sent"] < CUT_AFTER, f"the retry sent the stream again: {move}"


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
    """A writer appends and fsyncs a line every 50 ms on the source through the whole move (it
    reopens its file for each line, so nothing holds the volume and the move may hand off
    under it). Dead before the swap, the source still owns the volume and its copy stays
    frozen: no copy is writable until it comes back. Dead after it, the target owns the
    volume and serves it alone, without the source. Either way the move ends with exactly
    one writable copy, on the target, holding every line the writer was told was written."""
    name, data = loaded
    a, b = cluster.hosts[0], cluster.hosts[1]
    with LogWriter(cluster, a, name) as writer:
        _move_until_the_source_dies_at(cluster, name, failpoint)
        if failpoint == "handoff.before_cas":
            assert cluster.volume(name)["owner"] == a.name
            time.sleep(3)  # the target's agent, live, must not make its copy writable
            assert writable_copies(cluster, name) == []
        else:
            assert cluster.volume(name)["owner"] == b.name
            wait_for(
                f"{b.name} to serve the volume with the source down",
                lambda: writable_copies(cluster, name) == [b.name],
                60,
            )
        cluster.agent(a.name, "start")
        finish_with_every_line(cluster, name, data, b, writer)


def test_a_cut_link_to_the_target_delays_the_move_and_it_completes(
    cluster: Cluster, loaded: tuple[str, dict[str, str]]
) -> None:
    """The target's link goes down in the middle of the first, full send (the source's link
    is slowed to 10 MB/s until then, so the send is surely still running): the send fails and
    the move record says why, no byte more arrives and the source stays the one writable
    owner while the link is down. Once it is back the move sends the stream again from the
    start (no resumable receive on zfs-fuse) and completes, every byte on the target and no
    half-received copy left there (tests/integration/test_handoff_failure.py covers a cut
    during the handoff)."""
    name, data = loaded
    a, b = cluster.hosts[0], cluster.hosts[1]
    with slowed(cluster, a, "80mbit"):
        cluster.ferryctl(["volume", "move", name, b.name])
        wait_for("the full send to be under way", lambda: sent(cluster, name) >= CUT_AFTER, 60)
        cluster.run(b, ["ip", "link", "set", "eth0", "down"])
    try:
        cut = cluster.volume(name)["move"]
        assert cut["phase"] == "precopy" and cut["bytes_sent"] < LOADED, f"not in flight: {cut}"
        wait_for("the cut to fail the send", lambda: b.name in move_error(cluster, name), 60)
        time.sleep(1)
        failed = cluster.volume(name)["move"]
        time.sleep(5)  # retries meanwhile find no way to the target either
        during = cluster.volume(name)
        assert during["owner"] == a.name and during["move"]["phase"] == "precopy"
        assert during["move"]["bytes_sent"] == failed["bytes_sent"] < LOADED
        assert during["move"]["attempt"] >= 1
        assert writable_copies(cluster, name) == [a.name]
    finally:
        cluster.run(b, ["ip", "link", "set", "eth0", "up"])
    finish_and_check(cluster, name, data, b)
    done = cluster.volume(name)["move"]
    assert (done["phase"], done["error"]) == ("done", "")
    # The cut attempt's bytes are taken back out: the count is what arrived, sent again in full.
    assert LOADED <= done["bytes_sent"] < LOADED + CUT_AFTER, done
    dataset = f"{b.pool}/ferry/{name}"
    held = cluster.run(b, ["zfs", "list", "-H", "-r", "-t", "all", "-o", "name", b.pool]).stdout
    copies = [line for line in held.split() if name in line]
    assert all(c == dataset or c.startswith(f"{dataset}@ferry-") for c in copies), copies


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
    """A writer on the source writes through the move and etcd's restart; every line it was
    told was written is on the target."""
    name, data = loaded
    a, b = cluster.hosts[0], cluster.hosts[1]
    with LogWriter(cluster, a, name) as writer:
        cluster.ferryctl(["volume", "move", name, b.name])
        wait_for("the transfer to start", lambda: sent(cluster, name) > 0, 60)
        cluster.process("etcd", "kill")
        time.sleep(3)
        cluster.process("etcd", "start")
        wait_for(
            "control to read etcd again",
            lambda: cluster.ferryctl(["volume", "get", name], check=False).returncode == 0,
            60,
        )
        finish_with_every_line(cluster, name, data, b, writer)
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
        # Unused, the copy is not mounted: the freeze has no writer to stop, so the handoff
        # shows in the move's phase, not in the copy's mount.
        wait_for("the handoff to start", lambda: move_phase(cluster, name) == "handoff", 120)
        frozen_at = time.monotonic()
        wait_for(
            "the source to take writes again after the handoff deadline",
            lambda: (
                move_phase(cluster, name) != "handoff"
                and writable_copies(cluster, name) == [a.name]
            ),
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
