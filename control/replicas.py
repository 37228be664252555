"""Keeping each volume's replica count: control's loop that re-places replicas.

Every few seconds control compares each volume's replica nodes with the
live nodes. A replica whose node has been down longer than the volume's
``replace_after`` is placed on another live node with room (the owner then
seeds it, incrementally where that node still holds an old copy); a volume
with fewer replicas than it wants (too few nodes when it was created or
updated, or a replaced node with no other to take it) gets the missing ones
as soon as a node can take them. Each write compares the spec's revision,
so a request landing meanwhile wins and the next pass looks again.

How long a node has been down is counted from when this control process
first saw it missing: a control restart starts the count again, which only
delays a replacement, never hastens one. The old replica's copy, when its
host returns, is a stale read-only copy (``volume get`` shows it as such); it
is neither destroyed nor held for, like the copy a move leaves behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from ferry.cluster.keyspace import Keyspace, Kind
from ferry.cluster.view import read_view
from ferry.core.phases import ACTIVE_PHASES
from ferry.core.placement import Candidate, place_replicas

log = logging.getLogger(__name__)

CHECK_SECONDS = 5.0
HISTORY_KEPT = 5


class ReplicaKeeper:
    """Re-places replicas whose node stayed down, and fills missing ones."""

    def __init__(self, keyspace: Keyspace, check_seconds: float = CHECK_SECONDS) -> None:
        self._keyspace = keyspace
        self._check_seconds = check_seconds
        self.down_since: dict[str, float] = {}
        """Replica nodes found missing from the live nodes, and since when (wall time)."""

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception as error:
                log.warning("replica placement check failed: error=%s", error)
            await asyncio.sleep(self._check_seconds)

    async def check(self) -> None:
        """One pass over every volume with replicas, from one view of nodes, volumes and moves."""
        view = await read_view(self._keyspace, (Kind.NODES, Kind.VOLUMES, Kind.MOVES))
        live = [Candidate(n.value.name, n.value.free_bytes) for n in view.nodes.values()]
        names = {c.name for c in live}
        now = time.time()
        volumes = list(view.volumes.values())
        # A volume that is moving has its target as desired node and its source among
        # the replicas until the handoff: left alone until the move ends.
        moving = {name for name, move in view.moves.items() if move.value.phase in ACTIVE_PHASES}
        wanted = {node for v in volumes for node in v.value.replica_nodes}
        for node in list(self.down_since):
            if node in names or node not in wanted:
                del self.down_since[node]
        for node in wanted - names:
            self.down_since.setdefault(node, now)
        for versioned in volumes:
            spec = versioned.value
            if spec.deleted or not spec.replicas or spec.name in moving:
                continue
            expired = {
                node
                for node in spec.replica_nodes
                if node in self.down_since
                and now - self.down_since[node] >= spec.replace_after_seconds
            }
            placed = place_replicas(
                spec.replicas, spec.node, spec.replica_nodes, live, spec.size_bytes, expired
            )
            if placed == spec.replica_nodes:
                continue
            events = self._events(spec.replica_nodes, placed, now, spec.replace_after_seconds)
            history = (*spec.replaced, *events)[-HISTORY_KEPT:]
            updated = replace(spec, replica_nodes=placed, replaced=history)
            if await self._keyspace.update_volume(updated, versioned.revision):
                for event in events:
                    log.warning("replica re-placed: volume=%s %s", spec.name, event)

    def _events(
        self, before: tuple[str, ...], after: tuple[str, ...], now: float, limit: int
    ) -> list[str]:
        at = time.strftime("%H:%M:%S UTC", time.gmtime(now))
        events = []
        for old, new in zip(before, after, strict=False):
            if old != new:
                since = time.strftime("%H:%M:%S UTC", time.gmtime(self.down_since.get(old, now)))
                events.append(
                    f"replica on {old} replaced by {new} at {at}: {old} down since {since}, "
                    f"longer than replace_after {limit}s"
                )
        for new in after[len(before) :]:
            events.append(f"replica placed on {new} at {at}")
        return events
