"""Copies this node keeps aside: reported to etcd, destroyed only on an operator's request.

A copy is kept aside (``VolumeStore.keep_aside``) when it holds data the
volume's history does not: written after the snapshot a stream built on.
Nothing in Ferry destroys such a copy by itself. ``ferryctl volume aside
drop`` records a request in etcd; the agent of the node that keeps the copy
destroys it here, then deletes its record and the request. Level-triggered
like the rest of convergence: a request that finds the copy already gone is
simply closed.
"""

from __future__ import annotations

import logging

import aetcd

from agent.store import VolumeStore
from agent.zfs import ZFSError
from agent.zfs.exceptions import NameInvalid
from ferry.cluster.keyspace import Keyspace, Kind
from ferry.cluster.view import ClusterView, read_view
from ferry.core.records import AsideCopy

log = logging.getLogger(__name__)

# What the ledger reads of this node's, in a pass's view.
LEDGER_KINDS = (Kind.ASIDES, Kind.DROPS)


class AsideLedger:
    """Keeps ``asides/<node>/...`` equal to this node's copies kept aside; carries out drops."""

    def __init__(self, node: str, keyspace: Keyspace, store: VolumeStore) -> None:
        self._node = node
        self._keyspace = keyspace
        self._store = store

    async def converge(self, lease: aetcd.Lease, view: ClusterView | None = None) -> None:
        """Carry out the drop requests for this node, then report what is kept aside.

        From ``view`` (the pass's, holding this node's asides and drops) or one read anew.
        A record it shows that a drop below deletes is deleted again: a no-op.
        """
        if view is None:
            view = await read_view(self._keyspace, LEDGER_KINDS, node=self._node)
        for drop in view.drops:
            try:
                dropped = await self._store.drop_aside(drop.dataset)
            except NameInvalid as error:
                log.error(
                    "drop request names no copy kept aside in this pool, closed: volume=%s "
                    "dataset=%s error=%s",
                    drop.volume,
                    drop.dataset,
                    error,
                )
            except ZFSError as error:
                log.error(
                    "cannot drop a copy kept aside, retrying at the next pass: volume=%s "
                    "dataset=%s error=%s",
                    drop.volume,
                    drop.dataset,
                    error,
                )
                continue
            else:
                log.warning(
                    "copy kept aside %s on request: volume=%s dataset=%s",
                    "destroyed" if dropped else "was already gone",
                    drop.volume,
                    drop.dataset,
                )
            await self._keyspace.delete_aside(self._node, drop.leaf)
            await self._keyspace.delete_drop(self._node, drop.leaf)
        await self._report(lease, view)

    async def _report(self, lease: aetcd.Lease, view: ClusterView) -> None:
        reported = {a.leaf: a for a in view.asides}
        held = [
            AsideCopy(
                node=self._node,
                volume=aside.volume,
                dataset=aside.dataset,
                kept_at=aside.kept_at,
                epoch=aside.epoch,
                used_bytes=aside.used_bytes,
                reason=aside.reason,
            )
            for aside in await self._store.asides()
        ]
        for aside in held:
            if reported.get(aside.leaf) != aside:
                await self._keyspace.put_aside(aside, lease)
        for gone in set(reported) - {aside.leaf for aside in held}:
            await self._keyspace.delete_aside(self._node, gone)
