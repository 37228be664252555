"""The move record as one party last wrote it: every write a compare-and-swap, every change
of phase checked against ``ferry.core.phases`` first."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace

from agent import metrics
from agent.replication.ports import MoveRecords
from ferry.cluster.keyspace import Versioned
from ferry.core import phases
from ferry.core.phases import ACTIVE_PHASES, MovePhase, Writer
from ferry.core.records import Move

PROGRESS_SECONDS = 0.5
# A stream that failed after this share of its estimated size was sent is taken as arrived.
COMPLETE_SHARE = 0.95


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

    def _same_move(self, other: Move) -> bool:
        return (other.target, other.started_at) == (self.move.target, self.move.started_at)


class Progress:
    """One stream's bytes, written to the move record at most every PROGRESS_SECONDS: added to
    the move's bytes while it runs, taken out again if it is cut (the retry resends them), and
    counted in the attempt's bytes either way."""

    def __init__(self, record: MoveRecord) -> None:
        self._record = record
        self._before = record.move.bytes_sent
        self._total = 0
        self._started = time.monotonic()
        self._written_at = 0.0
        self._pending: asyncio.Task[None] | None = None
        self.sent = 0

    def report(self, sent: int, estimated: int) -> None:
        metrics.MOVE_SENT.inc(max(sent - self.sent, 0))
        self.sent, self._total = sent, estimated
        now = time.monotonic()
        if now - self._written_at >= PROGRESS_SECONDS and (
            self._pending is None or self._pending.done()
        ):
            self._written_at = now
            self._pending = asyncio.create_task(self._write())

    async def finish(self, sent: int, estimated: int) -> None:
        """Write the totals of a finished stream (after any write still under way)."""
        if self._pending is not None:
            await self._pending
        metrics.MOVE_SENT.inc(max(sent - self.sent, 0))
        self.sent, self._total = sent, estimated
        await self._write()
        self._record.attempt_sent += self.sent

    async def cut(self) -> None:
        """The sync failed. Cut short of its estimated size, the stream left the target's copy
        as it was: its bytes are taken out of the move's. Failed once (nearly) all was sent,
        the target may hold it (the failure came after: a lost reply, a check), and they stay.
        """
        self._record.attempt_sent += self.sent
        arrived = self.sent if self.sent >= COMPLETE_SHARE * self._total else 0
        with contextlib.suppress(Exception):
            if self._pending is not None:
                await self._pending
            await self._record.update(
                bytes_sent=self._before + arrived, attempt_bytes_sent=self._record.attempt_sent
            )

    async def _write(self) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        await self._record.update(
            bytes_sent=self._before + self.sent,
            bytes_total=self._before + max(self._total, self.sent),
            rate_bps=self.sent / elapsed,
            attempt_bytes_sent=self._record.attempt_sent + self.sent,
        )
