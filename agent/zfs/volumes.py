"""Ferry's own layer over the ZFS API: volumes as datasets under one root in a pool.

A volume is ``<pool>/ferry/<name>``; copies that were kept aside live under
``<pool>/ferry-aside/`` so they are never taken for a volume. Both roots have
``mountpoint=none``; a volume gets the mountpoint Ferry chooses when it is
mounted. zfs-fuse refuses to rename or destroy a mounted or just-unmounted
filesystem ("dataset is busy"), so those steps unmount first and retry.
Every method blocks on ``zfs`` commands: async callers run them with
``asyncio.to_thread`` (as ``agent.store`` does).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from agent import zfs
from agent.zfs import inuse, runner
from agent.zfs.exceptions import (
    BookmarkExists,
    BookmarkFailure,
    CommandTimeout,
    DatasetBusy,
    DatasetExists,
    HoldExists,
    HoldFailure,
    HoldNotFound,
    HoldReleaseFailure,
    NameInvalid,
    PropertyInvalid,
)
from agent.zfs.names import validate_dataset, validate_under, validate_volume_name
from ferry.core import compression
from ferry.core.snapshots import Base, CutStream, SnapshotRef

log = logging.getLogger(__name__)

T = TypeVar("T")

# The hold a transfer places on the snapshots it sends from and to.
TRANSFER_HOLD = "ferry-transfer"
# The hold the owner keeps, per replica node, on that replica's newest common snapshot.
REPLICA_HOLD_PREFIX = "ferry-replica-"
# The user property recording each replica's held base: "node=snapshot,node=snapshot".
# zfs-fuse cannot list a snapshot's hold tags, so this is what says which holds exist.
REPLICA_BASES = "ferry:replica-bases"
# The user property carrying the volume's uid (VolumeSpec.uid) on each of its datasets.
UID_PROPERTY = "ferry:uid"
# User properties of a copy kept aside: which volume, the owner epoch then, when and why.
ASIDE_VOLUME = "ferry:aside-volume"
ASIDE_EPOCH = "ferry:aside-epoch"
ASIDE_AT = "ferry:aside-at"
ASIDE_REASON = "ferry:aside-reason"
# What every volume inherits from its root (PoolRoot.ensure says why).
ROOT_PROPERTIES = {"atime": "off", "readonly": "on"}
BUSY_ATTEMPTS = 20
BUSY_DELAY_SECONDS = 0.25


def retry_busy(operation: Callable[[], T], what: str) -> T:
    """Run ``operation``, retrying while ZFS says the dataset is busy."""
    for attempt in range(1, BUSY_ATTEMPTS + 1):
        try:
            return operation()
        except DatasetBusy:
            if attempt == BUSY_ATTEMPTS:
                raise
            log.debug("dataset busy, retrying: what=%s attempt=%d", what, attempt)
            time.sleep(BUSY_DELAY_SECONDS * attempt)
    raise AssertionError("unreachable")


def compression_values() -> frozenset[str]:
    """The compression settings this ZFS accepts."""
    return compression.EVERYWHERE | ({"lz4"} if zfs.features().lz4 else set())


def validate_compression(value: str) -> str:
    if value not in compression_values():
        raise PropertyInvalid(
            value, f"Invalid compression; use one of {', '.join(sorted(compression_values()))}"
        )
    return value


def read_only_mounts(table: Path = Path("/proc/self/mounts")) -> set[str]:
    """Mount points mounted read-only, as the kernel lists them."""
    found = set()
    for line in table.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and "ro" in fields[3].split(","):
            found.add(fields[1].replace("\\040", " "))
    return found


def guard_mountpoint(path: Path, on: bool) -> None:
    """Set (or clear) the immutable flag of an unmounted mountpoint directory.

    A filesystem without the flag (it is an ext4/xfs/btrfs/tmpfs/zfs feature)
    leaves the directory as it is, with a warning: nothing else depends on it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as error:
        log.warning("mountpoint not guarded: path=%s error=%s", path, error)
        return
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        wanted = flags[0] | _FS_IMMUTABLE_FL if on else flags[0] & ~_FS_IMMUTABLE_FL
        if wanted != flags[0]:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, array.array("i", [wanted]))
    except OSError as error:
        log.warning("mountpoint not guarded: path=%s error=%s", path, error)
    finally:
        os.close(fd)


