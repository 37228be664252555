"""ferry-control: a stateless gRPC API in front of etcd.

Any number of instances may run against one etcd: every decision is an etcd
transaction, so two racing requests cannot both win.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import TypeVar

import click
import grpc
from aetcd.exceptions import ClientError, RevisionCompactedError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from control import metrics
from control.autofailover import AutoFailover
from control.etcd_unreachable import EtcdUnreachable
from control.operations import (
    FailedOver,
    OperationError,
    PermissionDenied,
    Replication,
    VolumeOps,
)
from control.purger import purge_forever
from control.replicas import ReplicaKeeper
from ferry.cluster.events import CONTROL_WRITER, EventLog
from ferry.cluster.keyspace import (
    Keyspace,
    Kind,
    UnreadableRecord,
    Versioned,
    endpoints_client,
    etcd_target,
)
from ferry.cluster.view import ClusterView, read_view
from ferry.core.records import (
    AsideCopy,
    Event,
    EventKind,
    MountRecord,
    Move,
    MovePhase,
    NodeState,
    Owner,
    VolumeSpec,
)
from ferry.flags import service_flags
from ferry.logs import setup_logging
from ferry.metrics import contexts, parse_address, serve_metrics
from ferry.security.authz import (
    CONTROL_API,
    NODE,
    create_failure_refusal,
    delete_refusal,
    move_refusal,
)
from ferry.security.gate import KindGate
from ferry.security.tls import TlsFiles, endpoints, from_flags, warn_insecure
from protos.ferry.v1 import control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)

WATCH_RETRY_SECONDS = 1.0
# What a volume's API message is made of, read as one view.
VOLUME_KINDS = (
    Kind.VOLUMES,
    Kind.OWNERS,
    Kind.MOVES,
    Kind.MOUNTS,
    Kind.STATE,
    Kind.ASIDES,
    Kind.DROPS,
)
# Records whose absence would misreport a volume (no owner, no mount, no copy): reported
# (ListVolumes) or refused (GetVolume) when unreadable. A bad aside record is only logged.
REPORTED_UNREADABLE = (Kind.VOLUMES, Kind.OWNERS, Kind.MOVES, Kind.MOUNTS, Kind.STATE)
DELETE, MOVE = CONTROL_API + "DeleteVolume", CONTROL_API + "MoveVolume"
CREATE_FAILURE = CONTROL_API + "ReportCreateFailure"


class ControlService(control_pb2_grpc.ControlServicer):
    """The Control API over the keyspace."""

    def __init__(self, keyspace: Keyspace, gate: KindGate) -> None:
        self._keyspace = keyspace
        self._events = EventLog(keyspace, CONTROL_WRITER)
        self._ops = VolumeOps(keyspace, self._events)
        self._gate = gate

    async def CreateVolume(
        self, request: control_pb2.CreateVolumeRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.Volume:
        caller = self._gate.caller(context)
        await self._guard(
            context,
            self._ops.create(
                request.name,
                request.size,
                request.compression,
                request.node,
                created_by_node=caller.name if caller.kind == NODE else "",
                replication=_replication(request),
                failover=request.failover,
                failover_after=request.failover_after,
            ),
        )
        created = await self._volume(request.name, context)
        await self._events.record(
            request.name, EventKind.CREATED, f"on {created.node}, asked by {caller.name}"
        )
        return created

    async def GetVolume(
        self, request: control_pb2.GetVolumeRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.Volume:
        found = await self._volume(request.name, context)
        if found.deleted:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"volume {request.name} does not exist (deleted; agents are destroying its data)",
            )
        return found

    async def ListVolumes(
        self, request: control_pb2.ListVolumesRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListVolumesReply:
        view = await read_view(self._keyspace, VOLUME_KINDS)
        mounted = _by_volume(view.mounts)
        held = _by_volume(view.states)
        aside = _by_volume(view.asides)
        volumes = [
            _volume_message(
                s.value,
                view.owners.get(name),
                view.moves.get(name),
                mounted.get(name, []),
                held.get(name, []),
                [_aside_message(a, view.drop_requested(a)) for a in aside.get(name, [])],
            )
            for name, s in view.volumes.items()
            if not s.value.deleted
        ]
        unreadable = [
            control_pb2.UnreadableRecord(key=r.key, reason=r.reason)
            for r in view.skipped(*REPORTED_UNREADABLE)
        ]
        return control_pb2.ListVolumesReply(volumes=volumes, unreadable=unreadable)

    async def DeleteVolume(
        self, request: control_pb2.DeleteVolumeRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.DeleteVolumeReply:
        caller = self._gate.caller(context)
        notice = ""
        try:
            notice = await self._ops.delete(
                request.name,
                request.force,
                refusal=lambda spec: delete_refusal(
                    caller, spec.created_by_node, spec.name, request.force
                ),
            )
        except PermissionDenied as error:
            await self._gate.refuse(context, caller, DELETE, request.name, str(error))
        except OperationError as error:
            await context.abort(getattr(grpc.StatusCode, error.code), str(error))
        except UnreadableRecord as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        forced = " (forced)" if request.force else ""
        await self._events.record(
            request.name, EventKind.DELETED, f"asked by {caller.name}{forced}"
        )
        return control_pb2.DeleteVolumeReply(notice=notice)

    async def MoveVolume(
        self, request: control_pb2.MoveVolumeRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.Volume:
        caller = self._gate.caller(context)
        refused = move_refusal(caller, request.node)
        if refused is not None:
            await self._gate.refuse(context, caller, MOVE, request.name, refused)
        move = await self._guard(context, self._ops.move(request.name, request.node))
        if isinstance(move, Move):
            what = "cancelled" if move.phase == MovePhase.FAILED else "requested"
            await self._events.record(
                request.name,
                EventKind.MOVE_REQUESTED,
                f"{what}: {move.source} -> {move.target}, asked by {caller.name}",
            )
        return await self._volume(request.name, context)

    async def ReportCreateFailure(
        self, request: control_pb2.CreateFailureRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.CreateFailureReply:
        caller = self._gate.caller(context)
        try:
            await self._ops.record_create_failure(
                request.name,
                (request.uid, request.size_bytes),
                request.error,
                refusal=lambda spec: create_failure_refusal(caller, spec.node, spec.name),
            )
        except PermissionDenied as error:
            await self._gate.refuse(context, caller, CREATE_FAILURE, request.name, str(error))
        except OperationError as error:
            await context.abort(getattr(grpc.StatusCode, error.code), str(error))
        return control_pb2.CreateFailureReply()

    async def UpdateVolume(
        self, request: control_pb2.CreateVolumeRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.Volume:
        await self._guard(
            context,
            self._ops.update(
                request.name,
                request.size,
                request.compression,
                _replication(request),
                request.failover,
                request.failover_after,
            ),
        )
        return await self._volume(request.name, context)

    async def FailoverVolume(
        self, request: control_pb2.FailoverVolumeRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.FailoverVolumeReply:
        done = await self._guard(context, self._ops.failover(request.name, request.node))
        assert isinstance(done, FailedOver)
        return control_pb2.FailoverVolumeReply(
            volume=await self._volume(request.name, context),
            old_owner=done.old_owner,
            snapshot=done.snapshot,
            lost=done.lost,
        )

    async def ListNodes(
        self, request: control_pb2.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListNodesReply:
        nodes = await self._keyspace.list_nodes()
        return control_pb2.ListNodesReply(
            nodes=[
                control_pb2.Node(
                    name=n.name,
                    address=n.address,
                    pool=n.pool,
                    free_bytes=n.free_bytes,
                    version=n.version,
                    started_at=n.started_at,
                    status=n.status,
                    cert_not_after=n.cert_not_after,
                )
                for n in sorted((v.value for v in nodes), key=lambda n: n.name)
            ]
        )

    async def WatchVolume(
        self, request: control_pb2.GetVolumeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[control_pb2.Volume]:
        """The volume now, then each time it changes; rides out etcd restarts.

        The watch starts right after the revision the volume was read at (its
        view's), so nothing after the read is missed and nothing before it is
        replayed. When etcd goes away the watch resumes from after the last
        change seen, and the volume is read again (a compacted revision also
        just means: read again, watch from now).
        """
        last: control_pb2.Volume | None = None
        resume: int | None = None
        while True:
            try:
                current, revision = await self._volume_at(request.name, context)
                start = resume if resume is not None else revision + 1
                changes = self._keyspace.watch(
                    Kind.VOLUMES, Kind.OWNERS, Kind.MOVES, Kind.MOUNTS, start_revision=start
                )
                if current != last:
                    yield current
                    last = current
                async for change in changes:
                    resume = change.revision + 1
                    if change.volume != request.name:
                        continue
                    current = await self._volume(request.name, context)
                    if current != last:
                        yield current
                        last = current
            except RevisionCompactedError:
                resume = None
            except ClientError as error:
                log.warning(
                    "etcd unavailable while following a volume: volume=%s error=%s retry_in=%.1fs",
                    request.name,
                    error,
                    WATCH_RETRY_SECONDS,
                )
                await asyncio.sleep(WATCH_RETRY_SECONDS)

    async def WatchEvents(
        self, request: control_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[control_pb2.Event]:
        """The events kept, oldest first; with ``follow``, then each new one. A follower rides
        out etcd restarts from the revision after the last event it sent."""
        kept, revision = await self._keyspace.list_events(request.volume)
        for event in kept:
            yield _event_message(event)
        resume = revision + 1
        while request.follow:
            try:
                async for found in self._keyspace.watch_events(resume):
                    resume = found.revision + 1
                    if not request.volume or found.value.volume == request.volume:
                        yield _event_message(found.value)
            except RevisionCompactedError:
                resume = await self._keyspace.revision() + 1
                log.warning("events compacted while following: some may be missing")
            except ClientError as error:
                log.warning(
                    "etcd unavailable while following events: error=%s retry_in=%.1fs",
                    error,
                    WATCH_RETRY_SECONDS,
                )
                await asyncio.sleep(WATCH_RETRY_SECONDS)

    async def ListAsides(
        self, request: control_pb2.ListAsidesRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.ListAsidesReply:
        return control_pb2.ListAsidesReply(asides=await self._asides(request.volume))

    async def DropAside(
        self, request: control_pb2.DropAsideRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.AsideCopy:
        try:
            aside = await self._ops.drop_aside(request.volume, request.node, request.dataset)
        except OperationError as error:
            await context.abort(getattr(grpc.StatusCode, error.code), str(error))
        drops = await self._keyspace.list_drops(aside.node)
        return _aside_message(aside, any(d.dataset == aside.dataset for d in drops))

    async def _asides(self, volume: str) -> list[control_pb2.AsideCopy]:
        """Copies kept aside of ``volume`` (every volume's when empty), oldest first."""
        view = await read_view(self._keyspace, (Kind.ASIDES, Kind.DROPS), volume=volume)
        return _aside_messages(view)

    async def _guard(self, context: grpc.aio.ServicerContext, operation: object) -> object:
        try:
            return await operation  # type: ignore[misc]
        except OperationError as error:
            await context.abort(getattr(grpc.StatusCode, error.code), str(error))
        except UnreadableRecord as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))

    async def _volume(self, name: str, context: grpc.aio.ServicerContext) -> control_pb2.Volume:
        return (await self._volume_at(name, context))[0]

    async def _volume_at(
        self, name: str, context: grpc.aio.ServicerContext
    ) -> tuple[control_pb2.Volume, int]:
        """The volume from one view of its records, and the revision it was read at.

        Refused (FAILED_PRECONDITION) if one of its records (not a copy kept
        aside) does not decode: leaving it out would show no owner, mount or copy.
        """
        view = await read_view(self._keyspace, VOLUME_KINDS, volume=name)
        try:
            view.check(name, *REPORTED_UNREADABLE)
        except UnreadableRecord as error:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(error))
        spec = view.volumes.get(name)
        if spec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"volume {name} does not exist")
        assert spec is not None
        message = _volume_message(
            spec.value,
            view.owners.get(name),
            view.moves.get(name),
            view.mounts_of(name),
            view.states_of(name),
            _aside_messages(view),
        )
        return message, view.revision


