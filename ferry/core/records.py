"""Ferry's state records: immutable, checked at construction, stored as versioned JSON.

Every record serialises with ``"v": SCHEMA_VERSION``; a reader refuses a
record from a newer schema instead of guessing at it.
"""

from __future__ import annotations

import functools
import json
import re
import time
from dataclasses import asdict, dataclass, field, fields
from enum import Enum, StrEnum
from typing import Any, Self

from ferry.core import compression, fencing, names
from ferry.core.phases import MovePhase

SCHEMA_VERSION = 1

_UID = re.compile(r"^[0-9a-f]{0,32}$")
_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_DURATION = re.compile(r"^\s*(\d+)\s*([smh]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


def validate_volume_name(name: str) -> str:
    """A volume name by Docker's and ZFS's rules; ValueError with the rule otherwise."""
    try:
        return names.validate_volume_name(name)
    except names.InvalidName as error:
        raise ValueError(f"invalid volume name {name!r}: {error.reason}") from error


def check_node_name(name: str) -> str:
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise ValueError(
            f"invalid node name {name!r}: use lowercase letters, digits and '-', up to 63"
        )
    return name


def parse_size(text: str | int) -> int:
    """Bytes from ``1048576``, ``512M``, ``10G``, ``1.5GiB``; binary units; must be positive."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(str(text))
        if match is None:
            raise ValueError(f"invalid size {text!r}: use bytes or a number with K, M, G, T or P")
        size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"invalid size {text!r}: must be positive")
    return size


def parse_duration(text: str | int) -> int:
    """Whole seconds from ``90``, ``15s``, ``5m``, ``1h``; must be positive."""
    if isinstance(text, int):
        seconds = text
    else:
        match = _DURATION.match(str(text))
        if match is None:
            raise ValueError(f"invalid duration {text!r}: use seconds or a number with s, m or h")
        seconds = int(match.group(1)) * _SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be positive")
    return seconds


class _Record:
    """JSON (de)serialisation with the schema version, for frozen dataclasses."""

    def to_json(self) -> bytes:
        data = asdict(self)  # type: ignore[call-overload]
        return json.dumps({"v": SCHEMA_VERSION, **data}, default=_encode).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> Self:
        """The record in ``raw``; ValueError, saying why, for anything else."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} record is not a JSON object")
        version = data.pop("v", None)
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"{cls.__name__} record has schema version {version}; this Ferry reads "
                f"{SCHEMA_VERSION}: upgrade Ferry on this host"
            )
        known = _field_names(cls)  # type: ignore[arg-type]
        values = {}
        for key, value in data.items():
            if key in known:
                values[key] = tuple(value) if isinstance(value, list) else value
        try:
            return cls(**values)
        except TypeError as error:
            raise ValueError(f"{cls.__name__} record does not fit its schema: {error}") from error


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    """A record class's field names, worked out once: a listing decodes thousands."""
    return frozenset(f.name for f in fields(cls))


