"""The asyncio stream helpers on real pools: send_chunks into receive_chunks between two pools."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent import zfs
from agent.zfs.streams import receive_chunks, send_chunks
from tests.support.files import write_random
from tests.support.pools import ScratchPool, pool_fixture

pytestmark = pytest.mark.integration


src = pool_fixture("zt", scope="module")
dst = pool_fixture("zt", scope="module")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def zfs_processes(pool: str) -> str:
    found = subprocess.run(
        ["pgrep", "-af", f"zfs (send|receive) .*{pool}/"], capture_output=True, text=True
    )
    return found.stdout


def source_with_two_snapshots(src: ScratchPool, name: str) -> tuple[bytes, Path]:
    dataset = src.dataset(name)
    zfs.lzc_create(dataset, props={"compression": "off"})
    write_random(src.path(name, "f"), 3 << 20)
    zfs.lzc_snapshot([dataset + b"@s1"])
    write_random(src.path(name, "f"), 3 << 20)
    zfs.lzc_snapshot([dataset + b"@s2"])
    return dataset, src.path(name, "f")


async def test_full_then_incremental_between_pools(src: ScratchPool, dst: ScratchPool) -> None:
    source, source_file = source_with_two_snapshots(src, "both")
    target = dst.dataset("both")
    full = await receive_chunks(target + b"@s1", send_chunks(source + b"@s1"))
    incremental = await receive_chunks(
        target + b"@s2", send_chunks(source + b"@s2", source + b"@s1")
    )
    assert full > 3 << 20 and incremental > 3 << 20
    assert zfs.lzc_list_snaps(target) == [target + b"@s1", target + b"@s2"]
    assert zfs.lzc_get_props(target)["mounted"] == "no"
    zfs.lzc_set_prop(target, "readonly", "on")
    zfs.zfs_mount(target)
    assert digest(dst.path("both", "f")) == digest(source_file)


async def test_chunks_have_the_requested_size(src: ScratchPool) -> None:
    source, _ = source_with_two_snapshots(src, "sizes")
    sizes = [len(chunk) async for chunk in send_chunks(source + b"@s1", chunk_size=256 << 10)]
    assert set(sizes[:-1]) == {256 << 10}
    assert 0 < sizes[-1] <= 256 << 10


async def test_a_consumer_that_stops_early_stops_the_send(src: ScratchPool) -> None:
    source, _ = source_with_two_snapshots(src, "early")
    stream = send_chunks(source + b"@s1", chunk_size=64 << 10)
    async for _ in stream:
        break
    await stream.aclose()
    for _ in range(50):
        if not zfs_processes(src.name):
            break
        await asyncio.sleep(0.1)
    assert zfs_processes(src.name) == ""
    whole = sum([len(chunk) async for chunk in send_chunks(source + b"@s1")])
    assert whole > 3 << 20


async def test_a_failing_send_raises_at_the_end(src: ScratchPool) -> None:
    with pytest.raises(zfs.DatasetNotFound):
        async for _ in send_chunks(src.dataset("missing") + b"@s1"):
            pass


async def test_a_producer_that_fails_leaves_the_target_as_it_was(
    src: ScratchPool, dst: ScratchPool
) -> None:
    source, _ = source_with_two_snapshots(src, "cut")
    target = dst.dataset("cut")
    await receive_chunks(target + b"@s1", send_chunks(source + b"@s1"))
    guid = zfs.lzc_get_props(target)["guid"]

    async def cut_after(limit: int, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in chunks:
            yield chunk
            sent += len(chunk)
            if sent >= limit:
                raise ConnectionError("sender went away")

    for force in (False, True):
        with pytest.raises(ConnectionError):
            await receive_chunks(
                target + b"@s2",
                cut_after(1 << 20, send_chunks(source + b"@s2", source + b"@s1", 256 << 10)),
                force=force,
            )
        assert zfs.lzc_list_snaps(target) == [target + b"@s1"]
        assert zfs.lzc_get_props(target)["guid"] == guid

    with pytest.raises(ConnectionError):
        await receive_chunks(
            dst.dataset("cut-new") + b"@s1", cut_after(1 << 20, send_chunks(source + b"@s1"))
        )
    assert not zfs.lzc_exists(dst.dataset("cut-new"))
    assert zfs_processes(dst.name) == ""


async def test_a_garbage_stream_is_refused(dst: ScratchPool) -> None:
    async def garbage() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield os.urandom(256 << 10)

    with pytest.raises(zfs.ZFSError):
        await receive_chunks(dst.dataset("garbage") + b"@s1", garbage())
    assert not zfs.lzc_exists(dst.dataset("garbage"))


async def test_the_event_loop_keeps_running_during_a_transfer(
    src: ScratchPool, dst: ScratchPool
) -> None:
    """No stretch of the transfer holds the loop: the longest wait between two ticks is a
    small part of it. (A count of ticks against the ideal rate failed on a slow, emulated
    CPU although nothing blocked: 257 of 555.) A send or receive run on the loop would
    show one wait as long as the transfer."""
    source = src.dataset("loop")
    zfs.lzc_create(source, props={"compression": "off"})
    write_random(src.path("loop", "f"), 12 << 20)
    zfs.lzc_snapshot([source + b"@s1"])
    loop = asyncio.get_running_loop()
    ticks: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            ticks.append(loop.time())
            await asyncio.sleep(0.005)

    ticker = asyncio.create_task(tick())
    started = loop.time()
    await receive_chunks(dst.dataset("loop") + b"@s1", send_chunks(source + b"@s1"))
    elapsed = loop.time() - started
    done.set()
    await ticker
    assert len(ticks) >= 3
    longest_wait = max(later - earlier for earlier, later in itertools.pairwise(ticks))
    assert longest_wait < elapsed / 2
