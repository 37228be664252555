"""What control does with volumes: validation, placement, and the etcd writes for each request.

The gRPC service (``control.server``) and the agent's Docker plugin both
call these, so a volume is validated and placed the same way whichever door
the request came through.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ferry.cluster.events import EventLog
from ferry.cluster.keyspace import AlreadyExists, Keyspace, NodeChanged, Versioned
from ferry.core import compression, fencing
from ferry.core.failover import FailoverRefused, choose, loss
from ferry.core.phases import ACTIVE_PHASES, Writer, check
from ferry.core.placement import Candidate, after_move, place_replicas
from ferry.core.records import (
    AsideCopy,
    AsideDrop,
    EventKind,
    Move,
    MovePhase,
    NodeInfo,
    Owner,
    VolumeSpec,
    parse_duration,
    parse_size,
)

log = logging.getLogger(__name__)

# lz4 is accepted where every node's ZFS has it; zfs-fuse has not, so control offers the common set.


class OperationError(Exception):
    """A request that cannot be carried out; ``code`` names the gRPC status it maps to."""

    code = "FAILED_PRECONDITION"


class InvalidArgument(OperationError):
    code = "INVALID_ARGUMENT"


class NotFound(OperationError):
    code = "NOT_FOUND"


class Exists(OperationError):
    code = "ALREADY_EXISTS"


class BeingDeleted(Exists):
    """The name belongs to a deleted volume whose data agents are still destroying.

    Not ``ALREADY_EXISTS``: the create succeeds once the agents are done, and a
    caller that takes an existing volume as it is (the Docker plugin) must not
    take this one."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(OperationError):
    code = "PERMISSION_DENIED"


class Conflict(OperationError):
    code = "ABORTED"


# The smallest volume control accepts. Measured on zfs-fuse (ashift 12): an empty
# dataset refers 112 KiB, and a create with a smaller refquota fails "out of space".
# 1 MiB covers that with room for a few files; a smaller size is refused here
# rather than failing on the node.
MIN_SIZE_BYTES = 1 << 20

# Replicas: the RPO when none is given, the shortest one the owner's interval (a third of
# it) can serve on zfs-fuse, and how long a replica's node may be down before it is replaced.
DEFAULT_RPO_SECONDS = 60
MIN_RPO_SECONDS = 3
DEFAULT_REPLACE_AFTER_SECONDS = 300
MIN_REPLACE_AFTER_SECONDS = 10
MAX_REPLICAS = 8


@dataclass(frozen=True)
class Replication:
    """What a create or update asks of replicas; None fields stay as they are."""

    replicas: int | None = None
    rpo: str = ""
    replace_after: str = ""


# A node rewrites its record when its free space changes (every few seconds at
# most), so a create rarely needs a second read of it; more than a few means
# the node is flapping.
CREATE_ATTEMPTS = 5


@dataclass(frozen=True)
class FailedOver:
    """A failover done: who owns the volume now, from which snapshot, and what is lost."""

    volume: str
    old_owner: str
    node: str
    epoch: int
    snapshot: str
    lost: str


