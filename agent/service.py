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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import grpc

from agent import metrics
from agent.asides import LEDGER_KINDS, AsideLedger
from agent.config import AgentConfig
from agent.control_client import ControlClient
from agent.executor import Executor
from agent.plugin import VolumePlugin, serve
from agent.registration import Registration
from agent.replicas import Replicator
from agent.replication.activation import Activation
from agent.replication.adapters import PoolStore, RemotePeer
from agent.replication.source import MoveDriver
from agent.retry import Backoff
from agent.selffence import SelfFence
from agent.store import VolumeStore
from agent.transfer.client import PeerClient, TransferFailed
from agent.transfer.data import DataListener, host_of
from agent.transfer.options import SERVER_OPTIONS
from agent.transfer.secure import stream_context
from agent.transfer.server import TransferService
from agent.usage import DockerMounts, mount_records, volumes_in_use
from agent.zfs import ZFSError
from agent.zfs.volumes import PoolRoot
from ferry.cluster.etcd_tls import follow_renewals
from ferry.cluster.events import EventLog
from ferry.cluster.keyspace import Keyspace, Kind, endpoints_client
from ferry.cluster.view import DESIRED_KINDS, read_view
from ferry.core.fencing import FencingTiming
from ferry.core.plan import Action, Actual, Create, Desired, plan
from ferry.core.records import (
    NODE_STARTING,
    EventKind,
    MountRecord,
    Move,
    NodeInfo,
    NodeState,
    Owner,
)
from ferry.metrics import contexts, serve_metrics
from ferry.security.certificates import CertificateWatch
from ferry.security.gate import KindGate
from ferry.security.tls import warn_insecure
from protos.ferry.v1 import transfer_pb2_grpc

log = logging.getLogger(__name__)

VERSION = "0.1.0"
PLAIN_STREAMS_WARNING = (
    "INSECURE PLAIN STREAMS (--insecure-plain-streams): snapshot streams to and from this "
    "agent cross the network unencrypted; anyone on the path can read or alter volume data. "
    "Drop the flag on every agent to encrypt them"
)
# Worker threads of asyncio.to_thread (ZFS, mount and etcd-client work): each command holds
# one for at most its limit and the kill's grace (agent.zfs.runner), so a few hung volumes
# cannot starve the rest. The default (cores + 4) is 6 on a 2-core host.
WORKER_THREADS = 64
# How long a convergence pass waits for its volumes' actions before it reports.
ACTION_WAIT_SECONDS = 5.0
# An action or command running this long is reported as stuck.
STUCK_SECONDS = 10.0


def _clock(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(when))


