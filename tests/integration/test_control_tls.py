"""Mutual TLS from the cluster CA on a real gRPC server: who gets in, and who they are."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from ferry.security import ca
from ferry.security.tls import TlsFiles, peer_identity

METHOD = "/ct.Identity/Who"


def _files(trusted: Path, issued: Path, name: str) -> TlsFiles:
    """Trust the CA in ``trusted``; present ``name``'s certificate from ``issued``."""
    return TlsFiles(trusted / "ca.crt", issued / f"{name}.crt", issued / f"{name}.key")


def _raw(data: bytes) -> bytes:
    return data


async def _who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return (peer_identity(context) or "<none>").encode()


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    ca.init(tmp_path)
    ca.issue(tmp_path, "control", "control", ips=("127.0.0.1",))
    ca.issue(tmp_path, "node", "ct-host1", ips=("127.0.0.1",))
    return tmp_path


@pytest.fixture
async def address(cluster: Path) -> AsyncIterator[str]:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        _who, request_deserializer=_raw, response_serializer=_raw
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("ct.Identity", {"Who": handler})]
    )
    credentials = _files(cluster, cluster, "control").server_credentials()
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


async def ask(address: str, credentials: grpc.ChannelCredentials, name: str = "control") -> str:
    options = [("grpc.ssl_target_name_override", name)]
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        call = channel.unary_unary(METHOD, request_serializer=_raw, response_deserializer=_raw)
        reply: bytes = await call(b"", timeout=5)
        return reply.decode()


async def test_the_server_sees_the_node_name_from_the_client_certificate(
    cluster: Path, address: str
) -> None:
    node = _files(cluster, cluster, "ct-host1").channel_credentials()
    assert await ask(address, node) == "ct-host1"


async def test_a_client_without_a_certificate_is_refused(cluster: Path, address: str) -> None:
    anonymous = grpc.ssl_channel_credentials(root_certificates=(cluster / "ca.crt").read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ask(address, anonymous)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_from_another_ca_is_refused(
    cluster: Path, address: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("ct-other-ca")
    ca.init(other)
    ca.issue(other, "node", "ct-host1")
    impostor = _files(cluster, other, "ct-host1").channel_credentials()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ask(address, impostor)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_refuses_a_server_under_another_name(cluster: Path, address: str) -> None:
    node = _files(cluster, cluster, "ct-host1").channel_credentials()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ask(address, node, name="ct-host2")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_missing_files_say_how_to_issue_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="ferryctl ca issue"):
        _files(tmp_path, tmp_path, "control").server_credentials()