class VolumeOps:
    """Volume requests against the keyspace."""

    def __init__(self, keyspace: Keyspace, events: EventLog | None = None) -> None:
        self._keyspace = keyspace
        self._events = events

    async def create(
        self,
        name: str,
        size: str,
        compression: str = "",
        node: str = "",
        created_by_node: str = "",
        replication: Replication = Replication(),
        failover: str = "",
        failover_after: float = 0.0,
    ) -> VolumeSpec:
        """Validate and store a new volume; without a node, the live node with most free space.

        ``created_by_node`` is the node whose Docker plugin asked (empty for ferryctl).
        Empty ``failover``/0 ``failover_after`` take the defaults (manual, 30 s).
        Replicas are placed at once, on other live nodes with room; too few is refused.
        """
        size_bytes = self._size(size) if size else 1 << 30
        compression = self._compression(compression or "off")
        policy = self._failover(failover or "manual", failover_after)
        for _ in range(CREATE_ATTEMPTS):
            target = await self._live_node(node) if node else await self._roomiest()
            spec = self._new_spec(name, size_bytes, compression, target.value, created_by_node)
            spec = await self._replicated(spec, replication)
            spec = replace(spec, failover=policy[0], failover_after=policy[1])
            if await self._store_new(spec, target.revision):
                log.info("volume created: volume=%s node=%s size=%d", name, spec.node, size_bytes)
                return spec
        raise Conflict(
            f"node {spec.node} changed {CREATE_ATTEMPTS} times while creating {name}; "
            f"check 'ferryctl node list' and retry"
        )

    async def _store_new(self, spec: VolumeSpec, node_revision: int) -> bool:
        """Write ``spec`` while its node is as read; False if the node changed meanwhile."""
        try:
            await self._keyspace.create_volume(spec, node_revision)
        except NodeChanged:
            return False
        except AlreadyExists as error:
            existing = await self._keyspace.get_volume(spec.name)
            if existing is not None and existing.value.deleted:
                raise BeingDeleted(
                    f"volume {spec.name} was deleted and its data is being destroyed; "
                    f"create it again once 'ferryctl volume list' no longer shows it"
                ) from error
            raise Exists(f"volume {spec.name} already exists") from error
        return True

    @staticmethod
    def _new_spec(
        name: str, size_bytes: int, compression: str, target: NodeInfo, created_by_node: str
    ) -> VolumeSpec:
        """The spec to store, if the size fits what ``target`` last reported free."""
        if size_bytes > target.free_bytes:
            raise InvalidArgument(
                f"size {size_bytes} bytes is more than node {target.name} has free "
                f"({target.free_bytes} bytes); choose a smaller size or another node"
            )
        try:
            return VolumeSpec(
                name=name,
                size_bytes=size_bytes,
                compression=compression,
                node=target.name,
                uid=secrets.token_hex(8),
                created_by_node=created_by_node,
            )
        except ValueError as error:
            raise InvalidArgument(str(error)) from error

    async def update(
        self,
        name: str,
        size: str = "",
        compression: str = "",
        replication: Replication = Replication(),
        failover: str = "",
        failover_after: float = 0.0,
    ) -> VolumeSpec:
        """Change size, compression or replication (the owner applies them); empty values stay.

        More replicas are placed at once (refused if too few nodes can take them); fewer
        drop the last placed ones, whose copies stay as stale read-only copies.
        """
        current = await self._existing(name)
        changes: dict[str, object] = {}
        if failover or failover_after:
            changes["failover"], changes["failover_after"] = self._failover(
                failover or current.value.failover,
                failover_after or current.value.failover_after,
            )
        replicated = await self._replicated(current.value, replication)
        if replicated != current.value:
            changes.update(
                replicas=replicated.replicas,
                rpo_seconds=replicated.rpo_seconds,
                replace_after_seconds=replicated.replace_after_seconds,
                replica_nodes=replicated.replica_nodes,
            )
        if size:
            changes["size_bytes"] = self._size(size)
            # A new size is a new try for a node whose create failed.
            changes["create_error"] = ""
        if compression:
            changes["compression"] = self._compression(compression)
        spec = replace(current.value, **changes)  # type: ignore[arg-type]
        if spec != current.value and not await self._keyspace.update_volume(spec, current.revision):
            raise Conflict(f"volume {name} changed while updating it; retry")
        return spec

    async def record_create_failure(
        self,
        name: str,
        tried: tuple[str, int],
        error: str,
        refusal: Callable[[VolumeSpec], str | None] = lambda spec: None,
    ) -> None:
        """Store why the node could not create the volume, on the spec it tried (``tried``:
        uid and size), so that it stops retrying and ``volume get`` and Docker say why; a
        namesake created since, or a new size (a new try), is left alone."""
        current = await self._existing(name)
        if (current.value.uid, current.value.size_bytes) != tried:
            return
        refused = refusal(current.value)
        if refused is not None:
            raise PermissionDenied(refused)
        failed = replace(current.value, create_error=error)
        if failed != current.value and not await self._keyspace.update_volume(
            failed, current.revision
        ):
            raise Conflict(f"volume {name} changed while recording its failed create; retry")
        log.error(
            "create failed: volume=%s node=%s size=%d error=%s; not retried: give it a size "
            "the node can create (ferryctl volume update --size) or delete it",
            name,
            current.value.node,
            current.value.size_bytes,
            error,
        )

    async def delete(
        self,
        name: str,
        force: bool = False,
        refusal: Callable[[VolumeSpec], str | None] = lambda spec: None,
    ) -> str:
        """Mark deleted (agents destroy the data); refuses while mounted unless forced.

        Unforced, the write itself requires that no mount record exists, so a
        container mounting the volume meanwhile makes the delete fail, not both win.
        ``refusal`` judges the spec as read (the caller's limits); the write
        compares that spec's revision, so the judgement holds at the write.
        Returns what the operator must know about data on a node that is down.
        """
        current = await self._existing(name)
        refused = refusal(current.value)
        if refused is not None:
            raise PermissionDenied(refused)
        if not force:
            await self._refuse_if_mounted(name)
        spec = replace(current.value, deleted=True)
        if force:
            stored = await self._keyspace.update_volume(spec, current.revision)
        else:
            stored = await self._keyspace.update_volume_if_unmounted(spec, current.revision)
        if not stored:
            if not force:
                await self._refuse_if_mounted(name)
            raise Conflict(f"volume {name} changed while deleting it; retry")
        log.info("volume deleted: volume=%s", name)
        owner = await self._keyspace.get_owner(name)
        if owner is None or await self._keyspace.get_node(owner.value.node) is not None:
            return ""
        down = owner.value.node
        log.warning("volume deleted while its owner is down: volume=%s owner=%s", name, down)
        return (
            f"its owner {down} is down and still holds its data in <pool>/ferry/{name}: when "
            f"{down} is back, Ferry leaves that copy alone and unlisted (it never destroys "
            f"data it has no record of; a new volume of this name placed there sets it "
            f"aside); destroy it there with 'zfs destroy -r' once you no longer need it"
        )

    async def move(self, name: str, node: str) -> Move | None:
        """Place the volume on ``node``; returns the move record, or None if it is there already."""
        current = await self._existing(name)
        owner = await self._keyspace.get_owner(name)
        if owner is None:
            raise OperationError(f"volume {name} is not created on any node yet; retry shortly")
        existing = await self._keyspace.get_move(name)
        active = existing is not None and existing.value.phase in ACTIVE_PHASES
        if active and existing is not None and existing.value.source == node == owner.value.node:
            # Whether or not the source is up: the volume stays where it is either way.
            return await self._cancel(current, owner, existing)
        target = await self._live_node(node)
        if active and existing is not None:
            if existing.value.target == node:
                return existing.value
            raise OperationError(
                f"volume {name} is already moving to {existing.value.target} "
                f"(phase {existing.value.phase.value}); wait for it to finish, or cancel it "
                f"('ferryctl move cancel {name}' moves it back to {existing.value.source})"
            )
        if owner.value.node == node:
            if current.value.node != node and not await self._keyspace.update_volume(
                replace(current.value, node=node), current.revision
            ):
                raise Conflict(f"volume {name} changed while moving it; retry")
            return None
        await self._refuse_if_down(name, owner.value.node)
        await self._refuse_without_room(name, owner.value.node, target.value)
        move = Move(volume=name, source=owner.value.node, target=node, started_at=time.time())
        check(existing.value.phase if existing else None, move.phase, Writer.CONTROL)
        if not await self._keyspace.request_move(
            current,
            owner,
            move,
            existing.revision if existing else None,
            replica_nodes=after_move(current.value.replica_nodes, move.source, node),
        ):
            raise Conflict(f"volume {name} changed while moving it (another request?); retry")
        log.info("move requested: volume=%s from=%s to=%s", name, move.source, node)
        return move

    async def failover(self, name: str, to: str = "") -> FailedOver:
        """Promote a standby copy while the owner's node is down (ferry.core.failover's rules).

        The write compares the owner record, the owner's node record (absent), the
        target's (present), the spec and the move as read here: if the owner came
        back or anything else changed meanwhile, Conflict, and nothing changed.
        """
        current = await self._existing(name)
        owner = await self._keyspace.get_owner(name)
        if owner is None:
            raise OperationError(
                f"volume {name} is not created on any node yet; nothing to fail over"
            )
        old = owner.value.node
        live = {n.value.name for n in await self._keyspace.list_nodes()}
        try:
            chosen = choose(name, old, old in live, await self._keyspace.list_state(name), to)
        except FailoverRefused as refused:
            raise OperationError(str(refused)) from refused
        if chosen.node not in live:
            raise OperationError(f"node {chosen.node} went down meanwhile; retry")
        move = await self._keyspace.get_move(name)
        ended = None
        if move is not None and move.value.phase in ACTIVE_PHASES:
            check(move.value.phase, MovePhase.FAILED, Writer.CONTROL)
            ended = replace(
                move.value,
                phase=MovePhase.FAILED,
                error=f"ended: {old} was lost and {name} failed over to {chosen.node}",
                updated_at=time.time(),
            )
        if not await self._keyspace.fail_over(current, owner, chosen.node, move, ended):
            raise Conflict(
                f"volume {name} changed while failing it over ({old} back, or another "
                f"request?); check 'ferryctl volume get {name}' and retry"
            )
        seen = await self._keyspace.get_seen(old)
        lost = loss(old, chosen, seen.at if seen else 0.0)
        log.warning(
            "failed over: volume=%s from=%s to=%s epoch=%d snapshot=%s lost=%r",
            name,
            old,
            chosen.node,
            owner.value.epoch + 1,
            chosen.snapshot,
            lost,
        )
        if self._events is not None:
            await self._events.record(
                name,
                EventKind.FAILED_OVER,
                f"{old} -> {chosen.node} at epoch {owner.value.epoch + 1} from {chosen.snapshot}; "
                f"{lost}",
            )
        return FailedOver(name, old, chosen.node, owner.value.epoch + 1, chosen.snapshot, lost)

    async def _cancel(
        self, spec: Versioned[VolumeSpec], owner: Versioned[Owner], move: Versioned[Move]
    ) -> Move:
        """End a move that has not handed off: the volume stays on its source.

        The source's handoff swaps ownership only while the move record is as it
        last wrote it, so either this write or the swap wins, never both.
        """
        source = move.value.source
        cancelled = replace(
            move.value,
            phase=MovePhase.FAILED,
            error=f"cancelled: moved back to {source} by request",
            updated_at=time.time(),
        )
        check(move.value.phase, cancelled.phase, Writer.CONTROL)
        if not await self._keyspace.request_move(
            spec,
            owner,
            cancelled,
            move.revision,
            placement=source,
            replica_nodes=after_move(spec.value.replica_nodes, move.value.target, source),
        ):
            raise Conflict(
                f"volume {spec.value.name} changed while cancelling its move (it may have "
                f"been handed off to {move.value.target}); check 'ferryctl volume get' and retry"
            )
        log.info("move cancelled: volume=%s stays_on=%s", spec.value.name, source)
        return cancelled

    async def _replicated(self, spec: VolumeSpec, wanted: Replication) -> VolumeSpec:
        """``spec`` with the replication asked for, its replicas placed off its desired node
        (the owner's, or during a move its target's: the source is then a replica's node);
        InvalidArgument for a bad value or too few nodes to place every replica on."""
        count = spec.replicas if wanted.replicas is None else wanted.replicas
        if not 0 <= count <= MAX_REPLICAS:
            raise InvalidArgument(f"replicas must be 0 to {MAX_REPLICAS}, got {count}")
        rpo = self._duration("rpo", wanted.rpo) if wanted.rpo else spec.rpo_seconds
        replace_after = (
            self._duration("replace_after", wanted.replace_after)
            if wanted.replace_after
            else spec.replace_after_seconds
        )
        if count:
            rpo = rpo or DEFAULT_RPO_SECONDS
            replace_after = replace_after or DEFAULT_REPLACE_AFTER_SECONDS
        if count and rpo < MIN_RPO_SECONDS:
            raise InvalidArgument(
                f"rpo {rpo}s is below the shortest Ferry keeps, {MIN_RPO_SECONDS}s"
            )
        if count and replace_after < MIN_REPLACE_AFTER_SECONDS:
            raise InvalidArgument(
                f"replace_after {replace_after}s is below the shortest, "
                f"{MIN_REPLACE_AFTER_SECONDS}s (a node restarting would lose its replica)"
            )
        owner = spec.node
        live = [
            Candidate(n.value.name, n.value.free_bytes) for n in await self._keyspace.list_nodes()
        ]
        nodes = place_replicas(count, owner, spec.replica_nodes, live, spec.size_bytes)
        if len(nodes) < count:
            others = ", ".join(c.name for c in live if c.name != owner) or "none"
            raise InvalidArgument(
                f"volume {spec.name} wants {count} replica(s) besides its owner {owner}, but "
                f"only {len(nodes)} other live node(s) can hold {spec.size_bytes} bytes "
                f"(others live: {others}); start more agents or ask for fewer replicas"
            )
        return replace(
            spec,
            replicas=count,
            rpo_seconds=rpo if count else 0,
            replace_after_seconds=replace_after if count else 0,
            replica_nodes=nodes,
        )

    @staticmethod
    def _duration(what: str, text: str) -> int:
        try:
            return parse_duration(text)
        except ValueError as error:
            raise InvalidArgument(f"{what}: {error}") from error

    async def _refuse_if_down(self, name: str, source: str) -> None:
        """A move copies from its source: refused up front while that node is down."""
        if await self._keyspace.get_node(source) is None:
            raise OperationError(
                f"volume {name} is on {source}, which is down: a move copies from there, so it "
                f"cannot start until {source} is back (start its agent; 'ferryctl node list' "
                f"shows it once it is)"
            )

    async def _refuse_without_room(self, name: str, source: str, target: NodeInfo) -> None:
        """Refused up front when what the source holds cannot fit in what ``target`` has free
        (less what the target already holds of it); else every retry resent it all."""
        held = {state.node: state.used_bytes for state in await self._keyspace.list_state(name)}
        if source not in held:
            return  # not reported yet: the move's own errors will say
        needed = held[source] - held.get(target.name, 0)
        if needed > target.free_bytes:
            raise OperationError(
                f"node {target.name} has {target.free_bytes} bytes free and volume {name} "
                f"holds {held[source]} bytes on {source} ({needed} more than {target.name} has "
                f"of it): free space on {target.name} or move it to another node"
            )

    async def drop_aside(self, volume: str, node: str, dataset: str) -> AsideCopy:
        """Ask ``node`` to destroy one copy of ``volume`` it keeps aside, as it reported it.

        Only what a live node reports can be named, so a typo or a copy of
        another volume is refused with what exists; the node's agent does the rest.
        """
        reported = await self._keyspace.list_asides(node) if node else []
        for aside in reported:
            if (aside.volume, aside.dataset) == (volume, dataset):
                await self._keyspace.request_drop(AsideDrop(node, volume, dataset))
                log.info(
                    "drop of a copy kept aside requested: volume=%s node=%s dataset=%s",
                    volume,
                    node,
                    dataset,
                )
                return aside
        theirs = ", ".join(a.dataset for a in reported if a.volume == volume) or "none"
        raise NotFound(
            f"node {node or '(none given)'} reports no copy {dataset} of {volume} kept aside "
            f"(it reports: {theirs}); 'ferryctl volume aside list {volume}' shows what live "
            "nodes keep"
        )

    async def _refuse_if_mounted(self, name: str) -> None:
        mounts = await self._keyspace.list_mounts(name)
        if mounts:
            where = ", ".join(sorted({m.node for m in mounts}))
            raise OperationError(
                f"volume {name} is mounted on {where}; stop its containers or delete with --force"
            )

    @staticmethod
    def _size(text: str) -> int:
        try:
            size = parse_size(text)
        except ValueError as error:
            raise InvalidArgument(str(error)) from error
        if size < MIN_SIZE_BYTES:
            raise InvalidArgument(
                f"size {text!r} ({size} bytes) is below the smallest volume, 1M "
                f"({MIN_SIZE_BYTES} bytes): an empty dataset alone takes 112K; choose 1M or more"
            )
        return size

    @staticmethod
    def _failover(mode: str, after: float) -> tuple[str, float]:
        """The failover mode and delay to store; 0 s means the default."""
        after = after or fencing.DEFAULT_FAILOVER_AFTER_SECONDS
        try:
            fencing.check_failover(mode, after)
        except ValueError as error:
            raise InvalidArgument(str(error)) from error
        return mode, after

    @staticmethod
    def _compression(value: str) -> str:
        if value not in compression.EVERYWHERE:
            raise InvalidArgument(
                f"invalid compression {value!r}: "
                f"use one of {', '.join(sorted(compression.EVERYWHERE))}"
            )
        return value

    async def _existing(self, name: str) -> Versioned[VolumeSpec]:
        current = await self._keyspace.get_volume(name)
        if current is None or current.value.deleted:
            raise NotFound(f"volume {name} does not exist")
        return current

    async def _live_node(self, node: str) -> Versioned[NodeInfo]:
        info = await self._keyspace.get_node(node)
        if info is None:
            known = ", ".join(n.value.name for n in await self._keyspace.list_nodes()) or "none"
            raise OperationError(f"node {node!r} is unknown or down (live nodes: {known})")
        return info

    async def _roomiest(self) -> Versioned[NodeInfo]:
        nodes = await self._keyspace.list_nodes()
        if not nodes:
            raise OperationError("no live nodes: start ferry-agent on at least one host")
        return max(nodes, key=lambda n: (n.value.free_bytes, n.value.name))
