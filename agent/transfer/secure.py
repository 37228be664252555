"""Encrypted data connections: mutual TLS 1.3 to meet, AES-256-GCM frames to move the stream.

TLS authenticates both ends (the receiver checks that the client certificate
names the sender), carries the ticket's token, and then carries the stream
key: KEY_BYTES random bytes the receiver draws for this one connection. The
stream then moves on the same TCP connection as AES-256-GCM frames of up to
FRAME_BYTES each. TLS's own records are 16 KiB: relaying them cost each side
twice the CPU of these frames, on cores that ``zfs`` needs (docs/decisions.md,
"Transfer"). This kernel has no kernel TLS, so the agent relays either way.

A frame is a 4-byte big-endian length (of what follows) and the sealed
payload: ciphertext and a 16-byte tag. The nonce is the frame's number (a
96-bit counter from 0) and the length is the associated data, so a frame
altered, resized, dropped, repeated or reordered on the way fails its tag. The
key is fresh for every connection and never leaves TLS, so no nonce repeats
under a key and no frame of another connection fits. The stream ends with an
empty frame, sent only after ``zfs send`` succeeded: any other end is a cut
(StreamCut), ``zfs receive`` then sees a truncated stream and leaves its copy
as it was.

The relay keeps all this off the event loop: ``zfs`` works on one end of an
8 MiB socket pair and a thread of its own moves whole frames between it and
the connection (one system call per frame each way; socket calls and
AES-GCM run without the GIL). The receiving side shakes hands on the event
loop without blocking, so connections that never finish their handshake cost
no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from io import RawIOBase

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.zfs import runner
from ferry.security.tls import certificate_name

FRAMES = 1
"""The encrypted stream format this module speaks (``StreamHeader.encrypted_format``)."""
FRAME_BYTES = 1 << 20
KEY_BYTES = 32
TAG_BYTES = 16
_LENGTH = struct.Struct(">I")
_NONCE_BYTES = 12
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


class StreamCut(ConnectionError):
    """The encrypted stream ended before its end frame, or a frame failed its check."""


class FrameCipher:
    """AES-256-GCM over numbered frames: one direction of one connection, one key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._number = 0

    def _nonce(self) -> bytes:
        nonce = self._number.to_bytes(_NONCE_BYTES, "big")
        self._number += 1
        return nonce

    def seal_into(self, plain: memoryview, frame: memoryview) -> int:
        """The next frame, of ``plain`` (at most FRAME_BYTES), into ``frame``; its length."""
        sealed = len(plain) + TAG_BYTES
        _LENGTH.pack_into(frame, 0, sealed)
        header = bytes(frame[: _LENGTH.size])
        end = _LENGTH.size + sealed
        self._aead.encrypt_into(self._nonce(), plain, header, frame[_LENGTH.size : end])
        return end

    @staticmethod
    def sealed_length(header: bytes) -> int:
        """The length a frame's header announces; StreamCut if no frame can be that long."""
        (sealed,) = _LENGTH.unpack(header)
        if not TAG_BYTES <= sealed <= FRAME_BYTES + TAG_BYTES:
            raise StreamCut(f"a frame of the encrypted stream announces {sealed} bytes")
        return int(sealed)

    def open_into(self, header: bytes, sealed: memoryview, plain: memoryview) -> int:
        """The next frame's plain bytes into ``plain``; their count (0: the end frame)."""
        count = len(sealed) - TAG_BYTES
        try:
            self._aead.decrypt_into(self._nonce(), sealed, header, plain[:count])
        except InvalidTag as error:
            raise StreamCut(
                "a frame of the encrypted stream failed its check: altered, dropped or "
                "reordered on the way"
            ) from error
        return count


