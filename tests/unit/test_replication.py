"""The move protocol on in-memory fakes: every phase transition, every crash between two steps.

The fakes (``tests.support.replication``) pass the same suite as the real store, peer and
records (``tests/integration/test_replication_ports.py``). A crash is the driver cut at a
failpoint as ``kill -9`` cuts it: from that instant no fake takes a call (so no clean-up
runs); then the node restarts (``recover``) and convergence starts a new driver, which
resumes from the record.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from agent import failpoints
from agent.replication.activation import Activation
from agent.replication.record import MoveAbandoned
from agent.replication.source import HandoffTimedOut, MoveDriver
from agent.replication.sync import NoCommonSnapshot, sync_to_peer
from agent.transfer.client import TransferFailed
from ferry.core import phases
from ferry.core.phases import MovePhase, Writer
from ferry.core.plan import Activate, Actual, Desired, DriveMove, LocalVolume, plan
from ferry.core.records import Move, Owner, VolumeSpec
from ferry.core.snapshots import SnapshotRef
from tests.support.replication import FakePeer, FakeRecords, FakeStore

VOLUME = "vol"
A, B = "node-a", "node-b"


class Crash(BaseException):
    """The agent died here (not an Exception: nothing that handles errors sees it)."""


class Cluster:
    """Two nodes' pools, the cluster's records, a peer for each node, and the power switch."""

    def __init__(self) -> None:
        self.records = FakeRecords()
        self.stores = {A: FakeStore(A), B: FakeStore(B)}
        self.peers = {n: FakePeer(n, store, self.records) for n, store in self.stores.items()}
        self.down = False
        self.phases: list[MovePhase] = []
        self.waiting = asyncio.Event()
        self.frozen_streams = 0
        _dies_with(self)

    def driver(self, node: str = A, **options: Any) -> MoveDriver:
        async def connect(peer: str) -> FakePeer:
            return self.peers[peer]

        return MoveDriver(node, self.records, self.stores[node], connect, **options)

    def activation(self, node: str = B) -> Activation:
        return Activation(node, self.records, self.stores[node])

    async def request_move(self, source: str = A, target: str = B) -> None:
        """As control writes a move (phase ``pending``)."""
        current = await self.records.get_move(VOLUME)
        move = Move(volume=VOLUME, source=source, target=target, started_at=time.time())
        phases.check(current.value.phase if current else None, move.phase, Writer.CONTROL)
        assert await self.records.put_move(move, current.revision if current else None)

    async def cancel(self) -> None:
        """As control cancels (``control.operations``), on the record as it is now."""
        current = await self.records.get_move(VOLUME)
        assert current is not None
        phases.check(current.value.phase, MovePhase.FAILED, Writer.CONTROL)
        cancelled = replace(current.value, phase=MovePhase.FAILED, error="cancelled")
        assert await self.records.put_move(cancelled, current.revision)

    async def converge(self, node: str) -> None:
        """One convergence pass of ``node`` for the volume: plan, then the move actions."""
        owner = await self.records.get_owner(VOLUME)
        move = await self.records.get_move(VOLUME)
        spec = await self.records.get_volume(VOLUME)
        assert owner is not None and spec is not None
        store = self.stores[node]
        copy = store.copies.get(VOLUME)
        local = {}
        if copy is not None:
            writable = not copy.readonly and not copy.frozen
            names = tuple(s.name for s in copy.snapshots)
            local[VOLUME] = LocalVolume(VOLUME, names, writable, copy.mounted, "", 0)
        desired = Desired(
            node=node,
            volumes={VOLUME: spec.value},
            owners={VOLUME: owner.value},
            moves={VOLUME: move.value} if move else {},
        )
        for action in plan(desired, Actual(volumes=local)):
            match action:
                case DriveMove():
                    await self.driver(node).run(VOLUME)
                case Activate(_, epoch):
                    await self.activation(node).activate(VOLUME, epoch)

    async def restart(self, node: str) -> None:
        self.down = False
        self.stores[node].recover()

    def phase_path(self) -> list[MovePhase]:
        """The phases the record went through, repeats folded."""
        return [p for i, p in enumerate(self.phases) if i == 0 or self.phases[i - 1] != p]


def _dies_with(cluster: Cluster) -> None:
    """Every call into a fake fails with Crash while the cluster's agent is down; every move
    write is kept in ``phases`` and every stream sent frozen is counted."""
    for fake in (*cluster.stores.values(), *cluster.peers.values(), cluster.records):
        for name in dir(fake):
            method = getattr(fake, name)
            if name.startswith("_") or not callable(method):
                continue
            setattr(fake, name, _mortal(cluster, method))
    put_move = cluster.records.put_move

    async def recorded(move: Move, expected_revision: int | None) -> bool:
        stored = await put_move(move, expected_revision)
        if stored:
            cluster.phases.append(move.phase)
            if move.phase == MovePhase.WAITING_FOR_UNMOUNT:
                cluster.waiting.set()
        return stored

    cluster.records.put_move = recorded  # type: ignore[method-assign]
    send = cluster.peers[B].send

    async def counted(*args: Any) -> Any:
        copy = cluster.stores[A].copies.get(VOLUME)
        cluster.frozen_streams += bool(copy and copy.frozen)
        return await send(*args)

    cluster.peers[B].send = counted  # type: ignore[method-assign,assignment]


def _mortal(cluster: Cluster, method: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if cluster.down:
            raise Crash
        return method(*args, **kwargs)

    return call


@pytest.fixture
async def cluster() -> Cluster:
    made = Cluster()
    await made.records.create_volume(VolumeSpec(name=VOLUME, size_bytes=1 << 30, node=A))
    assert await made.records.claim_owner(VOLUME, A)
    made.stores[A].create(VOLUME)
    assert made.stores[A].write(VOLUME, b"written on a before the move\n")
    return made


@pytest.fixture
def crash_at(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Arm one failpoint: the agent dies when it is reached."""
    armed: list[str] = []

    def reached(name: str) -> None:
        if name in armed:
            armed.clear()
            cluster.down = True
            raise Crash

    monkeypatch.setattr(failpoints, "reached", reached)
    yield armed.append


