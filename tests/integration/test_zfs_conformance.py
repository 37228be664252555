"""One conformance suite for every ZFS backend present, on real pools (zfs-fuse here).

Each test runs once per backend: the ``zfs`` commands always, OpenZFS's
libzfs_core binding where ``/dev/zfs`` exists. Two scratch pools stand for
two hosts; every test uses fresh dataset names in them.
"""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent import zfs
from agent.zfs import cli, lzc, runner
from agent.zfs import exceptions as exc
from agent.zfs.streams import SnapshotReceive, SnapshotStream
from agent.zfs.volumes import PoolRoot
from ferry.core.snapshots import Base, SnapshotRef
from tests.support.files import tree_digest, write_random
from tests.support.pools import ScratchPool, create_in_use, pool_fixture

pytestmark = pytest.mark.integration

_counter = itertools.count()


src = pool_fixture("zt", scope="module")
dst = pool_fixture("zt", scope="module")


@pytest.fixture(params=["cli", "libzfs_core"])
def api(request: pytest.FixtureRequest) -> Any:
    """The ZFS API as one backend offers it (extras come from the commands in both)."""
    if request.param == "cli":
        return cli
    if not lzc.available():
        pytest.skip("libzfs_core backend needs `import libzfs_core` and /dev/zfs (kernel OpenZFS)")
    functions = {name: getattr(cli, name) for name in dir(cli) if not name.startswith("_")}
    functions.update(lzc.functions())
    return SimpleNamespace(**functions)


def fresh(pool: ScratchPool) -> tuple[bytes, Path]:
    """A dataset name not used before in this pool, and where it mounts."""
    component = f"ds{next(_counter)}"
    return pool.dataset(component), pool.path(component)


def send_to_file(api: Any, snap: bytes, fromsnap: bytes | None, path: Path) -> Path:
    with path.open("wb") as out:
        api.lzc_send(snap, fromsnap, out.fileno())
    return path


def receive_file(api: Any, snap: bytes, path: Path, force: bool = False) -> None:
    with path.open("rb") as stream:
        api.lzc_receive(snap, stream.fileno(), force=force)


def mounted_copy(api: Any, dataset: bytes, where: Path) -> Path:
    """Mount a received copy read-only, as Ferry keeps replicas, so its files can be compared.

    Read-only matters: reading files of a writable mount updates access times,
    which counts as a local change to the next incremental receive.
    """
    if api.lzc_get_props(dataset)["mounted"] != "yes":
        api.lzc_set_prop(dataset, "readonly", "on")
        api.zfs_mount(dataset)
    return where


def test_create_exists_destroy(api: Any, src: ScratchPool) -> None:
    name, _ = fresh(src)
    assert not api.lzc_exists(name)
    api.lzc_create(name, props={"mountpoint": "none"})
    assert api.lzc_exists(name)
    with pytest.raises(exc.DatasetExists):
        api.lzc_create(name)
    api.lzc_destroy(name)
    assert not api.lzc_exists(name)
    with pytest.raises(exc.DatasetNotFound):
        api.lzc_destroy(name)


def test_create_under_a_missing_parent_fails(api: Any, src: ScratchPool) -> None:
    name, _ = fresh(src)
    with pytest.raises(exc.ZFSError):
        api.lzc_create(name + b"/child")
    assert not api.lzc_exists(name + b"/child")


def test_several_snapshots_at_once_listed_oldest_first(api: Any, src: ScratchPool) -> None:
    a, _ = fresh(src)
    b, _ = fresh(src)
    api.lzc_create(a)
    api.lzc_create(b)
    api.lzc_snapshot([a + b"@one", b + b"@one"])
    api.lzc_snapshot([a + b"@two"])
    api.lzc_snapshot([a + b"@three"])
    assert api.lzc_list_snaps(a) == [a + b"@one", a + b"@two", a + b"@three"]
    assert api.lzc_list_snaps(b) == [b + b"@one"]
    assert api.lzc_exists(b + b"@one")


def test_snapshots_are_all_or_none(api: Any, src: ScratchPool) -> None:
    a, _ = fresh(src)
    b, _ = fresh(src)
    api.lzc_create(a)
    api.lzc_create(b)
    api.lzc_snapshot([b + b"@taken"])
    with pytest.raises(exc.SnapshotFailure) as failed:
        api.lzc_snapshot([a + b"@taken", b + b"@taken"])
    assert any(isinstance(e, exc.SnapshotExists) for e in failed.value.errors)
    assert api.lzc_list_snaps(a) == []
    with pytest.raises(exc.SnapshotFailure) as duplicate:
        api.lzc_snapshot([a + b"@x", a + b"@y"])
    assert isinstance(duplicate.value.errors[0], exc.DuplicateSnapshots)
    assert api.lzc_list_snaps(a) == []


