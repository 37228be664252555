"""The cluster's CA and certificates: ``ferryctl ca issue-cluster``, the one way every Ferry
cluster's set is made (``ferry.security.ca.issue_cluster``; Vagrant's ``certs.sh`` and the
tests' etcd use it too).

Run as the ferryctl that ``--ferry-bin`` names, like the other Ferry programs. Issued:
``control`` (the bridge address), ``host<i>`` (kind node, the host's address), ``admin``
(kind user), ``etcd`` (the member certificate, the bridge address) and ``root`` (etcd's
administrator).
"""

from __future__ import annotations

import logging

from ferry.localcluster.commands import run
from ferry.localcluster.layout import USER_CERT_NAME, Layout
from ferry.security.tls import TlsFiles

log = logging.getLogger("local-cluster")

ETCD_MEMBER = "etcd"
ETCD_ROOT = "root"


def issue_certificates(layout: Layout, ferryctl: str) -> None:
    nodes = [flag for host in layout.hosts for flag in ("--node", f"{host.name}={host.address}")]
    run(
        [
            ferryctl, "ca", "issue-cluster",
            "--dir", str(layout.certs_dir),
            "--control", layout.bridge_address,
            *nodes,
            "--etcd", f"{ETCD_MEMBER}={layout.bridge_address}",
            "--user", USER_CERT_NAME,
        ]
    )  # fmt: skip
    log.info("certificates issued cluster=%s dir=%s", layout.name, layout.certs_dir)


def identity(layout: Layout, name: str) -> TlsFiles:
    """The CA and ``name``'s certificate and key in the cluster's certificate directory."""
    certs = layout.certs_dir
    return TlsFiles(certs / "ca.crt", certs / f"{name}.crt", certs / f"{name}.key")


def tls_flags(layout: Layout, name: str, insecure: bool) -> list[str]:
    """The --tls-* flags of a Ferry program that holds ``name``'s certificate."""
    if insecure:
        return ["--insecure"]
    files = identity(layout, name)
    return ["--tls-ca", str(files.ca), "--tls-cert", str(files.cert), "--tls-key", str(files.key)]
