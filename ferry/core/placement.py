"""Where a volume's replicas go: pure rules that control applies and tests call directly.

A replica is never on the owner's node, and never twice on one node. New
replicas go to the live nodes with the most free space that can hold the
volume. A replica whose node is down stays where it is until that node has
been down longer than ``replace_after``; only then, and only if another
node can take it, does it move, so the count holds without churning on a
node that restarts.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A live node as placement sees it."""

    name: str
    free_bytes: int


def place_replicas(
    count: int,
    owner: str,
    current: Sequence[str],
    live: Sequence[Candidate],
    size_bytes: int,
    expired: Collection[str] = (),
) -> tuple[str, ...]:
    """The replica nodes after placement: ``current`` kept in order (but the owner's node,
    and those beyond ``count``), each node in ``expired`` replaced when another can take
    it, then filled up to ``count`` from the roomiest live nodes. Fewer than ``count``
    when too few nodes qualify."""
    kept = [node for node in current if node != owner][:count]
    pool = sorted(
        (
            c
            for c in live
            if c.name != owner
            and c.name not in kept
            and c.name not in expired
            and c.free_bytes >= size_bytes
        ),
        key=lambda c: (-c.free_bytes, c.name),
    )
    placed = []
    for node in kept:
        placed.append(pool.pop(0).name if node in expired and pool else node)
    while len(placed) < count and pool:
        placed.append(pool.pop(0).name)
    return tuple(placed)


def after_move(replica_nodes: Sequence[str], source: str, target: str) -> tuple[str, ...]:
    """A move to a replica's node swaps roles: the old owner's copy becomes that replica."""
    return tuple(source if node == target else node for node in replica_nodes)
