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
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from agent.zfs import exceptions as exc
from agent.zfs import runner
from agent.zfs.names import Name, as_bytes, validate, validate_dataset, validate_snapshot

log = logging.getLogger(__name__)

PropValue = str | int


@dataclass(frozen=True)
class Features:
    """What the installed ZFS can do beyond the zfs-fuse 0.7 baseline."""

    resumable_receive: bool
    send_estimate: bool
    list_holds: bool
    bookmarks: bool
    lz4: bool
    multi_snapshot: bool
    # pyzfs's stream flags (compress, large_blocks, embedded_data, raw) that `zfs send` offers.
    send_flags: frozenset[str]


@dataclass(frozen=True)
class ResumePoint:
    """Where a cut resumable receive stopped, as its token says, checked on the sender.

    ``snapshot`` is the sender's full name of the snapshot the stream lands
    (its GUID ``guid``), ``base_guid`` the GUID of its incremental source (None:
    a full stream); ``bytes_received`` arrived before the cut and ``bytes_left``
    is the estimated rest (0 when ZFS gives no estimate).
    """

    snapshot: bytes
    guid: int
    base_guid: int | None
    bytes_received: int
    bytes_left: int


def _run(
    argv: Sequence[str],
    name: Name | None = None,
    stdin: int | None = None,
    stdout: int | None = runner.PIPE,
) -> str:
    """A zfs/zpool command through ``runner``; a failure raised as its pyzfs exception."""
    return runner.check(
        argv,
        as_bytes(name).decode() if name is not None else None,
        failure=lambda stderr: error_for(stderr, name),
        stdin=stdin,
        stdout=stdout,
    )


_PATTERNS: list[tuple[str, type[exc.ZFSError]]] = [
    # `zfs send -t` of a token whose snapshot (or base) this ZFS no longer holds.
    ("used in the initial send", exc.SnapshotNotFound),
    ("no longer the same snapshot", exc.SnapshotNotFound),
    ("no longer exists", exc.SnapshotNotFound),
    ("tag already exists", exc.HoldExists),
    ("bookmark exists", exc.BookmarkExists),
    ("no such tag", exc.HoldNotFound),
    ("dataset already exists", exc.DatasetExists),
    ("destination already exists", exc.DatasetExists),
    ("does not match incremental source", exc.StreamMismatch),
    ("destination has been modified", exc.DestinationModified),
    ("has been modified", exc.DestinationModified),
    ("destination has snapshots", exc.DestinationModified),
    ("could not find any snapshots", exc.DatasetNotFound),
    ("dataset does not exist", exc.DatasetNotFound),
    ("no such pool", exc.PoolNotFound),
    ("dependent clones", exc.SnapshotIsCloned),
    ("more recent snapshots exist", exc.SnapshotNotLatest),
    ("dataset is busy", exc.DatasetBusy),
    ("pool or dataset is busy", exc.DatasetBusy),
    ("out of space", exc.NoSpace),
    ("no space left", exc.NoSpace),
    ("quota exceeded", exc.QuotaExceeded),
    ("invalid backup stream", exc.BadStream),
    ("invalid stream", exc.BadStream),
    ("checksum mismatch", exc.BadStream),
    ("incomplete stream", exc.StreamTruncated),
    ("premature eof", exc.StreamTruncated),
    ("failed to read from stream", exc.StreamTruncated),
    ("bad property value", exc.PropertyInvalid),
    ("invalid property", exc.PropertyInvalid),
    ("must be one of", exc.PropertyInvalid),
    ("size is less than current used", exc.PropertyInvalid),
    ("invalid option", exc.FeatureNotSupported),
    ("not a clone", exc.NotClone),
]