def _encode(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot store {value!r}")


@dataclass(frozen=True, kw_only=True)
class VolumeSpec(_Record):
    """Desired state of a volume: what control writes, agents converge to.

    Keyword-only: ``node`` and ``compression`` are both short strings, and a
    positional mix-up must fail here rather than be stored.
    """

    name: str
    size_bytes: int
    node: str
    compression: str = "off"
    created_at: float = field(default_factory=time.time)
    deleted: bool = False
    uid: str = ""
    """This volume's identity, made at create and stamped on each of its datasets:
    a dataset of the same name with another uid is a deleted namesake's leftover."""
    create_error: str = ""
    """Why the node it is placed on could not create it (written by that node): that
    node does not try again until a new size clears it."""
    created_by_node: str = ""
    """The node whose Docker plugin created the volume (empty: ferryctl); only that
    node's certificate may delete it besides a user's (ferry.security.authz)."""
    failover: str = "manual"
    """``auto``: control promotes a standby copy once the owner's node has been gone for
    ``failover_after`` seconds; ``manual``: only ``ferryctl volume failover`` does."""
    failover_after: float = fencing.DEFAULT_FAILOVER_AFTER_SECONDS
    replicas: int = 0
    """Standby copies besides the owner's that the owner keeps current (0: none)."""
    rpo_seconds: int = 0
    """The most data, in time, that losing the owner's host may cost (0 without replicas)."""
    replace_after_seconds: int = 0
    """How long a replica's node may be down before control places the replica elsewhere."""
    replica_nodes: tuple[str, ...] = ()
    """Where control placed the replicas: never the owner's node, at most ``replicas``."""
    replaced: tuple[str, ...] = ()
    """What control did to keep the count (newest last, a few kept): for the operator."""

    def __post_init__(self) -> None:
        validate_volume_name(self.name)
        for replica in self.replica_nodes:
            check_node_name(replica)
        if self.replicas < 0 or len(self.replica_nodes) > self.replicas:
            raise ValueError(
                f"volume {self.name} wants {self.replicas} replicas but lists "
                f"{len(self.replica_nodes)} replica nodes"
            )
        if len(set(self.replica_nodes)) != len(self.replica_nodes):
            raise ValueError(f"volume {self.name} lists a replica node twice")
        if self.replicas and self.rpo_seconds <= 0:
            raise ValueError(f"volume {self.name} has replicas but no rpo")
        if not _UID.match(self.uid):
            raise ValueError(f"invalid volume uid {self.uid!r}: hexadecimal digits or empty")
        check_node_name(self.node)
        if self.created_by_node:
            check_node_name(self.created_by_node)
        parse_size(self.size_bytes)
        if self.compression not in compression.STORABLE:
            raise ValueError(
                f"invalid compression {self.compression!r}: "
                f"use one of {', '.join(sorted(compression.STORABLE))}"
            )
        fencing.check_failover(self.failover, self.failover_after)


@dataclass(frozen=True)
class Owner(_Record):
    """The one node allowed to write a volume, and the epoch that fences older owners."""

    node: str
    epoch: int

    def __post_init__(self) -> None:
        check_node_name(self.node)
        if self.epoch < 1:
            raise ValueError(f"owner epoch must be >= 1, got {self.epoch}")


NODE_STARTING = "starting"
NODE_READY = "ready"
NODE_STATUSES = (NODE_STARTING, NODE_READY)


@dataclass(frozen=True)
class NodeInfo(_Record):
    """A live agent, on its lease."""

    name: str
    address: str
    pool: str
    free_bytes: int
    version: str
    started_at: float = field(default_factory=time.time)
    pool_guid: str = ""
    """GUID of the pool's top dataset: tells this host's earlier record from another agent's."""
    status: str = "ready"
    """``starting`` from registration until the agent's recovery is done and its gRPC and
    plugin sockets answer, then ``ready`` (records of agents older than this field are ready)."""
    cert_not_after: float = 0.0
    """When the agent's TLS certificate expires (Unix time); 0 when it runs without TLS."""

    def __post_init__(self) -> None:
        check_node_name(self.name)
        if ":" not in self.address:
            raise ValueError(f"node address must be HOST:PORT, got {self.address!r}")
        if self.status not in NODE_STATUSES:
            raise ValueError(
                f"node status must be one of {', '.join(NODE_STATUSES)}, got {self.status!r}"
            )


@dataclass(frozen=True)
class NodeState(_Record):
    """What one node actually holds of one volume."""

    node: str
    volume: str
    snapshots: tuple[str, ...] = ()
    used_bytes: int = 0
    writable: bool = False
    mounted: bool = False
    updated_at: float = field(default_factory=time.time)
    stuck: str = ""
    """What on this node has been running too long for this volume, since when, and what to
    do; empty when nothing is stuck."""
    newest_snapshot_at: float = 0.0
    """When the newest snapshot of this copy was taken on the owner (ZFS ``creation``, which
    a stream carries): a replica's lag is the age of this."""
    replication_error: str = ""
    """On the owner: why keeping a replica current fails now (empty while it works)."""


@dataclass(frozen=True)
class NodeSeen(_Record):
    """When a node's agent last renewed its lease (its clock), kept after the lease is gone:
    a failover says from it what the copy it promotes lacks."""

    node: str
    at: float

    def __post_init__(self) -> None:
        check_node_name(self.node)


@dataclass(frozen=True)
class Move(_Record):
    """A move in progress (or the last one), as its source agent reports it."""

    volume: str
    source: str
    target: str
    phase: MovePhase = MovePhase.PENDING
    bytes_sent: int = 0
    """Bytes of this move's streams the target holds, and those of the pending stream."""
    bytes_total: int = 0
    rate_bps: float = 0.0
    error: str = ""
    attempt: int = 0
    final_snapshot: str = ""
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    attempt_bytes_sent: int = 0
    """Bytes the current (or last) attempt sent, a stream cut half-way included."""
    pending_snapshot: str = ""
    """The snapshot of the stream not yet known to have arrived: running, or failed before
    the target said it holds it (the reply lost, the target or the source killed). Its
    ``pending_bytes`` are in ``bytes_sent`` until the next sync asks the target what it
    holds: they stay if it holds this snapshot and are taken out if not (the retry sends
    them anew). Asked, not guessed from how much was sent: a stream can arrive whole just
    before the target dies, and one cut at 99 % leaves nothing."""
    pending_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", MovePhase(self.phase))
        validate_volume_name(self.volume)
        if self.source == self.target:
            raise ValueError(f"a move needs two different nodes, got {self.source} twice")


@dataclass(frozen=True)
class MountRecord(_Record):
    """What uses a volume on one node: Docker's mount IDs, and what the kernel shows
    (a mount in any namespace, a process with a file on it), described for the operator."""

    volume: str
    node: str
    ids: tuple[str, ...] = ()
    users: tuple[str, ...] = ()


class _AboutAside:
    """A record about one copy kept aside on one node, keyed by the copy's leaf name: both
    names are checked when it is made or read."""

    node: str
    dataset: str

    def __post_init__(self) -> None:
        check_node_name(self.node)
        aside_leaf(self.dataset)

    @property
    def leaf(self) -> str:
        return aside_leaf(self.dataset)


@dataclass(frozen=True)
class AsideCopy(_AboutAside, _Record):
    """A copy of a volume that a node kept aside instead of overwriting it: data that
    diverged from the volume's history (written after the snapshot a stream built on)."""

    node: str
    volume: str
    dataset: str
    kept_at: float
    epoch: int = 0
    """The owner epoch in force when it was kept aside; its data is from before it."""
    used_bytes: int = 0
    reason: str = ""


@dataclass(frozen=True)
class AsideDrop(_AboutAside, _Record):
    """An operator's request that ``node`` destroy one copy it keeps aside."""

    node: str
    volume: str
    dataset: str
    requested_at: float = field(default_factory=time.time)


def aside_leaf(dataset: str) -> str:
    """The last component of a copy kept aside (``pool/ferry-aside/<leaf>``); ValueError else."""
    parent, _, leaf = dataset.rpartition("/")
    try:
        names.validate_dataset(dataset)
    except names.InvalidName as error:
        raise ValueError(f"invalid dataset {dataset!r}: {error.reason}") from error
    if not parent.endswith("-aside") or "/" in leaf:
        raise ValueError(f"{dataset!r} is not a copy kept aside (POOL/ferry-aside/NAME)")
    return leaf


def to_dict(record: Any) -> dict[str, Any]:
    """A record as plain JSON-able values (for ``-o json``)."""
    return dict(json.loads(record.to_json()))


class EventKind(StrEnum):
    """What happened to a volume, as ``ferryctl events`` lists it."""

    CREATED = "created"
    DELETED = "deleted"
    MOVE_REQUESTED = "move_requested"
    HANDED_OFF = "handed_off"
    MOVED = "moved"
    MOVE_ERROR = "move_error"
    FENCED = "fenced"
    DIVERGED_KEPT = "diverged_kept"
    FAILED_OVER = "failed_over"
    ERROR = "error"


@dataclass(frozen=True)
class Event(_Record):
    """One thing that happened to a volume: what, by whom (a node or ``control``), when, and
    the pause writes saw when it was a handoff."""

    volume: str
    kind: EventKind
    by: str
    at: float = field(default_factory=time.time)
    detail: str = ""
    pause_seconds: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", EventKind(self.kind))
