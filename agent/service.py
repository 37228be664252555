"""The running agent: registration, the convergence loop, and the servers, on one event loop.

Level-triggered convergence: any etcd change under the keys this node cares
about, a finished move driver, or the periodic resync wakes the loop; each
pass reads the whole desired state, discovers local ZFS state, plans and
applies. Errors back off; nothing is remembered between passes that is not
in etcd or ZFS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Mapping

import grpc

from agent.config import AgentConfig
from agent.executor import Executor
from agent.moves import MoveDriver
from agent.plan import Actual, Desired, LocalVolume, plan
from agent.plugin import PluginError, VolumePlugin, serve
from agent.registration import Registration
from agent.retry import Backoff
from agent.store import VolumeStore
from agent.transfer.client import PeerClient, TransferFailed
from agent.transfer.data import DataListener, host_of
from agent.transfer.options import SERVER_OPTIONS
from agent.transfer.server import TransferService
from agent.usage import DockerMounts, mount_records
from agent.zfs.volumes import PoolRoot
from control.keyspace import Keyspace, endpoints_client
from control.operations import BeingDeleted, Exists, OperationError, VolumeOps
from control.records import MountRecord, NodeInfo, NodeState
from control.tls import warn_insecure
from protos.ferry.v1 import transfer_pb2_grpc

log = logging.getLogger(__name__)

VERSION = "0.1.0"


class AgentService:
    """One host's agent."""

    def __init__(self, config: AgentConfig, keyspace: Keyspace, store: VolumeStore) -> None:
        self._config = config
        self._keyspace = keyspace
        self._store = store
        self._wakeup = asyncio.Event()
        self._peers: dict[str, PeerClient] = {}
        self._mounts = DockerMounts(config.docker_mounts_file)
        self._driver = MoveDriver(config.node, keyspace, store, self._peer, self._mounts)
        self._executor = Executor(config.node, keyspace, store, self._driver, self._wakeup.set)
        self._registration = Registration(
            keyspace,
            NodeInfo(
                name=config.node,
                address=config.advertise,
                pool=config.pool,
                free_bytes=0,
                version=VERSION,
            ),
            config.lease_ttl,
            store,
        )
        self._reported: set[str] = set()
        self._reported_mounts: dict[str, MountRecord] = {}

    async def run(self) -> None:
        """Serve until cancelled."""
        await self._store.ensure_root()
        # First, so an agent under a name another live agent holds touches nothing.
        await self._registration.register()
        await self._mounts.load()
        await self._store.recover()
        tls = self._config.tls
        data = DataListener(
            host_of(self._config.listen),
            self._config.data_port,
            tls.ssl_context(ssl.Purpose.CLIENT_AUTH) if tls else None,
        )
        await data.start()
        server = await self._start_transfer_server(data)
        plugin = None
        if self._config.plugin_socket is not None:
            plugin = await serve(
                VolumePlugin(
                    node=self._config.node,
                    keyspace=self._keyspace,
                    store=self._store,
                    control=PluginControl(VolumeOps(self._keyspace), self._config.node),
                    lease=lambda: self._registration.lease,
                    mounts=self._mounts,
                ),
                self._config.plugin_socket,
            )
        tasks = [
            asyncio.create_task(
                self._registration.keep_alive(self._registered_again), name="lease"
            ),
            asyncio.create_task(self._watch(), name="watch"),
            asyncio.create_task(self._converge_forever(), name="converge"),
        ]
        log.info(
            "agent running: node=%s pool=%s listen=%s tls=%s",
            self._config.node,
            self._config.pool,
            self._config.listen,
            "on" if self._config.tls else "OFF (insecure)",
        )
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await self._executor.close()
            if plugin is not None:
                await plugin.cleanup()
            await server.stop(grace=2)
            await data.close()
            for peer in self._peers.values():
                await peer.close()

    async def _start_transfer_server(self, data: DataListener) -> grpc.aio.Server:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        service = TransferService(
            self._config.node,
            self._store,
            self._keyspace,
            data,
            insecure=self._config.tls is None,
            require_encryption=self._config.encrypt_streams,
        )
        transfer_pb2_grpc.add_TransferServicer_to_server(service, server)
        if self._config.tls is None:
            warn_insecure()
            server.add_insecure_port(self._config.listen)
        else:
            server.add_secure_port(self._config.listen, self._config.tls.server_credentials())
        await server.start()
        return server

    def _registered_again(self) -> None:
        """A new lease: the state and mount keys went with the old one, so report them again."""
        self._reported.clear()
        self._reported_mounts.clear()
        self._wakeup.set()

    async def _watch(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async for _change in self._keyspace.watch("volumes", "owners", "moves", "mounts"):
                    self._wakeup.set()
                    backoff.reset()
            except Exception as error:
                delay = backoff.next()
                log.warning("etcd watch failed: error=%s retry_in=%.1fs", error, delay)
                await asyncio.sleep(delay)
                self._wakeup.set()

    async def _converge_forever(self) -> None:
        backoff = Backoff()
        while True:
            self._wakeup.clear()
            try:
                await self.converge()
                backoff.reset()
                timeout = self._config.resync_seconds
            except Exception as error:
                timeout = backoff.next()
                log.warning("convergence failed: error=%s retry_in=%.1fs", error, timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def converge(self) -> None:
        """One pass: read desired and actual state, plan, apply, report."""
        desired = Desired(
            node=self._config.node,
            volumes={v.value.name: v.value for v in await self._keyspace.list_volumes()},
            owners={name: o.value for name, o in (await self._keyspace.list_owners()).items()},
            moves={name: m.value for name, m in (await self._keyspace.list_moves()).items()},
        )
        actual = Actual(
            volumes=await self._store.local_volumes(),
            running_moves=self._executor.running_moves,
        )
        for action in plan(desired, actual):
            try:
                await self._executor.apply(action)
            except Exception as error:
                log.warning(
                    "action failed: action=%s volume=%s error=%s",
                    type(action).__name__,
                    action.volume,
                    error,
                )
                self._wakeup.set()
        await self._report()

    async def _report(self) -> None:
        """Write what this node holds to etcd, on its lease."""
        volumes = await self._store.local_volumes()
        for name, local in volumes.items():
            state = NodeState(
                node=self._config.node,
                volume=name,
                snapshots=local.snapshots,
                used_bytes=await self._store.used_bytes(name),
                writable=local.writable,
                mounted=local.mounted,
                updated_at=time.time(),
            )
            await self._keyspace.put_state(state, self._registration.lease)
        for gone in self._reported - set(volumes):
            await self._keyspace.delete_state(self._config.node, gone)
        self._reported = set(volumes)
        await self._report_mounts(volumes)

    async def _report_mounts(self, volumes: Mapping[str, LocalVolume]) -> None:
        """Mount records from the truth: Docker's IDs on disk and the kernel's users.

        A record lives on the lease, so an etcd outage or an agent restart
        loses it; this rewrites every one that is missing or changed.
        """
        lease = self._registration.lease
        found = await mount_records(self._config.node, volumes, self._mounts, self._store)
        for name, record in found.items():
            if self._reported_mounts.get(name) != record:
                await self._keyspace.put_mount(record, lease)
        for gone in set(self._reported_mounts) - set(found):
            await self._keyspace.delete_mount(gone, self._config.node)
        self._reported_mounts = found

    async def _peer(self, node: str) -> PeerClient:
        found = await self._keyspace.get_node(node)
        if found is None:
            raise TransferFailed(f"node {node} is not registered (down?); the move waits for it")
        info = found.value
        peer = self._peers.get(node)
        if peer is None or peer.address != info.address:
            if peer is not None:
                await peer.close()
            peer = PeerClient(node, info.address, self._config.tls, self._config.encrypt_streams)
            self._peers[node] = peer
        return peer


class PluginControl:
    """The plugin's requests to control, through the same operations as ferry-control."""

    def __init__(self, ops: VolumeOps, here: str) -> None:
        self._ops = ops
        self._here = here

    async def create_volume(self, name: str, size: str, compression: str, node: str) -> None:
        """Without a node option, the volume is created where Docker asked for it."""
        try:
            await self._ops.create(name, size, compression, node or self._here)
        except BeingDeleted as error:
            raise PluginError(str(error)) from error
        except Exists:
            if size or compression or node:
                raise PluginError(
                    f"volume {name} already exists; omit options to use it as it is"
                ) from None
        except OperationError as error:
            raise PluginError(str(error)) from error

    async def delete_volume(self, name: str) -> None:
        try:
            await self._ops.delete(name)
        except OperationError as error:
            raise PluginError(str(error)) from error

    async def move_volume(self, name: str, node: str) -> None:
        try:
            await self._ops.move(name, node)
        except OperationError as error:
            raise PluginError(str(error)) from error


async def run(config: AgentConfig) -> None:
    """Connect to etcd and run the agent until cancelled.

    Over mutual TLS with the node's own certificate (the etcd user of this
    node, see control.etcd_auth), or in plaintext when the agent runs insecure.
    """
    client = await asyncio.to_thread(endpoints_client, config.etcd, config.tls)
    try:
        keyspace = Keyspace(client, config.etcd_prefix)
        store = VolumeStore(PoolRoot(config.pool), config.mount_root)
        await AgentService(config, keyspace, store).run()
    finally:
        await client.close()
