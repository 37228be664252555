"""Ferry's state in etcd: the only module that knows key strings.

Keys, under a prefix (default ``/ferry/v1``):

| key | record | written by |
|---|---|---|
| ``volumes/<name>`` | VolumeSpec | control |
| ``owners/<name>`` | Owner | agents, compare-and-swap only |
| ``nodes/<node>`` | NodeInfo, on the node's lease | that agent |
| ``state/<node>/<name>`` | NodeState, on the node's lease | that agent |
| ``moves/<name>`` | Move | control creates, the source agent advances |
| ``mounts/<name>/<node>`` | MountRecord, on the node's lease | that agent |
| ``asides/<node>/<leaf>`` | AsideCopy, on the node's lease | that agent |
| ``drops/<node>/<leaf>`` | AsideDrop | control asks, the agent deletes it once done |
| ``seen/<node>`` | NodeSeen, not leased: outlives the node's lease | that agent |
| ``events/<writer>/<time>-<n>`` | Event, on a retention lease | that node, or control |

Every write that depends on what was read is a transaction comparing the
key's ``mod_revision`` (or its absence); nothing is read-then-written.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Generic, TypeVar

import aetcd
from aetcd import exceptions, rpc
from aetcd.utils import prefix_range_end

from ferry.cluster.etcd_tls import CHANNEL_OPTIONS, TlsClient
from ferry.cluster.timing import timed_operations
from ferry.core.records import (
    AsideCopy,
    AsideDrop,
    Event,
    MountRecord,
    Move,
    NodeInfo,
    NodeSeen,
    NodeState,
    Owner,
    VolumeSpec,
)
from ferry.security.certificates import CertificateWatch
from ferry.security.tls import TlsFiles

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFIX = "/ferry/v1"


class Kind(StrEnum):
    """The kinds of key under the prefix: the first part of every key."""

    VOLUMES = "volumes"
    OWNERS = "owners"
    NODES = "nodes"
    STATE = "state"
    MOVES = "moves"
    MOUNTS = "mounts"
    ASIDES = "asides"
    DROPS = "drops"
    SEEN = "seen"
    EVENTS = "events"


KINDS = tuple(Kind)
RECORDS: dict[Kind, type[Any]] = {
    Kind.VOLUMES: VolumeSpec,
    Kind.OWNERS: Owner,
    Kind.NODES: NodeInfo,
    Kind.STATE: NodeState,
    Kind.MOVES: Move,
    Kind.MOUNTS: MountRecord,
    Kind.ASIDES: AsideCopy,
    Kind.DROPS: AsideDrop,
    Kind.SEEN: NodeSeen,
    Kind.EVENTS: Event,
}
# Kinds whose keys name the volume first (``mounts/<volume>/<node>``); the others name the
# node first (``state/<node>/<volume>``, ``asides/<node>/<leaf>``) or only (``nodes/<node>``).
VOLUME_FIRST = (Kind.VOLUMES, Kind.OWNERS, Kind.MOVES, Kind.MOUNTS)


class AlreadyExists(Exception):
    """The key exists already (e.g. a volume of that name)."""


class NotFound(Exception):
    """The key does not exist."""


class NodeChanged(Exception):
    """The node record a decision was read from changed, or its lease ended, before the write."""


class UnreadableRecord(ValueError):
    """A record read by its key does not decode (bad JSON, another schema version)."""

    def __init__(self, skipped: Unreadable) -> None:
        super().__init__(
            f"record {skipped.key} is unreadable ({skipped.reason}); fix or delete it "
            f"with etcdctl, or upgrade Ferry if another version wrote it"
        )
        self.skipped = skipped


@dataclass(frozen=True)
class Unreadable:
    """A record a listing skipped: its key, the volume it is about, and why it did not decode.

    Skipped rather than fatal: one bad record must not stop every other
    volume's convergence, nor ``ferryctl volume list``.
    """

    key: str
    volume: str
    reason: str


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """A record with the etcd ``mod_revision`` it was read at, for compare-and-swap."""

    value: T
    revision: int


@dataclass(frozen=True)
class Place:
    """Where a key sits: its kind, its name under the kind, and the volume and node it is
    about ('' where the key names none: ``nodes/<node>`` no volume, ``asides/<node>/<leaf>``
    only the node)."""

    kind: Kind
    name: str
    volume: str
    node: str


@dataclass(frozen=True)
class Change:
    """One change seen by a watch: which key (kind, volume, node), deleted or not."""

    place: Place
    deleted: bool
    revision: int

    @property
    def kind(self) -> Kind:
        return self.place.kind

    @property
    def name(self) -> str:
        return self.place.name

    @property
    def volume(self) -> str:
        return self.place.volume

    @property
    def node(self) -> str:
        return self.place.node


@dataclass(frozen=True)
class Entry:
    """One key and its value as a read at one revision returned it."""

    place: Place
    key: bytes
    value: bytes
    mod_revision: int


@timed_operations
class Keyspace:
    """Typed access to Ferry's keys through an ``aetcd.Client``; each operation is timed for
    the observers of ``ferry.cluster.timing``."""

    def __init__(self, client: aetcd.Client, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self._prefix = prefix.rstrip("/") + "/"

    def _key(self, kind: str, *parts: str) -> bytes:
        return (self._prefix + "/".join((kind, *parts))).encode()

    def _decode(self, key: bytes, raw: bytes, cls: type[T]) -> T:
        """The record at ``key``; UnreadableRecord, naming the key, if it does not decode."""
        try:
            return cls.from_json(raw)  # type: ignore[attr-defined]
        except ValueError as error:
            skipped = Unreadable(key.decode(), self._volume_of(key), str(error))
            raise UnreadableRecord(skipped) from error

    def _volume_of(self, key: bytes) -> str:
        """The volume a key is about (``mounts/<v>/<node>``, ``state/<node>/<v>``, ...)."""
        place = self.place(key)
        return place.volume if place else ""

    def place(self, key: bytes) -> Place | None:
        """Where ``key`` sits; None for a key under the prefix of no known kind."""
        kind, _, name = key.decode()[len(self._prefix) :].partition("/")
        if kind not in KINDS:
            return None
        first, _, second = name.partition("/")
        if kind in VOLUME_FIRST:
            return Place(Kind(kind), name, first, second)
        if kind == Kind.STATE:
            return Place(Kind.STATE, name, second, first)
        return Place(Kind(kind), name, "", first)

    def decode(self, entry: Entry) -> Any:
        """The record an entry holds (its kind's record class); UnreadableRecord if it does
        not decode."""
        return self._decode(entry.key, entry.value, RECORDS[entry.place.kind])

    def scope(self, kind: Kind, volume: str = "", node: str = "") -> KeyRange:
        """The keys of ``kind`` a read needs for one volume and/or one node ('' : all).

        A kind narrows only by what its keys name first (the volume for
        ``VOLUME_FIRST`` kinds, else the node); the rest is the caller's to filter.
        """
        first = volume if kind in VOLUME_FIRST else node
        if first and kind in (Kind.VOLUMES, Kind.OWNERS, Kind.MOVES, Kind.NODES):
            return KeyRange(self._key(kind, first), b"")
        start = self._key(kind, first, "") if first else self._key(kind, "")
        return KeyRange(start, prefix_range_end(start))

    async def read(self, ranges: Sequence[KeyRange]) -> tuple[int, list[Entry]]:
        """Every key in ``ranges``, read in ONE etcd request at one revision, with it.

        One transaction with no compare and a range request per range: etcd
        serves all of them from the same revision, so a write cannot fall
        between them (separate reads saw a spec's old node and the move that
        replaced it). The request goes to aetcd's KV stub, not through its
        ``transaction()``, which drops the response header and with it the
        revision when every range is empty; errors are aetcd's (``ClientError``).
        """
        request = rpc.TxnRequest(
            success=[
                rpc.RequestOp(request_range=rpc.RangeRequest(key=r.key, range_end=r.range_end))
                for r in ranges
            ]
        )
        await self.client.connect()
        try:
            response = await self.client.kvstub.Txn(
                request, timeout=self.client._timeout, metadata=self.client.metadata
            )
        except rpc.AioRpcError as error:
            exceptions._handle_exception(error)
            raise
        entries = []
        for op in response.responses:
            for kv in op.response_range.kvs:
                place = self.place(kv.key)
                if place is not None:
                    entries.append(Entry(place, kv.key, kv.value, kv.mod_revision))
        return int(response.header.revision), entries

    async def _get(self, key: bytes, cls: type[T]) -> Versioned[T] | None:
        found = await self.client.get(key)
        if found is None:
            return None
        return Versioned(self._decode(key, found.value, cls), found.mod_revision)

    async def _list(
        self,
        prefix: bytes,
        cls: type[T],
        skipped: list[Unreadable] | None = None,
        strict: bool = False,
    ) -> list[tuple[bytes, Versioned[T]]]:
        """Every record under ``prefix`` with its key; an undecodable one is logged with its
        key, added to ``skipped`` and left out, or with ``strict`` raises UnreadableRecord."""
        records = []
        for kv in await self.client.get_prefix(prefix):
            try:
                records.append(
                    (kv.key, Versioned(self._decode(kv.key, kv.value, cls), kv.mod_revision))
                )
            except UnreadableRecord as error:
                if strict:
                    raise
                log.warning(
                    "record skipped: key=%s reason=%s", error.skipped.key, error.skipped.reason
                )
                if skipped is not None:
                    skipped.append(error.skipped)
        return records

    async def _put_if(
        self, key: bytes, value: bytes, revision: int | None, lease: object = None
    ) -> bool:
        """Put ``value`` if the key is at ``revision`` (None: only if absent)."""
        tx = self.client.transactions
        compare = tx.create(key) == 0 if revision is None else tx.mod(key) == revision
        succeeded, _ = await self.client.transaction(
            compare=[compare], success=[tx.put(key, value, lease=lease)], failure=[]
        )
        return bool(succeeded)

    # volumes

    async def create_volume(self, spec: VolumeSpec, node_revision: int | None = None) -> None:
        """Store a new volume; AlreadyExists if the name is taken.

        With ``node_revision``, only while ``nodes/<spec.node>`` is still at that
        revision, so what was checked against the node record (alive, free
        space) still holds when the volume is written; NodeChanged otherwise.
        """
        key = self._key("volumes", spec.name)
        tx = self.client.transactions
        compare = [tx.create(key) == 0]
        if node_revision is not None:
            compare.append(tx.mod(self._key("nodes", spec.node)) == node_revision)
        succeeded, responses = await self.client.transaction(
            compare=compare, success=[tx.put(key, spec.to_json())], failure=[tx.get(key)]
        )
        if succeeded:
            return
        if responses and responses[0]:
            raise AlreadyExists(f"volume {spec.name} already exists")
        raise NodeChanged(f"node {spec.node} changed or went down while creating {spec.name}")

    async def get_volume(self, name: str) -> Versioned[VolumeSpec] | None:
        return await self._get(self._key("volumes", name), VolumeSpec)

    async def list_volumes(
        self, skipped: list[Unreadable] | None = None
    ) -> list[Versioned[VolumeSpec]]:
        return [v for _, v in await self._list(self._key("volumes", ""), VolumeSpec, skipped)]

    async def update_volume(self, spec: VolumeSpec, expected_revision: int) -> bool:
        return await self._put_if(
            self._key("volumes", spec.name), spec.to_json(), expected_revision
        )

    async def update_volume_if_unmounted(self, spec: VolumeSpec, expected_revision: int) -> bool:
        """``update_volume``, and only while no ``mounts/<name>/*`` key exists, in one transaction.

        So a delete cannot slip in between a mount appearing and the check for it.
        """
        key = self._key("volumes", spec.name)
        mounts = self._key("mounts", spec.name, "")
        tx = self.client.transactions
        succeeded, _ = await self.client.transaction(
            compare=[
                tx.mod(key) == expected_revision,
                tx.create(mounts, range_end=prefix_range_end(mounts)) == 0,
            ],
            success=[tx.put(key, spec.to_json())],
            failure=[],
        )
        return bool(succeeded)

    async def purge_volume(self, name: str) -> bool:
        """Remove a deleted volume's spec, owner and move in one transaction.

        Called after the agents destroyed its data. All at once, so a crash
        never leaves an owner behind that would block a new volume of that name;
        and only while the spec is the deleted one just read, so a purge that
        comes late never removes a new volume created under the name meanwhile.
        """
        spec = await self.get_volume(name)
        if spec is None or not spec.value.deleted:
            return False
        tx = self.client.transactions
        succeeded, _ = await self.client.transaction(
            compare=[tx.mod(self._key("volumes", name)) == spec.revision],
            success=[tx.delete(self._key(kind, name)) for kind in ("volumes", "owners", "moves")],
            failure=[],
        )
        return bool(succeeded)

    # owners

    async def get_owner(self, name: str) -> Versioned[Owner] | None:
        return await self._get(self._key("owners", name), Owner)

    async def claim_owner(self, name: str, node: str) -> bool:
        """Become the first owner (epoch 1) of a volume nobody owns."""
        return await self._put_if(self._key("owners", name), Owner(node, 1).to_json(), None)

    async def transfer_owner(
        self, name: str, expected: Owner, new_node: str, move_revision: int | None = None
    ) -> bool:
        """Swap ownership from ``expected`` to ``new_node`` at the next epoch, atomically.

        With ``move_revision``, only while the move record is as the mover last
        wrote it, so a move cancelled meanwhile never hands the volume over.
        """
        key = self._key("owners", name)
        tx = self.client.transactions
        new = Owner(new_node, expected.epoch + 1)
        compare = [tx.value(key) == expected.to_json()]
        if move_revision is not None:
            compare.append(tx.mod(self._key("moves", name)) == move_revision)
        succeeded, _ = await self.client.transaction(
            compare=compare,
            success=[tx.put(key, new.to_json())],
            failure=[],
        )
        return bool(succeeded)

    async def fail_over(
        self,
        spec: Versioned[VolumeSpec],
        owner: Versioned[Owner],
        new_node: str,
        move: Versioned[Move] | None,
        ended: Move | None = None,
    ) -> bool:
        """Hand the volume to ``new_node`` at the next epoch while its owner's node is down.

        One transaction, only while: the owner record is ``owner`` as read, the
        owner's node record is absent (its lease is gone, so its agent has frozen
        every volume it owns: ferry.core.fencing), ``new_node`` is registered, and
        the spec and the move record are as read. It writes the new owner, the
        spec placed on ``new_node`` and, when given, ``ended`` (the move the lost
        owner was running, ended). A second failover, a returning owner or a move
        that raced this one makes it fail; nothing is half written.
        """
        name = spec.value.name
        tx = self.client.transactions
        owner_key, move_key = self._key("owners", name), self._key("moves", name)
        compare = [
            tx.mod(self._key("volumes", name)) == spec.revision,
            tx.value(owner_key) == owner.value.to_json(),
            tx.mod(owner_key) == owner.revision,
            tx.create(self._key("nodes", owner.value.node)) == 0,
            tx.create(self._key("nodes", new_node)) != 0,
            tx.create(move_key) == 0 if move is None else tx.mod(move_key) == move.revision,
        ]
        success = [
            tx.put(owner_key, Owner(new_node, owner.value.epoch + 1).to_json()),
            tx.put(self._key("volumes", name), replace(spec.value, node=new_node).to_json()),
        ]
        if ended is not None:
            success.append(tx.put(move_key, ended.to_json()))
        succeeded, _ = await self.client.transaction(compare=compare, success=success, failure=[])
        return bool(succeeded)

    async def delete_owner(self, name: str) -> None:
        await self.client.delete(self._key("owners", name))

    # nodes and leases

    async def new_lease(self, ttl: int) -> aetcd.Lease:
        return await self.client.lease(ttl)

    async def claim_node(self, info: NodeInfo, lease: aetcd.Lease) -> NodeInfo | None:
        """Write the node's record on ``lease`` if no record of that name exists.

        Returns None when written, else the record that holds the name.
        """
        key = self._key("nodes", info.name)
        tx = self.client.transactions
        succeeded, responses = await self.client.transaction(
            compare=[tx.create(key) == 0],
            success=[tx.put(key, info.to_json(), lease=lease)],
            failure=[tx.get(key)],
        )
        if succeeded:
            return None
        if not responses or not responses[0]:
            return await self.claim_node(info, lease)  # its lease expired in between
        value, _ = responses[0][0]
        return NodeInfo.from_json(value)

    async def update_node(self, info: NodeInfo, lease: aetcd.Lease) -> None:
        """Rewrite a registered node's record (its free space, say) on its lease."""
        await self.client.put(self._key("nodes", info.name), info.to_json(), lease=lease)

    async def refresh_lease(self, lease: aetcd.Lease) -> int:
        """Keep a lease alive; returns its remaining TTL (<= 0 when it has expired)."""
        reply = await lease.refresh()
        return int(reply.TTL) if reply is not None else 0

    async def get_node(self, name: str) -> Versioned[NodeInfo] | None:
        return await self._get(self._key("nodes", name), NodeInfo)

    async def list_nodes(self) -> list[Versioned[NodeInfo]]:
        return [v for _, v in await self._list(self._key("nodes", ""), NodeInfo)]

    async def put_seen(self, seen: NodeSeen) -> None:
        await self.client.put(self._key("seen", seen.node), seen.to_json())

    async def get_seen(self, node: str) -> NodeSeen | None:
        found = await self._get(self._key("seen", node), NodeSeen)
        return found.value if found else None

    # state

    async def put_state(self, state: NodeState, lease: aetcd.Lease) -> None:
        await self.client.put(
            self._key("state", state.node, state.volume), state.to_json(), lease=lease
        )

    async def delete_state(self, node: str, volume: str) -> None:
        await self.client.delete(self._key("state", node, volume))

    async def get_state(self, node: str, volume: str) -> NodeState | None:
        found = await self._get(self._key("state", node, volume), NodeState)
        return found.value if found else None

    async def list_state(self, volume: str) -> list[NodeState]:
        """What live nodes hold of ``volume``; an unreadable record of it raises (a purge
        must not take it for no copy at all)."""
        skipped: list[Unreadable] = []
        found = await self._list(self._key("state", ""), NodeState, skipped)
        for record in skipped:
            if record.volume == volume:
                raise UnreadableRecord(record)
        return [v.value for _, v in found if v.value.volume == volume]

    # moves

    async def get_move(self, name: str) -> Versioned[Move] | None:
        return await self._get(self._key("moves", name), Move)

    async def put_move(self, move: Move, expected_revision: int | None) -> bool:
        return await self._put_if(
            self._key("moves", move.volume), move.to_json(), expected_revision
        )

    async def request_move(
        self,
        spec: Versioned[VolumeSpec],
        owner: Versioned[Owner],
        move: Move,
        move_revision: int | None,
        placement: str = "",
        replica_nodes: tuple[str, ...] | None = None,
    ) -> bool:
        """Write the move record and the desired node (``placement``, by default the move's
        target), and the replica nodes when given, in one transaction.

        Only while the spec, the owner (the move's source) and the previous move
        record (None: absent) are as read, so a racing request can never leave a
        spec pointing at a node with no move taking the volume there.
        """
        volume_key = self._key("volumes", spec.value.name)
        move_key = self._key("moves", move.volume)
        tx = self.client.transactions
        placed = replace(spec.value, node=placement or move.target)
        if replica_nodes is not None:
            placed = replace(placed, replica_nodes=replica_nodes)
        succeeded, _ = await self.client.transaction(
            compare=[
                tx.mod(volume_key) == spec.revision,
                tx.mod(self._key("owners", move.volume)) == owner.revision,
                tx.create(move_key) == 0
                if move_revision is None
                else tx.mod(move_key) == move_revision,
            ],
            success=[tx.put(volume_key, placed.to_json()), tx.put(move_key, move.to_json())],
            failure=[],
        )
        return bool(succeeded)

    async def delete_move(self, name: str, expected_revision: int) -> bool:
        """Delete the move record only if nobody changed it since it was read."""
        key = self._key("moves", name)
        tx = self.client.transactions
        succeeded, _ = await self.client.transaction(
            compare=[tx.mod(key) == expected_revision], success=[tx.delete(key)], failure=[]
        )
        return bool(succeeded)

    # mounts

    async def put_mount(self, record: MountRecord, lease: aetcd.Lease) -> None:
        await self.client.put(
            self._key("mounts", record.volume, record.node), record.to_json(), lease=lease
        )

    async def delete_mount(self, volume: str, node: str) -> None:
        await self.client.delete(self._key("mounts", volume, node))

    async def list_mounts(self, volume: str) -> list[MountRecord]:
        """Who mounts ``volume``; an unreadable record raises, since skipping it would read
        as "not mounted" and let a handoff or delete go ahead."""
        found = await self._list(self._key("mounts", volume, ""), MountRecord, strict=True)
        return [v.value for _, v in found]

    # copies kept aside

    async def put_aside(self, aside: AsideCopy, lease: aetcd.Lease) -> None:
        await self.client.put(
            self._key("asides", aside.node, aside.leaf), aside.to_json(), lease=lease
        )

    async def delete_aside(self, node: str, leaf: str) -> None:
        await self.client.delete(self._key("asides", node, leaf))

    async def list_asides(self, node: str = "") -> list[AsideCopy]:
        """What live nodes report keeping aside (one node's only, when given)."""
        prefix = self._key("asides", node, "") if node else self._key("asides", "")
        return [v.value for _, v in await self._list(prefix, AsideCopy)]

    async def request_drop(self, drop: AsideDrop) -> bool:
        """Ask ``drop.node`` to destroy a copy it keeps aside; False if already asked."""
        return await self._put_if(self._key("drops", drop.node, drop.leaf), drop.to_json(), None)

    async def list_drops(self, node: str = "") -> list[AsideDrop]:
        prefix = self._key("drops", node, "") if node else self._key("drops", "")
        return [v.value for _, v in await self._list(prefix, AsideDrop)]

    async def delete_drop(self, node: str, leaf: str) -> None:
        await self.client.delete(self._key("drops", node, leaf))

    # events

    async def put_event(self, writer: str, event: Event, lease: aetcd.Lease) -> None:
        """Record ``event`` under its writer's keys, on ``lease`` (its retention)."""
        leaf = f"{int(event.at * 1_000_000):017d}-{secrets.token_hex(4)}"
        await self.client.put(self._key("events", writer, leaf), event.to_json(), lease=lease)

    async def list_events(self, volume: str = "") -> tuple[list[Event], int]:
        """Every event kept (of ``volume`` only, when given), oldest first, and the etcd
        revision they were read at (a follower watches from the one after: nothing is
        missed or shown twice)."""
        found = await self.client.get_prefix(self._key("events", ""))
        events = []
        for kv in found:
            try:
                events.append(self._decode(kv.key, kv.value, Event))
            except UnreadableRecord as error:
                log.warning("event skipped: key=%s reason=%s", error.skipped.key, error)
        wanted = sorted((e for e in events if not volume or e.volume == volume), key=lambda e: e.at)
        return wanted, int(found.header.revision)

    async def watch_events(self, start_revision: int) -> AsyncGenerator[Versioned[Event], None]:
        """Events written from ``start_revision`` on, as they come, with the revision each was
        written at (resume from the one after); see ``watch`` for what ends it."""
        prefix = self._key("events", "")
        watch = await self.client.watch_prefix(prefix, start_revision=start_revision)
        try:
            async for change in watch:
                if change.kind == "DELETE":
                    continue
                try:
                    event = self._decode(change.kv.key, change.kv.value, Event)
                    yield Versioned(event, change.kv.mod_revision)
                except UnreadableRecord as error:
                    log.warning("event skipped: key=%s reason=%s", error.skipped.key, error)
        finally:
            await watch.cancel()

    # watch

    async def revision(self) -> int:
        """etcd's current revision: a watch from ``revision() + 1`` misses nothing read after.

        Read from an empty range (no key is ever stored at ``<prefix>/revision``).
        """
        nothing = await self.client.get_prefix(self._key("revision"), keys_only=True)
        return int(nothing.header.revision)

    async def watch(
        self, *kinds: Kind, start_revision: int | None = None
    ) -> AsyncGenerator[Change, None]:
        """Changes under the given kinds (all when none), until the stream breaks; each says
        which kind of key changed and the volume and node it is about.

        From ``start_revision`` when given (etcd replays what happened since,
        unless it was compacted: ``aetcd.exceptions.RevisionCompactedError``),
        else from the first iteration (not from this call: the generator starts
        then). When etcd goes away the iteration raises
        ``aetcd.exceptions.ClientError``; callers then watch again from the
        revision after the last change they saw, or read the full state anew.
        """
        wanted = set(kinds or KINDS)
        watch = await self.client.watch_prefix(self._prefix.encode(), start_revision=start_revision)
        try:
            async for event in watch:
                place = self.place(event.kv.key)
                if place is not None and place.kind in wanted:
                    yield Change(place, event.kind == "DELETE", event.kv.mod_revision)
        finally:
            await watch.cancel()


@dataclass(frozen=True)
class KeyRange:
    """Keys from ``key`` up to ``range_end`` (exclusive; empty: ``key`` alone), as etcd grants."""

    key: bytes
    range_end: bytes


PER_NODE_KINDS = ("nodes", "state", "asides", "drops", "seen", "events")


def grant_range(prefix: str, kind: str = "", node: str = "") -> KeyRange:
    """The keys an etcd role is granted for ``kind`` under ``prefix``.

    No kind: every key under the prefix. A kind: all of its keys, or with
    ``node`` only that node's (``nodes/<node>``, ``state/<node>/...``: the
    kinds in ``PER_NODE_KINDS``, whose keys name the node first).
    """
    base = prefix.rstrip("/") + "/"
    if not kind:
        start = base.encode()
        return KeyRange(start, prefix_range_end(start))
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    if not node:
        start = f"{base}{kind}/".encode()
        return KeyRange(start, prefix_range_end(start))
    if kind not in PER_NODE_KINDS:
        raise ValueError(f"{kind}/ keys cannot be granted per node: only {PER_NODE_KINDS}")
    if kind in ("nodes", "seen"):
        return KeyRange(f"{base}{kind}/{node}".encode(), b"")
    start = f"{base}{kind}/{node}/".encode()
    return KeyRange(start, prefix_range_end(start))


def endpoints_client(
    endpoints: tuple[str, ...] | list[str], tls: TlsFiles | CertificateWatch | None = None
) -> aetcd.Client:
    """A client for etcd at ``endpoints`` (``HOST:PORT`` each); see ``etcd_target``.

    With ``tls``, over mutual TLS as the etcd user its certificate names
    (``ferry.cluster.etcd_tls``; a CertificateWatch lets ``follow_renewals`` take up a
    renewal); without, plaintext (an ``--insecure`` cluster).
    """
    host, port = etcd_target(endpoints)
    if tls is not None:
        return TlsClient(host, port, tls, timeout=10)
    return aetcd.Client(host=host, port=port, timeout=10, options=CHANNEL_OPTIONS)


def etcd_target(endpoints: tuple[str, ...] | list[str]) -> tuple[str, int]:
    """The (host, port) aetcd dials (as ``f"{host}:{port}"``) for these endpoints.

    One endpoint: that member (or a DNS name that resolves to every member).
    Several: one gRPC ``ipv4:`` target of every member's address, whose
    pick-first policy moves to the next member when the current one goes down;
    host names among them are resolved here, once (a member that changes
    address needs a restart). ValueError, saying what to write, otherwise.
    Resolving may wait on DNS: async callers run this in a thread.
    """
    if not endpoints:
        raise ValueError("no etcd endpoint given: use --etcd HOST:PORT[,HOST:PORT...]")
    parsed = [_host_port(endpoint) for endpoint in endpoints]
    if len(parsed) == 1:
        return parsed[0]
    members = list(dict.fromkeys(m for host, port in parsed for m in _ipv4_members(host, port)))
    *others, last = members
    last_host, last_port = last.rsplit(":", 1)
    return f"ipv4:{','.join([*others, last_host])}", int(last_port)


def _ipv4_members(host: str, port: int) -> list[str]:
    """``ADDRESS:PORT`` for each IPv4 address of ``host`` (itself if it is one)."""
    if _is_ipv4(host):
        return [f"{host}:{port}"]
    try:
        found = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except OSError as error:
        raise ValueError(
            f"etcd endpoint {host}:{port}: its name does not resolve to an IPv4 address "
            f"({error}); fix DNS or /etc/hosts, or give the member's address"
        ) from error
    return [f"{address[4][0]}:{port}" for address in found]


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = (
        endpoint.strip().removeprefix("http://").removeprefix("https://").rpartition(":")
    )
    if not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r} needs a port: HOST:PORT")
    return host or "127.0.0.1", int(port)


def _is_ipv4(host: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(host), ipaddress.IPv4Address)
    except ValueError:
        return False
