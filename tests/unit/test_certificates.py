"""Renewed certificates at the same paths: served without a restart, half-written ones not at all.

A real gRPC server with the watch's credentials and a real data listener on
loopback; the certificate each one presents is read by a TLS client.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from agent.transfer.data import DataListener
from agent.transfer.secure import stream_context
from ferry.security import ca, certificates
from ferry.security.certificates import CHECK_SECONDS, CertificateWatch, not_after
from ferry.security.tls import TlsFiles

NODE = "ct-renew"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca.init(tmp_path)
    ca.issue(tmp_path, "node", NODE, ips=("127.0.0.1",))
    ca.issue(tmp_path, "user", "ct-user")
    return tmp_path


def files(pki: Path) -> TlsFiles:
    return TlsFiles(pki / "ca.crt", pki / f"{NODE}.crt", pki / f"{NODE}.key")


def serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def renew(pki: Path, elsewhere: Path) -> None:
    """A new certificate and key for the node from the same CA, written at the same paths."""
    shutil.copy(pki / "ca.crt", elsewhere / "ca.crt")
    shutil.copy(pki / "ca.key", elsewhere / "ca.key")
    ca.issue(elsewhere, "node", NODE, ips=("127.0.0.1",))
    shutil.copy(elsewhere / f"{NODE}.key", pki / f"{NODE}.key")
    shutil.copy(elsewhere / f"{NODE}.crt", pki / f"{NODE}.crt")


async def presented_serial(pki: Path, port: int, alpn: str | None = None) -> int:
    """The serial number of the certificate the server on ``port`` presents."""

    def handshake() -> int:
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "ct-user.crt"), str(pki / "ct-user.key"))
        if alpn:
            context.set_alpn_protocols([alpn])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=NODE) as sock,
        ):
            der = sock.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der).serial_number

    return await asyncio.to_thread(handshake)


@pytest.fixture
async def grpc_port(pki: Path) -> AsyncIterator[tuple[int, CertificateWatch, Clock]]:
    clock = Clock()
    watch = CertificateWatch(files(pki), clock=clock)
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", watch.server_credentials())
    await server.start()
    yield port, watch, clock
    await server.stop(grace=None)


async def test_grpc_serves_a_renewed_certificate_at_the_next_handshake(
    pki: Path,
    tmp_path_factory: pytest.TempPathFactory,
    grpc_port: tuple[int, CertificateWatch, Clock],
) -> None:
    port, watch, clock = grpc_port
    first = serial(pki / f"{NODE}.crt")
    expiry = watch.not_after
    assert await presented_serial(pki, port, "h2") == first
    await asyncio.sleep(1.1)  # the renewal's not-after is a later second
    renew(pki, tmp_path_factory.mktemp("ct-renewal"))
    assert await presented_serial(pki, port, "h2") == first  # not looked at again yet
    clock.now += CHECK_SECONDS
    assert await presented_serial(pki, port, "h2") == serial(pki / f"{NODE}.crt") != first
    assert watch.generation == 1
    assert watch.not_after == not_after((pki / f"{NODE}.crt").read_bytes()) > expiry


async def test_a_half_written_renewal_keeps_the_old_certificate_in_service(
    pki: Path,
    tmp_path_factory: pytest.TempPathFactory,
    grpc_port: tuple[int, CertificateWatch, Clock],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port, watch, clock = grpc_port
    first = serial(pki / f"{NODE}.crt")
    elsewhere = tmp_path_factory.mktemp("ct-renewal")
    shutil.copy(pki / "ca.crt", elsewhere / "ca.crt")
    shutil.copy(pki / "ca.key", elsewhere / "ca.key")
    ca.issue(elsewhere, "node", NODE, ips=("127.0.0.1",))
    shutil.copy(elsewhere / f"{NODE}.crt", pki / f"{NODE}.crt")  # the key is still the old one
    clock.now += CHECK_SECONDS
    with caplog.at_level(logging.WARNING):
        assert await presented_serial(pki, port, "h2") == first
    assert "still serving the previous ones" in caplog.text
    assert watch.generation == 0
    shutil.copy(elsewhere / f"{NODE}.key", pki / f"{NODE}.key")
    clock.now += CHECK_SECONDS
    assert await presented_serial(pki, port, "h2") == serial(elsewhere / f"{NODE}.crt")
    assert watch.generation == 1


async def test_the_data_port_serves_a_renewed_certificate_to_the_next_connection(
    pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    clock = Clock()
    watch = CertificateWatch(files(pki), clock=clock)
    listener = DataListener(
        "127.0.0.1", 0, lambda: watch.context(ssl.Purpose.CLIENT_AUTH, stream_context)
    )
    await listener.start()
    try:
        first = serial(pki / f"{NODE}.crt")
        assert await presented_serial(pki, listener.port) == first
        renew(pki, tmp_path_factory.mktemp("ct-renewal"))
        clock.now += CHECK_SECONDS
        assert await presented_serial(pki, listener.port) == serial(pki / f"{NODE}.crt") != first
    finally:
        await listener.close()


def test_the_start_up_line_warns_when_expiry_is_near(
    pki: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = CertificateWatch(files(pki))
    with caplog.at_level(logging.INFO):
        watch.log_expiry()
    assert [r.levelname for r in caplog.records] == ["INFO"]
    assert "not_after=" in caplog.text
    monkeypatch.setattr(certificates, "NEAR_EXPIRY_SECONDS", 10 * 365 * 86400.0)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        watch.log_expiry()
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "expires soon" in caplog.text and "ferryctl ca issue" in caplog.text