def error_for(stderr: str, name: Name | None) -> exc.ZFSError:
    """The exception for a command's error message (zfs wraps long messages: joined first)."""
    text = " ".join(stderr.split())
    lowered = text.lower()
    for needle, cls in _PATTERNS:
        if needle in lowered:
            if cls is exc.DatasetExists and name is not None and b"@" in as_bytes(name):
                cls = exc.SnapshotExists
            if cls is exc.DatasetNotFound and name is not None and b"@" in as_bytes(name):
                cls = exc.SnapshotNotFound
            error = cls(name)
            error.message = f"{cls.message} ({text or 'no message'})"
            return error
    return exc.CommandFailed(errno.EIO, name, text or "zfs command failed without a message")


def _zfs(*args: str | bytes) -> list[str]:
    return ["zfs", *(a.decode() if isinstance(a, bytes) else a for a in args)]


def _usage(*argv: str) -> str:
    result = runner.run(argv)
    return result.stdout + result.stderr


@functools.cache
def features() -> Features:
    """Detected once per process."""
    send = _usage("zfs", "send")
    receive = _usage("zfs", "receive")
    holds = _usage("zfs", "holds")
    commands = _usage("zfs")
    snapshot = _usage("zfs", "snapshot")
    upgrade = _usage("zpool", "upgrade", "-v")
    found = Features(
        resumable_receive=bool(re.search(r"receive \[[^\]]*s", receive)),
        send_estimate=bool(re.search(r"send \[[^\]]*n", send)),
        list_holds=bool(re.search(r"holds \[", holds)),
        bookmarks=bool(re.search(r"^\s*bookmark ", commands, re.MULTILINE)),
        lz4="lz4" in upgrade,
        multi_snapshot=bool(re.search(r"snap(name)?>\s*\.\.\.", snapshot)),
        send_flags=frozenset(
            flag
            for flag, option in _SEND_FLAGS.items()
            if re.search(rf"send \[-[A-Za-z]*{option[1]}", send)
        ),
    )
    log.info("zfs features: %s", found)
    return found


def lzc_create(
    name: Name, ds_type: str = "zfs", props: Mapping[str, PropValue] | None = None
) -> None:
    raw = validate_dataset(name)
    if ds_type != "zfs":
        raise exc.DatasetTypeInvalid(raw)
    _run(_zfs("create", *_prop_args(props), raw), raw)


def lzc_snapshot(snaps: Iterable[Name], props: Mapping[str, PropValue] | None = None) -> None:
    """Take snapshots; all or none (one command where ZFS allows, else undo on failure)."""
    names = [validate_snapshot(s) for s in snaps]
    datasets = [n.split(b"@")[0] for n in names]
    if len(set(datasets)) != len(datasets):
        raise exc.SnapshotFailure([exc.DuplicateSnapshots(None)])
    if features().multi_snapshot or len(names) == 1:
        try:
            _run(
                _zfs("snapshot", *_prop_args(props), *names), names[0] if len(names) == 1 else None
            )
        except exc.ZFSError as error:
            if len(names) == 1:
                raise
            raise exc.SnapshotFailure([_named_by_message(error)]) from error
        return
    taken: list[bytes] = []
    try:
        for snap in names:
            _run(_zfs("snapshot", *_prop_args(props), snap), snap)
            taken.append(snap)
    except exc.ZFSError as error:
        for snap in taken:
            _run(_zfs("destroy", snap), snap)
        raise exc.SnapshotFailure([error]) from error


def _named_by_message(error: exc.ZFSError) -> exc.ZFSError:
    """The error of a command on several snapshots, classed for the snapshot its message names.

    ``zfs snapshot a@s b@s`` says "cannot create snapshot 'b@s': dataset
    already exists": with that name the error is SnapshotExists, as pyzfs says.
    """
    found = re.search(r"snapshot '([^']+@[^']+)'", error.message)
    return error if found is None else error_for(error.message, found.group(1).encode())


def lzc_destroy_snaps(snaps: Iterable[Name], defer: bool) -> None:
    errors: list[exc.ZFSError] = []
    for snap in (validate_snapshot(s) for s in snaps):
        try:
            _run(_zfs("destroy", *(["-d"] if defer else []), snap), snap)
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
    _run(_zfs("destroy", raw), raw)


