"""The data connection of a transfer: ``zfs send`` bytes over TCP, beside the gRPC call.

Relaying a stream through gRPC messages cost each agent about half a core of
Python and held transfers near half the speed of ``zfs send | zfs receive``
(docs/decisions.md). Here the event loop never touches the bytes. The gRPC
call, under mutual TLS, stays the control channel: it authenticates and
authorizes the sender, hands out a ticket for the data connection, and
carries the result.

A ticket is TOKEN_BYTES random bytes, good for one connection, from the
address that asked for it, within TICKET_SECONDS. A connection that brings
anything else is closed before ``zfs receive`` sees a byte.

By default the data connection is mutual TLS (a ``SecureStream``,
agent.transfer.secure): the token comes after the handshake and the client
certificate must name the sender. With ``--insecure-plain-streams`` it is
plain TCP that ``zfs send`` writes into and ``zfs receive`` reads from
directly. One port serves both: a TLS connection starts with a handshake
record (TLS_HANDSHAKE), and a plain token never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from agent import metrics
from agent.transfer import secure
from agent.transfer.secure import SecureStream
from agent.transfer.unadmitted import SUMMARY_SECONDS, Unadmitted
from agent.zfs import runner
from agent.zfs.streams import readable

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
TLS_HANDSHAKE = 0x16
TICKET_SECONDS = 30.0
TOKEN_READ_SECONDS = 5.0
CONNECT_SECONDS = 10.0
# A cut link fails the socket after this long with data unacknowledged.
USER_TIMEOUT_MS = 15_000

# Linux's struct tcp_info (linux/tcp.h): tcpi_state is its first byte, the
# byte counters are there since 4.1. Sequence numbers count the SYN and the
# FIN as one byte each: the connecting side's acked bytes include its SYN,
# and received bytes include the peer's FIN once it came.
_TCP_INFO_LENGTH = 136
_BYTES_ACKED_AT = 120
_BYTES_RECEIVED_AT = 128
_FIN_RECEIVED_STATES = {6, 8, 9, 11}  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING
_MOVED_AT = (_BYTES_ACKED_AT, _BYTES_RECEIVED_AT)


def host_of(address: str) -> str:
    """The host part of ``HOST:PORT`` or ``[V6]:PORT``."""
    host = address.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


def peer_host(grpc_peer: str) -> str:
    """The client address of a gRPC peer string such as ``ipv4:10.0.0.1:5000``."""
    return _canonical(host_of(grpc_peer.split(":", 1)[1]))


def _canonical(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _fail_fast(sock: socket.socket) -> None:
    """A dead peer or a cut link fails the connection in seconds, not hours."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


def _hand_to_zfs(sock: socket.socket) -> None:
    """Blocking, for the ZFS process that inherits the descriptor."""
    sock.setblocking(True)
    _fail_fast(sock)


def _tcp_info(sock: socket.socket) -> bytes:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LENGTH)
    if len(info) < _TCP_INFO_LENGTH:
        raise OSError(f"this kernel's TCP_INFO has {len(info)} bytes, too old for byte counters")
    return info


def stream_bytes_acked(sock: socket.socket) -> int:
    """Bytes of the stream (after the token) that the receiver acknowledged (after a
    shutdown whose FIN was acknowledged, one more).

    For the connecting side, as ``connect`` makes it.
    """
    (acked,) = struct.unpack_from("=Q", _tcp_info(sock), _BYTES_ACKED_AT)
    return max(int(acked) - 1 - TOKEN_BYTES, 0)


def stream_bytes_received(sock: socket.socket) -> int:
    """Bytes of the stream (after the token) that arrived on this connection."""
    info = _tcp_info(sock)
    (received,) = struct.unpack_from("=Q", info, _BYTES_RECEIVED_AT)
    fin = 1 if info[0] in _FIN_RECEIVED_STATES else 0
    return max(int(received) - fin - TOKEN_BYTES, 0)


