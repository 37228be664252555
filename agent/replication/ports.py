"""The three ports the replication protocol works through, and nothing else.

``LocalStore`` is this node's copy of each volume (snapshots, streams,
freeze/thaw, what uses it, whether it can take a stream); ``Peer`` is
another node's receiving end; ``MoveRecords`` is the cluster state a move
reads and compare-and-swaps (the move record, the owner, the spec).

The real implementations are in ``agent.replication.adapters``; in-memory
fakes are in ``tests/support/replication.py``, and one shared suite
(``tests/integration/test_replication_ports.py``) holds both to the same
behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Protocol

from ferry.cluster.keyspace import Versioned
from ferry.core.records import Move, Owner, VolumeSpec
from ferry.core.snapshots import Base, CutStream, SnapshotRef
from protos.ferry.v1 import transfer_pb2

ProgressCallback = Callable[[int], None]
"""Called with the bytes of a stream the peer has taken so far."""


class SendStream(Protocol):
    """A snapshot's send stream, written into a descriptor by the transport."""

    def write_to(self, fd: int) -> None: ...


class SnapshotSource(Protocol):
    """This node's copies as the sending end of a stream sees them."""

    async def snapshots(self, volume: str) -> list[SnapshotRef] | None:
        """Oldest first; None when this node holds no copy."""

    async def take_snapshot(self, volume: str, epoch: int) -> SnapshotRef:
        """A new Ferry snapshot of the copy as it is now, named for ``epoch``."""

    async def destroy_snapshots(self, volume: str, shorts: Sequence[str]) -> None: ...

    async def send_space(
        self, volume: str, short: str, base: Base | None, flags: Sequence[str] = ()
    ) -> int:
        """Estimated stream size, 0 when unknown."""

    def send_stream(
        self, volume: str, short: str, base: Base | None, flags: Sequence[str] = ()
    ) -> SendStream:
        """The stream of snapshot ``short``, incremental from ``base`` (a snapshot or a
        bookmark of one), sent with ``flags`` (of ``stream_features``)."""

    def stream_features(self) -> frozenset[str]:
        """What this ZFS sends beyond a plain stream, of ``compress`` and ``large_blocks``."""

    async def bookmarks(self, volume: str) -> list[SnapshotRef]:
        """Bookmarks of the copy (named and with the GUIDs of the snapshots they mark), oldest
        first; empty where ZFS has none."""

    async def keep_bookmark(self, volume: str, short: str) -> None:
        """Bookmark snapshot ``short`` (a peer holds it); nothing where ZFS has no bookmarks."""

    async def destroy_bookmarks(self, volume: str, shorts: Sequence[str]) -> None: ...

    def can_resume(self) -> bool:
        """This ZFS can send the rest of a cut stream (``zfs send -t``)."""

    async def cut_stream(self, volume: str, token: str) -> CutStream | None:
        """What the rest of a peer's cut stream (its resume ``token``) lands, if it can come
        from this copy; None when it cannot (snapshot or base gone, or no ``zfs send -t``)."""

    def resume_stream(self, token: str) -> SendStream:
        """The rest of the cut stream of ``token``."""

    def held(self, volume: str, shorts: Sequence[str]) -> AbstractAsyncContextManager[None]:
        """Snapshots kept from pruning while a stream needs them."""


class ReceivingStore(Protocol):
    """This node's copies as the receiving end of a stream sees them."""

    async def snapshots(self, volume: str) -> list[SnapshotRef] | None:
        """Oldest first; None when this node holds no copy."""

    async def is_writable(self, volume: str) -> bool: ...

    async def divergence(self, volume: str, base: str) -> str:
        """Why the copy cannot continue from ``base`` without loss, or ""."""

    async def keep_aside(self, volume: str, epoch: int, reason: str) -> str:
        """Rename the copy out of the way; returns its new name."""

    async def resume_token(self, volume: str) -> str | None:
        """The token of a cut receive into the copy, None when nothing waits to be resumed."""

    async def abort_receive(self, volume: str) -> None:
        """Discard what a cut receive left; the copy is at its newest complete snapshot."""


class LocalStore(SnapshotSource, ReceivingStore, Protocol):
    """This node's copies of its volumes: what a move and a receive need of them."""

    async def freeze(self, volume: str) -> None:
        """Every writer stops, the copy stays mounted (an unmounted one has no writer and
        is left as it is); FilesystemBusy while a file is open for writing. ``thaw`` or
        ``stop_writes`` follows."""

    async def thaw(self, volume: str) -> None: ...

    async def stop_writes(self, volume: str) -> None:
        """Unmounted and read-only: nothing writes this copy after it."""

    async def in_use(self, volume: str) -> list[str]:
        """What uses the copy on this host (mounts in any namespace, open files, Docker's
        mount IDs), described for an operator; empty when nothing does."""

    def closed_to_mounts(self, volume: str) -> AbstractContextManager[None]:
        """While inside, a new Docker Mount of the volume here is refused."""

    def commands_running(self, volume: str) -> list[str]:
        """Outside commands on the volume running now, described for an operator."""

    async def activate(self, spec: VolumeSpec) -> None:
        """Make this copy the writable one, with the spec's properties; it is mounted only
        when something here uses it (a Mount), not by this."""


class Peer(Protocol):
    """Another node's receiving end of snapshot streams."""

    @property
    def node(self) -> str: ...

    async def holdings(self, volume: str) -> list[SnapshotRef]:
        """The peer's snapshots of ``volume``, oldest first; TransferFailed if it is silent."""

    async def send(
        self,
        header: transfer_pb2.StreamHeader,
        stream: SendStream,
        on_progress: ProgressCallback,
    ) -> list[SnapshotRef]:
        """Stream to the peer; returns what it then holds. TransferFailed when the peer
        refuses or the stream breaks (the peer's copy as it was, unless the stream arrived
        whole before the reply was lost). ``on_progress`` gets the bytes taken as the stream
        goes and a last count when it ends, failed or not."""

    async def resume_token(self, volume: str) -> str | None:
        """The token of a cut stream the peer can take the rest of (``header.resume_token``),
        or None; TransferFailed if it is silent."""

    async def stream_features(self, volume: str) -> frozenset[str]:
        """What the peer's ZFS receives beyond a plain stream (``compress``, ``large_blocks``);
        empty from an agent that does not say. TransferFailed if it is silent."""


class MoveRecords(Protocol):
    """The cluster records of one move, read and written by compare-and-swap only."""

    async def get_move(self, volume: str) -> Versioned[Move] | None: ...

    async def put_move(self, move: Move, expected_revision: int | None) -> bool:
        """Write ``move`` only while the record is at ``expected_revision`` (None: absent)."""

    async def get_owner(self, volume: str) -> Versioned[Owner] | None: ...

    async def transfer_owner(
        self, volume: str, expected: Owner, new_node: str, move_revision: int | None = None
    ) -> bool:
        """``expected`` -> ``{new_node, epoch+1}`` in one transaction, only while the move
        record is at ``move_revision``."""

    async def get_volume(self, volume: str) -> Versioned[VolumeSpec] | None: ...
