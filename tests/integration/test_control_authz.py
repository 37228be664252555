"""Authorization by certificate kind on a real ferry-control and etcd (ferry.security.authz).

A node's certificate asks for what its Docker plugin needs (create, move to
itself, remove what its plugin made) and nothing more; a certificate without
a kind is refused with how to reissue it; every mutating call is logged with
who asked.
"""

from __future__ import annotations

import datetime
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ferry.cluster.keyspace import Keyspace
from ferry.security import ca
from ferry.security.tls import TlsFiles
from protos.ferry.v1 import control_pb2, control_pb2_grpc
from tests.support.etcd import ClusterCerts, ControlServer, LiveNodes, ferryctl
from tests.support.metrics import scrape, value

pytestmark = pytest.mark.integration

GIB = 1 << 30
HOSTS = ("az-host1", "az-host2", "az-host3")


@pytest.fixture(scope="module")
def node_certs(certs: ClusterCerts) -> dict[str, TlsFiles]:
    d = certs.directory
    for host in HOSTS:
        ca.issue(d, "node", host)
    ca.issue(d, "control", "az-control")
    return {
        name: TlsFiles(d / "ca.crt", d / f"{name}.crt", d / f"{name}.key")
        for name in (*HOSTS, "az-control")
    }


@pytest.fixture
async def nodes(keyspace: Keyspace) -> AsyncIterator[LiveNodes]:
    live = LiveNodes(keyspace)
    for host in HOSTS:
        await live.add(host, 10 * GIB)
    try:
        yield live
    finally:
        await live.revoke_all()


@pytest.fixture
async def stubs(
    control: ControlServer, certs: ClusterCerts, node_certs: dict[str, TlsFiles]
) -> AsyncIterator[dict[str, control_pb2_grpc.ControlStub]]:
    """A stub per identity: ``admin`` (a user), each host (nodes), ``az-control``."""
    channels = {
        name: grpc.aio.secure_channel(
            control.address,
            tls.channel_credentials(),
            options=[("grpc.ssl_target_name_override", "control")],
        )
        for name, tls in {"admin": certs.admin, **node_certs}.items()
    }
    try:
        yield {name: control_pb2_grpc.ControlStub(c) for name, c in channels.items()}
    finally:
        for open_channel in channels.values():
            await open_channel.close(None)


def unique(base: str) -> str:
    return f"{base}-{secrets.token_hex(3)}"