async def connect(host: str, port: int, token: bytes) -> socket.socket:
    """Open a data connection and present the ticket's token."""

    def dial() -> socket.socket:
        sock = socket.create_connection((host, port), timeout=CONNECT_SECONDS)
        try:
            _hand_to_zfs(sock)
            sock.sendall(token)
        except BaseException:
            sock.close()
            raise
        return sock

    return await asyncio.to_thread(dial)


DataConnection = socket.socket | SecureStream


async def connect_tls(
    host: str, port: int, token: bytes, context: ssl.SSLContext, node: str
) -> SecureStream:
    """Open an encrypted data connection to ``node`` (its certificate is checked) with the token."""
    stream = await secure.dial(host, port, context, node, CONNECT_SECONDS)
    try:
        _hand_to_zfs(stream.sock)
        await asyncio.to_thread(stream.write, token)
    except BaseException:
        stream.close()
        raise
    return stream


async def pump(work: Callable[[int], None], sock: socket.socket) -> None:
    """Run blocking ZFS ``work`` on the socket's descriptor in a thread.

    Cancelled, it cuts the connection (which ends ``zfs send`` on a broken
    pipe and ``zfs receive`` on a truncated stream, leaving its target as it
    was), has the runner kill the ZFS command (a hung one notices no cut),
    waits for the work to stop, and re-raises.
    """
    stop = threading.Event()
    job = asyncio.ensure_future(asyncio.to_thread(_watched, work, sock, stop))
    try:
        await asyncio.shield(job)
    except asyncio.CancelledError:
        stop.set()
        cut(sock)
        with contextlib.suppress(Exception):
            await job
        raise


def _watched(work: Callable[[int], None], sock: socket.socket, stop: threading.Event) -> None:
    """``work`` on the socket; the ZFS command's progress is the bytes this connection moved,
    and ``stop`` kills it (a hung command does not notice the cut socket)."""

    def moved() -> int:
        info = _tcp_info(sock)
        return sum(struct.unpack_from("=Q", info, at)[0] for at in _MOVED_AT)

    with runner.watching(moved, stop):
        work(sock.fileno())


def cut(sock: socket.socket) -> None:
    """End both directions now, so that a process blocked on the socket returns."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@dataclass
class Ticket:
    """One expected data connection: from ``host``; encrypted, with ``sender``'s certificate."""

    token: bytes
    host: str
    sender: str
    encrypted: bool
    arrived: asyncio.Future[DataConnection] = field(repr=False)

    def admits(self, host: str, identity: str | None) -> bool:
        if self.arrived.done() or host != self.host:
            return False
        return identity == self.sender if self.encrypted else identity is None

    async def connection(self) -> DataConnection:
        """The admitted connection; TimeoutError if the sender did not come in time."""
        return await asyncio.wait_for(asyncio.shield(self.arrived), TICKET_SECONDS)


