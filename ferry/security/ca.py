"""The cluster CA: one key pair that signs every certificate of the cluster.

Layout of a CA directory: ``ca.crt`` and ``ca.key`` (0600), then
``<name>.crt`` and ``<name>.key`` (0600) for each issued identity. The
certificate's common name is the identity (a node's name for agents,
``control``, a user's name); its subject alternative names hold that name as
DNS and the given IP addresses, so peers are verified by name.

etcd takes the common name of a client certificate as its user (RBAC): a node's
certificate is the etcd user of that node, control's is ``control``. An
``etcd`` certificate is a member's server and peer certificate and also names
``etcd`` (ETCD_SERVER_NAME), the name Ferry's clients verify members by; the one
``etcd-root`` certificate (name ``root``) is the etcd administrator that
bootstraps users and roles. Reserved names go with their kind only, so no node
or user certificate can act as ``control`` or ``root`` in etcd.

``issue_cluster`` is the one way a whole cluster's set is made: the local
cluster (``deploy/local-cluster``), the Vagrant cluster (``vagrant/certs.sh``,
through ``ferryctl ca issue-cluster``) and the test suite's etcd all call it,
so they cannot drift apart in which certificates a cluster needs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KINDS = ("control", "node", "user", "etcd", "etcd-root")
VALID_DAYS = 825
ETCD_SERVER_NAME = "etcd"
RESERVED_NAMES = {"control": "control", "root": "etcd-root", ETCD_SERVER_NAME: "etcd"}


class CAError(Exception):
    """The CA directory is missing, incomplete, or would be overwritten."""


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init(directory: Path, name: str = "ferry-cluster-ca") -> Path:
    """Create a new CA in ``directory``; refuses to replace an existing one."""
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "ca.key").exists():
        raise CAError(f"{directory} already holds a CA (ca.key); use another directory")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(directory / "ca.key", _key_pem(key), private=True)
    _write(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), private=False)
    return directory / "ca.crt"


def issue(
    directory: Path,
    kind: str,
    name: str,
    ips: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    valid_days: float = VALID_DAYS,
) -> tuple[Path, Path]:
    """Issue ``<name>.crt``/``<name>.key`` signed by the CA in ``directory``, valid for
    ``valid_days`` from now."""
    if kind not in KINDS:
        raise CAError(f"unknown certificate kind {kind!r}; use one of {', '.join(KINDS)}")
    _check_reserved(kind, name, dns)
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except FileNotFoundError as error:
        raise CAError(f"no CA in {directory}: run 'ferryctl ca init --dir {directory}'") from error
    try:
        addresses = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    except ValueError as error:
        raise CAError(f"invalid IP address: {error}") from error
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    if kind == "etcd":
        dns = (*dns, ETCD_SERVER_NAME)
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys((name, *dns))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName([*names, *addresses]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    _write(key_path, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path, key_path


def issue_cluster(
    directory: Path,
    *,
    control_ips: Sequence[str],
    nodes: Mapping[str, Sequence[str]],
    etcd_members: Mapping[str, Sequence[str]],
    users: Sequence[str],
) -> list[str]:
    """A cluster's CA and certificates in ``directory``: ``control`` (serving on
    ``control_ips``), each node and etcd member (name -> the IPs it serves on), each user,
    and etcd's ``root``. Returns the names issued now.

    Idempotent: an existing CA and existing certificates are kept, so a second run (a
    Vagrant ``provision`` after ``up``) neither replaces the CA that signed the nodes'
    certificates nor re-keys a node that already holds its key.
    """
    if not (directory / "ca.key").exists():
        init(directory)
    wanted = [
        ("control", "control", tuple(control_ips)),
        *(("node", name, tuple(ips)) for name, ips in nodes.items()),
        *(("etcd", name, tuple(ips)) for name, ips in etcd_members.items()),
        *(("user", name, ()) for name in users),
        ("etcd-root", "root", ()),
    ]
    issued = []
    for kind, name, ips in wanted:
        if not (directory / f"{name}.crt").exists():
            issue(directory, kind, name, ips)
            issued.append(name)
    return issued


def _check_reserved(kind: str, name: str, dns: Sequence[str]) -> None:
    """A reserved name only with its kind, and the etcd administrator only as ``root``; the
    name members know each other by (ETCD_SERVER_NAME) only in a member's certificate.

    etcd grants by common name: a node certificate named ``root`` would be
    etcd's administrator, one named ``control`` would write every volume.
    """
    owner = RESERVED_NAMES.get(name)
    if owner is not None and owner != kind:
        raise CAError(f"the name {name!r} is reserved for --kind {owner}; choose another name")
    if kind != "etcd" and ETCD_SERVER_NAME in dns:
        raise CAError(
            f"the DNS name {ETCD_SERVER_NAME!r} is reserved for --kind etcd: etcd members "
            "admit as peers only certificates that name it"
        )
    if kind == "etcd-root" and name != "root":
        raise CAError("an etcd-root certificate is named root (etcd's administrator): --name root")
