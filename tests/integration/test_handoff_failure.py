"""A handoff that fails before the ownership swap gives the source its writes back.

The source agent runs on a real pool and etcd; the target is the fake peer
(``tests.support.replication``, held to the real one by a shared suite),
failing the way a target behind a cut link does.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from agent.replication.adapters import PoolStore
from agent.replication.ports import Peer
from agent.replication.source import HandoffTimedOut, MoveDriver
from agent.store import VolumeStore
from agent.transfer.client import TransferFailed
from agent.usage import DockerMounts
from agent.zfs.volumes import PoolRoot
from ferry.cluster.keyspace import Keyspace
from ferry.core.records import Move, MovePhase, Owner, VolumeSpec
from tests.support.pools import ScratchPool, scratch_pool
from tests.support.replication import FakePeer, FakeStore

pytestmark = pytest.mark.integration

SIZE = 16 << 20


async def cut_off(keyspace: Keyspace, source: tuple[str, VolumeStore], answers: bool) -> FakePeer:
    """A target holding what was pre-copied, that answers ``holdings`` only if ``answers``,
    and whose streams all break."""
    name, store = source
    held = FakeStore("ho-b")
    held.plant(name, await store.snapshots(name) or [])
    target = FakePeer("ho-b", held, keyspace)
    target.answers = answers
    target.streams_fail = True
    return target


@pytest.fixture
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("ho") as made:
        yield made


@pytest.fixture
async def source(
    pool: ScratchPool, keyspace: Keyspace, tmp_path: Path
) -> AsyncIterator[tuple[str, VolumeStore]]:
    """A volume owned and mounted writable on ho-a, in the handoff phase of a move to ho-b,
    its snapshot ferry-1-1 pre-copied."""
    name = f"ho-{secrets.token_hex(3)}"
    store = VolumeStore(PoolRoot(pool.name), tmp_path)
    await store.ensure_root()
    spec = VolumeSpec(name=name, size_bytes=SIZE, node="ho-b")
    await store.create(name, SIZE, "off", "")
    await store.activate(spec)
    await store.ensure_mounted(name)
    await keyspace.create_volume(spec)
    assert await keyspace.claim_owner(name, "ho-a")
    await store.take_snapshot(name, 1)
    move = Move(volume=name, source="ho-a", target="ho-b", phase=MovePhase.HANDOFF)
    assert await keyspace.put_move(move, None)
    yield name, store
    await keyspace.purge_volume(name)


async def handoff(keyspace: Keyspace, store: VolumeStore, name: str, target: FakePeer) -> None:
    with pytest.raises(TransferFailed):
        mounts = DockerMounts(store.mountpoint(name).parent / "state" / "docker-mounts.json")
        await MoveDriver("ho-a", keyspace, PoolStore(store, mounts), _connect(target)).run(name)


async def test_a_stream_failing_after_the_freeze_thaws_the_source(
    keyspace: Keyspace, source: tuple[str, VolumeStore], tmp_path: Path
) -> None:
    name, store = source
    await handoff(keyspace, store, name, await cut_off(keyspace, source, answers=True))
    taken = [ref.name for ref in await store.snapshots(name) or []]
    assert taken == ["ferry-1-1", "ferry-1-2"], "the handoff froze it and took a final snapshot"
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
    await handoff(keyspace, store, name, await cut_off(keyspace, source, answers=False))
    taken = [ref.name for ref in await store.snapshots(name) or []]
    assert taken == ["ferry-1-1"], "no final snapshot: writes were never stopped"
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
        PoolStore(store, DockerMounts(tmp_path / "mounts.json")),
        _connect(await cut_off(keyspace, source, answers=True)),
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


def _connect(target: FakePeer) -> Callable[[str], Awaitable[Peer]]:
    async def connect(_node: str) -> Peer:
        return target

    return connect


async def _until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the hung command was never killed"
        await asyncio.sleep(0.2)