R = TypeVar("R", MountRecord, NodeState, AsideCopy)


def _replication(request: control_pb2.CreateVolumeRequest) -> Replication:
    return Replication(
        replicas=request.replicas if request.HasField("replicas") else None,
        rpo=request.rpo,
        replace_after=request.replace_after,
    )


def _role(spec: VolumeSpec, owner: Versioned[Owner] | None, node: str) -> str:
    if owner is not None and owner.value.node == node:
        return "owner"
    return "replica" if node in spec.replica_nodes else "stale"


def _rpo_notes(
    spec: VolumeSpec, owner: Versioned[Owner] | None, copies: list[NodeState], now: float
) -> list[str]:
    """Why the volume does not meet its RPO now; empty when it does (or has no replicas)."""
    if not spec.replicas:
        return []
    notes = []
    held = {c.node: c for c in copies}
    missing = spec.replicas - len(spec.replica_nodes)
    if missing:
        notes.append(f"{missing} replica(s) not placed: too few live nodes with room")
    for node in spec.replica_nodes:
        copy = held.get(node)
        if copy is None or not copy.newest_snapshot_at:
            notes.append(f"replica on {node} reports no copy (node down, or being seeded)")
        elif (lag := now - copy.newest_snapshot_at) > spec.rpo_seconds:
            notes.append(
                f"replica on {node} is {lag:.0f}s behind, more than the rpo {spec.rpo_seconds}s"
            )
    ours = held.get(owner.value.node) if owner else None
    if notes and ours is not None and ours.replication_error:
        notes.append(f"owner {ours.node}: {ours.replication_error}")
    return notes


