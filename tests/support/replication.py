"""In-memory fakes of the replication ports (``agent.replication.ports``), for unit tests.

Held to the real implementations by ``tests/integration/test_replication_ports.py``:
the same tests run on ``PoolStore``/``RemotePeer``/``Keyspace`` over zfs-fuse and etcd,
and on these. A ``FakePeer`` admits a stream by the real rules
(``agent.replication.admission``) against the target's ``FakeStore``.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace

from agent.replication import admission
from agent.replication.ports import MoveRecords, ProgressCallback, SendStream
from agent.transfer.client import TransferFailed
from agent.zfs.volumes import FilesystemBusy
from ferry.cluster.keyspace import Versioned
from ferry.core.records import Move, Owner, VolumeSpec
from ferry.core.snapshots import Base, CutStream, SnapshotRef, next_name, prunable
from protos.ferry.v1 import transfer_pb2

_guids = itertools.count(1000)


@dataclass
class _Snapshot:
    name: str
    guid: int
    data: bytes


@dataclass
class _Copy:
    """One dataset: its data now, its snapshots (oldest first), how it is mounted."""

    data: bytes = b""
    snapshots: list[_Snapshot] = field(default_factory=list)
    bookmarks: list[_Snapshot] = field(default_factory=list)
    """As ZFS's bookmarks, but keeping the data: the fake's streams are made of it."""
    mounted: bool = False
    readonly: bool = True
    frozen: bool = False
    written: bool = False
    """Bytes written since the newest snapshot."""
    open_for_writing: int = 0


@dataclass(frozen=True)
class FakeStream:
    """A send stream: the snapshot's name, GUID and data, the base it continues (a snapshot
    or a bookmark), and the features it is sent with."""

    volume: str
    snapshot: _Snapshot
    base: _Snapshot | None
    flags: tuple[str, ...] = ()

    def write_to(self, fd: int) -> None:
        raise NotImplementedError("a FakeStream is read by a FakePeer, never written to a file")

    @property
    def size(self) -> int:
        return len(self.snapshot.data) - (len(self.base.data) if self.base else 0)


@dataclass(frozen=True)
class FakeResumedStream:
    """The rest of a cut stream, from the sender's copy: its token says where it stopped."""

    token: str

    def write_to(self, fd: int) -> None:
        raise NotImplementedError("a FakeResumedStream is read by a FakePeer")


def _token(stream: FakeStream, arrived: int) -> str:
    """As ZFS's token: the snapshot's and the base's GUIDs and the bytes that arrived."""
    return f"1-{stream.snapshot.guid}-{stream.base.guid if stream.base else 0}-{arrived}"


def _read_token(token: str) -> tuple[int, int | None, int]:
    _, guid, base, arrived = token.split("-")
    return int(guid), int(base) or None, int(arrived)


