"""The exceptions of OpenZFS's pyzfs (``libzfs_core.exceptions``): same names, same hierarchy.

Channel-program, checkpoint and encryption errors are left out: Ferry uses
none of those operations. ``ReleaseFailure`` is an alias of pyzfs's
``HoldReleaseFailure``.

Code above ``agent.zfs`` catches these whichever backend runs, so a
``DatasetNotFound`` from the ``zfs`` command and one from libzfs_core are
the same class.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Sequence


class ZFSError(Exception):
    """Any failure of a ZFS operation; ``errno``, ``message`` and ``name`` say what and where."""

    errno: int = _errno.EIO
    message: str = "ZFS operation failed"

    def __init__(self, name: bytes | str | None = None, message: str | None = None) -> None:
        self.name = name.decode() if isinstance(name, bytes) else name
        if message is not None:
            self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.name is not None:
            return f"[Errno {self.errno}] {self.message}: '{self.name}'"
        return f"[Errno {self.errno}] {self.message}"


class ZFSInitializationFailed(ZFSError):
    message = "Failed to initialize libzfs_core"

    def __init__(self, errno: int) -> None:
        self.errno = errno
        super().__init__(None)


class ZFSGenericError(ZFSError):
    def __init__(self, errno: int, name: bytes | str | None, message: str) -> None:
        self.errno = errno
        super().__init__(name, message)


class DatasetNotFound(ZFSError):
    errno = _errno.ENOENT
    message = "Dataset not found"


class DatasetExists(ZFSError):
    errno = _errno.EEXIST
    message = "Dataset already exists"


class NotClone(ZFSError):
    errno = _errno.EINVAL
    message = "Filesystem is not a clone, can not promote"


class FilesystemExists(DatasetExists):
    message = "Filesystem already exists"


class FilesystemNotFound(DatasetNotFound):
    message = "Filesystem not found"


class ParentNotFound(ZFSError):
    errno = _errno.ENOENT
    message = "Parent not found"


class WrongParent(ZFSError):
    errno = _errno.EINVAL
    message = "Parent dataset is not a filesystem"


class SnapshotExists(DatasetExists):
    message = "Snapshot already exists"


class SnapshotNotFound(DatasetNotFound):
    message = "Snapshot not found"


class SnapshotNotLatest(ZFSError):
    errno = _errno.EEXIST
    message = "Snapshot is not the latest"


class SnapshotIsCloned(ZFSError):
    errno = _errno.EEXIST
    message = "Snapshot is cloned"


class SnapshotIsHeld(ZFSError):
    errno = _errno.EBUSY
    message = "Snapshot is held"


class DuplicateSnapshots(ZFSError):
    errno = _errno.EXDEV
    message = "Requested multiple snapshots of the same filesystem"


class MultipleOperationsFailure(ZFSError):
    """Several operations failed; ``errors`` holds each one's exception, the first sets errno."""

    def __init__(self, errors: Sequence[ZFSError], suppressed_count: int = 0) -> None:
        self.errors = list(errors)
        self.suppressed_count = suppressed_count
        if self.errors:
            self.errno = self.errors[0].errno
        super().__init__(None)

    def __str__(self) -> str:
        return (
            f"{super().__str__()}, {len(self.errors)} errors included, "
            f"{self.suppressed_count} suppressed: {'; '.join(map(str, self.errors))}"
        )


class SnapshotFailure(MultipleOperationsFailure):
    errno = _errno.EIO
    message = "Creation of snapshot(s) failed for one or more reasons"


class SnapshotDestructionFailure(MultipleOperationsFailure):
    errno = _errno.EIO
    message = "Destruction of snapshot(s) failed for one or more reasons"


class HoldFailure(MultipleOperationsFailure):
    errno = _errno.EIO
    message = "Placement of hold(s) failed for one or more reasons"


class HoldReleaseFailure(MultipleOperationsFailure):
    errno = _errno.EIO
    message = "Release of hold(s) failed for one or more reasons"


ReleaseFailure = HoldReleaseFailure


class BookmarkFailure(MultipleOperationsFailure):
    errno = _errno.EIO
    message = "Creation of bookmark(s) failed for one or more reasons"


class BookmarkDestructionFailure(MultipleOperationsFailure):
    errno = _errno.EIO
    message = "Destruction of bookmark(s) failed for one or more reasons"


class HoldExists(ZFSError):
    errno = _errno.EEXIST
    message = "Hold with a given tag already exists on snapshot"


