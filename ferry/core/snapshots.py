"""Ferry's snapshot names and the choice of a common base.

Ferry names its snapshots ``ferry-<epoch>-<seq>``: the owner epoch that took
it, and a sequence number that only grows on a volume across epochs, so the
newest snapshot is the one with the highest sequence. Identity of data is
decided by ZFS GUID, never by name: a fenced old owner may hold a snapshot
with a familiar name and different data. Where ZFS has bookmarks, the sender
keeps one of each snapshot a peer confirmed, named as the snapshot: it keeps
the snapshot's GUID, so a stream can start from it once the snapshot is gone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

PREFIX = "ferry-"
FENCED_PREFIX = "fenced"
"""``fenced-<unix time>``: what a copy held when its node found it no longer owned it."""
_PATTERN = re.compile(r"^ferry-(\d+)-(\d+)$")


@dataclass(frozen=True, order=True)
class SnapshotName:
    """A parsed Ferry snapshot name; orders by sequence, then epoch."""

    seq: int
    epoch: int

    def __str__(self) -> str:
        return f"{PREFIX}{self.epoch}-{self.seq}"


@dataclass(frozen=True)
class SnapshotRef:
    """A snapshot as a peer reports it: short name and ZFS GUID."""

    name: str
    guid: int


@dataclass(frozen=True)
class CutStream:
    """A stream a peer received part of and can take the rest of (a resumable receive).

    ``snapshot`` is what the rest lands on the peer, ``base`` the snapshot it
    is incremental from (None: a full stream); ``left`` is the estimated size
    of the rest in bytes (0 when unknown).
    """

    snapshot: SnapshotRef
    base: SnapshotRef | None
    left: int


@dataclass(frozen=True)
class Base:
    """Where an incremental stream starts on the sender: its snapshot ``name`` (the peer holds
    a snapshot of that name and GUID), or with ``bookmark`` only this copy's bookmark of it,
    the snapshot itself destroyed here since."""

    name: str
    bookmark: bool = False


def parse(name: str) -> SnapshotName | None:
    """The Ferry snapshot name in ``name``, or None for snapshots Ferry did not take."""
    match = _PATTERN.match(name)
    if match is None:
        return None
    return SnapshotName(seq=int(match.group(2)), epoch=int(match.group(1)))


def is_fenced(name: str) -> bool:
    return name.startswith(FENCED_PREFIX + "-")


def next_name(existing: Iterable[str], epoch: int) -> str:
    """The name of the next snapshot the owner at ``epoch`` takes."""
    seqs = [parsed.seq for parsed in map(parse, existing) if parsed is not None]
    return str(SnapshotName(seq=max(seqs, default=0) + 1, epoch=epoch))


def newest_common(local: Sequence[SnapshotRef], remote: Sequence[SnapshotRef]) -> str | None:
    """The newest snapshot of ``local`` (oldest first) that ``remote`` holds with the same GUID."""
    remote_guids = {ref.guid for ref in remote}
    for ref in reversed(local):
        if ref.guid in remote_guids:
            return ref.name
    return None


def stream_base(
    local: Sequence[SnapshotRef],
    remote: Sequence[SnapshotRef],
    bookmarks: Sequence[SnapshotRef] = (),
) -> Base | None:
    """The newest snapshot of ``remote`` (oldest first) that this copy holds with the same
    GUID: as a snapshot of ``local``, else as one of its ``bookmarks``. None: no common base.

    Newest by the peer's order, because the peer takes an incremental stream
    only from its newest snapshot; a snapshot is preferred to its bookmark.
    """
    snapshots = {ref.guid: ref.name for ref in local}
    marks = {ref.guid: ref.name for ref in bookmarks}
    for ref in reversed(remote):
        if ref.guid in snapshots:
            return Base(snapshots[ref.guid])
        if ref.guid in marks:
            return Base(marks[ref.guid], bookmark=True)
    return None


def unsent(
    local: Sequence[SnapshotRef],
    remote: Sequence[SnapshotRef],
    epoch: int,
    newest: str,
    bookmarks: Sequence[SnapshotRef] = (),
) -> list[str]:
    """Snapshots of this ``epoch`` newer than the common base that ``remote`` lacks, but
    ``newest``: what failed sends left behind.

    A retry sends from the common base to a new snapshot, so these serve no
    stream; kept, every retry of a move to an unreachable target added one.
    A base that is a bookmark is placed among the snapshots by its Ferry
    sequence (bookmarks are named as their snapshots).
    """
    base = stream_base(local, remote, bookmarks)
    names = [ref.name for ref in local]
    if base is None:
        after = 0
    elif not base.bookmark:
        after = names.index(base.name) + 1
    else:
        marked = parse(base.name)
        later = [
            at for at, name in enumerate(names) if marked and (p := parse(name)) and p > marked
        ]
        after = later[0] if later else len(names)
    remote_guids = {ref.guid for ref in remote}
    return [
        ref.name
        for ref in local[after:]
        if ref.name != newest
        and ref.guid not in remote_guids
        and (parsed := parse(ref.name)) is not None
        and parsed.epoch == epoch
    ]


def prunable(snapshots: Sequence[str], keep: Iterable[str], keep_newest: int = 2) -> list[str]:
    """Ferry snapshots (oldest first in ``snapshots``) that no longer serve as a base.

    Keeps the ``keep_newest`` newest Ferry snapshots and everything named in
    ``keep`` (the newest common base with each peer), and only prunes
    snapshots older than the oldest kept one, so an incremental chain to a
    peer is never broken.
    """
    ferry = [name for name in snapshots if parse(name) is not None]
    kept = set(ferry[-keep_newest:]) | set(keep)
    oldest_kept = min((ferry.index(name) for name in kept if name in ferry), default=len(ferry))
    return ferry[:oldest_kept]


def replication_interval(rpo_seconds: float) -> float:
    """How often the owner sends to each replica: a third of the RPO (at least a second),
    so one failed or slow round still leaves a replica within its RPO."""
    return max(1.0, rpo_seconds / 3)


def prunable_with_replicas(
    snapshots: Sequence[str], bases: Iterable[str], keep_newest: int = 2
) -> list[str]:
    """Ferry snapshots (oldest first) that neither a replica nor the next send needs.

    A send goes from a replica's newest common snapshot (its base) straight
    to the newest one, so only each replica's base and the ``keep_newest``
    newest are needed; a replica far behind keeps its own base and nothing
    between it and the others'.
    """
    ferry = [name for name in snapshots if parse(name) is not None]
    kept = set(ferry[-keep_newest:]) | set(bases)
    return [name for name in ferry if name not in kept]
