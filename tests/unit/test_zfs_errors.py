"""The zfs command's error messages (as zfs-fuse and OpenZFS print them) map to pyzfs's classes."""

from __future__ import annotations

import pytest

from agent.zfs import exceptions as exc
from agent.zfs.cli import error_for


@pytest.mark.parametrize(
    ("stderr", "name", "expected"),
    [
        ("cannot create 'p/a': dataset already exists\n", b"p/a", exc.DatasetExists),
        ("cannot create snapshot 'p/a@s': dataset already exists\n", b"p/a@s", exc.SnapshotExists),
        ("cannot open 'p/nope': dataset does not exist\n", b"p/nope", exc.DatasetNotFound),
        ("cannot open 'p/a@x': dataset does not exist\n", b"p/a@x", exc.SnapshotNotFound),
        ("cannot destroy 'p/a@s1': dataset is busy\n", b"p/a@s1", exc.DatasetBusy),
        ("cannot hold 'p/a@s1': tag already exists on this dataset\n", b"p/a@s1", exc.HoldExists),
        (
            "cannot release 't2' from 'p/a@s1': no such tag on this dataset\n",
            b"p/a@s1",
            exc.HoldNotFound,
        ),
        (
            "cannot receive incremental stream: destination p/a has been modified\n"
            "since most recent snapshot\n",
            b"p/a@s3",
            exc.DestinationModified,
        ),
        (
            "cannot receive incremental stream: most recent snapshot of p/a does not\n"
            "match incremental source\n",
            b"p/a@s5",
            exc.StreamMismatch,
        ),
        ("cannot receive: invalid stream (bad magic number)\n", b"p/b@s", exc.BadStream),
        (
            "cannot receive new filesystem stream: invalid backup stream\n",
            b"p/c@s1",
            exc.BadStream,
        ),
        ("cannot receive: failed to read from stream\n", b"p/a@s4", exc.StreamTruncated),
        ("cannot promote 'p/a': not a cloned filesystem\n", b"p/a", exc.NotClone),
        (
            "cannot set property for 'p/a': 'compression' must be one of "
            "'on | off | lzjb | gzip | gzip-[1-9] | zle'\n",
            b"p/a",
            exc.PropertyInvalid,
        ),
        (
            "cannot rollback to 'p/a@s1': more recent snapshots exist\n"
            "use '-r' to force deletion of the following snapshots:\np/a@s5\n",
            b"p/a@s1",
            exc.SnapshotNotLatest,
        ),
        ("cannot create 'p/a': out of space\n", b"p/a", exc.NoSpace),
        (
            "invalid option 'n'\nusage:\n\tsend [-RDp] <snapshot>\n",
            b"p/a@s",
            exc.FeatureNotSupported,
        ),
    ],
)
def test_messages_map_to_the_pyzfs_class(stderr: str, name: bytes, expected: type) -> None:
    error = error_for(stderr, name)
    assert type(error) is expected
    assert error.name == name.decode()
    assert " ".join(stderr.split()) in error.message


def test_an_unknown_message_keeps_the_command_text() -> None:
    error = error_for("cannot frobnicate 'p/a': something new\n", b"p/a")
    assert isinstance(error, exc.CommandFailed)
    assert "something new" in str(error)


def test_multiple_failures_carry_every_error_and_the_first_errno() -> None:
    failure = exc.SnapshotDestructionFailure([exc.SnapshotIsHeld(b"p/a@s"), exc.NoSpace(b"p/b@s")])
    assert failure.errno == exc.SnapshotIsHeld.errno
    assert "2 errors included" in str(failure) and "p/b@s" in str(failure)


def test_hierarchy_matches_pyzfs() -> None:
    assert issubclass(exc.SnapshotExists, exc.DatasetExists)
    assert issubclass(exc.FilesystemExists, exc.DatasetExists)
    assert issubclass(exc.SnapshotNotFound, exc.DatasetNotFound)
    assert issubclass(exc.HoldReleaseFailure, exc.MultipleOperationsFailure)
    assert exc.ReleaseFailure is exc.HoldReleaseFailure
    assert not issubclass(exc.NameTooLong, exc.NameInvalid)
    assert not issubclass(exc.StreamTruncated, exc.BadStream)