async def _dies(step: Awaitable[None]) -> None:
    with pytest.raises(Crash):
        await step


async def _owner(cluster: Cluster) -> Owner:
    owner = await cluster.records.get_owner(VOLUME)
    assert owner is not None
    return owner.value


async def _move(cluster: Cluster) -> Move:
    move = await cluster.records.get_move(VOLUME)
    assert move is not None
    return move.value


async def _moved_and_done(cluster: Cluster) -> None:
    """B owns the volume at epoch 2, its copy is writable with A's data, the move is done, and
    A's copy is stopped."""
    assert await _owner(cluster) == Owner(B, 2)
    move = await _move(cluster)
    assert move.phase == MovePhase.DONE
    a, b = cluster.stores[A], cluster.stores[B]
    assert await b.is_writable(VOLUME)
    assert b.data(VOLUME) == a.data(VOLUME)
    assert move.final_snapshot in [ref.name for ref in await b.snapshots(VOLUME) or []]
    assert not await a.is_writable(VOLUME)
    assert cluster.frozen_streams <= 1, "at most the final incremental is sent frozen"


def _path_is_in_the_table(path: list[MovePhase]) -> None:
    for before, after in itertools.pairwise(path):
        assert phases.writer_of(before, after) is not None, (before, after)


# Every transition of the table, driven by the protocol.


async def test_a_move_goes_pending_precopy_handoff_activating_done(cluster: Cluster) -> None:
    await cluster.request_move()
    await cluster.converge(A)
    await cluster.converge(B)
    assert cluster.phase_path() == [
        MovePhase.PENDING,
        MovePhase.PRECOPY,
        MovePhase.HANDOFF,
        MovePhase.ACTIVATING,
        MovePhase.DONE,
    ]
    await _moved_and_done(cluster)
    _path_is_in_the_table(cluster.phases)
    assert cluster.frozen_streams == 1
    assert [bool(h.from_snapshot) for h in cluster.peers[B].streams] == [False, True]


