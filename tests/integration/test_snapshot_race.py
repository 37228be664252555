"""Convergence reads a volume's snapshots while a move prunes them (issue 9, item 10).

The move driver snapshots and prunes on the source while convergence lists
the same volume's snapshots; a snapshot destroyed in between must simply be
absent from the answer, never an error that fails the whole pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store import VolumeStore
from agent.zfs.volumes import PoolRoot
from tests.support.pools import ScratchPool, pool_fixture

pytestmark = pytest.mark.integration

pool = pool_fixture("mvrace")
ROUNDS = 40


@pytest.fixture
def store(pool: ScratchPool, tmp_path: Path) -> Iterator[VolumeStore]:
    made = VolumeStore(PoolRoot(pool.name), tmp_path)
    PoolRoot(pool.name).ensure()
    yield made


async def test_listing_snapshots_while_a_move_prunes_them_never_fails(
    store: VolumeStore,
) -> None:
    await store.create("v", 16 << 20, "off", "")
    pruning = True

    async def prune_like_a_move() -> int:
        rounds = 0
        while pruning:
            taken = await store.take_snapshot("v", 1)
            older = [ref.name for ref in await store.snapshots("v") or [] if ref != taken]
            await store.destroy_snapshots("v", older)
            rounds += 1
        return rounds

    mover = asyncio.create_task(prune_like_a_move())
    try:
        for _ in range(ROUNDS):
            listed = await store.local_volumes()
            assert "v" in listed
    finally:
        pruning = False
        pruned = await mover
    assert pruned >= 2, "the mover pruned while convergence listed"
