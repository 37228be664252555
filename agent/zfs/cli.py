"""The ``zfs``/``zpool`` command backend: the only place Ferry runs those commands.

Drives kernel OpenZFS and zfs-fuse alike. Features that differ (resumable
receive, send size estimates, ``zfs holds``, lz4, several snapshots in one
command) are detected once from the commands' own usage text and pool
versions, and the operations degrade as ``docs/zfs.md`` describes.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent.zfs import exceptions as exc
from agent.zfs.names import Name, as_bytes, validate, validate_dataset, validate_snapshot

log = logging.getLogger(__name__)

PropValue = str | int


@dataclass(frozen=True)
class Features:
    """What the installed ZFS can do beyond the zfs-fuse 0.7 baseline."""

    resumable_receive: bool
    send_estimate: bool
    list_holds: bool
    lz4: bool
    multi_snapshot: bool
    receive_no_mount: bool


def run(argv: Sequence[str], name: Name | None = None, **kwargs: object) -> str:
    """Run a zfs/zpool command; map its failure to the pyzfs exception it means."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    result = subprocess.run(  # type: ignore[call-overload]
        list(argv), stderr=subprocess.PIPE, text=True, check=False, **kwargs
    )
    if result.returncode != 0:
        raise error_for(result.stderr, name)
    return str(result.stdout or "")


_PATTERNS: list[tuple[str, type[exc.ZFSError]]] = [
    ("dataset already exists", exc.DatasetExists),
    ("destination already exists", exc.DatasetExists),
    ("does not match incremental source", exc.StreamMismatch),
    ("destination has been modified", exc.DestinationModified),
    ("has been modified", exc.DestinationModified),
    ("destination has snapshots", exc.DestinationModified),
    ("could not find any snapshots", exc.DatasetNotFound),
    ("dataset does not exist", exc.DatasetNotFound),
    ("no such pool", exc.PoolNotFound),
    ("dataset is busy", exc.DatasetBusy),
    ("pool or dataset is busy", exc.DatasetBusy),
    ("out of space", exc.NoSpace),
    ("quota exceeded", exc.QuotaExceeded),
    ("invalid backup stream", exc.BadStream),
    ("invalid stream", exc.BadStream),
    ("checksum mismatch", exc.BadStream),
    ("incomplete stream", exc.StreamTruncated),
    ("premature eof", exc.StreamTruncated),
    ("bad property value", exc.PropertyInvalid),
    ("invalid property", exc.PropertyInvalid),
    ("not a clone", exc.NotClone),
]


def error_for(stderr: str, name: Name | None) -> exc.ZFSError:
    """The exception class for a command's error message."""
    text = stderr.strip()
    lowered = text.lower()
    for needle, cls in _PATTERNS:
        if needle in lowered:
            if cls is exc.DatasetExists and name is not None and b"@" in as_bytes(name):
                cls = exc.SnapshotExists
            if cls is exc.DatasetNotFound and name is not None and b"@" in as_bytes(name):
                cls = exc.SnapshotNotFound
            error = cls(name)
            error.message = f"{cls.message} ({text.splitlines()[-1] if text else 'no message'})"
            return error
    return exc.CommandFailed(errno.EIO, name, text or "zfs command failed without a message")


def _zfs(*args: str | bytes) -> list[str]:
    return ["zfs", *(a.decode() if isinstance(a, bytes) else a for a in args)]


def _usage(*argv: str) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    return result.stdout + result.stderr


@functools.cache
def features() -> Features:
    """Detected once per process."""
    send = _usage("zfs", "send")
    receive = _usage("zfs", "receive")
    holds = _usage("zfs", "holds")
    snapshot = _usage("zfs", "snapshot")
    upgrade = _usage("zpool", "upgrade", "-v")
    found = Features(
        resumable_receive=bool(re.search(r"receive \[[^\]]*s", receive)),
        send_estimate=bool(re.search(r"send \[[^\]]*n", send)),
        list_holds=bool(re.search(r"holds \[", holds)),
        lz4="lz4" in upgrade,
        multi_snapshot="<filesystem@snapname|volume@snapname>..." in snapshot,
        receive_no_mount=bool(re.search(r"receive \[[^\]]*u", receive)),
    )
    log.info("zfs features: %s", found)
    return found


def lzc_create(
    name: Name, ds_type: str = "zfs", props: Mapping[str, PropValue] | None = None
) -> None:
    raw = validate_dataset(name)
    if ds_type != "zfs":
        raise exc.DatasetTypeInvalid(raw)
    run(_zfs("create", *_prop_args(props), raw), raw)


