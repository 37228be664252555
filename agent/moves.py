"""The move protocol, run by the node that owns the volume (the source).

Read top to bottom; each phase says what it waits for and what it writes.

1. ``pending`` -> ``precopy``: the control service created ``moves/<name>``
   and changed the desired node. The source snapshots and sends to the
   target (full the first time, then incrementals from the newest snapshot
   both hold with the same GUID) while the volume stays writable here.
2. ``waiting_for_unmount``: the volume is in use on this node (a container's
   mount, any mount of it in any mount namespace, a process with a file on
   it: ``agent.usage``). The source keeps sending incrementals every few
   seconds so the last delta stays small, and waits until nothing uses it.
3. ``handoff``: nothing uses the volume here and the target answers. The
   source closes the handoff gate (a new Mount here is refused), freezes the
   filesystem (every writer in every namespace stops; refused while a file
   is open for writing), checks again that nothing uses it, takes the final
   snapshot, sends the final incremental, writes the final snapshot's name
   into the move record, then moves ownership in one etcd compare-and-swap
   from ``{source, e}`` to ``{target, e+1}``, and unmounts its copy. If the
   handoff fails before the swap was tried, or does not reach it within
   HANDOFF_DEADLINE_SECONDS (a hung command), the source still owns the
   volume for certain and thaws it (back to ``precopy`` after the deadline);
   once tried, the copy stays stopped, since the swap may have happened.
4. ``activating``: the target sees that it owns the volume, checks that it
   holds the final snapshot, makes its copy writable and mounts it, and
   writes ``done`` (see ``agent.executor``). The source keeps a read-only
   copy.

If this process dies between any two steps, the convergence loop starts
the driver again and it resumes from the phase in etcd: before the CAS the
source still owns the volume and simply repeats the step (a repeated send
finds the target already holding the snapshot and sends only what is new);
after the CAS it no longer owns the volume and the driver has nothing to do.
A transfer cut in half leaves the target's copy as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from agent import failpoints, metrics
from agent.store import VolumeStore
from agent.transfer.client import PeerClient, TransferFailed
from agent.usage import DockerMounts
from agent.zfs.volumes import FilesystemBusy
from ferry.cluster.events import EventLog
from ferry.cluster.keyspace import Keyspace, Versioned
from ferry.core.records import ACTIVE_PHASES, EventKind, Move, MovePhase, Owner
from ferry.core.snapshots import SnapshotRef, newest_common, prunable, unsent
from protos.ferry.v1 import transfer_pb2

log = logging.getLogger(__name__)

SMALL_DELTA_BYTES = 64 << 20
RESYNC_SECONDS = 3.0
UNMOUNT_POLL_SECONDS = 0.2
PROGRESS_SECONDS = 0.5
# From the freeze to the ownership swap: past this, the source thaws (see docs/decisions.md).
HANDOFF_DEADLINE_SECONDS = 30.0

PeerLookup = Callable[[str], Awaitable[PeerClient]]


class HandoffTimedOut(TransferFailed):
    """The handoff did not reach the ownership swap in time; the source thawed its copy."""


class MoveAbandoned(Exception):
    """The move record changed under the driver (cancelled, retargeted, or ownership lost)."""


class MoveDriver:
    """Drives one volume's move away from this node, phase by phase."""

    def __init__(
        self,
        node: str,
        keyspace: Keyspace,
        store: VolumeStore,
        connect: PeerLookup,
        mounts: DockerMounts,
        small_delta: int = SMALL_DELTA_BYTES,
        handoff_deadline: float = HANDOFF_DEADLINE_SECONDS,
    ) -> None:
        self._node = node
        self._keyspace = keyspace
        self._store = store
        self._connect = connect
        self._mounts = mounts
        self._small_delta = small_delta
        self._handoff_deadline = handoff_deadline
        self._events = EventLog(keyspace, node)

    async def run(self, volume: str) -> None:
        """One attempt to finish the move; raises on failure, the caller retries with back-off."""
        move = await self._keyspace.get_move(volume)
        owner = await self._keyspace.get_owner(volume)
        if move is None or owner is None or owner.value.node != self._node:
            return
        if move.value.phase not in ACTIVE_PHASES:
            # Cancelled (or ended) while this driver waited to retry: a retry must not
            # write the record back to precopy and hand the volume off after all.
            log.info("move ended, not resumed: volume=%s phase=%s", volume, move.value.phase)
            return
        epoch = owner.value.epoch
        tracker = _MoveRecord(self._keyspace, move)
        try:
            peer = await self._connect(tracker.move.target)
            if tracker.move.phase != MovePhase.HANDOFF:
                await self._precopy(volume, epoch, peer, tracker)
            await self._handoff(volume, epoch, peer, tracker)
        except MoveAbandoned:
            raise
        except Exception as error:
            metrics.MOVE_FAILURES.labels(metrics.failure_reason(error)).inc()
            await self._events.record(
                volume,
                EventKind.MOVE_ERROR,
                f"attempt {tracker.move.attempt + 1} to {tracker.move.target} failed, retried: "
                f"{error}",
            )
            # Kept in the record until a sync succeeds: 'move status' shows why it retries.
            await tracker.update(error=str(error), attempt=tracker.move.attempt + 1)
            raise

    async def _precopy(
        self, volume: str, epoch: int, peer: PeerClient, tracker: _MoveRecord
    ) -> None:
        await tracker.update(phase=MovePhase.PRECOPY, attempt_bytes_sent=tracker.attempt_sent)
        while True:
            sent = await self._sync(volume, epoch, peer, tracker)
            users = await self._in_use(volume)
            if not users:
                if sent <= self._small_delta:
                    return
                continue
            if tracker.move.phase != MovePhase.WAITING_FOR_UNMOUNT:
                log.info(
                    "waiting for unmount: volume=%s node=%s in_use=%s",
                    volume,
                    self._node,
                    "; ".join(users),
                )
                await tracker.update(phase=MovePhase.WAITING_FOR_UNMOUNT)
            if await self._until_unmounted(volume, RESYNC_SECONDS):
                # Whatever was written since the last sync goes in the final one, writes stopped.
                return

    async def _handoff(
        self, volume: str, epoch: int, peer: PeerClient, tracker: _MoveRecord
    ) -> None:
        await tracker.update(phase=MovePhase.HANDOFF, attempt_bytes_sent=tracker.attempt_sent)
        await self._refuse_if_in_use(volume, tracker, "was mounted again")
        # Asked before the freeze: an unreachable target must not stop writes here.
        remote = await peer.holdings(volume)
        await tracker.check()
        paused = time.monotonic()
        self._mounts.begin_handoff(volume)
        swap_tried = swapped = False
        try:
            try:
                final = await self._before_swap(volume, epoch, peer, tracker, remote)
                failpoints.reached("handoff.before_cas")
                swap_tried = True
                swapped = await self._keyspace.transfer_owner(
                    volume,
                    Owner(node=self._node, epoch=epoch),
                    tracker.move.target,
                    move_revision=tracker.revision,
                )
                stopped_for = time.monotonic() - paused
                if swapped:
                    metrics.MOVE_HANDOFF_PAUSE.observe(stopped_for)
                    metrics.MOVE_HANDOFFS.inc()
                    failpoints.reached("handoff.after_cas")
                    await tracker.update(phase=MovePhase.ACTIVATING)
            finally:
                # Frozen is a state of a running handoff only: it ends thawed if this node
                # still owns the volume for certain, else unmounted and read-only (the new
                # owner does not wait for this).
                if swap_tried:
                    await self._store.stop_writes(volume)
                else:
                    await self._store.thaw(volume)
        finally:
            self._mounts.end_handoff(volume)
        if not swapped:
            raise MoveAbandoned(f"ownership of {volume} changed during the handoff")
        await self._events.record(
            volume,
            EventKind.HANDED_OFF,
            f"{self._node} -> {tracker.move.target} at epoch {epoch + 1}, final snapshot {final}",
            pause_seconds=stopped_for,
        )
        log.info(
            "handed off: volume=%s from=%s to=%s epoch=%d final=%s writes_stopped_for=%.2fs",
            volume,
            self._node,
            tracker.move.target,
            epoch + 1,
            final,
            stopped_for,
        )

    async def _before_swap(
        self,
        volume: str,
        epoch: int,
        peer: PeerClient,
        tracker: _MoveRecord,
        remote: list[SnapshotRef],
    ) -> str:
        """Freeze, check, final sync and its record, within the handoff deadline; returns the
        final snapshot. Past the deadline HandoffTimedOut (the caller thaws)."""
        # What still runs when the deadline strikes, read before the cancellation ends it.
        running: list[str] = []
        noted = asyncio.get_running_loop().call_later(
            self._handoff_deadline, lambda: running.extend(self._store.commands_running(volume))
        )
        try:
            async with asyncio.timeout(self._handoff_deadline):
                await self._freeze(volume, tracker)
                # A mount made between the first check and the freeze (it was refused writes).
                await self._refuse_if_in_use(volume, tracker, "was in use at the freeze")
                await self._sync(volume, epoch, peer, tracker, remote)
                final = (await self._store.snapshots(volume) or [])[-1].name
                await tracker.update(final_snapshot=final)
                return final
        except TimeoutError:
            raise await self._handoff_late(volume, tracker, running) from None
        finally:
            noted.cancel()

    async def _handoff_late(
        self, volume: str, tracker: _MoveRecord, running: list[str]
    ) -> HandoffTimedOut:
        """The error of a handoff past its deadline before the swap; the next attempt pre-copies
        again first, so a delta too big for the deadline shrinks while the volume is writable."""
        stuck = "; ".join(running) or "no ZFS command"
        late = HandoffTimedOut(
            f"handoff of {volume} did not reach the ownership swap within "
            f"{self._handoff_deadline:.0f} s (still running: {stuck}); writes resumed on "
            f"{self._node} and the move retries; if a command is stuck, check the pool on "
            f"{self._node} ('zpool status') and its ZFS daemon"
        )
        log.error("handoff timed out, thawed: volume=%s error=%s", volume, late)
        await tracker.update(phase=MovePhase.PRECOPY)
        return late

    async def _sync(
        self,
        volume: str,
        epoch: int,
        peer: PeerClient,
        tracker: _MoveRecord,
        remote: list[SnapshotRef] | None = None,
    ) -> int:
        """Snapshot now and bring the peer up to that snapshot; returns the bytes sent.

        ``remote`` is what the peer holds, if the caller has just asked it.
        """
        await tracker.check()
        snapshot = await self._store.take_snapshot(volume, epoch)
        local = await self._store.snapshots(volume) or []
        if remote is None:
            remote = await peer.holdings(volume)
        base = newest_common(local, remote)
        await self._store.destroy_snapshots(volume, unsent(local, remote, epoch, snapshot.name))
        estimated = await self._store.send_space(volume, snapshot.name, base)
        header = transfer_pb2.StreamHeader(
            volume=volume,
            from_snapshot=base or "",
            to_snapshot=snapshot.name,
            to_guid=snapshot.guid,
            epoch=epoch,
            sender=self._node,
            estimated_bytes=estimated,
        )
        progress = _Progress(tracker, estimated)
        async with self._store.held(volume, [name for name in (base, snapshot.name) if name]):
            stream = self._store.send_stream(volume, snapshot.name, base)
            try:
                held = await peer.send(header, stream, progress.report)
            except Exception:
                await progress.cut()
                raise
            failpoints.reached("transfer.sent")
        await progress.finish()
        if not any(ref == snapshot for ref in held):
            raise TransferFailed(f"{peer.node} does not report {volume}@{snapshot.name} after send")
        await self._store.destroy_snapshots(
            volume, prunable([ref.name for ref in local], keep=[snapshot.name, base or ""])
        )
        if tracker.move.error:
            await tracker.update(error="")
        return progress.sent

    async def _freeze(self, volume: str, tracker: _MoveRecord) -> None:
        try:
            await self._store.freeze(volume)
        except FilesystemBusy as busy:
            await tracker.update(phase=MovePhase.WAITING_FOR_UNMOUNT, error=str(busy))
            raise MoveAbandoned(f"{busy}; waiting for it to close") from busy

    async def _refuse_if_in_use(self, volume: str, tracker: _MoveRecord, what: str) -> None:
        """Back to waiting, if anything on this host uses the volume now."""
        users = await self._in_use(volume)
        if users:
            await tracker.update(phase=MovePhase.WAITING_FOR_UNMOUNT)
            raise MoveAbandoned(
                f"{volume} {what} on {self._node} ({'; '.join(users)}); waiting for unmount"
            )

    async def _until_unmounted(self, volume: str, at_most: float) -> bool:
        """True once nothing here uses the volume; False if still in use after ``at_most``."""
        for _ in range(round(at_most / UNMOUNT_POLL_SECONDS)):
            if not await self._in_use(volume):
                return True
            await asyncio.sleep(UNMOUNT_POLL_SECONDS)
        return False

    async def _in_use(self, volume: str) -> list[str]:
        """What uses the volume on this host, from the kernel and Docker's mount IDs."""
        users = await self._store.users([volume])
        return self._mounts.in_use(volume, users[volume])


