"""Failover as pure rules: may the volume fail over, to which copy, and what is lost.

``control.operations`` reads etcd, asks these, and writes the answer in one
transaction (``Keyspace.fail_over``) that compares everything read here, so
a node coming back or a second request between the read and the write makes
the write fail instead of acting on a stale answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from ferry.core.records import NodeState
from ferry.core.snapshots import SnapshotName, parse


class FailoverRefused(Exception):
    """The failover cannot happen; the message says why and what to do instead."""


@dataclass(frozen=True)
class Candidate:
    """A copy that may take over: its node, its newest Ferry snapshot and when it was taken."""

    node: str
    snapshot: str
    taken_at: float


def newest_snapshot(state: NodeState) -> str | None:
    """The newest Ferry snapshot a copy reports (snapshots of its own, e.g. ``fenced-*``,
    are not the volume's history)."""
    ferry = [(parsed, name) for name in state.snapshots if (parsed := parse(name)) is not None]
    return max(ferry)[1] if ferry else None


def choose(
    volume: str, owner: str, owner_live: bool, copies: Iterable[NodeState], to: str = ""
) -> Candidate:
    """The copy to promote: ``to`` if given, else the live copy with the newest snapshot.

    ``copies`` are the state records of live nodes (a down node has none).
    Refused while the owner's node is live (a move loses nothing), when the
    named node holds no copy, and when no copy holds a snapshot at all.
    """
    if owner_live:
        raise FailoverRefused(
            f"volume {volume}'s owner {owner} is live: a failover is only for an owner whose "
            f"node is down; use 'ferryctl volume move {volume} NODE', which loses nothing"
        )
    found = []
    for state in copies:
        snapshot = newest_snapshot(state)
        if state.node != owner and snapshot is not None:
            found.append(Candidate(state.node, snapshot, state.newest_snapshot_at))
    if to:
        named = [c for c in found if c.node == to]
        if not named:
            held = ", ".join(sorted(c.node for c in found)) or "none"
            raise FailoverRefused(
                f"node {to} holds no copy of {volume} with a snapshot, or is down (live copies: "
                f"{held}); name one of them, or leave --to out"
            )
        return named[0]
    if not found:
        raise FailoverRefused(
            f"no live node holds a copy of {volume}: nothing to fail over to; start {owner} "
            f"again (its data is there), or give the volume replicas so the next loss has one"
        )
    return max(found, key=lambda c: (parse(c.snapshot) or SnapshotName(0, 0), c.node))


def loss(owner: str, chosen: Candidate, last_seen: float) -> str:
    """What the promoted copy lacks, for the operator: the owner's writes after its snapshot."""
    if not chosen.taken_at:
        return (
            f"writes on {owner} after snapshot {chosen.snapshot} are not in this copy "
            f"(its time is not reported)"
        )
    taken = time.strftime("%H:%M:%S UTC", time.gmtime(chosen.taken_at))
    if not last_seen:
        return f"writes on {owner} after {taken} are not in this copy"
    before = max(0.0, last_seen - chosen.taken_at)
    return (
        f"writes on {owner} after {taken} ({before:.0f} s before it was lost) are not in this copy"
    )