def lzc_snapshot(snaps: Iterable[Name], props: Mapping[str, PropValue] | None = None) -> None:
    """Take snapshots; all or none (one command where ZFS allows, else undo on failure)."""
    names = [validate_snapshot(s) for s in snaps]
    datasets = [n.split(b"@")[0] for n in names]
    if len(set(datasets)) != len(datasets):
        raise exc.SnapshotFailure([exc.DuplicateSnapshots(None)])
    if features().multi_snapshot or len(names) == 1:
        try:
            run(_zfs("snapshot", *_prop_args(props), *names), names[0] if len(names) == 1 else None)
        except exc.ZFSError as error:
            if len(names) == 1:
                raise
            raise exc.SnapshotFailure([error]) from error
        return
    taken: list[bytes] = []
    try:
        for snap in names:
            run(_zfs("snapshot", *_prop_args(props), snap), snap)
            taken.append(snap)
    except exc.ZFSError as error:
        for snap in taken:
            run(_zfs("destroy", snap), snap)
        raise exc.SnapshotFailure([error]) from error


def lzc_destroy_snaps(snaps: Iterable[Name], defer: bool) -> None:
    errors: list[exc.ZFSError] = []
    for snap in (validate_snapshot(s) for s in snaps):
        try:
            run(_zfs("destroy", *(["-d"] if defer else []), snap), snap)
        except exc.DatasetNotFound:
            continue
        except exc.DatasetBusy:
            errors.append(exc.SnapshotIsHeld(snap))
        except exc.ZFSError as error:
            errors.append(error)
    if errors:
        raise exc.SnapshotDestructionFailure(errors)


def lzc_destroy(name: Name) -> None:
    raw = validate_dataset(name)
    run(_zfs("destroy", raw), raw)


def lzc_exists(name: Name) -> bool:
    raw = validate(name)
    try:
        run(_zfs("list", "-H", "-o", "name", "-t", "all", raw), raw)
    except exc.DatasetNotFound:
        return False
    return True


def lzc_send(
    snapname: Name, fromsnap: Name | None, fd: int, flags: Sequence[str] | None = None
) -> None:
    """Write the stream of ``snapname`` (incremental from ``fromsnap``) to ``fd``."""
    snap = validate_snapshot(snapname)
    base = ["-i", validate_snapshot(fromsnap).decode()] if fromsnap else []
    run(_zfs("send", *base, snap), snap, stdout=fd)


def lzc_receive(
    snapname: Name,
    fd: int,
    force: bool = False,
    raw: bool = False,
    origin: Name | None = None,
    props: Mapping[str, PropValue] | None = None,
) -> None:
    """Receive a stream from ``fd`` into exactly ``snapname``; a bad stream changes nothing."""
    snap = validate_snapshot(snapname)
    if raw or origin is not None or props:
        raise exc.FeatureNotSupported(snap)
    args = ["-F"] if force else []
    if features().receive_no_mount:
        args.append("-u")
    run(_zfs("receive", *args, snap), snap, stdin=fd)


def lzc_send_space(
    snapname: Name, fromsnap: Name | None = None, flags: Sequence[str] | None = None
) -> int:
    """Estimated stream size; without ``zfs send -n`` only a full stream can be estimated."""
    snap = validate_snapshot(snapname)
    if features().send_estimate:
        base = ["-i", validate_snapshot(fromsnap).decode()] if fromsnap else []
        out = run(_zfs("send", "-nvP", *base, snap), snap)
        sizes = re.findall(r"^size\s+(\d+)", out, re.MULTILINE)
        if sizes:
            return int(sizes[-1])
    if fromsnap is None:
        return int(lzc_get_props(snap)["referenced"])
    raise exc.FeatureNotSupported(snap, "this ZFS cannot estimate an incremental stream")


def lzc_hold(holds: Mapping[Name, str], fd: int | None = None) -> list[bytes]:
    """Place holds (snapshot -> tag); returns the snapshots that do not exist."""
    missing: list[bytes] = []
    errors: list[exc.ZFSError] = []
    for snap, tag in holds.items():
        raw = validate_snapshot(snap)
        try:
            run(_zfs("hold", tag, raw), raw)
        except exc.DatasetNotFound:
            missing.append(raw)
        except exc.ZFSError as error:
            errors.append(error)
    if errors:
        raise exc.HoldFailure(errors)
    return missing


def lzc_release(holds: Mapping[Name, Sequence[str]]) -> list[bytes]:
    """Release holds (snapshot -> tags); returns the snapshots that do not exist."""
    missing: list[bytes] = []
    errors: list[exc.ZFSError] = []
    for snap, tags in holds.items():
        raw = validate_snapshot(snap)
        for tag in tags:
            try:
                run(_zfs("release", tag, raw), raw)
            except exc.DatasetNotFound:
                missing.append(raw)
            except exc.ZFSError as error:
                errors.append(error)
    if errors:
        raise exc.ReleaseFailure(errors)
    return missing


