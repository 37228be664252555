"""Standing replicas: the owner keeps each replica node's copy current within the RPO.

One task per volume this node owns with replicas, while it owns it and no
move runs. Each round it takes one snapshot and sends it to every replica
that is due, incrementally from the newest snapshot both hold (full the
first time), then holds that snapshot for the replica (``zfs hold``, tag
``ferry-replica-<node>``; recorded on the dataset, since zfs-fuse cannot
list tags) and releases the replica's previous base. Pruning keeps every
replica's base and the newest snapshots, nothing else, so a replica that
is far behind, or down, still continues incrementally.

Rounds come every ``replication_interval(rpo)`` (a third of the RPO). A
replica whose send fails is retried after a back-off, capped at the
interval; once its newest snapshot is older than the RPO the volume is out
of its RPO: logged (ERROR, once, and when it is back) and reported in this
node's state for ``ferryctl volume get``.

What the receiver checks and keeps aside is the move protocol's (a receive
never forces and never destroys): a replica is an ordinary read-only copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent import metrics
from agent.replication.ports import Peer
from agent.replication.sync import sync_to_peer
from agent.retry import Backoff
from agent.store import VolumeStore
from ferry.cluster.keyspace import Keyspace
from ferry.core.phases import ACTIVE_PHASES
from ferry.core.records import VolumeSpec
from ferry.core.snapshots import prunable_with_replicas, replication_interval

log = logging.getLogger(__name__)

PeerLookup = Callable[[str], Awaitable[Peer]]


@dataclass
class _Replica:
    """What the owner knows of one replica between rounds."""

    synced_at: float
    """Wall time of the newest snapshot the replica confirmed (or when replication began)."""
    succeeded_at: float = 0.0
    """When the last send to it succeeded (0: none yet)."""
    due: float = 0.0
    error: str = ""
    out_of_rpo: bool = False
    backoff: Backoff = field(default_factory=lambda: Backoff(first=0.5, cap=15.0))


class Replicator:
    """Runs the replication loop of each volume this node owns with replicas."""

    def __init__(
        self, node: str, keyspace: Keyspace, store: VolumeStore, connect: PeerLookup
    ) -> None:
        self._node = node
        self._keyspace = keyspace
        self._store = store
        self._connect = connect
        self._errors: dict[str, str] = {}

    def error(self, volume: str) -> str:
        """Why keeping the volume's replicas current fails now; empty while it works."""
        return self._errors.get(volume, "")

    async def run(self, volume: str) -> None:
        """Replicate until this node no longer owns the volume, a move starts, or the
        volume has no replicas any more."""
        replicas: dict[str, _Replica] = {}
        backoff = Backoff()
        try:
            while True:
                spec = await self._current(volume)
                if spec is None:
                    return
                started = time.monotonic()
                interval = replication_interval(spec.rpo_seconds)
                try:
                    await self._round(volume, spec, replicas)
                    backoff.reset()
                except Exception as error:
                    # Snapshot or hold failed here (not one replica's send): all wait.
                    self._errors[volume] = f"{self._node}: {error}"
                    delay = min(backoff.next(), interval)
                    log.warning(
                        "replication round failed: volume=%s error=%s retry_in=%.1fs",
                        volume,
                        error,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
        finally:
            self._errors.pop(volume, None)
            metrics.forget_replication(volume)

    async def _current(self, volume: str) -> VolumeSpec | None:
        """The spec, while this node should replicate the volume; None once it should stop."""
        spec = await self._keyspace.get_volume(volume)
        owner = await self._keyspace.get_owner(volume)
        move = await self._keyspace.get_move(volume)
        if spec is None or spec.value.deleted or owner is None or owner.value.node != self._node:
            return None
        if move is not None and move.value.phase in ACTIVE_PHASES:
            return None  # the move sends what is needed; replication resumes after it
        if not spec.value.replicas:
            await self._drop_unlisted(volume, [])
            return None
        return spec.value

    async def _round(self, volume: str, spec: VolumeSpec, replicas: dict[str, _Replica]) -> None:
        owner = await self._keyspace.get_owner(volume)
        if owner is None:
            return
        epoch = owner.value.epoch
        targets = [node for node in spec.replica_nodes if node != self._node]
        for gone in set(replicas) - set(targets):
            del replicas[gone]
        await self._drop_unlisted(volume, targets)
        for node in targets:
            if node not in replicas:
                replicas[node] = _Replica(synced_at=await self._reported_at(volume, node))
        due = [node for node in targets if replicas[node].due <= time.monotonic()]
        for node in due:
            # One replica after another: each send holds its base and snapshot, and the
            # record of bases is rewritten after each.
            taken_at = time.time()
            try:
                sent = await self._send(volume, epoch, node)
            except Exception as error:
                self._settle(volume, node, replicas[node], error, spec, taken_at)
                continue
            self._settle(volume, node, replicas[node], sent, spec, taken_at)
        if due:
            await self._prune(volume)
        self._check_rpo(volume, spec, replicas)
        metrics.show_replication(
            metrics.ReplicationView(
                volume=volume,
                rpo_seconds=spec.rpo_seconds,
                unplaced=max(0, spec.replicas - len(spec.replica_nodes)),
                replicas=tuple(
                    metrics.ReplicaView(node, replica.synced_at, replica.succeeded_at)
                    for node, replica in sorted(replicas.items())
                ),
            )
        )

    async def _reported_at(self, volume: str, node: str) -> float:
        """When the newest snapshot the replica last reported was taken; now for a replica
        that reports none yet (being seeded: it has the RPO to get its first copy)."""
        state = await self._keyspace.get_state(node, volume)
        return state.newest_snapshot_at if state and state.newest_snapshot_at else time.time()

    async def _send(self, volume: str, epoch: int, node: str) -> int:
        """Bring ``node`` up to a new snapshot and hold it as that replica's base; returns
        the bytes sent. The other replicas' bases are kept by the sync's own pruning."""
        bases = await self._store.replica_bases(volume)
        others = [short for peer, short in bases.items() if peer != node]
        sent = await sync_to_peer(
            self._store,
            await self._connect(node),
            volume,
            epoch=epoch,
            sender=self._node,
            keep=others,
        )
        await self._store.set_replica_base(volume, node, sent.snapshot.name)
        return sent.bytes_sent

    def _settle(
        self,
        volume: str,
        node: str,
        replica: _Replica,
        result: int | Exception,
        spec: VolumeSpec,
        taken_at: float,
    ) -> None:
        """Record one replica's send: current as of ``taken_at``, or due again after a
        back-off (capped at the interval) with the error kept for the status."""
        if isinstance(result, Exception):
            delay = min(replica.backoff.next(), replication_interval(spec.rpo_seconds))
            replica.due = time.monotonic() + delay
            replica.error = f"{node}: {result}"
            log.warning(
                "replication failed: volume=%s replica=%s error=%s retry_in=%.1fs",
                volume,
                node,
                result,
                delay,
            )
            return
        replica.synced_at = taken_at
        replica.succeeded_at = time.time()
        replica.due = 0.0
        replica.error = ""
        replica.backoff.reset()
        log.debug("replicated: volume=%s replica=%s bytes=%d", volume, node, result)

    def _check_rpo(self, volume: str, spec: VolumeSpec, replicas: dict[str, _Replica]) -> None:
        """Log the moment a replica falls out of the RPO or is back; keep the reason."""
        now = time.time()
        problems = []
        for node, replica in sorted(replicas.items()):
            late = now - replica.synced_at > spec.rpo_seconds
            if late and not replica.out_of_rpo:
                log.error(
                    "volume out of its RPO: volume=%s replica=%s lag=%.0fs rpo=%ds error=%s",
                    volume,
                    node,
                    now - replica.synced_at,
                    spec.rpo_seconds,
                    replica.error or "-",
                )
            elif replica.out_of_rpo and not late:
                log.info("volume back within its RPO: volume=%s replica=%s", volume, node)
            replica.out_of_rpo = late
            if replica.error:
                problems.append(replica.error)
        if len(spec.replica_nodes) < spec.replicas:
            problems.append(
                f"{spec.replicas - len(spec.replica_nodes)} replica(s) not placed: too few "
                "live nodes with room"
            )
        self._errors[volume] = "; ".join(problems)

    async def _prune(self, volume: str) -> None:
        local = [ref.name for ref in await self._store.snapshots(volume) or []]
        bases = await self._store.replica_bases(volume)
        await self._store.destroy_snapshots(volume, prunable_with_replicas(local, bases.values()))

    async def _drop_unlisted(self, volume: str, targets: list[str]) -> None:
        """Release the holds of nodes that are no longer replicas: their bases may go."""
        for node in await self._store.replica_bases(volume):
            if node not in targets:
                await self._store.drop_replica_base(volume, node)
                log.info("replica hold released: volume=%s node=%s", volume, node)