async def test_an_unmounted_volume_moves_and_stays_unmounted_on_its_new_owner(
    cluster: Cluster,
) -> None:
    """Nothing used it (its last Unmount unmounted it): snapshots and streams need no mount,
    the freeze has no writer to stop, and the new owner mounts it only for a user."""
    a, b = cluster.stores[A], cluster.stores[B]
    a.unmount(VOLUME)
    await cluster.request_move()
    await cluster.converge(A)
    await cluster.converge(B)
    await _moved_and_done(cluster)
    assert not b.copies[VOLUME].mounted, "mounted on the target before anything used it"
    assert b.data(VOLUME) == b"written on a before the move\n"
    b.mount(VOLUME)
    assert b.write(VOLUME, b"written on B\n")
    assert not a.write(VOLUME, b"late\n"), "the old owner's copy takes no mount's writes"


async def test_a_target_that_is_down_leaves_the_move_pending_with_why(cluster: Cluster) -> None:
    await cluster.request_move()

    async def down(node: str) -> FakePeer:
        raise TransferFailed(f"node {node} is not registered (down?); the move waits for it")

    driver = MoveDriver(A, cluster.records, cluster.stores[A], down)
    with pytest.raises(TransferFailed):
        await driver.run(VOLUME)
    move = await _move(cluster)
    assert (move.phase, move.attempt) == (MovePhase.PENDING, 1)
    assert "is not registered" in move.error
    assert await cluster.stores[A].is_writable(VOLUME)


async def test_the_last_error_stays_through_a_retry_and_goes_once_a_sync_succeeds(
    cluster: Cluster,
) -> None:
    """The first stream breaks; the retry's first sync still sees that error (``move status``
    says why it retries) and its success takes it away (tests/integration/test_move_cancel.py
    checks the first half on a real pool)."""
    await cluster.request_move()
    target = cluster.peers[B]
    seen: list[str] = []
    holdings = target.holdings

    async def read_the_error(volume: str) -> list[SnapshotRef]:
        seen.append((await _move(cluster)).error)
        return await holdings(volume)

    target.holdings = read_the_error  # type: ignore[method-assign]
    target.streams_fail = True
    with pytest.raises(TransferFailed):
        await cluster.driver().run(VOLUME)
    target.streams_fail = False
    await cluster.converge(A)
    broken = f"{B} (fake): Connection timed out"
    assert seen[:3] == ["", broken, ""], "kept before the sync succeeded, or kept after it"
    move = await _move(cluster)
    assert (move.phase, move.error, move.attempt) == (MovePhase.ACTIVATING, "", 1)


async def test_progress_is_written_in_the_record(cluster: Cluster) -> None:
    await cluster.request_move()
    await cluster.converge(A)
    move = await _move(cluster)
    assert move.bytes_sent == move.bytes_total == len(b"written on a before the move\n")


# The move's bytes: the streams that arrived, each once (docs/operations.md, "Bytes of a move").

FULL = len(b"written on a before the move\n")


