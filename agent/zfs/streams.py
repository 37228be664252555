"""Snapshot streams for a descriptor: what a transfer hands to its data connection.

``SnapshotStream.write_to`` runs the backend's ``lzc_send`` into a descriptor
and ``SnapshotReceive.read_from`` its ``lzc_receive`` from one, both
blocking (the transfer runs them in worker threads, ``agent.transfer``). A
receive from a stream cut short fails and leaves its target as it was.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from agent import zfs


async def readable(fd: int) -> None:
    """Wait until ``fd`` has data or is at end of file."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


@dataclass(frozen=True)
class SnapshotStream:
    """The send stream of ``snapshot`` (incremental from ``base``), for a descriptor."""

    snapshot: bytes
    base: bytes | None

    def write_to(self, fd: int) -> None:
        """Blocking: the whole stream into ``fd``."""
        zfs.lzc_send(self.snapshot, self.base, fd)


@dataclass(frozen=True)
class SnapshotReceive:
    """A receive into exactly ``snapshot``, unmounted, never forced, from a descriptor."""

    snapshot: bytes

    def read_from(self, fd: int) -> None:
        """Blocking: the whole stream from ``fd``; ZFS refuses a copy modified since the base."""
        zfs.lzc_receive(self.snapshot, fd)
