"""Stream ``zfs send`` into a coroutine and a coroutine into ``zfs receive``, without blocking.

Both ends use the backend's ``lzc_send``/``lzc_receive`` on one end of an
OS pipe in a worker thread, and asyncio on the other end. Pipes are enlarged
to 1 MiB so the sender is rarely stalled by the event loop. Closing our end
early stops the other side: a consumer that stops reading makes
``zfs send`` fail on a broken pipe; a producer that fails mid-stream makes
``zfs receive`` see a truncated stream, which ZFS rejects and leaves the
target as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass, field

from agent import zfs
from agent.zfs import runner
from agent.zfs.names import Name

CHUNK_BYTES = 1 << 20
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031


def _pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_BYTES)
    return read_fd, write_fd


@dataclass
class _Moved:
    """Bytes the loop's end of a pipe has passed so far (the stream command's progress), and
    the loop's word that it gave up on the stream (the runner then kills the command)."""

    bytes: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def probe(self) -> int:
        return self.bytes


def _send_then_close(snapname: Name, fromsnap: Name | None, write_fd: int, moved: _Moved) -> None:
    try:
        with runner.watching(moved.probe, moved.stop):
            zfs.lzc_send(snapname, fromsnap, write_fd)
    finally:
        os.close(write_fd)


def _receive_then_close(snapname: Name, read_fd: int, force: bool, moved: _Moved) -> None:
    try:
        with runner.watching(moved.probe, moved.stop):
            zfs.lzc_receive(snapname, read_fd, force=force)
    finally:
        os.close(read_fd)


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


async def send_chunks(
    snapname: Name, fromsnap: Name | None = None, chunk_size: int = CHUNK_BYTES
) -> AsyncGenerator[bytes, None]:
    """The send stream of ``snapname`` (incremental from ``fromsnap``) in chunks of ``chunk_size``.

    The last chunk may be shorter. Reads are non-blocking ``os.read`` calls
    on the event loop (a full pipe is one read, no buffer copying in
    between). Raises the backend's ZFSError at the end if the send failed.
    """
    read_fd, write_fd = _pipe()
    os.set_blocking(read_fd, False)
    moved = _Moved()
    sender = asyncio.ensure_future(
        asyncio.to_thread(_send_then_close, snapname, fromsnap, write_fd, moved)
    )
    try:
        pieces: list[bytes] = []
        pending = 0
        while True:
            try:
                piece = os.read(read_fd, chunk_size - pending)
            except BlockingIOError:
                await readable(read_fd)
                continue
            if piece:
                pieces.append(piece)
                pending += len(piece)
                moved.bytes += len(piece)
            if pending and (pending == chunk_size or not piece):
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces, pending = [], 0
            if not piece:
                break
    finally:
        os.close(read_fd)
        if not sender.done():
            # Stopped early: the send ends on the broken pipe, or is killed if it hangs;
            # wait for it, keep the first error.
            moved.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.shield(sender)
    sender.result()


async def receive_chunks(snapname: Name, chunks: AsyncIterable[bytes], force: bool = False) -> int:
    """Feed ``chunks`` into a receive of exactly ``snapname`` (unmounted); returns the bytes fed.

    If ``chunks`` raises or the caller is cancelled, the pipe is cut without
    flushing: ZFS sees a truncated stream, keeps the target as it was, and the
    exception propagates. If the receive fails, its ZFSError is raised.
    """
    loop = asyncio.get_running_loop()
    read_fd, write_fd = _pipe()
    moved = _Moved()
    receiver = asyncio.ensure_future(
        asyncio.to_thread(_receive_then_close, snapname, read_fd, force, moved)
    )
    # A write-only pipe still needs a stream protocol: it gives the writer drain and close.
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop),
        os.fdopen(write_fd, "wb", 0),
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    total = 0
    try:
        async for chunk in chunks:
            if receiver.done():
                break
            writer.write(chunk)
            await writer.drain()
            total += len(chunk)
            moved.bytes = total
    except (BrokenPipeError, ConnectionResetError):
        _abort(transport)  # zfs receive stopped reading; its own error is raised below
    except BaseException:
        _abort(transport)
        moved.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.shield(receiver)
        raise
    else:
        writer.close()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await writer.wait_closed()
    await receiver
    return total


@dataclass(frozen=True)
class SnapshotStream:
    """The send stream of ``snapshot`` (incremental from ``base``), for a descriptor."""

    snapshot: bytes
    base: bytes | None

    def write_to(self, fd: int) -> None:
        """Blocking: the whole stream into ``fd``."""
        zfs.lzc_send(self.snapshot, self.base, fd)


def _abort(transport: asyncio.WriteTransport) -> None:
    """Cut the pipe without flushing, unless the receiver's exit closed it already."""
    if not transport.is_closing():
        transport.abort()