def lzc_exists(name: Name) -> bool:
    raw = validate(name)
    try:
        _run(_zfs("list", "-H", "-o", "name", "-t", "all", raw), raw)
    except exc.DatasetNotFound:
        return False
    return True


_SEND_FLAGS = {"embedded_data": "-e", "large_blocks": "-L", "compress": "-c", "raw": "-w"}


def _send_args(snap: bytes, fromsnap: Name | None, flags: Sequence[str] | None) -> list[str]:
    """``zfs send`` options for pyzfs's stream flags; zfs-fuse has none of them."""
    unknown = set(flags or ()) - set(_SEND_FLAGS)
    if unknown:
        raise exc.UnknownStreamFeature(snap, f"Unknown stream flags {sorted(unknown)}")
    lacking = set(flags or ()) - features().send_flags
    if lacking:
        raise exc.FeatureNotSupported(
            snap, f"this ZFS cannot send with {', '.join(sorted(lacking))}: send without them"
        )
    args = [_SEND_FLAGS[flag] for flag in flags or ()]
    if fromsnap:
        args += ["-i", _send_source(fromsnap).decode()]
    return args


def _send_source(name: Name) -> bytes:
    """The base of an incremental stream: a snapshot, or a bookmark of one (``fs#mark``)."""
    raw = validate(name)
    if b"@" not in raw and b"#" not in raw:
        raise exc.NameInvalid(
            raw, "Invalid name: an incremental stream starts at a snapshot or bookmark"
        )
    return raw


def lzc_send(
    snapname: Name, fromsnap: Name | None, fd: int, flags: Sequence[str] | None = None
) -> None:
    """Write the stream of ``snapname`` (incremental from ``fromsnap``) to ``fd``."""
    snap = validate_snapshot(snapname)
    _run(_zfs("send", *_send_args(snap, fromsnap, flags), snap), snap, stdout=fd)


def lzc_receive(
    snapname: Name,
    fd: int,
    force: bool = False,
    raw: bool = False,
    origin: Name | None = None,
    props: Mapping[str, PropValue] | None = None,
) -> None:
    """Receive a stream from ``fd`` into exactly ``snapname``, unmounted like libzfs_core does.

    A bad or truncated stream raises and changes nothing. ``raw``, ``origin``
    and ``props`` are not offered by the commands on every ZFS: refused.
    """
    snap = validate_snapshot(snapname)
    if raw or origin is not None or props:
        raise exc.FeatureNotSupported(snap, "receive with raw, origin or props is not offered")
    args = ["-u", *(["-F"] if force else [])]
    _run(_zfs("receive", *args, snap), snap, stdin=fd)


def lzc_receive_resumable(
    snapname: Name,
    fd: int,
    force: bool = False,
    raw: bool = False,
    origin: Name | None = None,
    props: Mapping[str, PropValue] | None = None,
) -> None:
    """Like ``lzc_receive``, but a cut stream leaves what arrived, resumable by its token.

    After a cut, ``receive_resume_token`` of the target filesystem names where
    the stream stopped; ``send_resume`` writes the rest from the sender, and
    this function receives it. Needs ``zfs receive -s`` (kernel OpenZFS): on a
    ZFS without it (zfs-fuse) this raises FeatureNotSupported and changes
    nothing; the caller restarts from the last common snapshot.
    """
    snap = validate_snapshot(snapname)
    if not features().resumable_receive:
        raise exc.FeatureNotSupported(
            snap, "this ZFS cannot resume a receive (no 'zfs receive -s'): send again in full"
        )
    if raw or origin is not None or props:
        raise exc.FeatureNotSupported(snap, "receive with raw, origin or props is not offered")
    args = ["-s", "-u", *(["-F"] if force else [])]
    _run(_zfs("receive", *args, snap), snap, stdin=fd)


def receive_resume_token(name: Name) -> str | None:
    """The token of a cut resumable receive into filesystem ``name``, or None when there is none."""
    raw = validate_dataset(name)
    if not features().resumable_receive:
        return None
    token = _get(raw, "receive_resume_token").get("receive_resume_token", "-")
    return None if token in ("", "-") else token


