"""Who may read and write etcd, tried from inside a host's network namespace, as an attacker
on the cluster network would: nobody without a certificate of the cluster CA, each node only
its own records (plus the shared keys control/etcd_auth.py lists with their reasons),
control the volumes, and no ferryctl user at all."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferry.cluster.keyspace import Keyspace
from ferry.security.tls import TlsFiles
from tests.support.cluster import Cluster
from tests.support.etcd import SOURCE_TREE, VENV_BIN

pytestmark = pytest.mark.cluster


def probe(cluster: Cluster, tls: TlsFiles | None, user: str, *actions: str) -> dict[str, str]:
    """Run tests.support.etcd_probe in the first host's netns with ``tls`` (None: no TLS)."""
    files = (
        ["--tls-ca", str(tls.ca), "--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
        if tls
        else []
    )
    command = [
        "env", f"PYTHONPATH={SOURCE_TREE['PYTHONPATH']}", sys.executable,
        "-m", "tests.support.etcd_probe", "--etcd", cluster.etcd_endpoints[0],
        *files, "--user", user, *actions,
    ]  # fmt: skip
    done = cluster.run(cluster.hosts[0], command, timeout=120)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def refused(outcomes: dict[str, str]) -> dict[str, bool]:
    return {action: outcome.startswith("refused") for action, outcome in outcomes.items()}


@pytest.fixture
def certs(cluster: Cluster) -> Path:
    if cluster.kind != "local" or cluster.insecure or cluster.tls_ca is None:
        pytest.skip("needs a local cluster on TLS (its certificates and netns hosts)")
    return cluster.tls_ca.parent


def files(certs: Path, name: str) -> TlsFiles:
    return TlsFiles(certs / "ca.crt", certs / f"{name}.crt", certs / f"{name}.key")


def test_without_a_certificate_of_the_cluster_ca_etcd_answers_nothing(
    cluster: Cluster, certs: Path, tmp_path: Path
) -> None:
    ferryctl = str(VENV_BIN / "ferryctl")
    other = tmp_path / "other-ca"
    for command in (
        ["ca", "init", "--dir", str(other)],
        ["ca", "issue", "--dir", str(other), "--kind", "node", "--name", cluster.hosts[0].name],
    ):
        subprocess.run(
            [ferryctl, *command],
            env={**os.environ, **SOURCE_TREE},
            check=True,
            capture_output=True,
            timeout=60,
        )
    # Trusts the real CA (so the server is etcd), shows another CA's certificate of that name.
    forged = files(other, cluster.hosts[0].name)
    impostor = TlsFiles(certs / "ca.crt", forged.cert, forged.key)
    plain = probe(cluster, None, "", "read", "volume", "http-put")
    foreign = probe(cluster, impostor, cluster.hosts[0].name, "read", "volume")
    assert refused(plain) == {"read": True, "volume": True, "http-put": True}, plain
    assert refused(foreign) == {"read": True, "volume": True}, foreign

    async def forged_owner() -> object:
        client = cluster.etcd_client()
        try:
            return await Keyspace(client).get_owner("et-probe")
        finally:
            await client.close()

    assert asyncio.run(forged_owner()) is None


def test_a_node_writes_its_own_records_and_not_another_nodes_nor_a_volume_spec(
    cluster: Cluster, certs: Path
) -> None:
    me, other = cluster.hosts[0].name, cluster.hosts[1].name
    outcomes = probe(
        cluster,
        files(certs, me),
        me,
        "read",
        f"state:{me}",
        f"node:{other}",
        f"state:{other}",
        f"event:{me}",
        f"event:{other}",
        "event:control",
        "volume",
        "escalate",
    )
    assert refused(outcomes) == {
        "read": False,
        f"state:{me}": False,
        f"node:{other}": True,
        f"state:{other}": True,
        f"event:{me}": False,
        f"event:{other}": True,
        "event:control": True,
        "volume": True,
        "escalate": True,
    }, outcomes


def test_control_writes_volumes_and_no_node_records(cluster: Cluster, certs: Path) -> None:
    node = cluster.hosts[1].name
    outcomes = probe(
        cluster,
        files(certs, "control"),
        "control",
        "read",
        "volume",
        f"node:{node}",
        f"state:{node}",
        "event:control",
        f"event:{node}",
    )
    assert refused(outcomes) == {
        "read": False,
        "volume": False,
        f"node:{node}": True,
        f"state:{node}": True,
        "event:control": False,
        f"event:{node}": True,
    }, outcomes


def test_a_ferryctl_user_is_no_etcd_user(cluster: Cluster, certs: Path) -> None:
    assert cluster.user_cert is not None
    user = cluster.user_cert.stem
    outcomes = probe(cluster, files(certs, user), user, "read", "volume", "escalate")
    assert refused(outcomes) == {"read": True, "volume": True, "escalate": True}, outcomes
