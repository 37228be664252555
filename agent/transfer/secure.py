"""Encrypted data connections: TLS 1.3 with the bytes relayed in threads of their own.

This kernel offers no kernel TLS (``tcp_available_ulp`` lists no ``tls``;
docs/decisions.md), so every byte passes through OpenSSL in user space.
The relay keeps that off the event loop: ``zfs`` works on one end of an
8 MiB socket pair and a thread moves 1 MiB buffers between it and the TLS
socket (TLS on memory buffers, so a MiB is one ``send``); OpenSSL and
socket calls all run without the GIL. TLS 1.3
negotiates AES-256-GCM here (AES-NI: about 3 GB/s a core, far above the
pools' speed).

The end of a stream is TLS's close_notify, sent only after ``zfs send``
succeeded. The receiver takes any other end (a cut, a forged FIN) as a
truncated stream (SSLEOFError): ``zfs receive`` then fails and leaves its
copy as it was.

The receiving side shakes hands on the event loop without blocking, so
connections that never finish their handshake cost no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Callable
from typing import cast

from agent.zfs import runner
from ferry.security.tls import certificate_name

RELAY_BYTES = 1 << 20
# Between ``zfs`` and the relay: deep enough that neither waits while the other is not
# scheduled (a pipe holds at most 1 MiB without CAP_SYS_RESOURCE).
BUFFER_BYTES = 8 << 20
_SO_SNDBUFFORCE = 32
_SO_RCVBUFFORCE = 33
HANDSHAKE_READ_BYTES = 1 << 16


def stream_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """``context`` narrowed for data connections: TLS 1.3 only, no session tickets.

    A ticket the sender never reads would sit in its receive buffer, and a
    close with unread bytes resets the connection under the last data.
    """
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    if context.protocol == ssl.PROTOCOL_TLS_SERVER:
        context.num_tickets = 0
    return context


class SecureStream:
    """An admitted encrypted data connection; ``relayed`` counts stream bytes moved so far.

    TLS runs on memory buffers (``ssl.MemoryBIO``) and the relay moves
    whole buffers through the socket: one ``send`` per MiB of stream and
    ``recv`` calls of up to a MiB, where a TLS socket makes one system call
    or two per 16 KiB record, each a chance to wait for a core.
    """

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, server_side: bool, server_name: str
    ) -> None:
        self.sock = sock
        self.relayed = 0
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_name or None,
        )

    @property
    def cipher(self) -> str:
        found = self._tls.cipher()
        return found[0] if found else ""

    @property
    def version(self) -> str:
        return self._tls.version() or ""

    def peer_name(self) -> str | None:
        return certificate_name(self._tls.getpeercert())  # type: ignore[arg-type]

    def cut(self) -> None:
        """End both directions now, so that a blocked relay returns."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()

    def write(self, data: bytes | memoryview) -> None:
        """Blocking: encrypt ``data`` and send it."""
        self._tls.write(data)
        self.sock.sendall(self._outgoing.read())

    async def send(self, work: Callable[[int], None]) -> None:
        """``work`` writes the stream into a channel; it is encrypted onto the connection.

        close_notify follows only if ``work`` succeeded; otherwise the
        connection is cut and ``work``'s error raised. Cancelled, the
        connection is cut, both threads are awaited, and CancelledError raised.
        """
        read_fd, write_fd = _channel()
        await self._run(_closing(work, write_fd), _closing(self._encrypt_from, read_fd))
        await asyncio.to_thread(self._close_notify)

    async def receive(self, work: Callable[[int], None]) -> None:
        """The decrypted stream goes into a channel that ``work`` reads."""
        read_fd, write_fd = _channel()
        await self._run(_closing(work, read_fd), _closing(self._decrypt_into, write_fd))

    async def _run(self, work: Callable[[], None], relay: Callable[[], None]) -> None:
        """``work`` (the ZFS command) and ``relay`` in threads of their own. The command's
        progress is the bytes relayed; cancelled, the runner kills it at once (a hung
        command notices no cut connection)."""
        stop = threading.Event()

        def watched() -> None:
            with runner.watching(lambda: self.relayed, stop):
                work()

        jobs = asyncio.gather(_in_thread(watched), _in_thread(relay), return_exceptions=True)
        try:
            work_error, relay_error = await asyncio.shield(jobs)
        except asyncio.CancelledError:
            stop.set()
            self.cut()
            with contextlib.suppress(Exception):
                await jobs
            raise
        if work_error is not None:
            self.cut()
            raise work_error
        if relay_error is not None:
            raise relay_error

    def handshake_blocking(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self.sock.sendall(self._outgoing.read())
                self._take(self.sock.recv(HANDSHAKE_READ_BYTES))
                continue
            self.sock.sendall(self._outgoing.read())
            return

    async def handshake(self) -> None:
        """The handshake on the event loop (the socket is non-blocking)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await loop.sock_sendall(self.sock, self._outgoing.read())
                self._take(await loop.sock_recv(self.sock, HANDSHAKE_READ_BYTES))
                continue
            await loop.sock_sendall(self.sock, self._outgoing.read())
            return

    async def read_exactly(self, size: int) -> bytes:
        """Exactly ``size`` bytes, on the event loop; what follows stays for the relay."""
        loop = asyncio.get_running_loop()
        data = b""
        while len(data) < size:
            try:
                piece = self._tls.read(size - len(data))
            except ssl.SSLWantReadError:
                self._take(await loop.sock_recv(self.sock, HANDSHAKE_READ_BYTES))
                continue
            if not piece:  # close_notify
                raise EOFError(f"connection closed after {len(data)} of {size} bytes")
            data += piece
        return data

    def _take(self, piece: bytes) -> None:
        if not piece:
            raise EOFError("connection closed before the stream began")
        self._incoming.write(piece)

    def _encrypt_from(self, read_fd: int) -> None:
        view = memoryview(bytearray(RELAY_BYTES))
        with open(read_fd, "rb", buffering=0, closefd=False) as source:
            while count := source.readinto(view):
                self.write(view[:count])
                self.relayed += count

    def _close_notify(self) -> None:
        """The stream is whole: close_notify, then the end of what this side sends."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self._tls.unwrap()
        self.sock.sendall(self._outgoing.read())
        self.sock.shutdown(socket.SHUT_WR)

    def _decrypt_into(self, write_fd: int) -> None:
        received = memoryview(bytearray(RELAY_BYTES))
        plain = memoryview(bytearray(RELAY_BYTES))
        with contextlib.suppress(OSError):  # wait for a good part of a buffer, not each record
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, RELAY_BYTES // 4)
        while True:
            filled, whole = self._decrypted(plain)
            _write_all(write_fd, plain[:filled])
            self.relayed += filled
            if whole:
                return
            if filled == 0:
                count = self.sock.recv_into(received)
                if count:
                    self._incoming.write(received[:count])
                else:
                    self._incoming.write_eof()

    def _decrypted(self, plain: memoryview) -> tuple[int, bool]:
        """Fill ``plain`` from what arrived; True once close_notify came (the stream is whole).

        An end without close_notify raises SSLEOFError: the stream was cut.
        """
        filled = 0
        while filled < len(plain):
            try:
                # Given a buffer, read() returns a count (typeshed says bytes).
                count = cast(int, self._tls.read(len(plain) - filled, plain[filled:]))
            except ssl.SSLWantReadError:
                return filled, False
            if count == 0:  # close_notify
                return filled, True
            filled += count
        return filled, False


async def dial(
    host: str, port: int, context: ssl.SSLContext, node: str, connect_seconds: float
) -> SecureStream:
    """A TLS connection to ``node`` (its certificate is checked), blocking in a worker thread."""

    def connect() -> SecureStream:
        sock = socket.create_connection((host, port), timeout=connect_seconds)
        try:
            stream = SecureStream(sock, context, server_side=False, server_name=node)
            stream.handshake_blocking()
        except BaseException:
            sock.close()
            raise
        return stream

    return await asyncio.to_thread(connect)


async def accept(conn: socket.socket, context: ssl.SSLContext) -> SecureStream:
    """The server's handshake on a non-blocking socket, on the event loop."""
    stream = SecureStream(conn, context, server_side=True, server_name="")
    await stream.handshake()
    return stream


def _channel() -> tuple[int, int]:
    """A one-way byte channel (read end, write end) holding BUFFER_BYTES: a socket pair
    (``zfs`` reads and writes any descriptor), forced past the default buffer limits where
    this process may, else as large as they allow."""
    reading, writing = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for end, force, plain in (
        (writing, _SO_SNDBUFFORCE, socket.SO_SNDBUF),
        (reading, _SO_RCVBUFFORCE, socket.SO_RCVBUF),
    ):
        try:
            end.setsockopt(socket.SOL_SOCKET, force, BUFFER_BYTES)
        except PermissionError:
            end.setsockopt(socket.SOL_SOCKET, plain, BUFFER_BYTES)
    reading.shutdown(socket.SHUT_WR)
    writing.shutdown(socket.SHUT_RD)
    return reading.detach(), writing.detach()


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _closing(function: Callable[[int], None], fd: int) -> Callable[[], None]:
    def run() -> None:
        try:
            function(fd)
        finally:
            os.close(fd)

    return run


def _in_thread(function: Callable[[], None]) -> asyncio.Future[None]:
    """``function`` in a thread of its own: relays and the ZFS work they feed must never wait
    for a free worker of the shared pool (each waits on the other)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        try:
            function()
        except BaseException as error:
            loop.call_soon_threadsafe(settle, error)
        else:
            loop.call_soon_threadsafe(settle, None)

    threading.Thread(target=run, name="ferry-stream", daemon=True).start()
    return done