def send_resume(token: str, fd: int) -> None:
    """Write the rest of a cut stream, from where its receiver's ``token`` says it stopped.

    Runs on the sender (``zfs send -t``); libzfs_core has no parser for tokens,
    so both backends use the command.
    """
    _run(_zfs("send", "-t", _valid_token(token)), None, stdout=fd)


def send_resume_point(token: str) -> ResumePoint:
    """What the rest of the cut stream of ``token`` lands, read on the sender (``zfs send -nvPt``).

    ZFS looks the token's snapshot and base up by GUID: SnapshotNotFound when
    this ZFS no longer holds them (the stream cannot be finished from here).
    FeatureNotSupported without resumable receive (zfs-fuse).
    """
    if not features().resumable_receive:
        raise exc.FeatureNotSupported(None, "this ZFS cannot resume a send (no 'zfs send -t')")
    out = _run(_zfs("send", "-nvP", "-t", _valid_token(token)), None)
    fields = dict(re.findall(r"^\s+(\w+) = (\S+)$", out, re.MULTILINE))
    try:
        snapshot = validate_snapshot(fields["toname"])
        guid = int(fields["toguid"], 0)
        received = int(fields["bytes"], 0)
    except (KeyError, ValueError) as error:
        raise exc.BadStream(None, f"unreadable resume token contents ({error}): {out!r}") from None
    base = int(fields["fromguid"], 0) if "fromguid" in fields else None
    sizes = re.findall(r"^size\s+(\d+)", out, re.MULTILINE)
    return ResumePoint(snapshot, guid, base or None, received, int(sizes[-1]) if sizes else 0)


def _valid_token(token: str) -> str:
    if not re.fullmatch(r"[0-9a-zA-Z-]+", token):
        raise exc.BadStream(None, "a resume token is letters, digits and dashes")
    return token


def receive_abort(name: Name) -> None:
    """Discard the partial state a cut resumable receive left in filesystem ``name``.

    For when the rest cannot come (the sender lost the snapshot): the next
    receive then starts from the last complete snapshot.
    """
    raw = validate_dataset(name)
    if not features().resumable_receive:
        raise exc.FeatureNotSupported(raw, "this ZFS keeps no partial receives to discard")
    _run(_zfs("receive", "-A", raw), raw)


def lzc_bookmark(bookmarks: Mapping[Name, Name]) -> None:
    """Create bookmarks (``fs#mark`` -> its snapshot ``fs@snap``). A bookmark keeps the
    snapshot's GUID and createtxg but no data: an incremental stream can start from it once
    the snapshot is destroyed. FeatureNotSupported where ZFS has none (zfs-fuse)."""
    pairs = [
        (validate(mark, "bookmark"), validate_snapshot(snap)) for mark, snap in bookmarks.items()
    ]
    if not features().bookmarks:
        raise exc.FeatureNotSupported(None, "this ZFS has no bookmarks: keep the snapshot instead")
    errors: list[exc.ZFSError] = []
    for mark, snap in pairs:
        try:
            _run(_zfs("bookmark", snap, mark), mark)
        except exc.ZFSError as error:
            errors.append(error)
    if errors:
        raise exc.BookmarkFailure(errors)


def bookmark_guids(name: Name) -> list[tuple[bytes, int]]:
    """The filesystem's bookmarks, oldest first, with the GUIDs of the snapshots they mark;
    empty where ZFS has no bookmarks."""
    raw = validate_dataset(name)
    if not features().bookmarks:
        return []
    out = _run(
        _zfs("list", "-Hp", "-t", "bookmark", "-o", "name,guid", "-s", "createtxg", "-d", "1", raw),
        raw,
    )
    prefix = raw.decode() + "#"
    pairs = (line.split("\t") for line in out.splitlines())
    return [(mark.encode(), int(guid)) for mark, guid in pairs if mark.startswith(prefix)]