def _first_stream_fails(cluster: Cluster, fail: Callable[..., Awaitable[Any]]) -> None:
    """The first stream to B goes through ``fail(send, header, stream, on_progress)``, the
    rest as usual."""
    send = cluster.peers[B].send
    calls = 0

    async def first_fails(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return await (fail(send, *args) if calls == 1 else send(*args))

    cluster.peers[B].send = first_fails  # type: ignore[method-assign,assignment]


async def _retried_to_the_end(cluster: Cluster) -> Move:
    with pytest.raises(TransferFailed):
        await cluster.driver().run(VOLUME)
    await cluster.converge(A)
    await cluster.converge(B)
    await _moved_and_done(cluster)
    return await _move(cluster)


async def test_a_stream_cut_near_its_end_is_taken_out_once_the_target_lacks_it(
    cluster: Cluster,
) -> None:
    """All but the last byte of the stream was sent, then the connection broke: the target
    kept nothing and the retry sends it all again. (A guess from the share sent counted it
    as arrived: the move showed nearly twice the volume.)"""

    async def cut(send: Any, header: Any, stream: Any, on_progress: Any) -> Any:
        on_progress(FULL - 1)
        raise TransferFailed(f"{B} (fake): Connection reset by peer")

    await cluster.request_move()
    _first_stream_fails(cluster, cut)
    move = await _retried_to_the_end(cluster)
    assert (move.bytes_sent, move.pending_snapshot, move.pending_bytes) == (FULL, "", 0)
    assert len([h for h in cluster.peers[B].streams if not h.from_snapshot]) == 1


async def test_a_stream_that_arrived_before_its_reply_was_lost_is_counted_once(
    cluster: Cluster,
) -> None:
    """The target took the whole stream and the reply was lost (it died just after): the
    retry finds the snapshot there, sends only an incremental, and the stream still counts."""

    async def lost_reply(send: Any, *args: Any) -> Any:
        await send(*args)
        raise TransferFailed(f"{B} (fake): Socket closed")

    await cluster.request_move()
    _first_stream_fails(cluster, lost_reply)
    move = await _retried_to_the_end(cluster)
    assert (move.bytes_sent, move.pending_snapshot) == (FULL, "")
    assert len([h for h in cluster.peers[B].streams if not h.from_snapshot]) == 1


async def test_a_source_killed_mid_stream_leaves_it_pending_and_its_restart_takes_it_out(
    cluster: Cluster,
) -> None:
    """No failure handler runs in a killed agent: the record still counts the half stream,
    as pending, and the restarted source's first sync finds the target without it. (It was
    counted on top of the resent stream.)"""
    half = FULL // 2

    async def killed(send: Any, header: Any, stream: Any, on_progress: Any) -> Any:
        on_progress(half)
        for _ in range(100):
            if (await _move(cluster)).pending_bytes == half:
                break
            await asyncio.sleep(0)
        cluster.down = True
        raise Crash

    await cluster.request_move()
    _first_stream_fails(cluster, killed)
    await _dies(cluster.driver().run(VOLUME))
    await cluster.restart(A)
    cut = await _move(cluster)
    assert (cut.bytes_sent, cut.pending_bytes) == (half, half) and cut.pending_snapshot
    await cluster.converge(A)
    await cluster.converge(B)
    await _moved_and_done(cluster)
    move = await _move(cluster)
    assert (move.bytes_sent, move.pending_snapshot) == (FULL, "")


async def test_a_volume_in_use_waits_and_hands_off_once_released(cluster: Cluster) -> None:
    cluster.stores[A].users[VOLUME] = ["container web"]
    await cluster.request_move()
    driving = asyncio.create_task(cluster.driver().run(VOLUME))
    await cluster.waiting.wait()
    assert not driving.done()
    cluster.stores[A].users[VOLUME] = []
    await driving
    await cluster.converge(B)
    assert cluster.phase_path()[:4] == [
        MovePhase.PENDING,
        MovePhase.PRECOPY,
        MovePhase.WAITING_FOR_UNMOUNT,
        MovePhase.HANDOFF,
    ]
    _path_is_in_the_table(cluster.phases)
    await _moved_and_done(cluster)


async def test_a_retry_from_waiting_pre_copies_again(cluster: Cluster) -> None:
    await cluster.request_move()
    cluster.peers[B].streams_fail = True
    cluster.stores[A].users[VOLUME] = ["container web"]
    with pytest.raises(TransferFailed):
        await cluster.driver().run(VOLUME)
    current = await cluster.records.get_move(VOLUME)
    assert current is not None
    waiting = replace(current.value, phase=MovePhase.WAITING_FOR_UNMOUNT)
    assert await cluster.records.put_move(waiting, current.revision)
    cluster.peers[B].streams_fail = False
    cluster.stores[A].users[VOLUME] = []
    await cluster.converge(A)
    assert cluster.phase_path()[-4:] == [
        MovePhase.WAITING_FOR_UNMOUNT,
        MovePhase.PRECOPY,
        MovePhase.HANDOFF,
        MovePhase.ACTIVATING,
    ]


async def test_a_mount_seen_at_the_handoff_goes_back_to_waiting(cluster: Cluster) -> None:
    await cluster.request_move()
    driver = cluster.driver()
    # In use only once pre-copy is over: the first check of the handoff sees it.
    checks = 0
    in_use = cluster.stores[A].in_use

    async def late_user(volume: str) -> list[str]:
        nonlocal checks
        checks += 1
        return ["container web"] if checks == 2 else await in_use(volume)

    cluster.stores[A].in_use = late_user  # type: ignore[method-assign]
    with pytest.raises(MoveAbandoned, match="was mounted again"):
        await driver.run(VOLUME)
    assert cluster.phase_path()[-2:] == [MovePhase.HANDOFF, MovePhase.WAITING_FOR_UNMOUNT]
    assert await cluster.stores[A].is_writable(VOLUME)
    assert await _owner(cluster) == Owner(A, 1)


async def test_a_file_open_for_writing_at_the_freeze_goes_back_to_waiting(
    cluster: Cluster,
) -> None:
    await cluster.request_move()
    store = cluster.stores[A]
    store.copies[VOLUME].open_for_writing = 1  # the kernel refuses the freeze; no user listed
    with pytest.raises(MoveAbandoned, match="waiting for it to close"):
        await cluster.driver().run(VOLUME)
    assert cluster.phase_path()[-2:] == [MovePhase.HANDOFF, MovePhase.WAITING_FOR_UNMOUNT]
    assert "open for writing" in (await _move(cluster)).error
    assert await store.is_writable(VOLUME)


async def test_a_handoff_past_its_deadline_thaws_and_pre_copies_again(cluster: Cluster) -> None:
    await cluster.request_move()
    store = cluster.stores[A]
    freeze = store.freeze

    async def hangs(volume: str) -> None:
        await freeze(volume)
        await asyncio.sleep(3600)  # the freeze's flush hangs

    store.freeze = hangs  # type: ignore[method-assign]
    with pytest.raises(HandoffTimedOut):
        await cluster.driver(handoff_deadline=0.2).run(VOLUME)
    assert cluster.phase_path()[-2:] == [MovePhase.HANDOFF, MovePhase.PRECOPY]
    assert await store.is_writable(VOLUME)
    assert "did not reach the ownership swap" in (await _move(cluster)).error


async def test_a_target_that_diverged_is_not_sent_a_full_stream_while_frozen(
    cluster: Cluster,
) -> None:
    """The handoff's final sync finds no common snapshot (the target kept its copy aside
    after pre-copy): it thaws, says why, and pre-copies the full stream while writable."""
    await cluster.request_move()
    driver = cluster.driver()
    target = cluster.stores[B]
    peer = cluster.peers[B]
    holdings = peer.holdings
    asked = 0

    async def diverged_after_pre_copy(volume: str) -> list[Any]:
        nonlocal asked
        asked += 1
        if asked == 2:  # the handoff's question, pre-copy done
            await target.keep_aside(volume, 1, "written to by a stray container")
        return await holdings(volume)

    peer.holdings = diverged_after_pre_copy  # type: ignore[method-assign]
    with pytest.raises(NoCommonSnapshot):
        await driver.run(VOLUME)
    assert cluster.frozen_streams == 0, "no stream went out frozen"
    assert await cluster.stores[A].is_writable(VOLUME)
    assert cluster.phase_path()[-2:] == [MovePhase.HANDOFF, MovePhase.PRECOPY]
    assert "holds no snapshot of vol in common" in (await _move(cluster)).error
    await cluster.converge(A)
    await cluster.converge(B)
    await _moved_and_done(cluster)
    streams = cluster.peers[B].streams
    assert [bool(h.from_snapshot) for h in streams] == [False, False, True]


@pytest.mark.parametrize(
    "phase",
    [MovePhase.PENDING, MovePhase.PRECOPY, MovePhase.WAITING_FOR_UNMOUNT, MovePhase.HANDOFF],
)
async def test_a_cancelled_move_is_not_resumed(cluster: Cluster, phase: MovePhase) -> None:
    await cluster.request_move()
    current = await cluster.records.get_move(VOLUME)
    assert current is not None
    if phase != MovePhase.PENDING:
        assert await cluster.records.put_move(replace(current.value, phase=phase), current.revision)
    await cluster.cancel()
    await cluster.converge(A)  # a cancelled move plans no driver
    await cluster.driver().run(VOLUME)  # and a driver that retries does nothing
    assert (await _move(cluster)).phase == MovePhase.FAILED
    assert cluster.peers[B].streams == []
    assert await _owner(cluster) == Owner(A, 1)


async def test_a_cancel_during_the_handoff_wins_over_the_swap(cluster: Cluster) -> None:
    await cluster.request_move()
    transfer_owner = cluster.records.transfer_owner

    async def cancel_first(*args: Any, **kwargs: Any) -> bool:
        await cluster.cancel()
        return await transfer_owner(*args, **kwargs)

    cluster.records.transfer_owner = cancel_first  # type: ignore[method-assign]
    with pytest.raises(MoveAbandoned, match="changed during the handoff"):
        await cluster.driver().run(VOLUME)
    assert await _owner(cluster) == Owner(A, 1)
    assert (await _move(cluster)).phase == MovePhase.FAILED
    await cluster.converge(B)
    assert not await cluster.stores[B].is_writable(VOLUME)
    await cluster.converge(A)  # the copy whose swap was tried comes back writable
    assert await cluster.stores[A].is_writable(VOLUME)


async def test_an_error_after_the_swap_is_written_in_activating(cluster: Cluster) -> None:
    await cluster.request_move()

    async def unmount_fails(volume: str) -> None:
        raise OSError("umount: target is busy")

    cluster.stores[A].stop_writes = unmount_fails  # type: ignore[method-assign]
    with pytest.raises(OSError, match="busy"):
        await cluster.driver().run(VOLUME)
    move = await _move(cluster)
    assert (move.phase, move.error) == (MovePhase.ACTIVATING, "umount: target is busy")
    await cluster.converge(B)
    assert (await _move(cluster)).phase == MovePhase.DONE


async def test_activation_waits_for_the_final_snapshot(cluster: Cluster) -> None:
    await cluster.request_move()
    await cluster.converge(A)
    target = cluster.stores[B]
    target.copies[VOLUME].snapshots.pop()  # the final incremental never arrived
    await cluster.converge(B)
    assert not await target.is_writable(VOLUME)
    assert (await _move(cluster)).phase == MovePhase.ACTIVATING


async def test_a_new_move_replaces_an_ended_one_only(cluster: Cluster) -> None:
    await cluster.request_move()
    with pytest.raises(phases.IllegalTransition):
        await cluster.request_move()
    await cluster.converge(A)
    await cluster.converge(B)
    await cluster.request_move(B, A)
    assert (await _move(cluster)).phase == MovePhase.PENDING


async def test_the_record_writer_refuses_a_step_the_table_does_not_allow(
    cluster: Cluster,
) -> None:
    """A target whose move was cancelled does not end it as done; the source never writes
    a phase only the target or control writes."""
    await cluster.request_move()
    await cluster.cancel()
    cluster.stores[B].plant(VOLUME, [])
    cluster.stores[B].copies[VOLUME].mounted = True
    await cluster.activation().activate(VOLUME, 2)
    assert (await _move(cluster)).phase == MovePhase.FAILED
    with pytest.raises(phases.IllegalTransition):
        phases.check(MovePhase.HANDOFF, MovePhase.DONE, Writer.SOURCE)


# Dies between two steps: the driver is cut at a failpoint, the node restarts, convergence
# resumes from the record.


async def test_dies_after_a_pre_copy_stream_before_the_record_says_so(
    cluster: Cluster, crash_at: Callable[[str], None]
) -> None:
    await cluster.request_move()
    crash_at("transfer.sent")
    await _dies(cluster.converge(A))
    await cluster.restart(A)
    assert (await _move(cluster)).phase == MovePhase.PRECOPY
    await cluster.converge(A)
    await cluster.converge(B)
    await _moved_and_done(cluster)
    full = [h for h in cluster.peers[B].streams if not h.from_snapshot]
    assert len(full) == 1, "the resumed driver continues from what the target holds"


async def test_dies_frozen_before_the_final_snapshot(
    cluster: Cluster, crash_at: Callable[[str], None]
) -> None:
    await cluster.request_move()
    crash_at("handoff.frozen")
    await _dies(cluster.converge(A))
    assert cluster.stores[A].copies[VOLUME].frozen
    await cluster.restart(A)
    assert not await cluster.stores[A].is_writable(VOLUME), "restart stops a frozen copy"
    assert await _owner(cluster) == Owner(A, 1)
    await cluster.converge(A)
    await cluster.converge(B)
    await _moved_and_done(cluster)


async def test_dies_after_the_final_snapshot_is_recorded_before_the_swap(
    cluster: Cluster, crash_at: Callable[[str], None]
) -> None:
    await cluster.request_move()
    crash_at("handoff.before_cas")
    await _dies(cluster.converge(A))
    await cluster.restart(A)
    first_final = (await _move(cluster)).final_snapshot
    assert first_final
    assert await _owner(cluster) == Owner(A, 1)
    await cluster.converge(B)  # the target does not own it: it activates nothing
    assert not await cluster.stores[B].is_writable(VOLUME)
    await cluster.converge(A)
    await cluster.converge(B)
    await _moved_and_done(cluster)
    assert (await _move(cluster)).final_snapshot != first_final


async def test_dies_after_the_swap_before_activating_is_written(
    cluster: Cluster, crash_at: Callable[[str], None]
) -> None:
    await cluster.request_move()
    crash_at("handoff.after_cas")
    await _dies(cluster.converge(A))
    await cluster.restart(A)
    assert await _owner(cluster) == Owner(B, 2)
    assert (await _move(cluster)).phase == MovePhase.HANDOFF
    await cluster.converge(A)  # no longer the owner: nothing to drive
    await cluster.converge(B)
    assert cluster.phase_path()[-2:] == [MovePhase.HANDOFF, MovePhase.DONE]
    await _moved_and_done(cluster)


async def test_the_target_dies_after_its_copy_is_writable_before_done(
    cluster: Cluster, crash_at: Callable[[str], None]
) -> None:
    await cluster.request_move()
    await cluster.converge(A)
    crash_at("activation.writable")
    await _dies(cluster.converge(B))
    await cluster.restart(B)
    assert await cluster.stores[B].is_writable(VOLUME), "its mount outlives the agent"
    assert (await _move(cluster)).phase == MovePhase.ACTIVATING
    await cluster.converge(B)
    await _moved_and_done(cluster)


# Keep one peer current: the step standing replicas reuse.


async def test_sync_to_peer_sends_full_then_incremental_and_keeps_what_is_asked(
    cluster: Cluster,
) -> None:
    a = cluster.stores[A]
    peer = cluster.peers[B]
    first = await sync_to_peer(a, peer, VOLUME, epoch=1, sender=A)
    assert (first.base, first.bytes_sent) == (None, len(a.data(VOLUME)))
    assert a.write(VOLUME, b"more\n")
    second = await sync_to_peer(a, peer, VOLUME, epoch=1, sender=A)
    assert (second.base, second.bytes_sent) == (first.snapshot.name, len(b"more\n"))
    assert second.snapshot in await peer.holdings(VOLUME)
    for _ in range(3):
        await sync_to_peer(a, peer, VOLUME, epoch=1, sender=A, keep=[first.snapshot.name])
    names = [ref.name for ref in await a.snapshots(VOLUME) or []]
    assert first.snapshot.name in names, "a base another peer needs is not pruned"
    await sync_to_peer(a, peer, VOLUME, epoch=1, sender=A)
    names = [ref.name for ref in await a.snapshots(VOLUME) or []]
    assert len(names) == 2 and first.snapshot.name not in names, "the rest is pruned"


async def test_sync_to_peer_without_a_common_snapshot_takes_nothing_when_full_is_refused(
    cluster: Cluster,
) -> None:
    a = cluster.stores[A]
    with pytest.raises(NoCommonSnapshot):
        await sync_to_peer(a, cluster.peers[B], VOLUME, epoch=1, sender=A, full_allowed=False)
    assert await a.snapshots(VOLUME) == []
    assert cluster.peers[B].streams == []