class DataListener:
    """Accepts data connections and admits each one that brings a live ticket.

    ``tls`` gives the TLS context for each new connection, so a renewed
    certificate serves the next one.
    """

    def __init__(
        self,
        host: str,
        port: int,
        tls: Callable[[], ssl.SSLContext] | None,
        unadmitted: Unadmitted | None = None,
    ) -> None:
        self._address = (host, port)
        self._tls = tls
        self._unadmitted = unadmitted or Unadmitted()
        self._tickets: dict[bytes, Ticket] = {}
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._summarizing: asyncio.Task[None] | None = None
        self._admitting: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._socket is not None, "start() first"
        port: int = self._socket.getsockname()[1]
        return port

    async def start(self) -> None:
        host, port = self._address
        try:
            self._socket = socket.create_server((host or "0.0.0.0", port), backlog=64)
        except OSError as error:
            raise OSError(
                error.errno,
                f"cannot listen for data connections on {host}:{port} ({error.strerror}); "
                "free the port or choose another with --data-port",
            ) from error
        self._socket.setblocking(False)
        self._accepting = asyncio.create_task(self._accept_forever(), name="data-listener")
        self._summarizing = asyncio.create_task(self._summarize_forever(), name="data-summary")
        log.info("data connections: listen=%s:%d", host, self.port)

    async def close(self) -> None:
        tasks = [t for t in (self._accepting, self._summarizing, *self._admitting) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ticket in self._tickets.values():
            ticket.arrived.cancel()
        self._tickets.clear()
        if self._socket is not None:
            self._socket.close()

    def expect(self, host: str, sender: str, encrypted: bool) -> Ticket:
        """A ticket for one connection from ``host``; withdraw it with ``discard`` when done."""
        if encrypted and self._tls is None:
            raise ValueError("encrypted streams need this agent's TLS files; it runs --insecure")
        token = secrets.token_bytes(TOKEN_BYTES)
        while token[0] == TLS_HANDSHAKE:
            token = secrets.token_bytes(TOKEN_BYTES)
        ticket = Ticket(
            token, _canonical(host), sender, encrypted, asyncio.get_running_loop().create_future()
        )
        self._tickets[ticket.token] = ticket
        return ticket

    def discard(self, ticket: Ticket) -> None:
        self._tickets.pop(ticket.token, None)
        if ticket.arrived.done() and not ticket.arrived.cancelled():
            ticket.arrived.result().close()
        else:
            ticket.arrived.cancel()

    async def _accept_forever(self) -> None:
        assert self._socket is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, address = await loop.sock_accept(self._socket)
            except OSError as error:
                log.warning("data connection accept failed: error=%s", error)
                await asyncio.sleep(0.5)
                continue
            host = _canonical(address[0])
            if not self._unadmitted.enter(host):
                conn.close()
                continue
            task = asyncio.create_task(self._admit(conn, host))
            self._admitting.add(task)
            task.add_done_callback(self._admitting.discard)

    async def _summarize_forever(self) -> None:
        while True:
            await asyncio.sleep(SUMMARY_SECONDS)
            self._unadmitted.summarize()

    async def _admit(self, conn: socket.socket, host: str) -> None:
        try:
            await self._admit_or_drop(conn, host)
        finally:
            self._unadmitted.leave(host)

    async def _admit_or_drop(self, conn: socket.socket, host: str) -> None:
        try:
            connection, token, identity = await asyncio.wait_for(
                self._open(conn), TOKEN_READ_SECONDS
            )
        except TimeoutError:
            conn.close()
            self._unadmitted.drop(host, "no_token_in_time")
            return
        except (OSError, EOFError) as error:
            conn.close()
            self._unadmitted.drop(host, "tls_failed" if isinstance(error, ssl.SSLError) else "cut")
            return
        ticket = self._tickets.get(token)
        if ticket is None or not ticket.admits(host, identity):
            log.debug("data connection refused: peer=%s certificate=%s", host, identity)
            connection.close()
            self._unadmitted.drop(host, "no_ticket")
            return
        del self._tickets[token]
        metrics.DATA_ACCEPTED.inc()
        ticket.arrived.set_result(connection)

    async def _open(self, conn: socket.socket) -> tuple[DataConnection, bytes, str | None]:
        """The connection, its token, and the name in its certificate (None when plain)."""
        if self._tls is not None and await _first_byte(conn) == TLS_HANDSHAKE:
            stream = await secure.accept(conn, self._tls())
            try:
                token = await stream.read_exactly(TOKEN_BYTES)
            except BaseException:
                stream.close()
                raise
            _hand_to_zfs(stream.sock)
            return stream, token, stream.peer_name() or ""
        token = await _read_exactly(conn, TOKEN_BYTES)
        _hand_to_zfs(conn)
        return conn, token, None


async def _first_byte(conn: socket.socket) -> int:
    """The first byte waiting on the connection, left there for whoever reads next."""
    while True:
        try:
            peeked = conn.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            await readable(conn.fileno())
            continue
        if not peeked:
            raise EOFError("connection closed before its first byte")
        return peeked[0]


async def _read_exactly(conn: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes and not one more: the rest of the stream is for ``zfs receive``."""
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        piece = await loop.sock_recv(conn, size - len(data))
        if not piece:
            raise EOFError(f"connection closed after {len(data)} of {size} bytes")
        data += piece
    return data
