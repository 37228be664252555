"""Ferry's pool root on a real pool: volumes as datasets with refquota, mounted where Ferry says."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import zfs
from agent.store import VolumeStore
from agent.zfs.exceptions import NameInvalid
from agent.zfs.volumes import TRANSFER_HOLD, UID_PROPERTY, PoolRoot
from ferry.core.records import VolumeSpec
from tests.support.pools import ScratchPool, create_in_use, scratch_pool

pytestmark = pytest.mark.integration


@pytest.fixture
def pool() -> Iterator[ScratchPool]:
    with scratch_pool("zt") as made:
        yield made


@pytest.fixture
def root(pool: ScratchPool) -> PoolRoot:
    made = PoolRoot(pool.name)
    made.ensure()
    return made


def test_ensure_is_idempotent_and_roots_are_not_mounted(pool: ScratchPool) -> None:
    root = PoolRoot(pool.name, root="ferry-t")
    root.ensure()
    root.ensure()
    assert zfs.lzc_get_props(pool.dataset("ferry-t"))["mountpoint"] == "none"
    assert zfs.lzc_get_props(pool.dataset("ferry-t"))["atime"] == "off", (
        "volumes inherit atime=off: a read would otherwise count as a change of the copy"
    )
    assert zfs.lzc_get_props(pool.dataset("ferry-t"))["readonly"] == "on", (
        "volumes inherit readonly=on: a copy is writable only once activated"
    )
    assert root.volumes() == []


def test_a_volume_is_created_unmounted_read_only_until_activated_and_limited(
    pool: ScratchPool, root: PoolRoot, tmp_path: Path
) -> None:
    """Mounted only when used; writable only once its owner activates it (the root's
    inherited readonly=on is what tells a never-activated copy from the owner's)."""
    where = tmp_path / "mnt" / "db"
    root.create_volume("db", 4 << 20, "gzip", where)
    props = zfs.lzc_get_props(root.dataset("db"))
    assert (props["refquota"], props["compression"], props["mounted"], props["readonly"]) == (
        str(4 << 20),
        "gzip",
        "no",
        "on",
    )
    assert root.volumes() == ["db"]
    root.set_readonly("db", False)
    root.mount("db", where)
    (where / "hello").write_text("hi")
    with pytest.raises(OSError) as full, (where / "big").open("wb") as out:
        for _ in range(16):
            out.write(os.urandom(1 << 20))
            out.flush()
            os.fsync(out.fileno())
    assert full.value.errno == errno.EDQUOT


def test_lz4_where_this_zfs_has_it_else_refused(root: PoolRoot, tmp_path: Path) -> None:
    """Kernel OpenZFS compresses with lz4; zfs-fuse refuses it, naming what it accepts."""
    if zfs.features().lz4:
        where = tmp_path / "db"
        create_in_use(root, "db", 64 << 20, "lz4", where)
        assert zfs.lzc_get_props(root.dataset("db"))["compression"] == "lz4"
        (where / "text").write_bytes(b"ferry moves volumes\n" * (400 << 10))
        zfs.lzc_snapshot([root.dataset("db") + b"@synced"])  # a snapshot waits for the txg
        assert int(zfs.lzc_get_props(root.dataset("db"))["used"]) < (2 << 20)
        return
    with pytest.raises(zfs.PropertyInvalid, match="gzip"):
        create_in_use(root, "db", 1 << 20, "lz4", tmp_path / "db")
    assert root.volumes() == []


def test_unmount_then_mount_elsewhere(root: PoolRoot, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    create_in_use(root, "db", 8 << 20, "off", first)
    (first / "kept").write_text("data")
    root.unmount("db")
    assert not root.is_mounted("db")
    assert not (first / "kept").exists()
    root.mount("db", second)
    root.mount("db", second)
    assert (second / "kept").read_text() == "data"


def test_readonly_refuses_writes_and_reads_back_when_unmounted(
    root: PoolRoot, tmp_path: Path
) -> None:
    where = tmp_path / "db"
    create_in_use(root, "db", 8 << 20, "off", where)
    root.set_readonly("db", True)
    with pytest.raises(OSError) as refused:
        (where / "x").write_text("no")
    assert refused.value.errno == errno.EROFS
    root.unmount("db")
    assert zfs.lzc_get_props(root.dataset("db"))["readonly"] == "on"
    root.set_readonly("db", False)
    root.mount("db", where)
    (where / "x").write_text("yes")


def test_destroy_a_mounted_volume_with_snapshots(root: PoolRoot, tmp_path: Path) -> None:
    where = tmp_path / "db"
    create_in_use(root, "db", 8 << 20, "off", where)
    (where / "f").write_bytes(os.urandom(100_000))
    zfs.lzc_snapshot([root.dataset("db") + b"@one"])
    zfs.lzc_snapshot([root.dataset("db") + b"@two"])
    root.destroy_volume("db")
    assert not zfs.lzc_exists(root.dataset("db"))
    assert root.volumes() == []


def test_an_operators_hold_stops_destroy(root: PoolRoot, tmp_path: Path) -> None:
    create_in_use(root, "db", 8 << 20, "off", tmp_path / "db")
    snap = root.dataset("db") + b"@held"
    zfs.lzc_snapshot([snap])
    zfs.lzc_hold({snap: "backup"})
    with pytest.raises(zfs.SnapshotDestructionFailure):
        root.destroy_volume("db")
    assert zfs.lzc_exists(snap)
    assert zfs.hold_count(snap) == 1


def test_transfer_holds_left_behind_are_released_and_others_kept(
    root: PoolRoot, tmp_path: Path
) -> None:
    create_in_use(root, "db", 8 << 20, "off", tmp_path / "db")
    left, shared, free = (root.dataset("db") + s for s in (b"@left", b"@shared", b"@free"))
    zfs.lzc_snapshot([left])
    zfs.lzc_snapshot([shared])
    zfs.lzc_snapshot([free])
    zfs.lzc_hold({left: TRANSFER_HOLD, shared: TRANSFER_HOLD})
    zfs.lzc_hold({shared: "backup"})
    assert root.release_transfer_holds("db") == [left, shared]
    assert [zfs.hold_count(s) for s in (left, shared, free)] == [0, 1, 0]
    assert root.release_transfer_holds("db") == []
    zfs.lzc_release({shared: ["backup"]})
    zfs.lzc_hold({left: TRANSFER_HOLD})
    root.destroy_volume("db")
    assert not zfs.lzc_exists(root.dataset("db"))


def test_freeze_refuses_writes_at_once_and_keeps_what_was_written(
    root: PoolRoot, tmp_path: Path
) -> None:
    where = tmp_path / "db"
    create_in_use(root, "db", 16 << 20, "off", where)
    (where / "before").write_bytes(b"kept")
    root.freeze("db")
    with pytest.raises(OSError) as refused:
        (where / "after").write_bytes(b"refused")
    assert refused.value.errno == errno.EROFS
    assert root.frozen() == ["db"]
    root.unmount("db")
    assert root.frozen() == []
    root.mount("db", where)
    assert (where / "before").read_bytes() == b"kept"
    assert not (where / "after").exists()


def test_thaw_accepts_writes_again_where_freeze_stopped_them(
    root: PoolRoot, tmp_path: Path
) -> None:
    where = tmp_path / "db"
    create_in_use(root, "db", 16 << 20, "off", where)
    root.freeze("db")
    root.thaw("db")
    (where / "after").write_bytes(b"accepted")
    assert root.frozen() == []
    root.thaw("db")
    assert (where / "after").read_bytes() == b"accepted"


def test_rename_aside_keeps_the_data_out_of_the_volume_list_and_lists_it(
    pool: ScratchPool, root: PoolRoot, tmp_path: Path
) -> None:
    where = tmp_path / "db"
    create_in_use(root, "db", 8 << 20, "off", where)
    (where / "f").write_text("diverged")
    zfs.lzc_snapshot([root.dataset("db") + b"@s"])
    before = time.time()
    aside = root.rename_aside("db", 3, "written after ferry-2-7")
    leaf = aside.decode().rsplit("/", 1)[1]
    assert aside.startswith(pool.dataset("ferry-aside", "db-e3-"))
    assert re.fullmatch(r"db-e3-\d{8}T\d{6}Z", leaf), leaf
    assert root.volumes() == []
    assert zfs.lzc_list_snaps(aside) == [aside + b"@s"]
    create_in_use(root, "db", 8 << 20, "off", where)
    assert root.volumes() == ["db"]
    again = root.rename_aside("db", 3, "a second time in the same second")
    assert again != aside, "a second copy kept aside never takes the first one's name"

    listed = root.asides()
    assert [a.dataset for a in listed] == [aside.decode(), again.decode()]
    first = listed[0]
    assert (first.volume, first.epoch, first.reason) == ("db", 3, "written after ferry-2-7")
    assert before - 1 <= first.kept_at <= time.time()
    assert first.used_bytes > 0


def test_only_a_copy_kept_aside_can_be_destroyed_as_one(root: PoolRoot, tmp_path: Path) -> None:
    create_in_use(root, "db", 8 << 20, "off", tmp_path / "db")
    zfs.lzc_snapshot([root.dataset("db") + b"@s"])
    zfs.lzc_hold({root.dataset("db") + b"@s": TRANSFER_HOLD})
    aside = root.rename_aside("db", 1, "test").decode()
    create_in_use(root, "db", 8 << 20, "off", tmp_path / "db")
    for not_aside in (root.dataset("db").decode(), f"{aside}@s", root.aside.decode()):
        with pytest.raises(NameInvalid):
            root.destroy_aside(not_aside)
    assert root.destroy_aside(aside), "a held snapshot of a transfer does not block the drop"
    assert root.asides() == []
    assert not root.destroy_aside(aside)
    assert root.volumes() == ["db"]


async def test_created_and_received_copies_carry_the_volume_uid(
    root: PoolRoot, tmp_path: Path
) -> None:
    store = VolumeStore(root, tmp_path)
    await store.create("db", 8 << 20, "off", "c0ffee")
    zfs.lzc_snapshot([root.dataset("db") + b"@s"])
    await asyncio.to_thread(
        subprocess.run,
        f"zfs send {root.dataset('db').decode()}@s | zfs recv {root.dataset('copy').decode()}",
        shell=True,
        check=True,
    )
    assert zfs.lzc_get_props(root.dataset("copy")).get(UID_PROPERTY) is None, (
        "a stream carries no properties: the receiver must stamp the uid"
    )
    await store.after_receive("copy", "c0ffee", await store.snapshots("copy") or [])
    await store.create("unstamped", 8 << 20, "off", "")
    await store.activate(VolumeSpec(name="unstamped", size_bytes=8 << 20, node="n1", uid="beef"))
    local = await store.local_volumes()
    assert (local["db"].uid, local["copy"].uid) == ("c0ffee", "c0ffee")
    assert local["unstamped"].uid == "beef", "activating stamps a copy that missed its stamp"


def test_free_bytes_shrinks_as_data_is_written(root: PoolRoot, tmp_path: Path) -> None:
    where = tmp_path / "db"
    create_in_use(root, "db", 64 << 20, "off", where)
    before = root.free_bytes()
    assert 0 < before < 1 << 30
    with (where / "f").open("wb") as out:
        out.write(os.urandom(16 << 20))
        os.fsync(out.fileno())
    for _ in range(50):
        if root.free_bytes() < before - (8 << 20):
            break
        zfs.lzc_snapshot([root.dataset("db") + b"@sync"])
        zfs.lzc_destroy_snaps([root.dataset("db") + b"@sync"], defer=False)
    assert root.free_bytes() < before - (8 << 20)


def test_names_outside_the_root_never_reach_zfs(root: PoolRoot) -> None:
    for bad in ("../../etc", "a/b", "db@snap", "-rf", ""):
        with pytest.raises(zfs.NameInvalid):
            create_in_use(root, bad, 1 << 20, "off", Path("/nonexistent"))


def test_no_write_lands_on_the_hosts_disk_under_an_unmounted_volume(
    root: PoolRoot, tmp_path: Path
) -> None:
    where = tmp_path / "db"
    create_in_use(root, "db", 16 << 20, "off", where)
    (where / "log").write_text("in the volume")
    root.unmount("db")
    with pytest.raises(PermissionError):
        (where / "log").open("a")
    root.mount("db", where)
    assert (where / "log").read_text() == "in the volume"
    root.destroy_volume("db")
    assert not where.exists(), "a destroyed volume leaves no guarded directory behind"


def test_a_replicas_base_is_held_until_the_next_and_a_destroy_releases_every_hold(
    root: PoolRoot, tmp_path: Path
) -> None:
    root.ensure()
    create_in_use(root, "rb", 64 << 20, "off", tmp_path / "rb")
    dataset = root.dataset("rb")
    snaps = [dataset + f"@ferry-1-{n}".encode() for n in (1, 2, 3)]
    for snap in snaps:
        zfs.lzc_snapshot([snap])
    root.set_replica_base("rb", "host2", "ferry-1-1")
    root.set_replica_base("rb", "host3", "ferry-1-1")
    root.set_replica_base("rb", "host3", "ferry-1-1")  # repeated: no second hold
    assert root.replica_bases("rb") == {"host2": "ferry-1-1", "host3": "ferry-1-1"}
    assert zfs.hold_count(snaps[0]) == 2
    # A pruner's deferred destroy leaves a held base in place.
    zfs.lzc_destroy_snaps([snaps[0]], defer=True)
    assert zfs.lzc_exists(snaps[0])
    root.set_replica_base("rb", "host2", "ferry-1-2")
    root.set_replica_base("rb", "host3", "ferry-1-3")
    assert not zfs.lzc_exists(snaps[0]), "the last release ends a deferred destroy"
    assert (zfs.hold_count(snaps[1]), zfs.hold_count(snaps[2])) == (1, 1)
    root.drop_replica_base("rb", "host2")
    assert root.replica_bases("rb") == {"host3": "ferry-1-3"}
    assert zfs.hold_count(snaps[1]) == 0
    root.unmount("rb")
    root.destroy_volume("rb")
    assert not zfs.lzc_exists(dataset)
