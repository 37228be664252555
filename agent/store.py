"""This node's volume datasets, as the agent sees them: async, by volume name.

The one place where the agent touches its volumes' datasets, through
``agent.zfs.volumes.PoolRoot`` (and the streams of ``agent.zfs.streams``); it
calls no ``lzc_*`` function itself. Every
call runs in a worker thread (the ZFS layer is synchronous) so the event
loop keeps serving gRPC, the plugin socket and etcd watches meanwhile.

A volume is ``<pool>/<root>/<name>``. The owner's copy is writable, and
mounted at ``<mount root>/<name>`` only while something on this host uses it
(a container's Mount, the operator's); every other copy is read-only and not
mounted. Snapshots, sends and receives need no mount. Copies that cannot
continue a stream are renamed aside, never destroyed.

Mounts and unmounts of a volume run one at a time under its mount lock: a
Mount, a fence, a handoff's unmount and an unmount of a copy nobody uses
never interleave (else an unmount that checked "unused" could land just
after a Mount answered, and the container would bind an empty directory).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from agent import metrics, zfs
from agent.zfs.inuse import User
from agent.zfs.streams import ResumedStream, SnapshotReceive, SnapshotStream, stream_features
from agent.zfs.volumes import (
    TRANSFER_HOLD,
    UID_PROPERTY,
    AsideDataset,
    FilesystemBusy,
    PoolRoot,
    read_only_mounts,
)
from ferry.cluster.events import EventLog
from ferry.core.plan import LocalVolume
from ferry.core.records import EventKind, VolumeSpec
from ferry.core.snapshots import (
    FENCED_PREFIX,
    Base,
    CutStream,
    SnapshotRef,
    next_name,
    prunable,
)

log = logging.getLogger(__name__)


class SelfFenced(Exception):
    """A copy would become writable while this node's lease is unconfirmed (agent.selffence)."""


class NotActive(Exception):
    """A Mount of a copy that is not the active owner's here (not activated, or fenced)."""


