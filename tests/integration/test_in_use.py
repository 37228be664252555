"""'In use' from the kernel and a freeze that stops every writer, on a real pool.

A container's bind mount of a volume lives in its own mount namespace: these
tests make one the way a container runtime does (``unshare -m`` and a bind
mount of the agent's mountpoint) and write through it with fsync.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.zfs.volumes import FilesystemBusy, PoolRoot
from tests.support.pools import create_in_use, scratch_pool

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def root() -> Iterator[PoolRoot]:
    with scratch_pool("iu") as pool:
        made = PoolRoot(pool.name)
        made.ensure()
        yield made


class Writer:
    """A writer in a mount namespace of its own, writing through a bind mount of ``volume``."""

    def __init__(self, volume: Path, inside: Path, hold: bool) -> None:
        inside.mkdir(parents=True, exist_ok=True)
        script = (
            f"mount --bind {volume} {inside} && cd {REPO} && exec {sys.executable} "
            f"-m tests.support.writer {inside}/log {'--hold' if hold else ''}"
        )
        self.process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.acknowledged: list[int] = []
        self.refused: list[tuple[int, int]] = []

    def read(self, lines: int) -> None:
        assert self.process.stdout is not None
        for _ in range(lines):
            kind, number, *error = self.process.stdout.readline().split()
            if kind == "ok":
                self.acknowledged.append(int(number))
            else:
                self.refused.append((int(number), int(error[0])))

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def volume(root: PoolRoot, tmp_path: Path) -> Path:
    where = tmp_path / "mnt" / "db"
    create_in_use(root, "db", 64 << 20, "off", where)
    return where


def writing(volume: Path, tmp_path: Path, hold: bool) -> Writer:
    writer = Writer(volume, tmp_path / "container", hold)
    writer.read(5)
    assert len(writer.acknowledged) == 5, "the writer writes through its bind mount"
    return writer


def test_the_agents_own_mount_is_no_user_and_a_bind_in_another_namespace_is(
    root: PoolRoot, volume: Path, tmp_path: Path
) -> None:
    assert root.users({"db": volume}) == {"db": []}
    writer = writing(volume, tmp_path, hold=False)
    try:
        users = root.users({"db": volume})["db"]
        mounts = {user.path for user in users if user.kind == "mount"}
        assert str(tmp_path / "container") in mounts
        assert writer.process.pid in {user.pid for user in users}
    finally:
        writer.stop()
    assert root.users({"db": volume}) == {"db": []}


def test_a_process_whose_directory_is_in_the_mountpoint_is_a_user(
    root: PoolRoot, volume: Path
) -> None:
    shell = subprocess.Popen(["sleep", "30"], cwd=volume)
    try:
        users = root.users({"db": volume})["db"]
        assert [(u.kind, u.pid, u.path) for u in users] == [("process", shell.pid, str(volume))]
    finally:
        shell.kill()
        shell.wait()


def test_freeze_stops_a_writer_in_another_mount_namespace(
    root: PoolRoot, volume: Path, tmp_path: Path
) -> None:
    writer = writing(volume, tmp_path, hold=False)
    try:
        root.freeze("db")
        writer.read(5)
        acknowledged = set(writer.acknowledged)
    finally:
        writer.stop()
    assert writer.refused, "writes through the container's bind mount went on after the freeze"
    assert {code for _, code in writer.refused} == {errno.EROFS}
    written = {int(line.split()[1]) for line in (volume / "log").read_text().splitlines()}
    assert acknowledged <= written, "every acknowledged line is in the frozen copy"
    assert max(written) < min(number for number, _ in writer.refused)
    root.thaw("db")
    (volume / "after-thaw").write_text("accepted")


def test_freeze_is_refused_while_a_file_is_open_for_writing_and_changes_nothing(
    root: PoolRoot, volume: Path, tmp_path: Path
) -> None:
    writer = writing(volume, tmp_path, hold=True)
    try:
        with pytest.raises(FilesystemBusy):
            root.freeze("db")
        before = len(writer.acknowledged)
        writer.read(3)
        assert len(writer.acknowledged) == before + 3, "the writer was not stopped"
        assert root.frozen() == []
    finally:
        writer.stop()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            root.freeze("db")
            break
        except FilesystemBusy:
            time.sleep(0.1)
    assert root.frozen() == ["db"], "with the writer gone the freeze goes through"
    root.thaw("db")
