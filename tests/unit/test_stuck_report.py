"""What is stuck on a node reaches the operator: in the copy's row and in the move's status."""

from __future__ import annotations

from control.server import _volume_message
from ferry.cluster.keyspace import Versioned
from ferry.core.records import Move, MovePhase, NodeState, VolumeSpec

STUCK = "`sync -f /mnt/v` running since 2026-01-02 10:00:00 UTC (42 s, limit 60 s); check it"


def test_a_stuck_source_shows_in_its_copy_and_in_the_move_status() -> None:
    spec = VolumeSpec(name="v", size_bytes=1 << 30, node="host2")
    move = Move(volume="v", source="host1", target="host2", phase=MovePhase.HANDOFF)
    copies = [
        NodeState(node="host1", volume="v", stuck=STUCK),
        NodeState(node="host2", volume="v"),
        NodeState(node="host3", volume="v", stuck="a replica's own trouble"),
    ]
    shown = _volume_message(spec, None, Versioned(move, 7), [], copies, [])
    assert {c.node: c.stuck for c in shown.copies} == {
        "host1": STUCK,
        "host2": "",
        "host3": "a replica's own trouble",
    }
    assert shown.move.stuck == f"host1: {STUCK}"