class VolumeStore:
    """Async operations on this node's volume datasets."""

    def __init__(self, root: PoolRoot, mount_root: Path, events: EventLog | None = None) -> None:
        self._root = root
        self._mount_root = mount_root
        self._events = events
        """Where fences and copies kept aside are told (``ferryctl events``)."""
        self.receiving: set[str] = set()
        """Volumes a transfer is writing into now; convergence leaves them alone."""
        self.unreadable: dict[str, str] = {}
        """Volumes whose dataset the last ``local_volumes`` could not read, with the error."""
        self.self_fenced = False
        """The etcd lease went unconfirmed (agent.selffence): nothing makes a copy writable."""
        self._mount_locks: dict[str, asyncio.Lock] = {}

    def _mount_lock(self, volume: str) -> asyncio.Lock:
        return self._mount_locks.setdefault(volume, asyncio.Lock())

    async def ensure_root(self) -> None:
        await asyncio.to_thread(self._root.ensure)

    async def recover(self) -> None:
        """Undo what a killed predecessor left halfway; at start no transfer or handoff runs here.

        Transfer holds are released. A volume still frozen by a handoff is
        unmounted and made read-only; convergence mounts it writable again if
        this node still owns it.
        """
        await asyncio.to_thread(self._recover)

    def _recover(self) -> None:
        for volume in self._root.volumes():
            for snapshot in self._root.release_transfer_holds(volume):
                log.warning(
                    "released a transfer hold left by a stopped agent: %s", snapshot.decode()
                )
        for volume in self._root.frozen():
            self._stop_writes(volume)
            log.warning("unmounted a copy frozen by an interrupted handoff: volume=%s", volume)

    def mountpoint(self, volume: str) -> Path:
        return self._mount_root / volume

    def snapshot_name(self, volume: str, short: str) -> bytes:
        return self._root.snapshot_name(volume, short)

    async def local_volumes(self, skip: Iterable[str] = ()) -> dict[str, LocalVolume]:
        """The volumes held here, but those in ``skip`` and those being received.

        A volume whose dataset cannot be read (a command failed or timed out) is left
        out and listed in ``unreadable`` with the error, so that nobody takes it for
        absent; the others are read on.
        """
        return await asyncio.to_thread(self._local_volumes, set(skip))

    def _local_volumes(self, skip: set[str]) -> dict[str, LocalVolume]:
        found = {}
        unreadable = {}
        read_only = read_only_mounts()
        for volume in set(self._root.volumes()) - self.receiving - skip:
            try:
                props = self._root.props(volume)
                snapshots = tuple(ref.name for ref in self._snapshots(volume) or ())
                taken_at = self._taken_at(volume, snapshots[-1]) if snapshots else 0.0
            except zfs.DatasetNotFound:
                continue  # destroyed or renamed since it was listed
            except zfs.ZFSError as error:
                log.warning("cannot read a volume's dataset: volume=%s error=%s", volume, error)
                unreadable[volume] = str(error)
                continue
            found[volume] = LocalVolume(
                name=volume,
                snapshots=snapshots,
                writable=_writable(props, read_only),
                mounted=props.get("mounted") == "yes",
                uid=props.get(UID_PROPERTY, ""),
                used_bytes=int(props.get("used", 0)),
                newest_snapshot_at=taken_at,
            )
        self.unreadable = unreadable
        return found

    def _taken_at(self, volume: str, short: str) -> float:
        """When ``short`` was taken on the owner: ZFS ``creation``, which a stream carries."""
        return self._root.snapshot_created(volume, short)

    async def snapshots(self, volume: str) -> list[SnapshotRef] | None:
        """Snapshots of the volume, oldest first; None when this node holds no copy."""
        return await asyncio.to_thread(self._snapshots, volume)

    def _snapshots(self, volume: str) -> list[SnapshotRef] | None:
        return self._root.snapshots(volume)

    async def snapshot_time(self, volume: str, short: str) -> float:
        """When the snapshot was taken (ZFS's ``creation``, Unix seconds)."""
        return await asyncio.to_thread(self._root.snapshot_created, volume, short)

    async def guid(self, volume: str, short: str) -> int:
        for ref in await self.snapshots(volume) or ():
            if ref.name == short:
                return ref.guid
        raise zfs.SnapshotNotFound(self.snapshot_name(volume, short))

    async def is_writable(self, volume: str) -> bool:
        return await asyncio.to_thread(self._is_writable, volume)

    def _is_writable(self, volume: str) -> bool:
        return _writable(self._root.props(volume), read_only_mounts())

    async def users(self, volumes: Iterable[str]) -> dict[str, list[User]]:
        """Who uses each volume's filesystem here besides the agent's own mountpoint, as the
        kernel says (every mount namespace, every process): see ``agent.zfs.inuse``."""
        mountpoints = {volume: self.mountpoint(volume) for volume in volumes}
        return await asyncio.to_thread(self._root.users, mountpoints)

    async def free_bytes(self) -> int:
        return await asyncio.to_thread(self._root.free_bytes)

    async def pool_guid(self) -> str:
        return await asyncio.to_thread(self._root.pool_guid)

    async def create(self, volume: str, size_bytes: int, compression: str, uid: str) -> None:
        await asyncio.to_thread(
            self._root.create_volume, volume, size_bytes, compression, self.mountpoint(volume), uid
        )
        log.info("dataset created: volume=%s size=%d uid=%s", volume, size_bytes, uid)

    async def activate(self, spec: VolumeSpec) -> None:
        """Make this node's copy the writable one, with the spec's size, compression and uid
        (a received copy whose agent died before stamping it gets it here). It is not
        mounted: ``ensure_mounted`` does that when something uses it."""
        self._refuse_while_fenced(spec.name)
        await asyncio.to_thread(self._activate, spec)

    def _refuse_while_fenced(self, volume: str) -> None:
        if self.self_fenced:
            raise SelfFenced(
                f"{volume} stays frozen: this node's etcd lease is not confirmed; it thaws "
                "once the agent re-registered and still owns the volume at the same epoch"
            )

    def _activate(self, spec: VolumeSpec) -> None:
        self._root.set_property(spec.name, "refquota", spec.size_bytes)
        self._root.set_property(spec.name, "compression", spec.compression)
        if spec.uid:
            self._root.stamp_uid(spec.name, spec.uid)
        self._root.set_readonly(spec.name, False)

    async def ensure_mounted(self, volume: str) -> None:
        """Mount the owner's copy for a user, if it is not mounted yet (NotActive otherwise).

        The mount gate: only an activated copy is mounted (writable: only the owner's
        activation at its epoch makes it so, and a fence, under this same lock, undoes
        it before it unmounts), and never while the lease is unconfirmed. A copy frozen
        by a handoff is not writable either: the handoff's gate refuses its Mounts first.
        """
        async with self._mount_lock(volume):
            self._refuse_while_fenced(volume)
            await asyncio.to_thread(self._mount_active, volume)

    def _mount_active(self, volume: str) -> None:
        if not self._is_writable(volume):
            raise NotActive(
                f"the copy of {volume} here is not the owner's writable one (not activated "
                "yet, or fenced)"
            )
        self._root.mount(volume, self.mountpoint(volume))

    async def unmount_unused(
        self, volume: str, holders: Callable[[list[User]], list[str]]
    ) -> list[str]:
        """Unmount the owner's copy unless something here still uses it; returns what does
        (then it stays mounted), empty once it is unmounted (or was not mounted).

        ``holders`` says, from the kernel's users of the filesystem (read under the
        mount lock), what keeps it mounted: those users and Docker's mount IDs. No
        acknowledged write is lost: with no user, no file is open, and ZFS writes out
        what was written before it unmounts (or refuses while a file is open, which
        counts as a user: then it stays mounted). A copy frozen by a handoff is left to
        the handoff. The copy stays writable; the next Mount mounts it again.
        """
        async with self._mount_lock(volume):
            if str(self.mountpoint(volume)) in read_only_mounts():
                return ["frozen by a handoff"]
            if volume not in await self.mounted_here():
                return []
            reasons = holders((await self.users([volume]))[volume])
            if reasons:
                return reasons
            try:
                await asyncio.to_thread(self._root.unmount, volume, False)
            except zfs.DatasetBusy:
                return ["a file on it is open (the unmount was refused as busy)"]
        log.info("unmounted, nothing uses it: volume=%s", volume)
        return []

    async def mounted_here(self) -> set[str]:
        """Mountpoints of this node's volumes that the kernel's mount table shows mounted
        (no ZFS command: cheap for a list of every volume)."""
        return await asyncio.to_thread(self._mounted_at, False)

    def commands_running(self, volume: str, older_than: float = 0.0) -> list[str]:
        """ZFS/mount commands on the volume's dataset (or its snapshots) running for at least
        ``older_than`` seconds, described for an operator."""
        dataset = self._root.dataset(volume).decode()
        now = time.time()
        return [
            command.describe(now)
            for command in zfs.running_commands()
            if now - command.started_at >= older_than
            and (command.subject == dataset or (command.subject or "").startswith(dataset + "@"))
        ]

    async def freeze(self, volume: str, mounted_here: bool = False) -> None:
        """Stop every writer at once, still mounted (PoolRoot.freeze; FilesystemBusy while a
        process holds a file open for writing); ``stop_writes`` or ``thaw`` follows.
        ``mounted_here``: the kernel's mount table shows it at its mountpoint (no ZFS read)."""
        at = self.mountpoint(volume) if mounted_here else None
        await asyncio.to_thread(self._root.freeze, volume, at)

    async def thaw(self, volume: str, confirmed: bool = False) -> None:
        """Accept writes again after ``freeze``, for a handoff that failed before the swap;
        while self-fenced only with ``confirmed`` (the lease and the epoch were checked)."""
        if not confirmed:
            self._refuse_while_fenced(volume)
        await asyncio.to_thread(self._root.thaw, volume)

    async def kill_writers(self, volume: str) -> list[str]:
        """Kill what holds the volume's files open for writing (PoolRoot.kill_writers)."""
        return await asyncio.to_thread(self._root.kill_writers, volume)

    async def mounted_writable(self) -> list[str]:
        """Volumes mounted read-write at their mountpoint here, from the kernel's mount table
        alone (no ZFS command: this must answer when ZFS is slow)."""
        return sorted(await asyncio.to_thread(self._mounted_at, True))

    def _mounted_at(self, writable_only: bool) -> set[str]:
        prefix = str(self._mount_root).rstrip("/") + "/"
        found = set()
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 3 and fields[1].startswith(prefix):
                name = fields[1][len(prefix) :]
                if "/" not in name and (not writable_only or "rw" in fields[3].split(",")):
                    found.add(name)
        return found

    async def stop_writes(self, volume: str) -> None:
        """Unmount and make read-only: after this, nothing writes to this copy."""
        async with self._mount_lock(volume):
            await asyncio.to_thread(self._stop_writes, volume)

    def _stop_writes(self, volume: str) -> None:
        self._root.unmount(volume)
        self._root.set_readonly(volume, True)

    async def fence(self, volume: str) -> None:
        """Stop writes on a copy this node no longer owns, keeping what it wrote in a snapshot.

        The freeze first: unmounting the agent's mountpoint alone leaves a
        container's bind mount writing. A process holding a file open for
        writing keeps the kernel from freezing; that is logged with who it is.
        """
        async with self._mount_lock(volume):
            try:
                await self.freeze(volume)
            except FilesystemBusy as busy:
                users = (await self.users([volume]))[volume]
                log.error(
                    "fence could not stop every writer: volume=%s error=%s users=%s; stop "
                    "them (docker stop, or end the process): this node no longer owns the "
                    "volume",
                    volume,
                    busy,
                    "; ".join(user.describe() for user in users),
                )
            await asyncio.to_thread(self._stop_writes, volume)
        name = await self.snapshot_head(volume, FENCED_PREFIX)
        metrics.FENCED.inc()
        if self._events is not None:
            await self._events.record(
                volume,
                EventKind.FENCED,
                f"this node no longer owns it: writes stopped, its last writes kept in {name}",
            )
        log.warning("fenced: volume=%s kept=%s@%s", volume, volume, name)

    async def divergence(self, volume: str, base: str) -> str:
        """Why this copy cannot take an incremental stream from ``base`` without losing
        anything, or "" when nothing shows it holds data after ``base``.

        Checked: ``base`` is held and is the newest snapshot, and, where ZFS
        has the ``written`` property, no byte was written since. zfs-fuse has
        no ``written``: there the proof of "no bytes since" is ZFS's own
        refusal of a receive without force into a modified copy
        (DestinationModified), which the receiver handles the same way.
        """
        return await asyncio.to_thread(self._divergence, volume, base)

    def _divergence(self, volume: str, base: str) -> str:
        names = [ref.name for ref in self._snapshots(volume) or ()]
        if base not in names:
            return f"holds no snapshot {base} to continue from"
        newer = names[names.index(base) + 1 :]
        if newer:
            return f"has snapshot(s) newer than {base}: {', '.join(newer)}"
        written = self._root.written_since_snapshot(volume)
        if written:
            return f"{written} bytes were written after {base}"
        return ""

    async def keep_aside(self, volume: str, epoch: int, reason: str) -> str:
        """Rename a copy that cannot take the next stream out of the way; returns its new name.

        ``epoch`` is the owner epoch in force now; ``reason`` says what the copy holds.
        """
        aside = (await asyncio.to_thread(self._root.rename_aside, volume, epoch, reason)).decode()
        if self._events is not None:
            await self._events.record(volume, EventKind.DIVERGED_KEPT, f"as {aside}: {reason}")
        return aside

    async def split_aside(self, volume: str, base: str | None, epoch: int, reason: str) -> str:
        """Keep the copy aside and leave a read-only copy ending at ``base`` in its place
        (PoolRoot.split_aside); returns the name of the copy kept aside."""
        aside = await asyncio.to_thread(self._root.split_aside, volume, base, epoch, reason)
        return aside.decode()

    async def snapshot_head(self, volume: str, prefix: str) -> str:
        """Snapshot what the copy holds now as ``<prefix>-<unix time>``; returns its name."""
        short = f"{prefix}-{int(time.time())}"
        if short not in [ref.name for ref in await self.snapshots(volume) or ()]:
            await asyncio.to_thread(self._root.snapshot, volume, short)
        return short

    async def asides(self) -> list[AsideDataset]:
        """The copies kept aside in this node's pool."""
        return await asyncio.to_thread(self._root.asides)

    async def drop_aside(self, dataset: str) -> bool:
        """Destroy one copy kept aside (on an operator's request only); False if it was gone."""
        return await asyncio.to_thread(self._root.destroy_aside, dataset)

    async def after_receive(
        self, volume: str, uid: str, held: Sequence[SnapshotRef]
    ) -> list[SnapshotRef]:
        """A received copy stays read-only and unmounted, stamped with the volume's uid;
        older snapshots among ``held`` (what the copy holds now) are pruned. Returns what
        it then holds, without listing it again."""
        return await asyncio.to_thread(self._after_receive, volume, uid, held)

    def _after_receive(
        self, volume: str, uid: str, held: Sequence[SnapshotRef]
    ) -> list[SnapshotRef]:
        # A copy that receives is not the owner's: holds it kept for replicas as owner go.
        self._root.release_replica_holds(volume)
        self._root.set_property(volume, "canmount", "noauto")
        self._root.set_readonly(volume, True)
        if uid:
            self._root.stamp_uid(volume, uid)
        pruned = prunable([ref.name for ref in held], keep=[])
        self._destroy_snapshots(volume, pruned)
        return [ref for ref in held if ref.name not in pruned]

    async def take_snapshot(self, volume: str, epoch: int) -> SnapshotRef:
        """The next Ferry snapshot; its sequence follows bookmarks too, so a name is never
        used twice on a volume even after its snapshots were destroyed."""
        held = [*(await self.snapshots(volume) or ()), *await self.bookmarks(volume)]
        short = next_name([ref.name for ref in held], epoch)
        await asyncio.to_thread(self._root.snapshot, volume, short)
        return SnapshotRef(short, await self.guid(volume, short))

    async def send_space(
        self, volume: str, short: str, base: Base | None, flags: Sequence[str] = ()
    ) -> int:
        """Estimated stream size, or 0 when the ZFS backend cannot estimate."""
        try:
            return await asyncio.to_thread(self._root.send_space, volume, short, base, flags)
        except zfs.FeatureNotSupported:
            return 0

    def send_stream(
        self, volume: str, short: str, base: Base | None, flags: Sequence[str] = ()
    ) -> SnapshotStream:
        """The stream of snapshot ``short``, incremental from ``base`` when given (its
        snapshot, or its bookmark), sent with ``flags``."""
        source = self._root.stream_source(volume, base)
        return SnapshotStream(self.snapshot_name(volume, short), source, tuple(flags))

    def stream_features(self) -> frozenset[str]:
        """The negotiated stream features this ZFS sends and receives (``-c``, ``-L``)."""
        return stream_features()

    async def bookmarks(self, volume: str) -> list[SnapshotRef]:
        """The volume's bookmarks, oldest first (empty where ZFS has none)."""
        return await asyncio.to_thread(self._root.bookmarks, volume)

    async def keep_bookmark(self, volume: str, short: str) -> None:
        """Bookmark snapshot ``short``, which a peer confirmed, as a base for later streams;
        nothing where ZFS has no bookmarks. A bookmark that cannot be made is logged and
        left out: streams then start from snapshots alone, as without bookmarks."""
        if not zfs.features().bookmarks:
            return
        try:
            await asyncio.to_thread(self._root.bookmark, volume, short)
        except zfs.CommandTimeout:
            raise
        except zfs.ZFSError as error:
            log.warning("bookmark not kept: volume=%s snapshot=%s error=%s", volume, short, error)

    async def destroy_bookmarks(self, volume: str, shorts: Sequence[str]) -> None:
        await asyncio.to_thread(self._root.destroy_bookmarks, volume, shorts)

    def can_resume(self) -> bool:
        return zfs.features().resumable_receive

    async def cut_stream(self, volume: str, token: str) -> CutStream | None:
        """What the rest of a peer's cut stream lands, if it can come from this copy (the
        token's snapshot and base are still here); None where ZFS cannot resume a send."""
        if not self.can_resume():
            return None
        return await asyncio.to_thread(self._root.cut_stream, volume, token)

    def resume_stream(self, token: str) -> ResumedStream:
        """The rest of a peer's cut stream, from where its ``token`` says it stopped."""
        return ResumedStream(token)

    async def resume_token(self, volume: str) -> str | None:
        """The token of a cut receive into this copy, None when nothing waits to be resumed."""
        return await asyncio.to_thread(self._root.resume_token, volume)

    async def abort_receive(self, volume: str) -> None:
        await asyncio.to_thread(self._root.abort_receive, volume)
        log.info("partial receive discarded: volume=%s", volume)

    def receive_stream(self, volume: str, short: str) -> SnapshotReceive:
        """A receive into snapshot ``short`` of this node's copy (never forced)."""
        return SnapshotReceive(self.snapshot_name(volume, short))

    @asynccontextmanager
    async def held(self, volume: str, shorts: Sequence[str]) -> AsyncIterator[None]:
        """Hold snapshots for the duration of a transfer, so no pruning destroys them."""
        await asyncio.to_thread(self._root.hold, volume, shorts, TRANSFER_HOLD)
        try:
            yield
        finally:
            await asyncio.to_thread(self._root.release, volume, shorts, TRANSFER_HOLD)

    async def replica_bases(self, volume: str) -> dict[str, str]:
        """Each replica node's held base snapshot, as recorded on this (the owner's) copy."""
        return await asyncio.to_thread(self._root.replica_bases, volume)

    async def set_replica_base(self, volume: str, node: str, short: str) -> None:
        """Hold ``short`` for replica ``node`` (its newest common snapshot), releasing the
        previous one: pruning cannot break that replica's incremental chain."""
        await asyncio.to_thread(self._root.set_replica_base, volume, node, short)

    async def drop_replica_base(self, volume: str, node: str) -> None:
        await asyncio.to_thread(self._root.drop_replica_base, volume, node)

    async def release_replica_holds(self, volume: str) -> None:
        await asyncio.to_thread(self._root.release_replica_holds, volume)

    async def destroy_snapshots(self, volume: str, shorts: Sequence[str]) -> None:
        await asyncio.to_thread(self._destroy_snapshots, volume, shorts)

    def _destroy_snapshots(self, volume: str, shorts: Sequence[str]) -> None:
        self._root.destroy_snapshots(volume, shorts, defer=True)

    async def destroy(self, volume: str) -> None:
        async with self._mount_lock(volume):
            await asyncio.to_thread(self._root.destroy_volume, volume)
        log.info("dataset destroyed: volume=%s", volume)


def _writable(props: dict[str, str], read_only_mounts: set[str]) -> bool:
    """Writable means activated (``readonly`` off, which only the owner's activation sets:
    volumes inherit ``on`` from their root), mounted or not: an unmounted copy is written
    again as soon as it is mounted, so a node that no longer owns it fences it the same.

    A frozen copy (mounted, but read-only in the kernel's mount table) is not writable.
    """
    frozen = props.get("mounted") == "yes" and props.get("mountpoint") in read_only_mounts
    return props.get("readonly") == "off" and not frozen
