"""Snapshot streams for a descriptor: what a transfer hands to its data connection.

``SnapshotStream.write_to`` runs the backend's ``lzc_send`` into a descriptor
and ``SnapshotReceive.read_from`` its ``lzc_receive`` from one, both
blocking (the transfer runs them in worker threads, ``agent.transfer``). A
receive from a stream cut short fails and leaves its target's snapshots as
they were; where ZFS has resumable receive (kernel OpenZFS) it also keeps
what arrived, and ``ResumedStream`` (``zfs send -t``) sends only the rest.
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


NEGOTIATED_FEATURES = frozenset({"compress", "large_blocks"})
"""Stream features a sender uses where the receiver says it takes them: blocks as they are
compressed on disk (``zfs send -c``) and records over 128 KiB whole (``-L``)."""


def stream_features() -> frozenset[str]:
    """The negotiated features this ZFS sends, and so receives (zfs-fuse: none)."""
    return zfs.features().send_flags & NEGOTIATED_FEATURES


@dataclass(frozen=True)
class SnapshotStream:
    """The send stream of ``snapshot`` (incremental from ``base``, a snapshot or bookmark),
    for a descriptor, sent with ``flags`` (pyzfs's names: ``compress``, ``large_blocks``)."""

    snapshot: bytes
    base: bytes | None
    flags: tuple[str, ...] = ()

    def write_to(self, fd: int) -> None:
        """Blocking: the whole stream into ``fd``."""
        zfs.lzc_send(self.snapshot, self.base, fd, list(self.flags) or None)


@dataclass(frozen=True)
class ResumedStream:
    """The rest of a cut stream, from where its receiver's resume ``token`` says it stopped."""

    token: str

    def write_to(self, fd: int) -> None:
        """Blocking: the rest of the stream into ``fd``."""
        zfs.send_resume(self.token, fd)


OutgoingStream = SnapshotStream | ResumedStream
"""What a sender writes into a data connection: a whole stream or the rest of a cut one."""


@dataclass(frozen=True)
class SnapshotReceive:
    """A receive into exactly ``snapshot``, unmounted, never forced, from a descriptor;
    resumable where ZFS can (a cut leaves what arrived, for the rest to continue)."""

    snapshot: bytes

    def read_from(self, fd: int) -> None:
        """Blocking: the whole stream (or the rest of a cut one) from ``fd``; ZFS refuses a copy
        modified since the base."""
        if zfs.features().resumable_receive:
            zfs.lzc_receive_resumable(self.snapshot, fd)
        else:
            zfs.lzc_receive(self.snapshot, fd)
