"""Automatic failover: volumes with ``failover: auto`` whose owner's node stays gone.

Control does it, not the agents: control runs beside etcd, and any number
of instances may run (``Keyspace.fail_over`` lets one win; the others find
the owner changed). How long a node has been gone is counted from when this
control first saw its lease gone, on this control's own clock: no clocks of
two hosts are compared, and a restarted control starts counting again (a
later failover, never an earlier one). The lease being gone is what makes a
failover safe (ferry.core.fencing); ``failover_after`` only adds margin.
"""

from __future__ import annotations

import asyncio
import logging
import time

from control.operations import OperationError, VolumeOps
from ferry.cluster.keyspace import Keyspace, Kind
from ferry.cluster.view import read_view

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


class AutoFailover:
    """Fails over each auto volume once its owner's node has been gone for failover_after."""

    def __init__(self, keyspace: Keyspace, ops: VolumeOps) -> None:
        self._keyspace = keyspace
        self._ops = ops
        self._gone_since: dict[str, float] = {}
        self._refused: dict[str, str] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception as error:
                log.warning("auto failover pass failed: error=%s", error)
            await asyncio.sleep(POLL_SECONDS)

    async def step(self) -> None:
        """One look at the nodes and the auto volumes; fails over those that are due."""
        now = time.monotonic()
        view = await read_view(self._keyspace, (Kind.NODES, Kind.OWNERS, Kind.VOLUMES))
        live = set(view.nodes)
        owners = view.owners
        for node in set(self._gone_since) & live:
            del self._gone_since[node]
        for spec in view.volumes.values():
            volume = spec.value
            owner = owners.get(volume.name)
            if volume.deleted or volume.failover != "auto" or owner is None:
                continue
            lost = owner.value.node
            if lost in live:
                self._refused.pop(volume.name, None)
                continue
            since = self._gone_since.setdefault(lost, now)
            if now - since < volume.failover_after:
                continue
            await self._fail_over(volume.name, lost, now - since)

    async def _fail_over(self, volume: str, lost: str, gone: float) -> None:
        try:
            done = await self._ops.failover(volume)
        except OperationError as error:
            if self._refused.get(volume) != str(error):
                log.error(
                    "auto failover not possible: volume=%s owner=%s gone_for=%.0fs reason=%s",
                    volume,
                    lost,
                    gone,
                    error,
                )
                self._refused[volume] = str(error)
            return
        self._refused.pop(volume, None)
        log.warning(
            "auto failover: volume=%s from=%s to=%s gone_for=%.0fs lost=%r",
            volume,
            lost,
            done.node,
            gone,
            done.lost,
        )
