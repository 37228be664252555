"""Throughput of ``send_chunks`` next to ``zfs send > /dev/null``, alternating runs, same pool.

Run as ``python -m tests.bench.bench_zfs_send [--mib 512] [--runs 5]`` (root,
zfs-fuse or kernel ZFS up). Creates a scratch pool ``zt-<random>`` on a
sparse file, fills a dataset with incompressible data, then alternates the
two readers and prints their medians in MB/s, the ratio and the zfsrc
settings in effect (zfs-fuse's ARC size decides how much comes from cache).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from agent import zfs
from agent.zfs.streams import CHUNK_BYTES, send_chunks
from tests.support.pools import scratch_pool

ZFSRC = Path("/etc/zfs/zfsrc")
WRITE_BLOCK = 4 << 20


def fill(directory: Path, total_bytes: int) -> None:
    """Write ``total_bytes`` of random (incompressible) data into files of 64 MiB."""
    written = 0
    index = 0
    while written < total_bytes:
        size = min(64 << 20, total_bytes - written)
        with (directory / f"data-{index}").open("wb") as out:
            for offset in range(0, size, WRITE_BLOCK):
                out.write(os.urandom(min(WRITE_BLOCK, size - offset)))
        written += size
        index += 1


def command_to_devnull(snapshot: bytes) -> None:
    """``zfs send`` straight into /dev/null, the baseline."""
    with open("/dev/null", "wb") as sink:
        subprocess.run(["zfs", "send", snapshot.decode()], stdout=sink, check=True)


async def async_reader(snapshot: bytes, chunk_size: int) -> int:
    """Every chunk of ``send_chunks`` read by a coroutine and dropped; returns the bytes seen."""
    total = 0
    async for chunk in send_chunks(snapshot, chunk_size=chunk_size):
        total += len(chunk)
    return total


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def zfsrc_settings() -> str:
    if not ZFSRC.exists():
        return "no /etc/zfs/zfsrc (kernel ZFS or zfs-fuse defaults)"
    lines = [line.strip() for line in ZFSRC.read_text().splitlines()]
    return ", ".join(line for line in lines if line and not line.startswith("#"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="dataset size in MiB")
    parser.add_argument("--runs", type=int, default=5, help="runs of each reader")
    parser.add_argument("--chunk-mib", type=int, default=CHUNK_BYTES >> 20)
    args = parser.parse_args()
    chunk_size = args.chunk_mib << 20

    with scratch_pool("zt", size_bytes=(args.mib << 20) * 2 + (512 << 20)) as pool:
        dataset = pool.dataset("bench")
        zfs.lzc_create(dataset)
        start = time.perf_counter()
        fill(pool.path("bench"), args.mib << 20)
        write_seconds = time.perf_counter() - start
        snapshot = dataset + b"@bench"
        zfs.lzc_snapshot([snapshot])
        stream_bytes = asyncio.run(async_reader(snapshot, chunk_size))

        command_seconds: list[float] = []
        async_seconds: list[float] = []
        for _ in range(args.runs):
            command_seconds.append(timed(lambda: command_to_devnull(snapshot)))
            async_seconds.append(timed(lambda: asyncio.run(async_reader(snapshot, chunk_size))))

    def rate(seconds: list[float]) -> float:
        return stream_bytes / statistics.median(seconds) / 1e6

    print(f"backend: {zfs.backend_name()}  features: {zfs.features()}")
    print(f"zfsrc: {zfsrc_settings()}")
    print(f"data written: {args.mib} MiB at {(args.mib << 20) / write_seconds / 1e6:.0f} MB/s")
    print(f"stream: {stream_bytes} bytes, chunk {args.chunk_mib} MiB, {args.runs} runs each")
    print(f"zfs send > /dev/null   median {rate(command_seconds):7.1f} MB/s")
    print(f"send_chunks (asyncio)  median {rate(async_seconds):7.1f} MB/s")
    print(f"ratio asyncio/devnull  {rate(async_seconds) / rate(command_seconds):.2f}")


if __name__ == "__main__":
    main()
