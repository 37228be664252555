"""The source's view of a move record on a real etcd: it never undoes the target's "done"."""

from __future__ import annotations

import secrets
from dataclasses import replace

import pytest

from agent.replication.record import MoveAbandoned, MoveRecord
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import Move, MovePhase

pytestmark = pytest.mark.integration


async def _tracked(keyspace: Keyspace) -> tuple[str, MoveRecord]:
    name = f"mr-{secrets.token_hex(3)}"
    assert await keyspace.put_move(
        Move(volume=name, source="n1", target="n2", phase=MovePhase.HANDOFF), None
    )
    current = await keyspace.get_move(name)
    assert current is not None
    return name, MoveRecord(keyspace, current)


async def test_a_late_activating_from_the_source_leaves_done_in_place(keyspace: Keyspace) -> None:
    name, tracker = await _tracked(keyspace)
    by_target = await keyspace.get_move(name)
    assert by_target is not None
    done = replace(by_target.value, phase=MovePhase.DONE)
    assert await keyspace.put_move(done, by_target.revision)

    await tracker.update(phase=MovePhase.ACTIVATING)

    final = await keyspace.get_move(name)
    assert final is not None and final.value.phase is MovePhase.DONE


async def test_a_stale_update_is_retried_on_the_fresh_record(keyspace: Keyspace) -> None:
    name, tracker = await _tracked(keyspace)
    fresh = await keyspace.get_move(name)
    assert fresh is not None
    assert await keyspace.put_move(replace(fresh.value, bytes_total=99), fresh.revision)

    await tracker.update(error="peer unreachable")

    final = await keyspace.get_move(name)
    assert final is not None
    assert (final.value.error, final.value.bytes_total) == ("peer unreachable", 99)


async def test_an_update_to_a_retargeted_move_is_abandoned(keyspace: Keyspace) -> None:
    name, tracker = await _tracked(keyspace)
    fresh = await keyspace.get_move(name)
    assert fresh is not None
    assert await keyspace.put_move(replace(fresh.value, target="n3"), fresh.revision)
    with pytest.raises(MoveAbandoned, match="cancelled or retargeted"):
        await tracker.update(phase=MovePhase.ACTIVATING)
