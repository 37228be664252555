"""The convergence step as a pure function: ``plan(desired, actual) -> actions``.

Level-triggered: it looks only at what etcd wants and what this node holds
now, never at what happened before, so running it again after a crash at
any point picks up where the node stands. The executor applies the actions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ferry.core.phases import ACTIVE_PHASES, MovePhase, Writer, writer_of
from ferry.core.records import Move, Owner, VolumeSpec
from ferry.core.snapshots import is_fenced


@dataclass(frozen=True)
class LocalVolume:
    """A volume dataset as this node holds it."""

    name: str
    snapshots: tuple[str, ...] = ()
    writable: bool = False
    mounted: bool = False
    uid: str = ""
    used_bytes: int = 0
    newest_snapshot_at: float = 0.0


@dataclass(frozen=True)
class Desired:
    """What etcd says, as far as it concerns this node."""

    node: str
    volumes: Mapping[str, VolumeSpec] = field(default_factory=dict)
    owners: Mapping[str, Owner] = field(default_factory=dict)
    moves: Mapping[str, Move] = field(default_factory=dict)
    unreadable: frozenset[str] = frozenset()
    """Volumes with a record that did not decode: left alone until it is fixed, since
    planning from the rest (no owner, say) could create or activate the wrong copy."""


@dataclass(frozen=True)
class Actual:
    """What this node holds, and which move drivers already run here."""

    volumes: Mapping[str, LocalVolume] = field(default_factory=dict)
    running_moves: frozenset[str] = frozenset()
    replicating: frozenset[str] = frozenset()
    """Volumes whose replication loop runs here now."""
    in_use: frozenset[str] = frozenset()
    """Mounted volumes that something here uses (a Docker mount ID, or a user the kernel
    shows): they stay mounted."""


@dataclass(frozen=True)
class Create:
    """Create the dataset of a new volume placed here, then claim ownership at epoch 1."""

    volume: str
    size_bytes: int
    compression: str
    uid: str


@dataclass(frozen=True)
class Claim:
    """The dataset exists here but nobody owns the volume yet: claim it."""

    volume: str


@dataclass(frozen=True)
class Fence:
    """A writable copy here that this node no longer owns: stop writes now."""

    volume: str


@dataclass(frozen=True)
class Rejoin:
    """A copy here that was its owner's and was fenced (by this node, or frozen when its lease
    went unconfirmed) while another node took the volume over: keep what it wrote after the
    newest snapshot the owner has aside, and make it a replica from that snapshot."""

    volume: str


@dataclass(frozen=True)
class Activate:
    """This node owns the volume at ``epoch``: make the copy writable (a Mount mounts it)."""

    volume: str
    epoch: int


@dataclass(frozen=True)
class UnmountUnused:
    """The owner's copy is mounted and nothing here uses it: unmount it. It stays writable,
    and the next Mount mounts it again; the executor checks "unused" again first."""

    volume: str


@dataclass(frozen=True)
class DriveMove:
    """This node owns a volume with a move away from it: run the move protocol."""

    volume: str


@dataclass(frozen=True)
class Replicate:
    """This node owns a volume with replicas and no move: keep the replicas current."""

    volume: str


@dataclass(frozen=True)
class Destroy:
    """The volume was deleted: destroy the local copy."""

    volume: str


@dataclass(frozen=True)
class SetAside:
    """The copy here is a deleted namesake's (another uid): keep it aside, never adopt it."""

    volume: str


@dataclass(frozen=True)
class Missing:
    """This node owns the volume but holds no copy: report, never invent data."""

    volume: str


Action = (
    Create
    | Claim
    | Fence
    | Rejoin
    | Activate
    | UnmountUnused
    | DriveMove
    | Replicate
    | Destroy
    | SetAside
    | Missing
)


def plan(desired: Desired, actual: Actual) -> list[Action]:
    """The actions that bring this node closer to the desired state, one volume at a time."""
    names = sorted(set(desired.volumes) | set(actual.volumes))
    actions: list[Action] = []
    for name in names:
        actions.extend(_plan_volume(name, desired, actual))
    return actions


def _plan_volume(name: str, desired: Desired, actual: Actual) -> list[Action]:
    me = desired.node
    spec = desired.volumes.get(name)
    owner = desired.owners.get(name)
    move = desired.moves.get(name)
    local = actual.volumes.get(name)
    if spec is None or name in desired.unreadable:
        # No desired state at all (etcd wiped, or a foreign dataset), or not all of it
        # readable: touch nothing.
        return []
    if spec.deleted:
        if local is None:
            return []  # control purges the records once no node holds a copy
        if local.mounted and local.writable and owner is not None and owner.node == me:
            return [Fence(name), Destroy(name)]
        return [Destroy(name)]
    if local is not None and spec.uid and local.uid and local.uid != spec.uid:
        return [SetAside(name)]
    if owner is None:
        if spec.node != me:
            return []
        if local is None:
            # A create that failed for good is not retried: the error is in the spec.
            return (
                []
                if spec.create_error
                else [Create(name, spec.size_bytes, spec.compression, spec.uid)]
            )
        return [Claim(name)]
    if owner.node != me:
        if local is None or name in actual.running_moves:
            # A running move driver is this node's handoff after its swap: it unmounts the
            # frozen copy itself; that copy is no old owner's to rejoin.
            return []
        if local.writable:
            return [Fence(name)]
        if local.mounted or any(is_fenced(snapshot) for snapshot in local.snapshots):
            return [Rejoin(name)]
        return []
    if local is None:
        return [Missing(name)]
    if move is not None and move.source == me and move.phase in ACTIVE_PHASES:
        return [] if name in actual.running_moves else [DriveMove(name)]
    if not local.writable or _to_end_here(move, me):
        return [Activate(name, owner.epoch)]
    actions: list[Action] = []
    if local.mounted and name not in actual.in_use:
        actions.append(UnmountUnused(name))
    if spec.replicas and name not in actual.replicating:
        actions.append(Replicate(name))
    return actions


def _to_end_here(move: Move | None, me: str) -> bool:
    """A move into this node that only its activation ends: the agent died between making the
    copy writable and writing ``done``, and activating again (a no-op for the copy) ends it."""
    return (
        move is not None
        and move.target == me
        and writer_of(move.phase, MovePhase.DONE) is Writer.TARGET
    )