class _MoveRecord:
    """The move record as this driver last wrote it; every write is a compare-and-swap."""

    def __init__(self, keyspace: Keyspace, current: Versioned[Move]) -> None:
        self._keyspace = keyspace
        self._current = current
        self.attempt_sent = 0
        """Bytes of this attempt's finished or cut streams (one driver run is one attempt)."""

    @property
    def move(self) -> Move:
        return self._current.value

    @property
    def revision(self) -> int:
        return self._current.revision

    async def check(self) -> None:
        """MoveAbandoned unless the move in etcd is still this one and under way.

        Asked before each step that costs (a sync, the freeze); the swap itself
        compares the record's revision, so a cancel between this and the swap wins too.
        """
        fresh = await self._keyspace.get_move(self.move.volume)
        if fresh is None or (fresh.value.target, fresh.value.started_at) != (
            self.move.target,
            self.move.started_at,
        ):
            raise MoveAbandoned(f"the move of {self.move.volume} was cancelled or retargeted")
        if fresh.value.phase not in ACTIVE_PHASES:
            raise MoveAbandoned(
                f"the move of {self.move.volume} ended ({fresh.value.phase.value}): "
                f"{fresh.value.error or 'no error'}"
            )
        self._current = fresh

    async def update(self, **changes: object) -> None:
        new = replace(self.move, updated_at=time.time(), **changes)  # type: ignore[arg-type]
        if await self._keyspace.put_move(new, self._current.revision):
            fresh = await self._keyspace.get_move(new.volume)
            if fresh is not None:
                self._current = fresh
            return
        fresh = await self._keyspace.get_move(new.volume)
        if fresh is None or (fresh.value.target, fresh.value.started_at) != (
            self.move.target,
            self.move.started_at,
        ):
            raise MoveAbandoned(f"the move of {new.volume} was cancelled or retargeted")
        if fresh.value.phase == MovePhase.FAILED:
            raise MoveAbandoned(f"the move of {new.volume} ended: {fresh.value.error}")
        self._current = fresh
        if fresh.value.phase == MovePhase.DONE:
            return  # the target finished the move; nothing the source says is newer
        await self.update(**changes)


