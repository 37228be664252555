"""The move record as one party last wrote it: every write a compare-and-swap, every change
of phase checked against ``ferry.core.phases`` first."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from dataclasses import replace

from agent import metrics
from agent.replication.ports import MoveRecords
from ferry.cluster.keyspace import Versioned
from ferry.core import phases
from ferry.core.phases import ACTIVE_PHASES, MovePhase, Writer
from ferry.core.records import Move
from ferry.core.snapshots import SnapshotRef

PROGRESS_SECONDS = 0.5


class MoveAbandoned(Exception):
    """The move record changed under the driver (cancelled, retargeted, or ownership lost)."""


class MoveRecord:
    """The source's view of its move record."""

    def __init__(self, records: MoveRecords, current: Versioned[Move]) -> None:
        self._records = records
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
        fresh = await self._records.get_move(self.move.volume)
        if fresh is None or not self._same_move(fresh.value):
            raise MoveAbandoned(f"the move of {self.move.volume} was cancelled or retargeted")
        if fresh.value.phase not in ACTIVE_PHASES:
            raise MoveAbandoned(
                f"the move of {self.move.volume} ended ({fresh.value.phase.value}): "
                f"{fresh.value.error or 'no error'}"
            )
        self._current = fresh

    async def update(self, **changes: object) -> None:
        """Write ``changes`` on the record as it is now, retrying on a fresh read when another
        party wrote meanwhile; MoveAbandoned when that write ended or replaced the move."""
        while True:
            new = replace(self.move, updated_at=time.time(), **changes)  # type: ignore[arg-type]
            phases.check(self.move.phase, new.phase, Writer.SOURCE)
            if await self._records.put_move(new, self._current.revision):
                fresh = await self._records.get_move(new.volume)
                if fresh is not None:
                    self._current = fresh
                return
            fresh = await self._records.get_move(new.volume)
            if fresh is None or not self._same_move(fresh.value):
                raise MoveAbandoned(f"the move of {new.volume} was cancelled or retargeted")
            if fresh.value.phase == MovePhase.FAILED:
                raise MoveAbandoned(f"the move of {new.volume} ended: {fresh.value.error}")
            self._current = fresh
            if fresh.value.phase == MovePhase.DONE:
                return  # the target finished the move; nothing the source says is newer

    async def settle(self, held: Iterable[SnapshotRef]) -> None:
        """Whether the pending stream arrived, from what the target holds now (``held``): its
        bytes stay in the move's if the target holds its snapshot, and are taken out if not."""
        move = self.move
        if not move.pending_snapshot:
            return
        arrived = move.pending_snapshot in {ref.name for ref in held}
        await self.update(
            bytes_sent=move.bytes_sent - (0 if arrived else move.pending_bytes),
            pending_snapshot="",
            pending_bytes=0,
        )

    def _same_move(self, other: Move) -> bool:
        return (other.target, other.started_at) == (self.move.target, self.move.started_at)


class Progress:
    """One stream's bytes, written to the move record at most every PROGRESS_SECONDS: in the
    move's bytes as its pending stream (``Move.pending_snapshot``) while it runs, no longer
    pending once it ended well, still pending if it failed (``MoveRecord.settle`` asks the
    target at the next sync), and counted in the attempt's bytes either way.

    Created after ``settle``: the move's bytes then hold no pending stream."""

    def __init__(self, record: MoveRecord) -> None:
        self._record = record
        self._before = record.move.bytes_sent
        self._snapshot = ""
        self._total = 0
        self._started = time.monotonic()
        self._written_at = 0.0
        self._pending: asyncio.Task[None] | None = None
        self.sent = 0

    def report(self, snapshot: str, sent: int, estimated: int) -> None:
        metrics.MOVE_SENT.inc(max(sent - self.sent, 0))
        self._snapshot, self.sent, self._total = snapshot, sent, estimated
        now = time.monotonic()
        if now - self._written_at >= PROGRESS_SECONDS and (
            self._pending is None or self._pending.done()
        ):
            self._written_at = now
            self._pending = asyncio.create_task(self._write(self._snapshot))

    async def finish(self, sent: int, estimated: int) -> None:
        """Write the totals of a finished stream (after any write still under way)."""
        if self._pending is not None:
            await self._pending
        metrics.MOVE_SENT.inc(max(sent - self.sent, 0))
        self.sent, self._total = sent, estimated
        await self._write(pending="")
        self._record.attempt_sent += self.sent

    async def cut(self) -> None:
        """The sync failed. Whether its stream arrived is not known here (a reply lost after
        the stream, a target killed just after it arrived whole): it stays pending with its
        final count, for the next sync to settle."""
        with contextlib.suppress(Exception):
            if self._pending is not None:
                await self._pending
            await self._write(self._snapshot)
        self._record.attempt_sent += self.sent

    async def _write(self, pending: str) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        await self._record.update(
            bytes_sent=self._before + self.sent,
            bytes_total=self._before + max(self._total, self.sent),
            rate_bps=self.sent / elapsed,
            attempt_bytes_sent=self._record.attempt_sent + self.sent,
            pending_snapshot=pending,
            pending_bytes=self.sent if pending else 0,
        )
