"""The source's half of a move: pre-copy while the volume stays writable, then the handoff."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from agent import failpoints, metrics
from agent.replication.ports import LocalStore, MoveRecords, Peer
from agent.replication.record import MoveAbandoned, MoveRecord, Progress
from agent.replication.sync import NoCommonSnapshot, sync_to_peer
from agent.transfer.client import TransferFailed
from agent.zfs.volumes import FilesystemBusy
from ferry.cluster.events import EventLog
from ferry.core.phases import ACTIVE_PHASES, MovePhase
from ferry.core.records import EventKind, Owner
from ferry.core.snapshots import SnapshotRef

log = logging.getLogger(__name__)

SMALL_DELTA_BYTES = 64 << 20
RESYNC_SECONDS = 3.0
UNMOUNT_POLL_SECONDS = 0.2
# From the freeze to the ownership swap: past this, the source thaws (see docs/decisions.md).
HANDOFF_DEADLINE_SECONDS = 30.0

PeerLookup = Callable[[str], Awaitable[Peer]]


class HandoffTimedOut(TransferFailed):
    """The handoff did not reach the ownership swap in time; the source thawed its copy."""


class MoveDriver:
    """Drives one volume's move away from this node, phase by phase."""

    def __init__(
        self,
        node: str,
        records: MoveRecords,
        store: LocalStore,
        connect: PeerLookup,
        small_delta: int = SMALL_DELTA_BYTES,
        handoff_deadline: float = HANDOFF_DEADLINE_SECONDS,
        events: EventLog | None = None,
    ) -> None:
        self._node = node
        self._records = records
        self._store = store
        self._connect = connect
        self._small_delta = small_delta
        self._handoff_deadline = handoff_deadline
        self._events = events

    async def run(self, volume: str) -> None:
        """One attempt to finish the move; raises on failure, the caller retries with back-off."""
        move = await self._records.get_move(volume)
        owner = await self._records.get_owner(volume)
        if move is None or owner is None or owner.value.node != self._node:
            return
        if move.value.phase not in ACTIVE_PHASES:
            # Cancelled (or ended) while this driver waited to retry: a retry must not
            # write the record back to precopy and hand the volume off after all.
            log.info("move ended, not resumed: volume=%s phase=%s", volume, move.value.phase)
            return
        epoch = owner.value.epoch
        record = MoveRecord(self._records, move)
        try:
            peer = await self._connect(record.move.target)
            if record.move.phase != MovePhase.HANDOFF:
                await self._precopy(volume, epoch, peer, record)
            await self._handoff(volume, epoch, peer, record)
        except MoveAbandoned:
            raise
        except Exception as error:
            metrics.MOVE_FAILURES.labels(metrics.failure_reason(error)).inc()
            if self._events is not None:
                await self._events.record(
                    volume,
                    EventKind.MOVE_ERROR,
                    f"attempt {record.move.attempt + 1} to {record.move.target} failed, "
                    f"retried: {error}",
                )
            # Kept in the record until a sync succeeds: 'move status' shows why it retries.
            await record.update(error=str(error), attempt=record.move.attempt + 1)
            raise

    async def _precopy(self, volume: str, epoch: int, peer: Peer, record: MoveRecord) -> None:
        await record.update(phase=MovePhase.PRECOPY, attempt_bytes_sent=record.attempt_sent)
        while True:
            sent = await self._sync(volume, epoch, peer, record)
            users = await self._store.in_use(volume)
            if not users:
                if sent <= self._small_delta:
                    return
                continue
            if record.move.phase != MovePhase.WAITING_FOR_UNMOUNT:
                log.info(
                    "waiting for unmount: volume=%s node=%s in_use=%s",
                    volume,
                    self._node,
                    "; ".join(users),
                )
                await record.update(phase=MovePhase.WAITING_FOR_UNMOUNT)
            if await self._until_unmounted(volume, RESYNC_SECONDS):
                # Whatever was written since the last sync goes in the final one, writes stopped.
                return

    async def _handoff(self, volume: str, epoch: int, peer: Peer, record: MoveRecord) -> None:
        await record.update(phase=MovePhase.HANDOFF, attempt_bytes_sent=record.attempt_sent)
        await self._refuse_if_in_use(volume, record, "was mounted again")
        # Asked before the freeze: an unreachable target must not stop writes here.
        remote = await peer.holdings(volume)
        await record.check()
        paused = time.monotonic()
        swap_tried = swapped = False
        with self._store.closed_to_mounts(volume):
            try:
                final = await self._before_swap(volume, epoch, peer, record, remote)
                failpoints.reached("handoff.before_cas")
                swap_tried = True
                swapped = await self._records.transfer_owner(
                    volume,
                    Owner(node=self._node, epoch=epoch),
                    record.move.target,
                    move_revision=record.revision,
                )
                stopped_for = time.monotonic() - paused
                if swapped:
                    metrics.MOVE_HANDOFF_PAUSE.observe(stopped_for)
                    metrics.MOVE_HANDOFFS.inc()
                    failpoints.reached("handoff.after_cas")
                    await record.update(phase=MovePhase.ACTIVATING)
            finally:
                # Frozen is a state of a running handoff only: it ends thawed if this node
                # still owns the volume for certain, else unmounted and read-only (the new
                # owner does not wait for this).
                if swap_tried:
                    await self._store.stop_writes(volume)
                else:
                    await self._store.thaw(volume)
        if not swapped:
            raise MoveAbandoned(f"ownership of {volume} changed during the handoff")
        if self._events is not None:
            await self._events.record(
                volume,
                EventKind.HANDED_OFF,
                f"{self._node} -> {record.move.target} at epoch {epoch + 1}, final snapshot "
                f"{final}",
                pause_seconds=stopped_for,
            )
        log.info(
            "handed off: volume=%s from=%s to=%s epoch=%d final=%s writes_stopped_for=%.2fs",
            volume,
            self._node,
            record.move.target,
            epoch + 1,
            final,
            stopped_for,
        )

    async def _before_swap(
        self,
        volume: str,
        epoch: int,
        peer: Peer,
        record: MoveRecord,
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
                await self._freeze(volume, record)
                failpoints.reached("handoff.frozen")
                # A mount made between the first check and the freeze (it was refused writes).
                await self._refuse_if_in_use(volume, record, "was in use at the freeze")
                await self._final_sync(volume, epoch, peer, record, remote)
                final = (await self._store.snapshots(volume) or [])[-1].name
                await record.update(final_snapshot=final)
                return final
        except TimeoutError:
            raise await self._handoff_late(volume, record, running) from None
        finally:
            noted.cancel()

    async def _final_sync(
        self,
        volume: str,
        epoch: int,
        peer: Peer,
        record: MoveRecord,
        remote: list[SnapshotRef],
    ) -> None:
        """The last incremental, writes stopped. A target with no snapshot in common (its copy
        diverged and was kept aside) needs a full stream: that is pre-copied again while the
        volume is writable, never sent frozen."""
        try:
            await self._sync(volume, epoch, peer, record, remote, full_allowed=False)
        except NoCommonSnapshot as missing:
            log.warning(
                "handoff aborted, thawed: volume=%s target=%s reason=%s; pre-copying a full "
                "stream while writable",
                volume,
                peer.node,
                missing,
            )
            await record.update(phase=MovePhase.PRECOPY)
            raise

    async def _handoff_late(
        self, volume: str, record: MoveRecord, running: list[str]
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
        await record.update(phase=MovePhase.PRECOPY)
        return late

    async def _sync(
        self,
        volume: str,
        epoch: int,
        peer: Peer,
        record: MoveRecord,
        remote: list[SnapshotRef] | None = None,
        full_allowed: bool = True,
    ) -> int:
        """Bring the peer up to a snapshot taken now, the record following; returns the bytes.
        What the peer holds settles the record's pending stream first (``MoveRecord.settle``)."""
        await record.check()
        if remote is None:
            remote = await peer.holdings(volume)
        await record.settle(remote)
        progress = Progress(record)
        try:
            sent = await sync_to_peer(
                self._store,
                peer,
                volume,
                epoch=epoch,
                sender=self._node,
                remote=remote,
                full_allowed=full_allowed,
                on_progress=progress.report,
            )
        except Exception:
            await progress.cut()
            raise
        await progress.finish(sent.bytes_sent, sent.estimated)
        if record.move.error:
            await record.update(error="")
        return sent.bytes_sent

    async def _freeze(self, volume: str, record: MoveRecord) -> None:
        try:
            await self._store.freeze(volume)
        except FilesystemBusy as busy:
            await record.update(phase=MovePhase.WAITING_FOR_UNMOUNT, error=str(busy))
            raise MoveAbandoned(f"{busy}; waiting for it to close") from busy

    async def _refuse_if_in_use(self, volume: str, record: MoveRecord, what: str) -> None:
        """Back to waiting, if anything on this host uses the volume now."""
        users = await self._store.in_use(volume)
        if users:
            await record.update(phase=MovePhase.WAITING_FOR_UNMOUNT)
            raise MoveAbandoned(
                f"{volume} {what} on {self._node} ({'; '.join(users)}); waiting for unmount"
            )

    async def _until_unmounted(self, volume: str, at_most: float) -> bool:
        """True once nothing here uses the volume; False if still in use after ``at_most``."""
        for _ in range(round(at_most / UNMOUNT_POLL_SECONDS)):
            if not await self._store.in_use(volume):
                return True
            await asyncio.sleep(UNMOUNT_POLL_SECONDS)
        return False
