"""A node's certificate renewed in place (new files at the same paths) while its agent runs.

The agent must take it up without a restart: its node record shows the new
expiry, and moves out of and into the node work with the new certificate.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import pytest

from ferry.security import ca
from ferry.security.certificates import not_after
from tests.support.cluster import Cluster
from tests.support.volumes import checksums, finish_and_check, mountpoint, wait_for, write_random_on

pytestmark = pytest.mark.cluster


def listed_expiry(cluster: Cluster, node: str) -> float:
    rows = json.loads(cluster.ferryctl(["node", "list", "-o", "json"]).stdout)
    return float({r["name"]: r.get("cert_not_after", 0) for r in rows}.get(node, 0))


def test_a_renewed_node_certificate_is_taken_up_without_a_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    if cluster.kind != "local" or cluster.insecure or cluster.tls_ca is None:
        pytest.skip("renews a certificate with the local cluster's CA")
    a, b = cluster.hosts[0], cluster.hosts[1]
    certs = cluster.tls_ca.parent
    log = Path(b.logs["agent"] or "")
    starts = log.read_text().count("agent running")
    old_expiry = listed_expiry(cluster, b.name)
    assert old_expiry == not_after((certs / f"{b.name}.crt").read_bytes())
    name = f"rn-{secrets.token_hex(3)}"
    cluster.ferryctl(["volume", "create", name, "--size", "256M", "--node", b.name])
    wait_for(f"{name} on {b.name}", lambda: cluster.volume(name)["owner"] == b.name)
    write_random_on(cluster, b, f"{mountpoint(b, name)}/data", 16)
    data = checksums(cluster, b, mountpoint(b, name))
    try:
        for part in ("ca.crt", "ca.key"):
            shutil.copy(certs / part, tmp_path / part)
        ca.issue(tmp_path, "node", b.name, ips=(b.address,))
        for part in (f"{b.name}.key", f"{b.name}.crt"):  # key first: a moment of mismatch
            shutil.copy(tmp_path / part, certs / f"{part}.new")
            os.replace(certs / f"{part}.new", certs / part)
        new_expiry = not_after((certs / f"{b.name}.crt").read_bytes())
        assert new_expiry > old_expiry
        wait_for("the new expiry on record", lambda: listed_expiry(cluster, b.name) == new_expiry)

        cluster.ferryctl(["volume", "move", name, a.name])  # b dials with its new certificate
        finish_and_check(cluster, name, data, a)
        cluster.ferryctl(["volume", "move", name, b.name])  # b serves with it
        finish_and_check(cluster, name, data, b)
        text = log.read_text()
        assert "TLS certificate renewed" in text
        assert text.count("agent running") == starts, "the agent was restarted"
    finally:
        cluster.ferryctl(["volume", "delete", name, "--force"], check=False)
