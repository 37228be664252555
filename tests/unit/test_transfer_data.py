"""Data connection admission on loopback sockets: only a live ticket, once, from its host.

Encrypted connections also need the sender's certificate from the cluster CA.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent.transfer import data
from agent.transfer.data import DataListener, peer_host
from agent.transfer.secure import (
    FRAME_BYTES,
    KEY_BYTES,
    TAG_BYTES,
    FrameCipher,
    SecureStream,
    StreamCut,
    stream_context,
)
from ferry.security import ca
from ferry.security.tls import TlsFiles


@pytest.fixture
async def listener() -> AsyncIterator[DataListener]:
    server = DataListener("127.0.0.1", 0, None)
    await server.start()
    yield server
    await server.close()


async def _dial(port: int, payload: bytes, source: str = "127.0.0.1") -> socket.socket:
    def dial() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        sock.sendall(payload)
        return sock

    return await asyncio.to_thread(dial)


async def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the other end closed the connection without sending anything."""

    def read() -> bytes:
        sock.settimeout(5)
        try:
            return sock.recv(1)
        except ConnectionResetError:
            return b""

    return await asyncio.to_thread(read) == b""


async def test_a_ticket_admits_one_connection_and_the_stream_after_its_token(
    listener: DataListener,
) -> None:
    ticket = listener.expect("127.0.0.1", "ct-send", encrypted=False)
    stream = secrets.token_bytes(300_000)
    sender = await data.connect("127.0.0.1", listener.port, ticket.token)
    received = await ticket.connection()
    assert isinstance(received, socket.socket)
    with sender, received:
        sending = asyncio.create_task(asyncio.to_thread(sender.sendall, stream))
        arrived = await asyncio.to_thread(received.recv, len(stream), socket.MSG_WAITALL)
        await sending
        assert arrived == stream
        for _ in range(50):
            if data.stream_bytes_acked(sender) == len(stream):
                break
            await asyncio.sleep(0.05)
        assert data.stream_bytes_acked(sender) == len(stream)
        sender.shutdown(socket.SHUT_WR)
        assert await asyncio.to_thread(received.recv, 1) == b""
        assert data.stream_bytes_received(received) == len(stream)

    again = await _dial(listener.port, ticket.token)
    with again:
        assert await _closed_by_peer(again)


async def test_a_wrong_token_is_closed_and_the_ticket_still_waits(listener: DataListener) -> None:
    ticket = listener.expect("127.0.0.1", "ct-send", encrypted=False)
    forged = await _dial(listener.port, secrets.token_bytes(data.TOKEN_BYTES) + b"stream")
    with forged:
        assert await _closed_by_peer(forged)
    assert not ticket.arrived.done()
    genuine = await data.connect("127.0.0.1", listener.port, ticket.token)
    assert isinstance(await ticket.connection(), socket.socket)
    genuine.close()


async def test_a_ticket_is_refused_from_another_address(listener: DataListener) -> None:
    ticket = listener.expect("127.0.0.1", "ct-send", encrypted=False)
    elsewhere = await _dial(listener.port, ticket.token, source="127.0.0.2")
    with elsewhere:
        assert await _closed_by_peer(elsewhere)
    assert not ticket.arrived.done()


async def test_a_discarded_ticket_admits_nothing(listener: DataListener) -> None:
    ticket = listener.expect("127.0.0.1", "ct-send", encrypted=False)
    listener.discard(ticket)
    late = await _dial(listener.port, ticket.token)
    with late:
        assert await _closed_by_peer(late)


async def test_pump_cut_by_cancellation_ends_the_blocked_work(listener: DataListener) -> None:
    ticket = listener.expect("127.0.0.1", "ct-send", encrypted=False)
    sender = await data.connect("127.0.0.1", listener.port, ticket.token)
    received = await ticket.connection()
    assert isinstance(received, socket.socket)
    with sender, received:
        seen: list[bytes] = []

        def read_all(fd: int) -> None:
            with socket.socket(fileno=socket.dup(fd)) as sock:
                while piece := sock.recv(4096):
                    seen.append(piece)

        pumping = asyncio.create_task(data.pump(read_all, received))
        await asyncio.sleep(0.2)
        pumping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(pumping, 5)
        assert seen == []


@pytest.mark.parametrize(
    ("grpc_peer", "host"),
    [
        ("ipv4:10.212.0.2:50312", "10.212.0.2"),
        ("ipv6:[::1]:50312", "::1"),
        ("ipv6:[::ffff:10.0.0.7]:4000", "10.0.0.7"),
    ],
)
def test_peer_host_reads_grpc_peer_strings(grpc_peer: str, host: str) -> None:
    assert peer_host(grpc_peer) == host


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ct-data-pki")
    ca.init(directory)
    for node in ("ct-recv", "ct-send", "ct-other"):
        ca.issue(directory, "node", node, ips=("127.0.0.1",))
    return directory


def _context(pki: Path, node: str, purpose: ssl.Purpose) -> ssl.SSLContext:
    files = TlsFiles(pki / "ca.crt", pki / f"{node}.crt", pki / f"{node}.key")
    return stream_context(files.ssl_context(purpose))


@pytest.fixture
async def tls_listener(pki: Path) -> AsyncIterator[DataListener]:
    context = _context(pki, "ct-recv", ssl.Purpose.CLIENT_AUTH)
    server = DataListener("127.0.0.1", 0, lambda: context)
    await server.start()
    yield server
    await server.close()


async def _refused(stream: SecureStream) -> bool:
    """True when the listener closes the connection (after its TLS alert, if any) in time."""

    def read_to_the_end() -> bool:
        stream.sock.settimeout(5)
        try:
            while stream.sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
        return True

    try:
        return await asyncio.to_thread(read_to_the_end)
    finally:
        stream.close()


