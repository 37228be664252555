"""A handoff that fails before the ownership swap gives the source its writes back.

The source agent runs on a real pool and etcd; the target is a stand-in
that fails the way a target behind a cut link does.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from agent.moves import HandoffTimedOut, MoveDriver
from agent.store import VolumeStore
from agent.transfer.client import PeerClient, TransferFailed
from agent.usage import DockerMounts
from agent.zfs.volumes import PoolRoot
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import Move, MovePhase, Owner, VolumeSpec
from ferry.core.snapshots import SnapshotRef
from tests.support.pools import ScratchPool, scratch_pool

pytestmark = pytest.mark.integration

SIZE = 16 << 20


class TargetCutOff:
    """Answers ``holdings`` while ``answers`` is set, and fails every stream."""

    node = "ho-b"
    address = "10.255.0.2:7080"

    def __init__(self, answers: bool) -> None:
        self.answers = answers

    async def holdings(self, volume: str) -> list[SnapshotRef]:
        if not self.answers:
            raise TransferFailed(f"{self.node} ({self.address}): Deadline Exceeded")
        return []

    async def send(self, *_args: object) -> list[SnapshotRef]:
        raise TransferFailed(f"{self.node} ({self.address}): Connection timed out")


@pytest.fixture
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("ho") as made:
        yield made


@pytest.fixture
async def source(
    pool: ScratchPool, keyspace: Keyspace, tmp_path: Path
) -> AsyncIterator[tuple[str, VolumeStore]]:
    """A volume owned and mounted writable on ho-a, in the handoff phase of a move to ho-b."""
    name = f"ho-{secrets.token_hex(3)}"
    store = VolumeStore(PoolRoot(pool.name), tmp_path)
    await store.ensure_root()
    spec = VolumeSpec(name=name, size_bytes=SIZE, node="ho-b")
    await store.create(name, SIZE, "off", "")
    await store.activate(spec)
    await keyspace.create_volume(spec)
    assert await keyspace.claim_owner(name, "ho-a")
    move = Move(volume=name, source="ho-a", target="ho-b", phase=MovePhase.HANDOFF)
    assert await keyspace.put_move(move, None)
    yield name, store
    await keyspace.purge_volume(name)


async def handoff(keyspace: Keyspace, store: VolumeStore, name: str, target: TargetCutOff) -> None:
    async def connect(_node: str) -> PeerClient:
        return cast(PeerClient, target)

    with pytest.raises(TransferFailed):
        mounts = DockerMounts(store.mountpoint(name).parent / "state" / "docker-mounts.json")
        await MoveDriver("ho-a", keyspace, store, connect, mounts).run(name)


async def test_a_stream_failing_after_the_freeze_thaws_the_source(
    keyspace: Keyspace, source: tuple[str, VolumeStore], tmp_path: Path
) -> None:
    name, store = source
    await handoff(keyspace, store, name, TargetCutOff(answers=True))
    assert await store.snapshots(name), "the handoff froze the volume and took its final snapshot"
    assert await store.is_writable(name)
    (tmp_path / name / "after-the-failed-handoff").write_bytes(b"accepted")
    owner = await keyspace.get_owner(name)
    assert owner is not None and owner.value == Owner("ho-a", 1)
    move = await keyspace.get_move(name)
    assert move is not None and "Connection timed out" in move.value.error


async def test_a_target_that_does_not_answer_never_stops_the_sources_writes(
    keyspace: Keyspace, source: tuple[str, VolumeStore]
) -> None:
    name, store = source
    await handoff(keyspace, store, name, TargetCutOff(answers=False))
    assert await store.snapshots(name) == [], "no final snapshot: writes were never stopped"
    assert await store.is_writable(name)


@pytest.mark.parametrize("step", ["sync", "zfs snapshot"])
async def test_a_handoff_whose_final_steps_hang_thaws_the_source_within_its_deadline(
    keyspace: Keyspace,
    source: tuple[str, VolumeStore],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    """``sync -f`` (the freeze's flush) or the final snapshot hangs: the handoff gives up at its
    deadline, the source accepts writes again, and the move record says what hung."""
    name, store = source
    monkeypatch.setenv("FERRY_FAILPOINTS", f"hang:{step}")
    monkeypatch.setenv("FERRY_ZFS_TIMEOUTS", "mount=6,change=6")
    deadline = 2.0
    driver = MoveDriver(
        "ho-a",
        keyspace,
        store,
        _connect(TargetCutOff(answers=True)),
        DockerMounts(tmp_path / "mounts.json"),
        handoff_deadline=deadline,
    )
    started = time.monotonic()
    with pytest.raises(HandoffTimedOut):
        await driver.run(name)
    assert time.monotonic() - started < deadline + 5.0
    monkeypatch.delenv("FERRY_FAILPOINTS")
    assert await store.is_writable(name)
    (tmp_path / name / "after-the-hung-handoff").write_bytes(b"accepted")
    owner = await keyspace.get_owner(name)
    assert owner is not None and owner.value == Owner("ho-a", 1)
    move = await keyspace.get_move(name)
    assert move is not None and move.value.phase == MovePhase.PRECOPY
    assert f"within {deadline:.0f} s (still running: `{step}" in move.value.error
    await _until(lambda: not store.commands_running(name), 15)


def _connect(target: TargetCutOff) -> Callable[[str], Awaitable[PeerClient]]:
    async def connect(_node: str) -> PeerClient:
        return cast(PeerClient, target)

    return connect


async def _until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the hung command was never killed"
        await asyncio.sleep(0.2)