class AgentService:
    """One host's agent."""

    def __init__(
        self,
        config: AgentConfig,
        keyspace: Keyspace,
        store: VolumeStore,
        certificates: CertificateWatch | None = None,
    ) -> None:
        """``certificates``: the watch of ``config.tls`` that the etcd client dials with, if
        one was made for it (renewals then reach etcd, gRPC and peers alike)."""
        self._config = config
        self._keyspace = keyspace
        self._store = store
        self._wakeup = asyncio.Event()
        if certificates is None and config.tls is not None:
            certificates = CertificateWatch(config.tls)
        self._certificates = certificates
        self._peers: dict[str, tuple[PeerClient, int]] = {}
        # Clients made before a certificate renewal: transfers may still run on them.
        self._retired: list[PeerClient] = []
        self._mounts = DockerMounts(config.docker_mounts_file)
        local = PoolStore(store, self._mounts)
        events = EventLog(keyspace, config.node)
        self._driver = MoveDriver(config.node, keyspace, local, self._remote_peer, events=events)
        self._control: ControlClient | None = None
        self._replicator = Replicator(config.node, keyspace, store, self._remote_peer)
        self._executor = Executor(
            config.node,
            keyspace,
            store,
            self._driver,
            Activation(config.node, keyspace, local, finished=self._moved(events)),
            self._wakeup.set,
            self._replicator,
            self._report_create_failure,
            self._remote_peer,
            self._mounts,
        )
        self._registration = Registration(
            keyspace,
            NodeInfo(
                name=config.node,
                address=config.advertise,
                pool=config.pool,
                free_bytes=0,
                version=VERSION,
                status=NODE_STARTING,
            ),
            config.lease_ttl,
            store,
            cert_not_after=self._cert_not_after,
        )
        self._reported: set[str] = set()
        self._reported_mounts: dict[str, MountRecord] = {}
        self._states: dict[str, NodeState] = {}
        self._actions: dict[str, asyncio.Task[bool]] = {}
        self._started: dict[str, tuple[str, float]] = {}
        self._asides = AsideLedger(config.node, keyspace, store)
        self._owned: dict[str, int] = {}
        """Volume -> epoch this node owned at the last convergence pass (for the self-fence)."""
        self._fence = SelfFence(
            config.node,
            keyspace,
            store,
            self._registration,
            lambda: self._owned,
            FencingTiming(config.lease_ttl),
        )

    async def run(self) -> None:
        """Serve until cancelled.

        The plugin socket answers from the first second (refusing while the agent starts,
        so Docker never falls back to a ``local`` volume). The node record says
        ``starting`` from registration until recovery is done and the gRPC and plugin
        sockets answer; only then ``ready``.
        """
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(WORKER_THREADS, thread_name_prefix="ferry-worker")
        )
        control = self._control_client()
        plugin = VolumePlugin(
            node=self._config.node,
            keyspace=self._keyspace,
            store=self._store,
            control=control,
            lease=lambda: self._registration.lease,
            mounts=self._mounts,
            lease_ttl=self._config.lease_ttl,
        )
        site = None
        if self._config.plugin_socket is not None:
            site = await serve(plugin, self._config.plugin_socket)
        metrics.watch_commands()
        metrics.watch_etcd()
        exporter = None
        if self._config.metrics_address:
            exporter = await serve_metrics(
                metrics.REGISTRY, self._config.metrics_address, self._metrics_tls()
            )
        tasks: list[asyncio.Task[None]] = []
        server: grpc.aio.Server | None = None
        data: DataListener | None = None
        try:
            await self._store.ensure_root()
            # First, so an agent under a name another live agent holds touches nothing.
            await self._registration.register()
            tasks += [
                asyncio.create_task(
                    self._registration.keep_alive(self._registered_again), name="lease"
                ),
                asyncio.create_task(follow_renewals(self._keyspace.client), name="etcd-renewal"),
                asyncio.create_task(control.follow_renewals(), name="control-renewal"),
                asyncio.create_task(self._fence.run(), name="self-fence"),
            ]
            await self._mounts.load()
            await self._recover()
            if self._certificates is not None:
                self._certificates.log_expiry()
            data = DataListener(
                host_of(self._config.listen), self._config.data_port, self._stream_server_context()
            )
            await data.start()
            server = await self._start_transfer_server(data)
            plugin.ready = True
            await self._registration.mark_ready()
            tasks += [
                asyncio.create_task(self._watch(), name="watch"),
                asyncio.create_task(self._converge_forever(), name="converge"),
            ]
            if self._config.tls is not None and not self._config.encrypt_streams:
                log.warning(PLAIN_STREAMS_WARNING)
            log.info(
                "agent running: node=%s pool=%s listen=%s tls=%s streams=%s",
                self._config.node,
                self._config.pool,
                self._config.listen,
                "on" if self._config.tls else "OFF (insecure)",
                "encrypted" if self._config.encrypt_streams else "PLAIN (insecure)",
            )
            await asyncio.gather(*tasks)
        finally:
            for task in [*tasks, *self._actions.values()]:
                task.cancel()
            await self._executor.close()
            if site is not None:
                await site.cleanup()
            if exporter is not None:
                await exporter.cleanup()
            await control.close()
            self._control = None
            if server is not None:
                await server.stop(grace=2)
            if data is not None:
                await data.close()
            for peer in [*(p for p, _ in self._peers.values()), *self._retired]:
                await peer.close()

    def _moved(self, events: EventLog) -> Callable[[Move], Awaitable[None]]:
        async def record(done: Move) -> None:
            await events.record(
                done.volume,
                EventKind.MOVED,
                f"{done.source} -> {self._config.node}: writable here after "
                f"{done.attempt + 1} attempt(s)",
            )

        return record

    def _metrics_tls(self) -> Callable[[], ssl.SSLContext] | None:
        if self._config.tls is None:
            return None
        return contexts(self._config.tls, self._certificates)

    def _cert_not_after(self) -> float:
        return self._certificates.not_after if self._certificates else 0.0

    def _stream_server_context(self) -> Callable[[], ssl.SSLContext] | None:
        """The data port's TLS context, anew after a certificate renewal."""
        certificates = self._certificates
        if certificates is None:
            return None
        return lambda: certificates.context(ssl.Purpose.CLIENT_AUTH, stream_context)

    async def _recover(self) -> None:
        """Start-up recovery, retried until it succeeds: a hung pool keeps the node starting."""
        backoff = Backoff()
        while True:
            try:
                await self._store.recover()
                return
            except (ZFSError, OSError) as error:
                delay = backoff.next()
                log.error(
                    "start-up recovery failed, the node stays starting: node=%s error=%s "
                    "retry_in=%.1fs",
                    self._config.node,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _start_transfer_server(self, data: DataListener) -> grpc.aio.Server:
        server = grpc.aio.server(
            options=SERVER_OPTIONS, interceptors=[KindGate(insecure=self._config.tls is None)]
        )
        service = TransferService(
            self._config.node,
            self._store,
            self._keyspace,
            data,
            insecure=self._config.tls is None,
            require_encryption=self._config.encrypt_streams,
            received=self._wakeup.set,
        )
        transfer_pb2_grpc.add_TransferServicer_to_server(service, server)
        if self._certificates is None:
            warn_insecure()
            server.add_insecure_port(self._config.listen)
        else:
            server.add_secure_port(self._config.listen, self._certificates.server_credentials())
        await server.start()
        return server

    def _control_client(self) -> ControlClient:
        """One client of ferry-control, made in the running loop on first use."""
        if self._control is None:
            self._control = ControlClient(
                self._config.control, self._certificates, self._config.node
            )
        return self._control

    async def _report_create_failure(self, create: Create, why: str) -> None:
        await self._control_client().report_create_failure(create, why)

    def _registered_again(self) -> None:
        """A new lease: the state and mount keys went with the old one, so report them again."""
        self._reported.clear()
        self._reported_mounts.clear()
        self._wakeup.set()

    async def _watch(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async for change in self._keyspace.watch(
                    Kind.VOLUMES, Kind.OWNERS, Kind.MOVES, Kind.MOUNTS, Kind.DROPS
                ):
                    if change.kind != Kind.DROPS or change.node == self._config.node:
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
                if await self.converge():
                    backoff.reset()
                    timeout = self._config.resync_seconds
                else:
                    timeout = backoff.next()
            except Exception as error:
                timeout = backoff.next()
                log.warning("convergence failed: error=%s retry_in=%.1fs", error, timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def converge(self) -> bool:
        """One pass: read desired state (one etcd read, at one revision) and actual, plan,
        apply, report.

        Each volume's actions run as a task of their own, in order; a volume whose task
        still runs (a hung command) is left out of later passes until it ends, so one
        stuck volume never stalls the others. The pass waits for its tasks at most
        ACTION_WAIT_SECONDS, then reports. False when an action failed: the next pass
        comes after a back-off, not at once (a failing create was retried three times a
        second forever).
        """
        busy = self._busy()
        # What runs is read before the copies: a driver that ends while they are read has
        # already unmounted its frozen copy, which then read "mounted" with no driver, and
        # the pass took a clean handoff's source for an old owner to rejoin.
        running_moves, replicating = self._executor.running_moves, self._executor.replicating
        local = await self._store.local_volumes(skip=busy)
        skipped = busy | set(self._store.unreadable)
        view = await read_view(self._keyspace, DESIRED_KINDS + LEDGER_KINDS, node=self._config.node)
        desired = Desired(
            node=self._config.node,
            volumes={name: v.value for name, v in view.volumes.items() if name not in skipped},
            owners={name: o.value for name, o in view.owners.items() if name not in skipped},
            moves={name: m.value for name, m in view.moves.items() if name not in skipped},
            unreadable=frozenset(record.volume for record in view.skipped(*DESIRED_KINDS)),
        )
        actual = Actual(
            volumes=local,
            running_moves=running_moves,
            replicating=replicating,
            in_use=await volumes_in_use(
                (name for name, volume in local.items() if volume.mounted),
                self._mounts,
                self._store,
            ),
        )
        self._owned = {
            name: owner.value.epoch
            for name, owner in view.owners.items()
            if owner.value.node == self._config.node
        }
        per_volume: dict[str, list[Action]] = {}
        for action in plan(desired, actual):
            per_volume.setdefault(action.volume, []).append(action)
        started = []
        for volume, actions in per_volume.items():
            task = asyncio.create_task(self._apply(actions), name=f"apply {volume}")
            self._actions[volume] = task
            self._started[volume] = (type(actions[0]).__name__, time.time())
            started.append(task)
        applied = True
        if started:
            done, pending = await asyncio.wait(started, timeout=ACTION_WAIT_SECONDS)
            applied = all(task.result() for task in done)
            for task in pending:
                # A stuck volume is looked at again once its actions end.
                task.add_done_callback(lambda _task: self._wakeup.set())
        await self._report()
        self._show(
            {n: o.value for n, o in view.owners.items()}, (m.value for m in view.moves.values())
        )
        try:
            await self._asides.converge(self._registration.lease, view)
        except Exception as error:
            # Reported again at the next pass; volumes converge meanwhile.
            log.warning(
                "copies kept aside not reported: node=%s error=%s", self._config.node, error
            )
        return applied

    def _busy(self) -> set[str]:
        """Volumes whose actions of an earlier pass still run."""
        for volume in [v for v, task in self._actions.items() if task.done()]:
            del self._actions[volume]
            del self._started[volume]
        return set(self._actions)

    async def _apply(self, actions: list[Action]) -> bool:
        """Apply one volume's actions in order; False (logged) at the first that fails."""
        for action in actions:
            try:
                await self._executor.apply(action)
            except Exception as error:
                log.warning(
                    "action failed: action=%s volume=%s error=%s",
                    type(action).__name__,
                    action.volume,
                    error,
                )
                return False
        return True

    async def _report(self) -> None:
        """Write what this node holds to etcd, on its lease, with what is stuck per volume.

        A volume whose actions still run keeps its last reported state (its dataset is
        not read meanwhile), with what is stuck.
        """
        busy = self._busy()
        volumes = await self._store.local_volumes(skip=busy)
        for name, local in volumes.items():
            state = NodeState(
                node=self._config.node,
                volume=name,
                snapshots=local.snapshots,
                used_bytes=local.used_bytes,
                writable=local.writable,
                mounted=local.mounted,
                updated_at=time.time(),
                newest_snapshot_at=local.newest_snapshot_at,
            )
            self._states[name] = state
        # A copy being received (a replica, every few seconds) keeps its last report: left
        # out, it would vanish from 'volume get' and read as "no copy" meanwhile.
        receiving = {name for name in self._store.receiving if name in self._states}
        for name in busy | set(self._store.unreadable):
            if name not in self._states:
                self._states[name] = NodeState(node=self._config.node, volume=name)
        held = set(volumes) | busy | set(self._store.unreadable) | receiving
        for name in held:
            self._states[name] = state = replace(
                self._states[name],
                stuck=self._stuck(name),
                replication_error=self._replicator.error(name),
            )
            await self._keyspace.put_state(state, self._registration.lease)
        for gone in self._reported - held:
            await self._keyspace.delete_state(self._config.node, gone)
            self._states.pop(gone, None)
        self._reported = held
        await self._report_mounts(held)

    def _show(self, owners: Mapping[str, Owner], moves: Iterable[Move]) -> None:
        """The metrics' view of this node's volumes and of the moves it sends."""
        views = []
        for name, state in sorted(self._states.items()):
            owner = owners.get(name)
            if name in self._store.unreadable:
                status = "unreadable"
            elif state.stuck:
                status = "stuck"
            else:
                status = "writable" if state.writable else "readonly"
            views.append(
                metrics.VolumeView(
                    volume=name,
                    state=status,
                    role="owner" if owner and owner.node == self._config.node else "copy",
                    epoch=owner.epoch if owner else 0,
                    used_bytes=state.used_bytes,
                    newest_snapshot_at=state.newest_snapshot_at,
                    replication_failing=bool(state.replication_error),
                )
            )
        metrics.show_volumes(views)
        metrics.show_moves(move for move in moves if move.source == self._config.node)

    async def _report_mounts(self, volumes: Iterable[str]) -> None:
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

    def _stuck(self, volume: str) -> str:
        """What has run too long here for ``volume``, since when, and what to do; or ''."""
        found = []
        unreadable = self._store.unreadable.get(volume)
        if unreadable:
            found.append(f"reading its dataset failed: {unreadable}")
        commands = self._store.commands_running(volume, older_than=STUCK_SECONDS)
        if commands:
            found += commands
        elif volume in self._started:
            action, since = self._started[volume]
            if time.time() - since >= STUCK_SECONDS:
                found.append(f"action {action} running since {_clock(since)}")
        if not found:
            return ""
        return (
            "; ".join(found)
            + f"; if it does not end, check 'zpool status {self._config.pool}' and the ZFS "
            f"daemon on {self._config.node}: a command is killed at its limit and the step "
            "retried"
        )

    async def _remote_peer(self, node: str) -> RemotePeer:
        return RemotePeer(await self._peer(node))

    async def _peer(self, node: str) -> PeerClient:
        found = await self._keyspace.get_node(node)
        if found is None:
            raise TransferFailed(f"node {node} is not registered (down?); the move waits for it")
        info = found.value
        generation = self._certificates.generation if self._certificates else 0
        peer, made_in = self._peers.get(node, (None, generation))
        if peer is None or peer.address != info.address or made_in != generation:
            if peer is not None and peer.address == info.address:
                self._retired.append(peer)  # renewed certificate: dial again with the new one
            elif peer is not None:
                await peer.close()
            peer = PeerClient(node, info.address, self._config.tls, self._config.encrypt_streams)
            self._peers[node] = (peer, generation)
        return peer


async def run(config: AgentConfig) -> None:
    """Connect to etcd and run the agent until cancelled.

    Over mutual TLS with the node's own certificate (the etcd user of this
    node, see control.etcd_auth), or in plaintext when the agent runs insecure.
    """
    certificates = CertificateWatch(config.tls) if config.tls else None
    client = await asyncio.to_thread(endpoints_client, config.etcd, certificates)
    try:
        keyspace = Keyspace(client, config.etcd_prefix)
        store = VolumeStore(
            PoolRoot(config.pool), config.mount_root, events=EventLog(keyspace, config.node)
        )
        await AgentService(config, keyspace, store, certificates).run()
    finally:
        await client.close()