class FakeStore:
    """One node's pool; ``resumable`` as kernel OpenZFS (a cut receive keeps what arrived, and
    its sender can send the rest), else as zfs-fuse; ``has_bookmarks`` and the stream
    ``features`` it sends and receives (``compress``, ``large_blocks``) as kernel OpenZFS."""

    def __init__(
        self,
        node: str,
        resumable: bool = False,
        has_bookmarks: bool = False,
        features: frozenset[str] = frozenset(),
    ) -> None:
        self.node = node
        self.resumable = resumable
        self.has_bookmarks = has_bookmarks
        self.features = features
        self.partial: dict[str, tuple[FakeStream, int]] = {}
        """What cut receives left: the stream and the bytes of it that arrived."""
        self.copies: dict[str, _Copy] = {}
        self.asides: list[tuple[str, _Copy]] = []
        self.users: dict[str, list[str]] = {}
        self.gated: set[str] = set()
        self.holds: dict[tuple[str, str], int] = {}

    # What a test does to the copy.

    def create(self, volume: str) -> None:
        """A new volume, activated and mounted (a container uses it)."""
        self.copies[volume] = _Copy(mounted=True, readonly=False)

    def mount(self, volume: str) -> None:
        """A Mount (``VolumeStore.ensure_mounted``): only of the activated copy."""
        copy = self.copies[volume]
        assert not copy.readonly, f"{volume} is not activated here"
        copy.mounted = True

    def unmount(self, volume: str) -> None:
        """The last Unmount (``VolumeStore.unmount_unused``): the copy stays writable."""
        self.copies[volume].mounted = False

    def plant(self, volume: str, held: Sequence[SnapshotRef]) -> None:
        """A received (read-only, unmounted) copy holding snapshots of these names and GUIDs."""
        self.copies[volume] = _Copy(snapshots=[_Snapshot(r.name, r.guid, b"") for r in held])

    def write(self, volume: str, data: bytes) -> bool:
        """Append ``data`` as a writer would; False (EROFS, EPERM) when the copy refuses it."""
        copy = self.copies[volume]
        if not (copy.mounted and not copy.readonly and not copy.frozen):
            return False
        copy.data += data
        copy.written = True
        return True

    def data(self, volume: str) -> bytes:
        return self.copies[volume].data

    @contextmanager
    def open_for_writing(self, volume: str) -> Iterator[None]:
        copy = self.copies[volume]
        copy.open_for_writing += 1
        self.users.setdefault(volume, []).append("pid 4242 (a writer)")
        try:
            yield
        finally:
            copy.open_for_writing -= 1
            self.users[volume].remove("pid 4242 (a writer)")

    def recover(self) -> None:
        """What a restarted agent does first (``VolumeStore.recover``)."""
        self.holds.clear()
        for copy in self.copies.values():
            if copy.frozen:
                self._stop(copy)

    # The LocalStore port.

    async def snapshots(self, volume: str) -> list[SnapshotRef] | None:
        copy = self.copies.get(volume)
        if copy is None:
            return None
        return [SnapshotRef(s.name, s.guid) for s in copy.snapshots]

    async def take_snapshot(self, volume: str, epoch: int) -> SnapshotRef:
        copy = self.copies[volume]
        name = next_name([s.name for s in copy.snapshots + copy.bookmarks], epoch)
        snapshot = _Snapshot(name, next(_guids), copy.data)
        copy.snapshots.append(snapshot)
        copy.written = False
        return SnapshotRef(name, snapshot.guid)

    async def destroy_snapshots(self, volume: str, shorts: Sequence[str]) -> None:
        copy = self.copies[volume]
        copy.snapshots = [s for s in copy.snapshots if s.name not in shorts]

    async def send_space(
        self, volume: str, short: str, base: Base | None, flags: Sequence[str] = ()
    ) -> int:
        return self.send_stream(volume, short, base, flags).size

    def send_stream(
        self, volume: str, short: str, base: Base | None, flags: Sequence[str] = ()
    ) -> FakeStream:
        copy = self.copies[volume]
        by_name = {s.name: s for s in copy.snapshots}
        marks = {s.name: s for s in copy.bookmarks}
        source = None if base is None else (marks if base.bookmark else by_name)[base.name]
        return FakeStream(volume, by_name[short], source, tuple(flags))

    def stream_features(self) -> frozenset[str]:
        return self.features

    async def bookmarks(self, volume: str) -> list[SnapshotRef]:
        copy = self.copies.get(volume)
        return [SnapshotRef(s.name, s.guid) for s in copy.bookmarks] if copy else []

    async def keep_bookmark(self, volume: str, short: str) -> None:
        copy = self.copies[volume]
        if self.has_bookmarks and short not in [s.name for s in copy.bookmarks]:
            copy.bookmarks.append(replace(next(s for s in copy.snapshots if s.name == short)))

    async def destroy_bookmarks(self, volume: str, shorts: Sequence[str]) -> None:
        copy = self.copies[volume]
        copy.bookmarks = [s for s in copy.bookmarks if s.name not in shorts]

    @asynccontextmanager
    async def held(self, volume: str, shorts: Sequence[str]) -> AsyncIterator[None]:
        held = {s.name for s in self.copies[volume].snapshots}
        missing = [short for short in shorts if short not in held]
        if missing:
            raise FileNotFoundError(f"no snapshot {volume}@{missing[0]} to hold")
        for short in shorts:
            self.holds[volume, short] = self.holds.get((volume, short), 0) + 1
        try:
            yield
        finally:
            for short in shorts:
                self.holds[volume, short] -= 1
                if not self.holds[volume, short]:
                    del self.holds[volume, short]

    async def freeze(self, volume: str) -> None:
        copy = self.copies[volume]
        if not copy.mounted:
            return
        if copy.open_for_writing:
            raise FilesystemBusy(f"cannot freeze {volume}: a file is open for writing")
        copy.frozen = True

    async def thaw(self, volume: str) -> None:
        self.copies[volume].frozen = False

    async def stop_writes(self, volume: str) -> None:
        self._stop(self.copies[volume])

    async def in_use(self, volume: str) -> list[str]:
        return list(self.users.get(volume, []))

    @contextmanager
    def closed_to_mounts(self, volume: str) -> Iterator[None]:
        self.gated.add(volume)
        try:
            yield
        finally:
            self.gated.discard(volume)

    def commands_running(self, volume: str) -> list[str]:
        return []

    async def is_writable(self, volume: str) -> bool:
        copy = self.copies[volume]
        return not copy.readonly and not copy.frozen

    async def divergence(self, volume: str, base: str) -> str:
        names = [s.name for s in self.copies[volume].snapshots]
        if base not in names:
            return f"holds no snapshot {base} to continue from"
        newer = names[names.index(base) + 1 :]
        if newer:
            return f"has snapshot(s) newer than {base}: {', '.join(newer)}"
        return ""  # as on zfs-fuse (no `written`): ZFS itself refuses the receive

    async def keep_aside(self, volume: str, epoch: int, reason: str) -> str:
        copy = self.copies.pop(volume)
        self._stop(copy)
        name = f"{self.node}/ferry-aside/{volume}-e{epoch}-{len(self.asides)}"
        self.asides.append((name, copy))
        return name

    def can_resume(self) -> bool:
        return self.resumable

    async def cut_stream(self, volume: str, token: str) -> CutStream | None:
        if not self.resumable:
            return None
        guid, base_guid, arrived = _read_token(token)
        by_guid = {s.guid: s for s in self.copies[volume].snapshots}
        snapshot, base = by_guid.get(guid), by_guid.get(base_guid or -1)
        if snapshot is None or (base_guid is not None and base is None):
            return None
        rest = len(snapshot.data) - (len(base.data) if base else 0) - arrived
        return CutStream(
            SnapshotRef(snapshot.name, snapshot.guid),
            SnapshotRef(base.name, base.guid) if base else None,
            rest,
        )

    def resume_stream(self, token: str) -> SendStream:
        return FakeResumedStream(token)

    async def resume_token(self, volume: str) -> str | None:
        cut = self.partial.get(volume)
        return _token(*cut) if cut else None

    async def abort_receive(self, volume: str) -> None:
        stream, _ = self.partial.pop(volume)
        if stream.base is None:
            del self.copies[volume]  # a cut full stream's copy held nothing complete

    async def activate(self, spec: VolumeSpec) -> None:
        self.copies[spec.name].readonly = False

    # The receiving end, for FakePeer.

    def receive_cut(self, stream: FakeStream, arrived: int) -> None:
        """A stream that ended after ``arrived`` bytes: resumable, the part stays (a cut full
        stream's copy exists, holding no snapshot); else nothing changes."""
        if not self.resumable:
            return
        if stream.base is None:
            self.copies[stream.volume] = _Copy()
        self.partial[stream.volume] = (stream, arrived)

    def receive(self, stream: FakeStream) -> None:
        """As ``zfs receive`` without force: a full stream makes the copy, an incremental one
        continues the newest snapshot if nothing was written since."""
        snapshot = replace(stream.snapshot)
        copy = self.copies.get(stream.volume)
        if stream.base is None:
            if copy is not None:
                raise TransferFailed(f"{self.node}: destination {stream.volume} exists")
            self.copies[stream.volume] = _Copy(data=snapshot.data, snapshots=[snapshot])
            return
        if copy is None or not copy.snapshots or copy.snapshots[-1].guid != stream.base.guid:
            raise TransferFailed(f"{self.node}: {stream.volume} does not continue the stream")
        if copy.written:
            raise TransferFailed(f"{self.node}: {stream.volume} was modified since the base")
        copy.snapshots.append(snapshot)
        copy.data = snapshot.data

    def after_receive(self, volume: str) -> None:
        copy = self.copies[volume]
        self._stop(copy)
        drop = prunable([s.name for s in copy.snapshots], keep=[])
        copy.snapshots = [s for s in copy.snapshots if s.name not in drop]

    @staticmethod
    def _stop(copy: _Copy) -> None:
        copy.mounted, copy.readonly, copy.frozen = False, True, False