_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_IMMUTABLE_FL = 0x00000010


class FilesystemBusy(OSError):
    """The kernel refused to stop writes: a process holds a file open for writing."""


def _refused(what: str, command: list[str]) -> Callable[[str], OSError]:
    """The error of a failed mount/sync command: what failed, the command, its stderr."""
    return lambda stderr: OSError(f"{what}: {' '.join(command)}: {stderr.strip()}")


@dataclass(frozen=True)
class AsideDataset:
    """A copy kept aside under the pool's aside root, as its user properties describe it."""

    dataset: str
    volume: str
    epoch: int
    kept_at: float
    used_bytes: int
    reason: str


class PoolRoot:
    """The datasets Ferry manages in one pool."""

    def __init__(self, pool: str, root: str = "ferry") -> None:
        self.pool = pool
        self.base = validate_dataset(f"{pool}/{root}")
        self.aside = validate_dataset(f"{pool}/{root}-aside")

    def dataset(self, volume: str) -> bytes:
        """The dataset of a volume; rejects names that are not volume names."""
        validate_volume_name(volume)
        return validate_under(self.base + b"/" + volume.encode(), self.base)

    def ensure(self) -> None:
        """Create the roots if missing; volumes inherit ``atime=off`` and ``readonly=on``.

        With access times on, reading a file changes the dataset, and ZFS then
        refuses the next incremental receive into it as modified: a copy that
        was only read would count as diverged. Read-only by inheritance makes
        "writable" mean "activated": only ``set_readonly(volume, False)``, which
        the owner's activation makes, overrides it, so a copy that was created
        or fully received and not activated yet (its agent died in between) is
        never taken for an owner's copy, mounted or not.
        """
        for root in (self.base, self.aside):
            if not zfs.lzc_exists(root):
                zfs.lzc_create(root, props={"mountpoint": "none", **ROOT_PROPERTIES})
                log.info("created ferry root: dataset=%s", root.decode())
                continue
            props = zfs.lzc_get_props(root)
            for prop, value in ROOT_PROPERTIES.items():
                if props.get(prop) != value:
                    zfs.lzc_set_prop(root, prop, value)

    def volumes(self) -> list[str]:
        """Names of the volumes this pool holds."""
        prefix = len(self.base) + 1
        return [child[prefix:].decode() for child in zfs.lzc_list_children(self.base)]

    def create_volume(
        self, volume: str, size_bytes: int, compression: str, mountpoint: Path, uid: str = ""
    ) -> None:
        if size_bytes <= 0:
            raise PropertyInvalid(volume, "Invalid size: must be positive")
        props: dict[str, str | int] = {
            "refquota": size_bytes,
            "compression": validate_compression(compression),
            "mountpoint": str(mountpoint),
            # Mounted only while used (``mount``): never by ZFS itself, e.g. at its start.
            "canmount": "noauto",
        }
        if uid:
            props[UID_PROPERTY] = uid
        mountpoint.mkdir(parents=True, exist_ok=True)
        guard_mountpoint(mountpoint, True)
        zfs.lzc_create(self.dataset(volume), props=props)

    def stamp_uid(self, volume: str, uid: str) -> None:
        """Stamp ``uid`` on a copy that arrived by a stream (which carries no properties)."""
        zfs.lzc_set_prop(self.dataset(volume), UID_PROPERTY, uid)

    def props(self, volume: str) -> dict[str, str]:
        """Every property of the volume's dataset, as ``lzc_get_props`` reads them."""
        return zfs.lzc_get_props(self.dataset(volume))

    def set_property(self, volume: str, prop: str, value: str | int) -> None:
        zfs.lzc_set_prop(self.dataset(volume), prop, value)

    def snapshot_name(self, volume: str, short: str) -> bytes:
        """The full name of the volume's snapshot ``short``."""
        return self.dataset(volume) + b"@" + short.encode()

    def snapshots(self, volume: str) -> list[SnapshotRef] | None:
        """The volume's snapshots, oldest first, with their GUIDs; None when it has no dataset."""
        dataset = self.dataset(volume)
        if not zfs.lzc_exists(dataset):
            return None
        return [
            SnapshotRef(full.split(b"@", 1)[1].decode(), guid)
            for full, guid in zfs.snapshot_guids(dataset)
        ]

    def snapshot_created(self, volume: str, short: str) -> float:
        """When snapshot ``short`` was taken (``creation``, Unix seconds; kept by a stream)."""
        return float(zfs.lzc_get_props(self.snapshot_name(volume, short)).get("creation", 0))

    def snapshot(self, volume: str, short: str) -> None:
        zfs.lzc_snapshot([self.snapshot_name(volume, short)])

    def destroy_snapshots(self, volume: str, shorts: Sequence[str], defer: bool) -> None:
        """Destroy the volume's snapshots ``shorts``; with ``defer``, a held one goes once its
        holds are released."""
        if shorts:
            zfs.lzc_destroy_snaps([self.snapshot_name(volume, s) for s in shorts], defer=defer)

    def bookmark_name(self, volume: str, short: str) -> bytes:
        """The full name of the volume's bookmark ``short``."""
        return self.dataset(volume) + b"#" + short.encode()

    def stream_source(self, volume: str, base: Base | None) -> bytes | None:
        """The full name an incremental stream from ``base`` starts at: its snapshot or its
        bookmark; None for a full stream."""
        if base is None:
            return None
        if base.bookmark:
            return self.bookmark_name(volume, base.name)
        return self.snapshot_name(volume, base.name)

    def send_space(
        self, volume: str, short: str, base: Base | None, flags: Sequence[str] = ()
    ) -> int:
        """Estimated size of the stream of ``short`` (incremental from ``base``, sent with
        ``flags``); FeatureNotSupported where ZFS cannot estimate it."""
        source = self.stream_source(volume, base)
        return zfs.lzc_send_space(self.snapshot_name(volume, short), source, list(flags))

    def bookmarks(self, volume: str) -> list[SnapshotRef]:
        """The volume's bookmarks, oldest first, with the GUIDs of the snapshots they mark;
        empty without a dataset or where ZFS has no bookmarks."""
        dataset = self.dataset(volume)
        if not zfs.features().bookmarks or not zfs.lzc_exists(dataset):
            return []
        return [
            SnapshotRef(full.split(b"#", 1)[1].decode(), guid)
            for full, guid in zfs.bookmark_guids(dataset)
        ]

    def bookmark(self, volume: str, short: str) -> None:
        """Bookmark the volume's snapshot ``short`` under the same name; one already there
        is kept (a bookmark of a name marks that snapshot: Ferry never reuses names)."""
        try:
            zfs.lzc_bookmark({self.bookmark_name(volume, short): self.snapshot_name(volume, short)})
        except BookmarkFailure as failure:
            if not all(isinstance(error, BookmarkExists) for error in failure.errors):
                raise

    def destroy_bookmarks(self, volume: str, shorts: Sequence[str]) -> None:
        """Destroy the volume's bookmarks ``shorts`` (those missing are ignored)."""
        if shorts:
            zfs.lzc_destroy_bookmarks([self.bookmark_name(volume, s) for s in shorts])

    def resume_token(self, volume: str) -> str | None:
        """The token of a cut resumable receive into the volume's copy; None when there is none
        (no copy, nothing cut, or a ZFS without resumable receive)."""
        dataset = self.dataset(volume)
        if not zfs.features().resumable_receive or not zfs.lzc_exists(dataset):
            return None
        return zfs.receive_resume_token(dataset)

    def abort_receive(self, volume: str) -> None:
        """Discard the partial state of a cut receive into the volume's copy (``receive -A``):
        the copy is again at its newest complete snapshot, or gone if the cut stream was full."""
        zfs.receive_abort(self.dataset(volume))

    def cut_stream(self, volume: str, token: str) -> CutStream | None:
        """What the rest of a peer's cut stream (its ``token``) lands, if that stream was of
        this volume's snapshot and this copy still holds it and its base with their GUIDs;
        None otherwise (the rest cannot come from here: the peer must discard what it has)."""
        try:
            point = zfs.send_resume_point(token)
        except CommandTimeout:
            raise
        except zfs.ZFSError as error:
            log.info("cut stream cannot continue from here: volume=%s reason=%s", volume, error)
            return None
        dataset, _, short = point.snapshot.partition(b"@")
        if dataset != self.dataset(volume):
            return None
        held = self.snapshots(volume) or []
        snapshot = SnapshotRef(short.decode(), point.guid)
        base = next((ref for ref in held if ref.guid == point.base_guid), None)
        if snapshot not in held or (point.base_guid is not None and base is None):
            return None
        return CutStream(snapshot, base, point.bytes_left)

    def hold(self, volume: str, shorts: Sequence[str], tag: str) -> None:
        zfs.lzc_hold({self.snapshot_name(volume, s): tag for s in shorts})

    def release(self, volume: str, shorts: Sequence[str], tag: str) -> None:
        zfs.lzc_release({self.snapshot_name(volume, s): [tag] for s in shorts})

    def is_mounted(self, volume: str) -> bool:
        return zfs.lzc_get_props(self.dataset(volume)).get("mounted") == "yes"

    def mount(self, volume: str, path: Path) -> None:
        """Mount at ``path`` (setting the mountpoint if it differs); no-op when mounted there.

        The directory under the mount is made immutable first: once the volume is
        unmounted (handed off, fenced), a writer that reopens its files by path gets
        EPERM instead of writing onto the host's own disk and being told it was done.
        """
        dataset = self.dataset(volume)
        props = zfs.lzc_get_props(dataset)
        if props.get("mountpoint") != str(path):
            zfs.lzc_set_prop(dataset, "mountpoint", str(path))
        if props.get("canmount") != "on":
            zfs.lzc_set_prop(dataset, "canmount", "on")
        if zfs.lzc_get_props(dataset).get("mounted") != "yes":
            path.mkdir(parents=True, exist_ok=True)
            guard_mountpoint(path, True)
            # Busy for a moment when another dataset was just unmounted from ``path``.
            retry_busy(lambda: zfs.zfs_mount(dataset), f"mount {volume}")

    def unmount(self, volume: str, wait_while_busy: bool = True) -> None:
        """Unmount and keep it from being mounted automatically. The mountpoint left
        behind is guarded (see ``mount``): nothing can be written under it.

        ZFS writes out everything written before it unmounts, or refuses (``DatasetBusy``)
        while a file is open: an unmount loses no write. ``wait_while_busy`` retries
        that refusal for a while; without it the first one is raised.
        """
        dataset = self.dataset(volume)
        props = zfs.lzc_get_props(dataset)
        if props.get("mounted") == "yes":
            if wait_while_busy:
                retry_busy(lambda: zfs.zfs_unmount(dataset), f"unmount {volume}")
            else:
                zfs.zfs_unmount(dataset)
        if props.get("canmount") != "noauto":
            zfs.lzc_set_prop(dataset, "canmount", "noauto")

    def freeze(self, volume: str, at: Path | None = None) -> None:
        """Stop every writer of the mounted volume at once, and flush what was written.

        ``at``: where it is mounted, when the caller read that from the kernel's
        mount table; then no ZFS property is read before the remount (the
        self-fence must not wait on a slow ZFS daemon to stop writes).

        A read-only remount of the filesystem's superblock (not of one mount
        entry: a container's bind mount lives in its own mount namespace and
        a bind remount of the agent's mountpoint leaves it writable) makes
        every mount of it, in every namespace, refuse writes with EROFS. The
        kernel refuses it ("busy") while any process holds a file open for
        writing: then ``FilesystemBusy`` says so and nothing changed. It is a
        flag: instant, whatever the size, where ``unmount`` drops FUSE's page
        cache (0.2 s for 2 GiB on zfs-fuse). A frozen volume is unmounted later.
        """
        path = str(at) if at is not None else self._mounted_path(volume)
        if path is None:
            return
        subject = self.dataset(volume).decode()
        result = runner.run(["mount", "-i", "-o", "remount,ro", path], subject)
        if result.returncode != 0:
            if "busy" in result.stderr:
                raise FilesystemBusy(
                    f"cannot freeze {volume}: a process holds a file on it open for writing"
                )
            raise OSError(f"cannot freeze {volume}: {result.stderr.strip()}")
        sync = ["sync", "-f", path]
        runner.check(sync, subject, failure=_refused(f"cannot freeze {volume}", sync))

    def thaw(self, volume: str) -> None:
        """Undo ``freeze``: every mount of the still-mounted volume accepts writes again."""
        path = self._mounted_path(volume)
        if path is None or path not in read_only_mounts():
            return
        remount = ["mount", "-i", "-o", "remount,rw", path]
        runner.check(
            remount,
            self.dataset(volume).decode(),
            failure=_refused(f"cannot thaw {volume}", remount),
        )

    def kill_writers(self, volume: str) -> list[str]:
        """SIGKILL every process holding a file of the volume open for writing (what makes
        the kernel refuse ``freeze``); returns who. Only for a lost lease (agent.selffence)."""
        killed = []
        for pid in inuse.writing_pids(self.dataset(volume).decode()):
            try:
                command = (Path("/proc") / str(pid) / "comm").read_text().strip()
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue  # gone already
            killed.append(f"pid {pid} ({command})")
        return killed

    def frozen(self) -> list[str]:
        """Volumes mounted read-only by ``freeze``."""
        read_only = read_only_mounts()
        return [v for v in self.volumes() if self._mounted_path(v) in read_only]

    def users(self, mountpoints: dict[str, Path]) -> dict[str, list[inuse.User]]:
        """Who uses each volume's filesystem on this host, but the caller at its mountpoint
        (``mountpoints``: volume -> the caller's own mountpoint); one read of the kernel's view."""
        view = inuse.KernelView.read()
        return {
            volume: view.users(self.dataset(volume).decode(), own)
            for volume, own in mountpoints.items()
        }

    def _release_mountpoint(self, volume: str) -> None:
        """The volume's (unmounted) mountpoint will not be used again: unguard and remove it."""
        path = zfs.lzc_get_props(self.dataset(volume)).get("mountpoint", "")
        if path.startswith("/") and os.path.isdir(path):
            guard_mountpoint(Path(path), False)
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def _mounted_path(self, volume: str) -> str | None:
        props = zfs.lzc_get_props(self.dataset(volume))
        return props.get("mountpoint") if props.get("mounted") == "yes" else None

    def written_since_snapshot(self, volume: str) -> int | None:
        """Bytes written since the newest snapshot (``written``), None where ZFS lacks it."""
        value = zfs.lzc_get_props(self.dataset(volume)).get("written")
        return int(value) if value is not None and value.isdigit() else None

    def set_readonly(self, volume: str, readonly: bool) -> None:
        """Make the volume refuse (or accept again) writes, e.g. while it is being moved."""
        zfs.lzc_set_prop(self.dataset(volume), "readonly", "on" if readonly else "off")

    def destroy_volume(self, volume: str) -> None:
        """Destroy the volume's dataset and its snapshots (holds released first)."""
        self.unmount(volume)
        self._release_mountpoint(volume)
        self._promote_dependent_asides(volume)
        _destroy_with_snapshots(self.dataset(volume))

    def release_transfer_holds(self, volume: str) -> list[bytes]:
        """Release TRANSFER_HOLD wherever it is on the volume's snapshots; returns those snapshots.

        A transfer holds its snapshots while it runs. An agent killed in the
        middle leaves the holds behind, and they would block pruning, the
        next hold of the same snapshot, and destroying the volume. Holds of
        other tags (an operator's) are left alone.
        """
        return _release_transfer_holds(self.dataset(volume))

    def release_replica_holds(self, volume: str) -> None:
        """Release every hold kept for replicas: for a copy that is no longer the owner's."""
        dataset = self.dataset(volume)
        if zfs.lzc_get_props(dataset).get(REPLICA_BASES):
            _release_transfer_holds(dataset, replicas=True)

    def replica_bases(self, volume: str) -> dict[str, str]:
        """Each replica node's held base snapshot (short name), as recorded on the dataset."""
        return _parse_bases(zfs.lzc_get_props(self.dataset(volume)).get(REPLICA_BASES, ""))

    def set_replica_base(self, volume: str, node: str, short: str) -> None:
        """Hold ``short`` for ``node`` and release the hold on its previous base.

        Hold the new base, release the old one, then record: each step is
        repeatable (a hold already there, a release of one already gone), so an
        agent killed between any two leaves the chain held and the next call
        finishes the change. The new base is held before the old one goes, so a
        replica is never without a held base to continue from.
        """
        dataset = self.dataset(volume)
        bases = self.replica_bases(volume)
        old = bases.get(node)
        tag = REPLICA_HOLD_PREFIX + node
        try:
            zfs.lzc_hold({dataset + b"@" + short.encode(): tag})
        except HoldFailure as failure:
            if not all(isinstance(error, HoldExists) for error in failure.errors):
                raise
        if old and old != short:
            _release_tags(dataset + b"@" + old.encode(), [tag])
        bases[node] = short
        _record_bases(dataset, bases)

    def drop_replica_base(self, volume: str, node: str) -> None:
        """Release the hold kept for ``node`` (no longer a replica) and forget its base."""
        dataset = self.dataset(volume)
        bases = self.replica_bases(volume)
        old = bases.pop(node, None)
        if old is not None:
            _release_tags(dataset + b"@" + old.encode(), [REPLICA_HOLD_PREFIX + node])
        _record_bases(dataset, bases)

    def rename_aside(self, volume: str, epoch: int, reason: str) -> bytes:
        """Move a copy out of the volume root, keeping every byte; returns its new name.

        The new name says the volume, the owner epoch and the time (UTC); the
        same and the reason are stamped as user properties first, so the copy
        describes itself wherever a rename that was cut short left it.
        """
        dataset = self.dataset(volume)
        now = time.time()
        for prop, value in (
            (ASIDE_VOLUME, volume),
            (ASIDE_EPOCH, str(epoch)),
            (ASIDE_AT, f"{now:.3f}"),
            (ASIDE_REASON, reason),
        ):
            zfs.lzc_set_prop(dataset, prop, value)
        self.unmount(volume)
        self._release_mountpoint(volume)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        target = self._free_aside_name(f"{volume}-e{epoch}-{stamp}")
        retry_busy(lambda: zfs.lzc_rename(dataset, target), f"rename {volume} aside")
        log.info(
            "renamed aside: volume=%s dataset=%s epoch=%d reason=%s",
            volume,
            target.decode(),
            epoch,
            reason,
        )
        return target

    def split_aside(self, volume: str, base: str | None, epoch: int, reason: str) -> bytes:
        """Keep the whole copy aside, and put in its place a read-only copy that ends at ``base``.

        For an old owner whose late writes (after ``base``, the newest snapshot the
        new owner has too) must be kept but not served: the copy is renamed aside
        (``rename_aside``), then ``base`` is cloned back under the volume's name and
        promoted, so the volume again holds every snapshot up to ``base`` (same
        GUIDs: streams from the owner continue from there) and the copy aside, a
        clone of it, holds what came after. No block is copied. Returns the aside.
        """
        aside = self.rename_aside(volume, epoch, reason)
        if base is None:
            return aside
        dataset = self.dataset(volume)
        uid = zfs.lzc_get_props(aside).get(UID_PROPERTY, "")
        zfs.lzc_clone(
            dataset, aside + b"@" + base.encode(), props={"canmount": "noauto", "readonly": "on"}
        )
        zfs.lzc_promote(dataset)
        if uid:
            self.stamp_uid(volume, uid)
        log.info(
            "copy rejoined from its newest common snapshot: volume=%s base=%s aside=%s",
            volume,
            base,
            aside.decode(),
        )
        return aside

    def _promote_dependent_asides(self, volume: str) -> None:
        """Copies kept aside by ``split_aside`` are clones of the volume's snapshots: promote
        them, so the volume can be destroyed and they keep every block they need."""
        origin = self.dataset(volume) + b"@"
        for child in zfs.lzc_list_children(self.aside):
            if zfs.lzc_get_props(child).get("origin", "").encode().startswith(origin):
                zfs.lzc_promote(child)

    def _free_aside_name(self, leaf: str) -> bytes:
        """``leaf`` under the aside root, with a counter if that name is taken."""
        for n in range(1000):
            name = leaf if n == 0 else f"{leaf}.{n}"
            target = validate_under(self.aside + b"/" + name.encode(), self.aside)
            if not zfs.lzc_exists(target):
                return target
        raise DatasetExists(leaf, "1000 copies kept aside under this name; drop some")

    def asides(self) -> list[AsideDataset]:
        """Every copy kept aside in this pool, oldest first."""
        found = []
        for child in zfs.lzc_list_children(self.aside):
            props = zfs.lzc_get_props(child)
            name = child.decode()
            leaf = name.rsplit("/", 1)[1]
            found.append(
                AsideDataset(
                    dataset=name,
                    # Kept aside before copies carried properties: "<volume>-aside-<unix time>".
                    volume=props.get(ASIDE_VOLUME) or leaf.rsplit("-aside-", 1)[0],
                    epoch=_number(props.get(ASIDE_EPOCH), int),
                    kept_at=_number(props.get(ASIDE_AT), float)
                    or _number(props.get("creation"), float),
                    used_bytes=_number(props.get("used"), int),
                    reason=props.get(ASIDE_REASON, ""),
                )
            )
        return sorted(found, key=lambda aside: (aside.kept_at, aside.dataset))

    def destroy_aside(self, dataset: str) -> bool:
        """Destroy one copy kept aside and its snapshots; False if it does not exist.

        Only a direct child of the aside root: nothing else can be named here.
        """
        raw = validate_under(dataset, self.aside)
        if raw.rpartition(b"/")[0] != self.aside or b"@" in raw:
            raise NameInvalid(raw, f"Invalid name: not a copy kept aside in {self.aside.decode()}")
        if not zfs.lzc_exists(raw):
            return False
        _destroy_with_snapshots(raw)
        log.warning("copy kept aside destroyed: dataset=%s", dataset)
        return True

    def free_bytes(self) -> int:
        return zfs.pool_free_bytes(self.pool)

    def pool_guid(self) -> str:
        """The GUID of the pool's top dataset: this pool's identity, whatever its name."""
        return zfs.lzc_get_props(self.pool)["guid"]