def _by_volume(records: Iterable[R]) -> dict[str, list[R]]:
    """Per-node records (mounts, state) grouped by the volume they are about."""
    grouped: dict[str, list[R]] = {}
    for record in records:
        grouped.setdefault(record.volume, []).append(record)
    return grouped


def _volume_message(
    spec: VolumeSpec,
    owner: Versioned[Owner] | None,
    move: Versioned[Move] | None,
    mounts: list[MountRecord],
    copies: list[NodeState],
    diverged: list[control_pb2.AsideCopy],
) -> control_pb2.Volume:
    """The API's view of one volume from its records."""
    now = time.time()
    notes = _rpo_notes(spec, owner, copies, now)
    volume = control_pb2.Volume(
        name=spec.name,
        size_bytes=spec.size_bytes,
        compression=spec.compression,
        node=spec.node,
        owner=owner.value.node if owner else "",
        epoch=owner.value.epoch if owner else 0,
        deleted=spec.deleted,
        created_at=spec.created_at,
        mounted_on=sorted(m.node for m in mounts),
        create_error=spec.create_error,
        failover=spec.failover,
        failover_after=spec.failover_after,
        copies=[
            control_pb2.Copy(
                node=c.node,
                newest_snapshot=c.snapshots[-1] if c.snapshots else "",
                used_bytes=c.used_bytes,
                writable=c.writable,
                stuck=c.stuck,
                role=_role(spec, owner, c.node),
                newest_snapshot_at=c.newest_snapshot_at,
                lag_seconds=max(0.0, now - c.newest_snapshot_at) if c.newest_snapshot_at else 0.0,
            )
            for c in sorted(copies, key=lambda c: c.node)
        ],
        diverged=diverged,
        replicas=spec.replicas,
        replica_nodes=list(spec.replica_nodes),
        rpo_seconds=spec.rpo_seconds,
        replace_after_seconds=spec.replace_after_seconds,
        meets_rpo=not notes,
        replica_notes=notes,
        replica_history=list(spec.replaced),
    )
    if move is not None:
        m = move.value
        volume.move.CopyFrom(
            control_pb2.MoveStatus(
                source=m.source,
                target=m.target,
                phase=m.phase.value,
                bytes_sent=m.bytes_sent,
                bytes_total=m.bytes_total,
                rate_bps=m.rate_bps,
                error=m.error,
                attempt=m.attempt,
                stuck="; ".join(
                    f"{c.node}: {c.stuck}"
                    for c in sorted(copies, key=lambda c: c.node)
                    if c.stuck and c.node in (m.source, m.target)
                ),
            )
        )
    return volume