class HoldNotFound(ZFSError):
    errno = _errno.ENOENT
    message = "Hold with a given tag does not exist on snapshot"


class BadHoldCleanupFD(ZFSError):
    errno = _errno.EBADF
    message = "Bad file descriptor as cleanup file descriptor"


class BookmarkExists(ZFSError):
    errno = _errno.EEXIST
    message = "Bookmark already exists"


class BookmarkNotFound(ZFSError):
    errno = _errno.ENOENT
    message = "Bookmark not found"


class BookmarkNotSupported(ZFSError):
    errno = _errno.ENOTSUP
    message = "Bookmark feature is not supported"


class SnapshotMismatch(ZFSError):
    errno = _errno.ENODEV
    message = "Snapshot is not descendant of source snapshot"


class NameInvalid(ZFSError):
    errno = _errno.EINVAL
    message = "Invalid name"


class NameTooLong(ZFSError):
    errno = _errno.ENAMETOOLONG
    message = "Dataset name is too long"


class SnapshotNameInvalid(NameInvalid):
    message = "Invalid name for snapshot"


class FilesystemNameInvalid(NameInvalid):
    message = "Invalid name for filesystem or volume"


class BookmarkNameInvalid(NameInvalid):
    message = "Invalid name for bookmark"


class ReadOnlyPool(ZFSError):
    errno = _errno.EROFS
    message = "Pool is read-only"


class SuspendedPool(ZFSError):
    errno = _errno.EAGAIN
    message = "Pool is suspended"


class PoolNotFound(ZFSError):
    errno = _errno.EXDEV
    message = "No such pool"


class PoolsDiffer(ZFSError):
    errno = _errno.EXDEV
    message = "Source and target belong to different pools"


class FeatureNotSupported(ZFSError):
    errno = _errno.ENOTSUP
    message = "Feature is not supported in this version"


class PropertyNotSupported(ZFSError):
    errno = _errno.ENOTSUP
    message = "Property is not supported in this version"


class PropertyInvalid(ZFSError):
    errno = _errno.EINVAL
    message = "Invalid property or property value"


class DatasetBusy(ZFSError):
    errno = _errno.EBUSY
    message = "Dataset is busy"


class DatasetTypeInvalid(ZFSError):
    errno = _errno.EINVAL
    message = "Invalid dataset type"


class StreamMismatch(ZFSError):
    errno = _errno.ENODEV
    message = "Stream is not applicable to destination dataset"


class DestinationModified(ZFSError):
    errno = _errno.ETXTBSY
    message = "Destination dataset has modifications that can not be undone"


class BadStream(ZFSError):
    errno = _errno.EBADE
    message = "Bad backup stream"


class StreamFeatureNotSupported(ZFSError):
    errno = _errno.ENOTSUP
    message = "Stream contains unsupported feature"


class UnknownStreamFeature(ZFSError):
    errno = _errno.ENOTSUP
    message = "Unknown feature requested for stream"


class StreamIOError(ZFSError):
    message = "I/O error while writing or reading stream"

    def __init__(self, errno: int, name: bytes | str | None = None) -> None:
        self.errno = errno
        super().__init__(name)


class StreamFeatureInvalid(ZFSError):
    errno = _errno.EINVAL
    message = "Kernel modules must be upgraded to receive this stream"


class StreamTruncated(ZFSError):
    errno = _errno.EPIPE
    message = "incomplete stream"


class ReceivePropertyFailure(MultipleOperationsFailure):
    errno = _errno.EIO
    message = "Receiving of properties failed for one or more reasons"


class ZIOError(ZFSError):
    errno = _errno.EIO
    message = "I/O error"


class NoSpace(ZFSError):
    errno = _errno.ENOSPC
    message = "No space left"


class QuotaExceeded(ZFSError):
    errno = _errno.EDQUOT
    message = "Quota exceeded"


class DatasetNotMounted(ZFSError):
    errno = _errno.ENOENT
    message = "Dataset is not mounted"


class CommandFailed(ZFSGenericError):
    """A ``zfs``/``zpool`` command failed in a way no other class describes."""


class CommandTimeout(ZFSError):
    """A command or libzfs_core call exceeded its limit (``agent.zfs.runner``): the command was
    killed, the call abandoned to its thread; says what to do next."""

    errno = _errno.ETIMEDOUT
    message = "ZFS command timed out"