def _collect(into: bytearray) -> Callable[[int], None]:
    def read_all(fd: int) -> None:
        with open(fd, "rb", buffering=0, closefd=False) as pipe:
            while piece := pipe.read(1 << 16):
                into.extend(piece)

    return read_all


def _write(payload: bytes) -> Callable[[int], None]:
    def write_all(fd: int) -> None:
        with open(fd, "wb", buffering=0, closefd=False) as pipe:
            pipe.write(payload)

    return write_all


async def test_an_encrypted_ticket_admits_the_senders_certificate(
    tls_listener: DataListener, pki: Path
) -> None:
    ticket = tls_listener.expect("127.0.0.1", "ct-send", encrypted=True)
    client = _context(pki, "ct-send", ssl.Purpose.SERVER_AUTH)
    sender = await data.connect_tls("127.0.0.1", tls_listener.port, ticket.token, client, "ct-recv")
    received = await ticket.connection()
    assert isinstance(received, SecureStream)
    assert "GCM" in received.cipher and received.version == "TLSv1.3"
    payload = secrets.token_bytes(3_000_000)
    seen = bytearray()
    with sender.sock, received.sock:
        await asyncio.gather(sender.send(_write(payload)), received.receive(_collect(seen)))
    assert bytes(seen) == payload
    assert sender.relayed == received.relayed == len(payload)


async def test_an_encrypted_stream_cut_before_its_end_fails_the_receiver(
    tls_listener: DataListener, pki: Path
) -> None:
    """Without the end frame the receiver must not take what came as the whole stream."""
    ticket = tls_listener.expect("127.0.0.1", "ct-send", encrypted=True)
    client = _context(pki, "ct-send", ssl.Purpose.SERVER_AUTH)
    sender = await data.connect_tls("127.0.0.1", tls_listener.port, ticket.token, client, "ct-recv")
    received = await ticket.connection()
    assert isinstance(received, SecureStream)

    def fail_midway(fd: int) -> None:
        _write(b"x" * 500_000)(fd)
        raise RuntimeError("zfs send failed")

    seen = bytearray()
    with sender.sock, received.sock:
        sending, receiving = await asyncio.gather(
            sender.send(fail_midway), received.receive(_collect(seen)), return_exceptions=True
        )
    assert isinstance(sending, RuntimeError)
    assert isinstance(receiving, ssl.SSLError | OSError)


async def test_an_encrypted_ticket_refuses_another_nodes_certificate(
    tls_listener: DataListener, pki: Path
) -> None:
    ticket = tls_listener.expect("127.0.0.1", "ct-send", encrypted=True)
    other = _context(pki, "ct-other", ssl.Purpose.SERVER_AUTH)
    impostor = await data.connect_tls(
        "127.0.0.1", tls_listener.port, ticket.token, other, "ct-recv"
    )
    assert await _refused(impostor)
    assert not ticket.arrived.done()


async def test_the_kind_of_connection_must_match_the_ticket(
    tls_listener: DataListener, pki: Path
) -> None:
    encrypted = tls_listener.expect("127.0.0.1", "ct-send", encrypted=True)
    plain = await _dial(tls_listener.port, encrypted.token)
    with plain:
        assert await _closed_by_peer(plain)
    unencrypted = tls_listener.expect("127.0.0.1", "ct-send", encrypted=False)
    client = _context(pki, "ct-send", ssl.Purpose.SERVER_AUTH)
    wrapped = await data.connect_tls(
        "127.0.0.1", tls_listener.port, unencrypted.token, client, "ct-recv"
    )
    assert await _refused(wrapped)
    assert not encrypted.arrived.done() and not unencrypted.arrived.done()


async def test_a_listener_without_tls_cannot_expect_encrypted_streams(
    listener: DataListener,
) -> None:
    with pytest.raises(ValueError, match="--insecure"):
        listener.expect("127.0.0.1", "ct-send", encrypted=True)


async def test_a_data_port_in_use_says_which_flag_moves_it(listener: DataListener) -> None:
    second = DataListener("127.0.0.1", listener.port, None)
    with pytest.raises(OSError, match="--data-port"):
        await second.start()


def _sealed(cipher: FrameCipher, plain: bytes) -> tuple[bytes, bytes]:
    frame = memoryview(bytearray(4 + len(plain) + TAG_BYTES))
    size = cipher.seal_into(memoryview(plain), frame)
    return bytes(frame[:4]), bytes(frame[4:size])


def _opened(cipher: FrameCipher, header: bytes, sealed: bytes) -> bytes:
    plain = memoryview(bytearray(FRAME_BYTES))
    count = cipher.open_into(header, memoryview(sealed), plain)
    return bytes(plain[:count])


def test_a_frame_altered_reordered_or_from_another_key_fails_its_check() -> None:
    key = secrets.token_bytes(KEY_BYTES)
    sender = FrameCipher(key)
    first, second = _sealed(sender, b"first frame"), _sealed(sender, b"second")
    assert _opened(FrameCipher(key), *first) == b"first frame"

    flipped = bytes([first[1][0] ^ 1]) + first[1][1:]
    resized = ((len(first[1]) + 1).to_bytes(4, "big"), first[1])
    for header, sealed in ((first[0], flipped), second, resized):
        with pytest.raises(StreamCut, match="failed its check"):
            _opened(FrameCipher(key), header, sealed)
    with pytest.raises(StreamCut, match="failed its check"):
        _opened(FrameCipher(secrets.token_bytes(KEY_BYTES)), *first)
    with pytest.raises(StreamCut, match="announces"):
        FrameCipher.sealed_length((FRAME_BYTES + TAG_BYTES + 1).to_bytes(4, "big"))
