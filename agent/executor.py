"""Applies the actions of ``ferry.core.plan`` to this node's pool and to etcd."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from agent import zfs
from agent.replicas import Replicator
from agent.replication.activation import Activation
from agent.replication.ports import Peer
from agent.replication.record import MoveAbandoned
from agent.replication.source import MoveDriver
from agent.retry import Backoff
from agent.store import VolumeStore
from agent.usage import DockerMounts, unmount_unused
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
    Rejoin,
    Replicate,
    SetAside,
    UnmountUnused,
)
from ferry.core.snapshots import FENCED_PREFIX, newest_common

log = logging.getLogger(__name__)

# ZFS refusing a create for reasons a retry does not change (too small, no room, bad value).
CREATE_FAILED_FOR_GOOD = (zfs.NoSpace, zfs.QuotaExceeded, zfs.PropertyInvalid, zfs.NameInvalid)


CreateFailureReport = Callable[[Create, str], Awaitable[None]]
"""(the create, why): tell ferry-control that ZFS refused it for good."""


class Executor:
    """Carries out planned actions; move drivers run as background tasks."""

    def __init__(
        self,
        node: str,
        keyspace: Keyspace,
        store: VolumeStore,
        driver: MoveDriver,
        activation: Activation,
        wake: Callable[[], None],
        replicator: Replicator,
        report_create_failure: CreateFailureReport,
        connect: Callable[[str], Awaitable[Peer]],
        mounts: DockerMounts,
    ) -> None:
        self._node = node
        self._mounts = mounts
        self._connect = connect
        self._keyspace = keyspace
        self._store = store
        self._driver = driver
        self._activation = activation
        self._wake = wake
        self._replicator = replicator
        self._report_create_failure = report_create_failure
        self._moves: dict[str, asyncio.Task[None]] = {}
        self._replications: dict[str, asyncio.Task[None]] = {}

    @property
    def running_moves(self) -> frozenset[str]:
        return frozenset(name for name, task in self._moves.items() if not task.done())

    @property
    def replicating(self) -> frozenset[str]:
        return frozenset(name for name, task in self._replications.items() if not task.done())

    async def apply(self, action: Action) -> None:
        log.info("applying: action=%s volume=%s", type(action).__name__, action.volume)
        match action:
            case Create(volume, size_bytes, compression, uid):
                try:
                    await self._store.create(volume, size_bytes, compression, uid)
                except CREATE_FAILED_FOR_GOOD as error:
                    await self._create_failed(action, error)
                    return
                if await self._keyspace.claim_owner(volume, self._node):
                    log.info("volume created and owned: volume=%s node=%s", volume, self._node)
            case Claim(volume):
                await self._keyspace.claim_owner(volume, self._node)
            case Fence(volume):
                await self._store.fence(volume)
            case Rejoin(volume):
                await self._rejoin(volume)
            case Activate(volume, epoch):
                await self._activation.activate(volume, epoch)
            case UnmountUnused(volume):
                held = await unmount_unused(volume, self._mounts, self._store)
                if held:
                    log.info("stays mounted: volume=%s used_by=%s", volume, "; ".join(held))
            case DriveMove(volume):
                await self._stop_replicating(volume)
                self._moves[volume] = asyncio.create_task(self._drive(volume))
            case Replicate(volume):
                self._replications[volume] = asyncio.create_task(self._replicate(volume))
            case Destroy(volume):
                await self._store.destroy(volume)
                await self._keyspace.delete_state(self._node, volume)
            case SetAside(volume):
                owner = await self._keyspace.get_owner(volume)
                aside = await self._store.keep_aside(
                    volume,
                    owner.value.epoch if owner else 0,
                    "belongs to a deleted volume of the same name (another uid)",
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

    async def _rejoin(self, volume: str) -> None:
        """Keep this old owner's late writes aside and make its copy a replica again.

        The base is the newest snapshot this copy and the owner's hold with the same
        GUID (asked of the owner: nothing here is trusted by name). What the copy holds
        after it, snapshots and the head, is kept aside and listed, never rolled back;
        the copy left in place ends at the base, so the owner's streams continue from it.
        Without an owner to ask (down), nothing changes until the next pass.
        """
        owner = await self._keyspace.get_owner(volume)
        if owner is None or owner.value.node == self._node:
            return
        remote = await (await self._connect(owner.value.node)).holdings(volume)
        await self._store.stop_writes(volume)
        await self._store.snapshot_head(volume, FENCED_PREFIX)
        local = await self._store.snapshots(volume) or []
        base = newest_common(local, remote)
        reason = (
            await self._store.divergence(volume, base)
            if base
            else f"holds no snapshot in common with {owner.value.node}, the owner"
        )
        aside = await self._store.split_aside(
            volume,
            base,
            owner.value.epoch,
            f"{reason} (written here before {owner.value.node} "
            f"took over at epoch {owner.value.epoch})",
        )
        log.warning(
            "old owner's late writes kept aside, copy rejoined as a replica: volume=%s node=%s "
            "owner=%s epoch=%d base=%s aside=%s",
            volume,
            self._node,
            owner.value.node,
            owner.value.epoch,
            base or "(none: a full copy comes)",
            aside,
        )

    async def _create_failed(self, create: Create, error: Exception) -> None:
        """Control stores why in the spec, so this node stops retrying it and ``volume get``
        and Docker say so (only on the spec tried: a new size is a new try)."""
        why = f"{type(error).__name__}: {error}"
        log.error("create failed: volume=%s node=%s error=%s", create.volume, self._node, why)
        await self._report_create_failure(create, why)

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

    async def _replicate(self, volume: str) -> None:
        """The replication loop; it ends when this node should stop, and convergence starts
        it again when it should run (after a move, say)."""
        try:
            await self._replicator.run(volume)
        except Exception as error:
            log.warning("replication stopped: volume=%s error=%s", volume, error)
        self._wake()

    async def _stop_replicating(self, volume: str) -> None:
        """End the volume's replication loop before its move starts: a round still sending
        would make the move's first sync to the same peer fail ("already running") and
        wait a back-off. A send cut here leaves the replica's copy as it was."""
        task = self._replications.pop(volume, None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def close(self) -> None:
        tasks = [*self._moves.values(), *self._replications.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
