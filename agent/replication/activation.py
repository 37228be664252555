"""The target's half of a move: once it owns the volume, its copy becomes the writable one."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from agent import failpoints
from agent.replication.ports import LocalStore, MoveRecords
from ferry.core import phases
from ferry.core.phases import MovePhase, Writer
from ferry.core.records import Move

log = logging.getLogger(__name__)

# Compare-and-swap rounds for marking a move done, each on a fresh read.
FINISH_ATTEMPTS = 10


class Activation:
    """Makes this node's copy of a volume it owns writable, and ends a move into it."""

    def __init__(
        self,
        node: str,
        records: MoveRecords,
        store: LocalStore,
        finished: Callable[[Move], Awaitable[None]] | None = None,
    ) -> None:
        self._node = node
        self._records = records
        self._store = store
        self._finished = finished
        """Told of each move this node marked done (its event)."""

    async def activate(self, volume: str, epoch: int) -> None:
        """Writable (mounted by the next Mount), if this copy holds the handoff's final
        snapshot (a move into this node) or no move says otherwise; then the move is
        marked done."""
        move = await self._records.get_move(volume)
        # A move a failover ended (its source was lost) brings nothing to wait for.
        incoming = (
            move is not None
            and move.value.target == self._node
            and move.value.phase != MovePhase.FAILED
        )
        if incoming and move is not None and move.value.final_snapshot:
            held = [ref.name for ref in await self._store.snapshots(volume) or []]
            if move.value.final_snapshot not in held:
                log.error(
                    "not activating: volume=%s lacks final snapshot %s of the handoff",
                    volume,
                    move.value.final_snapshot,
                )
                return
        spec = await self._records.get_volume(volume)
        if spec is None:
            return
        await self._store.activate(spec.value)
        log.info("volume writable: volume=%s node=%s epoch=%d", volume, self._node, epoch)
        failpoints.reached("activation.writable")
        if incoming:
            await self._finish_move(volume)

    async def _finish_move(self, volume: str) -> None:
        """Mark the move into this node done, on a fresh read each time: the source may still
        be writing its last phase, and a lost compare-and-swap must not leave the move open.

        Only from a phase the table lets the target end (after the swap): a record of an
        older move into this node that was cancelled stays as it ended."""
        for _ in range(FINISH_ATTEMPTS):
            move = await self._records.get_move(volume)
            if (
                move is None
                or move.value.target != self._node
                or phases.writer_of(move.value.phase, MovePhase.DONE) is not Writer.TARGET
            ):
                return
            done = replace(move.value, phase=MovePhase.DONE, error="", updated_at=time.time())
            if await self._records.put_move(done, move.revision):
                if self._finished is not None:
                    await self._finished(done)
                return
        log.warning(
            "move record not marked done after %d attempts: volume=%s", FINISH_ATTEMPTS, volume
        )