def _event_message(event: Event) -> control_pb2.Event:
    return control_pb2.Event(
        volume=event.volume,
        kind=event.kind.value,
        by=event.by,
        at=event.at,
        detail=event.detail,
        pause_seconds=event.pause_seconds,
    )


def _aside_messages(view: ClusterView) -> list[control_pb2.AsideCopy]:
    """The view's copies kept aside, oldest first."""
    return [
        _aside_message(a, view.drop_requested(a))
        for a in sorted(view.asides, key=lambda a: a.kept_at)
    ]


def _aside_message(aside: AsideCopy, drop_requested: bool) -> control_pb2.AsideCopy:
    return control_pb2.AsideCopy(
        node=aside.node,
        dataset=aside.dataset,
        volume=aside.volume,
        kept_at=aside.kept_at,
        epoch=aside.epoch,
        used_bytes=aside.used_bytes,
        reason=aside.reason,
        drop_requested=drop_requested,
    )


async def serve(
    etcd: tuple[str, ...],
    listen: str,
    tls: TlsFiles | None,
    prefix: str,
    metrics_address: str = "",
) -> None:
    """Serve the Control API and gRPC health checking (and metrics, at ``metrics_address``
    unless it is empty) until cancelled.

    etcd is reached over mutual TLS with control's own certificate (etcd user
    ``control``), or in plaintext when control runs insecure.
    """
    client = await asyncio.to_thread(endpoints_client, etcd, tls)
    keyspace = Keyspace(client, prefix)
    gate = KindGate(insecure=tls is None, observe=metrics.observe_call)
    server = grpc.aio.server(interceptors=[gate, EtcdUnreachable()])
    control_pb2_grpc.add_ControlServicer_to_server(ControlService(keyspace, gate), server)
    health_service = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_service, server)
    if tls is None:
        warn_insecure()
        server.add_insecure_port(listen)
    else:
        server.add_secure_port(listen, tls.server_credentials())
    exporter = None
    if metrics_address:
        exporter = await serve_metrics(
            metrics.REGISTRY, metrics_address, contexts(tls, None) if tls else None
        )
    await server.start()
    purging = asyncio.create_task(purge_forever(keyspace), name="purge")
    failover = asyncio.create_task(
        AutoFailover(keyspace, VolumeOps(keyspace, EventLog(keyspace, CONTROL_WRITER))).run(),
        name="auto-failover",
    )
    keeper = asyncio.create_task(ReplicaKeeper(keyspace).run(), name="replicas")
    await health_service.set("ferry.v1.Control", health_pb2.HealthCheckResponse.SERVING)
    await health_service.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "ferry-control serving: listen=%s etcd=%s tls=%s", listen, ",".join(etcd), tls is not None
    )
    try:
        await server.wait_for_termination()
    finally:
        failover.cancel()
        keeper.cancel()
        purging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await purging
        await server.stop(grace=2)
        if exporter is not None:
            await exporter.cleanup()
        await client.close()


@click.command(context_settings={"auto_envvar_prefix": "FERRY", "show_default": True})
@click.option("--etcd", required=True, help="etcd endpoints, HOST:PORT[,HOST:PORT...].")
@click.option("--listen", default="0.0.0.0:7070", help="Address of the Control gRPC API.")
@service_flags(cert_help="Control's certificate (PEM).", key_help="Control's private key (PEM).")
def main(
    etcd: str,
    listen: str,
    tls_ca: str,
    tls_cert: str,
    tls_key: str,
    insecure: bool,
    etcd_prefix: str,
    metrics_address: str,
    log_level: str,
    log_format: str,
) -> None:
    """Run ferry-control: the cluster's API for volumes and nodes."""
    setup_logging(log_level, log_format)
    try:
        tls = from_flags(tls_ca, tls_cert, tls_key, insecure)
        etcd_target(endpoints(etcd))
        if metrics_address:
            parse_address(metrics_address)
    except ValueError as error:
        raise click.UsageError(str(error)) from error
    try:
        asyncio.run(serve(endpoints(etcd), listen, tls, etcd_prefix, metrics_address))
    except KeyboardInterrupt:
        log.info("ferry-control stopped")