def lzc_get_holds(snapname: Name) -> dict[str, int]:
    """Hold tags and their creation times; zfs-fuse cannot list tags (see hold_count)."""
    snap = validate_snapshot(snapname)
    if not features().list_holds:
        raise exc.FeatureNotSupported(snap, "this ZFS has no 'zfs holds'; use hold_count")
    out = run(_zfs("holds", "-Hp", snap), snap)
    holds = {}
    for line in out.splitlines():
        _, tag, created = line.split("\t")[:3]
        holds[tag] = int(created) if created.isdigit() else 0
    return holds


def hold_count(snapname: Name) -> int:
    """How many holds a snapshot has (its ``userrefs``), on every ZFS."""
    return int(lzc_get_props(validate_snapshot(snapname))["userrefs"])


def lzc_rollback(name: Name) -> bytes:
    """Roll back to the newest snapshot; returns its name."""
    raw = validate_dataset(name)
    snaps = lzc_list_snaps(raw)
    if not snaps:
        raise exc.SnapshotNotFound(raw)
    run(_zfs("rollback", snaps[-1]), raw)
    return snaps[-1]


def lzc_rollback_to(name: Name, snap: Name) -> None:
    raw = validate_dataset(name)
    target = validate_snapshot(snap)
    if lzc_list_snaps(raw)[-1:] != [target]:
        raise exc.SnapshotNotLatest(target)
    run(_zfs("rollback", target), target)


def lzc_rename(source: Name, target: Name) -> None:
    src = validate(source)
    dst = validate(target)
    run(_zfs("rename", src, dst), src)


def lzc_clone(name: Name, origin: Name, props: Mapping[str, PropValue] | None = None) -> None:
    raw = validate_dataset(name)
    run(_zfs("clone", *_prop_args(props), validate_snapshot(origin), raw), raw)


def lzc_promote(name: Name) -> None:
    raw = validate_dataset(name)
    run(_zfs("promote", raw), raw)


def lzc_get_props(name: Name) -> dict[str, str]:
    """Every property (user properties too) as strings, numbers in exact bytes."""
    raw = validate(name)
    out = run(_zfs("get", "-Hp", "-o", "property,value", "all", raw), raw)
    props = {}
    for line in out.splitlines():
        key, _, value = line.partition("\t")
        props[key] = value
    return props


def lzc_set_prop(name: Name, prop: str, value: PropValue) -> None:
    raw = validate(name)
    run(_zfs("set", f"{prop}={value}", raw), raw)


def lzc_inherit_prop(name: Name, prop: str) -> None:
    raw = validate(name)
    run(_zfs("inherit", prop, raw), raw)


def lzc_list_snaps(name: Name) -> list[bytes]:
    """Full names of the dataset's snapshots, oldest first."""
    raw = validate_dataset(name)
    out = run(
        _zfs("list", "-H", "-o", "name", "-t", "snapshot", "-s", "createtxg", "-r", "-d", "1", raw),
        raw,
    )
    return [line.encode() for line in out.splitlines() if line.startswith(raw.decode() + "@")]


def snapshot_guids(name: Name) -> list[tuple[bytes, int]]:
    """The dataset's snapshots, oldest first, with their GUIDs (``all`` omits guid on zfs-fuse)."""
    snaps = lzc_list_snaps(name)
    if not snaps:
        return []
    out = run(_zfs("get", "-Hp", "-o", "name,value", "guid", *snaps), snaps[0])
    guids = dict(line.split("\t", 1) for line in out.splitlines())
    return [(snap, int(guids[snap.decode()])) for snap in snaps]


def lzc_list_children(name: Name) -> list[bytes]:
    """Direct child filesystems of a dataset."""
    raw = validate_dataset(name)
    out = run(_zfs("list", "-H", "-o", "name", "-t", "filesystem", "-r", "-d", "1", raw), raw)
    return [line.encode() for line in out.splitlines() if line != raw.decode()]


def zfs_mount(name: Name) -> None:
    raw = validate_dataset(name)
    run(_zfs("mount", raw), raw)


def zfs_unmount(name: Name) -> None:
    raw = validate_dataset(name)
    run(_zfs("unmount", raw), raw)


def pool_free_bytes(pool: str) -> int:
    raw = validate_dataset(pool)
    return int(run(_zfs("get", "-Hp", "-o", "value", "available", raw), raw).strip())


def _prop_args(props: Mapping[str, PropValue] | None) -> list[str]:
    return [arg for key, value in (props or {}).items() for arg in ("-o", f"{key}={value}")]