class FakePeer:
    """Another node's Transfer service, over that node's ``FakeStore`` and the cluster's records.

    ``answers`` False: it does not answer at all (a cut link); ``streams_fail``: it
    answers ``holdings`` but every stream breaks before it arrives; ``cut_after``: the
    next stream breaks after that many bytes arrived; ``receive_fails``: a stream it
    admits fails in ``zfs receive`` with that error (a full pool, say); ``states_features``
    False: an agent from before stream features, which says nothing of them. A stream with
    a feature its store does not receive fails, as ``zfs receive`` refuses it.
    """

    def __init__(self, node: str, store: FakeStore, records: MoveRecords) -> None:
        self._node = node
        self.store = store
        self.records = records
        self.answers = True
        self.streams_fail = False
        self.cut_after: int | None = None
        self.receive_fails = ""
        self.states_features = True
        self.feature_questions = 0
        self.streams: list[transfer_pb2.StreamHeader] = []

    @property
    def node(self) -> str:
        return self._node

    async def holdings(self, volume: str) -> list[SnapshotRef]:
        if not self.answers:
            raise TransferFailed(f"{self._node} (fake): Deadline Exceeded")
        return await self.store.snapshots(volume) or []

    async def resume_token(self, volume: str) -> str | None:
        if not self.answers:
            raise TransferFailed(f"{self._node} (fake): Deadline Exceeded")
        return await self.store.resume_token(volume)

    async def stream_features(self, volume: str) -> frozenset[str]:
        self.feature_questions += 1
        if not self.answers:
            raise TransferFailed(f"{self._node} (fake): Deadline Exceeded")
        return self.store.stream_features() if self.states_features else frozenset()

    async def send(
        self,
        header: transfer_pb2.StreamHeader,
        stream: SendStream,
        on_progress: ProgressCallback,
    ) -> list[SnapshotRef]:
        if not self.answers or self.streams_fail:
            raise TransferFailed(f"{self._node} (fake): Connection timed out")
        self.streams.append(header)
        try:
            await admission.authorize(self._node, header, self.records)
            await admission.prepare_base(self._node, header, self.store)
        except admission.Refused as refused:
            raise TransferFailed(f"{self._node} (fake): {refused}") from refused
        if self.receive_fails:
            raise TransferFailed(f"{self._node} (fake): {self.receive_fails}")
        if header.resume_token:
            return self._finish(header, stream, on_progress)
        assert isinstance(stream, FakeStream), "only a FakeStore's streams reach a FakeStore"
        if self.cut_after is not None:
            self.store.receive_cut(stream, self.cut_after)
            self.cut_after = None
            raise TransferFailed(f"{self._node} (fake): the stream was cut")
        if (stream.snapshot.name, stream.snapshot.guid) != (header.to_snapshot, header.to_guid):
            raise TransferFailed(f"{self._node} (fake): the stream is not the header's snapshot")
        if set(stream.flags) - self.store.stream_features():
            raise TransferFailed(f"{self._node} (fake): stream features {stream.flags} unknown")
        try:
            self.store.receive(stream)
        except TransferFailed as failed:
            if not header.from_snapshot:
                raise
            # As ZFS's refusal of a modified copy is handled (agent.transfer.server).
            reason = f"was written to after {header.from_snapshot} ({failed})"
            try:
                await admission.diverged(self._node, header, reason, self.store)
            except admission.Refused as refused:
                raise TransferFailed(f"{self._node} (fake): {refused}") from refused
        self.store.after_receive(header.volume)
        on_progress(stream.size)
        return await self.store.snapshots(header.volume) or []

    def _finish(
        self, header: transfer_pb2.StreamHeader, stream: SendStream, on_progress: ProgressCallback
    ) -> list[SnapshotRef]:
        """The rest of a cut stream (admitted: the token is this store's)."""
        assert isinstance(stream, FakeResumedStream), "the rest of a cut stream is resumed"
        cut, arrived = self.store.partial.pop(header.volume)
        assert (cut.snapshot.name, cut.snapshot.guid) == (header.to_snapshot, header.to_guid)
        copy = self.store.copies[header.volume]
        copy.snapshots.append(replace(cut.snapshot))
        copy.data = cut.snapshot.data
        self.store.after_receive(header.volume)
        on_progress(cut.size - arrived)
        return [SnapshotRef(s.name, s.guid) for s in copy.snapshots]