async def refused(call: object, code: grpc.StatusCode, *phrases: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    assert raised.value.code() == code, raised.value.details()
    details = str(raised.value.details())
    for phrase in phrases:
        assert phrase in details
    return details


async def test_a_node_cannot_delete_a_volume_created_with_ferryctl_but_a_user_can(
    stubs: dict[str, control_pb2_grpc.ControlStub], keyspace: Keyspace, nodes: LiveNodes
) -> None:
    name = unique("az-user")
    create = control_pb2.CreateVolumeRequest(name=name, size="1G", node="az-host1")
    await stubs["admin"].CreateVolume(create, timeout=10)
    assert await keyspace.claim_owner(name, "az-host1")
    delete = control_pb2.DeleteVolumeRequest(name=name)
    for host in HOSTS:
        await refused(
            stubs[host].DeleteVolume(delete, timeout=10),
            grpc.StatusCode.PERMISSION_DENIED,
            "created with ferryctl",
            f"ferryctl volume delete {name}",
        )
    spec = await keyspace.get_volume(name)
    assert spec is not None and not spec.value.deleted
    await stubs["admin"].DeleteVolume(delete, timeout=10)
    spec = await keyspace.get_volume(name)
    assert spec is None or spec.value.deleted, "deleted (and purged at once: no copy exists)"


async def test_a_node_deletes_only_what_its_own_plugin_created_and_never_forced(
    stubs: dict[str, control_pb2_grpc.ControlStub], keyspace: Keyspace, nodes: LiveNodes
) -> None:
    name = unique("az-plugin")
    create = control_pb2.CreateVolumeRequest(name=name, size="1G", node="az-host2")
    await stubs["az-host1"].CreateVolume(create, timeout=10)
    spec = await keyspace.get_volume(name)
    assert spec is not None and spec.value.created_by_node == "az-host1"
    await refused(
        stubs["az-host2"].DeleteVolume(control_pb2.DeleteVolumeRequest(name=name), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED,
        "created by az-host1's Docker plugin",
    )
    await refused(
        stubs["az-host1"].DeleteVolume(
            control_pb2.DeleteVolumeRequest(name=name, force=True), timeout=10
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "may not force a delete",
    )
    spec = await keyspace.get_volume(name)
    assert spec is not None and not spec.value.deleted
    await stubs["az-host1"].DeleteVolume(control_pb2.DeleteVolumeRequest(name=name), timeout=10)
    spec = await keyspace.get_volume(name)
    assert spec is None or spec.value.deleted, "deleted (and purged at once: no copy exists)"


async def test_a_node_moves_a_volume_to_itself_and_nowhere_else(
    stubs: dict[str, control_pb2_grpc.ControlStub], keyspace: Keyspace, nodes: LiveNodes
) -> None:
    name = unique("az-move")
    create = control_pb2.CreateVolumeRequest(name=name, size="1G", node="az-host1")
    await stubs["admin"].CreateVolume(create, timeout=10)
    assert await keyspace.claim_owner(name, "az-host1")
    for asker, target in (("az-host2", "az-host3"), ("az-host1", "az-host3")):
        await refused(
            stubs[asker].MoveVolume(
                control_pb2.MoveVolumeRequest(name=name, node=target), timeout=10
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            f"node {asker} may move a volume only to itself",
        )
    assert await keyspace.get_move(name) is None
    moved = await stubs["az-host2"].MoveVolume(
        control_pb2.MoveVolumeRequest(name=name, node="az-host2"), timeout=10
    )
    assert moved.node == "az-host2"
    move = await keyspace.get_move(name)
    assert move is not None and (move.value.source, move.value.target) == ("az-host1", "az-host2")


async def test_nodes_and_control_call_only_what_the_table_gives_them(
    stubs: dict[str, control_pb2_grpc.ControlStub], keyspace: Keyspace, nodes: LiveNodes
) -> None:
    name = unique("az-table")
    await stubs["admin"].CreateVolume(
        control_pb2.CreateVolumeRequest(name=name, size="1G", node="az-host1"), timeout=10
    )
    node = stubs["az-host1"]
    await refused(
        node.UpdateVolume(control_pb2.CreateVolumeRequest(name=name, size="2G"), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED,
        "a node certificate (az-host1) may not call /ferry.v1.Control/UpdateVolume",
    )
    await refused(
        node.ListVolumes(control_pb2.ListVolumesRequest(), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED,
        "takes a user certificate",
    )
    await refused(
        stubs["az-control"].CreateVolume(
            control_pb2.CreateVolumeRequest(name=unique("az-ctl")), timeout=10
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "a control certificate (az-control) may not call /ferry.v1.Control/CreateVolume",
    )
    spec = await keyspace.get_volume(name)
    assert spec is not None and spec.value.size_bytes == GIB


def issue_without_kind(directory: Path, name: str) -> TlsFiles:
    """A certificate signed by the cluster CA with no organizational unit: no kind."""
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return TlsFiles(directory / "ca.crt", directory / f"{name}.crt", directory / f"{name}.key")


async def test_a_certificate_without_a_kind_is_refused_with_how_to_reissue_it(
    control: ControlServer, certs: ClusterCerts, nodes: LiveNodes
) -> None:
    kindless = issue_without_kind(certs.directory, "az-old")
    name = unique("az-kindless")
    async with grpc.aio.secure_channel(
        control.address,
        kindless.channel_credentials(),
        options=[("grpc.ssl_target_name_override", "control")],
    ) as kindless_channel:
        await refused(
            control_pb2_grpc.ControlStub(kindless_channel).CreateVolume(
                control_pb2.CreateVolumeRequest(name=name, node="az-host1"), timeout=10
            ),
            grpc.StatusCode.UNAUTHENTICATED,
            "the certificate of 'az-old' has no kind",
            "ferryctl ca issue --kind node|user|control --name az-old",
        )
    through_cli = await ferryctl(control.ferryctl_env(kindless), "volume", "list")
    assert through_cli.code != 0
    assert "reissue it with 'ferryctl ca issue" in through_cli.stderr
    listed = await ferryctl(control.ferryctl_env(), "volume", "list", "-o", "json")
    assert name not in listed.stdout


async def test_mutating_calls_and_refusals_are_logged_with_the_caller(
    control: ControlServer, stubs: dict[str, control_pb2_grpc.ControlStub], nodes: LiveNodes
) -> None:
    name = unique("az-logged")
    await stubs["az-host1"].CreateVolume(
        control_pb2.CreateVolumeRequest(name=name, node="az-host1"), timeout=10
    )
    await refused(
        stubs["az-host2"].DeleteVolume(control_pb2.DeleteVolumeRequest(name=name), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await stubs["admin"].DeleteVolume(control_pb2.DeleteVolumeRequest(name=name), timeout=10)
    lines = [line for line in control.log_path.read_text().splitlines() if name in line]
    assert any(
        "call: caller=az-host1 kind=node method=ferry.v1.Control/CreateVolume "
        f"volume={name} node=az-host1" in line
        for line in lines
    ), lines
    assert any(
        "call: caller=az-host2 kind=node method=ferry.v1.Control/DeleteVolume" in line
        for line in lines
    ), lines
    assert any(
        "call: caller=ct-admin kind=user method=ferry.v1.Control/DeleteVolume" in line
        for line in lines
    ), lines


async def test_calls_are_counted_by_method_caller_kind_and_result(
    control: ControlServer,
    certs: ClusterCerts,
    stubs: dict[str, control_pb2_grpc.ControlStub],
    nodes: LiveNodes,
) -> None:
    def count(**labels: str) -> float:
        samples = scrape(control.metrics_address, certs.admin)
        return value(samples, "ferry_control_rpcs_total", **labels)

    delete = "ferry.v1.Control/DeleteVolume"
    name = unique("az-counted")
    refusals = count(method=delete, caller_kind="node", result="PERMISSION_DENIED")
    deletes = count(method=delete, caller_kind="user", result="OK")
    kindless = count(caller_kind="none", result="UNAUTHENTICATED")
    await stubs["az-host1"].CreateVolume(
        control_pb2.CreateVolumeRequest(name=name, node="az-host1"), timeout=10
    )
    await refused(
        stubs["az-host2"].DeleteVolume(control_pb2.DeleteVolumeRequest(name=name), timeout=10),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await stubs["admin"].DeleteVolume(control_pb2.DeleteVolumeRequest(name=name), timeout=10)
    async with grpc.aio.secure_channel(
        control.address,
        issue_without_kind(certs.directory, "az-uncounted").channel_credentials(),
        options=[("grpc.ssl_target_name_override", "control")],
    ) as channel:
        await refused(
            control_pb2_grpc.ControlStub(channel).ListVolumes(
                control_pb2.ListVolumesRequest(), timeout=10
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    assert count(method=delete, caller_kind="node", result="PERMISSION_DENIED") == refusals + 1
    assert count(method=delete, caller_kind="user", result="OK") == deletes + 1
    assert count(caller_kind="none", result="UNAUTHENTICATED") == kindless + 1


async def test_a_certificate_from_another_ca_is_refused_with_what_to_check(
    control: ControlServer, certs: ClusterCerts, workdir: Path
) -> None:
    other = workdir / "az-other-ca"
    ca.init(other)
    ca.issue(other, "user", "ct-admin")
    foreign_client = TlsFiles(certs.admin.ca, other / "ct-admin.crt", other / "ct-admin.key")
    result = await ferryctl(control.ferryctl_env(foreign_client), "volume", "list")
    assert result.code != 0
    assert "is --tls-cert issued by the cluster's CA" in result.stderr
    foreign_trust = TlsFiles(other / "ca.crt", certs.admin.cert, certs.admin.key)
    result = await ferryctl(control.ferryctl_env(foreign_trust), "volume", "list")
    assert result.code != 0
    assert "the TLS handshake failed" in result.stderr
    assert "is --tls-ca the cluster's CA certificate" in result.stderr
