"""Applies the actions of ``ferry.core.plan`` to this node's pool and to etcd."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from agent import zfs
from agent.moves import MoveAbandoned, MoveDriver
from agent.retry import Backoff
from agent.store import VolumeStore
from ferry.cluster.events import EventLog
from ferry.cluster.keyspace import Keyspace
from ferry.core.plan import (
    Action,
    Activate,
    Claim,
    Create,
    Destroy,
    DriveMove,
    Fence,
    Missing,
    Purge,
    SetAside,
)
from ferry.core.records import EventKind, MovePhase

log = logging.getLogger(__name__)

# Compare-and-swap rounds for marking a move done, each on a fresh read.
FINISH_ATTEMPTS = 10
# ZFS refusing a create for reasons a retry does not change (too small, no room, bad value).
CREATE_FAILED_FOR_GOOD = (zfs.NoSpace, zfs.QuotaExceeded, zfs.PropertyInvalid, zfs.NameInvalid)


class Executor:
    """Carries out planned actions; move drivers run as background tasks."""

    def __init__(
        self,
        node: str,
        keyspace: Keyspace,
        store: VolumeStore,
        driver: MoveDriver,
        wake: Callable[[], None],
    ) -> None:
        self._node = node
        self._keyspace = keyspace
        self._store = store
        self._driver = driver
        self._wake = wake
        self._moves: dict[str, asyncio.Task[None]] = {}
        self._events = EventLog(keyspace, node)

    @property
    def running_moves(self) -> frozenset[str]:
        return frozenset(name for name, task in self._moves.items() if not task.done())

    async def apply(self, action: Action) -> None:
        log.info("applying: action=%s volume=%s", type(action).__name__, action.volume)
        match action:
            case Create(volume, size_bytes, compression, uid):
                try:
                    await self._store.create(volume, size_bytes, compression, uid)
                except CREATE_FAILED_FOR_GOOD as error:
                    await self._create_failed(volume, error)
                    return
                if await self._keyspace.claim_owner(volume, self._node):
                    log.info("volume created and owned: volume=%s node=%s", volume, self._node)
            case Claim(volume):
                await self._keyspace.claim_owner(volume, self._node)
            case Fence(volume):
                await self._store.fence(volume)
                await self._events.record(
                    volume,
                    EventKind.FENCED,
                    f"{self._node} no longer owns it: writes stopped, its last writes kept in "
                    "a fenced- snapshot",
                )
            case Activate(volume, epoch):
                await self._activate(volume, epoch)
            case DriveMove(volume):
                self._moves[volume] = asyncio.create_task(self._drive(volume))
            case Destroy(volume):
                await self._store.destroy(volume)
                await self._keyspace.delete_state(self._node, volume)
            case Purge(volume):
                if not await self._keyspace.list_state(volume):
                    await self._keyspace.purge_volume(volume)
            case SetAside(volume):
                owner = await self._keyspace.get_owner(volume)
                aside = await self._store.keep_aside(
                    volume,
                    owner.value.epoch if owner else 0,
                    "belongs to a deleted volume of the same name (another uid)",
                )
                await self._events.record(
                    volume,
                    EventKind.DIVERGED_KEPT,
                    f"kept aside as {aside} on {self._node}: belongs to a deleted volume of "
                    "the same name",
                )
                log.warning(
                    "copy belongs to a deleted volume of the same name, kept aside: "
                    "volume=%s aside=%s",
                    volume,
                    aside,
                )
            case Missing(volume):
                log.error(
                    "this node owns volume=%s but holds no copy of it; restore the dataset "
                    "or move the volume to a node that has it",
                    volume,
                )

    async def _create_failed(self, volume: str, error: Exception) -> None:
        """Write why the create failed into the spec, so this node stops retrying it and
        ``volume get`` and Docker say so; only on the spec as read (a new size wins)."""
        spec = await self._keyspace.get_volume(volume)
        if spec is None or spec.value.deleted:
            return
        why = f"{type(error).__name__}: {error}"
        failed = replace(spec.value, create_error=why)
        if await self._keyspace.update_volume(failed, spec.revision):
            log.error(
                "create failed: volume=%s node=%s size=%d error=%s; not retried: give it a "
                "size the node can create (ferryctl volume update --size) or delete it",
                volume,
                self._node,
                spec.value.size_bytes,
                why,
            )

    async def _activate(self, volume: str, epoch: int) -> None:
        move = await self._keyspace.get_move(volume)
        incoming = move is not None and move.value.target == self._node
        if incoming and move is not None and move.value.final_snapshot:
            held = [ref.name for ref in await self._store.snapshots(volume) or []]
            if move.value.final_snapshot not in held:
                log.error(
                    "not activating: volume=%s lacks final snapshot %s of the handoff",
                    volume,
                    move.value.final_snapshot,
                )
                return
        spec = await self._keyspace.get_volume(volume)
        if spec is None:
            return
        await self._store.activate(spec.value)
        log.info("volume writable: volume=%s node=%s epoch=%d", volume, self._node, epoch)
        if incoming:
            await self._finish_move(volume)

    async def _finish_move(self, volume: str) -> None:
        """Mark the move into this node done, on a fresh read each time: the source may still
        be writing its last phase, and a lost compare-and-swap must not leave the move open."""
        for _ in range(FINISH_ATTEMPTS):
            move = await self._keyspace.get_move(volume)
            if (
                move is None
                or move.value.target != self._node
                or move.value.phase == MovePhase.DONE
            ):
                return
            done = replace(move.value, phase=MovePhase.DONE, error="", updated_at=time.time())
            if await self._keyspace.put_move(done, move.revision):
                await self._events.record(
                    volume,
                    EventKind.MOVED,
                    f"{done.source} -> {self._node}: writable here after {done.attempt + 1} "
                    f"attempt(s)",
                )
                return
        log.warning(
            "move record not marked done after %d attempts: volume=%s", FINISH_ATTEMPTS, volume
        )

    async def _drive(self, volume: str) -> None:
        backoff = Backoff()
        while True:
            try:
                await self._driver.run(volume)
                break
            except MoveAbandoned as why:
                log.info("move paused: volume=%s reason=%s", volume, why)
                break
            except Exception as error:
                delay = backoff.next()
                log.warning(
                    "move attempt failed: volume=%s error=%s retry_in=%.1fs", volume, error, delay
                )
                await asyncio.sleep(delay)
        self._wake()

    async def close(self) -> None:
        for task in self._moves.values():
            task.cancel()
        await asyncio.gather(*self._moves.values(), return_exceptions=True)