class SecureStream:
    """An admitted encrypted data connection; ``relayed`` counts stream bytes moved so far.

    TLS runs on memory buffers (``ssl.MemoryBIO``) for the handshake, the
    token and the stream key; the stream itself moves as frames (FrameCipher).
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
        self._frames: FrameCipher | None = None

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
        """Blocking: send ``data`` inside TLS."""
        self._tls.write(data)
        self.sock.sendall(self._outgoing.read())

    async def send(self, work: Callable[[int], None]) -> None:
        """``work`` writes the stream into a channel; it goes onto the connection in frames.

        The end frame follows only if ``work`` succeeded; otherwise the
        connection is cut and ``work``'s error raised. Cancelled, the
        connection is cut, both threads are awaited, and CancelledError raised.
        """
        read_fd, write_fd = _channel()
        await self._run(_closing(work, write_fd), _closing(self._encrypt_from, read_fd))
        await asyncio.to_thread(self._end)

    async def receive(self, work: Callable[[int], None]) -> None:
        """The stream, checked frame by frame, goes into a channel that ``work`` reads."""
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
        """Exactly ``size`` bytes from inside TLS, on the event loop."""
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

    def _read_exactly_blocking(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            try:
                piece = self._tls.read(size - len(data))
            except ssl.SSLWantReadError:
                self._take(self.sock.recv(HANDSHAKE_READ_BYTES))
                continue
            if not piece:
                raise StreamCut("the receiver ended TLS before it sent the stream key")
            data += piece
        return data

    def _take(self, piece: bytes) -> None:
        if not piece:
            raise StreamCut("connection closed before the stream began")
        self._incoming.write(piece)

    def _encrypt_from(self, read_fd: int) -> None:
        """Wait for the receiver's key, then seal whole frames of what ``zfs send`` wrote."""
        frames = FrameCipher(self._read_exactly_blocking(KEY_BYTES))
        plain = memoryview(bytearray(FRAME_BYTES))
        frame = memoryview(bytearray(_LENGTH.size + FRAME_BYTES + TAG_BYTES))
        with open(read_fd, "rb", buffering=0, closefd=False) as source:
            while count := _fill(source, plain):
                self.sock.sendall(frame[: frames.seal_into(plain[:count], frame)])
                self.relayed += count
        self._frames = frames

    def _end(self) -> None:
        """The stream is whole: the end frame, then the end of what this side sends."""
        assert self._frames is not None, "the relay ran"
        frame = memoryview(bytearray(_LENGTH.size + TAG_BYTES))
        self.sock.sendall(frame[: self._frames.seal_into(memoryview(b""), frame)])
        self.sock.shutdown(socket.SHUT_WR)

    def _decrypt_into(self, write_fd: int) -> None:
        """Send a fresh key inside TLS, then open frames into the channel up to the end frame."""
        key = secrets.token_bytes(KEY_BYTES)
        self.write(key)
        frames = FrameCipher(key)
        header = memoryview(bytearray(_LENGTH.size))
        sealed = memoryview(bytearray(FRAME_BYTES + TAG_BYTES))
        plain = memoryview(bytearray(FRAME_BYTES))
        while True:
            self._receive_exactly(header)
            announced = bytes(header)
            size = frames.sealed_length(announced)
            self._receive_exactly(sealed[:size])
            count = frames.open_into(announced, sealed[:size], plain)
            if count == 0:
                return
            _write_all(write_fd, plain[:count])
            self.relayed += count

    def _receive_exactly(self, view: memoryview) -> None:
        """Fill ``view`` from the connection, one call for a whole frame as a rule."""
        filled = 0
        while filled < len(view):
            count = self.sock.recv_into(view[filled:], 0, socket.MSG_WAITALL)
            if not count:
                raise StreamCut(
                    f"the encrypted stream was cut after {self.relayed} bytes, before its end"
                )
            filled += count


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


def _fill(source: RawIOBase, view: memoryview) -> int:
    """Read until ``view`` is full or the source ends: whole frames, a short one only last."""
    filled = 0
    while filled < len(view) and (count := source.readinto(view[filled:])):
        filled += count
    return filled


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