def test_full_and_incremental_send_receive_are_byte_identical(
    api: Any, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    source, source_dir = fresh(src)
    target, target_dir = fresh(dst)
    api.lzc_create(source)
    write_random(source_dir / "big", 3 << 20)
    (source_dir / "sub").mkdir()
    write_random(source_dir / "sub" / "small", 1000)
    api.lzc_snapshot([source + b"@s1"])
    receive_file(api, target + b"@s1", send_to_file(api, source + b"@s1", None, tmp_path / "s1"))

    assert api.lzc_get_props(target)["mounted"] == "no"
    assert tree_digest(mounted_copy(api, target, target_dir)) == tree_digest(source_dir)

    write_random(source_dir / "big", 2 << 20)
    write_random(source_dir / "new", 500_000)
    os.remove(source_dir / "sub" / "small")
    api.lzc_snapshot([source + b"@s2"])
    incremental = send_to_file(api, source + b"@s2", source + b"@s1", tmp_path / "s2")
    assert incremental.stat().st_size < (4 << 20)
    receive_file(api, target + b"@s2", incremental)

    assert tree_digest(target_dir) == tree_digest(source_dir)
    assert api.lzc_list_snaps(target) == [target + b"@s1", target + b"@s2"]
    assert [g for _, g in api.snapshot_guids(target)] == [g for _, g in api.snapshot_guids(source)]


def test_receive_with_force_rolls_back_local_changes(
    api: Any, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    source, source_dir = fresh(src)
    target, target_dir = fresh(dst)
    api.lzc_create(source)
    write_random(source_dir / "data", 100_000)
    api.lzc_snapshot([source + b"@s1"])
    receive_file(api, target + b"@s1", send_to_file(api, source + b"@s1", None, tmp_path / "s1"))
    api.lzc_set_prop(target, "readonly", "off")
    api.zfs_mount(target)
    write_random(target_dir / "local", 10_000)
    write_random(source_dir / "data", 100_000)
    api.lzc_snapshot([source + b"@s2"])
    stream = send_to_file(api, source + b"@s2", source + b"@s1", tmp_path / "s2")

    with pytest.raises(exc.DestinationModified):
        receive_file(api, target + b"@s2", stream)
    assert (target_dir / "local").exists()
    assert api.lzc_list_snaps(target) == [target + b"@s1"]

    receive_file(api, target + b"@s2", stream, force=True)
    assert api.lzc_list_snaps(target) == [target + b"@s1", target + b"@s2"]
    assert tree_digest(mounted_copy(api, target, target_dir)) == tree_digest(source_dir)


def test_incremental_from_the_wrong_base_is_a_stream_mismatch(
    api: Any, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    source, _ = fresh(src)
    target, _ = fresh(dst)
    api.lzc_create(source)
    for snap in (b"@s1", b"@s2", b"@s3"):
        api.lzc_snapshot([source + snap])
    receive_file(api, target + b"@s1", send_to_file(api, source + b"@s1", None, tmp_path / "s1"))
    stream = send_to_file(api, source + b"@s3", source + b"@s2", tmp_path / "s3")
    with pytest.raises(exc.StreamMismatch):
        receive_file(api, target + b"@s3", stream, force=True)
    assert api.lzc_list_snaps(target) == [target + b"@s1"]


def test_a_hold_blocks_destroy_until_released(api: Any, src: ScratchPool) -> None:
    name, _ = fresh(src)
    api.lzc_create(name)
    snap = name + b"@held"
    api.lzc_snapshot([snap])
    assert api.lzc_hold({snap: "ferry-test"}) == []
    assert api.hold_count(snap) == 1
    with pytest.raises(exc.HoldFailure) as again:
        api.lzc_hold({snap: "ferry-test"})
    assert isinstance(again.value.errors[0], exc.HoldExists)

    with pytest.raises(exc.SnapshotDestructionFailure) as blocked:
        api.lzc_destroy_snaps([snap], defer=False)
    assert isinstance(blocked.value.errors[0], exc.SnapshotIsHeld)
    assert api.lzc_exists(snap)

    if cli.features().list_holds:
        assert set(api.lzc_get_holds(snap)) == {"ferry-test"}
    else:
        with pytest.raises(exc.FeatureNotSupported):
            api.lzc_get_holds(snap)

    with pytest.raises(exc.HoldReleaseFailure) as unknown:
        api.lzc_release({snap: ["no-such-tag"]})
    assert isinstance(unknown.value.errors[0], exc.HoldNotFound)
    assert api.lzc_release({snap: ["ferry-test"]}) == []
    assert api.hold_count(snap) == 0
    api.lzc_destroy_snaps([snap], defer=False)
    assert not api.lzc_exists(snap)


def test_deferred_destroy_of_a_held_snapshot_happens_on_release(api: Any, src: ScratchPool) -> None:
    name, _ = fresh(src)
    api.lzc_create(name)
    snap = name + b"@deferred"
    api.lzc_snapshot([snap])
    api.lzc_hold({snap: "ferry-test"})
    api.lzc_destroy_snaps([snap], defer=True)
    assert api.lzc_exists(snap)
    assert api.lzc_get_props(snap)["defer_destroy"] == "on"
    api.lzc_release({snap: ["ferry-test"]})
    assert not api.lzc_exists(snap)


def test_refquota_stops_writes_with_edquot(api: Any, src: ScratchPool) -> None:
    name, where = fresh(src)
    api.lzc_create(name, props={"refquota": 2 << 20, "compression": "off"})
    assert api.lzc_get_props(name)["refquota"] == str(2 << 20)
    with pytest.raises(OSError) as full:
        for part in range(8):
            write_random(where / f"part{part}", 1 << 20)
    assert full.value.errno == errno.EDQUOT
    assert int(api.lzc_get_props(name)["referenced"]) <= (2 << 20) + (256 << 10)


def test_rename_keeps_data_and_snapshots(api: Any, src: ScratchPool) -> None:
    name, _ = fresh(src)
    other, _ = fresh(src)
    api.lzc_create(name, props={"mountpoint": "none"})
    api.lzc_snapshot([name + b"@s1"])
    guid = api.lzc_get_props(name)["guid"]
    api.lzc_rename(name, other)
    assert not api.lzc_exists(name)
    assert api.lzc_get_props(other)["guid"] == guid
    assert api.lzc_list_snaps(other) == [other + b"@s1"]
    api.lzc_create(name, props={"mountpoint": "none"})
    with pytest.raises(exc.DatasetExists):
        api.lzc_rename(other, name)


def test_rollback_restores_the_latest_snapshot(api: Any, src: ScratchPool) -> None:
    name, where = fresh(src)
    api.lzc_create(name)
    with pytest.raises(exc.SnapshotNotFound):
        api.lzc_rollback(name)
    digest = write_random(where / "f", 50_000)
    api.lzc_snapshot([name + b"@s1"])
    write_random(where / "f", 50_000)
    write_random(where / "g", 1000)
    assert api.lzc_rollback(name) == name + b"@s1"
    assert tree_digest(where) == {"f": digest}

    api.lzc_snapshot([name + b"@s2"])
    with pytest.raises(exc.SnapshotNotLatest):
        api.lzc_rollback_to(name, name + b"@s1")
    write_random(where / "h", 1000)
    api.lzc_rollback_to(name, name + b"@s2")
    assert tree_digest(where) == {"f": digest}


def test_clone_and_promote(api: Any, src: ScratchPool) -> None:
    name, where = fresh(src)
    clone, clone_dir = fresh(src)
    api.lzc_create(name)
    digest = write_random(where / "f", 20_000)
    api.lzc_snapshot([name + b"@base"])
    api.lzc_clone(clone, name + b"@base")
    assert api.lzc_get_props(clone)["origin"] == (name + b"@base").decode()
    if api.lzc_get_props(clone)["mounted"] != "yes":
        api.zfs_mount(clone)
    assert tree_digest(clone_dir) == {"f": digest}
    with pytest.raises(exc.NotClone):
        api.lzc_promote(name)

    api.lzc_promote(clone)
    assert api.lzc_list_snaps(clone) == [clone + b"@base"]
    assert api.lzc_get_props(name)["origin"] == (clone + b"@base").decode()
    with pytest.raises(exc.ZFSError):
        api.lzc_destroy(clone)


def test_properties_including_user_properties(api: Any, src: ScratchPool) -> None:
    name, where = fresh(src)
    api.lzc_create(name, props={"ferry:test": "db", "compression": "gzip"})
    props = api.lzc_get_props(name)
    assert props["ferry:test"] == "db"
    assert props["compression"] == "gzip"
    assert props["readonly"] == "off"
    assert props["mounted"] == "yes"
    assert int(props["guid"]) > 0
    assert int(props["used"]) > 0

    api.lzc_set_prop(name, "ferry:epoch", 7)
    assert api.lzc_get_props(name)["ferry:epoch"] == "7"
    api.lzc_set_prop(name, "readonly", "on")
    with pytest.raises(OSError) as refused:
        write_random(where / "f", 10)
    assert refused.value.errno == errno.EROFS
    api.zfs_unmount(name)
    assert api.lzc_get_props(name)["readonly"] == "on"
    api.lzc_inherit_prop(name, "ferry:epoch")
    assert "ferry:epoch" not in api.lzc_get_props(name)
    with pytest.raises(exc.PropertyInvalid):
        api.lzc_set_prop(name, "compression", "no-such-algorithm")
    with pytest.raises(exc.DatasetNotFound):
        api.lzc_get_props(name + b"-missing")


def test_list_children(api: Any, src: ScratchPool) -> None:
    name, _ = fresh(src)
    api.lzc_create(name)
    api.lzc_create(name + b"/a")
    api.lzc_create(name + b"/b")
    api.lzc_create(name + b"/a/deeper")
    api.lzc_snapshot([name + b"@s"])
    assert sorted(api.lzc_list_children(name)) == [name + b"/a", name + b"/b"]


def test_send_space_estimates_a_full_stream(api: Any, src: ScratchPool, tmp_path: Path) -> None:
    name, where = fresh(src)
    api.lzc_create(name, props={"compression": "off"})
    write_random(where / "f", 1 << 20)
    api.lzc_snapshot([name + b"@s1"])
    api.lzc_snapshot([name + b"@s2"])
    estimate = api.lzc_send_space(name + b"@s1")
    actual = send_to_file(api, name + b"@s1", None, tmp_path / "s").stat().st_size
    assert 0.8 * actual <= estimate <= 1.25 * actual
    if cli.features().send_estimate:
        assert api.lzc_send_space(name + b"@s2", name + b"@s1") < 200_000
    else:
        with pytest.raises(exc.FeatureNotSupported):
            api.lzc_send_space(name + b"@s2", name + b"@s1")


def test_pool_free_bytes_shrinks_as_data_is_written(api: Any, src: ScratchPool) -> None:
    name, where = fresh(src)
    api.lzc_create(name, props={"compression": "off"})
    before = api.pool_free_bytes(src.name)
    assert 0 < before < src.file.stat().st_size
    write_random(where / "f", 16 << 20)
    for attempt in range(50):
        if api.pool_free_bytes(src.name) < before - (8 << 20):
            break
        api.lzc_snapshot([name + b"@sync%d" % attempt])
    assert api.pool_free_bytes(src.name) < before - (8 << 20)
    with pytest.raises(exc.DatasetNotFound):
        api.pool_free_bytes(src.name + "-missing")


def _truncated(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    assert len(data) > keep
    cut = path.with_suffix(".cut")
    cut.write_bytes(data[:keep])
    return cut


def _garbage(path: Path) -> Path:
    path.write_bytes(os.urandom(300_000))
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_stream_changes_nothing(
    api: Any, damage: str, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    source, source_dir = fresh(src)
    target, target_dir = fresh(dst)
    api.lzc_create(source, props={"compression": "off"})
    write_random(source_dir / "f", 1 << 20)
    api.lzc_snapshot([source + b"@s1"])
    full = send_to_file(api, source + b"@s1", None, tmp_path / "s1")
    write_random(source_dir / "f", 1 << 20)
    api.lzc_snapshot([source + b"@s2"])
    incremental = send_to_file(api, source + b"@s2", source + b"@s1", tmp_path / "s2")

    def damaged(stream: Path) -> Path:
        if damage == "garbage":
            return _garbage(tmp_path / "garbage")
        return _truncated(stream, stream.stat().st_size // 2)

    with pytest.raises(exc.ZFSError):
        receive_file(api, target + b"@s1", damaged(full))
    assert not api.lzc_exists(target)

    receive_file(api, target + b"@s1", full)
    before = tree_digest(mounted_copy(api, target, target_dir))
    for force in (False, True):
        with pytest.raises(exc.ZFSError) as failed:
            receive_file(api, target + b"@s2", damaged(incremental), force=force)
        assert isinstance(failed.value, exc.BadStream | exc.StreamTruncated), failed.value
        assert api.lzc_list_snaps(target) == [target + b"@s1"]
        assert tree_digest(mounted_copy(api, target, target_dir)) == before


def leftovers(names: list[bytes]) -> list[str]:
    """What is still running on the datasets ``names`` (or their snapshots): processes whose
    command line names one, and threads the runner left with a libzfs_core call on one;
    also any child of this process that exited unreaped."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            _, _, rest = (entry / "stat").read_text().rpartition(")")
        except OSError:
            continue  # ended meanwhile
        state, parent = rest.split()[:2]
        if any(arg.split(b"@")[0] in names for arg in argv):
            found.append(b" ".join(argv).decode(errors="replace").strip())
        elif state == "Z" and int(parent) == os.getpid():
            found.append(f"unreaped child {entry.name}")
    found += [
        thread.name
        for thread in threading.enumerate()
        if thread.name.startswith("zfs-call ")
        and any(word.split("@")[0].encode() in names for word in thread.name.split())
    ]
    return found


def test_no_zfs_process_is_left_behind(
    api: Any, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    """Streams that end every way a transfer's can (whole, their reader gone, damaged) leave
    no command running and no call in a thread behind them."""
    source, source_dir = fresh(src)
    target, _ = fresh(dst)
    damaged, _ = fresh(dst)
    api.lzc_create(source, props={"compression": "off"})
    write_random(source_dir / "f", 2 << 20)
    api.lzc_snapshot([source + b"@s1"])
    full = send_to_file(api, source + b"@s1", None, tmp_path / "s1")
    receive_file(api, target + b"@s1", full)

    read_fd, write_fd = os.pipe()

    def read_a_little_then_go() -> None:
        os.read(read_fd, 1 << 16)
        os.close(read_fd)

    reader = threading.Thread(target=read_a_little_then_go)
    reader.start()
    try:
        with pytest.raises((exc.ZFSError, OSError)):
            api.lzc_send(source + b"@s1", None, write_fd)
    finally:
        os.close(write_fd)
        reader.join()
    with pytest.raises(exc.ZFSError):
        receive_file(api, damaged + b"@s1", _truncated(full, full.stat().st_size // 2))

    assert leftovers([source, target, damaged]) == []


def test_the_leftover_check_sees_a_leaked_process(src: ScratchPool) -> None:
    """The check above can fail: a ``zfs send`` nobody waits for (its reader never reads)."""
    name, where = fresh(src)
    cli.lzc_create(name, props={"compression": "off"})
    write_random(where / "f", 1 << 20)
    cli.lzc_snapshot([name + b"@s1"])
    read_fd, write_fd = os.pipe()
    leaked = subprocess.Popen(["zfs", "send", (name + b"@s1").decode()], stdout=write_fd)
    os.close(write_fd)
    try:
        found = leftovers([name])
        # zfs rewrites its own argv (on zfs-fuse ``@`` becomes a separator): the start is stable.
        assert len(found) == 1 and found[0].startswith(f"zfs send {name.decode()}"), found
    finally:
        leaked.kill()
        leaked.wait()
        os.close(read_fd)
    assert leftovers([name]) == []


def receive_resumable_file(api: Any, snap: bytes, path: Path) -> None:
    with path.open("rb") as stream:
        api.lzc_receive_resumable(snap, stream.fileno())


def test_a_cut_resumable_receive_continues_where_it_stopped(
    api: Any, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    """Kernel OpenZFS: the rest of a cut stream completes the copy; zfs-fuse refuses, unchanged."""
    source, source_dir = fresh(src)
    target, target_dir = fresh(dst)
    api.lzc_create(source, props={"compression": "off"})
    write_random(source_dir / "f", 4 << 20)
    api.lzc_snapshot([source + b"@s1"])
    full = send_to_file(api, source + b"@s1", None, tmp_path / "s1")
    cut = _truncated(full, full.stat().st_size // 2)
    if not cli.features().resumable_receive:
        with pytest.raises(exc.FeatureNotSupported):
            receive_resumable_file(api, target + b"@s1", cut)
        assert not api.lzc_exists(target)
        assert api.receive_resume_token(source) is None
        return

    with pytest.raises(exc.ZFSError):
        receive_resumable_file(api, target + b"@s1", cut)
    token = api.receive_resume_token(target)
    assert token
    assert not api.lzc_exists(target + b"@s1")
    rest = tmp_path / "rest"
    with rest.open("wb") as out:
        api.send_resume(token, out.fileno())
    assert rest.stat().st_size < 0.75 * full.stat().st_size
    receive_resumable_file(api, target + b"@s1", rest)

    assert api.receive_resume_token(target) is None
    assert tree_digest(mounted_copy(api, target, target_dir)) == tree_digest(source_dir)
    assert api.snapshot_guids(target)[0][1] == api.snapshot_guids(source)[0][1]


def test_the_sender_reads_what_the_rest_of_a_cut_stream_lands(
    api: Any, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    """Kernel OpenZFS: a cut incremental's token names its snapshot and base by GUID and how
    much arrived; once the sender no longer holds that snapshot, SnapshotNotFound (the rest
    cannot come). zfs-fuse has no tokens: FeatureNotSupported."""
    source, source_dir = fresh(src)
    target, _ = fresh(dst)
    if not cli.features().resumable_receive:
        with pytest.raises(exc.FeatureNotSupported):
            api.send_resume_point("1-0-0-0")
        return
    api.lzc_create(source, props={"compression": "off"})
    api.lzc_snapshot([source + b"@s1"])
    receive_file(api, target + b"@s1", send_to_file(api, source + b"@s1", None, tmp_path / "s1"))
    write_random(source_dir / "f", 4 << 20)
    api.lzc_snapshot([source + b"@s2"])
    delta = send_to_file(api, source + b"@s2", source + b"@s1", tmp_path / "s2")
    size = delta.stat().st_size
    with pytest.raises(exc.ZFSError):
        receive_resumable_file(api, target + b"@s2", _truncated(delta, size // 2))
    token = api.receive_resume_token(target)
    assert token

    point = api.send_resume_point(token)
    guids = dict(api.snapshot_guids(source))
    assert (point.snapshot, point.guid, point.base_guid) == (
        source + b"@s2",
        guids[source + b"@s2"],
        guids[source + b"@s1"],
    )
    assert 0 < point.bytes_received <= size // 2
    assert point.bytes_left < size
    api.lzc_destroy_snaps([source + b"@s2"], defer=False)
    with pytest.raises(exc.SnapshotNotFound):
        api.send_resume_point(token)


def test_a_cut_receive_discarded_starts_again_from_nothing(
    api: Any, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    """When the rest cannot come, receive_abort drops the partial copy and a full receive works."""
    source, source_dir = fresh(src)
    target, target_dir = fresh(dst)
    if not cli.features().resumable_receive:
        with pytest.raises(exc.FeatureNotSupported):
            api.receive_abort(target)
        return
    api.lzc_create(source, props={"compression": "off"})
    write_random(source_dir / "f", 2 << 20)
    api.lzc_snapshot([source + b"@s1"])
    full = send_to_file(api, source + b"@s1", None, tmp_path / "s1")
    with pytest.raises(exc.ZFSError):
        receive_resumable_file(api, target + b"@s1", _truncated(full, full.stat().st_size // 2))
    assert api.receive_resume_token(target)

    api.receive_abort(target)
    assert not api.lzc_exists(target)
    receive_resumable_file(api, target + b"@s1", full)
    assert tree_digest(mounted_copy(api, target, target_dir)) == tree_digest(source_dir)


def test_a_compressed_send_is_smaller_and_receives_the_same_files(
    api: Any, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    """Kernel OpenZFS sends compressed blocks as they are on disk; zfs-fuse refuses the flag."""
    source, source_dir = fresh(src)
    target, target_dir = fresh(dst)
    api.lzc_create(source, props={"compression": "gzip"})
    (source_dir / "text").write_bytes(b"ferry moves volumes\n" * (200 << 10))
    api.lzc_snapshot([source + b"@s1"])
    compressed = tmp_path / "compressed"
    if "compress" not in cli.features().send_flags:
        with pytest.raises(exc.FeatureNotSupported), compressed.open("wb") as out:
            api.lzc_send(source + b"@s1", None, out.fileno(), ["compress"])
        return
    plain = send_to_file(api, source + b"@s1", None, tmp_path / "plain")
    with compressed.open("wb") as out:
        api.lzc_send(source + b"@s1", None, out.fileno(), ["compress"])
    assert compressed.stat().st_size < 0.5 * plain.stat().st_size
    receive_file(api, target + b"@s1", compressed)
    assert tree_digest(mounted_copy(api, target, target_dir)) == tree_digest(source_dir)


def test_an_incremental_stream_starts_from_a_bookmark_of_a_destroyed_snapshot(
    api: Any, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    """Kernel OpenZFS: a bookmark keeps its snapshot's GUID, and once the snapshot is gone an
    incremental stream from the bookmark continues a copy that holds the snapshot. zfs-fuse
    has no bookmarks: FeatureNotSupported, none listed, nothing to destroy."""
    source, source_dir = fresh(src)
    target, target_dir = fresh(dst)
    api.lzc_create(source, props={"compression": "off"})
    write_random(source_dir / "f", 2 << 20)
    api.lzc_snapshot([source + b"@s1"])
    if not cli.features().bookmarks:
        with pytest.raises(exc.FeatureNotSupported):
            api.lzc_bookmark({source + b"#s1": source + b"@s1"})
        assert api.bookmark_guids(source) == []
        api.lzc_destroy_bookmarks([source + b"#s1"])
        return
    receive_file(api, target + b"@s1", send_to_file(api, source + b"@s1", None, tmp_path / "s1"))
    api.lzc_bookmark({source + b"#s1": source + b"@s1"})
    with pytest.raises(exc.BookmarkFailure) as again:
        api.lzc_bookmark({source + b"#s1": source + b"@s1"})
    assert [type(error) for error in again.value.errors] == [exc.BookmarkExists]
    guid = dict(api.snapshot_guids(source))[source + b"@s1"]
    assert api.bookmark_guids(source) == [(source + b"#s1", guid)]

    api.lzc_destroy_snaps([source + b"@s1"], defer=False)
    write_random(source_dir / "g", 256 << 10)
    api.lzc_snapshot([source + b"@s2"])
    assert api.lzc_send_space(source + b"@s2", source + b"#s1") < 1 << 20
    delta = send_to_file(api, source + b"@s2", source + b"#s1", tmp_path / "s2")
    assert delta.stat().st_size < 1 << 20, "only what was written after s1"
    receive_file(api, target + b"@s2", delta)
    assert tree_digest(mounted_copy(api, target, target_dir)) == tree_digest(source_dir)

    api.lzc_destroy_bookmarks([source + b"#s1", source + b"#never"])
    assert api.bookmark_guids(source) == []


def test_pool_root_bookmarks_mark_snapshots_and_go_with_the_volume(
    door: Any, src: ScratchPool, tmp_path: Path
) -> None:
    """PoolRoot's bookmarks: named as their snapshots, with their GUIDs, kept after the
    snapshot is destroyed, made again without error, destroyed with the volume."""
    root = PoolRoot(src.name, root=f"ferry{next(_counter)}")
    root.ensure()
    create_in_use(root, "vol", 16 << 20, "off", tmp_path / "vol")
    root.snapshot("vol", "s1")
    if not cli.features().bookmarks:
        assert root.bookmarks("vol") == []
        root.destroy_volume("vol")
        return
    root.bookmark("vol", "s1")
    root.bookmark("vol", "s1")
    assert root.bookmarks("vol") == root.snapshots("vol")
    root.destroy_snapshots("vol", ["s1"], defer=False)
    assert [ref.name for ref in root.bookmarks("vol")] == ["s1"]
    root.destroy_volume("vol")
    assert not door.lzc_exists(root.dataset("vol"))
    assert root.bookmarks("vol") == []


def test_a_large_block_compressed_send_keeps_blocks_whole(
    api: Any, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    """Kernel OpenZFS: `zfs send -c -L` of 1 MiB records carries them compressed and whole;
    the copy reads back the same files with the same block size. zfs-fuse refuses the flags."""
    source, source_dir = fresh(src)
    target, target_dir = fresh(dst)
    flags = ["compress", "large_blocks"]
    if not {"compress", "large_blocks"} <= cli.features().send_flags:
        api.lzc_create(source)
        api.lzc_snapshot([source + b"@s1"])
        with pytest.raises(exc.FeatureNotSupported), (tmp_path / "s").open("wb") as out:
            api.lzc_send(source + b"@s1", None, out.fileno(), flags)
        return
    api.lzc_create(source, props={"compression": "gzip", "recordsize": "1M"})
    (source_dir / "text").write_bytes(b"ferry moves volumes\n" * (400 << 10))
    write_random(source_dir / "random", 2 << 20)
    api.lzc_snapshot([source + b"@s1"])
    plain = send_to_file(api, source + b"@s1", None, tmp_path / "plain")
    stream = tmp_path / "large"
    with stream.open("wb") as out:
        api.lzc_send(source + b"@s1", None, out.fileno(), flags)
    assert stream.stat().st_size < 0.5 * plain.stat().st_size
    receive_file(api, target + b"@s1", stream)
    copy = mounted_copy(api, target, target_dir)
    assert tree_digest(copy) == tree_digest(source_dir)
    assert (copy / "random").stat().st_blksize == (source_dir / "random").stat().st_blksize


def test_a_call_past_its_limit_raises_command_timeout_and_is_listed_until_it_ends(
    api: Any, src: ScratchPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every backend's calls are bounded: the caller hears of a hung one within the limit.
    A command is killed; a libzfs_core call (no signal stops an ioctl) goes on in its
    thread, listed as running until it returns."""
    name, _ = fresh(src)
    hung = "zfs list" if api is cli else "lzc_exists"
    monkeypatch.setenv("FERRY_FAILPOINTS", f"hang:{hung}")
    monkeypatch.setenv("FERRY_ZFS_TIMEOUTS", "read=1")
    started = time.monotonic()
    with pytest.raises(exc.CommandTimeout) as raised:
        api.lzc_exists(name)
    assert time.monotonic() - started < 1 + runner.KILL_GRACE_SECONDS + 5
    assert f"`{hung}" in str(raised.value) and name.decode() in str(raised.value)
    assert "did not finish in 1 s" in str(raised.value)
    if api is not cli:
        assert [r.argv for r in runner.running()] == [("lzc_exists", name.decode())]
    monkeypatch.delenv("FERRY_FAILPOINTS")
    for _ in range(50):
        if not runner.running():
            break
        time.sleep(0.1)
    assert runner.running() == []
    assert not api.lzc_exists(name)


@pytest.fixture
def door(api: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``agent.zfs`` on this backend, so that PoolRoot and the streams run on it."""
    for name in zfs.__all__:
        if hasattr(api, name):
            monkeypatch.setattr(zfs, name, getattr(api, name))
    return api


def test_pool_root_snapshots_properties_and_holds(
    door: Any, src: ScratchPool, tmp_path: Path
) -> None:
    """What the agent's store asks of a volume's dataset, through PoolRoot alone."""
    root = PoolRoot(src.name, root=f"ferry{next(_counter)}")
    root.ensure()
    assert root.snapshots("vol") is None
    create_in_use(root, "vol", 16 << 20, "off", tmp_path / "vol")
    try:
        assert root.snapshots("vol") == []
        assert root.props("vol")["refquota"] == str(16 << 20)
        root.set_property("vol", "refquota", 32 << 20)
        root.set_property("vol", "ferry:test", "x")
        assert (root.props("vol")["refquota"], root.props("vol")["ferry:test"]) == (
            str(32 << 20),
            "x",
        )
        write_random(tmp_path / "vol" / "f", 1 << 20)
        root.snapshot("vol", "s1")
        root.snapshot("vol", "s2")
        s1, s2 = root.snapshot_name("vol", "s1"), root.snapshot_name("vol", "s2")
        assert root.snapshots("vol") == [
            SnapshotRef("s1", int(door.lzc_get_props(s1)["guid"])),
            SnapshotRef("s2", int(door.lzc_get_props(s2)["guid"])),
        ]
        assert root.send_space("vol", "s1", None) > 1 << 20
        if cli.features().send_estimate:
            assert root.send_space("vol", "s2", Base("s1")) < 200_000
        else:
            with pytest.raises(exc.FeatureNotSupported):
                root.send_space("vol", "s2", Base("s1"))

        root.hold("vol", ["s1", "s2"], "ferry-test")
        assert (door.hold_count(s1), door.hold_count(s2)) == (1, 1)
        root.destroy_snapshots("vol", ["s1"], defer=True)
        assert door.lzc_exists(s1), "a held snapshot waits for its release"
        root.release("vol", ["s1", "s2"], "ferry-test")
        assert [ref.name for ref in root.snapshots("vol") or ()] == ["s2"]
        assert door.hold_count(s2) == 0
    finally:
        root.destroy_volume("vol")


def test_snapshot_streams_through_a_descriptor(
    door: Any, src: ScratchPool, dst: ScratchPool, tmp_path: Path
) -> None:
    """A transfer's two ends: SnapshotStream into a descriptor, SnapshotReceive from one."""
    sender = PoolRoot(src.name, root=f"ferry{next(_counter)}")
    receiver = PoolRoot(dst.name, root=f"ferry{next(_counter)}")
    sender.ensure()
    receiver.ensure()
    create_in_use(sender, "vol", 16 << 20, "off", tmp_path / "vol")
    try:
        write_random(tmp_path / "vol" / "f", 1 << 20)
        sender.snapshot("vol", "s1")
        stream = tmp_path / "s1"
        with stream.open("wb") as out:
            SnapshotStream(sender.snapshot_name("vol", "s1"), None).write_to(out.fileno())
        with stream.open("rb") as source:
            SnapshotReceive(receiver.snapshot_name("vol", "s1")).read_from(source.fileno())
        assert receiver.snapshots("vol") == sender.snapshots("vol")
        assert receiver.props("vol")["mounted"] == "no"
        with stream.open("rb") as again, pytest.raises(exc.ZFSError):
            SnapshotReceive(receiver.snapshot_name("vol", "s1")).read_from(again.fileno())
    finally:
        sender.destroy_volume("vol")
        if receiver.snapshots("vol") is not None:
            receiver.destroy_volume("vol")
