"""Docker's mount IDs survive an agent restart, and the handoff gate refuses a racing Mount."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.usage import BIND_GRACE_SECONDS, DockerMounts, HandoffRunning
from agent.zfs.inuse import MountEntry, User


async def test_ids_survive_a_restart_of_the_agent(tmp_path: Path) -> None:
    path = tmp_path / "state" / "docker-mounts.json"
    before = DockerMounts(path)
    await before.load()
    await before.add("pg", "c1")
    await before.add("pg", "c2")
    await before.discard("pg", "c1")
    after = DockerMounts(path)
    await after.load()
    assert after.ids("pg") == ("c2",)
    await after.discard("pg", "c2")
    again = DockerMounts(path)
    await again.load()
    assert again.volumes() == set()


async def test_an_unreadable_file_starts_empty(tmp_path: Path) -> None:
    path = tmp_path / "docker-mounts.json"
    path.write_text("{half")
    mounts = DockerMounts(path)
    await mounts.load()
    assert mounts.volumes() == set()


async def test_in_use_while_the_kernel_shows_a_user_or_an_id_is_young(tmp_path: Path) -> None:
    mounts = DockerMounts(tmp_path / "m.json")
    assert mounts.in_use("pg", []) == []
    await mounts.add("pg", "c1")
    assert mounts.in_use("pg", []) != [], "Docker mounts, then binds: the gap counts as in use"
    container = User("mount", 42, "postgres", "/var/lib/docker/x/data")
    assert mounts.in_use("pg", [container]) == [container.describe()]


async def test_an_old_id_the_kernel_does_not_back_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mounts = DockerMounts(tmp_path / "m.json")
    await mounts.add("pg", "c1")
    later = time.time() + BIND_GRACE_SECONDS + 1
    monkeypatch.setattr(time, "time", lambda: later)
    assert mounts.in_use("pg", []) == []
    assert mounts.ids("pg") == ("c1",), "still counted, so the last Unmount is known"


async def test_the_dataset_stays_mounted_until_the_last_unmount_however_old_the_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A move may go once an ID is stale; the mount stays until its Unmount (the container
    may still bind it, and an operator's Mount has no container the kernel shows)."""
    mounts = DockerMounts(tmp_path / "m.json")
    assert mounts.holders("pg", []) == []
    await mounts.add("pg", "operator")
    later = time.time() + BIND_GRACE_SECONDS + 1
    monkeypatch.setattr(time, "time", lambda: later)
    assert mounts.in_use("pg", []) == []
    assert mounts.holders("pg", []) == ["mount operator"]
    await mounts.discard("pg", "operator")
    shell = User("process", 7, "bash", "/var/lib/ferry/volumes/pg")
    assert mounts.holders("pg", [shell]) == [shell.describe()]
    assert mounts.holders("pg", []) == []


async def test_a_mount_during_a_handoff_is_refused(tmp_path: Path) -> None:
    mounts = DockerMounts(tmp_path / "m.json")
    mounts.begin_handoff("pg")
    with pytest.raises(HandoffRunning):
        await mounts.add("pg", "c1")
    assert mounts.ids("pg") == ()
    mounts.end_handoff("pg")
    await mounts.add("pg", "c1")
    assert mounts.ids("pg") == ("c1",)


def test_mountinfo_lines_parse_with_peer_groups_and_escapes() -> None:
    own = MountEntry.parse(
        "46 27 0:41 / /var/lib/ferry/mnt/pg rw,relatime shared:7 - fuse.zfs tank/ferry/pg rw"
    )
    copy = MountEntry.parse(
        "90 80 0:41 / /var/lib/ferry/mnt/pg rw,relatime master:7 - fuse.zfs tank/ferry/pg rw"
    )
    bind = MountEntry.parse(
        "91 80 0:41 / /var/lib/docker/a\\040b/data rw - fuse.zfs tank/ferry/pg rw"
    )
    assert (own.mount_id, own.device, own.source) == (46, "0:41", "tank/ferry/pg")
    assert copy.propagated_from(own)
    assert not bind.propagated_from(own)
    assert bind.mount_point == "/var/lib/docker/a b/data"
