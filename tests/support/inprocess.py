"""An agent and a ferry-control run inside the test's own process, on a real pool and etcd.

For tests and benchmarks that drive them step by step (one ``converge()``
at a time) or look at their etcd requests (``tests.support.etcd_requests``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aetcd
import grpc

from agent.config import AgentConfig
from agent.service import AgentService
from agent.store import VolumeStore
from agent.zfs.volumes import PoolRoot
from control.server import ControlService
from ferry.cluster.keyspace import Keyspace
from ferry.security.gate import KindGate
from ferry.security.tls import TlsFiles
from protos.ferry.v1 import control_pb2_grpc


@contextlib.asynccontextmanager
async def registered_agent(
    node: str,
    pool: str,
    etcd: str,
    keyspace: Keyspace,
    workdir: Path,
    lease_ttl: int = 10,
    tls: TlsFiles | None = None,
    control: str = "",
) -> AsyncIterator[tuple[AgentService, VolumeStore]]:
    """An agent that converges only when told (``converge()``), registered on a lease that
    is not kept alive (it may expire before the end on a loaded machine); no plugin socket;
    insecure unless ``tls`` is given (then it reports to ferry-control at ``control``)."""
    config = AgentConfig(
        node=node,
        etcd=(etcd,),
        pool=pool,
        listen="127.0.0.1:0",
        advertise="127.0.0.1:1",
        data_port=0,
        mount_root=workdir / "mnt",
        plugin_socket=None,
        tls=tls,
        state_dir=workdir / "state",
        lease_ttl=lease_ttl,
        control=control,
    )
    store = VolumeStore(PoolRoot(pool), config.mount_root)
    service = AgentService(config, keyspace, store)
    await store.ensure_root()
    await service._registration.register()
    try:
        yield service, store
    finally:
        try:
            await service._registration.lease.revoke()
        except aetcd.ClientError as error:
            if "lease not found" not in str(error):  # expired: nobody kept it alive
                raise


@contextlib.asynccontextmanager
async def insecure_control(keyspace: Keyspace) -> AsyncIterator[control_pb2_grpc.ControlStub]:
    """The Control API over ``keyspace`` on a loopback port, without TLS, and a stub of it."""
    server = grpc.aio.server(interceptors=[KindGate(insecure=True)])
    control_pb2_grpc.add_ControlServicer_to_server(
        ControlService(keyspace, KindGate(insecure=True)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield control_pb2_grpc.ControlStub(channel)
    finally:
        await channel.close(grace=None)
        await server.stop(grace=1)
