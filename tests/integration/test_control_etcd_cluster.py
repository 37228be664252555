"""Ferry against a three-member etcd cluster (client and peer mutual TLS, auth on):
losing the member in use loses nothing."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from aetcd.exceptions import ClientError

from ferry.cluster.keyspace import Keyspace, endpoints_client
from ferry.core.records import VolumeSpec
from ferry.security import ca
from ferry.security.tls import TlsFiles
from tests.support.etcd import EtcdCluster, EtcdServer

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster() -> Iterator[EtcdCluster]:
    with EtcdCluster(size=3) as members:
        yield members


def spec(name: str) -> VolumeSpec:
    return VolumeSpec(name=name, size_bytes=1 << 20, node="ct-n1")


@pytest.mark.parametrize("given_as", ["address", "name"])
async def test_the_keyspace_moves_to_another_member_when_the_first_dies(
    cluster: EtcdCluster, given_as: str
) -> None:
    endpoints = cluster.endpoints
    if given_as == "name":
        endpoints = [endpoint.replace("127.0.0.1", "localhost") for endpoint in endpoints]
    client = await asyncio.to_thread(endpoints_client, endpoints, cluster.certs.etcd_root)
    keyspace = Keyspace(client, prefix="/ct-cluster")
    try:
        await keyspace.create_volume(spec("before"))
        await asyncio.to_thread(cluster.members[0].kill)
        for _ in range(50):
            try:
                await keyspace.create_volume(spec("after"))
                break
            except ClientError:
                await asyncio.sleep(0.2)
        names = sorted(v.value.name for v in await keyspace.list_volumes())
        assert names == ["after", "before"]
    finally:
        await client.close()


def peer_answers(member: EtcdServer, tls: TlsFiles) -> bool:
    """Whether ``member``'s peer port serves a client with ``tls`` (raft's HTTP ``/members``)."""
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.check_hostname = False
    context.load_cert_chain(str(tls.cert), str(tls.key))
    try:
        with urllib.request.urlopen(f"{member.peer_url}/members", context=context, timeout=5):
            return True
    except (OSError, urllib.error.URLError):
        return False


def test_only_a_member_certificate_is_a_peer_not_another_of_the_same_ca(
    cluster: EtcdCluster,
) -> None:
    """A node's certificate, issued for its host's address as real ones are, is valid for the
    cluster CA but does not name ``etcd``: a member refuses it on the peer port, so such a
    host can neither join nor speak raft."""
    name = "ct-peer-intruder"
    ca.issue(cluster.certs.directory, "node", name, ips=("127.0.0.1",))
    intruder = cluster.certs.files(name)
    for member in cluster.members:
        assert peer_answers(member, cluster.certs.etcd_member), "members serve each other"
        assert not peer_answers(member, intruder), f"{member.name} took a node's certificate"
