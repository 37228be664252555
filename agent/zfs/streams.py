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
from collections.abc import AsyncIterable, AsyncIterator

from agent import zfs
from agent.zfs.names import Name

CHUNK_BYTES = 1 << 20
PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031


def _pipe() -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_BYTES)
    return read_fd, write_fd


def _send_then_close(snapname: Name, fromsnap: Name | None, write_fd: int) -> None:
    try:
        zfs.lzc_send(snapname, fromsnap, write_fd)
    finally:
        os.close(write_fd)


def _receive_then_close(snapname: Name, read_fd: int, force: bool) -> None:
    try:
        zfs.lzc_receive(snapname, read_fd, force=force)
    finally:
        os.close(read_fd)


async def send_chunks(
    snapname: Name, fromsnap: Name | None = None, chunk_size: int = CHUNK_BYTES
) -> AsyncIterator[bytes]:
    """The send stream of ``snapname`` (incremental from ``fromsnap``) in chunks of ``chunk_size``.

    Raises the backend's ZFSError at the end if ``zfs send`` failed.
    """
    loop = asyncio.get_running_loop()
    read_fd, write_fd = _pipe()
    sender = asyncio.ensure_future(
        asyncio.to_thread(_send_then_close, snapname, fromsnap, write_fd)
    )
    reader = asyncio.StreamReader(limit=2 * chunk_size, loop=loop)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(read_fd, "rb", 0)
    )
    try:
        while True:
            try:
                yield await reader.readexactly(chunk_size)
            except asyncio.IncompleteReadError as end:
                if end.partial:
                    yield end.partial
                break
    finally:
        transport.close()
        # Stopped early: zfs send ends on the broken pipe; wait for it, keep the first error.
        with contextlib.suppress(Exception):
            await asyncio.shield(sender)
    sender.result()


async def receive_chunks(snapname: Name, chunks: AsyncIterable[bytes], force: bool = False) -> int:
    """Feed ``chunks`` into ``zfs receive`` of exactly ``snapname``; returns the bytes received.

    If ``chunks`` raises, the receive is aborted (ZFS sees a truncated stream
    and keeps the target as it was) and the exception propagates. If the
    receive fails, its ZFSError is raised.
    """
    read_fd, write_fd = _pipe()
    receiver = asyncio.ensure_future(
        asyncio.to_thread(_receive_then_close, snapname, read_fd, force)
    )
    total = 0
    try:
        async for chunk in chunks:
            if receiver.done():
                break
            await asyncio.to_thread(_write_all, write_fd, chunk)
            total += len(chunk)
    except BrokenPipeError:
        pass  # zfs receive stopped reading; its own error is raised below
    except BaseException:
        os.close(write_fd)
        with contextlib.suppress(Exception):
            await asyncio.shield(receiver)
        raise
    os.close(write_fd)
    await receiver
    return total


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