def lzc_destroy_bookmarks(bookmarks: Iterable[Name]) -> None:
    """Destroy bookmarks; those that do not exist are ignored, as libzfs_core does."""
    marks = [validate(mark, "bookmark") for mark in bookmarks]
    if not marks or not features().bookmarks:
        return
    present: set[bytes] = set()
    for fs in {mark.split(b"#")[0] for mark in marks}:
        present.update(mark for mark, _ in bookmark_guids(fs))
    errors: list[exc.ZFSError] = []
    for mark in marks:
        if mark not in present:
            continue
        try:
            _run(_zfs("destroy", mark), mark)
        except exc.ZFSError as error:
            errors.append(error)
    if errors:
        raise exc.BookmarkDestructionFailure(errors)


def lzc_send_space(
    snapname: Name, fromsnap: Name | None = None, flags: Sequence[str] | None = None
) -> int:
    """Estimated stream size; without ``zfs send -n`` only a full stream can be estimated."""
    snap = validate_snapshot(snapname)
    if features().send_estimate:
        out = _run(_zfs("send", "-nvP", *_send_args(snap, fromsnap, flags), snap), snap)
        sizes = re.findall(r"^size\s+(\d+)", out, re.MULTILINE)
        if sizes:
            return int(sizes[-1])
    if fromsnap is None:
        return int(lzc_get_props(snap)["referenced"])
    raise exc.FeatureNotSupported(snap, "this ZFS cannot estimate an incremental stream")


def lzc_hold(holds: Mapping[Name, str], fd: int | None = None) -> list[bytes]:
    """Place holds (snapshot -> tag); returns the snapshots that do not exist.

    The commands cannot tie holds to a cleanup descriptor, so ``fd`` is refused.
    """
    if fd is not None:
        raise exc.FeatureNotSupported(None, "holds released on close of fd are not offered")
    missing: list[bytes] = []
    errors: list[exc.ZFSError] = []
    for snap, tag in holds.items():
        raw = validate_snapshot(snap)
        try:
            _run(_zfs("hold", tag, raw), raw)
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
                _run(_zfs("release", tag, raw), raw)
            except exc.DatasetNotFound:
                missing.append(raw)
            except exc.ZFSError as error:
                errors.append(error)
    if errors:
        raise exc.HoldReleaseFailure(errors)
    return missing


def lzc_get_holds(snapname: Name) -> dict[str, int]:
    """Hold tags and their creation times; zfs-fuse cannot list tags (see hold_count)."""
    snap = validate_snapshot(snapname)
    if not features().list_holds:
        raise exc.FeatureNotSupported(snap, "this ZFS has no 'zfs holds'; use hold_count")
    out = _run(_zfs("holds", "-H", snap), snap)
    holds = {}
    for line in out.splitlines():
        _, tag, created = line.split("\t")[:3]
        holds[tag] = _hold_time(created)
    return holds


def _hold_time(created: str) -> int:
    """Seconds since the epoch of a hold; ``zfs holds`` before OpenZFS 2.2 has no ``-p``
    and prints the time to the minute ("Tue Dec  1 20:27 2026"); 0 when unreadable."""
    if created.isdigit():
        return int(created)
    try:
        return int(time.mktime(time.strptime(" ".join(created.split()), "%a %b %d %H:%M %Y")))
    except ValueError:
        return 0


def hold_count(snapname: Name) -> int:
    """How many holds a snapshot has (its ``userrefs``), on every ZFS."""
    return int(lzc_get_props(validate_snapshot(snapname))["userrefs"])


def lzc_rollback(name: Name) -> bytes:
    """Roll back to the newest snapshot; returns its name."""
    raw = validate_dataset(name)
    snaps = lzc_list_snaps(raw)
    if not snaps:
        raise exc.SnapshotNotFound(raw)
    _run(_zfs("rollback", snaps[-1]), raw)
    return snaps[-1]


def lzc_rollback_to(name: Name, snap: Name) -> None:
    raw = validate_dataset(name)
    target = validate_snapshot(snap)
    if lzc_list_snaps(raw)[-1:] != [target]:
        raise exc.SnapshotNotLatest(target)
    _run(_zfs("rollback", target), target)


