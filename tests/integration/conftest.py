"""Fixtures of the integration tests: per module a real etcd and a ferry-control on mutual TLS.

etcd trusts the module's cluster CA (``certs``) and runs with auth on, as Ferry
deploys it; the keyspace fixtures connect as etcd's ``root``.

A module that needs its own key prefix defines its own ``keyspace``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ferry.cluster.keyspace import Keyspace
from tests.support.etcd import ClusterCerts, ControlServer, EtcdServer, issue_certificates


@pytest.fixture(scope="module")
def etcd(certs: ClusterCerts) -> Iterator[EtcdServer]:
    with EtcdServer(certs=certs) as server:
        yield server


@pytest.fixture(scope="module")
def workdir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def certs(workdir: Path) -> ClusterCerts:
    return issue_certificates(workdir / "ca")


@pytest.fixture(scope="module")
def control(etcd: EtcdServer, certs: ClusterCerts, workdir: Path) -> Iterator[ControlServer]:
    with ControlServer(etcd.endpoint, certs, workdir) as server:
        yield server


@pytest.fixture
async def private_keyspace(etcd: EtcdServer) -> AsyncIterator[Keyspace]:
    """A keyspace under a prefix of this test's own: no other test's records in the way."""
    client = etcd.client()
    try:
        yield Keyspace(client, prefix=f"/ct-{secrets.token_hex(4)}/v1")
    finally:
        await client.close()


@pytest.fixture
async def keyspace(etcd: EtcdServer) -> AsyncIterator[Keyspace]:
    """The keyspace ferry-control uses (default prefix)."""
    client = etcd.client()
    try:
        yield Keyspace(client)
    finally:
        await client.close()
