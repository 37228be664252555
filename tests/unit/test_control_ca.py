"""The cluster CA: what `ferryctl ca init/issue` write and what the certificates say."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from control.ctl import main
from ferry.security import ca


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, InvalidSignature):
        return False
    return True


def test_init_writes_a_ca_whose_key_only_root_reads(tmp_path: Path) -> None:
    ca.init(tmp_path)
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    cert = load(tmp_path / "ca.crt")
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_init_refuses_to_replace_an_existing_ca(tmp_path: Path) -> None:
    ca.init(tmp_path)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(ca.CAError, match="already holds a CA"):
        ca.init(tmp_path)
    assert (tmp_path / "ca.key").read_bytes() == before


def test_a_node_certificate_names_the_node_and_its_addresses(tmp_path: Path) -> None:
    ca.init(tmp_path)
    cert_path, key_path = ca.issue(
        tmp_path, "node", "host1", ips=("10.0.0.2",), dns=("host1.example",)
    )
    assert (cert_path, key_path) == (tmp_path / "host1.crt", tmp_path / "host1.key")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    cert = load(cert_path)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "host1"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["host1", "host1.example"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.2")]
    assert signed_by(cert, load(tmp_path / "ca.crt"))


def test_a_certificate_from_another_ca_does_not_verify(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ca.init(ours)
    ca.init(theirs)
    cert_path, _ = ca.issue(theirs, "user", "admin")
    assert not signed_by(load(cert_path), load(ours / "ca.crt"))


def test_issue_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ca.CAError, match="ferryctl ca init --dir"):
        ca.issue(tmp_path, "user", "admin")


@pytest.mark.parametrize(
    ("kind", "ips", "message"),
    [("robot", (), "unknown certificate kind"), ("node", ("10.0.0.300",), "invalid IP")],
)
def test_issue_refuses_bad_kinds_and_addresses(
    tmp_path: Path, kind: str, ips: tuple[str, ...], message: str
) -> None:
    ca.init(tmp_path)
    with pytest.raises(ca.CAError, match=message):
        ca.issue(tmp_path, kind, "host1", ips=ips)
    assert not (tmp_path / "host1.key").exists()


def test_an_etcd_member_certificate_carries_the_name_clients_verify_members_by(
    tmp_path: Path,
) -> None:
    ca.init(tmp_path)
    cert_path, _ = ca.issue(tmp_path, "etcd", "etcd-node1", ips=("10.0.0.1",))
    names = load(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["etcd-node1", ca.ETCD_SERVER_NAME]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]


@pytest.mark.parametrize(
    ("kind", "name", "message"),
    [
        ("node", "root", "reserved for --kind etcd-root"),
        ("user", "control", "reserved for --kind control"),
        ("node", "etcd", "reserved for --kind etcd"),
        ("etcd-root", "admin", "--name root"),
    ],
)
def test_names_etcd_grants_by_go_only_with_their_kind(
    tmp_path: Path, kind: str, name: str, message: str
) -> None:
    ca.init(tmp_path)
    with pytest.raises(ca.CAError, match=message):
        ca.issue(tmp_path, kind, name)
    assert not (tmp_path / f"{name}.crt").exists()


def kind_and_addresses(path: Path) -> tuple[str, list[str]]:
    cert = load(path)
    kind = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(kind), [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]


def test_issue_cluster_makes_every_certificate_a_cluster_needs(tmp_path: Path) -> None:
    issued = ca.issue_cluster(
        tmp_path,
        control_ips=("10.0.0.1",),
        nodes={"host1": ("10.0.0.2",), "host2": ("10.0.0.3",)},
        etcd_members={"etcd-host1": ("10.0.0.2", "127.0.0.1")},
        users=("admin",),
    )
    assert sorted(issued) == ["admin", "control", "etcd-host1", "host1", "host2", "root"]
    assert {name: kind_and_addresses(tmp_path / f"{name}.crt") for name in issued} == {
        "control": ("control", ["10.0.0.1"]),
        "host1": ("node", ["10.0.0.2"]),
        "host2": ("node", ["10.0.0.3"]),
        "etcd-host1": ("etcd", ["10.0.0.2", "127.0.0.1"]),
        "admin": ("user", []),
        "root": ("etcd-root", []),
    }
    for name in issued:
        assert signed_by(load(tmp_path / f"{name}.crt"), load(tmp_path / "ca.crt"))


def test_issue_cluster_again_keeps_the_ca_and_issues_only_what_is_missing(tmp_path: Path) -> None:
    def issue(nodes: dict[str, tuple[str, ...]]) -> list[str]:
        return ca.issue_cluster(
            tmp_path, control_ips=("10.0.0.1",), nodes=nodes, etcd_members={}, users=("admin",)
        )

    issue({"host1": ("10.0.0.2",)})
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert issue({"host1": ("10.0.0.2",), "host2": ("10.0.0.3",)}) == ["host2"]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in kept} == kept
    assert signed_by(load(tmp_path / "host2.crt"), load(tmp_path / "ca.crt"))


def test_ferryctl_ca_issue_cluster_reads_names_and_addresses(tmp_path: Path) -> None:
    args = ["ca", "issue-cluster", "--dir", str(tmp_path), "--control", "10.0.0.1"]
    args += ["--node", "host1=10.0.0.2", "--etcd", "etcd=10.0.0.1,127.0.0.1", "--user", "admin"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert kind_and_addresses(tmp_path / "etcd.crt") == ("etcd", ["10.0.0.1", "127.0.0.1"])
    assert kind_and_addresses(tmp_path / "host1.crt") == ("node", ["10.0.0.2"])
    refused = CliRunner().invoke(
        main, ["ca", "issue-cluster", "--dir", str(tmp_path), "--node", "host3"]
    )
    assert refused.exit_code == 1
    assert "--node 'host3': give NAME=IP" in refused.output


def test_only_a_member_certificate_names_etcd_the_name_members_admit_peers_by(
    tmp_path: Path,
) -> None:
    ca.init(tmp_path)
    with pytest.raises(ca.CAError, match="reserved for --kind etcd"):
        ca.issue(tmp_path, "node", "host1", dns=(ca.ETCD_SERVER_NAME,))
    ca.issue(tmp_path, "etcd", "etcd-host1", dns=(ca.ETCD_SERVER_NAME,))
