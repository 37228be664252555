"""The cluster as one etcd revision shows it: the records a decision needs, read at once.

A convergence pass used to read volumes, owners and moves in three requests,
and ``GetVolume`` made seven; a write landing between two of them (a move's
owner swap, a new move) was seen by one read and not the other. The
compare-and-swap writes kept that safe, but the pass planned from a mix of
two moments. A ``ClusterView`` is read in one etcd request (``Keyspace.read``:
one transaction of range reads), so all it holds is from one revision, which
it carries: a watch from ``revision + 1`` misses nothing the view did not see.

A record that does not decode is logged with its key and left out; the view
lists it in ``unreadable``, so callers decide whether it blocks them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ferry.cluster.keyspace import Keyspace, Kind, Unreadable, UnreadableRecord, Versioned
from ferry.core.records import (
    AsideCopy,
    AsideDrop,
    MountRecord,
    Move,
    NodeInfo,
    NodeState,
    Owner,
    VolumeSpec,
)

log = logging.getLogger(__name__)

# What one convergence pass plans from.
DESIRED_KINDS = (Kind.VOLUMES, Kind.OWNERS, Kind.MOVES)


@dataclass(frozen=True)
class ClusterView:
    """Records of the kinds read, as etcd held them at ``revision``; none of a kind not read."""

    revision: int
    volumes: Mapping[str, Versioned[VolumeSpec]] = field(default_factory=dict)
    owners: Mapping[str, Versioned[Owner]] = field(default_factory=dict)
    moves: Mapping[str, Versioned[Move]] = field(default_factory=dict)
    nodes: Mapping[str, Versioned[NodeInfo]] = field(default_factory=dict)
    states: tuple[NodeState, ...] = ()
    mounts: tuple[MountRecord, ...] = ()
    asides: tuple[AsideCopy, ...] = ()
    drops: tuple[AsideDrop, ...] = ()
    unreadable: tuple[tuple[Kind, Unreadable], ...] = ()

    def states_of(self, volume: str) -> list[NodeState]:
        return [state for state in self.states if state.volume == volume]

    def mounts_of(self, volume: str) -> list[MountRecord]:
        return [mount for mount in self.mounts if mount.volume == volume]

    def drop_requested(self, aside: AsideCopy) -> bool:
        return any((d.node, d.dataset) == (aside.node, aside.dataset) for d in self.drops)

    def skipped(self, *kinds: Kind) -> list[Unreadable]:
        """The records of these kinds (all when none) that did not decode."""
        return [record for kind, record in self.unreadable if not kinds or kind in kinds]

    def check(self, volume: str, *kinds: Kind) -> None:
        """UnreadableRecord for the first record of ``volume`` of these kinds that did not
        decode: for callers to whom a left-out record would read as "none" (no mount,
        no copy) and let a wrong decision through."""
        for record in self.skipped(*kinds):
            if record.volume == volume:
                raise UnreadableRecord(record)


async def read_view(
    keyspace: Keyspace, kinds: Iterable[Kind] = tuple(Kind), volume: str = "", node: str = ""
) -> ClusterView:
    """The records of ``kinds`` in one etcd request; with ``volume``, only the records about
    it (and those about no volume: nodes); with ``node``, only that node's records of the
    kinds whose keys name the node first (state, asides, drops, nodes)."""
    wanted = tuple(dict.fromkeys(kinds))
    revision, entries = await keyspace.read([keyspace.scope(kind, volume, node) for kind in wanted])
    found: dict[Kind, list[tuple[str, Versioned[Any]]]] = {kind: [] for kind in wanted}
    unreadable: list[tuple[Kind, Unreadable]] = []
    for entry in entries:
        place = entry.place
        try:
            record = keyspace.decode(entry)
        except UnreadableRecord as error:
            if not volume or error.skipped.volume in ("", volume):
                log.warning(
                    "record skipped: key=%s reason=%s", error.skipped.key, error.skipped.reason
                )
                unreadable.append((place.kind, error.skipped))
            continue
        # Aside keys name the node and the dataset; the record says which volume.
        about = record.volume if place.kind in (Kind.ASIDES, Kind.DROPS) else place.volume
        if volume and about not in ("", volume):
            continue
        found[place.kind].append(
            (place.volume or place.node, Versioned(record, entry.mod_revision))
        )
    return ClusterView(
        revision=revision,
        volumes=dict(found.get(Kind.VOLUMES, [])),
        owners=dict(found.get(Kind.OWNERS, [])),
        moves=dict(found.get(Kind.MOVES, [])),
        nodes=dict(found.get(Kind.NODES, [])),
        states=_values(found.get(Kind.STATE, [])),
        mounts=_values(found.get(Kind.MOUNTS, [])),
        asides=_values(found.get(Kind.ASIDES, [])),
        drops=_values(found.get(Kind.DROPS, [])),
        unreadable=tuple(unreadable),
    )


def _values(found: list[tuple[str, Versioned[Any]]]) -> tuple[Any, ...]:
    return tuple(versioned.value for _, versioned in found)
