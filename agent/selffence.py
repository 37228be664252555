"""Self-fencing: an agent that cannot renew its etcd lease stops writes before the lease expires.

Never two writers. A failover hands a volume to another node only once the
owner's lease is gone (``control.failover``); the owner cannot learn that
when it cannot reach etcd. So it acts on time alone: once no renewal was
confirmed for ``FencingTiming.fence_after`` it freezes every volume it owns
(``PoolRoot.freeze``: every writer in every mount namespace gets EROFS),
well before the lease can expire (``ferry.core.fencing`` has the numbers,
docs/failover.md the argument). While fenced, nothing here makes a copy
writable again (``VolumeStore.self_fenced``: thaw and activate refuse).

It thaws only after a renewal *sent after the freeze* was confirmed (the
lease, old or new, is live again, so no failover can pass its compare on
the lease) and the owner record still names this node at the epoch it had
when it froze. A volume failed over meanwhile stays frozen; convergence
then keeps its late writes aside and makes it a replica (``Rejoin``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from agent.registration import Registration
from agent.store import VolumeStore
from agent.zfs.volumes import FilesystemBusy
from ferry.cluster.keyspace import Keyspace
from ferry.core.fencing import FencingTiming

log = logging.getLogger(__name__)

BUSY_RETRY_SECONDS = 0.1


class SelfFence:
    """Watches the lease's last confirmed renewal; freezes and thaws this node's volumes."""

    def __init__(
        self,
        node: str,
        keyspace: Keyspace,
        store: VolumeStore,
        registration: Registration,
        owned: Callable[[], Mapping[str, int]],
        timing: FencingTiming,
    ) -> None:
        """``owned`` is what the last convergence pass saw this node own: volume -> epoch."""
        self._node = node
        self._keyspace = keyspace
        self._store = store
        self._registration = registration
        self._owned = owned
        self._timing = timing
        self._fenced_at: float | None = None
        self._frozen: dict[str, int] = {}

    @property
    def fenced(self) -> bool:
        return self._fenced_at is not None

    async def run(self) -> None:
        """Until cancelled: freeze when the lease goes unconfirmed, thaw once it is back."""
        while True:
            await asyncio.sleep(self._timing.watchdog_tick)
            silent = time.monotonic() - self._registration.renewed_at
            if self._fenced_at is None:
                if silent >= self._timing.fence_after:
                    await self._fence(silent)
            elif self._registration.renewed_at > self._fenced_at:
                try:
                    await self._confirm()
                except Exception as error:
                    log.warning("ownership not confirmed yet, still fenced: error=%s", error)

    async def _fence(self, silent: float) -> None:
        self._fenced_at = time.monotonic()
        self._store.self_fenced = True
        owned = dict(self._owned())
        writable = await self._store.mounted_writable()
        self._frozen = {volume: owned.get(volume, 0) for volume in set(owned) | set(writable)}
        log.error(
            "etcd lease not renewed for %.1fs: freezing every volume this node owns: node=%s "
            "volumes=%s",
            silent,
            self._node,
            ",".join(sorted(self._frozen)) or "none",
        )
        deadline = self._fenced_at + self._timing.freeze_retry
        await asyncio.gather(
            *(self._freeze(volume, deadline, volume in writable) for volume in self._frozen)
        )

    async def _freeze(self, volume: str, deadline: float, mounted_here: bool) -> None:
        """Freeze, retried while a file is open for writing, until ``deadline``; then the
        processes holding files open for writing are killed and the freeze tried once more.

        Killing is what sanlock does to the users of a lease it cannot renew: past the
        lease, another node may be writing this volume, and a writer left here would
        write a copy nobody will ever read.
        """
        while True:
            try:
                await self._store.freeze(volume, mounted_here)
                log.warning("frozen, etcd lease lost: volume=%s node=%s", volume, self._node)
                return
            except FilesystemBusy as busy:
                if time.monotonic() < deadline:
                    await asyncio.sleep(BUSY_RETRY_SECONDS)
                    continue
                killed = await self._store.kill_writers(volume)
                log.error(
                    "freeze refused past its window, writers killed: volume=%s node=%s "
                    "error=%s killed=%s",
                    volume,
                    self._node,
                    busy,
                    "; ".join(killed) or "none found",
                )
            except Exception as error:
                log.error("freeze failed: volume=%s node=%s error=%s", volume, self._node, error)
                if time.monotonic() < deadline:
                    await asyncio.sleep(BUSY_RETRY_SECONDS)
                    continue
            try:
                await self._store.freeze(volume, mounted_here)
                log.warning("frozen, etcd lease lost: volume=%s node=%s", volume, self._node)
            except Exception as error:
                log.error(
                    "volume NOT frozen although the lease is lost: volume=%s node=%s error=%s; "
                    "stop its containers on this node now",
                    volume,
                    self._node,
                    error,
                )
            return

    async def _confirm(self) -> None:
        """Thaw each frozen volume this node still owns at the same epoch; keep the rest."""
        kept = []
        for volume, epoch in self._frozen.items():
            owner = await self._keyspace.get_owner(volume)
            if (
                owner is None
                or owner.value.node != self._node
                or (epoch and owner.value.epoch != epoch)
            ):
                kept.append(volume)
                log.warning(
                    "not thawed, ownership moved while the lease was lost: volume=%s node=%s "
                    "epoch_at_freeze=%d owner=%s",
                    volume,
                    self._node,
                    epoch,
                    owner.value if owner else "none",
                )
                continue
            await self._store.thaw(volume, confirmed=True)
            log.info(
                "thawed, lease and ownership confirmed: volume=%s node=%s epoch=%d",
                volume,
                self._node,
                owner.value.epoch,
            )
        self._store.self_fenced = False
        log.warning(
            "self-fence ended: node=%s frozen_for=%.1fs kept_frozen=%s",
            self._node,
            time.monotonic() - (self._fenced_at or 0.0),
            ",".join(kept) or "none",
        )
        self._fenced_at = None
        self._frozen = {}