class FakeRecords:
    """The cluster's records, with etcd's revisions: every write bumps one counter."""

    def __init__(self) -> None:
        self._revision = 1
        self.moves: dict[str, Versioned[Move]] = {}
        self.owners: dict[str, Versioned[Owner]] = {}
        self.volumes: dict[str, Versioned[VolumeSpec]] = {}
        self.writes = 0

    def _next(self) -> int:
        self._revision += 1
        self.writes += 1
        return self._revision

    async def create_volume(self, spec: VolumeSpec) -> None:
        self.volumes[spec.name] = Versioned(spec, self._next())

    async def claim_owner(self, volume: str, node: str) -> bool:
        if volume in self.owners:
            return False
        self.owners[volume] = Versioned(Owner(node, 1), self._next())
        return True

    async def get_move(self, volume: str) -> Versioned[Move] | None:
        return self.moves.get(volume)

    async def put_move(self, move: Move, expected_revision: int | None) -> bool:
        current = self.moves.get(move.volume)
        if (current.revision if current else None) != expected_revision:
            return False
        self.moves[move.volume] = Versioned(move, self._next())
        return True

    async def get_owner(self, volume: str) -> Versioned[Owner] | None:
        return self.owners.get(volume)

    async def transfer_owner(
        self, volume: str, expected: Owner, new_node: str, move_revision: int | None = None
    ) -> bool:
        current = self.owners.get(volume)
        if current is None or current.value != expected:
            return False
        if move_revision is not None:
            move = self.moves.get(volume)
            if move is None or move.revision != move_revision:
                return False
        self.owners[volume] = Versioned(Owner(new_node, expected.epoch + 1), self._next())
        return True

    async def get_volume(self, volume: str) -> Versioned[VolumeSpec] | None:
        return self.volumes.get(volume)