class _Progress:
    """One stream's bytes, written to the move record at most every PROGRESS_SECONDS: added to
    the move's bytes while it runs, taken out again if it is cut (the retry resends them), and
    counted in the attempt's bytes either way."""

    def __init__(self, tracker: _MoveRecord, total: int) -> None:
        self._tracker = tracker
        self._before = tracker.move.bytes_sent
        self._total = total
        self._started = time.monotonic()
        self._written_at = 0.0
        self._pending: asyncio.Task[None] | None = None
        self.sent = 0

    def report(self, sent: int) -> None:
        metrics.MOVE_SENT.inc(max(sent - self.sent, 0))
        self.sent = sent
        now = time.monotonic()
        if now - self._written_at >= PROGRESS_SECONDS and (
            self._pending is None or self._pending.done()
        ):
            self._written_at = now
            self._pending = asyncio.create_task(self._write())

    async def finish(self) -> None:
        if self._pending is not None:
            await self._pending
        await self._write()
        self._tracker.attempt_sent += self.sent

    async def cut(self) -> None:
        """The stream failed: the target kept none of it."""
        self._tracker.attempt_sent += self.sent
        with contextlib.suppress(Exception):
            if self._pending is not None:
                await self._pending
            await self._tracker.update(
                bytes_sent=self._before, attempt_bytes_sent=self._tracker.attempt_sent
            )

    async def _write(self) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        await self._tracker.update(
            bytes_sent=self._before + self.sent,
            bytes_total=self._before + max(self._total, self.sent),
            rate_bps=self.sent / elapsed,
            attempt_bytes_sent=self._tracker.attempt_sent + self.sent,
        )