def lzc_rename(source: Name, target: Name) -> None:
    src = validate(source)
    dst = validate(target)
    _run(_zfs("rename", src, dst), src)


def lzc_clone(name: Name, origin: Name, props: Mapping[str, PropValue] | None = None) -> None:
    raw = validate_dataset(name)
    _run(_zfs("clone", *_prop_args(props), validate_snapshot(origin), raw), raw)


def lzc_promote(name: Name) -> None:
    raw = validate_dataset(name)
    _run(_zfs("promote", raw), raw)


def lzc_get_props(name: Name) -> dict[str, str]:
    """Every property (user properties too) as strings, numbers in exact bytes.

    zfs-fuse leaves ``guid`` and ``createtxg`` out of ``all``: asked for by name.
    """
    raw = validate(name)
    props = _get(raw, "all")
    if "guid" not in props:
        props.update(_get(raw, "guid,createtxg"))
    return props


def _get(raw: bytes, which: str) -> dict[str, str]:
    out = _run(_zfs("get", "-Hp", "-o", "property,value", which, raw), raw)
    return dict(line.partition("\t")[::2] for line in out.splitlines())


def lzc_set_prop(name: Name, prop: str, value: PropValue) -> None:
    raw = validate(name)
    _run(_zfs("set", f"{prop}={value}", raw), raw)


def lzc_inherit_prop(name: Name, prop: str) -> None:
    raw = validate(name)
    _run(_zfs("inherit", prop, raw), raw)


def lzc_list_snaps(name: Name) -> list[bytes]:
    """Full names of the dataset's snapshots, oldest first."""
    raw = validate_dataset(name)
    out = _run(
        _zfs("list", "-H", "-o", "name", "-t", "snapshot", "-s", "createtxg", "-r", "-d", "1", raw),
        raw,
    )
    return [line.encode() for line in out.splitlines() if line.startswith(raw.decode() + "@")]


def snapshot_guids(name: Name) -> list[tuple[bytes, int]]:
    """The dataset's snapshots, oldest first, with their GUIDs, read in one command.

    One recursive ``zfs get`` of creation txg and guid, never a listing followed
    by a ``zfs get`` of each name: a snapshot pruned between those two commands
    (a move prunes while convergence reads) made the second fail with "dataset
    does not exist". The recursion skips a snapshot destroyed meanwhile.
    ``all`` omits guid on zfs-fuse, so both properties are named.
    """
    raw = validate_dataset(name)
    out = _run(
        _zfs("get", "-Hp", "-r", "-d", "1", "-o", "name,property,value", "createtxg,guid", raw), raw
    )
    prefix = raw.decode() + "@"
    found: dict[str, dict[str, int]] = {}
    for line in out.splitlines():
        snapshot, prop, value = line.split("\t")
        if snapshot.startswith(prefix):
            found.setdefault(snapshot, {})[prop] = int(value)
    complete = [(props["createtxg"], snap) for snap, props in found.items() if len(props) == 2]
    return [(snap.encode(), found[snap]["guid"]) for _, snap in sorted(complete)]


def lzc_list_children(name: Name) -> list[bytes]:
    """Direct child filesystems of a dataset."""
    raw = validate_dataset(name)
    out = _run(_zfs("list", "-H", "-o", "name", "-t", "filesystem", "-r", "-d", "1", raw), raw)
    return [line.encode() for line in out.splitlines() if line != raw.decode()]


def zfs_mount(name: Name) -> None:
    raw = validate_dataset(name)
    _run(_zfs("mount", raw), raw)


def zfs_unmount(name: Name) -> None:
    raw = validate_dataset(name)
    _run(_zfs("unmount", raw), raw)


def pool_free_bytes(pool: str) -> int:
    raw = validate_dataset(pool)
    return int(_run(_zfs("get", "-Hp", "-o", "value", "available", raw), raw).strip())


def _prop_args(props: Mapping[str, PropValue] | None) -> list[str]:
    return [arg for key, value in (props or {}).items() for arg in ("-o", f"{key}={value}")]