def _release_transfer_holds(dataset: bytes, replicas: bool = False) -> list[bytes]:
    """Release TRANSFER_HOLD (and, with ``replicas``, every replica's hold) on the dataset's
    snapshots; returns the snapshots that had one."""
    tags = [TRANSFER_HOLD]
    if replicas:
        bases = _parse_bases(zfs.lzc_get_props(dataset).get(REPLICA_BASES, ""))
        tags += [REPLICA_HOLD_PREFIX + node for node in bases]
    released = []
    for snapshot in zfs.lzc_list_snaps(dataset):
        if zfs.hold_count(snapshot) == 0:
            continue
        if _release_tags(snapshot, tags):
            released.append(snapshot)
    if replicas:
        _record_bases(dataset, {})
    return released


def _release_tags(snapshot: bytes, tags: list[str]) -> bool:
    """Release each of ``tags`` that ``snapshot`` has; True if any was released."""
    released = False
    for tag in tags:
        try:
            zfs.lzc_release({snapshot: [tag]})
            released = True
        except HoldReleaseFailure as failure:
            if not all(isinstance(error, HoldNotFound) for error in failure.errors):
                raise
    return released


def _parse_bases(text: str) -> dict[str, str]:
    pairs = (item.partition("=") for item in text.split(",") if "=" in item)
    return {node: short for node, _, short in pairs}


def _record_bases(dataset: bytes, bases: dict[str, str]) -> None:
    if bases:
        text = ",".join(f"{node}={short}" for node, short in sorted(bases.items()))
        zfs.lzc_set_prop(dataset, REPLICA_BASES, text)
    else:
        zfs.lzc_inherit_prop(dataset, REPLICA_BASES)


def _destroy_with_snapshots(dataset: bytes) -> None:
    """Destroy an unmounted dataset, its snapshots and its bookmarks, Ferry's holds released
    first."""
    what = dataset.decode()
    _release_transfer_holds(dataset, replicas=True)
    zfs.lzc_destroy_bookmarks([mark for mark, _ in zfs.bookmark_guids(dataset)])
    snapshots = zfs.lzc_list_snaps(dataset)
    if snapshots:
        retry_busy(lambda: zfs.lzc_destroy_snaps(snapshots, defer=False), f"destroy {what}@*")
    retry_busy(lambda: zfs.lzc_destroy(dataset), f"destroy {what}")


N = TypeVar("N", int, float)


def _number(text: str | None, kind: type[N]) -> N:
    """A property's number, or zero for a missing or malformed one."""
    try:
        return kind(text) if text else kind(0)
    except ValueError:
        return kind(0)
